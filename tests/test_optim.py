"""Optimizer config: schedules against closed forms, weight-decay masks, clipping, bad configs."""

import functools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import LLaMAConfig, init_params
from llama_jax.experiment import check_experiment, load_config
from llama_jax.optim import decay_mask, default_config, global_norm, make_optimizer, make_schedule, validate

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")

LR, WARMUP, TOTAL, RATIO = 1e-3, 10, 110, 0.1  # 100 steps after warmup


def config(**changes):
    cfg = default_config()
    cfg.update({"lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": RATIO, **changes})
    return cfg


# Expected values written out by hand: warmup is shared (0 at step 0, lr/2 at step 5, lr at 10);
# `t` below is the number of steps after warmup (100 in all).
def cosine(t):
    return LR * (RATIO + (1 - RATIO) * 0.5 * (1 + math.cos(math.pi * t / 100)))


EXPECTED = {
    "cosine": {0: 0.0, 5: LR / 2, 10: LR, 35: cosine(25), 60: LR * (1 + RATIO) / 2, 110: LR * RATIO,
               200: LR * RATIO},
    "linear": {0: 0.0, 5: LR / 2, 10: LR, 35: LR * (1 - 0.9 * 25 / 100), 60: LR * 0.55, 110: LR * RATIO,
               200: LR * RATIO},
    "constant": {0: 0.0, 5: LR / 2, 10: LR, 60: LR, 110: LR},
    # decay_fraction 0.2: stable until step 110 - 22 = 88, then linear to lr * ratio over 22 steps.
    "wsd": {0: 0.0, 5: LR / 2, 10: LR, 60: LR, 88: LR, 99: LR * (1 - 0.9 * 11 / 22), 110: LR * RATIO},
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED))
def test_schedule_values(schedule):
    sched = make_schedule(config(schedule=schedule, decay_fraction=0.2), TOTAL)
    for step, want in EXPECTED[schedule].items():
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), f"step {step}"


def test_cosine_curve_after_warmup():
    sched = make_schedule(config(schedule="cosine"), TOTAL)
    steps = np.arange(WARMUP, TOTAL + 1)
    want = [cosine(s - WARMUP) for s in steps]
    np.testing.assert_allclose([float(sched(s)) for s in steps], want, rtol=1e-5)


def test_no_warmup_starts_at_peak():
    sched = make_schedule(config(schedule="linear", warmup_steps=0), 100)
    assert float(sched(0)) == pytest.approx(LR)
    assert float(sched(50)) == pytest.approx(LR * (1 - 0.9 * 0.5))
    numpy_steps = make_schedule(config(schedule="linear", warmup_steps=0), np.int64(100))  # a count as NumPy gives it
    assert float(numpy_steps(50)) == float(sched(50))
    with pytest.raises(ValueError, match=r"total_steps: got True; valid: a positive integer"):
        make_schedule(config(schedule="linear"), True)


# ---- weight-decay mask ---------------------------------------------------------------------


@functools.cache
def debug_params(scan_layers: bool = True):
    return init_params(LLaMAConfig.from_preset("debug", scan_layers=scan_layers), 0)


