"""The sharded training engine on 8 virtual CPU devices."""

import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax.checkpoint import save_model
from llama_jax.cli import main
from llama_jax.convert.hf import to_hf_state_dict
from llama_jax.experiment import load_config
from llama_jax.generate import generate
from llama_jax.loss import cross_entropy
from llama_jax.model import LLaMA, stack_layers
from llama_jax.run import build_data
from llama_jax.sharding import batch_sharding
from llama_jax.train import build_trainer, global_batch

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def tiny_config(*overrides):
    return load_config(TINY, ["train.steps=4", "optimizer.warmup_steps=1", *overrides])


def local_batch(config, step, model_config):
    return build_data(config, model_config, Path("/nonexistent")).train_rows(step)


def run_steps(config, devices=None, steps=4):
    trainer = build_trainer(config, devices)
    state = trainer.init_state(config.train.seed)
    losses = []
    for step in range(steps):
        batch = global_batch(trainer.mesh, local_batch(config, step, trainer.model_config))
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), trainer


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(tiny_config("mesh.fsdp=1"), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)])
def test_meshes_give_the_same_training(single_device_run, mesh):
    ref_losses, ref_params, _ = single_device_run
    data, fsdp, tensor = mesh
    losses, params, trainer = run_steps(tiny_config(f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                                                    f"mesh.tensor={tensor}"))
    assert trainer.mesh.size == 8
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)


def test_unrolled_layers_train_like_scanned_ones(single_device_run):
    """The same seed initialises the same model in either layer layout, so the runs agree."""
    ref_losses, ref_params, _ = single_device_run
    config = tiny_config("mesh.fsdp=1", "model.scan_layers=False")
    losses, params, trainer = run_steps(config, jax.devices()[:1])
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    stacked = stack_layers(params, trainer.model_config.n_layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stacked, ref_params)


def test_splash_attention_trains_like_the_xla_kernel():
    """A model with `attention_impl=splash` initialises (its parameters are traced with the xla
    kernel: splash takes no one-token sequence) and trains as the xla kernel does; on CPU splash
    runs in Pallas' interpreter, so the rows are few and short."""
    overrides = ("mesh.fsdp=1", "train.seq_len=128", "train.batch_size=2", "model.n_layers=1")
    xla_losses, xla_params, _ = run_steps(tiny_config(*overrides), jax.devices()[:1], steps=2)
    losses, params, _ = run_steps(tiny_config(*overrides, "model.attention_impl=splash"), jax.devices()[:1], steps=2)
    np.testing.assert_allclose(losses, xla_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, xla_params)


def test_cpu_tuning_is_applied_and_changes_only_rounding(single_device_run, monkeypatch):
    """The CPU compiler option of `llama_jax.backend_tuning` reaches the program that computes the
    gradients (more of it runs in YNNPACK fusions) and not the optimizer update, which `step` runs
    as a program of its own; training matches XLA's defaults (the whole step as one program) to
    float32 rounding."""
    tuned_losses, tuned_params, tuned = single_device_run
    monkeypatch.setenv("LLAMA_JAX_TUNING", "0")
    losses, params, plain = run_steps(tiny_config("mesh.fsdp=1"), jax.devices()[:1])
    assert tuned.compiler_options and not plain.compiler_options

    state = tuned.init_state(0)
    batch = global_batch(tuned.mesh, local_batch(tiny_config(), 0, tuned.model_config))

    def library_fusions(program, *args):
        return program.lower(*args).compile().as_text().count("ynn_fusion")

    with tuned.context():  # (XLA's defaults already hand reductions to YNNPACK)
        assert library_fusions(tuned.jit_gradients, state.params, batch) > library_fusions(
            plain.jit_gradients, state.params, batch)
        loss, aux, grads = tuned.jit_gradients(state.params, batch)
        assert library_fusions(tuned.jit_apply_gradients, state, loss, aux, grads) == library_fusions(
            plain.jit_apply_gradients, state, loss, aux, grads)
    np.testing.assert_allclose(tuned_losses, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), tuned_params, params)


