"""FLOPs accounting against XLA's own count and a published model, peak lookup, metrics files."""

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from llama_jax import LLaMA, LLaMAConfig, init_params
from llama_jax.attention import query_blocks
from llama_jax.metrics import (MetricsWriter, flops_per_token, hbm_bandwidth_for_kind, mfu, peak_flops_for_kind,
                               peak_flops_per_device, tflops_per_device)

# Matmuls dominate this shape; GQA (4 query heads on 2 K/V heads) exercises the K term. Unscanned
# layers because XLA's cost analysis counts a while-loop (scan) body once, not once per layer.
SMALL = LLaMAConfig(vocab_size=1024, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=1024,
                    max_seq_len=128, scan_layers=False)
B, S = 2, 128


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of dicts in older jax
    return float(cost["flops"])


@pytest.fixture(scope="module")
def small_params():
    return init_params(SMALL, 0)


def forward(params, tokens):
    return LLaMA(SMALL).apply({"params": params}, tokens)


def computed_flops(training: bool) -> float:
    """What the `xla` kernel computes: the projections and, of the full S x S attention products,
    the (n + 1) / 2n that n causal query blocks keep (`query_blocks`); the metric itself counts
    half, by convention."""
    full = flops_per_token(SMALL, S, causal=False, training=training)
    dense_attention = 2 * (full - flops_per_token(SMALL, S, causal=True, training=training))
    n = len(query_blocks(S, S))
    assert n > 1  # the shape exercises the skipping
    return (full - dense_attention * (n - 1) / (2 * n)) * B * S


def test_forward_flops_match_xla_cost_analysis(small_params):
    """XLA also counts softmax, norms, SiLU and rotary; they add about 0.7% here."""
    tokens = jnp.zeros((B, S), jnp.int32)
    assert xla_flops(forward, small_params, tokens) == pytest.approx(computed_flops(training=False), rel=0.02)


def test_training_flops_match_xla_cost_analysis(small_params):
    """Forward + backward of a loss is about 3x forward (XLA's count is ~3% below it here)."""
    tokens = jnp.zeros((B, S), jnp.int32)

    def loss_grad(params, tokens):
        return jax.grad(lambda p: forward(p, tokens).mean())(params)

    assert xla_flops(loss_grad, small_params, tokens) == pytest.approx(computed_flops(training=True), rel=0.05)


def test_causal_halves_only_attention():
    full = flops_per_token(SMALL, S, causal=False, training=False)
    causal = flops_per_token(SMALL, S, causal=True, training=False)
    H, Dh, L = 4, 64, 2
    assert full - causal == 2 * S * H * Dh * L  # half of 2 products x 2 FLOPs x S x H x Dh per layer


def test_llama2_7b_training_flops_by_hand():
    """Kaplan et al.'s C = 6N + 6 L S D (their attention term is our causal-halved one), with N the
    matmul weights: per layer 4 D^2 (Q, K, V, O; no GQA in llama2-7b) + 3 D F, plus the D x V output."""
    D, L, F, V, S7 = 4096, 32, 11008, 32000, 4096
    n_matmul = L * (4 * D * D + 3 * D * F) + D * V
    assert n_matmul == 6_607_077_376
    expected = 6 * n_matmul + 6 * L * S7 * D
    assert expected == 42_863_689_728
    assert flops_per_token(LLaMAConfig.from_preset("llama2-7b"), S7) == expected
    # The familiar "6 x parameters" estimate with the published 6.74B parameters is within 6%.
    assert expected == pytest.approx(6 * 6_738_415_616, rel=0.07)


def test_mfu_and_tflops():
    cfg = LLaMAConfig.from_preset("llama2-7b")
    # 3000 tokens/s per chip on an A100 at 42.86 GFLOP/token: 128.6 TFLOP/s, 41.2% MFU.
    assert tflops_per_device(3000, cfg, 4096) == pytest.approx(3000 * 42_863_689_728 / 1e12)
    assert mfu(3000, cfg, 4096, 312e12) == pytest.approx(3000 * 42_863_689_728 / 312e12)
    assert mfu(3000, cfg, 4096, 312e12) == pytest.approx(0.412, abs=1e-3)


