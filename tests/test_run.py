"""Experiment runs end to end: exact resume after SIGKILL, a kill during an asynchronous save,
preemption by SIGTERM, restoring onto another device count, NaN/Inf handling, init_from, bad
input that leaves the workdir as it was, and the demo."""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax import init_params, load_model, save_model
from llama_jax import metrics as metrics_lib
from llama_jax import run as run_lib
from llama_jax.checkpoint import RunCheckpoints
from llama_jax.cli import main
from llama_jax.data import EmbeddedCorpus, StdlibCorpus
from llama_jax.experiment import load_config
from llama_jax.safe_io import DirectoryLock
from llama_jax.tokenizer import train_sentencepiece
from llama_jax.train import build_trainer, global_batch
from tests.run_harness import committed_steps

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
STEPS, EVERY = 12, 4


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    corpus = EmbeddedCorpus()
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    return train_sentencepiece((corpus[i] for i in range(len(corpus))), path, 512)


def run_overrides(tokenizer_path, *extra) -> list[str]:
    """The tiny model on the embedded corpus: 12 steps, every step logged, a checkpoint every 4."""
    return ["data.source=embedded", f"data.tokenizer={tokenizer_path}", "model.vocab_size=512",
            f"train.steps={STEPS}", "train.batch_size=8", "train.log_every=1", "optimizer.warmup_steps=2",
            f"checkpoint.every={EVERY}", "checkpoint.max_to_keep=3", *extra]


def train_args(workdir, overrides) -> list[str]:
    return ["train", "--config", TINY, "--workdir", str(workdir), *[f"--config.{o}" for o in overrides]]


def logged_losses(workdir: Path, from_line: int = 0) -> dict[int, float]:
    """{step: loss} of the metrics.jsonl records from line `from_line` on."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()[from_line:]
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def logged_steps(workdir: Path) -> list[int]:
    """The steps of the training records of metrics.jsonl, in the file's order."""
    return [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def n_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokenizer_path):
    """12 uninterrupted steps: (workdir, {step: loss})."""
    workdir = tmp_path_factory.mktemp("straight")
    assert main(train_args(workdir, run_overrides(tokenizer_path))) == 0
    losses = logged_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    return workdir, losses


def harness(workdir, overrides, **kill) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{k: str(v) for k, v in kill.items()})
    return subprocess.run([sys.executable, "-m", "tests.run_harness", *train_args(workdir, overrides)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_resume_after_sigkill_is_bitwise(tmp_path, tokenizer_path, straight_run):
    _, expected = straight_run
    workdir, overrides = tmp_path / "run", run_overrides(tokenizer_path)
    checkpoints = workdir / "checkpoints"

    first = harness(workdir, overrides, KILL_AFTER_STEP=6)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert committed_steps(checkpoints) == [4]
    assert logged_losses(workdir) == {s: expected[s] for s in range(1, 7)}

    # Killed again, this time while the step-8 checkpoint is being written in the background.
    second = harness(workdir, overrides, KILL_DURING_SAVE=8)
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert committed_steps(checkpoints) == [4], "the interrupted save must not count as a checkpoint"
    # Resumed from 4, bit for bit; the first run's records of steps 5 and 6 were set aside, so the
    # log holds each step once.
    assert logged_steps(workdir) == list(range(1, 9))
    assert logged_losses(workdir) == {s: expected[s] for s in range(1, 9)}
    assert logged_losses(workdir / "checkpoints-set-aside") == {s: expected[s] for s in (5, 6)}

    third = harness(workdir, overrides)
    assert third.returncode == 0, third.stderr
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    assert logged_losses(workdir) == {s: expected[s] for s in range(1, STEPS + 1)}
    assert committed_steps(checkpoints) == [4, 8, 12]
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.isdigit()) == []  # no leftovers
    # TensorBoard too: each resumed run's event file hides the steps its predecessors logged after its checkpoint
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 3
    shown = tensorboard_shows(workdir, "loss")
    assert [step for step, _ in shown] == list(range(1, STEPS + 1))
    assert [loss for _, loss in shown] == pytest.approx([expected[s] for s in range(1, STEPS + 1)], rel=1e-6)


def test_on_a_gcsfuse_mount_a_save_killed_before_its_marker_is_not_resumed(tmp_path, tokenizer_path, straight_run,
                                                                            monkeypatch):
    """A workdir on a bucket mounted with gcsfuse (here a mount table saying so): a directory rename
    there copies object by object, so a step is written in place under its final name and committed
    by a marker written last. A run killed once the step-8 checkpoint is written but its marker is
    not leaves step 8 in place without it: the resume takes step 4, the latest committed, and
    continues bit for bit, each checkpoint ending with its marker."""
    from llama_jax import checkpoint_steps
    from llama_jax.checkpoint_steps import COMMIT_MARKER

    _, expected = straight_run
    workdir, overrides = tmp_path / "run", run_overrides(tokenizer_path)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/root / ext4 rw 0 0\nbucket {tmp_path} fuse.gcsfuse rw,nosuid,nodev 0 0\n")
    monkeypatch.setattr(checkpoint_steps, "MOUNTS_FILE", mounts)  # here as in the run's processes

    killed = harness(workdir, overrides, KILL_BEFORE_MARKER=8, MOUNTS_FILE=mounts)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    step_8 = workdir / "checkpoints" / "8"
    assert (step_8 / "state" / "_METADATA").is_file() and not (step_8 / COMMIT_MARKER).exists()  # not committed
    assert run_lib.committed_steps(workdir) == [4]
    assert json.loads((workdir / run_lib.PROGRESS_FILE).read_text()) == {"committed_step": 4}
    trained = logged_steps(workdir)[-1]  # (the save's last part runs while training goes on)

    resumed = harness(workdir, overrides, MOUNTS_FILE=mounts)
    assert resumed.returncode == 0, resumed.stderr
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    assert logged_losses(workdir) == expected
    assert logged_losses(workdir / "checkpoints-set-aside") == {s: expected[s] for s in range(5, trained + 1)}
    assert run_lib.committed_steps(workdir) == [4, 8, 12]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "4", "8"]
    assert all((workdir / "checkpoints" / step / COMMIT_MARKER).is_file() for step in ("4", "8", "12"))


def test_global_jax_number_settings_and_closed_streams_leave_a_run_as_it_is(tmp_path, tokenizer_path, straight_run):
    """JAX_ENABLE_X64=1 (a common global setting on TPU VMs) and strict dtype promotion are not the
    program's: its run is bitwise the run without them. With x64 the learning-rate schedule was
    computed in float64 (rates, then parameters and losses, apart in their last bits); strict
    promotion failed the first step on an opaque line. Started without standard input and output
    (`<&- >&-`), the command failed on a traceback before doing anything."""
    def rates(workdir: Path) -> dict[int, float]:
        records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}

    workdir, expected = straight_run
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_NUMPY_DTYPE_PROMOTION="strict")
    command = [sys.executable, "-m", "llama_jax.cli", *train_args(tmp_path, run_overrides(tokenizer_path))]
    out = subprocess.run(["sh", "-c", 'exec "$@" <&- >&-', "sh", *command], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert rates(tmp_path) == rates(workdir) and logged_losses(tmp_path) == expected


def test_a_killed_run_has_recorded_its_latest_checkpoint(tmp_path, tokenizer_path, capsys):
    """progress.json names an async save's step once it is committed, not only when the next save
    starts: after a SIGKILL a lost latest checkpoint is noticed, not silently trained again."""
    # killed before the next save starts (which would record the step whatever the commit's timing)
    workdir, overrides = tmp_path / "run", run_overrides(tokenizer_path, "train.steps=40", "checkpoint.every=20")
    killed = harness(workdir, overrides, KILL_AFTER_COMMIT=20)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert committed_steps(workdir / "checkpoints") == [20] and logged_steps(workdir)[-1] < 40
    assert json.loads((workdir / run_lib.PROGRESS_FILE).read_text()) == {"committed_step": 20}
    shutil.rmtree(workdir / "checkpoints" / "20")
    assert main(train_args(workdir, overrides)) == 2
    assert (f"checkpoint 20 of {workdir} is missing (recorded in progress.json as the latest committed step)"
            in capsys.readouterr().err)


def test_the_loop_runs_at_most_steps_ahead_of_the_computation(tmp_path, tokenizer_path, monkeypatch):
    """Between logged steps nothing waits for the device, and JAX's dispatch would let the loop run
    tens of steps ahead: a SIGTERM would then save only once they were all computed (seconds on a
    TPU's short preemption notice). When step n is dispatched, step n - STEPS_AHEAD - 1 is done."""
    from llama_jax.train import Trainer

    dispatched, late = [], []
    step = Trainer.step

    def step_watched(self, state, batch):
        if len(dispatched) > run_lib.STEPS_AHEAD:
            done = all(leaf.is_ready() for leaf in jax.tree.leaves(dispatched[-run_lib.STEPS_AHEAD - 1]))
            late.append(not done)
        out = step(self, state, batch)
        dispatched.append(out[1])
        return out

    monkeypatch.setattr(Trainer, "step", step_watched)
    assert main(train_args(tmp_path / "run", run_overrides(tokenizer_path, "train.steps=24", "train.log_every=24",
                                                           "checkpoint.every=24"))) == 0
    assert len(dispatched) == 24 and not any(late), late


def test_throughput_counts_training_only(tmp_path, tokenizer_path, monkeypatch, capsys):
    """A logged step's tokens/s and MFU cover its window's training steps: the process's first step
    (which compiles) gets no figure, and evaluating or sampling within a window is left out (here the
    run's clock jumps 1,000 s during each: charged to a window of 512 tokens, that would be 0.5 tokens/s)."""
    jump = [0.0]
    monkeypatch.setattr(run_lib, "time", types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + jump[0], monotonic=time.monotonic, sleep=time.sleep))

    def taking_1000_s(work):
        def timed(*args, **kwargs):
            out = work(*args, **kwargs)
            jump[0] += 1000.0
            return out
        return timed

    monkeypatch.setattr(run_lib, "evaluate", taking_1000_s(run_lib.evaluate))
    monkeypatch.setattr(run_lib, "sample", taking_1000_s(run_lib.sample))
    overrides = run_overrides(tokenizer_path, "train.steps=6", "train.eval_every=2", "train.eval_batches=1",
                              "train.sample_every=3", "train.sample_tokens=4", "checkpoint.every=6")
    assert main(train_args(tmp_path / "run", overrides)) == 0
    trained = [r for r in metrics_lib.read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    assert not {"tokens_per_second", "tflops_per_device", "mfu"} & set(trained[0])
    assert all(r["tokens_per_second"] > 100 and r["mfu"] > 0 for r in trained[1:]), trained
    assert re.search(r"^step 1: loss \d+\.\d{4}$", capsys.readouterr().out, re.M)


def test_the_loss_plot_draws_what_its_axis_says(tmp_path, monkeypatch):
    """loss.png's axis says cross-entropy: the training curve is each step's `nll` (the held-out loss
    is one too), not `loss`, which adds train.z_loss's term; a step logged twice (a resume) draws its
    last record."""
    import matplotlib.axes
    import matplotlib.pyplot

    drawn, plot = {}, matplotlib.axes.Axes.plot

    def noting_plot(ax, x, y, *args, label=None, **kwargs):
        drawn[label] = [list(x), list(y)]
        return plot(ax, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", noting_plot)
    with metrics_lib.MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 5.5, "nll": 5.0, "z_loss": 0.5})
        writer.write(2, {"loss": 4.9, "nll": 4.6, "z_loss": 0.3})
        writer.write(2, {"loss": 4.8, "nll": 4.5, "z_loss": 0.3, "eval_loss": 4.7})
    run_lib.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert drawn["train loss"] == [[1, 2], [5.0, 4.5]]
    assert drawn["eval loss"] == [[2], [4.7]]
    assert matplotlib.pyplot.imread(tmp_path / "loss.png").ndim == 3


