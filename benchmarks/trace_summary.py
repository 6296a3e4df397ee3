"""Where a program's device time goes, from a `jax.profiler` trace: kernels grouped by name and by
kind (matrix products, attention, XLA's fusions, copies), with counts and total time.

    python benchmarks/trace_summary.py TRACE_DIR [--top 25] [--per N]

TRACE_DIR is the folder given to `jax.profiler.trace(TRACE_DIR, create_perfetto_trace=True)`;
the newest `perfetto_trace.json.gz` under it is read. On a GPU the kernels are the events on the
device's stream lines ("/device:GPU:0", threads "Stream #..."; the derived lines XLA adds beside
them, such as "XLA Ops", would count each kernel twice and are left out). On CPU, where there is no
device line, the XLA operations run on the host's XLA client threads stand in for kernels, so that
the summary can be checked without a GPU. `--per N` divides counts and times by N (the steps or
tokens the trace covered).
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

from llama_jax.cli import OneLineParser, positive_int

# Kernel kinds by substrings of the kernel's name, first match wins (lower case).
KINDS = (
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("matrix product", ("gemm", "gemv", "xmma", "cutlass", "nvjet", "cublas", "dot", "matmul")),
    ("copy / memset", ("memcpy", "memset", "copy")),
    ("reduction fusion", ("reduce", "reduction", "input_")),
    ("other fusion", ("fusion", "loop_", "triton")),
)
_HOST_BOOKKEEPING = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "end: ")


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in KINDS if any(m in lower for m in marks)), "other")


def latest_trace(trace_dir: str | Path) -> Path:
    found = sorted(Path(trace_dir).glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}; trace with "
                                f"jax.profiler.trace(dir, create_perfetto_trace=True)")
    return found[-1]


def kernel_events(events: list[dict]) -> tuple[list[dict], str]:
    """The kernel events of a trace's event list, and where they came from."""
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    on_device = [e for e in timed if e["pid"] in devices]
    if on_device:
        streams = [e for e in on_device if thread.get((e["pid"], e.get("tid")), "").startswith("Stream")]
        return (streams, "device streams") if streams else (on_device, "device lines")
    host = [e for e in timed if thread.get((e["pid"], e.get("tid")), "").startswith("tf_XLAPjRtCpuClient")
            and not e["name"].startswith(_HOST_BOOKKEEPING)]
    return host, "host XLA client threads (no device line: CPU)"


def summarize(trace_dir: str | Path, top: int = 25, per: float = 1.0) -> dict:
    """Kernel time by kind and the `top` kernels by total time; times in microseconds, divided by `per`."""
    path = latest_trace(trace_dir)
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    kernels, source = kernel_events(events)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e["name"]].append(float(e["dur"]))
    total = sum(sum(d) for d in by_name.values())
    kinds: dict[str, dict] = {}
    for name, durations in by_name.items():
        entry = kinds.setdefault(kind_of(name), {"count": 0, "us": 0.0})
        entry["count"] += len(durations) / per
        entry["us"] += sum(durations) / per
    for entry in kinds.values():
        entry["share"] = entry["us"] * per / total if total else 0.0
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {"trace": str(path), "source": source, "per": per, "kernels": len(kernels) / per,
            "kernel_us": total / per, "span_us": _span(kernels) / per,
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["us"])),
            "top": [{"name": name[:160], "kind": kind_of(name), "count": len(d) / per, "us": sum(d) / per,
                     "mean_us": sum(d) / len(d)} for name, d in ranked]}


def _span(events: list[dict]) -> float:
    """Microseconds from the first kernel's start to the last one's end."""
    if not events:
        return 0.0
    return max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)


def render(summary: dict) -> str:
    lines = [f"{summary['trace']} ({summary['source']}), per {summary['per']:g}: {summary['kernels']:,.1f} kernels, "
             f"{summary['kernel_us']:,.1f} us of kernel time in a span of {summary['span_us']:,.1f} us"]
    lines += [f"  {kind:<20} {e['count']:>10,.1f} {e['us']:>12,.1f} us {e['share']:>6.1%}"
              for kind, e in summary["by_kind"].items()]
    lines += [f"  {e['us']:>12,.1f} us {e['count']:>8,.1f} x {e['mean_us']:>9,.2f} us  {e['name']}"
              for e in summary["top"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--top", type=positive_int, default=25, help="kernels listed by name")
    parser.add_argument("--per", type=positive_int, default=1, help="divide counts and times by this (steps, tokens)")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.trace_dir, args.top, args.per)
    except (OSError, ValueError, KeyError) as e:  # no trace, or a file that is not one
        parser.error(f"{args.trace_dir}: {e}")
    print(render(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
