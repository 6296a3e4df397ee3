"""Optimizers and learning-rate schedules for training, built from an `ml_collections` config.

The `optimizer` section of an experiment config starts from `default_config()`. `validate` checks it
before anything is compiled; `make_optimizer` turns it into one optax transformation:
global-norm clipping first (so a norm measured on the raw gradients is the pre-clipping norm), then
AdamW, Adafactor or Lion with the schedule and decoupled weight decay on the masked parameters
(all of it in float32 for float16 parameters).
JAX and optax are imported only by the functions that build something, so checking a config
stays quick.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from ml_collections import ConfigDict

from llama_jax.config import is_int

if TYPE_CHECKING:
    import optax

OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant", "wsd")


def default_config() -> ConfigDict:
    """Defaults of the `optimizer` config section (AdamW, cosine decay, LLaMA-paper betas)."""
    return ConfigDict(dict(
        name="adamw",
        lr=3e-4,  # peak learning rate, reached at the end of warmup
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        decay_embeddings=False,  # also decay `embed` and `lm_head`; norm scales are never decayed
        clip_norm=1.0,  # global-norm clipping threshold; 0 or None disables
        schedule="cosine",
        warmup_steps=100,
        min_lr_ratio=0.1,  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
        decay_fraction=0.2,  # wsd: fraction of all steps spent in the final linear decay
    ))


def _fail(key: str, message: str) -> NoReturn:
    raise ValueError(f"optimizer.{key}: {message}")


def _check_range(cfg: ConfigDict, key: str, lo: float, hi: float, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    value = cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        _fail(key, f"got {value!r}; valid: a number in {interval}")


def validate(cfg: ConfigDict, total_steps: int) -> None:
    """Raise a one-line ValueError naming the first bad key of `cfg` and what would be valid."""
    expected = set(default_config().keys())
    unknown, missing = sorted(set(cfg.keys()) - expected), sorted(expected - set(cfg.keys()))
    if unknown or missing:
        raise ValueError(f"optimizer: unknown key(s) {unknown}, missing key(s) {missing}; "
                         f"valid keys: {', '.join(sorted(expected))}")
    if cfg.name not in OPTIMIZERS:
        _fail("name", f"unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        _fail("schedule", f"unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if not is_int(total_steps) or total_steps <= 0:  # (NumPy integers too, not True)
        raise ValueError(f"total_steps: got {total_steps!r}; valid: a positive integer")
    _check_range(cfg, "lr", 0, math.inf, hi_open=True)
    _check_range(cfg, "b1", 0, 1, hi_open=True)
    _check_range(cfg, "b2", 0, 1, hi_open=True)
    _check_range(cfg, "eps", 0, math.inf, lo_open=True, hi_open=True)  # 0 gives 0/0 on zero gradients
    _check_range(cfg, "weight_decay", 0, math.inf, hi_open=True)
    if cfg.lr * cfg.weight_decay >= 1:  # each step multiplies the decayed parameters by 1 - lr(t) * weight_decay
        _fail("weight_decay", f"{cfg.weight_decay:g} with optimizer.lr={cfg.lr:g}: the decoupled decay multiplies "
              f"the decayed parameters by 1 - lr x weight_decay = {1 - cfg.lr * cfg.weight_decay:g} at the peak "
              f"learning rate, which zeroes them or flips their sign; valid: lr x weight_decay below 1 (with this "
              f"lr: weight_decay below {1 / cfg.lr:g})")
    _check_range(cfg, "min_lr_ratio", 0, 1)
    _check_range(cfg, "decay_fraction", 0, 1)
    if cfg.clip_norm is not None:
        _check_range(cfg, "clip_norm", 0, math.inf, hi_open=True)
    if not isinstance(cfg.decay_embeddings, bool):
        _fail("decay_embeddings", f"got {cfg.decay_embeddings!r}; valid: True, False")
    warmup = cfg.warmup_steps
    if not is_int(warmup) or not 0 <= warmup <= total_steps:
        _fail("warmup_steps", f"got {warmup!r}; valid: an integer in [0, total_steps={total_steps}]")
    if cfg.schedule == "wsd":
        _check_wsd_decay(cfg.decay_fraction, warmup, total_steps)


def _check_wsd_decay(fraction: float, warmup: int, total_steps: int) -> None:
    """The wsd decay: none (0), or at least 2 steps (it reaches its end at total_steps, after the last
    update: one decay step changes no update) after the warmup. A suggested bound is printed to as
    many digits as it takes to be accepted (6 were too few for some runs of over a million steps)."""
    decay, room = _wsd_decay_steps(fraction, total_steps), total_steps - warmup
    if fraction == 0 or 2 <= decay <= room:
        return
    what = (f"{fraction} of {total_steps} steps rounds to fewer than 2 decay steps, so no update would use a "
            f"decayed rate" if decay < 2 else f"{fraction} of {total_steps} steps overlaps the {warmup} warmup steps")
    if total_steps < 2:
        valid = f"0 (none); a run of {total_steps} step has no room for 2"
    elif room < 2:
        valid = (f"0 (none); the {warmup} warmup steps leave fewer than 2 of the {total_steps} steps to decay over "
                 f"(warmup_steps={total_steps - 2} would leave 2)")
    elif decay < 2:
        valid = f"0 (none) or at least {_printed(2 / total_steps, lambda f: _wsd_decay_steps(f, total_steps) >= 2)}"
    else:
        valid = f"at most {_printed(room / total_steps, lambda f: _wsd_decay_steps(f, total_steps) <= room)}"
    _fail("decay_fraction", f"{what}; valid: {valid}")


def _printed(value: float, accepted: Callable[[float], bool]) -> str:
    """`value` to 6 significant digits, or to more where the number printed would not be `accepted`
    (at 17 it is `value` itself)."""
    return next(text for text in (f"{value:.{digits}g}" for digits in range(6, 18)) if accepted(float(text)))


def _wsd_decay_steps(fraction: float, total_steps: int) -> int:
    return round(fraction * total_steps)


def make_schedule(cfg: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then the configured decay.

    Decays reach `lr * min_lr_ratio` at `total_steps` and stay there; `wsd` holds `lr` until the last
    `decay_fraction` of all steps and decays linearly over those.
    """
    import optax

    validate(cfg, total_steps)
    lr, warmup = cfg.lr, cfg.warmup_steps
    final_lr = lr * cfg.min_lr_ratio
    after = max(total_steps - warmup, 1)  # optax decays need at least one step
    if cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(lr, after, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        rest = optax.linear_schedule(lr, final_lr, after)
    elif cfg.schedule == "constant":
        rest = optax.constant_schedule(lr)
    else:  # wsd
        decay = _wsd_decay_steps(cfg.decay_fraction, total_steps)
        rest = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, final_lr, max(decay, 1))],
            [total_steps - warmup - decay])
    if warmup == 0:
        return rest
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), rest], [warmup])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """Tree of bools shaped like `params`: True where decoupled weight decay applies.

    Decided by the parameter path, so scanned (`layers`) and unscanned (`layers_N`) trees both work:
    norm scales (any path component containing "norm") never decay, `embed` and `lm_head` decay only
    with `decay_embeddings`, everything else (attention and MLP kernels) decays.
    """
    import jax

    def decays(path, _leaf) -> bool:
        names = [_key_name(k) for k in path]
        if any("norm" in name for name in names):
            return False
        if any(name in ("embed", "lm_head") for name in names):
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def clip_by_layer_rms(threshold: float) -> optax.GradientTransformation:
    """`optax.clip_by_block_rms` (Adafactor's update clipping: each parameter's update scaled down to an
    RMS of at most `threshold`) with each layer of a scanned stack (`layers`, layer axis first) a block of
    its own, as it is for unscanned layers (`layers_N`): one layer's large update does not scale down
    every layer's."""
    import jax
    import jax.numpy as jnp
    import optax

    def clip(path, u):
        scanned = u.ndim > 1 and any(_key_name(k) == "layers" for k in path)
        rms = jnp.sqrt(jnp.mean(jnp.square(u), axis=tuple(range(1, u.ndim)) if scanned else None, keepdims=True))
        return u / jnp.maximum(1.0, rms / threshold)

    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(clip, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def global_norm(tree: Any):
    """The global L2 norm of a tree of arrays, each squared and summed in float32 whatever its dtype
    (the one norm training logs as `grad_norm` and clips by). `optax.tree.norm` sums in the leaves'
    dtype: in float16 a norm above 256 (a sum of squares above 65504) is inf, so a step with finite
    gradients was skipped as non-finite instead of clipped, and bfloat16 keeps 3 significant digits."""
    import jax
    import jax.numpy as jnp

    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (the same numbers on float32 gradients, and the same empty state)
    with the norm of `global_norm`: updates scaled by max_norm / norm where norm >= max_norm."""
    import jax
    import jax.numpy as jnp
    import optax

    def update(updates, state, params=None):
        norm = global_norm(updates)
        keep = norm < max_norm
        return jax.tree.map(lambda u: jnp.where(keep, u, (u.astype(jnp.float32) / norm * max_norm).astype(u.dtype)),
                            updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def float16_in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` given float16 gradients and parameters as float32, so that it keeps their state (Adam's
    moments, Lion's momentum, Adafactor's factors) and computes their updates in float32; the updates
    come back in float32 and `optax.apply_updates` rounds the sum to float16 once.

    In float16, AdamW's second moment (1 - b2) x grad**2 is 0 below float16's smallest number (6e-08:
    with b2=0.95, any gradient below 1e-3) and the update became m / eps instead of about 1: at lr 3e-4 the
    first update moved a tiny model's weights by 2, and its loss was NaN from the fifth step on."""
    import jax
    import jax.numpy as jnp
    import optax

    def widened(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float16 else x, tree)

    def update(updates, state, params=None):
        return inner.update(widened(updates), state, None if params is None else widened(params))

    return optax.GradientTransformation(lambda params: inner.init(widened(params)), update)


def make_optimizer(cfg: ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Validated config -> `clip_by_global_norm` (if enabled; the norm in float32) chained with the optimizer,
    the whole computed in float32 for float16 parameters (`float16_in_float32`).

    Adafactor: `optax.adafactor`'s chain: factored second moments with optax's own decay schedule (b1,
    b2 and eps are not used, no first moment) and update clipping at RMS 1, per parameter and per layer
    of a scanned stack (`clip_by_layer_rms`); no `multiply_by_parameter_scale`, so `lr` is an absolute
    step size as for AdamW and Lion; and weight decay multiplied by the schedule so it is decoupled
    decay `lr(t) * weight_decay * param` like the other two (optax adds Adafactor's decay after the lr).
    """
    import optax

    validate(cfg, total_steps)
    schedule = make_schedule(cfg, total_steps)
    wd = cfg.weight_decay

    def mask(params):
        return decay_mask(params, cfg.decay_embeddings)

    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask)
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=mask)
    else:  # optax.adafactor's chain, with its update clipping per layer of a scanned stack
        opt = optax.chain(optax.scale_by_factored_rms(), clip_by_layer_rms(1.0),
                          optax.scale_by_learning_rate(schedule, flip_sign=False),
                          optax.add_decayed_weights(lambda step: wd * schedule(step), mask), optax.scale(-1))
    if cfg.clip_norm:
        opt = optax.chain(clip_by_global_norm(cfg.clip_norm), opt)
    return float16_in_float32(opt)