def test_a_run_holds_only_its_last_logged_step_in_memory(tmp_path, tokenizer_path):
    """Every step logged goes to metrics.jsonl; the run's result holds the records of its last one
    (training and closing evaluation), not a list of every record, which grew by about 1.5 KB per
    logged step for the run's life."""
    workdir = tmp_path / "run"
    result = run_lib.train_and_evaluate(load_config(TINY, run_overrides(tokenizer_path, "train.eval_batches=1")),
                                        workdir, progress=False)
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    assert [r["step"] for r in result.logged] == [STEPS, STEPS]
    assert "loss" in result.logged[0] and "eval_loss" in result.logged[1]


def test_sigterm_saves_the_current_step_and_resume_continues(tmp_path, tokenizer_path, straight_run, monkeypatch,
                                                             capsys):
    _, expected = straight_run
    workdir, overrides = tmp_path / "run", run_overrides(tokenizer_path)
    original, close = metrics_lib.MetricsWriter.write, metrics_lib.MetricsWriter.close

    def write_then_preempt(self, step, record):  # the preemption notice arrives during step 6
        original(self, step, record)
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    def preempt_then_close(self):  # another notice as the run closes its log, its step saved (or its steps done)
        os.kill(os.getpid(), signal.SIGTERM)
        close(self)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "close", preempt_then_close)
    with monkeypatch.context() as m:
        m.setattr(metrics_lib.MetricsWriter, "write", write_then_preempt)
        assert main(train_args(workdir, overrides)) == 0
    assert "preempted: checkpoint saved at step 6" in capsys.readouterr().out
    assert committed_steps(workdir / "checkpoints") == [4, 6]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed afterwards

    # the resume, preempted again during its last step and once that step is done (while it draws
    # the loss plot, closes its log and says its closing line): it ends as a finished run does, with
    # its closing line and its plot, and exits 0
    seen, plot, say = n_lines(workdir / "metrics.jsonl"), run_lib.plot_losses, run_lib.log_line

    def write_last_then_preempt(self, step, record):
        original(self, step, record)
        if step == STEPS and "loss" in record:  # the last step's record, written inside the loop
            os.kill(os.getpid(), signal.SIGTERM)

    def preempt_then_plot(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        plot(*args)

    def preempt_then_say(step, record):  # (the last step's line is the closing one)
        if step == STEPS:
            os.kill(os.getpid(), signal.SIGTERM)
        return say(step, record)

    evaluate, recorded_at_evaluation = run_lib.evaluate, []

    def evaluate_noting_progress(*args, **kwargs):  # the last checkpoint is committed before the closing work,
        # and recorded once its evaluation is logged (progress.json's last step: the run has finished)
        recorded_at_evaluation.append((committed_steps(workdir / "checkpoints")[-1],
                                       json.loads((workdir / run_lib.PROGRESS_FILE).read_text())))
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(metrics_lib.MetricsWriter, "write", write_last_then_preempt)
        m.setattr(run_lib, "plot_losses", preempt_then_plot)
        m.setattr(run_lib, "log_line", preempt_then_say)
        m.setattr(run_lib, "evaluate", evaluate_noting_progress)
        assert main(train_args(workdir, overrides)) == 0
    closing = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(rf"step {STEPS}: loss \d+\.\d{{4}}, [\d,]+ tokens/s, MFU \d+\.\d%; held-out loss \d+\.\d{{4}}; "
                        rf"metrics in {re.escape(str(workdir))}/metrics.jsonl", closing), closing
    assert (workdir / "loss.png").is_file()
    assert recorded_at_evaluation == [(STEPS, {"committed_step": STEPS - EVERY})]
    assert json.loads((workdir / run_lib.PROGRESS_FILE).read_text()) == {"committed_step": STEPS}
    assert logged_losses(workdir, seen) == {s: expected[s] for s in range(7, STEPS + 1)}


def test_a_closing_evaluation_that_fails_loses_no_step(tmp_path, tokenizer_path, monkeypatch, capsys):
    """The last step is saved before the closing evaluation runs (it compiles the evaluation for
    the first time when train.eval_every=0, the likeliest place for a run to fail at its end)."""
    def failing(*args, **kwargs):
        raise ValueError("the evaluation failed")

    monkeypatch.setattr(run_lib, "evaluate", failing)
    workdir = tmp_path / "run"
    assert main(train_args(workdir, run_overrides(tokenizer_path, "train.steps=6"))) == 2
    assert capsys.readouterr().err.strip() == "llama-jax train: error: the evaluation failed"
    assert committed_steps(workdir / "checkpoints") == [4, 6]


def test_a_copy_of_a_step_named_with_a_prefix_is_left_alone(tmp_path, tokenizer_path, capsys):
    """A folder such as checkpoints/backup_8 (a copy made by hand) was listed as step 8, which the
    run's CheckpointManager looked for at checkpoints/8: the resume called checkpoint 8 damaged."""
    workdir = tmp_path / "run"
    assert main(train_args(workdir, run_overrides(tokenizer_path, f"train.steps={EVERY}"))) == 0
    shutil.copytree(workdir / "checkpoints" / str(EVERY), workdir / "checkpoints" / f"backup_{2 * EVERY}")
    assert main(train_args(workdir, run_overrides(tokenizer_path, f"train.steps={2 * EVERY}"))) == 0, \
        capsys.readouterr().err
    assert committed_steps(workdir / "checkpoints") == [EVERY, 2 * EVERY]
    assert (workdir / "checkpoints" / f"backup_{2 * EVERY}" / "state").is_dir()


def next_batch_loss(config, workdir: Path, step: int, devices) -> tuple[float, object]:
    """Restore `step` from `workdir` onto a mesh of `devices`; the loss on the batch of the step after."""
    trainer = build_trainer(config, devices)
    checkpoints = RunCheckpoints(workdir / "checkpoints", EVERY, async_save=False)
    state = checkpoints.restore_state(step, run_lib.abstract_state(trainer))
    checkpoints.close()
    data = run_lib.build_data(config, trainer.model_config, workdir)
    metrics = trainer.eval_metrics(state.params, global_batch(trainer.mesh, data.train_rows(step)))
    return float(metrics["loss"]), state


@pytest.mark.parametrize("saved_on, restored_on", [(8, 1), (1, 8)])
def test_restore_onto_another_device_count(tmp_path, tokenizer_path, straight_run, saved_on, restored_on):
    config = load_config(TINY, run_overrides(tokenizer_path))
    if saved_on == 8:
        workdir, losses = straight_run
    else:
        workdir = tmp_path / "one-device"
        run_lib.train_and_evaluate(config, workdir, progress=False, devices=jax.devices()[:1])
        losses = logged_losses(workdir)
    loss, state = next_batch_loss(config, workdir, 4, jax.devices()[:restored_on])
    assert {d for leaf in jax.tree.leaves(state.params) for d in leaf.sharding.device_set} == \
        set(jax.devices()[:restored_on])
    assert int(state.step) == 4
    # The train loss logged at step 5 is the loss of the step-4 parameters on batch 4.
    np.testing.assert_allclose(loss, losses[5], rtol=1e-5)


def poisoned_data(step_index: int):
    """build_data whose training batch `step_index` holds a token id outside the vocabulary,
    which the embedding lookup turns into NaN (as corrupted data would)."""
    build = run_lib.build_data

    def build_data(config, model, workdir, rows=None):
        data = build(config, model, workdir, rows)
        clean = data.train_rows

        def train_rows(step):
            rows = clean(step)
            if step == step_index:
                rows = dict(rows, tokens=rows["tokens"].copy())
                rows["tokens"][0, 0] = model.vocab_size
            return rows

        data.train_rows = train_rows
        return data

    return build_data


def test_nonfinite_loss_stops_with_the_last_checkpoint_intact(tmp_path, tokenizer_path, straight_run, monkeypatch,
                                                               capsys):
    workdir = tmp_path / "run"
    monkeypatch.setattr(run_lib, "build_data", poisoned_data(5))  # the batch of step 6
    assert main(train_args(workdir, run_overrides(tokenizer_path))) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN/Inf in 1 step(s) up to step 6" in err and "latest checkpoint: 4" in err and "\n" not in err
    assert committed_steps(workdir / "checkpoints") == [4]
    assert run_lib.recorded_step(workdir) == 4  # a lost checkpoint 4 would be noticed at the next start
    config = load_config(TINY, run_overrides(tokenizer_path))
    loss, state = next_batch_loss(config, workdir, 4, jax.devices())
    assert loss == pytest.approx(straight_run[1][5], rel=1e-5)


def test_nonfinite_step_is_skipped_when_configured(tmp_path, tokenizer_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    monkeypatch.setattr(run_lib, "build_data", poisoned_data(5))
    config = load_config(TINY, run_overrides(tokenizer_path, "train.on_nonfinite=skip"))
    result = run_lib.train_and_evaluate(config, workdir, progress=False)
    assert "step 6: skipped 1 step(s)" in capsys.readouterr().out
    losses = logged_losses(workdir)
    assert losses[6] is None and all(np.isfinite(losses[s]) for s in losses if s != 6)  # null: not finite
    assert result.final_step == STEPS and committed_steps(workdir / "checkpoints") == [4, 8, 12]
    _, state = next_batch_loss(config, workdir, STEPS, jax.devices()[:1])
    assert int(state.skipped) == 1
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))


