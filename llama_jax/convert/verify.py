"""`--verify`: run the source and the converted checkpoint on one probe batch and compare logits.

Each side runs in its own framework where possible, in float32 compute:
- hf: `transformers.LlamaForCausalLM.from_pretrained` (falls back to llama_jax without transformers);
- meta: a PyTorch forward pass in Meta's own layout (interleaved rotary pairs) on the merged
  shards as stored, so a wrong rotary reordering in the converter shows up as a mismatch;
- jax: the llama_jax model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from llama_jax.config import LLaMAConfig

LOSSLESS_MAX_ABS_DIFF = 1e-3  # float32 compute on identical weights: only summation order differs
LOSSLESS_MIN_TOP1 = 0.99
LOSSY_MIN_TOP1 = 0.90  # rounding weights to a narrower dtype moves some near-tied argmaxes


@dataclasses.dataclass
class VerifyReport:
    max_abs_diff: float
    top1_agreement: float
    src_engine: str
    dst_engine: str
    lossless: bool

    @property
    def ok(self) -> bool:
        if self.lossless:
            return self.max_abs_diff <= LOSSLESS_MAX_ABS_DIFF and self.top1_agreement >= LOSSLESS_MIN_TOP1
        return self.top1_agreement >= LOSSY_MIN_TOP1

    def line(self) -> str:
        bound = (f"max |dlogit| <= {LOSSLESS_MAX_ABS_DIFF:g} and top-1 >= {LOSSLESS_MIN_TOP1:.0%}" if self.lossless
                 else f"top-1 >= {LOSSY_MIN_TOP1:.0%} (lossy dtype change)")
        return (f"verify {self.src_engine} vs {self.dst_engine}: max |dlogit| {self.max_abs_diff:.3g}, "
                f"top-1 agreement {self.top1_agreement:.2%} ({'ok' if self.ok else 'FAILED'}; needs {bound})")


def probe_tokens(config: LLaMAConfig, batch: int = 2, seq: int = 32, seed: int = 0) -> np.ndarray:
    seq = min(seq, config.max_seq_len)
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq)).astype(np.int32)


def jax_logits(config: LLaMAConfig, params, tokens: np.ndarray) -> np.ndarray:
    import jax

    from llama_jax.model import LLaMA

    config = config.replace(dtype="float32", scan_layers=True)
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    return np.asarray(jax.jit(LLaMA(config).apply)({"params": params}, tokens))


def _source_params(source):
    from llama_jax.convert.hf import empty_params, put_tensor, tensor_specs

    params = empty_params(source.config, np.float32)
    for spec in tensor_specs(source.config):
        put_tensor(params, spec, source.load(spec.hf_name))
    return params


def hf_logits(path: Path, tokens: np.ndarray) -> tuple[np.ndarray, str]:
    try:
        import torch
        import transformers
    except ImportError:
        from llama_jax.convert.hf_dir import read_hf_dir

        source = read_hf_dir(path)
        try:
            return jax_logits(source.config, _source_params(source), tokens), "llama_jax (hf weights)"
        finally:
            source.close()
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    return logits, "transformers"


def meta_logits(path: Path, tokens: np.ndarray, rope_scaling_factor: float | None) -> tuple[np.ndarray, str]:
    """Logits of a Meta checkpoint computed in Meta's layout with PyTorch."""
    import torch

    from llama_jax.convert import meta
    from llama_jax.model import rope_inv_freq

    cfg, arrays = meta.read_meta_layout(path, rope_scaling_factor)  # no rotary reordering involved
    weights = {name: torch.from_numpy(np.asarray(a, np.float32)) for name, a in arrays.items()}
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    B, S = tokens.shape
    angles = torch.outer(torch.arange(S, dtype=torch.float32), torch.from_numpy(rope_inv_freq(cfg)))
    rot = torch.polar(torch.ones_like(angles), angles)  # [S, Dh/2] complex

    def rotate(x, n):  # x: [B, S, n*Dh]; Meta pairs dimensions (2i, 2i+1) of each head
        xc = torch.view_as_complex(x.reshape(B, S, n, Dh // 2, 2))
        return torch.view_as_real(xc * rot[None, :, None]).reshape(B, S, n, Dh)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = weights["tok_embeddings.weight"][torch.as_tensor(tokens, dtype=torch.long)]
    causal = torch.full((S, S), float("-inf")).triu(1)
    with torch.no_grad():
        for i in range(cfg.n_layers):
            w = {k.split(f"layers.{i}.", 1)[1]: v for k, v in weights.items() if k.startswith(f"layers.{i}.")}
            h = norm(x, w["attention_norm.weight"])
            q = rotate(h @ w["attention.wq.weight"].T, H)
            k = rotate(h @ w["attention.wk.weight"].T, K).repeat_interleave(H // K, dim=2)
            v = (h @ w["attention.wv.weight"].T).reshape(B, S, K, Dh).repeat_interleave(H // K, dim=2)
            scores = torch.einsum("bshd,bthd->bhst", q, k) / Dh**0.5 + causal
            out = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).reshape(B, S, H * Dh)
            x = x + out @ w["attention.wo.weight"].T
            h = norm(x, w["ffn_norm.weight"])
            ffn = torch.nn.functional.silu(h @ w["feed_forward.w1.weight"].T) * (h @ w["feed_forward.w3.weight"].T)
            x = x + ffn @ w["feed_forward.w2.weight"].T
        x = norm(x, weights["norm.weight"])
        out_w = weights.get("output.weight", weights["tok_embeddings.weight"])
        return (x @ out_w.T).numpy(), "pytorch (meta layout)"


def logits_for(fmt: str, path: Path, tokens: np.ndarray, rope_scaling_factor: float | None) -> tuple[np.ndarray, str]:
    if fmt == "hf":
        return hf_logits(path, tokens)
    if fmt == "meta":
        return meta_logits(path, tokens, rope_scaling_factor)
    from llama_jax.checkpoint import load_model

    config, params = load_model(path, scan_layers=True)
    return jax_logits(config, params, tokens), "llama_jax"


def verify_conversion(src_fmt: str, src: Path, dst_fmt: str, dst: Path, lossless: bool,
                      rope_scaling_factor: float | None = None) -> VerifyReport:
    from llama_jax.convert.pipeline import read_checkpoint

    source = read_checkpoint(src_fmt, src, rope_scaling_factor)
    tokens = probe_tokens(source.config)
    source.close()
    ref, src_engine = logits_for(src_fmt, src, tokens, rope_scaling_factor)
    out, dst_engine = logits_for(dst_fmt, dst, tokens, rope_scaling_factor)
    return VerifyReport(float(np.abs(ref - out).max()), float(np.mean(ref.argmax(-1) == out.argmax(-1))),
                        f"{src_fmt} ({src_engine})", f"{dst_fmt} ({dst_engine})", lossless)
