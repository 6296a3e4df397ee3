"""Test setup: 8 virtual CPU devices, so sharded code paths really run on several devices, and one
persistent XLA compilation cache for each test process (pytest-xdist's workers have one each),
shared with the `llama-jax` processes its tests start (dozens of them compile the same tiny models).
Ctrl-C is handled as a terminal gives it even where the suite runs as a shell's background job,
which starts with it ignored: the tests that send SIGINT, to themselves or to the commands they
start, test what Ctrl-C does."""

import os
import shutil
import signal
import tempfile

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # inherited by the processes the tests start, too
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="llama-jax-tests-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny models compile in well under 1 s

import jax  # noqa: E402,F401  (imported after XLA_FLAGS on purpose)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)