def test_a_preemption_between_checks_does_not_pass_a_nonfinite_step(tmp_path, tokenizer_path, monkeypatch):
    """Finiteness is checked at logged steps and before saves: a preemption save at a step that is
    neither (step 4 here, the NaN at step 3) checks first, so on_nonfinite=stop still stops, and no
    checkpoint carries the skipped step for a resume to take as seen."""
    monkeypatch.setattr(run_lib, "build_data", poisoned_data(2))
    monkeypatch.setattr(RunCheckpoints, "reached_preemption", lambda self, step: step == 4)
    workdir = tmp_path / "run"
    config = load_config(TINY, run_overrides(tokenizer_path, "train.log_every=10", "checkpoint.every=10"))
    with pytest.raises(run_lib.RunError, match=r"NaN/Inf in 1 step\(s\) up to step 4; stopped .* checkpoint: none"):
        run_lib.train_and_evaluate(config, workdir, progress=False)
    assert committed_steps(workdir / "checkpoints") == []


def test_init_from_a_model_of_other_rotary_settings_says_so(tmp_path, tokenizer_path, capsys):
    """A fine-tune may choose rope_theta anew (to extend the context): it runs, and says what the
    model was trained with, so that a preset's value taken by mistake is seen."""
    cfg = build_trainer(load_config(TINY, run_overrides(tokenizer_path, "model.rope_theta=500000.0"))).model_config
    save_model(tmp_path / "model", cfg, init_params(cfg, 0), tokenizer=tokenizer_path)
    capsys.readouterr()
    assert main(train_args(tmp_path / "run", run_overrides(tokenizer_path, "train.steps=1", "optimizer.warmup_steps=0",
                                                           f"checkpoint.init_from={tmp_path / 'model'}"))) == 0
    out = capsys.readouterr().out
    assert (f"checkpoint.init_from={tmp_path / 'model'} was trained with rope_theta=500000.0 (this run: 10000.0); "
            f"model.preset=init_from takes the model's own") in out
    assert "comes with a tokenizer" not in out  # its tokenizer is the run's


def test_a_resume_given_another_init_from_says_it_is_not_read(tmp_path, tokenizer_path, capsys):
    """A resumed run continues from its checkpoint: another init_from given then was listed among the
    changed settings, and config.json named it, as if the weights had come from it."""
    cfg = build_trainer(load_config(TINY, run_overrides(tokenizer_path))).model_config
    save_model(tmp_path / "model", cfg, init_params(cfg, 0), tokenizer=tokenizer_path)
    shutil.copytree(tmp_path / "model", tmp_path / "other")
    for steps, init_from in ((1, "model"), (2, "other")):
        assert main(train_args(tmp_path / "run", run_overrides(
            tokenizer_path, f"train.steps={steps}", "optimizer.warmup_steps=0",
            f"checkpoint.init_from={tmp_path / init_from}"))) == 0
    out = capsys.readouterr().out
    assert (f"checkpoint.init_from={tmp_path / 'other'} is not read: the run continues from its checkpoint 1, which "
            f"began from checkpoint.init_from={tmp_path / 'model'}; config.json keeps that") in out
    assert "checkpoint.init_from '" not in out  # not among the settings changed
    assert json.loads((tmp_path / "run" / "config.json").read_text())["checkpoint"]["init_from"] == \
        str(tmp_path / "model")


def test_a_start_again_keeps_the_generation_files_of_its_own_init_from(tmp_path, tokenizer_path):
    """A run stopped before its first checkpoint and started again from another model: the end ids
    its export writes are the second model's (the first's, kept at the first start, stayed)."""
    cfg = build_trainer(load_config(TINY, run_overrides(tokenizer_path))).model_config
    for name, end in (("first", 5), ("second", 9)):
        save_model(tmp_path / name, cfg, init_params(cfg, 0), tokenizer=tokenizer_path)
        (tmp_path / name / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, end]}))
    run = tmp_path / "run"
    for init_from in ("first", "second"):
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # as if stopped before its first checkpoint
        (run / "progress.json").unlink(missing_ok=True)
        assert main(train_args(run, run_overrides(tokenizer_path, "train.steps=1", "optimizer.warmup_steps=0",
                                                  f"checkpoint.init_from={tmp_path / init_from}"))) == 0
        assert json.loads((run / "tokenizer_files" / "generation_config.json").read_text()) == \
            json.loads((tmp_path / init_from / "generation_config.json").read_text())


def test_init_from_preset_with_its_own_rotary_setting_says_which_key_takes_the_models(tmp_path, tokenizer_path,
                                                                                        capsys):
    """With model.preset=init_from, a rotary setting differs from the model's only because the
    config sets it: the line names that key to unset, not the preset already in use."""
    cfg = build_trainer(load_config(TINY, run_overrides(tokenizer_path))).model_config
    save_model(tmp_path / "model", cfg, init_params(cfg, 0), tokenizer=tokenizer_path)
    shape = [f"model.{field}=None" for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                                   "max_seq_len")]
    capsys.readouterr()
    assert main(train_args(tmp_path / "run", run_overrides(
        tokenizer_path, "train.steps=1", "optimizer.warmup_steps=0", f"checkpoint.init_from={tmp_path / 'model'}",
        "model.preset=init_from", *shape, "model.rope_theta=500000.0"))) == 0
    assert (f"checkpoint.init_from={tmp_path / 'model'} was trained with rope_theta=10000.0 (this run: 500000.0); "
            f"model.rope_theta=None takes the model's own") in capsys.readouterr().out


def test_init_from_a_model_of_another_tokenizer_says_so(tmp_path, tokenizer_path, capsys):
    """The model's token ids stand for other text with another tokenizer (a new vocabulary may be
    meant, the wrong file is more likely): it runs, and says so."""
    corpus = EmbeddedCorpus()
    other = train_sentencepiece([corpus[i] for i in range(0, len(corpus), 2)], tmp_path / "other.model", 512)
    cfg = build_trainer(load_config(TINY, run_overrides(tokenizer_path))).model_config
    save_model(tmp_path / "model", cfg, init_params(cfg, 0), tokenizer=other)
    capsys.readouterr()
    assert main(train_args(tmp_path / "run", run_overrides(tokenizer_path, "train.steps=1", "optimizer.warmup_steps=0",
                                                           f"checkpoint.init_from={tmp_path / 'model'}"))) == 0
    assert (f"checkpoint.init_from={tmp_path / 'model'} comes with a tokenizer other than this run's "
            f"(data.tokenizer={tokenizer_path}): its token ids stand for other text here; to fine-tune "
            f"it on its own vocabulary, give data.tokenizer={tmp_path / 'model' / 'tokenizer.model'}") in \
        capsys.readouterr().out


