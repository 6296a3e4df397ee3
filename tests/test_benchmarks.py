"""The benchmark scripts' command lines (the benchmarks themselves take minutes and run outside the
suite): every script prints its help, and refuses a count below one, or shapes it cannot run, in
one line before any work. Also the pieces of the scripts that decide what they measure or delete,
run on tiny inputs: the bytes of the decode roofline, the layouts the decode rows get, the
reference of the memory ratios, the scratch directories."""

import ast
import importlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    """Imports a benchmark script as a module (`script("decode")`), its sibling modules found as
    `python benchmarks/NAME.py` finds them; the scripts leave sys.modules after the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = set(sys.modules)
    yield importlib.import_module
    for name in set(sys.modules) - before:
        if Path(getattr(sys.modules[name], "__file__", None) or "").parent == BENCHMARKS:
            del sys.modules[name]


@pytest.mark.parametrize("script, args, message", [
    ("checkpointing.py", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("checkpointing.py", ["--pause", "0"], "argument --pause: must be at least 1, got 0"),
    ("convert_memory.py", ["--layers", "0"], "argument --layers: must be at least 1, got 0"),
    ("convert_memory.py", ["--dim", "100"], "--dim 100 is not a multiple of 24; the checkpoint has 12 heads"),
    ("data_loading.py", ["--steps", "-3"], "argument --steps: must be at least 2, got -3"),
    ("data_loading.py", ["--steps", "1"], "argument --steps: must be at least 2, got 1"),  # no wait to measure
    ("decode.py", ["--batch", "1", "0"], "argument --batch: must be at least 1, got 0"),
    ("decode.py", ["--dim", "32", "--heads", "3"], "--heads 3 does not divide --dim 32"),
    ("decode.py", ["--dim", "30", "--heads", "6"], "--dim 30 / --heads 6 = head dim 5 is odd"),
    ("decode_matmul.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ("gpu.py", ["--repeats-attention", "0"], "argument --repeats-attention: must be at least 1, got 0"),
    ("gpu.py", ["--mfu-candidates", "16:none,foo"], "argument --mfu-candidates: 'foo' is not BATCH:REMAT"),
    ("gpu.py", ["--out", "."], "--out . is a directory; give the path of the results file"),
    ("gpu.py", ["--scan-layers", "maybe"], "argument --scan-layers: expected true or false, got 'maybe'"),
    ("gpu.py", ["--profile", f"{__file__}/traces"], f"--profile {__file__}/traces: {__file__} is a file; give a "
                                                    f"folder for the traces"),
    ("gpu.py", ["--out", f"{__file__}/results.json"],  # a file where its folder should be
     f"--out {__file__}/results.json: cannot create its folder (File exists); give a writable path"),
    ("prepare_data.py", ["--vocab", "0"], "argument --vocab: must be at least 1, got 0"),
    ("scaling.py", ["--devices", "0", "1"], "argument --devices: must be at least 1, got 0"),
    ("scaling.py", ["--devices", "2", "4"], "--devices 2 4 lacks 1; the memory ratios are to one device"),
    ("scaling.py", ["--devices", "1", "3"], "--devices 3 does not divide --memory-batch 8"),
    ("scaling.py", ["--devices", "1", "1024", "--memory-batch", "1024"],
     "--devices 1024 does not divide the model's dim 512"),
    ("scaling.py", ["--dims", "256", "200"], "--dims 200: the dim series gives it 3 heads (dim // 64), which do not "
                                             "divide it into an even head dim"),
    ("scaling.py", ["--dims", "130"], "--dims 130: the dim series gives it 2 heads"),  # head dim 65: odd
    ("trace_summary.py", ["."], ".: no perfetto_trace.json.gz under .; trace with jax.profiler.trace(dir, "
     "create_perfetto_trace=True)"),
    ("trace_summary.py", [".", "--per", "0"], "argument --per: must be at least 1, got 0"),
    ("train_matmul.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("train_step.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ("train_step.py", ["--dim", "32", "--heads", "3"], "--heads 3 does not divide --dim 32"),
])
def test_bad_arguments_are_one_line(script, args, message, tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.startswith(f"{script}: error: {message}") and run.stderr.count("\n") == 1, run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("name", sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "timing.py"))
def test_every_script_prints_its_help(name):
    """With the docstring's whole first paragraph as its description, not a sentence cut where
    the docstring wraps."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / name), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: "), run.stderr
    first_paragraph = ast.get_docstring(ast.parse((BENCHMARKS / name).read_text())).split("\n\n")[0]
    assert "".join(first_paragraph.split()) in "".join(run.stdout.split()), run.stdout  # (help rewraps it)


