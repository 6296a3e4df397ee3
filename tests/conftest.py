"""Test setup: 8 virtual CPU devices, so sharded code paths really run on several devices."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402,F401  (imported after XLA_FLAGS on purpose)