@pytest.mark.parametrize("saved_scanned, run_scanned", [(True, True), (True, False), (False, True), (False, False)])
def test_init_from_a_model_directory(tmp_path, tokenizer_path, saved_scanned, run_scanned):
    """In either layer layout, whichever layout the model was saved from."""
    config = load_config(TINY, run_overrides(tokenizer_path, "train.steps=1", "optimizer.warmup_steps=0",
                                             f"model.scan_layers={run_scanned}"))
    trainer = build_trainer(config, jax.devices()[:1])
    saved = trainer.model_config.replace(scan_layers=saved_scanned)
    model_dir = save_model(tmp_path / "model", saved, init_params(saved, 123))
    data = run_lib.build_data(config, trainer.model_config, tmp_path)  # prepared into a temporary directory
    try:
        _, params = load_model(model_dir, scan_layers=run_scanned)
        expected = float(trainer.eval_metrics(params, global_batch(trainer.mesh, data.train_rows(0)))["loss"])
    finally:
        data.discard()

    config.checkpoint.init_from = str(model_dir)
    run_lib.train_and_evaluate(config, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert logged_losses(tmp_path / "run")[1] == pytest.approx(expected, rel=1e-5)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("case, message", [
    ("missing tokenizer", "no such file"),
    ("corrupt tokenizer", "neither a SentencePiece model nor a tiktoken rank file"),
    ("another tokenizer on resume", "differs from the tokenizer this run started with"),
    ("empty dataset", "holds no non-empty document"),
    ("other data on resume", r"run/data \(the data this run started with\) was prepared with data.files=None, "
                             r"not \['.*empty.txt'\]; use the run's data settings \(its config.json\) or another "
                             r"--workdir"),
    ("seq_len too long", "train.seq_len=256 exceeds the model's max_seq_len=128"),
    ("other model shape", "holds a model with dim=64, but the config asks for dim=96"),
    ("other optimizer",
     r"holds an optimizer state that does not fit .* \(changed: optimizer.name='lion' \(the run's: 'adamw'\)\)"),
    ("missing init_from", "checkpoint.init_from: .* is not a llama_jax model directory"),
    ("init_from of another shape", "checkpoint.init_from=.* holds a model with n_layers=3"),
    ("init_from preset under the config's own shape",
     r"holds a model with n_layers=3, but the config asks for n_layers=2; model.preset=init_from is set, but the "
     r"config also sets model.vocab_size, model.dim, model.n_layers, .* set them to None \(e.g. "
     r"--config.model.vocab_size=None\)"),
    ("init_from end ids beyond its vocabulary", r"checkpoint.init_from: \S+/generation_config.json: eos_token_id "
                                                r"100000 is not a token id of this model \(vocab_size 512\)$"),
    ("init_from vocabulary below the tokenizer's",  # (its advice, a model.vocab_size of 512, was then refused)
     r"the tokenizer has 512 tokens but the model's vocab_size is 400; a fine-tune keeps the vocabulary of "
     r"checkpoint.init_from=\S+, so give data.tokenizer the tokenizer that model was trained with$"),
    ("other param dtype on resume", r"holds float32 parameters, but the config asks for model.param_dtype=bfloat16: "
                                    r"the run's master weights would be cast; resume with model.param_dtype=float32 "
                                    r"or use another --workdir"),
    ("other layer layout on resume", r"holds parameters with model.scan_layers=True, not False"),
    ("other batch size on resume", r"trained with train.batch_size=8, not 16: the run's place in each epoch"),
    ("sample longer than the model", r"train.sample_prompt \(\d+ tokens with BOS\) \+ train.sample_tokens \(127\) = "
                                     r"\d+ exceeds the model's max_seq_len \(128\)"),
    ("metrics log a directory", r"run/metrics.jsonl is not a file; a run appends its metrics there"),
    ("loss plot a directory", r"run/loss.png is not a file; a run plots its losses there"),
    ("profile directory a file", r"run/profile is a file; train.profile_steps writes its traces into that "
                                 r"directory, so move the file away or set train.profile_steps=0"),
    ("workdir path not UTF-8", r"run\\xff: its path holds the byte 0xff, which is not UTF-8; checkpoints are read "
                               r"and written only at UTF-8 paths, so rename the directory or give another --workdir$"),
    ("new workdir path not UTF-8", r"fresh\\xfe: its path holds the byte 0xfe, which is not UTF-8"),
])
def test_bad_input_is_one_line_and_leaves_the_workdir_alone(tmp_path, tokenizer_path, straight_run, capsys,
                                                            case, message):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(os.urandom(2000))
    (tmp_path / "empty.txt").write_text("")
    other = tmp_path / "other-model"
    if case.startswith("init_from"):
        shape = {"init_from end ids beyond its vocabulary": [],
                 "init_from vocabulary below the tokenizer's": ["model.vocab_size=400"]}.get(case, ["model.n_layers=3"])
        cfg = build_trainer(load_config(TINY, run_overrides(tokenizer_path, *shape))).model_config
        save_model(other, cfg, init_params(cfg, 0))
    if case == "init_from end ids beyond its vocabulary":  # (it trained, then the run's export refused them)
        (other / "generation_config.json").write_text('{"eos_token_id": 100000}\n')
    extra = {
        "missing tokenizer": [f"data.tokenizer={tmp_path / 'nope.model'}"],
        "corrupt tokenizer": [f"data.tokenizer={corrupt}"],
        "another tokenizer on resume": [f"data.tokenizer={corrupt}"],
        "empty dataset": ["data.source=text", f"data.files=['{tmp_path / 'empty.txt'}']"],
        "other data on resume": ["data.source=text", f"data.files=['{tmp_path / 'empty.txt'}']"],
        "seq_len too long": ["train.seq_len=256"],
        "other model shape": ["model.dim=96", "model.ffn_dim=256"],
        "other optimizer": ["optimizer.name=lion"],
        "missing init_from": [f"checkpoint.init_from={tmp_path / 'nope'}"],
        "init_from of another shape": [f"checkpoint.init_from={other}"],
        "init_from preset under the config's own shape": [f"checkpoint.init_from={other}", "model.preset=init_from"],
        "init_from end ids beyond its vocabulary": [f"checkpoint.init_from={other}"],
        "init_from vocabulary below the tokenizer's": [f"checkpoint.init_from={other}", "model.vocab_size=400"],
        "other param dtype on resume": ["model.param_dtype=bfloat16"],
        "other layer layout on resume": ["model.scan_layers=False"],
        "other batch size on resume": ["train.batch_size=16"],
        "sample longer than the model": ["train.sample_tokens=127", "train.sample_prompt=def"],
        "metrics log a directory": [],
        "loss plot a directory": [f"train.steps={STEPS + 2}"],  # steps left to train
        "profile directory a file": ["train.profile_steps=2", f"train.profile_start={STEPS + 2}",
                                     f"train.steps={STEPS + 3}"],  # a window to trace after the first step
        "workdir path not UTF-8": [f"train.steps={STEPS + 2}"],
        "new workdir path not UTF-8": [],  # (it trained, then its first save failed with a traceback)
    }[case]
    if case == "profile directory a file":
        (workdir / "profile").write_text("notes\n")
    if case in ("metrics log a directory", "loss plot a directory"):  # (each failed with a raw errno line once
        name = "metrics.jsonl" if case.startswith("metrics") else "loss.png"  # the run had trained)
        (workdir / name).unlink()
        (workdir / name).mkdir()
    if case in ("corrupt tokenizer", "empty dataset", "missing init_from", "init_from of another shape",
                "init_from preset under the config's own shape", "init_from end ids beyond its vocabulary",
                "init_from vocabulary below the tokenizer's", "sample longer than the model"):  # a new run
        workdir = tmp_path / "fresh"
        workdir.mkdir()
    if case == "workdir path not UTF-8":
        workdir = workdir.rename(tmp_path / os.fsdecode(b"run\xff"))
    if case == "new workdir path not UTF-8":
        workdir = tmp_path / os.fsdecode(b"fresh\xfe")
    before = snapshot(workdir)
    capsys.readouterr()
    assert main(train_args(workdir, run_overrides(tokenizer_path, *extra))) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("llama-jax train: error:")
    assert re.search(message, err), err
    assert snapshot(workdir) == before


def test_a_run_at_a_path_that_is_not_utf8_is_not_called_damaged(tmp_path, straight_run, capsys):
    """Checkpoints are read through TensorStore, which takes only UTF-8 paths: a run's directory
    whose name holds another byte is named as such (its checkpoint was said to be damaged)."""
    workdir = tmp_path / os.fsdecode(b"run\xff")
    shutil.copytree(straight_run[0], workdir)
    capsys.readouterr()
    assert main(["export", "--workdir", str(workdir), str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax export: error: --workdir {tmp_path}/run\\xff: its path holds the byte 0xff, which is not UTF-8; "
        f"checkpoints are read and written only at UTF-8 paths, so rename the directory or give another --workdir")
    assert not (tmp_path / "model").exists()
    # nor a model directory written at such a path (the write failed in a traceback, leaving a temporary folder)
    assert main(["export", "--workdir", str(straight_run[0]), str(tmp_path / os.fsdecode(b"model\xfe"))]) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax export: error: destination {tmp_path}/model\\xfe: its path holds the byte 0xfe, which is not "
        f"UTF-8; checkpoints are read and written only at UTF-8 paths, so rename the directory or give another "
        f"destination")
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir.name]
    # and one moved to such a path is named so when read (it was called damaged)
    assert main(["export", "--workdir", str(straight_run[0]), str(tmp_path / "model")]) == 0
    model = (tmp_path / "model").rename(tmp_path / os.fsdecode(b"model\xfd"))
    capsys.readouterr()
    assert main(["generate", str(model), "--prompt", "a", "--max-new-tokens", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax generate: error: model directory {tmp_path}/model\\xfd: its path holds the byte 0xfd, which is not "
        f"UTF-8; checkpoints are read and written only at UTF-8 paths, so rename the directory or give another model "
        f"directory")


def test_the_demo_summary_leaves_out_skipped_steps(tmp_path):
    """A step train.on_nonfinite=skip passed over is logged with a null loss; the demo's closing
    summary averages the others (it stopped on a TypeError, the run trained)."""
    from llama_jax.demo import summary_lines

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": null}\n'
                                            '{"step": 3, "loss": 1.0, "tokens_per_second": 10.0, "mfu": 0.5}\n')
    assert summary_lines(types.SimpleNamespace(eval=None), tmp_path, None) == [
        "train loss 1.500 nats/token (mean of the last 2 logged steps); 10 tokens/s, MFU 50.0%, epoch 0.00"]