# ---- peak FLOP/s -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5p", 459), ("TPU v5", 459),
    ("TPU v6 lite", 918), ("TPU v6e", 918), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H200", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200 NVL", 835),
    ("NVIDIA GH200 480GB", 989),
])
def test_peak_by_device_kind(kind, tflops):
    assert peak_flops_for_kind(kind) == tflops * 1e12
    assert peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == tflops * 1e12


@pytest.mark.parametrize("kind, tb_per_s", [
    ("TPU v4", 1.2), ("TPU v5 lite", 0.82), ("TPU v5", 2.77), ("TPU v6 lite", 1.64), ("NVIDIA A100-SXM4-80GB", 2.0),
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8), ("NVIDIA H200 NVL", 4.8),
    ("NVIDIA H100 PCIe", None), ("NVIDIA GH200 480GB", None), ("cpu", None),
])
def test_hbm_bandwidth_by_device_kind(kind, tb_per_s):
    """Datasheet HBM bandwidth for the decoding roofline; a chip whose bandwidth the table lacks is unknown."""
    assert hbm_bandwidth_for_kind(kind) == (None if tb_per_s is None else tb_per_s * 1e12)


def test_cpu_peak_is_measured_once():
    device = jax.devices()[0]
    assert peak_flops_for_kind(device.device_kind) is None  # "cpu"
    first = peak_flops_per_device()
    assert 1e8 < first < 1e14  # between a slow laptop core and far beyond any CPU
    assert peak_flops_per_device(device) == first  # cached, not re-measured


# ---- metrics files ---------------------------------------------------------------------------


def test_metrics_writer_writes_one_json_line_per_call(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": jnp.float32(2.5), "tokens": jnp.int32(4096), "lr": 3e-4})
        writer.write(2, {"loss": jnp.array(2.25)})
    with MetricsWriter(tmp_path) as writer:  # appends, does not truncate
        writer.write(3, {"loss": float("nan"), "grad_norm": jnp.float32(-jnp.inf), "lr": 1e-4})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict_json) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0] == {"step": 1, "loss": 2.5, "tokens": 4096, "lr": 3e-4}
    assert type(records[0]["tokens"]) is int
    assert records[1] == {"step": 2, "loss": 2.25}
    assert records[2] == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-4}  # null: not finite
    assert lines[2] == '{"step": 3, "loss": null, "grad_norm": null, "lr": 0.0001}'
    def event_files():
        return {p.name: p.stat().st_size for p in tmp_path.glob("events.out.tfevents.*")}

    written = event_files()
    assert written  # TensorBoard's scalars
    with MetricsWriter(tmp_path):  # a run given again once finished logs nothing: no empty event file
        pass
    assert event_files() == written


