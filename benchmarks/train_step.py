"""Training speed on CPU: llama-jax against PyTorch + transformers on the same model, side by side.

Both train the same architecture (float32; default dim 512, 8 layers, 8 heads, FFN 1408, vocab
8000, ~34M parameters) on the same random batches of 8 x 256 tokens with AdamW:
  llama-jax step   `Trainer.step` (the jitted, donated train step the run loop calls);
  llama-jax train  the whole `llama-jax train` process on synthetic data (data, logging and
                   metrics included), from the tokens/s it logs after the first window;
  reference        `transformers.LlamaForCausalLM` (eager attention, as in the parity tests,
                   and `sdpa`) with `torch.optim.AdamW`, forward + backward + step.
The run also measures XLA's float32 matmul rate (2048^2) and PyTorch's, and reports model FLOP
utilisation against XLA's (model FLOPs as in `llama_jax.metrics.flops_per_token`). Medians of the
repeats after warm-up steps; compile time is reported apart.

    python benchmarks/train_step.py [--repeats 5] [--variants]

`--variants` also times the llama-jax step with layers unrolled and with the other attention
implementations, and the whole process with 4 KiB pages (`llama_jax.backend_tuning`'s huge-page
restart turned off), to show where the time goes. Like `llama-jax`, the script restarts itself
once with glibc's huge-page tunable where that applies; PyTorch runs under the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]


def matmul_rates(repeats: int) -> tuple[float, float]:
    """FLOP/s of a float32 2048 x 2048 matmul in XLA and in PyTorch."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    xla = 2 * n**3 / median_seconds(lambda: f(a).block_until_ready(), repeats * 4)
    t = torch.ones(n, n)
    torch_rate = 2 * n**3 / median_seconds(lambda: t @ t, repeats * 4)
    return xla, torch_rate


def jax_config(args, **model_changes):
    from llama_jax.experiment import base_config

    config = base_config("debug", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                         n_kv_heads=args.heads, ffn_dim=args.ffn, max_seq_len=args.seq_len, **model_changes)
    config.train.update(batch_size=args.batch, seq_len=args.seq_len, steps=1000)
    config.optimizer.update(lr=1e-4, warmup_steps=0, weight_decay=0.1)
    return config


def time_trainer(args, batches, **model_changes) -> tuple[float, float]:
    """(median seconds per step, seconds of the first call: compile + one step)."""
    import jax

    from llama_jax.train import build_trainer, global_batch

    trainer = build_trainer(jax_config(args, **model_changes))
    state = trainer.init_state(0)
    placed = [global_batch(trainer.mesh, b) for b in batches]
    start = time.perf_counter()
    state, metrics = trainer.step(state, placed[0])
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    box = [state]

    def step():
        box[0], m = trainer.step(box[0], placed[1])
        jax.block_until_ready(m)

    return median_seconds(step, args.repeats), first


def time_torch(args, batches, attn: str) -> float:
    import torch
    import transformers

    from llama_jax.config import LLaMAConfig, to_hf_config

    shape = LLaMAConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                        n_kv_heads=args.heads, ffn_dim=args.ffn, max_seq_len=args.seq_len)
    config = transformers.LlamaConfig(**to_hf_config(shape))
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    inputs = torch.from_numpy(batches[1]["tokens"]).long()
    labels = torch.from_numpy(batches[1]["targets"]).long()

    def step():
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return median_seconds(step, args.repeats, warmup=2)


def time_train_process(args, **env) -> float:
    """tokens/s that `llama-jax train` logs (median over its log windows after the first); `env`:
    changes to its environment."""
    with tempfile.TemporaryDirectory() as workdir:
        overrides = [f"--config.model.{k}={v}" for k, v in dict(
            vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
            ffn_dim=args.ffn, max_seq_len=args.seq_len).items()]
        steps = 2 + 2 * args.repeats
        overrides += [f"--config.train.batch_size={args.batch}", f"--config.train.seq_len={args.seq_len}",
                      f"--config.train.steps={steps}", "--config.train.log_every=2", "--config.optimizer.warmup_steps=0",
                      f"--config.checkpoint.every={steps}", "--config.data.source=synthetic"]
        subprocess.run([sys.executable, "-m", "llama_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
                        "--workdir", workdir, *overrides], check=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ, LLAMA_JAX_SINGLE_PROCESS="1", **env))
        logged = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_second"] for r in logged if "tokens_per_second" in r][1:]
        return statistics.median(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in dict(dim=512, layers=8, heads=8, ffn=1408, vocab=8000, batch=8, seq_len=256,
                              repeats=5).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--variants", action="store_true", help="also time unrolled layers and other attention")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    import jax
    import torch

    from llama_jax.metrics import flops_per_token

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len + 1)).astype(np.int32)
        batches.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                        "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch, 1)),
                        "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
                        "loss_mask": np.ones((args.batch, args.seq_len), np.float32)})
    tokens = args.batch * args.seq_len
    xla_rate, torch_rate = matmul_rates(args.repeats)
    cfg = jax_config(args).model
    from llama_jax.experiment import model_config

    per_token = flops_per_token(model_config(cfg), args.seq_len)
    print(f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"matmul 2048^2 float32: XLA {xla_rate / 1e9:.0f} GFLOP/s, PyTorch {torch_rate / 1e9:.0f} GFLOP/s; "
          f"{per_token / 1e6:.0f} MFLOP per token; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")

    rows = {}
    seconds, first = time_trainer(args, batches)
    rows["llama-jax Trainer.step"] = (tokens / seconds, first)
    if args.variants:
        for label, changes in {"unrolled layers": dict(scan_layers=False),
                               "attention dot_product": dict(attention_impl="dot_product")}.items():
            seconds, first = time_trainer(args, batches, **changes)
            rows[f"llama-jax Trainer.step, {label}"] = (tokens / seconds, first)
    rows["llama-jax train (whole process)"] = (time_train_process(args), None)
    if args.variants:  # glibc's hugetlb tunable set to 0: the command keeps 4 KiB pages (no restart)
        rows["llama-jax train (whole process), 4 KiB pages"] = (
            time_train_process(args, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"), None)
    for attn in ("eager", "sdpa"):
        rows[f"transformers + AdamW ({attn})"] = (tokens / time_torch(args, batches, attn), None)

    reference = max(v for k, (v, _) in rows.items() if k.startswith("transformers"))
    print("\n| work | tokens/s | x best PyTorch | MFU vs XLA matmul | compile + first step, s |")
    print("|---|---|---|---|---|")
    for name, (rate, first) in rows.items():
        compiled = f"{first:.1f}" if first is not None else ""
        print(f"| {name} | {rate:,.0f} | {rate / reference:.2f} | {rate * per_token / xla_rate:.0%} | {compiled} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"xla_matmul_flops": xla_rate, "torch_matmul_flops": torch_rate,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    # as `llama-jax` does: restart with glibc's huge-page tunable where it applies, so that the step
    # measured here runs as in the command (PyTorch runs in the same process, under the same setting)
    from llama_jax.backend_tuning import restart_with_huge_pages

    restart_with_huge_pages()
    sys.exit(main())
