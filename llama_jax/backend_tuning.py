"""XLA settings this project applies per backend, in this one place. They are on by default; set
the environment variable LLAMA_JAX_TUNING=0 to compile with XLA's defaults.

CPU: `xla_cpu_experimental_ynn_fusion_type=ELTWISE` lets XLA's CPU backend hand elementwise
work, transposes among it (the weight gradients need the activations transposed), to YNNPACK,
the library that already runs its matrix products, instead of emitting loops of its own for it.
Applied to the train and eval steps (`Trainer`); the train step of `benchmarks/train_step.py`
runs 1.2-1.3x faster with it.
Results change only by float32 rounding (the same operations in another order; no approximate
math), within every parity test's tolerance. A jaxlib that does not know the option compiles
without it.

GPU and TPU: nothing is set.
"""

from __future__ import annotations

import functools
import os

import jax

DISABLE_ENV = "LLAMA_JAX_TUNING"

XLA_OPTIONS = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"},
}


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def compiler_options(platform: str) -> dict[str, str]:
    """The XLA options for programs compiled for `platform` ("cpu", "gpu", "tpu"), as `jax.jit`'s
    `compiler_options`; empty when disabled or when this jaxlib does not accept them."""
    return _accepted(platform) if enabled() else {}


@functools.cache
def _accepted(platform: str) -> dict[str, str]:
    options = XLA_OPTIONS.get(platform, {})
    if not options:
        return {}
    try:  # one tiny compile tells whether this jaxlib knows the options
        probe = jax.device_put(1.0, jax.devices(platform)[0])
        jax.jit(lambda x: x + 1, compiler_options=options).lower(probe).compile()
    except Exception:  # a jaxlib without them: XLA's defaults
        return {}
    return dict(options)

