"""Attention kernels, and their per-device dispatch with `shard_map`.

Every kernel computes causal, segment-masked grouped-query attention on
q [B, S, H, Dh], k and v [B, T, K, Dh] -> [B, S, H, Dh], softmax in float32:
- `xla`: einsums written here over causal query blocks, with a written-out backward (any
  backend; the reference the others are tested against, and itself tested against `dot_product`);
- `dot_product`: `jax.nn.dot_product_attention` with XLA's implementation;
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention (GPU);
- `cudnn_packed`: cuDNN flash attention given each row's documents in cuDNN's packed layout
  (`cudnn_packed_attention`; GPU);
- `splash`: Pallas splash attention (TPU; on other backends it runs in Pallas' interpreter,
  which is how it is tested, slowly);
- `auto`: `cudnn` on GPU, `splash` on TPU, `xla` elsewhere.
`splash` takes the causal structure from the kernel and documents from segment ids, and
`cudnn_packed` each document's first slot and length from them; `dot_product` and `cudnn` take
documents from the dense [B, 1, S, T] mask and are told it is causal (`is_causal=True`), so that
cuDNN need not compute the blocks above the diagonal. All of them serve training. Attention over
a KV cache (prefill and decoding) is `cached_attention`: einsums XLA partitions itself over the
whole cache when decoding, and over blocks of its filled part with an online softmax when many
queries at once would make a large score matrix.

Inside `sharded_attention(mesh)` (the trainer enters it), the kernel runs under `shard_map`:
each device attends over its own batch rows and heads (batch over data x fsdp, heads over
tensor), which is what fused kernels need: they cannot be partitioned by XLA.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array
_MESH: contextvars.ContextVar = contextvars.ContextVar("llama_jax_attention_mesh", default=None)
BATCH_AXES, HEAD_AXIS = ("data", "fsdp"), "tensor"


@contextlib.contextmanager
def sharded_attention(mesh):
    """Run attention kernels per device over `mesh` while the context is active (with None: not per
    device, also where an enclosing context asked for it)."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def attention_mask(q_slot_BxS: Array, q_seg_BxS: Array, kv_seg_BxT: Array) -> Array:
    """[B, S, T] boolean: key slot t is visible to a query iff t <= query slot and same segment."""
    kv_slot_T = jnp.arange(kv_seg_BxT.shape[1])
    causal = kv_slot_T[None, None, :] <= q_slot_BxS[:, :, None]
    return causal & (q_seg_BxS[:, :, None] == kv_seg_BxT[:, None, :])


