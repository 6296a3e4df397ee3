"""Cross-entropy against torch, and the vocab-parallel version against the plain one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax.loss import cross_entropy, vocab_parallel_cross_entropy

B, S, V = 4, 6, 128
Z = 1e-4
MESH_SHAPES = [(1, 1, 8), (2, 1, 4), (1, 2, 4), (2, 2, 2)]
LOGITS_SPEC = P(("data", "fsdp"), None, "tensor")


def _batch(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((B, S, V))).astype(np.float32)
    targets = rng.integers(0, V, (B, S)).astype(np.int32)
    mask = rng.random((B, S)) > 0.3
    mask[0, 0] = False
    return logits, targets, mask


def _mesh(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "fsdp", "tensor"))


def _plain(targets, mask, z_loss=Z):
    return lambda logits: cross_entropy(logits, targets, mask, z_loss)


def _parallel(mesh, targets, mask, z_loss=Z):
    return lambda logits: vocab_parallel_cross_entropy(logits, targets, mask, mesh, z_loss)


def _value_and_grad(f):
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def test_matches_torch_and_numpy():
    logits, targets, mask = _batch()
    (loss, aux), grad = _value_and_grad(_plain(targets, mask))(logits)

    logits_t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    ignored = torch.tensor(np.where(mask, targets, -100), dtype=torch.long)
    nll_t = torch.nn.functional.cross_entropy(logits_t.reshape(-1, V), ignored.reshape(-1), ignore_index=-100)
    lse = torch.logsumexp(logits_t, dim=-1).detach().numpy()
    z_term = Z * np.mean(lse[mask] ** 2)
    np.testing.assert_allclose(aux["nll"], nll_t.item(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], z_term, rtol=1e-6)
    np.testing.assert_allclose(loss, nll_t.item() + z_term, rtol=0, atol=1e-6)
    assert aux["tokens"] == mask.sum()
    np.testing.assert_allclose(aux["accuracy"], np.mean(logits.argmax(-1)[mask] == targets[mask]), atol=1e-7)
    assert all(v.dtype == jnp.float32 for v in (loss, *aux.values()))

    # z-loss gradient: d/dx z*mean(lse^2) = 2*z*lse*softmax(x) / tokens on masked rows.
    nll_t.backward()
    softmax = torch.softmax(logits_t, -1).detach().numpy()
    z_grad = 2 * Z * (lse * mask)[..., None] * softmax / mask.sum()
    np.testing.assert_allclose(grad, logits_t.grad.numpy() + z_grad, rtol=0, atol=1e-7)


def test_accuracy_counts_masked_hits_only():
    logits = np.zeros((1, 4, 8), np.float32)
    logits[0, np.arange(4), [1, 2, 3, 4]] = 5.0
    targets = np.array([[1, 2, 0, 0]], np.int32)
    mask = np.array([[1, 0, 1, 1]], np.int32)  # hits at 0 (kept) and 1 (masked), misses at 2, 3
    _, aux = cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(aux["accuracy"], 1 / 3, rtol=1e-6)


def test_all_masked_is_zero_and_bf16_is_upcast():
    logits, targets, _ = _batch()
    mask = np.zeros((B, S), bool)
    (loss, aux), grad = _value_and_grad(_plain(targets, mask))(logits)
    assert float(loss) == 0.0 and float(aux["tokens"]) == 0.0 and not np.any(grad)
    loss16, _ = cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, np.ones((B, S), bool))
    assert loss16.dtype == jnp.float32


@pytest.mark.parametrize("mesh_shape", MESH_SHAPES, ids=str)
def test_vocab_parallel_matches_plain(mesh_shape):
    mesh = _mesh(mesh_shape)
    logits, targets, mask = _batch(seed=sum(mesh_shape))
    sharded = jax.device_put(logits, NamedSharding(mesh, LOGITS_SPEC))
    (loss, aux), grad = _value_and_grad(_parallel(mesh, targets, mask))(sharded)
    (loss_ref, aux_ref), grad_ref = _value_and_grad(_plain(targets, mask))(logits)

    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for key in aux_ref:
        np.testing.assert_allclose(aux[key], aux_ref[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-9)
    assert grad.sharding.is_equivalent_to(sharded.sharding, grad.ndim)


def test_vocab_parallel_argmax_ties_follow_jnp():
    """Integer logits tie often, also across vocab shards; both pick the lowest index."""
    mesh = _mesh((1, 1, 8))
    rng = np.random.default_rng(3)
    logits = rng.integers(0, 3, (B, S, V)).astype(np.float32)
    targets = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    targets[:, ::2] = rng.integers(0, V, (B, S // 2))
    mask = np.ones((B, S), bool)
    sharded = jax.device_put(logits, NamedSharding(mesh, LOGITS_SPEC))
    _, aux = jax.jit(_parallel(mesh, targets, mask))(sharded)
    _, aux_ref = cross_entropy(logits, targets, mask)
    assert float(aux["accuracy"]) == float(aux_ref["accuracy"]) >= 0.5


def _full_vocab_traffic(hlo: str) -> list[str]:
    """Lines of compiled HLO that gather/exchange a tensor whose last dimension is the full V."""
    shape_ends_in_v = re.compile(rf"\[(?:\d+,)*{V}\]")
    return [line.strip() for line in hlo.splitlines()
            if re.search(r"\b(all-gather|all-to-all|collective-permute)(-start)?\(", line)
            and shape_ends_in_v.search(line.split("=", 1)[1].split("(", 1)[0])]


def _compiled_hlo(f, sharded):
    return _value_and_grad(f).lower(sharded).compile().as_text()


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8), (2, 2, 2)], ids=str)
def test_vocab_parallel_never_gathers_vocab(mesh_shape):
    mesh = _mesh(mesh_shape)
    logits, targets, mask = _batch()
    sharded = jax.device_put(logits, NamedSharding(mesh, LOGITS_SPEC))
    hlo = _compiled_hlo(_parallel(mesh, targets, mask), sharded)
    assert _full_vocab_traffic(hlo) == []
    # No per-device buffer spans the whole vocabulary; the local slices do appear.
    v_local = V // mesh.shape["tensor"]
    assert not re.search(rf"\[(?:\d+,)*{V}\]", hlo)
    assert re.search(rf"f32\[(?:\d+,)*{v_local}\]", hlo)

    # The detector does fire on an implementation that brings the vocabulary together.
    replicated_vocab = NamedSharding(mesh, P(("data", "fsdp"), None, None))

    def gathering(x):
        return cross_entropy(jax.lax.with_sharding_constraint(x, replicated_vocab), targets, mask, Z)

    assert _full_vocab_traffic(_compiled_hlo(gathering, sharded))
