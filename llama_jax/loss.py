"""Next-token cross-entropy with a loss mask and optional z-loss, in float32.

Two implementations with the same numbers and gradients:
- `cross_entropy`: plain jnp, the reference the tests hold the other one to.
- `vocab_parallel_cross_entropy`: a `jax.shard_map` over a mesh whose `tensor` axis splits the
  vocabulary; each device only ever touches its own vocabulary slice, and the per-token
  logsumexp, target logit and argmax are combined with small [B, S] collectives.

Both return `(loss, aux)` where
    loss = mean over masked tokens of (logsumexp - target logit)
           + z_loss * mean over masked tokens of logsumexp**2
and aux holds "nll", "z_loss" (the z term, already scaled), "tokens" and "accuracy";
`vocab_parallel_cross_entropy(..., per_row=True)` adds "row_nll" and "row_tokens" ([B]: each
row's summed token losses and its counted targets), from which a mixture's per-source losses
are taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

Array = jax.Array


def _finish(nll_sum: Array, lse_sq_sum: Array, correct: Array, tokens: Array,
            z_loss: float) -> tuple[Array, dict[str, Array]]:
    denom = jnp.maximum(tokens, 1.0)
    nll = nll_sum / denom
    z_term = z_loss * lse_sq_sum / denom
    aux = {"nll": nll, "z_loss": z_term, "tokens": tokens, "accuracy": correct / denom}
    return nll + z_term, aux


def cross_entropy(logits_BxSxV: Array, targets_BxS: Array, mask_BxS: Array,
                  z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Masked mean next-token cross-entropy (+ z-loss) in float32. Returns `(loss, aux)`."""
    logits = logits_BxSxV.astype(jnp.float32)
    mask = mask_BxS.astype(jnp.float32)
    lse_BxS = jax.nn.logsumexp(logits, axis=-1)
    target_BxS = jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
    hit_BxS = (jnp.argmax(logits, axis=-1) == targets_BxS).astype(jnp.float32)
    return _finish(jnp.sum((lse_BxS - target_BxS) * mask), jnp.sum(lse_BxS**2 * mask),
                   jnp.sum(hit_BxS * mask), jnp.sum(mask), z_loss)


def vocab_parallel_cross_entropy(
    logits_BxSxV: Array,
    targets_BxS: Array,
    mask_BxS: Array,
    mesh: Mesh,
    z_loss: float = 0.0,
    vocab_axis: str = "tensor",
    batch_axes: Sequence[str] = ("data", "fsdp"),
    per_row: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """`cross_entropy` computed without gathering the vocabulary onto any device.

    Logits are split as P(batch_axes, None, vocab_axis) (resharded to that if placed otherwise);
    V must be divisible by the size of `vocab_axis` and B by the product of `batch_axes`.
    Differentiable w.r.t. the logits. `per_row`: also "row_nll" and "row_tokens" in aux.
    """
    batch_axes = tuple(batch_axes)
    batch_spec = batch_axes or None

    def local(logits_bxSxv: Array, targets_bxS: Array, mask_bxS: Array):
        logits = logits_bxSxv.astype(jnp.float32)
        mask = mask_bxS.astype(jnp.float32)
        v_local = logits.shape[-1]
        offset = lax.axis_index(vocab_axis) * v_local

        # The max only shifts the exponent for stability; its gradient would cancel anyway.
        local_max_bxS = jnp.max(lax.stop_gradient(logits), axis=-1)
        max_bxS = lax.pmax(local_max_bxS, vocab_axis)
        sum_exp_bxS = lax.psum(jnp.sum(jnp.exp(logits - max_bxS[..., None]), axis=-1), vocab_axis)
        lse_bxS = jnp.log(sum_exp_bxS) + max_bxS

        # Only the device whose slice holds the target contributes its logit; the rest add 0.
        local_target_bxS = targets_bxS - offset
        here_bxS = (local_target_bxS >= 0) & (local_target_bxS < v_local)
        picked_bxS = jnp.take_along_axis(
            logits, jnp.clip(local_target_bxS, 0, v_local - 1)[..., None], axis=-1)[..., 0]
        target_bxS = lax.psum(jnp.where(here_bxS, picked_bxS, 0.0), vocab_axis)

        # Global argmax with jnp.argmax's tie rule: the lowest index among those at the max.
        local_arg_bxS = jnp.argmax(logits, axis=-1).astype(jnp.int32) + offset
        no_index = jnp.iinfo(jnp.int32).max
        candidate_bxS = jnp.where(local_max_bxS == max_bxS, local_arg_bxS, no_index)
        argmax_bxS = lax.pmin(candidate_bxS, vocab_axis)
        hit_bxS = (argmax_bxS == targets_bxS).astype(jnp.float32)

        # Everything above is already the same on every vocab_axis device (psum/pmax/pmin
        # outputs), so only the batch shards remain to be summed.
        nll_bxS = (lse_bxS - target_bxS) * mask
        sums = (jnp.sum(nll_bxS), jnp.sum(lse_bxS**2 * mask), jnp.sum(hit_bxS * mask), jnp.sum(mask))
        sums = tuple(lax.psum(s, batch_axes) for s in sums) if batch_axes else sums
        return sums + ((jnp.sum(nll_bxS, axis=1), jnp.sum(mask, axis=1)) if per_row else ())

    outs = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(batch_spec, None, vocab_axis), P(batch_spec, None), P(batch_spec, None)),
        out_specs=(P(), P(), P(), P()) + ((P(batch_spec), P(batch_spec)) if per_row else ()),
    )(logits_BxSxV, targets_BxS, mask_BxS)
    loss, aux = _finish(*outs[:4], z_loss)
    if per_row:
        aux["row_nll"], aux["row_tokens"] = outs[4:]
    return loss, aux
