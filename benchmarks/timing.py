"""Shared by the benchmark scripts: the median of repeated calls after warm-up calls, and a scratch
directory that leaves the rest of a user's --workdir alone."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1,
          between: Callable[[], object] | None = None) -> tuple[float, list[float]]:
    """(median seconds, every timed call's seconds) of `fn()`, after `warmup` untimed calls;
    `between` runs untimed after each call (clean-up the next call needs)."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if between is not None:
            between()
    return statistics.median(times), times


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1,
                   between: Callable[[], object] | None = None) -> float:
    return timed(fn, repeats, warmup, between)[0]


@contextlib.contextmanager
def scratch_dir(parent: str, prefix: str = "bench-") -> Iterator[Path]:
    """A new directory inside `parent` (created if missing), removed with its contents on the way
    out, also after an error. Only that directory: `parent` may hold the user's own files."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
