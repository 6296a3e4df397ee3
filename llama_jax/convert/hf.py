"""Hugging Face `LlamaForCausalLM` weights <-> llama_jax parameters, in memory.

The one place that knows Hugging Face tensor names and how each maps onto a Flax parameter.
PyTorch `nn.Linear` stores [out, in]; a Flax kernel is [in..., out...]: a linear weight maps as
`w.T.reshape(kernel_shape)` and back as `kernel.reshape(hf_shape[::-1]).T`, copied block by block
(`copy_transposed`). Both use the rotate-half rotary layout, so no permutation is needed here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

from llama_jax.config import LLaMAConfig, check_model_config
from llama_jax.convert.source import dtype_name, narrowed, numpy_dtype, same_values

# Buffers some PyTorch checkpoints carry that are derived, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor and where it lives in the (scanned) llama_jax parameter tree."""

    hf_name: str
    path: tuple[str, ...]  # path in the params tree; layer tensors live under ("layers", ...)
    layer: int | None  # index along the stacked layer axis, None for top-level tensors
    hf_shape: tuple[int, ...]
    jax_shape: tuple[int, ...]  # per layer
    linear: bool  # True: transpose between [out, in] and [in..., out...]

    def to_jax(self, w: np.ndarray, out: np.ndarray) -> None:
        """Write `w` ([out, in]) into `out` (a C-contiguous array of `jax_shape`), cast to its dtype."""
        if self.linear:
            if not out.flags.c_contiguous:  # reshaping would copy it, and the copy would be filled
                raise ValueError(f"{self.hf_name}: the destination array must be C-contiguous")
            copy_transposed(w, out.reshape(self.hf_shape[::-1]))
        else:
            out[...] = w.reshape(self.jax_shape)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        if not self.linear:
            return np.ascontiguousarray(a.reshape(self.hf_shape))
        out = np.empty(self.hf_shape, a.dtype)
        copy_transposed(np.ascontiguousarray(a).reshape(self.hf_shape[::-1]), out)
        return out


TILE = 128  # rows and columns per block of `copy_transposed`


def copy_transposed(src: np.ndarray, out: np.ndarray) -> None:
    """`out[...] = src.T` for 2-D arrays, a TILE x TILE block at a time: numpy's transposing copy
    reads one array with a stride of a whole row, several times slower (0.37 against 2.3 GB/s for
    a float32 [4096, 1536] weight) than blocks that stay in cache."""
    rows, cols = src.shape
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            out[j:j + TILE, i:i + TILE] = src[i:i + TILE, j:j + TILE].T


def tensor_specs(cfg: LLaMAConfig) -> list[TensorSpec]:
    """Every Hugging Face tensor of the model, in checkpoint order (embedding, layers, norm, head)."""
    D, F, V, H, K, Dh = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", ("embed", "embedding"), None, (V, D), (V, D), False)]
    per_layer = [
        ("input_layernorm.weight", ("attn_norm", "scale"), (D,), (D,), False),
        ("self_attn.q_proj.weight", ("attn", "q", "kernel"), (H * Dh, D), (D, H, Dh), True),
        ("self_attn.k_proj.weight", ("attn", "k", "kernel"), (K * Dh, D), (D, K, Dh), True),
        ("self_attn.v_proj.weight", ("attn", "v", "kernel"), (K * Dh, D), (D, K, Dh), True),
        ("self_attn.o_proj.weight", ("attn", "o", "kernel"), (D, H * Dh), (H, Dh, D), True),
        ("post_attention_layernorm.weight", ("mlp_norm", "scale"), (D,), (D,), False),
        ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), (F, D), (D, F), True),
        ("mlp.up_proj.weight", ("mlp", "up", "kernel"), (F, D), (D, F), True),
        ("mlp.down_proj.weight", ("mlp", "down", "kernel"), (D, F), (F, D), True),
    ]
    for i in range(cfg.n_layers):
        for suffix, path, hf_shape, jax_shape, linear in per_layer:
            specs.append(TensorSpec(f"model.layers.{i}.{suffix}", ("layers", *path), i, hf_shape, jax_shape, linear))
    specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), None, (D,), (D,), False))
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), None, (V, D), (D, V), True))
    return specs


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def check_names(cfg: LLaMAConfig, names: set[str]) -> None:
    """Raise ValueError for a missing or unexpected tensor name."""
    expected = {s.hf_name for s in tensor_specs(cfg)}
    missing = sorted(expected - names, key=_natural)
    if missing:
        raise ValueError(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    allowed = expected | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    extra = sorted(n for n in names - allowed if not is_ignored(n))
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                         + " for a LLaMA model of this config")


