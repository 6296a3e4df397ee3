"""The LLaMA model in Flax linen, top to bottom.

Conventions used throughout:
- Shapes in names: B batch, S query length, T key/value length, D model dim, H query heads,
  K key/value heads, G = H / K query heads per K/V head, Dh head dim, F FFN dim, V vocab, L layers.
- Rotary layout is "rotate-half" (Hugging Face): dimension i of a head pairs with i + Dh/2.
  Meta's checkpoints pair (2i, 2i+1); the Meta converter permutes `wq`/`wk` rows once at load.
- Every parameter carries logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, norm
  and, for the scanned stack, layers); `llama_jax.sharding` maps them to mesh axes.
- Decoding uses the same modules: pass a `KVCache` and the model writes the new keys/values into
  it and returns it beside the logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from llama_jax.attention import attention, attention_mask, cached_attention, sharded_attention
from llama_jax.config import LLaMAConfig, check_model_config, check_seed, is_int
from llama_jax.sharding import ambient_mesh

Array = jax.Array
_INIT = nn.initializers.normal(stddev=0.02)

PROJECTION = "projection"  # the checkpoint name of every `project` output
_policies = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots,
                                              _policies.save_only_these_names(PROJECTION)),
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                                       _policies.save_only_these_names(PROJECTION)),
    "qkv_proj": _policies.save_only_these_names("q_proj", "k_proj", "v_proj"),
}


def _param(init, *axes):
    return nn.with_logical_partitioning(init, axes)


# ---- rotary embeddings -----------------------------------------------------------------------


def rope_inv_freq(cfg: LLaMAConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2] in float32, with LLaMA-3 or linear scaling applied.

    Rounded as transformers rounds them, since one float32 ulp of a frequency near 1 turns its angle
    at position 131072 by 0.008 rad: each power theta^(2i/Dh) is rounded once to float32 (PyTorch's
    float32 power is within an ulp of that, NumPy's is an ulp off for a sixth of the frequencies), and
    a number divided by an array is PyTorch's reciprocal of the array times the number. (A Python
    number and a float32 array compute in float32.)"""
    dh = cfg.head_dim
    exponents = (np.arange(0, dh, 2, dtype=np.float32) / dh).astype(np.float64)
    inv_freq = 1 / (cfg.rope_theta ** exponents).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # LLaMA-3.1: keep short wavelengths, divide long ones by `factor`, interpolate in between.
    f, lo, hi, ctx = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                      scaling.original_max_position_embeddings)
    wavelen = (1 / inv_freq) * (2 * np.pi)
    smooth = ((1 / wavelen) * ctx - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_freq / f + smooth * inv_freq
    scaled = np.where(wavelen > ctx / lo, inv_freq / f, smoothed)
    return np.where(wavelen < ctx / hi, inv_freq, scaled)


def rotary_sin_cos(positions_BxS: Array, cfg: LLaMAConfig) -> tuple[Array, Array]:
    """sin and cos tables [B, S, Dh] (float32) for the given positions.

    Computed once and kept as arrays (`optimization_barrier`): XLA would otherwise fuse the sine
    and cosine into every layer's q and k rotation and evaluate them again for every head (on
    CPU, 11 us of q's rotation per layer in a batch-8 decoding step, against 1 us)."""
    freqs_BxSxHalf = positions_BxS[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
    sin, cos = jnp.sin(freqs_BxSxHalf), jnp.cos(freqs_BxSxHalf)
    return jax.lax.optimization_barrier((jnp.concatenate([sin, sin], axis=-1), jnp.concatenate([cos, cos], axis=-1)))


def apply_rotary(x_BxSxNxDh: Array, sin_BxSxDh: Array, cos_BxSxDh: Array) -> Array:
    x = x_BxSxNxDh
    sin = sin_BxSxDh[:, :, None, :].astype(x.dtype)
    cos = cos_BxSxDh[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# ---- attention (kernels live in llama_jax.attention) ------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding.

    k, v: for unrolled layers a tuple of one [B, K, T, Dh] array per layer, [K, T, Dh] for a
    batch of one; for scanned layers, whose scan carries the whole cache, one stacked
    [L, B, K, T, Dh] array. Heads come before slots (see `llama_jax.attention.cached_attention`).
    Both special layouts avoid copies that XLA's CPU backend makes on every decoded token: it
    copies any slice of an array that a matrix product reads (each layer's slice of a stacked
    cache), and, when the array has a batch dimension of one, every layer's keys.
    segment_ids: [B, T] (0 marks an empty slot); index: slots filled so far. Each layer writes
    its new slots into its keys and values in place.
    `constrained(mesh)` shards it by the logical-axis rules (`AXES`, of which an array of fewer
    dimensions has the last ones): batch over data x fsdp like activations, K/V heads over tensor
    like the K/V projections.
    """

    AXES = ("layers", "batch", "kv_heads", "length", "head_dim")

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]
    segment_ids: Array
    index: Array

    @classmethod
    def create(cls, cfg: LLaMAConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        """An empty cache laid out for `cfg.scan_layers` (stacked) or unrolled layers (per layer)."""
        check_model_config(cfg, "cfg")
        for name, value in (("batch", batch), ("max_len", max_len)):
            if not (is_int(value) and int(value) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        batch, max_len = int(batch), int(max_len)
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype if dtype is None else _cache_dtype(dtype))
        if cfg.scan_layers:
            k, v = (jnp.zeros((cfg.n_layers, *shape), dtype) for _ in "kv")
        else:
            shape = shape[1:] if batch == 1 else shape
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)) for _ in "kv")
        return cls(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    def constrained(self, mesh=None) -> "KVCache":
        """The cache under sharding constraints on `mesh` (inside jit); no mesh: unchanged."""
        if mesh is None:
            return self
        from llama_jax.sharding import logical_sharding

        constrain = functools.partial(jax.tree.map, lambda a: jax.lax.with_sharding_constraint(
            a, logical_sharding(mesh, self.AXES[-a.ndim:])))
        seg = logical_sharding(mesh, ("batch", "length"))
        return self.replace(k=constrain(self.k), v=constrain(self.v),
                            segment_ids=jax.lax.with_sharding_constraint(self.segment_ids, seg))


@flax.struct.dataclass
class CacheView:
    """What every layer needs to read and write the cache for one call: the query slots [B, S],
    the cache's segment ids including the new slots [B, T], and the first new slot."""

    q_slots: Array
    kv_segment_ids: Array
    index: Array


# ---- projections -----------------------------------------------------------------------------


def project(x: Array, kernel: Array, n_in: int, kernel_in_last: bool = False, precision=None,
            preferred_element_type=None) -> Array:
    """x [..., *in] times kernel [*in, *out] (or [*out, *in] with `kernel_in_last`) -> [..., *out],
    contracting x's last `n_in` axes: a DenseGeneral's product.

    The value and the input gradient are the products JAX's differentiation gives. The kernel's
    gradient is written out as one 2-D product over all tokens: x [tokens, in] and the output's
    gradient [tokens, out], both contracted on their leading axis. Differentiated by JAX, it is a
    product contracting the batch and length axes, which XLA's CPU backend prepares by copying
    the output's gradient into an [out, tokens] layout (a strided copy per projection per step,
    [tokens, ffn] for the MLP's gate and up); the 2-D product reads both operands as they lie.
    The same arithmetic on any backend; on CPU the train step is about 12% faster
    (`benchmarks/README.md`).

    An output widened by `preferred_element_type` (float32 logits from bfloat16 activations)
    sends its gradient back in the inputs' dtype, as every other projection's is, so the two
    backward products run at the compute dtype's rate, accumulating in the wider type. Taken in
    float32, it made them TF32 products on an H200: 30 of the 0.89B model's 397 ms train step.

    The output is named `PROJECTION`: remat policies see a custom VJP here, not a matrix product,
    so the `dots` policies save it by that name."""
    return checkpoint_name(_project(x, kernel, n_in, kernel_in_last, precision, preferred_element_type), PROJECTION)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _project(x, kernel, n_in, kernel_in_last, precision, preferred_element_type):
    return jax.lax.dot_general(x, kernel, _dimensions(x, kernel, n_in, kernel_in_last), precision=precision,
                               preferred_element_type=preferred_element_type)


def _dimensions(x, kernel, n_in, kernel_in_last):
    kernel_in = tuple(range(kernel.ndim - n_in, kernel.ndim)) if kernel_in_last else tuple(range(n_in))
    return (tuple(range(x.ndim - n_in, x.ndim)), kernel_in), ((), ())


def _project_fwd(x, kernel, n_in, kernel_in_last, precision, preferred_element_type):
    return _project(x, kernel, n_in, kernel_in_last, precision, preferred_element_type), (x, kernel)


def _project_bwd(n_in, kernel_in_last, precision, preferred_element_type, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)  # an output widened by preferred_element_type flows back in the compute dtype
    n_out = kernel.ndim - n_in
    kernel_out = tuple(range(n_out)) if kernel_in_last else tuple(range(n_in, kernel.ndim))
    dx = jax.lax.dot_general(dy, kernel, ((tuple(range(dy.ndim - n_out, dy.ndim)), kernel_out), ((), ())),
                             precision=precision, preferred_element_type=preferred_element_type)
    x_2d = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))
    dy_2d = dy.reshape(-1, math.prod(dy.shape[dy.ndim - n_out:]))
    pair = (dy_2d, x_2d) if kernel_in_last else (x_2d, dy_2d)
    dkernel = jax.lax.dot_general(*pair, (((0,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=preferred_element_type)
    return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def _dense_product(x, kernel, dimension_numbers, precision=None):
    """`project` as DenseGeneral's `dot_general`, which contracts x's last axes with the kernel's first."""
    (x_axes, kernel_axes), batch_axes = dimension_numbers
    n_in = len(x_axes)
    assert batch_axes == ((), ()) and tuple(x_axes) == tuple(range(x.ndim - n_in, x.ndim)), dimension_numbers
    assert tuple(kernel_axes) == tuple(range(n_in)), dimension_numbers
    return project(x, kernel, n_in, False, precision)


def _dense(cfg: LLaMAConfig, features, axes, name, axis=-1):
    return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                           param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_param(_INIT, *axes), name=name,
                           dot_general=_dense_product)


# ---- RMSNorm and SwiGLU with written-out backwards ------------------------------------------
# Each keeps only its inputs for the backward (JAX's differentiation keeps every intermediate it
# will need: the normalised activations, or SwiGLU's sigmoid, product and the like, in the
# compute dtype), and recomputes the cheap elementwise work there. Under scanned layers every
# kept array is also written into and read back out of a stacked buffer per layer, so this is
# memory traffic saved twice.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
    """scale * x / sqrt(mean(x**2) + eps) over the last axis, computed in float32, result in `dtype`."""
    return _rms_norm_fwd(x, scale, eps, dtype)[0]


def _rms_norm_fwd(x, scale, eps, dtype):
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * (x32 * inv_rms).astype(dtype), (x, inv_rms, scale)


def _rms_norm_bwd(eps, dtype, saved, dy):
    x, inv_rms, scale = saved
    normed = x.astype(jnp.float32) * inv_rms
    dy32 = dy.astype(jnp.float32)
    d_scale = jnp.sum((dy32 * normed).reshape(-1, normed.shape[-1]), axis=0)
    d_normed = dy32 * scale.astype(jnp.float32)
    dx = inv_rms * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up."""
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, dy):
    gate, up = saved
    g, u, dy32 = (a.astype(jnp.float32) for a in (gate, up, dy))
    sigmoid = jax.nn.sigmoid(g)
    d_gate = dy32 * u * sigmoid * (1 + g * (1 - sigmoid))  # silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
    return d_gate.astype(gate.dtype), (dy32 * g * sigmoid).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ---- layers ----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, result in the compute dtype."""

    cfg: LLaMAConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", _param(nn.initializers.ones, "norm"), (x.shape[-1],),
                           jnp.dtype(self.cfg.param_dtype))
        return rms_norm(x, scale, self.cfg.norm_eps, jnp.dtype(self.cfg.dtype))


class Attention(nn.Module):
    cfg: LLaMAConfig

    @nn.compact
    def __call__(self, x_BxSxD, sin, cos, mask_BxSxT, segment_ids, kv, view: CacheView | None, layer):
        cfg = self.cfg
        H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if self.has_variable("params", "qkv"):  # the joined decoding layout (`join_qkv`)
            qkv = _dense(cfg, (H + 2 * K, Dh), ("embed", "heads", "head_dim"), "qkv")(x_BxSxD)
            q, k, v = jnp.split(qkv, [H, H + K], axis=2)
        else:
            q = _dense(cfg, (H, Dh), ("embed", "heads", "head_dim"), "q")(x_BxSxD)
            k = _dense(cfg, (K, Dh), ("embed", "kv_heads", "head_dim"), "k")(x_BxSxD)
            v = _dense(cfg, (K, Dh), ("embed", "kv_heads", "head_dim"), "v")(x_BxSxD)
        q = checkpoint_name(apply_rotary(q, sin, cos), "q_proj")
        k = checkpoint_name(apply_rotary(k, sin, cos), "k_proj")
        v = checkpoint_name(v, "v_proj")
        if kv is None:
            out_BxSxHxDh = attention(q, k, v, mask_BxSxT, segment_ids, cfg.attention_impl)
        else:  # write this layer's new slots into the cache, attend over its filled slots
            cache_k, cache_v = kv
            new_k, new_v = (a.transpose(0, 2, 1, 3).astype(cache_k.dtype) for a in (k, v))  # [B, K, S, Dh]
            zero = jnp.zeros_like(view.index)  # indices of one type: a Python 0 is int64 under JAX_ENABLE_X64
            at = (zero, zero, view.index, zero)
            if layer is not None:  # the stacked cache of scanned layers
                new_k, new_v, at = new_k[None], new_v[None], (layer, *at)
            elif cache_k.ndim == 3:  # a batch of one, stored without its batch dimension
                new_k, new_v, at = new_k[0], new_v[0], at[1:]
            cache_k = jax.lax.dynamic_update_slice(cache_k, new_k, at)
            cache_v = jax.lax.dynamic_update_slice(cache_v, new_v, at)
            kv = (cache_k, cache_v)
            out_BxSxHxDh = cached_attention(q, cache_k, cache_v, layer, view.q_slots, segment_ids,
                                            view.kv_segment_ids, view.index + q.shape[1])
        out = _dense(cfg, cfg.dim, ("heads", "head_dim", "embed"), "o", axis=(-2, -1))(out_BxSxHxDh)
        return out, kv


def shard_as(x, logical_axes: tuple[str | None, ...]):
    """`x` constrained to the sharding the logical-axis rules give `logical_axes` on the mesh of the
    enclosing `with mesh:` (`sharding.mesh_context`); outside one, `x` as it is. (Flax 0.12's
    `nn.with_logical_constraint` finds no mesh under a classic `with mesh:` and did nothing.)"""
    mesh = ambient_mesh()
    return x if mesh is None else nn.with_logical_constraint(x, logical_axes, mesh=mesh)


def lookup_table(table_VxD: Array) -> Array:
    """The embedding table as the token lookup reads it: gathered over the mesh axes of its embed
    dimension (as FSDP reads every weight) where the batch is split over those axes and others
    (data x fsdp); elsewhere as it is.

    On data x fsdp meshes the lookup of the table as sharded gave its output split along embed,
    which the layers' constraint (`shard_as`) then gathered over a data group to split it by rows,
    and XLA's partitioner, weighing the gather's (and its gradient's scatter-add's) strategies,
    logged "Involuntary full rematerialization". Under fsdp alone XLA moves the lookup's output by
    all-to-all instead, less than the table for a large vocabulary: left to it there."""
    mesh = ambient_mesh()
    if mesh is None:
        return table_VxD
    batch_axes, embed_axes = (_mesh_axes(name) for name in ("batch", "embed"))
    split = [axis for axis in batch_axes if mesh.shape[axis] > 1]
    if any(axis in embed_axes for axis in split) and any(axis not in embed_axes for axis in split):
        return shard_as(table_VxD, ("vocab", None))
    return table_VxD


def _mesh_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes the active logical-axis rules map `logical` to."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    cfg: LLaMAConfig

    @nn.compact
    def __call__(self, x_BxSxD):
        cfg = self.cfg
        gate = _dense(cfg, cfg.ffn_dim, ("embed", "mlp"), "gate")(x_BxSxD)
        up = _dense(cfg, cfg.ffn_dim, ("embed", "mlp"), "up")(x_BxSxD)
        h_BxSxF = shard_as(swiglu(gate, up), ("batch", "length", "mlp"))
        return _dense(cfg, cfg.dim, ("mlp", "embed"), "down")(h_BxSxF)


class Block(nn.Module):
    """One pre-norm transformer layer. Signature fits `nn.scan`: the carry is (activations, the
    KV cache or None), then the arguments every layer shares, then the layer's index into a
    stacked cache. Unrolled layers pass their own cache arrays and layer None."""

    cfg: LLaMAConfig

    @nn.compact
    def __call__(self, carry, sin, cos, mask_BxSxT, segment_ids, view, layer):
        x_BxSxD, kv = carry
        attn_out, kv = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x_BxSxD), sin, cos, mask_BxSxT, segment_ids, kv, view, layer)
        x_BxSxD = x_BxSxD + attn_out
        x_BxSxD = x_BxSxD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BxSxD))
        return (shard_as(x_BxSxD, ("batch", "length", "embed")), kv), None


