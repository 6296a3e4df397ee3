"""Attention kernels agree with the reference einsum kernel, alone and under shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import llama_jax.attention as attention_lib
from llama_jax.attention import (KERNELS, _xla_forward, attention, attention_mask, cudnn_packed_attention,
                                 packed_layout, query_blocks, sharded_attention, xla_attention)

B, S, K, G, DH = 4, 128, 2, 2, 16


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, S, h, DH)), jnp.float32) for h in (K * G, K, K))
    segments = np.ones((B, S), np.int32)
    segments[0, 50:] = 2  # a packed row: two documents
    segments[1, 100:] = 0  # padding at the end
    segments = jnp.asarray(segments)
    slots = jnp.broadcast_to(jnp.arange(S), (B, S))
    return q, k, v, segments, attention_mask(slots, segments, segments)


def _value_and_grads(fn, q, k, v):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("impl", ["dot_product", "splash"])
def test_kernels_match_reference(inputs, impl):
    """`dot_product` is the `cudnn` kernel's call (dense mask, `is_causal`) with XLA's implementation,
    so on CPU it checks what cuDNN is asked for on GPU."""
    assert KERNELS["cudnn"][0].func is KERNELS["dot_product"][0].func
    assert KERNELS["cudnn"][0].args == ("cudnn",) and KERNELS["dot_product"][0].args == ("xla",)
    q, k, v, segments, mask = inputs
    ref = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    got = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, segments, impl), q, k, v)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _packed_stand_in(q, k, v, q_seqlen, kv_seqlen, q_offsets, kv_offsets, scale):
    """cuDNN's packed-layout call (PADDING_CAUSAL) computed with the xla kernel from the lengths and
    offsets alone: attention causal within each listed document, nothing for uncovered slots."""
    assert scale == pytest.approx(1 / np.sqrt(q.shape[-1]))
    slot = jnp.arange(q.shape[1])
    first, length = q_offsets[:, :-1, None], q_seqlen[:, :, None]
    inside = (length > 0) & (slot >= first) & (slot < first + length)  # [B, documents, S]
    document = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)  # [B, S], -1 where none
    mask = attention_mask(jnp.broadcast_to(slot, document.shape), document, document) & (document >= 0)[:, :, None]
    return xla_attention(q, k, v, mask)


@pytest.mark.parametrize("room", [8, 2])
def test_cudnn_packed_kernel_gives_cudnn_each_rows_documents(inputs, monkeypatch, room):
    """`cudnn_packed_attention` (GPU only) on CPU, cuDNN's two calls stood in for by XLA: the packed
    one by attention rebuilt from the lengths and offsets it is given (`packed_layout`), the dense
    one (the `cudnn` kernel's call) by `jax.nn.dot_product_attention`'s XLA implementation. With
    room for every row's documents (8) the packed call runs; with room for 2, a row of 3 sends the
    batch to the dense mask. Values and gradients match the xla kernel either way."""
    ran = []

    def packed(*args, **kw):
        jax.debug.callback(lambda: ran.append("packed"))
        return _packed_stand_in(*args, **kw)

    def dense(impl, *args):
        jax.debug.callback(lambda: ran.append("dense"))
        return KERNELS["dot_product"][0](*args)

    monkeypatch.setattr(attention_lib, "_cudnn_packed_entry", lambda: packed)
    monkeypatch.setattr(attention_lib, "_jax_nn_attention", dense)
    q, k, v, segments, _ = inputs
    segments = segments.at[2, 30:].set(2).at[2, 90:].set(3)  # three documents in row 2
    mask = attention_mask(jnp.broadcast_to(jnp.arange(S), (B, S)), segments, segments)
    lengths, offsets, documents = packed_layout(segments, 8)
    assert documents.tolist() == [2, 2, 3, 1]  # (row 1's padding is a run of its own)
    assert lengths[2].tolist() == [30, 60, 38] + [-1] * 5 and offsets[2].tolist() == [0, 30, 90] + [-1] * 6
    assert lengths[1].tolist()[:3] == [100, 28, -1] and offsets[3].tolist()[:2] == [0, -1]
    ref = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    got = _value_and_grads(lambda q, k, v: cudnn_packed_attention(q, k, v, segments, room=room), q, k, v)
    jax.effects_barrier()
    assert set(ran) == {"packed" if room == 8 else "dense"}
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("S", [96, 130, 600])
def test_xla_kernel_skipping_keys_after_each_query_block_matches_dense_attention(S):
    """One block below 128 queries, 4 uneven ones at 130, 8 at 600: values and gradients equal
    `jax.nn.dot_product_attention`'s, which computes every query against every key."""
    assert len(query_blocks(S, S)) == (1 if S == 96 else 4 if S == 130 else 8)
    rng = np.random.default_rng(S)
    q, k, v = (jnp.asarray(rng.standard_normal((2, S, h, DH)), jnp.float32) for h in (K * G, K, K))
    segments = np.ones((2, S), np.int32)
    segments[0, S // 3:] = 2
    segments = jnp.asarray(segments)
    mask = attention_mask(jnp.broadcast_to(jnp.arange(S), (2, S)), segments, segments)
    got = _value_and_grads(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    ref = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, segments, "dot_product"), q, k, v)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "dot_product", "splash"])
def test_shard_map_dispatch_matches_unsharded(inputs, impl):
    q, k, v, segments, mask = inputs
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q_s, k_s, v_s = (jax.device_put(x, heads) for x in (q, k, v))
    expected = xla_attention(q, k, v, mask)

    def run(q, k, v):
        with sharded_attention(mesh):
            return attention(q, k, v, mask, segments, impl)

    lowered = jax.jit(run).lower(q_s, k_s, v_s)
    out = lowered.compile()(q_s, k_s, v_s)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
    # Per device: the kernel sees its own rows and heads only.
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_backward_matches_differentiating_its_forward(inputs, dtype):
    """The written-out backward of `xla_attention` gives what JAX's own differentiation of the same
    forward gives, including for a query row that sees no key at all (its gradients are zero)."""
    q, k, v, _, mask = inputs
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    mask = mask.at[2, 7].set(False)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * weights),
                                argnums=(0, 1, 2)))

    got = loss(xla_attention)(q, k, v)
    expected = loss(lambda *a: _xla_forward(*a)[0])(q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)
    assert not np.any(np.asarray(got[0][2, 7], np.float32))