def _grouped_heads_first(x_BxSxHxDh, K: int):
    """[B, S, H, Dh] -> [B, K, G, S, Dh]: the H = K * G query heads grouped by the K/V head they share."""
    B, S, H, Dh = x_BxSxHxDh.shape
    return x_BxSxHxDh.reshape(B, S, K, H // K, Dh).transpose(0, 2, 3, 1, 4)


def _heads_first(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh):
    """q as [B, K, G, S, Dh], k and v as [B, K, T, Dh]."""
    K = k_BxTxKxDh.shape[2]
    return (_grouped_heads_first(q_BxSxHxDh, K), k_BxTxKxDh.transpose(0, 2, 1, 3),
            v_BxTxKxDh.transpose(0, 2, 1, 3))


def _heads_last(x_BxKxGxSxDh):
    B, K, G, S, Dh = x_BxKxGxSxDh.shape
    return x_BxKxGxSxDh.transpose(0, 3, 1, 2, 4).reshape(B, S, K * G, Dh)


def query_blocks(S: int, T: int) -> list[tuple[int, int]]:
    """The `xla` kernel's query blocks [start, end): block [s0, s1) attends to keys [0, s1) only.

    Attention is causal, so keys past a block's last query are masked for all of its rows and are
    skipped instead of computed: with n blocks, (n + 1) / 2n of the [S, T] work remains. Smaller
    blocks skip more but make smaller, slower products; 4 blocks up to 512 queries and 8 beyond
    were the fastest on CPU (benchmarks/README.md). Without T == S (no causal diagonal) one block."""
    n = 1 if S != T or S < 128 else 4 if S <= 512 else 8
    edges = [S * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _xla_forward(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxSxT):
    """The output [B, S, H, Dh], and what the backward uses: the heads-first q, k, v and each query
    block's float32 probabilities over the keys it sees."""
    q, k, v = _heads_first(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh)
    outs, probs = [], []
    for s0, s1 in query_blocks(q.shape[-2], k.shape[-2]):
        scores = jnp.einsum("bkgsd,bktd->bkgst", q[..., s0:s1, :], k[:, :, :s1],
                            preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
        scores = jnp.where(mask_BxSxT[:, None, None, s0:s1, :s1], scores, jnp.finfo(jnp.float32).min)
        probs.append(jax.nn.softmax(scores, axis=-1))
        outs.append(jnp.einsum("bkgst,bktd->bkgsd", probs[-1].astype(v.dtype), v[:, :, :s1]))
    return _heads_last(jnp.concatenate(outs, axis=-2)), (q, k, v, tuple(probs))


@jax.custom_vjp
def xla_attention(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxSxT) -> Array:
    """Grouped-query attention without repeating K/V; softmax in float32.

    `mask_BxSxT` must hide every key after its query, as `attention_mask` does: with T == S each
    query block skips the keys after its last query (`query_blocks`). Its backward is written out
    (`_xla_attention_bwd`): the same gradients as differentiating `_xla_forward`, with the
    products arranged so that no [S, T] matrix is transposed, and with only q, k, v, the
    probabilities and the mask kept for it."""
    return _xla_forward(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxSxT)[0]


def _xla_attention_fwd(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxSxT):
    out, saved = _xla_forward(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask_BxSxT)
    return out, (*saved, mask_BxSxT)


def _xla_attention_bwd(saved, d_out_BxSxHxDh):
    q, k, v, probs, mask_BxSxT = saved  # q [B, K, G, S, Dh], k and v [B, K, T, Dh], probs per block [B, K, G, s, t]
    Dh, T = q.shape[-1], k.shape[-2]
    d_out = _grouped_heads_first(d_out_BxSxHxDh, q.shape[1])
    d_qs, d_k, d_v = [], 0.0, 0.0
    for (s0, s1), p in zip(query_blocks(q.shape[-2], T), probs):
        d_out_block = d_out[..., s0:s1, :]
        d_probs = jnp.einsum("bkgsd,bktd->bkgst", d_out_block, v[:, :, :s1], preferred_element_type=jnp.float32)
        d_scores = p * (d_probs - jnp.sum(p * d_probs, axis=-1, keepdims=True))  # softmax's backward
        d_scores = (jnp.where(mask_BxSxT[:, None, None, s0:s1, :s1], d_scores, 0.0) / math.sqrt(Dh)).astype(q.dtype)
        d_qs.append(jnp.einsum("bkgst,bktd->bkgsd", d_scores, k[:, :, :s1]))
        # k's and v's gradients come out as [Dh, t] products: the [s, t] matrices are their
        # right-hand operands as they lie, and only the [Dh, T] sums over blocks are transposed.
        keys_after = [(0, 0)] * 3 + [(0, T - s1)]
        d_k = d_k + jnp.pad(jnp.einsum("bkgsd,bkgst->bkdt", q[..., s0:s1, :], d_scores,
                                       preferred_element_type=jnp.float32), keys_after)
        d_v = d_v + jnp.pad(jnp.einsum("bkgsd,bkgst->bkdt", d_out_block, p.astype(v.dtype),
                                       preferred_element_type=jnp.float32), keys_after)
    d_k, d_v = (d.transpose(0, 3, 1, 2).astype(k.dtype) for d in (d_k, d_v))
    return _heads_last(jnp.concatenate(d_qs, axis=-2)), d_k, d_v, None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def _jax_nn_attention(implementation, q, k, v, mask):
    """`jax.nn.dot_product_attention` with the documents in a dense mask and `is_causal` set.

    The mask is causal already, so `is_causal` changes no value; it tells cuDNN the structure,
    which JAX documents as letting its kernel skip the blocks above the diagonal instead of
    computing them and reading their mask."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation=implementation)


PACKED_DOCUMENTS = 32  # documents per row cuDNN's packed layout is given room for (`cudnn_packed_attention`)


def packed_layout(segment_ids_BxS: Array, room: int) -> tuple[Array, Array, Array]:
    """Rows of contiguous documents (each a run of one segment id, as packed training rows hold
    them) in cuDNN's packed layout: (lengths [B, room], offsets [B, room + 1], documents [B]),
    each row's document lengths and first slots padded with -1, and how many documents it holds
    (a row with more than `room` is cut short: the caller checks)."""
    B, S = segment_ids_BxS.shape
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BxS[:, 1:] != segment_ids_BxS[:, :-1]], axis=1)
    first = jax.vmap(lambda row: jnp.nonzero(row, size=room, fill_value=-1)[0])(starts).astype(jnp.int32)
    after = jnp.concatenate([first[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
    lengths = jnp.where(first >= 0, jnp.where(after >= 0, after, S) - first, -1)
    offsets = jnp.concatenate([first, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return lengths, offsets, starts.sum(axis=1)


def _cudnn_packed_entry():
    """jax's internal cuDNN attention entry point that takes the packed layout, or None where this
    jax has none (the public `jax.nn.dot_product_attention` takes no segments but a dense mask)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:
        return None
    takes = set(inspect.signature(fused.dot_product_attention).parameters)
    wanted = {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "mask_type", "scale", "qkv_layout"}
    if not wanted <= takes or not hasattr(getattr(fused, "MaskType", None), "PADDING_CAUSAL"):
        return None
    return functools.partial(fused.dot_product_attention, mask_type=fused.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def cudnn_packed_attention(q, k, v, segment_ids_BxS, room: int = PACKED_DOCUMENTS) -> Array:
    """cuDNN flash attention over rows of packed documents, given as cuDNN's packed layout: each
    document's first slot and length (`packed_layout`), causal within each document.

    A row with more than `room` documents sends the batch through the dense-mask form of
    `cudnn` instead (`jax.lax.cond`), as does a jax without the packed entry point. On an H200
    (benchmarks/README.md), forward + backward over rows of 2-5 documents took 0.72 x the dense
    form's time with room for 32 (0.45 x with room for exactly the 5 they hold: cuDNN's time grows
    with the room; room for every slot ran out of memory), and the train step of a 0.89B model
    ran 3% faster; but without remat the gradient keeps the residuals of both forms, the packed
    and the dense (`lax.cond` keeps every branch's), 33% more peak memory in that step; with
    remat, which recomputes attention in the backward, that should not arise (not measured).
    Values agree with `xla` within bf16 rounding."""
    B, S, H, Dh = q.shape
    slots_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))

    def dense():
        return _jax_nn_attention("cudnn", q, k, v, attention_mask(slots_BxS, segment_ids_BxS, segment_ids_BxS))

    fused = _cudnn_packed_entry()
    if fused is None:
        return dense()
    room = min(room, S)
    lengths, offsets, documents = packed_layout(segment_ids_BxS, room)

    def packed():
        return fused(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
                     scale=1.0 / math.sqrt(Dh))

    return packed() if room == S else jax.lax.cond(jnp.all(documents <= room), packed, dense)


def check_splash_length(S: int) -> int:
    """The block size of splash attention over S positions; ValueError when S has none."""
    block = min(512, S)  # the kernel's blocks are multiples of 128
    if block % 128 or S % block:
        raise ValueError(f"splash attention needs the sequence length to be a multiple of 128 (of 512 above 512), "
                         f"got {S}; model.attention_impl=xla takes any length")
    return block


def splash_attention(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS) -> Array:
    """Pallas splash attention, causal within segments: one MQA kernel per K/V head group."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, S, H, Dh = q_BxSxHxDh.shape
    K = k_BxSxKxDh.shape[2]
    G = H // K
    block = check_splash_length(S)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((S, S)) for _ in range(G)])
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, is_mqa=True, head_shards=1, q_seq_shards=1,
                                interpret=jax.default_backend() != "tpu")

    def one_row(q_SxHxDh, k_SxKxDh, v_SxKxDh, seg_S):
        q_KxGxSxDh = (q_SxHxDh / math.sqrt(Dh)).reshape(S, K, G, Dh).transpose(1, 2, 0, 3)
        segments = sk.SegmentIds(q=seg_S, kv=seg_S)
        out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=segments))(
            q_KxGxSxDh, k_SxKxDh.transpose(1, 0, 2), v_SxKxDh.transpose(1, 0, 2))
        return out.transpose(2, 0, 1, 3).reshape(S, H, Dh)

    return jax.vmap(one_row)(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS)


KERNELS = {  # impl -> (kernel, takes segment ids instead of a dense mask)
    "xla": (xla_attention, False),
    "dot_product": (functools.partial(_jax_nn_attention, "xla"), False),
    "cudnn": (functools.partial(_jax_nn_attention, "cudnn"), False),
    "cudnn_packed": (cudnn_packed_attention, True),
    "splash": (splash_attention, True),
}


def resolve(impl: str) -> str:
    if impl == "auto":
        return {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")
    return impl


def check_available(impl: str) -> None:
    """ValueError when the kernel `impl` names cannot run on this backend (cuDNN's needs a GPU;
    without one, JAX fails deep inside the first compile)."""
    backend = jax.default_backend()
    if resolve(impl) in ("cudnn", "cudnn_packed") and backend != "gpu":
        raise ValueError(f"attention_impl='{impl}' needs a GPU with cuDNN, and this backend is {backend}; use 'auto' "
                         f"(cudnn on GPU, splash on TPU, xla elsewhere), 'xla' or 'dot_product'")


def runnable_here(impl: str) -> str:
    """`impl`, or `auto` where it cannot run on this backend: for scoring with a model directory
    saved where it could (a GPU run's `cudnn`), as the kernel changes no value beyond rounding."""
    try:
        check_available(impl)
    except ValueError:
        return "auto"
    return impl


def runnable_at_length(impl: str, S: int) -> str:
    """`impl`, or `xla` where `impl` runs `splash` here and S is a length splash does not take (not
    a multiple of 128, of 512 above 512): for scoring, whose rows are as long as the requests need."""
    if resolve(impl) == "splash":
        try:
            check_splash_length(S)
        except ValueError:
            return "xla"
    return impl


def attention(q, k, v, mask_BxSxT, segment_ids_BxS, impl: str) -> Array:
    """Dispatch to a kernel; per device under `shard_map` inside `sharded_attention`."""
    check_available(impl)
    impl = resolve(impl)
    kernel, wants_segments = KERNELS[impl]
    extra = segment_ids_BxS if wants_segments else mask_BxSxT
    mesh = _MESH.get()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, extra)
    heads = P(BATCH_AXES, None, HEAD_AXIS, None)
    extra_spec = P(BATCH_AXES, None) if wants_segments else P(BATCH_AXES, None, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, extra_spec), out_specs=heads,
                         check_vma=False)(q, k, v, extra)


CACHE_BLOCK = 256  # cache slots per step of `cached_attention`'s loop for CACHE_BLOCK queries or more


def cache_block(queries: int, slots: int) -> int:
    """Cache slots per step of `cached_attention`'s loop for `queries` new queries over a cache of
    `slots`: as many as keep the scores of a batch row and head within CACHE_BLOCK² (65,536), at
    least CACHE_BLOCK, at most the whole cache.

    So decoding (one query) and short prompts attend over the whole cache in one step, reading
    its empty slots too, while a long prompt's prefill goes over the filled part in blocks of
    CACHE_BLOCK slots. A block narrower than the cache is a slice of it, which XLA's CPU backend
    copies before the product reads it: decoding 256 and 512 new tokens in blocks of 256 slots
    ran 22-34% slower than over the whole cache (benchmarks/README.md)."""
    return min(slots, max(CACHE_BLOCK, CACHE_BLOCK ** 2 // queries))


def cached_attention(q_BxSxHxDh: Array, cache_k: Array, cache_v: Array, layer, q_slot_BxS: Array,
                     q_seg_BxS: Array, kv_seg_BxT: Array, filled: Array) -> Array:
    """Attention of S new queries over the filled slots [0, `filled`) of one layer's KV cache.

    cache_k, cache_v: that layer's [B, K, T, Dh] (`layer` None; [K, T, Dh] for a batch of one),
    or every layer's [L, B, K, T, Dh] and the index `layer` into them. Heads come before slots, so
    that the einsums read the cache in place (slots before heads made XLA transpose the whole
    layer's cache on every call). A loop visits ceil(filled / block) blocks of `cache_block`
    slots, the softmax accumulated online in float32 across blocks; when one block is the whole
    cache (decoding: up to 65,536 slots) that block is computed without a loop around it, which
    on a GPU would be one more while loop, with its own condition, per layer and token. A key
    slot is visible to a query iff it is not after the query's slot and holds the same segment.
    """
    B, S, H, Dh = q_BxSxHxDh.shape
    K, T = cache_k.shape[-3:-1]
    G = H // K
    block = cache_block(S, T)
    b = "b" if layer is not None or cache_k.ndim == 4 else ""  # the batch dimension, if the cache has one
    rows = (B,) if b else ()
    q = q_BxSxHxDh.reshape(B, S, K, G, Dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, S, Dh]
    q = q if b else q[0]
    scale = 1.0 / math.sqrt(Dh)

    def step(i, carry):
        best, total, acc = carry  # running max and sum [B, K, G, S], weighted values [B, K, G, S, Dh]
        start = jnp.minimum(i * block, T - block)  # the last block may overlap the one before
        k, v = (_cache_block(c, layer, start, block) for c in (cache_k, cache_v))
        slots = start + jnp.arange(block)
        seg_Bxblock = jax.lax.dynamic_slice_in_dim(kv_seg_BxT, start, block, axis=1)
        visible = ((slots >= i * block)[None, None, :] & (slots[None, None, :] <= q_slot_BxS[:, :, None])
                   & (q_seg_BxS[:, :, None] == seg_Bxblock[:, None, :]))[:, None, None]  # [B, 1, 1, S, block]
        scores = jnp.einsum(f"{b}kgsd,{b}ktd->{b}kgst", q, k, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(visible if b else visible[0], scores, -jnp.inf)
        new_best = jnp.maximum(best, scores.max(axis=-1))
        shift = jnp.where(jnp.isfinite(new_best), new_best, 0.0)
        probs = jnp.exp(scores - shift[..., None])
        rescale = jnp.exp(best - shift)
        total = total * rescale + probs.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum(f"{b}kgst,{b}ktd->{b}kgsd", probs.astype(v.dtype), v,
                                                    preferred_element_type=jnp.float32)
        return new_best, total, acc

    init = (jnp.full((*rows, K, G, S), -jnp.inf, jnp.float32), jnp.zeros((*rows, K, G, S), jnp.float32),
            jnp.zeros((*rows, K, G, S, Dh), jnp.float32))
    if block == T:  # one block holds the whole cache (decoding, short prompts): no loop around it
        _, total, acc = step(0, init)
    else:
        _, total, acc = jax.lax.fori_loop(0, (filled + block - 1) // block, step, init)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    out = out if b else out[None]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, S, H, Dh).astype(q_BxSxHxDh.dtype)


def _cache_block(cache: Array, layer, start, block: int) -> Array:
    """Slots [start, start + block) of one layer's cache, or of layer `layer` of a stacked cache.
    A block spanning the whole of a layer's cache is the array itself."""
    if layer is not None:
        cache = jax.lax.dynamic_index_in_dim(cache, layer, keepdims=False)
    return jax.lax.dynamic_slice_in_dim(cache, start, block, axis=cache.ndim - 2)