def _concrete(x) -> np.ndarray | None:
    """`x` as numpy when its values are known here (called eagerly), None under jit or when
    they live on other processes' devices."""
    try:
        return np.asarray(x) if getattr(x, "is_fully_addressable", True) else None
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):  # a tracer
        return None


def _checked_tokens(tokens, vocab_size: int):
    """`tokens` (a list becomes an array), ValueError unless they are [batch, seq] integers within
    the vocabulary (values checked when called eagerly: under jit a bad id reads a wrong or NaN
    embedding row without error)."""
    tokens = _integer_array(tokens, "tokens")
    values = _concrete(tokens)
    if values is not None and values.size and (values.min() < 0 or values.max() >= vocab_size):
        bad = values.min() if values.min() < 0 else values.max()
        raise ValueError(f"token id {bad} is outside the vocabulary; valid: 0 <= id < vocab_size={vocab_size}")
    return tokens


def _integer_array(values, name: str, rows: tuple[int, int] | None = None):
    """`values` (a list becomes an array), ValueError unless they are integers of shape `rows`
    ([B, S], the tokens' shape) or, without `rows`, of any [batch, seq] shape."""
    if isinstance(values, (list, tuple)):
        values = np.asarray(values)
    shape, dtype = getattr(values, "shape", None), getattr(values, "dtype", None)
    fits = shape is not None and (tuple(shape) == rows if rows else len(shape) == 2)
    if not fits or not jnp.issubdtype(dtype, jnp.integer):
        got = f"{dtype} of shape {tuple(shape)}" if shape is not None else type(values).__name__
        wanted = f"the tokens' shape [batch, seq] = [{rows[0]}, {rows[1]}]" if rows else "shape [batch, seq]"
        raise ValueError(f"{name} must be an integer array of {wanted}, got {got}")
    return values


