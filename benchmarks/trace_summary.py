"""Where a program's device time goes, from a `jax.profiler` trace: kernels grouped by name and by
kind (matrix products, attention, XLA's fusions, copies), with counts and total time.

    python benchmarks/trace_summary.py TRACE [--top 25] [--per N]

TRACE is a `perfetto_trace.json.gz`, or a folder given to `jax.profiler.trace(DIR,
create_perfetto_trace=True)` (a run's WORKDIR/profile, `train.profile_steps`), of which the newest
trace under it is read. `--per N` divides counts and times by N (the steps or tokens the trace
covered). Which events count as kernels on each backend: `llama_jax.profiling`.
"""

from __future__ import annotations

import os
import sys

from llama_jax.cli import OneLineParser, positive_int
from llama_jax.profiling import render, summarize


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="a perfetto_trace.json.gz, or a folder holding traces (the newest is read)")
    parser.add_argument("--top", type=positive_int, default=25, help="kernels listed by name")
    parser.add_argument("--per", type=positive_int, default=1, help="divide counts and times by this (steps, tokens)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.trace, args.top, args.per)
    except (OSError, ValueError) as e:  # no trace, or a file that is not one
        parser.error(f"{args.trace}: {e}")
    try:
        print(render(summary), flush=True)
    except BrokenPipeError:  # the reader stopped early (`| head`): the rest goes nowhere, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