def test_gpu_script_finds_llama_jax_in_its_checkout(tmp_path):
    """gpu.py runs where llama_jax is not installed, as its docstring says: without the site
    module's .pth files (this checkout's editable install is one) it still imports llama_jax."""
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}  # jax, numpy, ...: not llama_jax
    bare = subprocess.run([sys.executable, "-S", "-c", "import llama_jax"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "No module named 'llama_jax'" in bare.stderr
    run = subprocess.run([sys.executable, "-S", str(BENCHMARKS / "gpu.py"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: gpu.py"), run.stderr


def test_gpu_script_dry_run_measures_every_part(tmp_path):
    """gpu.py waits for a GPU to be lent, and a slot is short: its dry run (tiny shapes on this
    CPU) goes through every part, and each attention variant it times on the GPU computes what
    XLA's float32 attention computes (on CPU the variants ask jax.nn.dot_product_attention for XLA's
    implementation, with each variant's mask, is_causal and sequence-length arguments)."""
    out = tmp_path / "results.json"
    gpu_py = [sys.executable, str(BENCHMARKS / "gpu.py"), "--dry-run", "--out", str(out)]
    one_device = {**os.environ, "XLA_FLAGS": ""}  # not the suite's 8 devices: the script measures one
    run = subprocess.run(gpu_py, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and not out.exists(), run.stderr
    assert "gpu.py: error: it measures one device and this process sees 2; give it one" in run.stderr
    profile = tmp_path / "profile"
    run = subprocess.run(gpu_py + ["--profile", str(profile)], capture_output=True, text=True, timeout=300,
                         env=one_device)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["meta"]["status"] == "done"
    parts = [name for name in results if name[:2] in ("a_", "b_", "c_", "d_", "e_")]
    assert len(parts) == 5 and all(results[name]["status"] == "ok" for name in parts), results
    for name in parts[1:]:  # each train step and the decoding: a kernel-time summary of a real trace
        summary = results[name]["profile"]
        assert summary["kernels"] > 0 and summary["kernel_us"] > 0, summary
        assert sum(kind["share"] for kind in summary["by_kind"].values()) == pytest.approx(1.0)
        assert sum(top["us"] for top in summary["top"]) <= summary["kernel_us"] * (1 + 1e-9)
    assert "HloModule" in (profile / "b_mfu_cudnn" / "hlo.txt").read_text()[:200]
    cudnn_rate = results["b_mfu_cudnn"]["result"]["tokens_per_s"]
    for name, impl in (("d_mfu_xla_reference", "xla"), ("e_mfu_cudnn_packed", "cudnn_packed")):  # b over each
        ratios = {key: value for key, value in results[name].items() if key.startswith("cudnn_over_")}
        assert ratios == {f"cudnn_over_{impl}_tokens_per_s": pytest.approx(
            cudnn_rate / results[name]["result"]["tokens_per_s"])}, (name, ratios)
    variants = {name: row for name, row in results["a_attention"].items()
                if isinstance(row, dict) and "vs_xla_f32" in row}
    assert len(variants) == 5, results["a_attention"]  # the packed-offsets calls need CUDA and record why not
    shape = results["a_attention"]["shape"]
    B, S, H, Dh = (shape[k] for k in ("B", "S", "H", "Dh"))
    model_flops = 3 * 2 * 2 * B * S * S * H * Dh / 2  # as MFU counts attention: causal half, backward 2 x forward
    for name, row in variants.items():  # bf16 against float32: within bf16's rounding of values up to ~8
        assert max(row["vs_xla_f32"].values()) < 0.05, (name, row["vs_xla_f32"])
        assert row["model_tflops_per_s"] == pytest.approx(model_flops / (row["fwd_bwd_ms"] / 1e3) / 1e12), name
    assert results["c_decode"]["result"], results["c_decode"]


def test_decode_rows_get_params_in_their_own_layout(script):
    """`generate` decodes in the layout of the params, whatever `scan_layers` says: the unscanned
    row must get per-layer params, or it times the scanned path again."""
    from llama_jax.config import LLaMAConfig
    from llama_jax.model import init_params

    base = LLaMAConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32, max_seq_len=16)
    stacked = init_params(base)
    rows = script("decode").layout_params(base, stacked, [True, False])
    (scanned_cfg, scanned), (unscanned_cfg, unscanned) = rows["scanned"], rows["unscanned"]
    assert scanned_cfg.scan_layers and "layers" in scanned
    assert not unscanned_cfg.scan_layers and "layers" not in unscanned and {"layers_0", "layers_1"} <= set(unscanned)
    q = stacked["layers"]["attn"]["q"]["kernel"]
    np.testing.assert_array_equal(unscanned["layers_1"]["attn"]["q"]["kernel"], q[1])  # the same weights


def test_decode_roofline_counts_the_kv_cache(script):
    """Bytes one decoded token reads at batch 1: the weights but one row of the input embedding
    table, and every layer's keys and values over every slot of the cache (in the compute dtype)."""
    from llama_jax.config import LLaMAConfig
    from llama_jax.model import init_params

    cfg = LLaMAConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32, max_seq_len=16)
    bytes_per_token = script("decode").bytes_per_token
    # per layer q 16x16, k and v 16x8, o 16x16, gate and up 16x32, down 32x16, two norms of 16: 2,336 weights;
    # two layers, the embedding table and the output projection (64x16 each), the final norm: 6,736; minus 63 rows
    assert bytes_per_token(cfg, init_params(cfg), 10) == {"weights": (6736 - 63 * 16) * 4,
                                                          "kv_cache": 2 * 2 * 2 * 4 * 10 * 4}  # L, k/v, K, Dh, slots
    bf16 = cfg.replace(dtype="bfloat16")
    assert bytes_per_token(bf16, init_params(bf16), 10)["kv_cache"] == 2 * 2 * 2 * 4 * 10 * 2


def test_scaling_ratios_are_to_one_device_wherever_it_is_listed(script):
    mib = 2**20
    plans = [{"devices": n, "params": 100 * mib // n, "opt_state": 200 * mib // n, "temporaries": 40 * mib // n,
              "arguments": 300 * mib // n, "outputs": 300 * mib // n, "aliased": 300 * mib // n} for n in (2, 1)]
    two, one = script("scaling").memory_table(plans)
    assert two == "| 2 | 150.0 | 0.500 | 0.500 | 20.0 | 0.50 | 170.0 | 0.50 |"
    assert one == "| 1 | 300.0 | 1.000 | 1.000 | 40.0 | 1.00 | 340.0 | 1.00 |"


def test_scaling_times_each_step_after_an_untimed_one_of_the_same_model(script):
    """Round-robin over the models, as train_step.py: the first step after another model's
    re-faults the memory that one left, so each timed step follows an untimed one of its own."""
    calls = []
    steps = [lambda name=name: calls.append(name) for name in ("small", "large")]
    times = script("scaling").round_robin(steps, 3)
    assert calls == ["small", "small", "large", "large"] * 3
    assert [len(t) for t in times] == [3, 3] and all(s >= 0 for t in times for s in t)


@pytest.mark.parametrize("name", ["convert_memory", "prepare_data"])
def test_benchmarks_delete_only_their_own_directory_in_workdir(name, script, tmp_path):
    """--workdir may be a folder of the user's: the benchmark works in a new directory inside it
    and removes that one, even when it fails, and nothing else."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the user's")
    scratch_dir = script(name).scratch_dir
    with pytest.raises(RuntimeError, match="a step failed"), scratch_dir(str(workdir)) as work:
        assert work.parent == workdir and list(work.iterdir()) == []
        (work / "hf").mkdir()
        (work / "hf" / "model.safetensors").write_bytes(b"0" * 10)
        raise RuntimeError("a step failed")
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"] and (workdir / "notes.txt").read_text() == "the user's"
    with scratch_dir(str(tmp_path / "new" / "folder")) as work:  # a --workdir that does not exist yet is made
        (work / "out").write_text("x")
    assert list((tmp_path / "new" / "folder").iterdir()) == []


def test_gpu_script_does_not_time_the_packed_kernels_fallback_under_its_name(script, monkeypatch):
    """`cudnn_packed` runs the dense `cudnn` form where jax lacks cuDNN's packed entry point or a
    row holds more documents than it makes room for: gpu.py then says so (part a's variant and
    part e fail with this line) instead of timing the dense form under the packed kernel's name."""
    from llama_jax import attention

    packed_fallback = script("gpu").packed_fallback
    five = np.repeat(np.arange(1, 6), 8)[None].repeat(2, axis=0)  # rows of 5 documents, 40 slots
    forty = np.arange(1, 41)[None].repeat(2, axis=0)  # rows of 40 one-token documents
    monkeypatch.setattr(attention, "_cudnn_packed_entry", lambda: print)  # a jax with the entry point
    assert packed_fallback(five) is None
    assert packed_fallback(forty).startswith("a row holds 40 documents, more than the 32 cudnn_packed makes room for")
    monkeypatch.setattr(attention, "_cudnn_packed_entry", lambda: None)  # a jax without it
    assert "this jax has no cuDNN packed-layout entry point" in packed_fallback(five)


@pytest.mark.parametrize("kind, tbps", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H200", 4.8),
                                        ("NVIDIA A100-SXM4-80GB", 2.0), ("TPU v5 lite", 0.82)])
def test_gpu_decode_roofline_uses_the_devices_own_bandwidth(script, kind, tbps):
    """The datasheet roofline of part c is the device's HBM bandwidth (REFERENCE figures, in
    `llama_jax.metrics`), not the H200's 4.8 TB/s default of --hbm-tbps, which only a device
    missing from the table gets."""
    datasheet_bandwidth = script("gpu").datasheet_bandwidth
    assert datasheet_bandwidth(kind, 4.8) == (tbps * 1e12, f"llama_jax.metrics table for {kind!r}")
    rate, source = datasheet_bandwidth("cpu", 4.8)
    assert rate == 4.8e12 and source.startswith("--hbm-tbps 4.8 (device_kind 'cpu' is not in")


def test_gpu_script_compares_kernels_only_at_the_same_batch_and_remat(script):
    """Part d or e starts at part b's batch and remat policy but runs a later candidate where that
    one does not fit: b's tokens/s over its own would then compare configurations, not kernels."""
    against_b = script("gpu").against_b
    b = {"batch": 16, "remat_policy": "none", "tokens_per_s": 3000.0}
    assert against_b(b, {"batch": 16, "remat_policy": "none", "tokens_per_s": 2000.0}, "xla") == {
        "cudnn_over_xla_tokens_per_s": 1.5}
    assert against_b(b, {"batch": 8, "remat_policy": "dots", "tokens_per_s": 2000.0}, "cudnn_packed") == {
        "cudnn_over_cudnn_packed_note": "not compared: part b ran batch 16, remat none; this part batch 8, remat dots"}


def test_decode_fails_loudly_when_greedy_tokens_differ(script, monkeypatch, capsys):
    """The figures are printed either way, but a llama-jax decoding that differs from transformers'
    is said on stderr and makes the exit status 1 (here a generate that always emits token 3)."""
    import llama_jax.generate

    decode = script("decode")
    tiny = ["--dim", "16", "--layers", "1", "--heads", "2", "--ffn", "32", "--vocab", "64", "--prompt-len", "4",
            "--new-tokens", "3", "--batch", "2", "--repeats", "1", "--scan", "yes"]
    assert decode.main(tiny) == 0 and capsys.readouterr().err == ""
    monkeypatch.setattr(llama_jax.generate, "generate", lambda cfg, params, prompts, n: [[3] * n for _ in prompts])
    assert decode.main(tiny) == 1
    err = capsys.readouterr().err
    assert "decode.py: greedy tokens differ from transformers' (share the same: batch 2 scanned" in err, err
