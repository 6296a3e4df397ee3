"""Timing shared by the benchmark scripts: the median of repeated calls after warm-up calls."""

from __future__ import annotations

import statistics
import time
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