def tensorboard_events(path: Path) -> list:
    """The `Event` protobufs of a TensorBoard event file (TFRecord framing: 8-byte length, 4-byte
    CRC, the event, 4-byte CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


def tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} read back from a TensorBoard event file."""
    scalars = {}
    for event in tensorboard_events(path):
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def tensorboard_shows(workdir: Path, tag: str) -> list[tuple[int, float]]:
    """The (step, value) points of `tag` TensorBoard shows from a workdir's event files, read in the
    order they were written: a session's start at step T hides what earlier files logged from T on."""
    from tensorboardX.proto.event_pb2 import SessionLog

    shown = []
    for path in sorted(workdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        for event in tensorboard_events(path):
            if event.session_log.status == SessionLog.START:
                shown = [(step, value) for step, value in shown if step < event.step]
            shown += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return shown


def test_a_run_resumed_within_the_same_second_keeps_the_first_ones_tensorboard_events(tmp_path, monkeypatch):
    """TensorBoard event files are named by the second they are made in: the writer of a run resumed
    in that same second (in one process) wrote over the first writer's file, losing its steps."""
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # both writers made in one second
    with metrics_lib.MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 2.0})
        writer.write(2, {"loss": 1.5})
    with metrics_lib.MetricsWriter(tmp_path, first_step=2) as writer:  # resumed from step 1
        writer.write(2, {"loss": 1.25})
    monkeypatch.undo()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert tensorboard_shows(tmp_path, "loss") == [(1, 2.0), (2, 1.25)]


def test_demo_runs_resumes_and_reports(tmp_path, capsys):
    """A shortened demo end to end: every artifact exists and loads, the closing summary's figures
    are those of metrics.jsonl, and the exported Hugging Face directory computes the same logits."""
    import torch
    import transformers

    workdir = tmp_path / "demo"
    args = ["demo", "--workdir", str(workdir), "--config.train.steps=40", "--config.train.eval_every=20",
            "--config.train.log_every=10", "--config.train.sample_every=0", "--config.optimizer.warmup_steps=5",
            "--config.data.tokenizer_vocab_size=512", "--config.model.vocab_size=512", "--config.checkpoint.every=20",
            "--config.train.batch_size=8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in metrics if "loss" in r][-5:]
    train_line = next(x for x in out.splitlines() if x.startswith("train loss"))
    assert train_line.startswith(f"train loss {sum(r['loss'] for r in trained) / len(trained):.3f} nats/token")
    assert f"{trained[-1]['tokens_per_second']:,.0f} tokens/s, MFU {trained[-1]['mfu']:.1%}" in train_line
    evaluated = [r for r in metrics if "eval_loss" in r]
    held_line = next(x for x in out.splitlines() if x.startswith("held-out loss"))
    assert held_line.startswith(f"held-out loss {evaluated[-1]['eval_loss']:.3f} nats/token")
    model_ppl, unigram_ppl = (float(w) for w in re.findall(r"(?:perplexity|baseline) ([\d.]+)", held_line))
    assert model_ppl == pytest.approx(evaluated[-1]["eval_perplexity"], abs=0.05) and model_ppl < unigram_ppl
    for name in ("tokenizer.model", "config.json", "metrics.jsonl", "loss.png", "data/manifest.json"):
        assert (workdir / name).is_file(), name
    fingerprint = StdlibCorpus().sha256  # of this interpreter's standard library: in the data and the run info
    assert json.loads((workdir / "data" / "manifest.json").read_text())["corpus_sha256"] == fingerprint
    assert RunCheckpoints(workdir / "checkpoints", 20, read_only=True).run_info(40)["corpus_sha256"] == fingerprint
    scalars = tensorboard_scalars(next(workdir.glob("events.out.tfevents.*")))
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu", "epoch", "eval_loss"):
        assert scalars[tag] == [(r["step"], pytest.approx(r[tag])) for r in metrics if tag in r], tag
    assert committed_steps(workdir / "checkpoints") == [20, 40]
    assert "sample (temperature 0.8, top-k 40): def" in out
    greedy = out.split("--temperature 0`:\n", 1)[1].split("\n\nworkdir:", 1)[0]
    assert greedy.startswith("def") and len(greedy) > 10

    # the exports: the model directory, and the Hugging Face directory computing the same logits
    cfg, params = load_model(workdir / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf").eval()
    tokens = np.arange(3, 35, dtype=np.int32)[None]
    with torch.no_grad():
        expected = hf(torch.from_numpy(tokens).long()).logits.numpy()
    from llama_jax import LLaMA

    np.testing.assert_allclose(np.asarray(LLaMA(cfg).apply({"params": params}, tokens)), expected, atol=1e-4)
    assert f'from_pretrained("{workdir / "hf"}")' in out

    (workdir / "model" / "eval.json").write_text("{}")  # as `llama-jax eval runs/demo/model` leaves it
    events = sorted(workdir.glob("events.out.tfevents.*"))
    assert main(args) == 0  # the finished run resumes at its last step and reports the same evaluation
    out = capsys.readouterr().out
    assert held_line in out.splitlines()
    assert "exported earlier, the final checkpoint:" in out  # the exports of step 40 are kept, with what was added
    assert (workdir / "model" / "eval.json").is_file() and sorted(workdir.glob("events.out.tfevents.*")) == events
    assert main([a.replace("steps=40", "steps=45") for a in args]) == 0  # trained further: exported again
    assert "\nexported the final checkpoint:" in capsys.readouterr().out
    assert not (workdir / "model" / "eval.json").exists()
    assert not np.array_equal(load_model(workdir / "model")[1]["final_norm"]["scale"], params["final_norm"]["scale"])


def test_a_resumed_demo_does_not_read_its_init_from_directory(tmp_path, monkeypatch):
    """As with train, a demo's checkpoint.init_from is read to start its run, not to resume it: a
    resume gets past the config check when the directory is gone."""
    from llama_jax.demo import run_demo

    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {}, "train": {}, "checkpoint": {}}))  # a run's

    class Resumed(Exception):
        pass

    def resume(*args, **kwargs):
        raise Resumed

    monkeypatch.setattr(run_lib, "train_and_evaluate", resume)
    with pytest.raises(Resumed):
        run_demo(workdir, [f"checkpoint.init_from={tmp_path / 'gone'}"])


def test_the_demo_fits_its_greedy_continuation_and_reports_its_failure(tmp_path, monkeypatch, capsys):
    """A model whose context has no room for 64 new tokens after the prompt gets fewer (the demo
    used to ask for 64 and, when generate refused, still exit 0); a failing generate fails the demo."""
    from llama_jax import cli

    args = ["demo", "--workdir", str(tmp_path / "demo"), "--config.data.source=embedded",
            "--config.data.tokenizer_vocab_size=400", "--config.model.vocab_size=400", "--config.model.dim=32",
            "--config.model.n_layers=1", "--config.model.ffn_dim=64", "--config.model.max_seq_len=32",
            "--config.train.seq_len=16", "--config.train.batch_size=8", "--config.train.steps=2",
            "--config.train.log_every=1", "--config.train.eval_every=2", "--config.train.eval_batches=1",
            "--config.train.sample_every=0", "--config.train.sample_tokens=4", "--config.optimizer.warmup_steps=1",
            "--config.checkpoint.every=2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    asked = int(re.search(r"--temperature 0 --max-new-tokens (\d+)`:", out).group(1))
    assert 1 <= asked < 64 and "llama-jax generate: error" not in out
    greedy = out.split("`:\n", 1)[1].split("\n\nworkdir:", 1)[0]
    assert greedy.startswith("def") and len(greedy) > len("def")

    # trained further, with a file of the user's in the Hugging Face export: refused before it trains (it was
    # refused once the run had trained, 500 steps of the default demo), and so before either export is replaced
    hf, model = tmp_path / "demo" / "hf", tmp_path / "demo" / "model"
    (hf / "notes.txt").write_text("mine")
    exported = (model / "model_config.json").stat().st_mtime_ns
    metrics = (tmp_path / "demo" / "metrics.jsonl").read_bytes()
    further = [a.replace("steps=2", "steps=4") for a in args]
    assert main(further) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax demo: error: {hf} holds 'notes.txt', which is not part of a Hugging Face model directory; "
        f"the demo replaces {hf} with its export of the final checkpoint: move 'notes.txt' out of it, or give the "
        f"demo another --workdir")
    assert (model / "model_config.json").stat().st_mtime_ns == exported and (hf / "notes.txt").read_text() == "mine"
    assert committed_steps(tmp_path / "demo" / "checkpoints") == [2]
    assert (tmp_path / "demo" / "metrics.jsonl").read_bytes() == metrics
    (hf / "notes.txt").unlink()
    hf.rename(tmp_path / "hf-moved")
    hf.symlink_to(tmp_path / "hf-moved")  # a link in its place: refused as well, before model/ is replaced
    assert main(further) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax demo: error: {hf} is a link, not the Hugging Face model directory the demo wrote; the demo "
        f"replaces {hf} with its export of the final checkpoint: move it away, or give the demo another --workdir")
    assert (model / "model_config.json").stat().st_mtime_ns == exported
    assert committed_steps(tmp_path / "demo" / "checkpoints") == [2]
    hf.unlink()
    assert main(further) == 0 and "\nexported the final checkpoint:" in capsys.readouterr().out

    def refusing(args):
        raise cli.UserError("the model cannot generate")

    monkeypatch.setattr(cli, "cmd_generate", refusing)  # the finished demo again: it reports, exports, generates
    assert main(further) == 2
    assert capsys.readouterr().err.strip() == "llama-jax generate: error: the model cannot generate"