def test_data_by_fsdp_mesh_moves_no_activation_beyond_a_devices_own():
    """On a data 2 x fsdp 4 mesh the compiled gradients program moves weights (all-gathers), partial
    weight gradients (reductions) and token ids between devices; no activation it moves is larger
    than one device's own share of the embedding's output, as gathering one over a data group or the
    whole batch would be."""
    # rows and length whose multiples no parameter's dimensions are
    config = tiny_config("mesh.data=2", "mesh.fsdp=4", "train.batch_size=24", "train.seq_len=48")
    trainer = build_trainer(config)
    state = trainer.init_state(0)
    batch = global_batch(trainer.mesh, local_batch(config, 0, trainer.model_config))
    seq_len, dim = config.train.seq_len, trainer.model_config.dim
    own_share = config.train.batch_size // 8 * seq_len * dim  # elements of [rows per device, seq, dim]
    collective = re.compile(r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\(")

    def moved_activations(hlo: str) -> list[tuple[list[int], str]]:
        """(dims, line) of each float array a collective moves with a dimension a multiple of seq_len."""
        found = []
        for line in hlo.splitlines():
            match = collective.search(line)
            for dims in re.findall(r"f32\[([\d,]+)\]", match.group(1)) if match else []:
                dims = [int(d) for d in dims.split(",")]
                if any(d % seq_len == 0 for d in dims):
                    found.append((dims, line.strip()[:160]))
        return found

    with trainer.context():
        hlo = trainer.jit_gradients.lower(state.params, batch).compile().as_text()
    moved = moved_activations(hlo)
    assert moved and [line for dims, line in moved if math.prod(dims) > own_share] == [], moved
    # the same check finds an activation gathered over the whole batch, or over a data group only
    activation = jax.device_put(np.zeros((config.train.batch_size, seq_len, dim), np.float32),
                                batch_sharding(trainer.mesh))
    for target in (P(), P("data")):
        gather = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(trainer.mesh, target))
        moved = moved_activations(gather.lower(activation).compile().as_text())
        assert any(math.prod(dims) > own_share for dims, _ in moved)


@pytest.mark.parametrize("mesh", [(2, 4, 1), (2, 2, 2)])
def test_data_by_fsdp_step_compiles_without_involuntary_rematerialization(capfd, mesh):
    """On data x fsdp meshes XLA logged "Involuntary full rematerialization" from dry runs of the
    embedding lookup's other strategies (`model.lookup_table`); the step compiles without it. The
    step is compiled here, not read from the compilation cache, so that XLA's log shows."""
    from llama_jax.plan import plan

    data, fsdp, tensor = mesh
    config = tiny_config(f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
    cached = jax.config.jax_enable_compilation_cache
    capfd.readouterr()
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        plan(config)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_a_train_state_and_its_params_given_for_one_another_are_named(tmp_path):
    """Each was a bare TypeError or KeyError, or named the optimizer state as parameters not of the model."""
    config = tiny_config("mesh.fsdp=1")
    trainer = build_trainer(config, jax.devices()[:1])
    state = trainer.init_state(0)
    cfg = trainer.model_config
    for call in (lambda: generate(cfg, state, [[1, 2]], 2), lambda: save_model(tmp_path / "m", cfg, state),
                 lambda: to_hf_state_dict(cfg, state), lambda: trainer.eval_metrics(state, {})):
        with pytest.raises(TypeError, match=r"^params must be a dict of parameter arrays \(load_model, init_params\), "
                                            r"got a TrainState; pass its parameters, state.params$"):
            call()
    with pytest.raises(TypeError, match=r"^state must be a TrainState \(trainer.init_state\(seed\)\), got a dict$"):
        trainer.step(state.params, {})
    batch = global_batch(trainer.mesh, local_batch(config, 0, cfg))
    with pytest.raises(ValueError, match=r"^batch must be a dict of \[batch, seq\] arrays tokens, targets, positions, "
                                         r"segment_ids, loss_mask .*; missing: loss_mask$"):
        trainer.step(state, {k: v for k, v in batch.items() if k != "loss_mask"})
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_step_leaves_the_state_unchanged():
    """A batch whose loss is NaN (a token id outside the vocabulary: the embedding lookup gives NaN)
    skips the update: parameters and optimizer state stay bitwise what they were."""
    config = tiny_config("mesh.fsdp=4", "mesh.tensor=2")
    trainer = build_trainer(config)
    state = trainer.init_state(0)
    state, _ = trainer.step(state, global_batch(trainer.mesh, local_batch(config, 0, trainer.model_config)))
    before = jax.device_get((state.params, state.opt_state))
    rows = local_batch(config, 1, trainer.model_config)
    rows = dict(rows, tokens=rows["tokens"].copy())
    rows["tokens"][0, 0] = trainer.model_config.vocab_size
    state, metrics = trainer.step(state, global_batch(trainer.mesh, rows))
    assert not np.isfinite(float(metrics["loss"])) and int(state.skipped) == 1 and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((state.params, state.opt_state)), before)

    # the next step is the one a run that never saw the bad batch takes, at the learning rate it logs
    batch = global_batch(trainer.mesh, local_batch(config, 2, trainer.model_config))
    state, metrics = trainer.step(state, batch)
    clean = trainer.init_state(0)
    clean, _ = trainer.step(clean, global_batch(trainer.mesh, local_batch(config, 0, trainer.model_config)))
    clean, clean_metrics = trainer.step(clean, batch)
    assert float(metrics["learning_rate"]) == float(clean_metrics["learning_rate"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(clean.params))


def test_float16_parameters_train_as_float32_ones_do(single_device_run):
    """AdamW kept float16 parameters' moments in float16, where a second moment below 6e-08 is 0: the
    updates were m / eps, and a tiny model's loss went NaN within five steps (every later step skipped)."""
    losses, params, _ = run_steps(tiny_config("mesh.fsdp=1", "model.param_dtype=float16"), jax.devices()[:1])
    assert all(a.dtype == np.float16 and np.isfinite(a).all() for a in jax.tree.leaves(params))
    np.testing.assert_allclose(losses, single_device_run[0], rtol=0, atol=0.02)  # (initialised in float16)


def test_float16_gradients_of_a_large_norm_are_clipped_not_skipped():
    """Finite float16 gradients whose global norm (1000) squared is beyond float16's range: the
    step logs that norm and applies the clipped update; it is not skipped as non-finite."""
    config = tiny_config("model.param_dtype=float16", "optimizer.name=lion", "optimizer.warmup_steps=0",
                         "mesh.fsdp=4", "mesh.tensor=2")
    trainer = build_trainer(config)
    state = trainer.init_state(0)
    before = jax.device_get(state.params)
    leaves = jax.tree.leaves(before)
    per_entry = 1000.0 / math.sqrt(sum(x.size for x in leaves))
    grads = jax.tree.map(lambda p: np.full(p.shape, per_entry, p.dtype), before)
    aux = {k: np.float32(1.0) for k in ("nll", "z_loss", "tokens", "accuracy")}
    with trainer.context():
        state, metrics = trainer.jit_apply_gradients(state, np.float32(2.0), aux, grads)
    assert int(state.skipped) == 0
    assert float(metrics["grad_norm"]) == pytest.approx(1000.0, rel=1e-3)
    after = jax.tree.leaves(jax.device_get(state.params))
    assert any(np.any(a != b) for a, b in zip(after, leaves))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_per_source_losses_are_each_sources_own_loss(grad_accum):
    """A mixture's step also sums each source's token losses and targets (vocabulary split over
    tensor=2, rows over fsdp=4): each source's mean equals the loss of that source's rows alone."""
    config = tiny_config("mesh.fsdp=4", "mesh.tensor=2", "train.batch_size=8", f"train.grad_accum={grad_accum}")
    trainer = dataclasses.replace(build_trainer(config), sources=("a", "b"))
    state = trainer.init_state(0)
    rows = dict(local_batch(config, 0, trainer.model_config))
    rows["loss_mask"] = rows["loss_mask"].copy()
    rows["loss_mask"][:, ::3] = 0  # rows count different numbers of targets
    rows["loss_mask"][5, :40] = 0
    rows["source"] = np.array([0, 1, 1, 0, 0, 1, 0, 1], np.int32)
    params = jax.device_get(state.params)
    _, metrics = trainer.step(state, global_batch(trainer.mesh, rows))
    by_source = jax.device_get((metrics["source_nll"], metrics["source_tokens"]))
    for i in (0, 1):
        mine = {k: v[rows["source"] == i] for k, v in rows.items() if k != "source"}
        alone = trainer.eval_metrics(jax.device_put(params, trainer.state_shardings.params),
                                     global_batch(trainer.mesh, mine))
        assert by_source[1][i] == float(alone["tokens"]) == mine["loss_mask"].sum()
        np.testing.assert_allclose(by_source[0][i] / by_source[1][i], float(alone["nll"]), rtol=1e-5)
    np.testing.assert_allclose(by_source[0].sum() / by_source[1].sum(), float(metrics["nll"]), rtol=1e-5)
    from llama_jax.train import per_source_nll

    logged = per_source_nll(trainer.sources, jax.device_get(metrics))
    assert logged == {"nll/a": pytest.approx(by_source[0][0] / by_source[1][0]),
                      "nll/b": pytest.approx(by_source[0][1] / by_source[1][1])}
    assert per_source_nll(trainer.sources, {"source_nll": np.array([1.0, 0.0]),
                                            "source_tokens": np.array([2.0, 0.0])}) == {"nll/a": 0.5}


def _dot_output_shapes(jaxpr):
    """Output shapes of every matrix product in `jaxpr`, its sub-programs (jit, shard_map, scan) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield tuple(eqn.outvars[0].aval.shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dot_output_shapes(inner)


def test_per_source_sums_are_not_matrix_products():
    """A mixture's per-source token losses and target counts are plain float32 sums: as a matmul with
    the one-hot of the sources, a GPU (TF32) or TPU (bfloat16) rounds them by default (4093 targets
    of a row of 4096 count as 4096), which the exact float32 products on CPU do not show."""
    config = tiny_config()
    trainer = dataclasses.replace(build_trainer(config), sources=("a", "b", "c"))
    rows = dict(local_batch(config, 0, trainer.model_config), source=np.arange(16, dtype=np.int32) % 3)
    params = nn.meta.unbox(trainer.abstract_state.params)  # shapes only: tracing needs no values
    with trainer.context():
        jaxpr, (_, aux, _) = jax.make_jaxpr(trainer.gradients, return_shape=True)(params, rows)
    assert aux["source_nll"].shape == aux["source_tokens"].shape == (3,)  # the sums are computed
    shapes = list(_dot_output_shapes(jaxpr.jaxpr))
    assert shapes and (3,) not in shapes, shapes


def test_shardings_follow_the_rules():
    trainer = build_trainer(tiny_config("mesh.fsdp=4", "mesh.tensor=2"))
    state = trainer.init_state(0)
    specs = jax.tree.map(lambda x: x.sharding.spec, state)
    layers = specs.params["layers"]
    assert layers["attn"]["q"]["kernel"] == P(None, "fsdp", "tensor", None)
    assert layers["attn"]["k"]["kernel"] == P(None, "fsdp", "tensor", None)
    assert layers["attn"]["o"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert layers["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")
    assert layers["attn_norm"]["scale"] == P(None, None)
    assert specs.params["embed"]["embedding"] == P("tensor", "fsdp")
    assert specs.params["lm_head"] == P("fsdp", "tensor")
    # AdamW moments are sharded exactly like their parameters; the step counter is replicated.
    adam = [s for s in jax.tree.leaves(specs.opt_state, is_leaf=lambda x: isinstance(x, P))]
    assert adam.count(P(None, "fsdp", "tensor", None)) == 6  # q, k and v kernels; mu and nu each
    assert specs.step == P()
    shard = state.params["layers"]["attn"]["q"]["kernel"].addressable_shards[0].data
    assert shard.shape == (2, 64 // 4, 4 // 2, 16)


def _argument_bytes(config, devices):
    from llama_jax.plan import plan

    return plan(config, devices)["arguments"]


def test_plan_for_virtual_devices_called_in_another_program(capsys):
    """`plan --devices N` called in another program (a notebook, a script calling `main`) set XLA_FLAGS
    and JAX_PLATFORMS for the rest of that process and the processes it starts; JAX, already running
    there or started by it, kept the devices it had: the plan was for all of them, not N."""
    environ = dict(os.environ)
    assert main(["plan", "--config", TINY, "--devices", "4"]) == 0
    assert capsys.readouterr().out.startswith("mesh data=1 x fsdp=4 x tensor=1 (4 cpu devices)")
    assert main(["plan", "--config", TINY, "--devices", "16"]) == 2  # the process has 8 (tests/conftest.py)
    assert capsys.readouterr().err == (
        "llama-jax plan: error: --devices 16: this process's JAX has 8 CPU device(s), and makes its devices once "
        "per process; run `llama-jax plan --devices 16` as a command of its own\n")
    assert dict(os.environ) == environ and jax.device_count() == 8


def test_plan_for_virtual_devices_where_the_environment_sets_jax_num_cpu_devices():
    """JAX_NUM_CPU_DEVICES takes precedence over XLA_FLAGS' device count: `llama-jax plan --devices 2`
    run as a command of its own, with it set to 1, was refused as if called in another program."""
    run = subprocess.run([sys.executable, "-m", "llama_jax.cli", "plan", "--config", TINY, "--devices", "2"],
                         env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("mesh data=1 x fsdp=2 x tensor=1 (2 cpu devices)")


def test_plan_reports_per_device_memory_and_what_it_stands_for(capsys):
    from llama_jax.plan import estimated_peak, format_plan, plan

    assert main(["plan", "--config", TINY]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mesh data=1 x fsdp=8 x tensor=1 (8 cpu devices)")
    assert out[2].strip().startswith("parameters") and out[2].endswith(" MiB")  # a tiny model's state, not 0.000 GiB
    assert out[-1].startswith("compiled for CPU devices, attention `xla`, the config's kernel on every backend: "
                              "these temporaries are a TPU's or GPU's too")
    # the CPU program keeps a bfloat16 model's activations as float32 (it said they were an accelerator's too)
    assert main(["plan", "--config", TINY, "--config.model.dtype=bfloat16"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "compiled for CPU devices, attention `xla`, the config's kernel on every backend: these temporaries are an "
        "upper bound of a TPU's or GPU's, which keep a bfloat16 model's activations in bfloat16, not in float32")
    assert main(["plan", "--config", TINY, "--config.model.attention_impl=auto"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "compiled for CPU devices, attention `xla`: on TPU `auto` is splash")
    assert main(["plan", "--config", TINY, "--config.model.attention_impl=cudnn"]) == 0  # a GPU config, planned here
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        "compiled for CPU devices, attention `xla` (in place of cudnn, which needs a GPU): on a GPU `cudnn` runs, "
        "which keeps no")  # (it spoke of `auto`, which the config did not set)
    # with the mesh checked first (--devices): the kernel planned is checked, not the GPU's (it was refused)
    assert main(["plan", "--config", TINY, "--config.model.attention_impl=cudnn", "--devices", "8"]) == 0
    assert "(in place of cudnn, which needs a GPU)" in capsys.readouterr().out.splitlines()[-1]
    figures = plan(tiny_config())
    peak = estimated_peak(figures)
    assert format_plan({**figures, "attention": "splash", "attention_configured": "splash"}).splitlines()[-1] == (
        "compiled for CPU devices, attention `splash`, the TPU kernel run by Pallas' interpreter: a TPU's temporaries "
        "differ; run plan on the target for its figures and whether they fit")  # (it said GPUs ran splash)
    for memory, verdict in ((peak, "fits"), (peak - 1, "does NOT fit")):  # as a GPU or TPU reports its memory
        assert format_plan({**figures, "device_memory": memory}).splitlines()[-1].startswith(f"{verdict}: estimated")


@pytest.mark.parametrize("spare, status", [(0, 0), (-1, 1)])
def test_plan_exits_1_where_the_device_holds_less_than_the_peak(monkeypatch, capsys, spare, status):
    """A script that plans a config before renting the machines stops at a plan that does not fit (the
    command said so and exited 0). The device's memory is what a GPU or TPU reports; CPUs report none."""
    from llama_jax import plan as plan_lib

    planned = plan_lib.plan

    def on_a_device_of_that_memory(*args):
        figures = planned(*args)
        return {**figures, "device_memory": plan_lib.estimated_peak(figures) + spare}

    monkeypatch.setattr(plan_lib, "plan", on_a_device_of_that_memory)
    assert main(["plan", "--config", TINY]) == status
    assert capsys.readouterr().out.splitlines()[-1].startswith(("fits", "does NOT fit")[status] + ": estimated peak")


def test_plan_compiles_the_step_as_an_accelerator_does_without_the_cpus_options(monkeypatch):
    """On CPU the one-program step plan compiles was given the CPU's XLA options, which `Trainer.step`
    keeps off the optimizer update there and no accelerator has: 13% more temporaries for the tiny
    model, and 41 GiB for the 34 GiB peak of llama2_7b_v4_32.py. Its figures are those of XLA's defaults."""
    from llama_jax import backend_tuning
    from llama_jax.plan import plan

    assert backend_tuning.compiler_options("cpu"), "the CPU's train options (the premise; test_backend_tuning too)"
    figures = plan(tiny_config())
    monkeypatch.setenv(backend_tuning.DISABLE_ENV, "0")
    assert figures == plan(tiny_config())


def test_fsdp_divides_per_device_memory_by_eight():
    config = tiny_config("train.batch_size=8")
    one = _argument_bytes(load_config(TINY, ["mesh.fsdp=1", "train.batch_size=8"]), jax.devices()[:1])
    eight = _argument_bytes(config, jax.devices())
    assert eight == pytest.approx(one / 8, rel=0.15)


def test_gradient_accumulation_equals_one_big_step():
    mesh = ("mesh.fsdp=4", "mesh.tensor=2")  # 16 rows / 4 micro-batches = 4 rows, one per fsdp shard
    losses, params, _ = run_steps(tiny_config(*mesh), steps=2)
    losses_acc, params_acc, _ = run_steps(tiny_config("train.grad_accum=4", *mesh), steps=2)
    np.testing.assert_allclose(losses_acc, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_acc, params)


def test_gradient_accumulation_with_uneven_masks_is_a_token_mean_of_the_whole_batch():
    """Micro-batches counting 0, a few and many targets: their accumulated loss and gradients are
    those of the masked token mean over the whole batch (with z-loss), not a mean of micro-batch means."""
    config = tiny_config("mesh.fsdp=4", "mesh.tensor=2", "train.grad_accum=4", "train.z_loss=0.01")
    trainer = build_trainer(config)
    params = trainer.init_state(0).params
    rows = dict(local_batch(config, 0, trainer.model_config))
    mask = rows["loss_mask"].copy()  # 4 rows per micro-batch
    mask[0:4] = 0
    mask[4:8, 5:] = 0
    mask[9, ::2] = 0
    rows["loss_mask"] = mask
    with trainer.context():
        loss, aux, grads = trainer.jit_gradients(params, global_batch(trainer.mesh, rows))

    def whole_batch_loss(p):
        logits = LLaMA(trainer.model_config).apply({"params": p}, rows["tokens"], positions=rows["positions"],
                                                   segment_ids=rows["segment_ids"])
        return cross_entropy(logits, rows["targets"], mask, z_loss=0.01)

    (want, want_aux), want_grads = jax.jit(jax.value_and_grad(whole_batch_loss, has_aux=True))(jax.device_get(params))
    assert float(aux["tokens"]) == float(want_aux["tokens"]) == 1024 - 4 * 64 - 4 * 59 - 32
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for key in ("nll", "z_loss"):
        np.testing.assert_allclose(float(aux[key]), float(want_aux[key]), rtol=1e-5)
    # each gradient's largest difference, relative to its largest entry (measured: up to 5.5e-7)
    errors = jax.tree.map(lambda g, w: float(np.max(np.abs(g - w)) / np.max(np.abs(w))), jax.device_get(grads),
                          jax.device_get(want_grads))
    assert max(jax.tree.leaves(errors)) < 1e-5, errors


def test_z_loss_and_clipping_change_what_they_claim():
    config = tiny_config("train.z_loss=0.01")
    trainer = build_trainer(config)
    state = trainer.init_state(0)
    batch = global_batch(trainer.mesh, local_batch(config, 0, trainer.model_config))
    _, metrics = trainer.step(state, batch)
    # loss = nll + z term, and the z term is 0.01 x mean(logsumexp^2) > 0.
    assert float(metrics["z_loss"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["nll"] + metrics["z_loss"]), rtol=1e-6)

    # Clipping rescales the whole gradient: the reported grad norm is the raw (pre-clipping) one,
    # and Lion, whose update is the sign of the (rescaled) gradient, moves the same either way.
    def first_update(*overrides):
        cfg = tiny_config("optimizer.name=lion", "optimizer.weight_decay=0.0", *overrides)
        tr = build_trainer(cfg)
        st = tr.init_state(0)
        before = jax.device_get(st.params)
        b = global_batch(tr.mesh, local_batch(cfg, 0, tr.model_config))
        st, m = tr.step(st, b)
        return jax.tree.map(lambda a, b: a - b, jax.device_get(st.params), before), float(m["grad_norm"])

    moved, norm = first_update("optimizer.clip_norm=0.0")
    moved_clipped, norm_clipped = first_update("optimizer.clip_norm=1e-3")
    assert norm == pytest.approx(norm_clipped, rel=1e-6) and norm > 1e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), moved, moved_clipped)