def _paths(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask_on_model_params(scan_layers, decay_embeddings):
    params = debug_params(scan_layers)
    mask = decay_mask(params, decay_embeddings)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    by_path = _paths(mask)
    layer = "['layers']" if scan_layers else "['layers_1']"
    for name in ("q", "k", "v", "o"):
        assert by_path[f"{layer}['attn']['{name}']['kernel']"] is True
    for name in ("gate", "up", "down"):
        assert by_path[f"{layer}['mlp']['{name}']['kernel']"] is True
    for norm in (f"{layer}['attn_norm']['scale']", f"{layer}['mlp_norm']['scale']", "['final_norm']['scale']"):
        assert by_path[norm] is False
    assert by_path["['embed']['embedding']"] is decay_embeddings
    assert by_path["['lm_head']"] is decay_embeddings
    # 2 embedding leaves, 3 norms per layer + final, 7 kernels per layer; nothing else.
    n_layer_copies = 1 if scan_layers else 2
    assert sum(by_path.values()) == 7 * n_layer_copies + (2 if decay_embeddings else 0)
    assert len(by_path) == 9 * n_layer_copies + 3


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_weight_decay_is_decoupled_and_skips_norms(name):
    """Zero gradients: the only change is p <- p - lr * wd * p = 0.75 p, on decayed leaves only.

    lr is not 1 so that a decay not multiplied by the learning rate (optax's raw Adafactor) shows.
    """
    cfg = config(name=name, lr=0.5, weight_decay=0.5, warmup_steps=0, schedule="constant")
    params = debug_params()
    opt = make_optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
    new = _paths(optax.apply_updates(params, updates))
    old = _paths(params)
    kernel = "['layers']['mlp']['up']['kernel']"
    np.testing.assert_allclose(new[kernel], 0.75 * old[kernel], rtol=1e-6)
    np.testing.assert_array_equal(new["['layers']['attn_norm']['scale']"], 1.0)
    np.testing.assert_array_equal(new["['final_norm']['scale']"], 1.0)
    np.testing.assert_array_equal(new["['embed']['embedding']"], old["['embed']['embedding']"])
    np.testing.assert_array_equal(new["['lm_head']"], old["['lm_head']"])


# ---- clipping ------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_norm, scale", [(1.0, 0.1), (20.0, 1.0), (0.0, 1.0), (None, 1.0)])
def test_global_norm_clipping_precedes_adamw(clip_norm, scale):
    """First AdamW step has m_hat = g, v_hat = g^2, so the update is -lr * g / (|g| + eps).

    With eps = 1 that depends on the size of g, so it shows whether g was clipped: the gradient
    (6, 8) has global norm 10, and clip_norm = 1 scales it by 0.1; 20, 0 and None leave it alone.
    """
    cfg = config(lr=1.0, eps=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant", clip_norm=clip_norm)
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([6.0]), "b": jnp.array([8.0])}
    opt = make_optimizer(cfg, 10)
    updates, _ = opt.update(grads, opt.init(params), params)
    g_a, g_b = 6.0 * scale, 8.0 * scale
    assert float(updates["a"][0]) == pytest.approx(-g_a / (g_a + 1.0), rel=1e-5)
    assert float(updates["b"][0]) == pytest.approx(-g_b / (g_b + 1.0), rel=1e-5)


def test_global_norm_and_clipping_measure_in_float32():
    """Gradients of float16 parameters with a global norm of 1000: every entry is finite, but their
    sum of squares (1e6) is not in float16, whose largest number is 65504. The norm is 1000 still,
    and clipping to 1 scales them by 1e-3 (optax's own norm gave inf, and clipping then zeroed
    them). As in the test above, AdamW's first update with eps = 1 shows the clipped gradient."""
    grads = {"a": jnp.full((100,), 60.0, jnp.float16), "b": jnp.full((100,), 80.0, jnp.float16)}  # norm 10 x 100
    assert float(global_norm(grads)) == pytest.approx(1000.0, rel=1e-6)
    cfg = config(lr=1.0, eps=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant", clip_norm=1.0)
    opt = make_optimizer(cfg, 10)
    params = jax.tree.map(jnp.zeros_like, grads)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert updates["a"].dtype == jnp.float32  # (computed in float32, rounded to float16 as it is added)
    np.testing.assert_allclose(np.asarray(updates["a"], np.float32), -0.06 / 1.06, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(updates["b"], np.float32), -0.08 / 1.08, rtol=1e-2)
    # bfloat16 holds every integer up to 256, not 257: a sum in it of 300 squares of 1 stops at 256
    ones = [jnp.ones((1,), jnp.bfloat16)] * 300
    assert float(global_norm(ones)) == pytest.approx(math.sqrt(300), rel=1e-6)


def test_adafactor_clips_each_layer_of_a_scanned_stack_on_its_own():
    """Adafactor scales each parameter's update down to an RMS of at most 1. A gradient that jumps
    in layer 1 only gives layer 1 an update of RMS above 1 at the second step; in a scanned stack
    (`layers`, one array for both layers) layer 0's update must still be what it is as `layers_0`,
    not scaled down with layer 1's."""
    cfg = config(name="adafactor", lr=1.0, weight_decay=0.0, warmup_steps=0, schedule="constant", clip_norm=None)
    opt = make_optimizer(cfg, 10)
    grads = jax.random.normal(jax.random.key(0), (2, 3, 4))
    steps = [grads, grads.at[1].multiply(100.0)]

    def updates(params, to_tree):
        state = opt.init(params)
        for g in steps:
            out, state = opt.update(to_tree(g), state, params)
        return out

    stacked = updates({"layers": {"w": jnp.zeros((2, 3, 4))}}, lambda g: {"layers": {"w": g}})["layers"]["w"]
    unstacked = updates({f"layers_{i}": {"w": jnp.zeros((3, 4))} for i in (0, 1)},
                        lambda g: {f"layers_{i}": {"w": g[i]} for i in (0, 1)})
    assert float(jnp.sqrt(jnp.mean(unstacked["layers_0"]["w"] ** 2))) == pytest.approx(1.0, rel=0.05)  # unclipped
    for i in (0, 1):
        np.testing.assert_allclose(stacked[i], unstacked[f"layers_{i}"]["w"], rtol=1e-6)


# ---- every optimizer trains ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_each_optimizer_minimises_a_quadratic(name):
    target = {"w": jnp.array([[1.0, -0.5], [0.25, 0.75]]), "norm": {"scale": jnp.array([0.5, -1.0])}}
    params = jax.tree.map(jnp.zeros_like, target)

    def loss(p):
        return sum(jnp.sum((x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    opt = make_optimizer(config(name=name, lr=0.05, weight_decay=0.0, warmup_steps=5, schedule="cosine"), 60)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = float(loss(params))
    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.05 * start


# ---- bad configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("total, warmup, fraction", [
    *[(total, 0, 0.5 / total) for total in (10, 18, 47, 94, 99_999)],  # too short a decay
    (1000, 100, 0.95), (1_001_002, 500, 1.0), (1_005_279, 2000, 1.0)])  # overlapping the warmup
def test_the_decay_bound_suggested_is_accepted(total, warmup, fraction):
    """(1.5 / total_steps printed to 6 digits was below the bound for most totals, and refused; past a
    million steps, 6 digits of the largest fraction after the warmup could round up into the warmup:
    "0.999501 of 1001002 steps overlaps the 500 warmup steps; valid: at most 0.999501".)"""
    cfg = default_config()
    cfg.update(schedule="wsd", decay_fraction=fraction, warmup_steps=warmup)
    with pytest.raises(ValueError) as err:
        make_optimizer(cfg, total)
    cfg.update(decay_fraction=float(re.split("at least |at most ", str(err.value))[-1]))
    make_optimizer(cfg, total)


@pytest.mark.parametrize("changes, total, key, valid", [
    ({"name": "sgd"}, 100, "optimizer.name", "adamw, adafactor, lion"),
    ({"schedule": "step"}, 100, "optimizer.schedule", "cosine, linear, constant, wsd"),
    ({"lr": -1e-3}, 100, "optimizer.lr", "[0, inf)"),
    ({"warmup_steps": 200}, 100, "optimizer.warmup_steps", "[0, total_steps=100]"),
    ({"min_lr_ratio": 1.5}, 100, "optimizer.min_lr_ratio", "[0, 1]"),
    ({"min_lr_ratio": -0.1}, 100, "optimizer.min_lr_ratio", "[0, 1]"),
    ({"schedule": "wsd", "decay_fraction": 0.95}, 1000, "optimizer.decay_fraction", "at most 0.9"),
    ({"schedule": "wsd", "decay_fraction": 0.05, "warmup_steps": 0}, 10, "optimizer.decay_fraction",
     "rounds to fewer than 2 decay steps, so no update would use a decayed rate; valid: 0 (none) or at least 0.2"),
    ({"schedule": "wsd", "decay_fraction": 0.1, "warmup_steps": 0}, 10, "optimizer.decay_fraction",
     "0.1 of 10 steps rounds to fewer than 2 decay steps"),
    # no room for 2 decay steps after the warmup: each bound suggested alone was refused by the other check
    *[({"schedule": "wsd", "decay_fraction": fraction, "warmup_steps": 9}, 10, "optimizer.decay_fraction",
       "valid: 0 (none); the 9 warmup steps leave fewer than 2 of the 10 steps to decay over (warmup_steps=8 would "
       "leave 2)") for fraction in (0.1, 0.2)],
    ({"b2": 1.0}, 100, "optimizer.b2", "[0, 1)"),
    ({"b1": -0.1}, 100, "optimizer.b1", "[0, 1)"),
    ({"lr": float("nan")}, 100, "optimizer.lr", "got nan; valid: a number in [0, inf)"),
    ({"eps": float("inf")}, 100, "optimizer.eps", "got inf; valid: a number in (0, inf)"),
    ({"clip_norm": float("inf")}, 100, "optimizer.clip_norm", "got inf; valid: a number in [0, inf)"),
    ({"weight_decay": float("nan")}, 100, "optimizer.weight_decay", "got nan"),
    ({"decay_fraction": float("nan")}, 100, "optimizer.decay_fraction", "got nan; valid: a number in [0, 1]"),
    ({}, 0, "total_steps", "positive integer"),
    # decoupled decay multiplies parameters by 1 - lr * weight_decay: 0 or below ruins them at every step
    *[({"name": name, "lr": 0.5, "weight_decay": 2.0}, 100, "optimizer.weight_decay",
       "2 with optimizer.lr=0.5: the decoupled decay multiplies the decayed parameters by 1 - lr x weight_decay = 0 "
       "at the peak learning rate, which zeroes them or flips their sign; valid: lr x weight_decay below 1 (with this "
       "lr: weight_decay below 2)") for name in ("adamw", "adafactor", "lion")],
    ({"lr": 3e-3, "weight_decay": 500.0}, 100, "optimizer.weight_decay", "= -0.5 at the peak learning rate"),
])
def test_bad_config_names_the_key(changes, total, key, valid):
    cfg = default_config()
    cfg.update(changes)
    with pytest.raises(ValueError) as err:
        make_optimizer(cfg, total)
    message = str(err.value)
    assert message.startswith(key + ":") and valid in message and "\n" not in message


def test_unknown_key_is_reported():
    cfg = default_config()
    cfg.learning_rate = 1e-3  # a typo for `lr` must not pass silently
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        validate(cfg, 100)


@pytest.mark.parametrize("choice", [["name=adamw"], ["name=adamw", "eps=1e-6"], ["name=adafactor"], ["name=lion"]])
def test_float16_parameters_are_updated_as_float32_ones_are(choice):
    """AdamW and Adafactor kept float16 parameters' state in float16: a second moment (1 - b2) x grad**2
    below float16's smallest number (6e-08) is 0, so a gradient below 1e-3 made an update of m / eps
    instead of about 1 (with eps 1e-6, accepted, these weights moved by 4.9, not 0.01) and a zero
    gradient 0/0 = NaN with the default eps (refused, as was Adafactor)."""
    config = load_config(TINY, ["model.param_dtype=float16", "optimizer.warmup_steps=0",
                                *(f"optimizer.{c}" for c in choice)])
    check_experiment(config)  # (AdamW's default eps and Adafactor were refused with float16 parameters)
    opt = make_optimizer(config.optimizer, config.train.steps)
    spread = (np.geomspace(1e-6, 1e-1, 32) * np.resize([1, -1], 32)).reshape(4, 8)
    grads = {"embed": {"embedding": np.zeros((4, 8))}, "w": {"kernel": spread}}  # (a token absent from the batch)
    params = {"embed": {"embedding": np.full((4, 8), 0.5)}, "w": {"kernel": np.full((4, 8), 0.5)}}

    def trained(dtype):
        p, g = (jax.tree.map(lambda a: jnp.asarray(a, dtype), t) for t in (params, grads))
        state = opt.init(p)
        for _ in range(3):
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        assert all(a.dtype == dtype for a in jax.tree.leaves(p))
        return p

    half, full = trained(jnp.float16), trained(jnp.float32)
    moved = np.abs(np.float32(full["w"]["kernel"]) - 0.5)
    assert moved.max() < 0.05 and moved.min() > 1e-3  # (3 steps of lr 3e-3: every entry moved by about 1e-2)
    jax.tree.map(lambda h, f: np.testing.assert_allclose(np.float32(h), f, rtol=0, atol=1e-3), half, full)  # 2 ulps
