"""The benchmark scripts' command lines (the benchmarks themselves take minutes and run outside the
suite): every script prints its help, and refuses a count below one in one line before any work."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.parametrize("script, args, message", [
    ("checkpointing.py", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    ("convert_memory.py", ["--layers", "0"], "argument --layers: must be at least 1, got 0"),
    ("data_loading.py", ["--steps", "-3"], "argument --steps: must be at least 1, got -3"),
    ("decode.py", ["--batch", "1", "0"], "argument --batch: must be at least 1, got 0"),
    ("decode_matmul.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    ("gpu.py", ["--repeats-attention", "0"], "argument --repeats-attention: must be at least 1, got 0"),
    ("gpu.py", ["--mfu-candidates", "16:none,foo"], "argument --mfu-candidates: 'foo' is not BATCH:REMAT"),
    ("gpu.py", ["--out", "."], "--out . is a directory; give the path of the results file"),
    ("gpu.py", ["--out", f"{__file__}/results.json"],  # a file where its folder should be
     f"--out {__file__}/results.json: cannot create its folder (File exists); give a writable path"),
    ("prepare_data.py", ["--vocab", "0"], "argument --vocab: must be at least 1, got 0"),
    ("scaling.py", ["--devices", "0", "1"], "argument --devices: must be at least 1, got 0"),
    ("train_matmul.py", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("train_step.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
])
def test_bad_arguments_are_one_line(script, args, message, tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.startswith(f"{script}: error: {message}") and run.stderr.count("\n") == 1, run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "timing.py"))
def test_every_script_prints_its_help(script):
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: "), run.stderr