@pytest.mark.parametrize("overrides, message", [
    (["--config.mesh.data=3", "--config.mesh.fsdp=1"],
     "mesh: data x fsdp x tensor = 3 x 1 x 1 = 3, but the device count is 8"),
    (["--config.train.batch_size=12"], "train.batch_size / train.grad_accum = 12 is not divisible by mesh.data x "
     "mesh.fsdp = 8 (each data-parallel shard needs whole rows); valid: a train.batch_size that is a multiple of 8, or "
     "a mesh whose data x fsdp divides 12"),
    # (a resume on a larger slice with the grad_accum of a smaller one, say)
    (["--config.train.grad_accum=4"], "train.batch_size / train.grad_accum = 4 is not divisible by mesh.data x "
     "mesh.fsdp = 8 (each data-parallel shard needs whole rows); valid: a train.grad_accum that divides 2, or a mesh "
     "whose data x fsdp divides 4"),
    (["--config.mesh.tensor=8", "--config.mesh.fsdp=1"], "model.n_heads=4 is not divisible by mesh.tensor=8"),
    (["--config.optimizer.name=sgdd"], "optimizer.name"),
    (["--config.optimizer.schedule=triangle"], "optimizer.schedule"),
    (["--config.train.seq_len=1024"], "train.seq_len=1024 exceeds the model's max_seq_len=128; lower train.seq_len "
                                      "or raise model.max_seq_len to at least it"),
    (["--config.train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--config.train.steps=abc"], "config key 'train.steps' is int"),
    (["--config.train.z_loss=-0.5"], "train.z_loss must be a number >= 0 (0: no z-loss), got -0.5"),
])
def test_bad_config_is_one_line_before_compiling(tmp_path, capsys, overrides, message):
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_train_command_writes_metrics(tmp_path, capsys):
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path), "--config.train.steps=6",
                 "--config.optimizer.warmup_steps=2",
                 "--config.train.log_every=2"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "tflops_per_device", "mfu"):
        assert all(np.isfinite(r[key]) for r in lines), key
    out = capsys.readouterr().out.splitlines()  # not a terminal: a line per logged step, the last one closing
    assert [line.split(":")[0] for line in out] == ["step 2", "step 4", "step 6"], out
    assert re.fullmatch(r"step 4: loss \d+\.\d{4}, [\d,]+ tokens/s, MFU \d+\.\d%", out[1]), out
    assert "metrics in" in out[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("devices_per_process, mesh", [
    (4, ("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1")),  # each process feeds its half of the batch
    (1, ("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=2")),  # tensor parallel across them: each feeds all rows
    (3, ("mesh.data=3", "mesh.fsdp=1", "mesh.tensor=2", "train.batch_size=12")),  # a data shard spans both
])
def test_two_processes_match_one(tmp_path, devices_per_process, mesh):
    """Two local processes (gloo) train like one process with their devices together."""
    args = ["--config", TINY, "--config.train.steps=4", "--config.optimizer.warmup_steps=1",
            "--config.train.log_every=1", *(f"--config.{setting}" for setting in mesh)]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", *args, "--workdir", str(tmp_path / "multi"),
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # each process ends with the run's last step; only process 0 names the metrics file as its own
    assert outs[0][0].splitlines()[-1].endswith(f"metrics in {tmp_path / 'multi'}/metrics.jsonl"), outs[0][0]
    assert outs[1][0].splitlines()[-1].endswith(f"process 1; process 0 writes {tmp_path / 'multi'}/metrics.jsonl")
    # each process measures the peak of a device of its own (process 1 measured process 0's device,
    # which it cannot address, and printed MFU 0.0%)
    mfu = [float(re.search(r"MFU (\d+\.\d)%", out.splitlines()[-1]).group(1)) for out, _ in outs]
    assert min(mfu) > 0, mfu
    multi = [json.loads(line)["loss"] for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    single, _, _ = run_steps(tiny_config(*mesh), jax.devices()[:2 * devices_per_process])
    assert len(multi) == 4
    np.testing.assert_allclose(multi, single, rtol=1e-5)


@pytest.mark.parametrize("differing", ["config", "--workdir", "devices", "--num-processes"])
def test_processes_started_differently_are_refused_by_each(tmp_path, differing):
    """Two processes of one run given different settings would each train its shards its own way
    (and different workdirs hang at the first checkpoint), and processes holding different numbers
    of devices cannot form a mesh: both refuse, before writing anything. (A process told of more
    processes than process 0 was joined it as one of process 0's count.)"""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--config.train.steps=2",
           "--config.optimizer.warmup_steps=1", "--coordinator", f"127.0.0.1:{port}"]
    second = ["--config.optimizer.lr=0.001"] if differing == "config" else []
    counts = ["2", "3" if differing == "--num-processes" else "2"]
    workdirs = [tmp_path / "run", tmp_path / ("run" if differing == "config" else "other")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    devices = [2, 1] if differing == "devices" else [1, 1]
    procs = [subprocess.Popen([*cmd, "--workdir", str(workdirs[i]), "--num-processes", counts[i], "--process-id", str(i),
                               *(second if i else [])],
                              env={**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices[i]}"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-3000:]
        expected = {"devices": "the 2 processes hold different numbers of devices (process 0: 2, process 1: 1); every "
                               "process must hold as many",
                    "--num-processes": "the 2 processes that joined were given different --num-processes (process 0: "
                                       "2, process 1: 3); give every process the same count"}.get(
            differing, f"the 2 processes were started with different {differing} (process 1's differs from process "
                       f"0's); start every process with the same command and config, only --process-id differing")
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"llama-jax train: error: {expected}")
    assert not any(w.exists() for w in workdirs)


def test_processes_of_a_run_where_another_trains_all_say_so(tmp_path):
    """Process 0 takes the workdir's lock; where another run held it, process 0 alone refused and
    the others went on into the first computation, failing there on a lost peer ("the computation
    failed: ... another process may have stopped first"). Every process now gives the lock's line."""
    import fcntl

    workdir = tmp_path / "run"
    workdir.mkdir()
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--config.train.steps=2",
           "--config.optimizer.warmup_steps=1", "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    held = os.open(workdir, os.O_RDONLY)  # as a run training there holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        os.close(held)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-3000:]
        assert "Traceback" not in err and err.strip().splitlines()[-1] == (
            f"llama-jax train: error: --workdir {workdir} is in use: another llama-jax train is running there (it "
            f"holds the directory's lock); wait for it to end, stop it, or use another --workdir"), err[-3000:]
    assert sorted(p.name for p in workdir.iterdir()) == []


def test_processes_that_do_not_share_the_workdir_are_refused_by_each(tmp_path):
    """On disks of their own (a node-local --workdir), process 0 committed each checkpoint while
    the others wrote their parts elsewhere: the run waited at its first save for good, without a
    word. Each process now refuses before anything is written. (Process 1 looks for the file
    process 0 writes under another name, as a host that does not see process 0's disk finds none.)"""
    port = _free_port()
    args = ["train", "--config", TINY, "--config.train.steps=2", "--config.optimizer.warmup_steps=1",
            "--workdir", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    own_disk = ("import sys; import llama_jax.run as run; run.SHARED_PROBE = '.elsewhere-'; "
                "from llama_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    procs = [subprocess.Popen([sys.executable, *(["-c", own_disk] if i else ["-m", "llama_jax.cli"]), *args,
                               "--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-3000:]
        assert "Traceback" not in err and err.strip().splitlines()[-1] == (
            f"llama-jax train: error: --workdir {tmp_path / 'run'} is not one directory every process shares: process "
            f"1 does not see the file process 0 wrote in {tmp_path}; a multi-process run needs its workdir on storage "
            f"all its hosts mount (each writes its part of every checkpoint there), not a path on each host's own "
            f"disk"), err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sigterm_while_waiting_for_the_other_processes_stops_the_command(tmp_path):
    """jax.distributed.initialize waits up to 5 minutes for every process; a signal cannot interrupt
    the native call, so the command waits for it in a thread and stays stoppable."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir", str(tmp_path / "run"),
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    alone = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and alone.poll() is None:  # until its coordinator service listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        assert alone.poll() is None and time.monotonic() < deadline, alone.communicate()[1][-3000:]
        time.sleep(1)  # inside initialize: waiting for process 1
        alone.send_signal(signal.SIGTERM)
        _, err = alone.communicate(timeout=20)
    finally:
        alone.kill()
        alone.wait()
    assert alone.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "llama-jax train: terminated (SIGTERM)", err[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_run_that_cannot_form_is_refused_in_one_line(tmp_path):
    """Process 0 given a port another program listens on ended with a segmentation fault in gRPC
    (and its peer aborted 5 minutes later); a process whose peers never come aborted in C++ after
    5 minutes. Both are one line now, exit status 2, with nothing written, saying why a process cannot
    reach the coordinator (a host that does not resolve, nothing listening) where it cannot."""
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir", str(tmp_path / "run"),
           "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        held = subprocess.run([*cmd, "--coordinator", f"127.0.0.1:{port}", "--process-id", "0"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert held.returncode == 2 and held.stderr.strip() == (
        f"llama-jax train: error: --coordinator 127.0.0.1:{port}: process 0 cannot listen on port {port} (Address "
        f"already in use); choose a free port this user may open (the same for every process)"), held.stderr[-3000:]
    port = _free_port()
    # the coordinator without its peer; a peer without its coordinator (the peer waited out the timeout and
    # blamed a missing process alike, also for a host that does not resolve)
    for coordinator, process_id, why in (
            (f"127.0.0.1:{port}", "0", "; start every process with the same command and --num-processes, each with "
                                       "its own --process-id"),
            (f"127.0.0.1:{port}", "1", f": nothing listens at 127.0.0.1:{port}; start process 0 with the same "
                                       f"--coordinator, or give --coordinator as process 0's HOST:PORT"),
            (f"nohost.invalid:{port}", "1", ": nohost.invalid does not resolve to an address here; give --coordinator "
                                            "as process 0's HOST:PORT")):
        alone = subprocess.run([*cmd, "--coordinator", coordinator, "--process-id", process_id, "--join-timeout", "3"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert alone.returncode == 2 and alone.stderr.strip() == (
            f"llama-jax train: error: the 2 processes of the run did not all join at {coordinator} within 3 s "
            f"(--join-timeout){why}"), alone.stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("moment", ["training", "saving"])
def test_a_process_that_loses_its_peer_stops_at_once_with_one_line(tmp_path, moment):
    """Two processes train; one is killed, in a step or while a checkpoint is being written. The
    other got XLA's error as an uncaught traceback (or, in Orbax's save, as a ValueError), then
    waited in JAX's shutdown barrier for the dead process and aborted 60-100 s later with pages of
    C++ logs (or, in 1 of 4 runs under load, waited for its async save, which cannot commit without
    the dead process). It now says what failed in one line and exits once the failed run's barrier
    (`run.FAILED_RUN_BARRIER_S`) finds the other process gone."""
    run = tmp_path / "run"
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir", str(run),
           "--config.train.steps=2000", "--config.checkpoint.every=20", "--coordinator", f"127.0.0.1:{port}",
           "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)

    def reached() -> bool:
        if moment == "training":
            return (run / "metrics.jsonl").exists()
        checkpoints = run / "checkpoints"
        return checkpoints.is_dir() and any("tmp" in p.name for p in checkpoints.iterdir())

    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not reached() and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.005)
        assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        procs[1].kill()
        _, err = procs[0].communicate(timeout=45)  # the barrier held it for at least 60 s
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("llama-jax train: error: the computation failed: ") and last.endswith(
        "(in a multi-process run: another process may have stopped first); a run resumes from its last "
        "committed checkpoint"), err[-3000:]


FAIL_AT_STEP = """
import sys, jax
import llama_jax.run as run
from llama_jax import cli
fail_at, real, calls = int(sys.argv.pop(1)), run.global_batch, iter(range(1, 10**9))

def global_batch(*args):
    if next(calls) == fail_at:  # the batch of step fail_at, in every process
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory (injected)")
    return real(*args)

run.global_batch = global_batch
sys.exit(cli.main(sys.argv[1:]))
"""


def test_processes_that_all_fail_keep_their_save_in_flight(tmp_path):
    """Every process of a multi-process run fails (an out-of-memory error, not a lost process) in
    the step after an async save started: they find each other at the failed run's barrier, so
    they wait for the save, which commits (the test above: a lost process, whose save is left)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", FAIL_AT_STEP, "21", "train", "--config", TINY, "--workdir", str(run),
           "--config.train.steps=40", "--config.checkpoint.every=20", "--coordinator", f"127.0.0.1:{_free_port()}",
           "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, err in zip(procs, errors):
        assert p.returncode == 1 and "RESOURCE_EXHAUSTED: out of memory (injected)" in err, err[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["20"]


def test_a_checkpoint_damaged_where_one_process_reads_is_one_line_from_each(tmp_path):
    """Each process reads the files of its own shards: where only process 1's were damaged, it
    stopped (in a traceback, as the intact checkpoint it looked for next met the others elsewhere)
    while process 0 waited for it at the end of Orbax's restore, until JAX aborted both 5 minutes
    later. Every process now gives the damaged checkpoint's line, naming the intact one."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir", str(run),
           "--config.train.steps=2", "--config.optimizer.warmup_steps=1", "--config.checkpoint.every=1",
           "--num-processes", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

    def both(*args):
        port = _free_port()
        procs = [subprocess.Popen([*cmd, *args, "--coordinator", f"127.0.0.1:{port}", "--process-id", str(i)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        try:
            return [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()

    assert [status for _, status in both()] == [0, 0]
    for shard in (run / "checkpoints" / "2" / "state" / "ocdbt.process_1" / "d").iterdir():  # (fsdp over both)
        shard.write_bytes(b"")
    for err, status in both("--config.train.steps=3"):
        assert status == 2 and "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"llama-jax train: error: checkpoint 2 ({run / 'checkpoints' / '2'}) is damaged: "
                               f"cannot read its state: ") and "empty file(s): state/ocdbt.process_1/d/" in line, line
        assert line.endswith(f"; checkpoint 1 is intact: rerun with --resume-from 1 to continue from it (later "
                             f"checkpoints are moved to {run / 'checkpoints-set-aside'})"), line


@dataclasses.dataclass(frozen=True)
class FakeTpuChip:
    """What jax's mesh_utils reads of a multi-slice TPU device (no TPU needed to lay out a mesh)."""

    id: int
    slice_index: int
    coords: tuple
    platform: str = "tpu"
    device_kind: str = "TPU test"
    process_index: int = 0
    core_on_chip: int = 0


def test_mesh_sizes_may_be_numpy_integers():
    """As other integer arguments may: a NumPy size was refused as not "a positive integer"."""
    from llama_jax.sharding import make_mesh

    assert dict(make_mesh(np.int64(2), np.int64(-1), np.int32(2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match=r"^mesh.tensor=np.int64\(0\): must be a positive integer or -1"):
        make_mesh(1, -1, np.int64(0))


def test_multi_slice_mesh_puts_the_data_axis_across_slices():
    from llama_jax.sharding import make_mesh

    chips = [FakeTpuChip(i, i // 4, (i % 2, i % 4 // 2, 0)) for i in range(8)]  # 2 slices of 2x2 chips
    mesh = make_mesh(2, -1, 2, chips)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert mesh.devices.shape == (2, 2, 2)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()  # fsdp x tensor stay inside a slice (ICI)
    with pytest.raises(ValueError, match="mesh.data=1 must be a multiple of the 2 TPU slices"):
        make_mesh(1, -1, 2, chips)


@pytest.mark.parametrize("slices", [1, 2])
def test_a_tpu_mesh_axis_that_no_torus_axis_matches_is_laid_out(slices):
    """tensor=2 on slices of 4x4 chips (v5e-16; v5p-128 is 4x4x4), whose torus has no axis of 2:
    JAX's layout refused it (NotImplementedError, a traceback), though any mesh of the chips' count
    runs; it now lays the axis along part of one. Whole torus axes are still used where they fit."""
    from llama_jax.sharding import make_mesh

    chips = [FakeTpuChip(s * 16 + i, s, (i % 4, i // 4, 0)) for s in range(slices) for i in range(16)]
    mesh = make_mesh(slices, -1, 2, chips)
    assert mesh.devices.shape == (slices, 8, 2) and len({d.id for d in mesh.devices.flat}) == 16 * slices
    for pair in mesh.devices.reshape(-1, 2):  # tensor neighbours are torus neighbours, in one slice
        (x0, y0, _), (x1, y1, _) = pair[0].coords, pair[1].coords
        assert pair[0].slice_index == pair[1].slice_index and abs(x0 - x1) + abs(y0 - y1) == 1
    whole = make_mesh(1, -1, 4, chips[:16])  # (an axis of 4: one torus axis, as before)
    assert all(len({d.coords[1] for d in row}) == 1 for row in whole.devices.reshape(-1, 4))