def _int32_ids(values, name: str):
    """Integer `values` as int32; ValueError for a NumPy array holding values int32 cannot (they
    wrapped: ids of two documents became one)."""
    if isinstance(values, np.ndarray) and values.size and (values.min() < -2**31 or values.max() >= 2**31):
        raise ValueError(f"{name} must fit in int32, got values from {values.min()} to {values.max()}")
    return values.astype(jnp.int32)


def _cache_dtype(dtype) -> jnp.dtype:
    """`dtype` as a floating-point dtype; ValueError for a name NumPy does not know or another kind."""
    try:
        read = jnp.dtype(dtype)
    except TypeError:
        read = None
    if read is None or not jnp.issubdtype(read, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype (jnp.bfloat16, 'float32'; default: the config's "
                         f"dtype), got {dtype!r}")
    return read


def _check_cache(cache: KVCache, cfg: LLaMAConfig, B: int, new: int) -> None:
    """ValueError for a cache of another layout or batch than the call's, or without room for `new`
    more slots (room checked when called eagerly: under jit the write would land on the last
    slots, silently)."""
    stacked = not isinstance(cache.k, tuple)
    if stacked != cfg.scan_layers:
        layout = "scanned" if stacked else "unrolled"
        raise ValueError(f"the KV cache is laid out for {layout} layers but the model has scan_layers="
                         f"{cfg.scan_layers}; create it with KVCache.create(config, ...) of this model")
    layers = cache.k.shape[0] if stacked else len(cache.k)
    heads, _, head_dim = (cache.k.shape[-3:] if stacked else cache.k[0].shape[-3:])
    if (layers, heads, head_dim) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim):
        raise ValueError(f"the KV cache holds {layers} layers of {heads} K/V heads of {head_dim} dims, the model "
                         f"{cfg.n_layers} of {cfg.n_kv_heads} of {cfg.head_dim}; create it with KVCache.create(config, "
                         f"...) of this model")
    if cache.segment_ids.shape[0] != B:
        raise ValueError(f"the KV cache holds a batch of {cache.segment_ids.shape[0]} rows, the tokens {B}; create it "
                         f"with batch={B}")
    filled, slots = _concrete(cache.index), cache.segment_ids.shape[1]
    if filled is not None and int(filled) + new > slots:
        raise ValueError(f"the KV cache has {slots} slots, {int(filled)} filled: no room for {new} more tokens; "
                         f"create it with max_len >= {int(filled) + new}")


