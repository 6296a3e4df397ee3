"""Traces of training steps (`train.profile_steps`) and their summaries (`llama_jax.profiling`)."""

import gzip
import json
import re
from pathlib import Path

from llama_jax.cli import main
from llama_jax.metrics import read_metrics
from llama_jax.profiling import summarize

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.py")


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


def test_a_run_traces_the_steps_it_is_asked_to_and_computes_the_same(tmp_path, capsys):
    """Steps 3-4 of a 5-step run traced into RUN/profile (a TensorBoard trace, a Perfetto one and a
    summary); the losses are those of the same run untraced, and the traced steps get no speed figure."""
    def run(workdir, *extra):
        assert main(["train", "--config", TINY, "--workdir", str(workdir), "--config.train.steps=5",
                     "--config.train.log_every=1", "--config.optimizer.warmup_steps=1", *extra]) == 0
        return [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]

    traced = run(tmp_path / "traced", "--config.train.profile_steps=2", "--config.train.profile_start=3")
    out = capsys.readouterr().out
    profile = tmp_path / "traced" / "profile"
    assert re.search(rf"^profile of steps 3-4: {re.escape(str(profile))} \(TensorBoard's profile plugin, or "
                     rf"perfetto_trace.json.gz at ui.perfetto.dev; summary-3-4.json\); per step \d+ kernels, "
                     rf"[\d.]+ ms on host XLA client threads \(no device line: CPU\): ", out, re.M), out
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
        assert main(["train", "--config", TINY, "--workdir", str(tmp_path / "run"), "--config.train.steps=4",
                     "--config.train.log_every=1", "--config.optimizer.warmup_steps=1",
                     "--config.train.profile_steps=2", "--config.train.profile_start=2"]) == 0
    finally:
        jax.profiler.stop_trace()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("profile of steps")]
    assert len(lines) == 1 and lines[0].startswith("profile of steps 2-3 not taken: "), lines
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records if "tokens_per_second" in r] == [2, 3, 4]
