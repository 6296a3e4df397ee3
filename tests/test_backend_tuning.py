"""Host-memory tuning of `llama_jax.backend_tuning`: when the `llama-jax` command restarts itself
with glibc's huge-page tunable, and that the restarted process really gets huge pages."""

import os
import subprocess
import sys
import textwrap

import pytest

from llama_jax.backend_tuning import (HUGE_PAGES_TUNABLE, _glibc_at_least, huge_pages_environment,
                                      transparent_huge_pages_mode)

PAGES_4K = 256 * 2**20 // 4096  # page faults of touching a fresh 256 MiB block in 4 KiB pages


@pytest.mark.parametrize("environ, thp, glibc, tunables", [
    ({}, "madvise", True, HUGE_PAGES_TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", True, f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", True, None),  # the user's own choice
    ({"LLAMA_JAX_TUNING": "0"}, "madvise", True, None),
    ({}, "always", True, None),  # every large block gets huge pages already
    ({}, "never", True, None),
    ({}, None, True, None),  # no transparent huge pages in this kernel
    ({}, "madvise", False, None),  # not glibc 2.35+: no such tunable
])
def test_when_to_restart(environ, thp, glibc, tunables):
    env = huge_pages_environment({"HOME": "/h", **environ}, thp, glibc)
    if tunables is None:
        assert env is None
    else:
        assert env == {"HOME": "/h", **environ, "GLIBC_TUNABLES": tunables}


# Prints its pid and GLIBC_TUNABLES, runs `llama-jax presets` as the program (argv None), then counts
# the page faults of touching 256 MiB that glibc's malloc hands out.
PROGRAM = textwrap.dedent("""
    import ctypes, os, resource, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
    sys.argv = ["llama-jax", "presets"]
    from llama_jax.cli import main
    assert main() == 0
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(libc.malloc(256 * 2**20), 1, 256 * 2**20)
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def run_program(env: dict) -> tuple[list[list[str]], int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True,
                         env=env).stdout.splitlines()
    starts = [line.split() for line in out if line.startswith("start ")]
    assert any(line.startswith("llama1-7b") for line in out)  # the command itself ran
    return starts, int(next(line for line in out if line.startswith("faults ")).split()[1])


def test_command_restarts_once_with_huge_pages():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LLAMA_JAX_TUNING")}
    applies = huge_pages_environment(env, transparent_huge_pages_mode(), _glibc_at_least((2, 35))) is not None
    starts, faults = run_program(env)
    if not applies:  # this machine has nothing to gain: the command runs as it was started
        assert len(starts) == 1
        return
    # the same process (exec keeps the pid) started again, once, now with the tunable
    assert [s[2] for s in starts] == ["None", HUGE_PAGES_TUNABLE] and starts[0][1] == starts[1][1]
    assert faults < PAGES_4K / 8, faults  # 2 MiB pages: a few hundred faults instead of 65,536

    starts, faults = run_program({**env, "LLAMA_JAX_TUNING": "0"})
    assert [s[2] for s in starts] == ["None"] and faults >= PAGES_4K  # turned off: 4 KiB pages


def test_compiler_options_by_backend_and_program(monkeypatch):
    """The CPU's option is for training programs; decoding there compiles with XLA's defaults (the
    command buffers decoding gets on GPU are no CPU option); LLAMA_JAX_TUNING=0 turns them off."""
    from llama_jax import backend_tuning
    from llama_jax.generate import _decode, _decode_for

    assert backend_tuning.compiler_options("cpu", "train") == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"}
    assert backend_tuning.compiler_options("cpu", "decode") == {} and _decode_for("cpu") is _decode
    assert backend_tuning.compiler_options("gpu", "decode") == {}  # no GPU here: nothing to compile for
    monkeypatch.setenv("LLAMA_JAX_TUNING", "0")
    assert backend_tuning.compiler_options("cpu", "train") == {}


@pytest.mark.parametrize("value, applies", [("1", True), ("", True), (" 0 ", False), ("off", None), ("false", None)])
def test_the_switch_takes_0_or_1_and_refuses_the_rest(value, applies, monkeypatch, capsys):
    """`off` or `false` left the tuning on, unnoticed: a value other than 0 or 1 is refused in one line."""
    from llama_jax import backend_tuning
    from llama_jax.cli import main

    monkeypatch.setenv("LLAMA_JAX_TUNING", value)
    if applies is not None:
        assert backend_tuning.enabled() is applies
        return
    assert main(["presets"]) == 2
    assert capsys.readouterr().err == (f"llama-jax presets: error: LLAMA_JAX_TUNING={value!r}: valid: 0 (XLA's and "
                                       f"the C library's defaults) or 1 (the default: the settings of "
                                       f"llama_jax/backend_tuning.py)\n")


@pytest.mark.parametrize("platforms, reason", [
    ("bogus", r"Unable to initialize backend 'bogus': Backend 'bogus' is not in the list of known backends: .*"),
    ("cuda", r"no JAX backend could start"),  # no CUDA plugin here: JAX failed an assertion
])
def test_a_jax_platform_that_cannot_start_is_one_line(platforms, reason):
    """JAX_PLATFORMS naming a backend this machine lacks was a traceback out of the first JAX call."""
    import re

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    run = subprocess.run([sys.executable, "-m", "llama_jax.cli", "plan", "--config", config],
                         env={**env, "JAX_PLATFORMS": platforms, "LLAMA_JAX_TUNING": "0"}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert re.fullmatch(rf"llama-jax plan: error: JAX_PLATFORMS='{platforms}': {reason}; name the backends this "
                        rf"machine has \(e.g. cpu\), or unset it\n", run.stderr), run.stderr