class LLaMA(nn.Module):
    """LLaMA decoder. `apply({"params": p}, tokens)` -> float32 logits [B, S, V].

    positions: [B, S] rotary positions (default 0..S-1, or continuing the cache).
    segment_ids: [B, S] document ids of packed rows; tokens attend only within their segment.
    cache: a `KVCache`; when given, returns `(logits, updated_cache)`.
    """

    config: LLaMAConfig

    @nn.nowrap
    def apply(self, variables, *args, **kwargs):
        """Flax's `Module.apply` (see its documentation): `apply({"params": params}, tokens, ...)`. The
        parameter tree itself where the variables go is a ValueError that says so."""
        if isinstance(variables, Mapping) and "params" not in variables and "embed" in variables:
            raise ValueError("LLaMA.apply takes Flax's variables: pass {'params': params}, not the parameter tree "
                             "itself")
        return super().apply(variables, *args, **kwargs)

    @nn.compact
    def __call__(self, tokens_BxS: Array, positions: Array | None = None,
                 segment_ids: Array | None = None, cache: KVCache | None = None):
        cfg = self.config
        check_model_config(cfg, "LLaMA's config")
        tokens_BxS = _checked_tokens(tokens_BxS, cfg.vocab_size)
        if not self.is_initializing() and not isinstance(tokens_BxS, jax.core.Tracer):
            # called eagerly (a notebook's call; the project's own are jitted, their params checked before):
            # params of another model were read as far as they fit, the rest ignored
            params = self.variables.get("params", {})
            check_params(cfg, params, joined_qkv="qkv" in params.get("layers_0", {}).get("attn", {}))
        B, S = tokens_BxS.shape
        if cache is not None:
            _check_cache(cache, cfg, B, S)
        start = cache.index if cache is not None else 0
        slots_BxS = jnp.broadcast_to(start + jnp.arange(S, dtype=jnp.int32), (B, S))
        positions = slots_BxS if positions is None else _integer_array(positions, "positions", (B, S))
        segment_ids = jnp.ones((B, S), jnp.int32) if segment_ids is None else \
            _int32_ids(_integer_array(segment_ids, "segment_ids", (B, S)), "segment_ids")

        if cache is None:
            kv, view = None, None
            mask = attention_mask(slots_BxS, segment_ids, segment_ids)
        else:
            kv, mask = (cache.k, cache.v), None
            zero = jnp.zeros_like(start)  # (of the index's type, as in Attention)
            view = CacheView(slots_BxS, jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (zero, start)),
                             start)
        sin, cos = rotary_sin_cos(positions, cfg)

        embed = nn.Embed(cfg.vocab_size, cfg.dim, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=_param(_INIT, "vocab", "embed"), name="embed")
        table_VxD = lookup_table(embed.embedding.astype(jnp.dtype(cfg.dtype)))  # (cast as nn.Embed casts it)
        x = shard_as(jnp.take(table_VxD, tokens_BxS, axis=0), ("batch", "length", "embed"))

        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast,) * 5 + (0,),
                            length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            (x, kv), _ = stack(cfg, name="layers")((x, kv), sin, cos, mask, segment_ids, view,
                                                   jnp.arange(cfg.n_layers, dtype=jnp.int32))
        else:
            layer_kv = [None] * cfg.n_layers if kv is None else list(zip(*kv))
            for i in range(cfg.n_layers):
                (x, layer_kv[i]), _ = block(cfg, name=f"layers_{i}")((x, layer_kv[i]), sin, cos, mask, segment_ids,
                                                                     view, None)
            kv = None if kv is None else tuple(zip(*layer_kv))

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            out_VxD = embed.embedding
            logits = project(x, out_VxD.astype(x.dtype), 1, kernel_in_last=True, preferred_element_type=jnp.float32)
        else:
            out_DxV = self.param("lm_head", _param(_INIT, "embed", "vocab"), (cfg.dim, cfg.vocab_size),
                                 jnp.dtype(cfg.param_dtype))
            logits = project(x, out_DxV.astype(x.dtype), 1, preferred_element_type=jnp.float32)
        logits = shard_as(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        return logits, KVCache(kv[0], kv[1], view.kv_segment_ids, start + S)


# ---- parameters ------------------------------------------------------------------------------


def initial_params(cfg: LLaMAConfig, rng: Array):
    """Boxed parameters, traced from a one-token input with the `xla` attention kernel: the kernel
    does not shape the parameters, and fused ones (splash) take no one-token sequence.

    The values do not depend on the layer layout: unrolled layers (`scan_layers=False`) are the
    scanned initialisation split per layer, so a seed gives the same model either way."""
    def init(config):
        return LLaMA(config.replace(attention_impl="xla")).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    if cfg.scan_layers:
        return init(cfg)
    values = unstack_layers(nn.meta.unbox(init(cfg.replace(scan_layers=True))), cfg.n_layers)
    boxes = jax.eval_shape(functools.partial(init, cfg))  # the unrolled tree's logical axis names
    return jax.tree.map(lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value,
                        boxes, values, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _init_fn(cfg: LLaMAConfig):
    return functools.partial(initial_params, cfg)


def abstract_params(cfg: LLaMAConfig):
    """Parameter tree of ShapeDtypeStructs (boxed with logical axis names), nothing allocated.
    Traced with attention on one device, also inside a trainer's context: its per-device kernels
    cannot split the initialiser's batch of one over the mesh."""
    check_model_config(cfg, "cfg")
    with sharded_attention(None):
        return jax.eval_shape(_init_fn(cfg), jax.random.key(0))


def init_params(cfg: LLaMAConfig, rng: Array | int = 0):
    """Randomly initialised parameters (unboxed) on the default device; `rng` a seed in [0, 2**32)
    or a JAX key."""
    check_model_config(cfg, "cfg")
    if is_int(rng):
        check_seed(rng, "rng")
        rng = jax.random.key(int(rng))
    elif not (isinstance(rng, jax.Array) and (jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
                                              or rng.shape == (2,) and rng.dtype == jnp.uint32)):
        raise TypeError(f"rng must be an integer seed or a JAX random key (jax.random.key(0)), got {rng!r}")
    return nn.meta.unbox(jax.jit(_init_fn(cfg))(rng))


def param_count(cfg: LLaMAConfig) -> int:
    """Exact number of parameters, computed from shapes only."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(cfg))))


def check_params_as_laid_out(cfg: LLaMAConfig, params, joined_qkv: bool = False) -> bool:
    """`check_params` in the layer layout `params` hold, whatever `cfg.scan_layers` says; whether
    they hold the layers stacked (`layers`) rather than one by one (`layers_i`)."""
    stacked = isinstance(params, Mapping) and "layers" in params
    check_params(cfg.replace(scan_layers=stacked), params, joined_qkv)
    return stacked


def check_params(cfg: LLaMAConfig, params, joined_qkv: bool = False) -> None:
    """Raise ValueError naming the first parameter whose path or shape does not fit `cfg`, or that is
    not floating point (`joined_qkv`: in decoding's layout, unrolled layers with q/k/v joined,
    `join_qkv`); TypeError when `params` is not a dict of parameter arrays."""
    check_model_config(cfg, "cfg")
    if isinstance(params, Mapping) and set(params) == {"params"}:
        raise ValueError("got Flax's variables ({'params': ...}); pass the parameter tree inside, variables['params']")
    if not isinstance(params, Mapping):  # (a TrainState's optimizer state was named as parameters not of the model)
        inside = "; pass its parameters, state.params" if hasattr(params, "params") else ""
        raise TypeError(f"params must be a dict of parameter arrays (load_model, init_params), got a "
                        f"{type(params).__name__}{inside}")
    want = _parameter_shapes(cfg, joined_qkv)
    got = {jax.tree_util.keystr(k): getattr(v, "shape", None)
           for k, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))}
    for key in sorted(want.keys() | got.keys()):
        if key not in got:
            raise ValueError(f"parameter {key} is missing (expected shape {want[key]})")
        if key not in want:
            raise ValueError(f"parameter {key} is not part of this model")
        if tuple(got[key] or ()) != want[key] or got[key] is None:
            raise ValueError(f"parameter {key} has shape {got[key]}, config expects {want[key]}")
    kinds = {jax.tree_util.keystr(k): getattr(v, "dtype", None)
             for k, v in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params))}
    other = next((key for key, dtype in sorted(kinds.items()) if not jnp.issubdtype(dtype, jnp.floating)), None)
    if other is not None:  # (integers computed garbage, without a word)
        raise ValueError(f"parameter {other} has dtype {kinds[other]}; parameters are floating point (float32, "
                         f"bfloat16, float16)")


@functools.cache
def _parameter_shapes(cfg: LLaMAConfig, joined_qkv: bool = False) -> dict[str, tuple[int, ...]]:
    """{parameter path: shape} of a model of `cfg` (cached: `generate` checks its params on every call)."""
    expected = nn.meta.unbox(abstract_params(cfg.replace(scan_layers=False) if joined_qkv else cfg))
    if joined_qkv:
        expected = jax.eval_shape(lambda p: {k: join_qkv(v) if k.startswith("layers_") else v for k, v in p.items()},
                                  expected)
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}


def logical_axes(cfg: LLaMAConfig):
    """Tree of logical-axis-name tuples, one per parameter."""
    return nn.get_partition_spec(abstract_params(cfg))


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Scanned layout (`layers` with a leading layer axis) -> unscanned (`layers_0`, `layers_1`, ...)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    return out


def stack_layers(params: dict, n_layers: int) -> dict:
    """Unscanned layout -> scanned layout; inverse of `unstack_layers`."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(n_layers)]
    out["layers"] = jax.tree.map(lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs),
                                 *per_layer)
    return out


def join_qkv(layer: dict) -> dict:
    """One unrolled layer's params with its q, k and v kernels ([D, H, Dh], [D, K, Dh] twice)
    joined into one `qkv` kernel [D, H + 2K, Dh], which `Attention` applies as one matrix product
    and splits. A decoding layout only (`llama_jax.generate.decoding_params`): checkpoints and
    training keep the three kernels."""
    attn = {name: sub for name, sub in layer["attn"].items() if name not in ("q", "k", "v")}
    attn["qkv"] = {"kernel": jnp.concatenate([layer["attn"][name]["kernel"] for name in "qkv"], axis=1)}
    return {**layer, "attn": attn}


def params_in_layout(config: LLaMAConfig, params):
    """Params in the layer layout `config.scan_layers` asks for (restacked only when they differ)."""
    if config.scan_layers and "layers" not in params:
        return stack_layers(dict(params), config.n_layers)
    if not config.scan_layers and "layers" in params:
        return unstack_layers(dict(params), config.n_layers)
    return params