def test_the_steps_a_resume_deletes_are_those_up_to_its_resume_from(tmp_path, monkeypatch):
    """--resume-from moves the later checkpoints aside: the step directories the next save deletes,
    which must be writable, are counted among the steps up to it (step 2 here, not deleted by a
    resume from 4 with max_to_keep=3, but by a resume from the latest)."""
    from ml_collections import ConfigDict

    for step in (2, 4, 6, 8):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    access = os.access
    monkeypatch.setattr(run_lib.os, "access", lambda path, mode: Path(path).name != "2" and access(path, mode))
    checkpoint = ConfigDict({"max_to_keep": 3, "keep_every": 0})
    run_lib._check_run_writable(tmp_path, checkpoint, resume_from=4)
    with pytest.raises(run_lib.RunError, match=f"no permission to write {tmp_path / 'checkpoints' / '2'}"):
        run_lib._check_run_writable(tmp_path, checkpoint)


def test_a_run_stopped_once_its_resume_from_set_steps_aside_resumes_from_that_step(tmp_path, tokenizer_path,
                                                                                     straight_run, monkeypatch):
    """A --resume-from run preempted after moving the later checkpoints aside, before its first save:
    the plain command then continues from the step resumed from (it said the step moved aside was
    missing, and to resume from the step that was just resumed from)."""
    straight, expected = straight_run
    workdir, overrides = tmp_path / "run", run_overrides(tokenizer_path)
    shutil.copytree(straight, workdir)

    def preempted(*args):
        raise KeyboardInterrupt  # (where a preemption's SIGKILL would stop the process)

    with monkeypatch.context() as m:
        m.setattr(run_lib, "_write_run_config", preempted)
        with pytest.raises(KeyboardInterrupt):
            run_lib.train_and_evaluate(load_config(TINY, overrides), workdir, progress=False, resume_from=4)
    assert committed_steps(workdir / "checkpoints") == [4]
    assert main(train_args(workdir, overrides)) == 0
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    assert logged_losses(workdir) == expected