def check_shape(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if tuple(shape) != spec.hf_shape:
        raise ValueError(f"tensor {spec.hf_name} has shape {tuple(shape)}, config expects {spec.hf_shape}")


def check_tied_head(cfg: LLaMAConfig, embed: np.ndarray, head: np.ndarray) -> None:
    """ValueError unless `head`, the `lm_head.weight` a tied config's checkpoint holds as well, is
    its embedding table: transformers loads a checkpoint whose head differs untied, with that head
    (and a warning), so a tied conversion would silently drop it."""
    check_shape(dataclasses.replace(tensor_specs(cfg)[0], hf_name="lm_head.weight"), head.shape)  # the table's
    if not same_values(embed, head):
        raise ValueError("lm_head.weight differs from model.embed_tokens.weight, which config.json ties it to "
                         "(tie_word_embeddings: true); transformers loads such a checkpoint untied, with this "
                         "lm_head.weight: set tie_word_embeddings to false in config.json to convert it so")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in name.split(".")]


def empty_params(cfg: LLaMAConfig, dtype) -> dict:
    """A scanned parameter tree of uninitialised numpy arrays, to be filled tensor by tensor."""
    params: dict = {}
    for spec in tensor_specs(cfg):
        shape = ((cfg.n_layers,) if spec.layer is not None else ()) + spec.jax_shape
        if spec.layer is None or spec.layer == 0:
            _set(params, spec.path, np.empty(shape, dtype))
    return params


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def put_tensor(params: dict, spec: TensorSpec, hf_array: np.ndarray) -> None:
    """Write one Hugging Face tensor into a tree made by `empty_params` (cast to its dtype)."""
    check_shape(spec, hf_array.shape)
    dest = _get(params, spec.path)
    spec.to_jax(np.asarray(hf_array), dest if spec.layer is None else dest[spec.layer])


def hf_tensor(params: Mapping, spec: TensorSpec) -> np.ndarray:
    """One Hugging Face tensor ([out, in] numpy) from a scanned parameter tree."""
    a = _get(params, spec.path)
    return spec.to_hf(np.asarray(a[spec.layer] if spec.layer is not None else a))


def iter_hf_tensors(cfg: LLaMAConfig, params: Mapping) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """Yield (spec, [out, in] numpy array) for every Hugging Face tensor, one at a time; ValueError
    first when `params` do not fit `cfg` (a layer past the end would be read as the last one)."""
    from llama_jax.model import check_params_as_laid_out, stack_layers

    check_model_config(cfg, "cfg")
    if not check_params_as_laid_out(cfg, params):
        params = stack_layers(dict(params), cfg.n_layers)
    for spec in tensor_specs(cfg):
        yield spec, hf_tensor(params, spec)


def from_hf_state_dict(state_dict: Mapping[str, Any], hf_config: Mapping[str, Any],
                       param_dtype: str = "float32", **config_overrides) -> tuple[LLaMAConfig, dict]:
    """(LLaMAConfig, params of numpy arrays) from a Hugging Face state dict and config.json dict;
    the params in the layer layout of the config's `scan_layers` (an override may set it).

    For tied models `lm_head.weight` may be present (as in `model.state_dict()`) or absent (Hub files).
    """
    from llama_jax.model import params_in_layout

    from llama_jax.convert.torch_io import WEIGHT_DTYPES

    cfg = LLaMAConfig.from_hf(hf_config, param_dtype=param_dtype, **config_overrides)
    check_names(cfg, set(state_dict))
    params = empty_params(cfg, numpy_dtype(param_dtype))
    for spec in tensor_specs(cfg):
        array = _as_numpy(state_dict[spec.hf_name])
        if dtype_name(array.dtype) not in WEIGHT_DTYPES:  # (a cast made integers floats, dropped imaginary parts)
            raise ValueError(f"{spec.hf_name} has dtype {array.dtype}; weights are one of {', '.join(WEIGHT_DTYPES)}")
        if spec.hf_name == "model.embed_tokens.weight" and cfg.tie_embeddings and "lm_head.weight" in state_dict:
            check_tied_head(cfg, array, _as_numpy(state_dict["lm_head.weight"]))  # (the table as given, not cast)
        put_tensor(params, spec, narrowed(spec.hf_name, array, numpy_dtype(param_dtype)))  # (beyond float16: inf)
    return cfg, params_in_layout(cfg, params)


def to_hf_state_dict(cfg: LLaMAConfig, params: Mapping) -> dict[str, np.ndarray]:
    """Hugging Face state dict (numpy, [out, in] layout) from llama_jax params (scanned or not).

    Tied models carry no `lm_head.weight`, as in Hub files.
    """
    return {spec.hf_name: a for spec, a in iter_hf_tensors(cfg, params)}


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        from llama_jax.convert.torch_io import tensor_to_numpy

        return tensor_to_numpy(x)
    return np.asarray(x)
