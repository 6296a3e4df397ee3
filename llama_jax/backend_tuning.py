"""Settings this project applies per backend, in this one place. They are on by default; set the
environment variable LLAMA_JAX_TUNING=0 to run with XLA's and the C library's defaults.

CPU: `xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE` lets XLA's CPU backend
hand elementwise work, transposes among it, to YNNPACK, the library that already runs its matrix
products, instead of emitting loops of its own for it. Applied to the programs that compute gradients
and a batch's metrics (`Trainer`; not the held-out evaluator, `llama_jax.evaluate`); the train step
of `benchmarks/train_step.py` ran 1.2-1.3x faster with it, until the projections' backward
(`llama_jax.model.project`) removed the weight gradients' transposes; since then it is 8% faster
with unrolled layers and makes no measurable difference with scanned ones (`benchmarks/README.md`).
Not to the optimizer update: there it turns every scalar (learning rate, betas, bias corrections)
into a parameter-shaped array and splits the update into more passes over the parameters, 1.7x
the update's time with XLA's own loops. So on a backend with options (CPU) `Trainer.step` runs
the gradients and the update as two programs, the update compiled with XLA's defaults; elsewhere
the step is one program.
Results change only by float32 rounding (the same operations in another order; no approximate
math), within every parity test's tolerance. A jaxlib that does not know the option compiles
without it.

Host memory (any backend; Linux with glibc 2.35 or later and transparent huge pages in `madvise`
mode): XLA's CPU backend allocates its large temporaries afresh for every step, and glibc hands
them back to the system afterwards, so each step faults its temporaries in again, 4 KiB page by
4 KiB page (about 430,000 faults per step of `benchmarks/train_step.py`'s model). The `llama-jax`
command therefore restarts itself once, before it imports JAX, with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, under which glibc asks the kernel for transparent huge
pages for its large blocks (`restart_with_huge_pages`): the same memory, in 2 MiB pages. The
restart keeps the process id, arguments and working directory; no result changes, and the
measured peak memory did not either. A `GLIBC_TUNABLES` that already sets `glibc.malloc.hugetlb`
is left as it is.

GPU: decoding (`llama_jax.generate`'s token loop, a `lax.while_loop`) is compiled with
`xla_gpu_enable_command_buffer` extended by WHILE and CONDITIONAL, so that XLA records the
whole loop, its condition included, as one CUDA graph instead of launching the body's kernels
from the host and reading the condition back on every token. Batch-1 greedy decoding of the
0.89B model of `benchmarks/gpu.py` on an H200 (jax 0.11.2) went from 586 to 678 tokens/s with
the option given in XLA_FLAGS (461 with command buffers off). It changes how kernels are
launched, not what they compute. Training and evaluation keep XLA's defaults there.

TPU: no XLA option is set.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping

DISABLE_ENV = "LLAMA_JAX_TUNING"

XLA_OPTIONS = {  # (platform, program: "train" (gradients, evaluation) or "decode") -> options
    ("cpu", "train"): {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"},
    ("gpu", "decode"): {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"},
}

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the tuning applies: LLAMA_JAX_TUNING unset, empty or 1; 0 turns it off; ValueError
    for anything else (`off` or `false` would otherwise leave it on unnoticed)."""
    value = environ.get(DISABLE_ENV, "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{DISABLE_ENV}={environ[DISABLE_ENV]!r}: valid: 0 (XLA's and the C library's defaults) "
                         f"or 1 (the default: the settings of llama_jax/backend_tuning.py)")
    return value == "1"


def compiler_options(platform: str, program: str = "train") -> dict[str, str]:
    """The XLA options for `program` ("train" or "decode") compiled for `platform` ("cpu", "gpu",
    "tpu"), as `jax.jit`'s `compiler_options`; empty when disabled or when this jaxlib does not
    accept them."""
    return _accepted(platform, program) if enabled() else {}


@functools.cache
def _accepted(platform: str, program: str) -> dict[str, str]:
    import jax

    options = XLA_OPTIONS.get((platform, program), {})
    if not options:
        return {}
    try:  # one tiny compile tells whether this jaxlib knows the options
        probe = jax.device_put(1.0, jax.devices(platform)[0])
        jax.jit(lambda x: x + 1, compiler_options=options).lower(probe).compile()
    except Exception:  # a jaxlib without them: XLA's defaults
        return {}
    return dict(options)


# ---- host memory -----------------------------------------------------------------------------


def transparent_huge_pages_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), None if unknown."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_at_least(version: tuple[int, int]) -> bool:
    """Whether the C library this process runs on is glibc of at least `version`."""
    try:
        name, found = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        return name == "glibc" and tuple(int(p) for p in found.split(".")[:2]) >= version
    except (AttributeError, ValueError, OSError):  # not glibc, or no such query here
        return False


def huge_pages_environment(environ: Mapping[str, str], thp_mode: str | None, glibc_235: bool) -> dict | None:
    """The environment to restart under so that glibc's malloc uses transparent huge pages, or None
    when nothing would change: tuning disabled, a C library other than glibc 2.35+, huge pages off
    ("never") or already used for everything ("always"), or `glibc.malloc.hugetlb` already set."""
    current = environ.get("GLIBC_TUNABLES", "")
    if not enabled(environ) or not glibc_235 or thp_mode != "madvise" or "glibc.malloc.hugetlb" in current:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{HUGE_PAGES_TUNABLE}" if current else HUGE_PAGES_TUNABLE}


def restart_with_huge_pages() -> None:
    """Re-execute the running program (same process id, interpreter, arguments and working
    directory) with glibc's huge-page tunable, when `huge_pages_environment` says it would change
    anything; call it first thing in a program's entry point, before JAX is imported. Returns
    without restarting otherwise, or if the restart cannot be done."""
    if not sys.platform.startswith("linux") or not sys.executable:
        return
    try:
        enabled()
    except ValueError:  # (the command names it)
        return
    environ = huge_pages_environment(os.environ, transparent_huge_pages_mode(), _glibc_at_least((2, 35)))
    if environ is None:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # (None: the program was started without it)
            stream.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:
        return
