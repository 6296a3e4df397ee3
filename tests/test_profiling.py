"""Traces of training steps (`train.profile_steps`) and their summaries (`llama_jax.profiling`)."""

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_jax.cli import main
from llama_jax.metrics import read_metrics
from llama_jax.profiling import summarize

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.py")


def train(workdir, steps: int, *extra) -> list[str]:
    """`llama-jax train` of the tiny config on synthetic data, every step logged."""
    return ["train", "--config", TINY, "--workdir", str(workdir), f"--config.train.steps={steps}",
            "--config.train.log_every=1", "--config.optimizer.warmup_steps=1", *extra]


def profile_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("profile of steps")]


def jax_trace(directory: Path) -> None:
    """A real trace of a small jitted computation."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((64, 64))
    f(a).block_until_ready()
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        f(a).block_until_ready()


def test_a_gpu_trace_s_stream_kernels_count_once(tmp_path):
    """A GPU trace (as jax.profiler writes it on an H200) holds each kernel on its stream line and
    again on derived lines such as "XLA Ops": only the stream lines count, grouped by kind."""
    def kernel(tid, name, ts, dur):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}

    stream = [kernel(7, "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 0, 10.0), kernel(7, "loop_add_fusion_3", 10, 2.0),
              kernel(7, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 12, 4.0),
              kernel(7, "loop_add_fusion_3", 20, 3.0)]
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
              {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
              {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 500.0, "name": "PjitFunction(step)"},
              *stream, *({**e, "tid": 8} for e in stream)]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = summarize(tmp_path, per=2)
    assert summary["source"] == "device streams" and summary["kernels"] == 2 and summary["kernel_us"] == 9.5
    assert summary["span_us"] == 11.5  # 0 to 23 us, per 2
    kinds = summary["by_kind"]
    assert kinds["matrix product"] == {"count": 0.5, "us": 5.0, "share": 10 / 19}
    assert kinds["attention (cuDNN)"]["us"] == 2.0 and kinds["other fusion"]["us"] == 2.5
    assert summary["top"][0]["name"].startswith("nvjet") and summary["top"][1]["count"] == 1.0  # the fusion, twice
    assert summary["top"][1]["mean_us"] == 2.5


def test_a_cpu_trace_s_operations_count_their_self_time(tmp_path):
    """On CPU, XLA's operations run on its client and thread-pool threads and nest (the executor
    holds them all, a while loop its body): each counts its own time once, the executor's
    bookkeeping and Python's threads not at all."""
    def op(tid, name, ts, dur):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name}

    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": "tf_XLAEigen/77"}},
              {"ph": "M", "pid": 1, "tid": 6, "name": "thread_name", "args": {"name": "tf_XLAPjRtCpuClient/3"}},
              {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "python"}},
              op(5, "ThunkExecutor::Execute", 0, 100), op(5, "while.3", 10, 50), op(5, "dot.1", 15, 20),
              op(5, "loop_add_fusion", 40, 15), op(5, "copy.2", 70, 20), op(6, "dot.1", 0, 30),
              op(6, "all-reduce.4", 40, 10), op(7, "PjitFunction(step)", 0, 500)]
    (tmp_path / "perfetto_trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    summary = summarize(tmp_path / "perfetto_trace.json.gz")
    assert summary["source"] == "host XLA threads (no device line: CPU; self times)"
    assert {e["name"]: e["us"] for e in summary["top"]} == {"dot.1": 50, "copy.2": 20, "loop_add_fusion": 15,
                                                            "while.3": 15, "all-reduce.4": 10}
    assert summary["kernels"] == 6 and summary["kernel_us"] == 110
    assert summary["by_kind"]["collective / wait"]["us"] == 10  # (not a reduction for its name's "reduce")


def test_a_cpu_trace_s_span_ends_where_its_last_operation_ends(tmp_path):
    """An operation that holds others (a loop) and ends last ends the span at its own end, not at
    its start plus its self time (90 us here, where it ends at 100)."""
    events = [{"ph": "M", "pid": 1, "tid": 5, "name": "thread_name", "args": {"name": "tf_XLAEigen/77"}},
              {"ph": "X", "pid": 1, "tid": 5, "ts": 0, "dur": 100, "name": "while.1"},
              {"ph": "X", "pid": 1, "tid": 5, "ts": 10, "dur": 10, "name": "dot.2"}]
    (tmp_path / "perfetto_trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    summary = summarize(tmp_path / "perfetto_trace.json.gz")
    assert summary["kernel_us"] == 100 and summary["span_us"] == 100


def test_a_run_traces_the_steps_it_is_asked_to_and_computes_the_same(tmp_path, capsys):
    """Steps 3-4 of a 5-step run traced into RUN/profile (a TensorBoard trace, a Perfetto one and a
    summary); the losses are those of the same run untraced, and the traced steps get no speed figure."""
    def run(workdir, *extra):
        assert main(train(workdir, 5, *extra)) == 0
        return [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]

    traced = run(tmp_path / "traced", "--config.train.profile_steps=2", "--config.train.profile_start=3")
    out = capsys.readouterr().out
    profile = tmp_path / "traced" / "profile"
    assert re.search(rf"^profile of steps 3-4: {re.escape(str(profile))} \(TensorBoard's profile plugin, or "
                     rf"plugins/profile/[\w.-]+/perfetto_trace.json.gz at ui.perfetto.dev; summary-3-4.json\); per "
                     rf"step [\d,]+ kernels, [\d.]+ ms on host XLA threads \(no device line: CPU; self times\): ",
                     out, re.M), out
    summary = json.loads((profile / "summary-3-4.json").read_text())
    assert summary["per"] == 2 and summary["kernels"] > 0 and Path(summary["trace"]).parent.parent.parent == \
        profile / "plugins"
    assert list(profile.glob("plugins/profile/*/*.xplane.pb"))  # what TensorBoard's profile plugin reads
    plain = run(tmp_path / "plain")
    assert [r["loss"] for r in traced] == [r["loss"] for r in plain]
    speed = [r["step"] for r in traced if "tokens_per_second" in r]
    assert speed == [2, 5], traced  # not step 1 (compiling) nor the traced steps 3 and 4
    assert not (tmp_path / "plain" / "profile").exists()


def test_a_trace_that_cannot_start_is_one_line_and_the_run_goes_on(tmp_path, capsys):
    """jax.profiler takes one trace per process at a time: with one already running (a user's own),
    the run says so in one line and trains to the end, its speed figures intact."""
    import jax

    jax.profiler.start_trace(str(tmp_path / "users_own"))
    try:
        assert main(train(tmp_path / "run", 4, "--config.train.profile_steps=2", "--config.train.profile_start=2")) == 0
    finally:
        jax.profiler.stop_trace()
    assert profile_lines(capsys) == ["profile of steps 2-3 not taken: RuntimeError: Profile has already been started. "
                                     "Only one profile may be run at a time."]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records if "tokens_per_second" in r] == [2, 3, 4]


def test_a_trace_that_cannot_be_written_is_one_line_and_no_step_is_lost(tmp_path, capsys):
    """jax.profiler writes the trace when it stops; where it cannot (here a file stands where its
    folder goes; a full disk does the same), the run says so and trains to the end."""
    workdir = tmp_path / "run"
    (workdir / "profile" / "plugins").mkdir(parents=True)
    (workdir / "profile" / "plugins" / "profile").write_text("in the way\n")
    assert main(train(workdir, 5, "--config.train.profile_steps=2", "--config.train.profile_start=3",
                      "--config.checkpoint.every=2")) == 0
    [line] = profile_lines(capsys)
    assert line.startswith(f"profile of steps 3-4: the trace could not be written to {workdir / 'profile'}: "), line
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 5


def test_a_resume_inside_the_window_says_it_is_not_traced(tmp_path, capsys):
    """A process's first step compiles: a resume that starts inside the traced window does not trace
    the rest of it (one line says so), one that starts before it traces it whole, and one that
    starts after it says nothing."""
    workdir = tmp_path / "run"
    window = ("--config.train.profile_steps=2", "--config.train.profile_start=4", "--config.checkpoint.every=1")
    assert main(train(workdir, 2, "--config.checkpoint.every=1")) == 0
    assert main(train(workdir, 3, *window[2:])) == 0  # the window 4-5 is past this run's steps: not asked for
    capsys.readouterr()
    assert main(train(workdir, 6, *window)) == 0  # resumes at 4, the window's first step
    assert profile_lines(capsys) == ["profile of steps 4-5 not taken: this run resumed at step 4, inside it (a "
                                     "process's first step compiles)"]
    assert not (workdir / "profile").exists()
    assert main(train(workdir, 7, *window)) == 0  # resumes at 7: the window is behind
    assert profile_lines(capsys) == []
    again = tmp_path / "again"
    assert main(train(again, 2, "--config.checkpoint.every=1")) == 0
    assert main(train(again, 6, *window)) == 0  # resumes at 3: the window 4-5 is traced whole
    [line] = profile_lines(capsys)
    assert line.startswith("profile of steps 4-5: ") and (again / "profile" / "summary-4-5.json").is_file()


def test_a_one_step_window_is_named_as_one_step(tmp_path):
    """(It read "profile of steps 5-5".)"""
    from llama_jax.profiling import StepTrace

    said = []
    StepTrace(tmp_path, 5, 1, said.append, first=5).say(" not taken")
    StepTrace(tmp_path, 5, 2, said.append, first=5).say(" not taken")
    assert said == ["profile of step 5 not taken: this run resumed at step 5, inside it (a process's first step "
                    "compiles)", "profile of step 5 not taken", "profile of steps 5-6 not taken: this run resumed at "
                    "step 5, inside it (a process's first step compiles)", "profile of steps 5-6 not taken"]


def test_a_damaged_trace_is_one_line(tmp_path):
    """A trace cut short (a run killed while it was written), corrupt, or not a trace's JSON: a
    ValueError naming it, and one line from benchmarks/trace_summary.py."""
    real = tmp_path / "real"
    jax_trace(real)
    data = next(real.glob("**/perfetto_trace.json.gz")).read_bytes()
    corrupt = bytearray(data)
    corrupt[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    for name, content in (("cut", data[:len(data) // 2]), ("corrupt", bytes(corrupt)),
                          ("numbers", gzip.compress(b"[1, 2, 3]")), ("text", b"not gzip at all"),
                          ("event_list_of_strings", gzip.compress(b'{"traceEvents": ["a"]}'))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "perfetto_trace.json.gz").write_bytes(content)
        with pytest.raises(ValueError, match=r"perfetto_trace.json.gz is not a (readable )?Perfetto trace"):
            summarize(tmp_path / name)
    run = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "trace_summary.py"),
                          str(tmp_path / "cut")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"trace_summary.py: error: {tmp_path / 'cut'}: ") and "Perfetto trace" in run.stderr


def test_a_run_preempted_inside_the_window_keeps_the_trace_so_far(tmp_path, capsys, monkeypatch):
    """A SIGTERM while steps are traced: the run saves and stops as it always does, and the trace
    so far is written and said (no summary: the window was not done)."""
    import os
    import signal

    from llama_jax import run as run_lib

    start = run_lib.StepTrace.before

    def before_then_sigterm(self, step, state):
        started = start(self, step, state)
        if started:
            os.kill(os.getpid(), signal.SIGTERM)
        return started

    monkeypatch.setattr(run_lib.StepTrace, "before", before_then_sigterm)
    workdir = tmp_path / "run"
    main(train(workdir, 6, "--config.train.profile_steps=3", "--config.train.profile_start=3"))
    out = capsys.readouterr().out
    assert "preempted: checkpoint saved at step 3" in out, out
    lines = [line for line in out.splitlines() if line.startswith("profile of steps")]
    assert lines == [f"profile of steps 3-5: the run ended inside it; the trace so far is in {workdir / 'profile'} "
                     f"(no summary)"]
    assert list((workdir / "profile").glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert not list((workdir / "profile").glob("summary-*.json"))


def test_a_checkpoint_save_due_at_the_window_s_last_step_is_in_the_trace(tmp_path, monkeypatch):
    """As an evaluation, a sample or a save due at its other steps (the trace ended once its last
    step was computed, before that step's evaluation, sample and save)."""
    from llama_jax import run as run_lib

    save = run_lib.RunCheckpoints.save

    def save_checking_due(self, step, *args, **kwargs):
        def a_due_save():
            return save(self, step, *args, **kwargs)
        return a_due_save() if self.due(step) else save(self, step, *args, **kwargs)

    monkeypatch.setattr(run_lib.RunCheckpoints, "save", save_checking_due)
    workdir = tmp_path / "run"
    assert main(train(workdir, 4, "--config.train.profile_steps=2", "--config.train.profile_start=2",
                      "--config.checkpoint.every=3")) == 0
    [trace] = (workdir / "profile").glob("plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(trace) as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    assert any(name.endswith(" a_due_save") for name in names), sorted(names)[:50]


def test_a_resume_after_the_window_trains_beside_a_file_named_profile(tmp_path, capsys):
    """A file at RUN/profile is refused only where the run would trace into it (it was refused also
    for a window this process does not trace)."""
    workdir = tmp_path / "run"
    assert main(train(workdir, 2, "--config.checkpoint.every=1")) == 0
    (workdir / "profile").write_text("notes\n")
    window = ("--config.train.profile_steps=1", "--config.train.profile_start=2")
    assert main(train(workdir, 3, *window)) == 0  # resumes at 3: the window (step 2) is behind
    assert profile_lines(capsys) == [] and (workdir / "profile").read_text() == "notes\n"
    assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