def test_a_run_this_user_may_not_write_is_refused_before_training(tokenizer_path, straight_run):
    """Permissions, as an unprivileged user (root may write anything): a resume that could not save
    its checkpoints, or delete the old ones, is refused before a step is trained; a checkpoint it
    may not read is said to be that, not damaged (whose advice would set a good checkpoint aside)."""
    base = Path(tempfile.mkdtemp(prefix="llama-jax-permissions-"))  # (tmp_path's parents are root's alone)
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    try:
        workdir, tokenizer = base / "run", base / "tokenizer.model"
        shutil.copytree(straight_run[0], workdir)
        shutil.copy(tokenizer_path, tokenizer)
        for path in [base, *base.rglob("*")]:
            os.chown(path, 65534, 65534) if as_user else None
        env = {**os.environ, "HOME": str(base), "TMPDIR": str(base), "JAX_PLATFORMS": "cpu"}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env.pop("XLA_FLAGS", None)
        before = snapshot(workdir)

        def refusal() -> str:
            out = subprocess.run([*as_user, sys.executable, "-m", "llama_jax.cli",
                                  *train_args(workdir, run_overrides(tokenizer, f"train.steps={STEPS + 4}"))],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
            assert snapshot(workdir) == before
            return out.stderr

        for path in (workdir / "checkpoints", workdir / "checkpoints" / "4"):  # 4: the next the retention deletes
            path.chmod(0o555)
            assert f"no permission to write {path}, which the run writes or deletes" in refusal()
            path.chmod(0o755)
        (workdir / "checkpoints" / "12" / "state" / "manifest.ocdbt").chmod(0)
        message = refusal()
        assert (f"checkpoint 12 ({workdir / 'checkpoints' / '12'}) cannot be read: no permission to read "
                f"{workdir / 'checkpoints' / '12' / 'state' / 'manifest.ocdbt'}; fix its permissions") in message
        assert "damaged" not in message and "--resume-from" not in message
        (workdir / "checkpoints" / "12" / "state" / "manifest.ocdbt").chmod(0o644)

        # a step directory nothing will delete (no max_to_keep) may be read-only: the run continues
        (workdir / "checkpoints" / "4").chmod(0o555)
        out = subprocess.run([*as_user, sys.executable, "-m", "llama_jax.cli", *train_args(
            workdir, run_overrides(tokenizer, f"train.steps={STEPS + 4}", "checkpoint.max_to_keep=None"))],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert committed_steps(workdir / "checkpoints") == [4, 8, 12, 16]
    finally:
        shutil.rmtree(base)


def test_rerunning_a_finished_run_says_so_and_trains_nothing(tmp_path, tokenizer_path, straight_run, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    log, steps = (workdir / "metrics.jsonl").read_text(), sorted(p.name for p in (workdir / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(train_args(workdir, run_overrides(tokenizer_path))) == 0
    out = capsys.readouterr().out
    assert f"{workdir} already holds step {STEPS} of train.steps={STEPS}: nothing left to train" in out
    held_out = next(r["eval_loss"] for r in map(json.loads, log.splitlines())
                    if r["step"] == STEPS and "eval_loss" in r)
    assert f"; held-out loss {held_out:.4f}; metrics in " in out  # the closing evaluation the log holds
    assert (workdir / "metrics.jsonl").read_text() == log
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps

    # stopped after its last checkpoint, before its closing evaluation was logged: the rerun logs it
    assert json.loads(log.splitlines()[-1]).keys() >= {"step", "eval_loss"}
    (workdir / "metrics.jsonl").write_text("".join(log.splitlines(keepends=True)[:-1]))
    assert main(train_args(workdir, run_overrides(tokenizer_path))) == 0
    assert (workdir / "metrics.jsonl").read_text() == log

    # other settings with nothing left to train: not applied, and config.json keeps the run's own
    ran_with = (workdir / "config.json").read_text()
    capsys.readouterr()
    assert main(train_args(workdir, run_overrides(tokenizer_path, "optimizer.lr=0.1"))) == 0
    assert ("nothing is left to train, so config.json keeps the settings the run ran with, not these changed since "
            "checkpoint 12: optimizer.lr 0.003 -> 0.1") in capsys.readouterr().out
    assert (workdir / "config.json").read_text() == ran_with
    # and its closing evaluation is the one logged with the run's settings, not one made with these
    logged_eval = json.loads(log.splitlines()[-1])
    result = run_lib.train_and_evaluate(load_config(TINY, run_overrides(tokenizer_path, "train.eval_batches=1")),
                                        workdir, progress=False)
    assert result.eval == {k: v for k, v in logged_eval.items() if k.startswith("eval_")}
    assert (workdir / "metrics.jsonl").read_text() == log

    # continued with other settings: the run says which, since config.json now holds the new ones
    capsys.readouterr()
    assert main(train_args(workdir, run_overrides(tokenizer_path, f"train.steps={STEPS + 2}",
                                                  "optimizer.lr=0.001"))) == 0
    assert (f"resuming from checkpoint {STEPS} with settings changed since it was saved: optimizer.lr 0.003 -> 0.001, "
            f"train.steps {STEPS} -> {STEPS + 2}; the learning-rate schedule is recomputed over the new train.steps"
            in capsys.readouterr().out)


def test_a_closing_evaluation_made_with_nothing_left_to_train_is_the_runs_own(tmp_path, tokenizer_path,
                                                                              straight_run, capsys):
    """A run stopped after its last checkpoint, before its closing evaluation was logged, rerun with
    other held-out settings: config.json keeps the run's, and so does the evaluation the rerun logs
    (it covered the rerun's train.eval_batches, 8 windows of the run's 32)."""
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    log = (workdir / "metrics.jsonl").read_text()
    (workdir / "metrics.jsonl").write_text("".join(log.splitlines(keepends=True)[:-1]))
    capsys.readouterr()
    assert main(train_args(workdir, run_overrides(tokenizer_path, "train.eval_batches=1"))) == 0
    assert "config.json keeps the settings the run ran with, not these changed since checkpoint 12: " \
        "train.eval_batches 4 -> 1" in capsys.readouterr().out
    assert (workdir / "metrics.jsonl").read_text() == log


def test_a_resume_on_another_mesh_with_more_grad_accum_continues_the_run_and_names_its_held_out_subset(
        tmp_path, tokenizer_path, straight_run, capsys):
    """A resume on another mesh (8-way fsdp -> fsdp 4 x tensor 2) with grad_accum 2, as on a
    slice with less memory: the same batches, learning rates and losses up to float rounding; its
    held-out evaluations (train.eval_batches micro-batches) cover half the rows, and it says so."""
    straight, expected = straight_run
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    overrides = run_overrides(tokenizer_path, "mesh.fsdp=4", "mesh.tensor=2", "train.grad_accum=2")
    capsys.readouterr()
    assert main([*train_args(workdir, overrides), "--resume-from", "8"]) == 0
    assert ("train.grad_accum 1 -> 2; held-out evaluations now cover up to 16 rows of held-out windows, not up to 32 "
            "(train.eval_batches micro-batches of train.batch_size / train.grad_accum rows), so their losses are of "
            "another subset than the earlier ones; train.eval_batches=8 keeps the run's 32") in capsys.readouterr().out
    resumed = logged_losses(workdir)
    np.testing.assert_allclose([resumed[s] for s in range(9, STEPS + 1)], [expected[s] for s in range(9, STEPS + 1)],
                               rtol=1e-5)
    evaluated = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_tokens"] for r in evaluated if "eval_tokens" in r] == [16 * 64]  # 16 windows of 64 targets
    assert json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])["eval_tokens"] == 32 * 64

    # the same subset as before (eval_batches raised with grad_accum), or the whole held-out set: nothing to say
    config = load_config(TINY, [*overrides, "train.eval_batches=8"])
    saved = json.loads(load_config(TINY, run_overrides(tokenizer_path)).to_json_best_effort())
    assert run_lib._held_out_change(saved, config) == ""
    saved["train"]["eval_batches"] = -1
    assert run_lib._held_out_change(saved, load_config(TINY, [*overrides, "train.eval_batches=-1"])) == ""


def test_a_setting_changed_to_or_from_a_dict_is_named():
    """A dict is compared by its entries; one on a single side (None <-> {...}) matched no entry of
    the other, and a resume that changed model.rope_scaling said nothing."""
    config = load_config(TINY, [])
    saved = json.loads(config.to_json_best_effort())
    saved["model"]["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    assert run_lib.changed_settings(saved, config) == ["model.rope_scaling {'rope_type': 'linear', 'factor': 4.0} "
                                                       "-> None"]
    scaled = load_config(TINY, ['model.rope_scaling={"rope_type": "linear", "factor": 4.0}', "optimizer.lr=0.1"])
    assert run_lib.changed_settings(json.loads(config.to_json_best_effort()), scaled) == [
        "model.rope_scaling None -> {'rope_type': 'linear', 'factor': 4.0}", "optimizer.lr 0.003 -> 0.1"]
    saved["model"]["rope_scaling"] = {"rope_type": "linear", "factor": 4.0, "extra": 1}  # a key of one side
    assert run_lib.changed_settings(saved, scaled)[0] == ("model.rope_scaling {'rope_type': 'linear', 'factor': 4.0, "
                                                          "'extra': 1} -> {'rope_type': 'linear', 'factor': 4.0}")
    del saved["model"]["rope_scaling"]  # a setting this release has and the saved config lacks: not compared
    assert run_lib.changed_settings(saved, config) == []


def test_a_model_field_left_to_the_preset_is_compared_by_the_value_the_model_had():
    """A model field given as the preset's own value on resume changed nothing; it was named as
    `None -> value`, and one given anew was named with None for the value the run trained with."""
    from llama_jax.experiment import model_config

    config = load_config(TINY, [])
    saved, was_model = json.loads(config.to_json_best_effort()), model_config(config.model).to_dict()
    theta = was_model["rope_theta"]
    same = load_config(TINY, [f"model.rope_theta={theta}"])
    assert run_lib.changed_settings(saved, same, was_model, model_config(same.model).to_dict()) == []
    other = load_config(TINY, [f"model.rope_theta={theta * 2}"])
    assert run_lib.changed_settings(saved, other, was_model, model_config(other.model).to_dict()) == [
        f"model.rope_theta {theta!r} -> {theta * 2!r}"]
    # and the other way round: a value given before, left to the preset now
    assert run_lib.changed_settings(json.loads(other.to_json_best_effort()), config,
                                    model_config(other.model).to_dict(), was_model) == [
        f"model.rope_theta {theta * 2!r} -> {theta!r}"]


def test_a_run_without_its_kept_tokenizer_falls_back_to_a_directory_setting(tmp_path, tokenizer_path):
    """data.tokenizer naming a directory means its tokenizer.model, here as everywhere (it was
    taken as a file, and export refused the run)."""
    from llama_jax.safe_io import sha256_file

    info = {"tokenizer_sha256": sha256_file(tokenizer_path),
            "config": {"data": {"source": "embedded", "tokenizer": str(tokenizer_path.parent)}}}
    (tmp_path / "run").mkdir()
    assert run_lib.run_tokenizer(tmp_path / "run", info) == tokenizer_path


def test_a_resume_never_drops_the_checkpoints_keep_every_kept(tmp_path, tokenizer_path, capsys):
    workdir = tmp_path / "run"
    kept = ["checkpoint.every=2", "checkpoint.max_to_keep=1", "checkpoint.keep_every=4", "train.steps=8"]
    assert main(train_args(workdir, run_overrides(tokenizer_path, *kept))) == 0
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert steps == [4, 8]
    capsys.readouterr()
    assert main(train_args(workdir, run_overrides(tokenizer_path, *kept[:2], "train.steps=10"))) == 2
    assert ("was saved with checkpoint.keep_every=4, which keeps the steps that are multiples of 4 for good; resuming "
            "with keep_every=0 would let the retention delete them") in capsys.readouterr().err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == steps
    shutil.copytree(workdir, tmp_path / "unbounded")  # without a retention nothing is deleted either
    assert main(train_args(tmp_path / "unbounded", run_overrides(tokenizer_path, "checkpoint.every=2",
                                                                 "checkpoint.max_to_keep=None", "train.steps=10"))) == 0
    assert sorted(int(p.name) for p in (tmp_path / "unbounded" / "checkpoints").iterdir()) == [4, 8, 10]
    assert main(train_args(workdir, run_overrides(tokenizer_path, *kept[:2], "checkpoint.keep_every=2",
                                                  "train.steps=10"))) == 0  # a divisor keeps all 4 kept
    assert {4, 8} <= {int(p.name) for p in (workdir / "checkpoints").iterdir()}


def test_a_resume_never_lets_a_limit_drop_the_checkpoints_of_a_run_that_kept_all(tmp_path, tokenizer_path, capsys):
    """A run with checkpoint.max_to_keep=None keeps its history for good: a limit on resume under
    which its saves would delete some of it is refused, naming them; one that deletes none is taken,
    and then a lower limit of the run that now has one (it deletes what that run bounded) too."""
    workdir = tmp_path / "run"
    every = ["checkpoint.every=2", "checkpoint.async_save=False"]
    assert main(train_args(workdir, run_overrides(tokenizer_path, *every, "checkpoint.max_to_keep=None",
                                                  "train.steps=6"))) == 0
    capsys.readouterr()
    for lower, steps, lost in ((1, 8, "2, 4, 6"), (3, 8, "2"), (4, 12, "2, 4")):  # (12: three more saves)
        assert main(train_args(workdir, run_overrides(tokenizer_path, *every, f"checkpoint.max_to_keep={lower}",
                                                      f"train.steps={steps}"))) == 2
        assert (f"the run kept every checkpoint (checkpoint.max_to_keep=None); resuming with max_to_keep={lower} "
                f"would let the retention delete checkpoint(s) {lost} by train.steps={steps}"
                ) in capsys.readouterr().err
        assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
    assert main(train_args(workdir, run_overrides(tokenizer_path, *every, "checkpoint.max_to_keep=4",
                                                  "train.steps=8"))) == 0
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6, 8]
    assert main(train_args(workdir, run_overrides(tokenizer_path, *every, "checkpoint.max_to_keep=2",
                                                  "train.steps=10"))) == 0
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [8, 10]


def test_export_writes_a_checkpoint_as_a_model_directory(tmp_path, tokenizer_path, straight_run, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    in_progress = workdir / "checkpoints" / "16.orbax-checkpoint-tmp-1"  # a save the run is still writing
    in_progress.mkdir()
    dst = tmp_path / "the model"
    assert main(["export", "--workdir", str(workdir), "--step", "8", str(dst)]) == 0
    assert in_progress.is_dir()  # export only reads
    assert f"llama-jax convert --from jax --to hf '{dst}' DST makes" in capsys.readouterr().out  # to paste as is
    config = load_config(TINY, run_overrides(tokenizer_path))
    _, state = next_batch_loss(config, workdir, 8, jax.devices()[:1])
    model_config, params = load_model(dst)
    assert model_config.dim == 64 and (dst / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))

    capsys.readouterr()
    assert main(["export", "--workdir", str(workdir), "--step", "5", str(tmp_path / "other")]) == 2
    assert "no checkpoint of step 5; valid: 4, 8, 12" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_export_while_the_run_replaces_the_latest_checkpoint(tmp_path, straight_run, monkeypatch, capsys):
    """A run still training saves a step and deletes the oldest it keeps (max_to_keep): the step an
    export (or eval, generate) chose may go while it is read."""
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    checkpoints, restore, removed = workdir / "checkpoints", run_lib.RunCheckpoints.restore_params, []

    def saved_and_removed_meanwhile(self, step, *args, **kwargs):
        if not removed:  # as the run does: step 16 committed, then the step being read deleted
            shutil.copytree(checkpoints / "12", checkpoints / "16")
            (workdir / run_lib.PROGRESS_FILE).write_text(json.dumps({"committed_step": 16}))
            shutil.rmtree(checkpoints / str(step))
            removed.append(step)
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(run_lib.RunCheckpoints, "restore_params", saved_and_removed_meanwhile)
    assert main(["export", "--workdir", str(workdir), str(tmp_path / "model")]) == 0
    assert removed == [12] and f"exported step 16 of {workdir}" in capsys.readouterr().out
    assert load_model(tmp_path / "model")[0].dim == 64

    removed.clear()
    (checkpoints / "16").rename(checkpoints / "12")  # steps 4, 8, 12 again
    assert main(["export", "--workdir", str(workdir), "--step", "8", str(tmp_path / "other")]) == 2
    assert capsys.readouterr().err == (f"llama-jax export: error: checkpoint 8 of {workdir} was removed while it was "
                                       f"read (the run training there keeps the latest checkpoint.max_to_keep); "
                                       f"kept now: 4, 12, 16\n")
    assert not (tmp_path / "other").exists()


def test_export_while_the_run_is_deleting_the_step_it_reads(tmp_path, straight_run, monkeypatch, capsys):
    """A step being deleted is still listed until its directory goes: a read that fails on it while
    a run trains in the workdir (holding its lock) with a newer step waits for it to go, then reads
    the new latest, instead of calling it damaged."""
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    checkpoints, restore, removed = workdir / "checkpoints", run_lib.RunCheckpoints.restore_params, []
    lock = DirectoryLock(workdir, "a run trains here")
    lock.acquire()

    def deleted_meanwhile(self, step, *args, **kwargs):
        if not removed:  # step 16 committed, then step 12's files deleted, its directory last
            shutil.copytree(checkpoints / "12", checkpoints / "16")
            (workdir / run_lib.PROGRESS_FILE).write_text(json.dumps({"committed_step": 16}))
            for file in (checkpoints / str(step) / "state").rglob("*"):
                if file.is_file():
                    file.unlink()
            threading.Timer(0.5, shutil.rmtree, [checkpoints / str(step)]).start()
            removed.append(step)
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(run_lib.RunCheckpoints, "restore_params", deleted_meanwhile)
    try:
        assert main(["export", "--workdir", str(workdir), str(tmp_path / "model")]) == 0
    finally:
        lock.release()
    assert removed == [12] and f"exported step 16 of {workdir}" in capsys.readouterr().out


def test_eval_of_a_run_that_removes_every_latest_checkpoint_before_it_is_read(tmp_path, straight_run,
                                                                            monkeypatch, capsys):
    """checkpoint.every=1 with max_to_keep=1 on a fast run: each step is removed before a read of it
    ends, however often the read starts again; the error says so, rather than naming the last step
    read as if it were an accident of that step."""
    workdir = tmp_path / "run"
    shutil.copytree(straight_run[0], workdir)
    checkpoints, restore = workdir / "checkpoints", run_lib.RunCheckpoints.restore_params

    def overtaken(self, step, *args, **kwargs):  # the next step committed, then the one being read deleted
        shutil.copytree(checkpoints / str(step), checkpoints / str(step + 1))
        (workdir / run_lib.PROGRESS_FILE).write_text(json.dumps({"committed_step": step + 1}))
        shutil.rmtree(checkpoints / str(step))
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(run_lib.RunCheckpoints, "restore_params", overtaken)
    assert main(["eval", "--workdir", str(workdir)]) == 2
    assert capsys.readouterr().err == (
        f"llama-jax eval: error: the latest checkpoint of {workdir} was removed while it was read, "
        f"{run_lib.READ_ATTEMPTS} times in a row (the run training there saves a newer one before it can be read, "
        f"keeping only the latest checkpoint.max_to_keep); read it once the run has finished (its last step is kept), "
        f"or train with a larger checkpoint.every or max_to_keep\n")
    assert committed_steps(checkpoints)[-1] == STEPS + run_lib.READ_ATTEMPTS
    assert not list(workdir.glob("eval-*.json"))


def test_finetune_experiment_round_trips_through_hugging_face(tmp_path, tokenizer_path, capsys):
    """experiments/finetune_hf.sh: HF checkpoint -> fine-tuned run -> HF checkpoint that transformers loads."""
    import torch
    import transformers

    from llama_jax import LLaMA
    from tests.reference import hf_config_dict, make_hf_model

    hf_in, run_dir = tmp_path / "hf-in", tmp_path / "run"
    make_hf_model(hf_config_dict("gqa_llama3", vocab_size=512)).save_pretrained(hf_in)
    shutil.copyfile(tokenizer_path, hf_in / "tokenizer.model")
    (hf_in / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    (hf_in / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "add_bos_token": True}))
    corpus, data = EmbeddedCorpus(), tmp_path / "it's data"  # the pattern goes into a Python literal as it is
    data.mkdir()
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": corpus[i]}) + "\n" for i in range(20)))
    env = dict(os.environ, LLAMA_JAX=str(Path(sys.executable).parent / "llama-jax"))
    result = subprocess.run(
        [str(ROOT / "experiments" / "finetune_hf.sh"), str(hf_in), str(data / "*.jsonl"), str(run_dir),
         "--config.train.steps=4", "--config.train.batch_size=8", "--config.train.seq_len=64",
         "--config.optimizer.warmup_steps=1", "--config.optimizer.lr=1e-3", "--config.train.sample_every=0",
         "--config.checkpoint.every=2"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert committed_steps(run_dir / "checkpoints") == [2, 4]
    extra = subprocess.run([str(ROOT / "experiments" / "finetune_hf.sh"), str(hf_in), str(data / "*.jsonl"),
                            str(run_dir), "--workdir", str(tmp_path / "other")], env=env, capture_output=True,
                           text=True, timeout=60)  # (it trained a run elsewhere, which the export then missed)
    assert extra.returncode == 2 and extra.stderr == ("finetune_hf.sh: error: --workdir: after HF_DIR DATA RUN_DIR "
                                                      "come only --config.key=value overrides\n"), extra.stderr

    tokens = np.array([[1, 17, 300, 42, 7, 99, 250, 3]])
    with torch.no_grad():
        before = transformers.LlamaForCausalLM.from_pretrained(hf_in).eval()(torch.tensor(tokens)).logits.numpy()
        after = transformers.LlamaForCausalLM.from_pretrained(run_dir / "hf").eval()(torch.tensor(tokens)).logits
    cfg, params = load_model(run_dir / "final")
    ours = np.asarray(LLaMA(cfg.replace(dtype="float32")).apply({"params": params}, tokens))
    np.testing.assert_allclose(after.numpy(), ours, atol=1e-4)
    assert np.abs(after.numpy() - before).max() > 1e-2  # the fine-tuning changed the model
    # the model's own end-of-sequence ids and tokenizer settings come back with it
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert json.loads((run_dir / "final" / name).read_text()) == json.loads((hf_in / name).read_text()), name
    assert json.loads((run_dir / "hf" / "generation_config.json").read_text())["eos_token_id"] == [2, 5]
    assert json.loads((run_dir / "hf" / "config.json").read_text())["eos_token_id"] == [2, 5]
    # generate --workdir stops where generating from the export does: at the fine-tuned model's end ids
    # (it knew only the tokenizer's EOS); here an end id that is the first token greedy decoding picks
    from llama_jax.generate import generate
    from llama_jax.tokenizer import load_tokenizer

    cfg, params = load_model(run_dir / "final")
    first = generate(cfg, params, [load_tokenizer(run_dir / "final").encode("The", bos=True, eos=False)], 1)[0][0]
    for directory in (run_dir / "tokenizer_files", run_dir / "final"):
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first]}))
    capsys.readouterr()
    printed = []
    for source in (["--workdir", str(run_dir)], [str(run_dir / "final")]):
        assert main(["generate", *source, "--prompt", "The", "--temperature", "0", "--max-new-tokens", "12"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[1]) < 12


def test_finetune_experiment_passes_an_override_and_its_value_given_apart(tmp_path):
    """llama-jax takes --config.key value as well as --config.key=value: finetune_hf.sh refused the
    value as an argument of its own. (The commands it runs are recorded, not run.)"""
    calls = tmp_path / "calls"
    command = tmp_path / "llama-jax"
    command.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{calls}'\n")
    command.chmod(0o755)
    done = subprocess.run([str(ROOT / "experiments" / "finetune_hf.sh"), "hf", "data/*.jsonl", "run",
                           "--config.train.steps", "3", "--config.train.seed=1"], cwd=tmp_path,
                          env=dict(os.environ, LLAMA_JAX=str(command)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    train = calls.read_text().splitlines()[1]
    assert train.startswith("train ") and train.endswith(" --config.train.steps 3 --config.train.seed=1")


def test_finetune_experiment_help_prints_its_usage(tmp_path):
    """--help was taken as a first argument of three and said "error: expected HF_DIR DATA RUN_DIR"."""
    done = subprocess.run([str(ROOT / "experiments" / "finetune_hf.sh"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "" and list(tmp_path.iterdir()) == []
    assert done.stdout.startswith("Fine-tune a Hugging Face LLaMA checkpoint")
    assert "RUN_DIR -> RUN_DIR/hf" in done.stdout


def test_finetune_experiment_refuses_a_model_without_its_tokenizer_or_the_model_as_run_dir(tmp_path):
    """A model without tokenizer.model was converted, then training failed on RUN_DIR/init's, and a
    rerun with it copied in skipped the conversion and failed alike; RUN_DIR = HF_DIR had the
    conversion written into the model before training refused the directory. (Commands recorded.)"""
    calls = tmp_path / "calls"
    command = tmp_path / "llama-jax"
    command.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{calls}'\n")
    command.chmod(0o755)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for run_dir, message in [
        ("run", "hf/tokenizer.model: no such file; the run reads its tokenizer from the converted model: copy the "
                "model's tokenizer.model into hf (LLaMA 3 repositories keep it under original/)"),
        ("hf/", "RUN_DIR hf/ is HF_DIR, the Hugging Face model; give a new directory for the run")]:
        done = subprocess.run([str(ROOT / "experiments" / "finetune_hf.sh"), "hf", "data/*.jsonl", run_dir],
                              cwd=tmp_path, env=dict(os.environ, LLAMA_JAX=str(command)), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and done.stderr == f"finetune_hf.sh: error: {message}\n", done.stderr
        (tmp_path / "hf" / "tokenizer.model").write_bytes(b"")  # (for the second case)
    assert not calls.exists() and not (tmp_path / "run").exists()


def test_export_of_an_unscanned_run(tmp_path):
    overrides = ["model.scan_layers=False", "train.steps=2", "optimizer.warmup_steps=1", "checkpoint.every=2"]
    config = load_config(TINY, overrides)
    run_lib.train_and_evaluate(config, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert main(["export", "--workdir", str(tmp_path / "run"), str(tmp_path / "model")]) == 0
    model_config, params = load_model(tmp_path / "model")
    _, state = next_batch_loss(config, tmp_path / "run", 2, jax.devices()[:1])
    assert not model_config.scan_layers and "layers_0" in params
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))