@pytest.mark.parametrize("cut", ['{"step": 2, "lo', '{"step": 2, "loss": 2.5}'])
def test_a_line_cut_short_is_dropped_before_the_next_record(tmp_path, cut):
    """A process killed mid-write (or a full disk) leaves a last line without its end: half a
    record, or a whole one missing its newline. The next writer removes the half record and ends
    the whole one, so the record it appends is not glued to it and every line is JSON again."""
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 3.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(cut)
    with MetricsWriter(tmp_path) as writer:
        writer.write(2, {"loss": 2.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    whole = [json.loads(cut)] if cut.endswith("}") else []
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 3.0}, *whole, {"step": 2, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text(cut)  # a file holding nothing else
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == (cut + "\n" if whole else "") + '{"step": 1, "loss": 1.0}\n'


def test_a_log_read_back_holds_no_nonfinite_number(tmp_path):
    """Earlier releases wrote NaN and Infinity into metrics.jsonl, where this one writes null: both
    read back as None, so a run's best evaluation and median speed are over its finite values (a
    NaN first made the best loss NaN); a metrics.jsonl that is a directory holds no record."""
    from llama_jax.metrics import read_metrics
    from llama_jax.results import run_outcome

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": NaN, "eval_loss": NaN, "tokens_per_second": Infinity}\n'
        '{"step": 2, "loss": 1e400, "eval_loss": 1.0, "tokens_per_second": 100.0}\n'
        '{"step": 3, "loss": 1.4, "eval_loss": 1.2, "tokens_per_second": 200.0}\n')
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [None, None, 1.4]
    outcome = run_outcome(tmp_path)
    assert (outcome["best_eval_loss"], outcome["tokens_per_second"], outcome["final"]) == (1.0, 150.0, 1.2)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()  # (the sweep report failed on it with a raw errno line)
    assert read_metrics(tmp_path / "metrics.jsonl") == [] and run_outcome(tmp_path)["steps"] == 0


def test_a_run_finishing_while_its_outcome_is_read_is_read_as_not_finished_yet(tmp_path, monkeypatch):
    """A sweep's report while a trial writes its closing evaluation, then progress.json: read in the
    wrong order, the trial was finished with its closing record missing (log damage, no objective)."""
    from llama_jax import results
    from llama_jax.metrics import read_metrics

    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 4}}))
    (tmp_path / "progress.json").write_text(json.dumps({"committed_step": 2}))
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s, **({"eval_loss": 4.0} if s == 2 else {})}) + "\n" for s in range(1, 5)))

    def read_then_the_run_finishes(path):
        records = read_metrics(path)
        with open(path, "a") as log:
            log.write(json.dumps({"step": 4, "eval_loss": 3.5}) + "\n")
        (tmp_path / "progress.json").write_text(json.dumps({"committed_step": 4}))
        return records

    with monkeypatch.context() as m:
        m.setattr(results, "read_metrics", read_then_the_run_finishes)
        outcome = results.run_outcome(tmp_path)
    assert (outcome["complete"], outcome["log_damage"], outcome["steps"]) == (False, None, 4)
    outcome = results.run_outcome(tmp_path)  # read again, once finished
    assert (outcome["complete"], outcome["log_damage"], outcome["final"]) == (True, None, 3.5)


def strict_json(constant: str):
    raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")


def test_metrics_writer_rejects_arrays(tmp_path):
    with MetricsWriter(tmp_path) as writer, pytest.raises(ValueError, match="scalars"):
        writer.write(1, {"loss": jnp.ones(3)})


def test_metrics_writer_sends_scalars_to_tensorboard_when_available(tmp_path, monkeypatch):
    calls = []

    class FakeSummaryWriter:
        def __init__(self, logdir, purge_step=None, filename_suffix=""):
            calls.append(("init", logdir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    with MetricsWriter(tmp_path, first_step=7) as writer:  # a run resumed from step 6
        writer.write(7, {"loss": jnp.float32(1.5), "phase": "eval"})
        writer.write(8, {"grad_norm": float("inf")})  # null in metrics.jsonl, the float itself here
    assert calls == [("init", str(tmp_path), 7), ("loss", 1.5, 7), ("grad_norm", float("inf"), 8), ("close",)]


def test_metrics_writer_leaves_torch_unloaded_and_importable(tmp_path):
    """tensorboardX would import torch (seconds of start-up) if it could; after the writer is open
    torch is still not loaded, and importing it afterwards works."""
    script = ("import sys; from llama_jax.metrics import MetricsWriter\n"
              f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 2.0}}); w.close()\n"
              "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
              "import torch; assert torch.zeros(2).sum().item() == 0.0\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


def test_metrics_writer_is_silent_off_process_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsWriter(tmp_path / "run") as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_closing_does_not_wait_forever_for_tensorboards_writer_thread(tmp_path, monkeypatch):
    """tensorboardX closes by joining its writer thread, which a Ctrl-C inside add_scalar can leave
    waiting on its queue for good; the run's own log is closed either way."""
    import threading
    import time

    from llama_jax import metrics

    monkeypatch.setattr(metrics, "TENSORBOARD_CLOSE_S", 0.2)
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 1.0})
    stuck = threading.Event()
    monkeypatch.setattr(writer._tb, "close", stuck.wait)  # a writer thread that never ends
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 5
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    stuck.set()
