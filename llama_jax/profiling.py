"""Where a program's device time goes: `jax.profiler` traces of training steps, and summaries of
them (kernels grouped by name and by kind: matrix products, attention, XLA's fusions, copies,
collectives).

`summarize(trace_dir)` reads the newest `perfetto_trace.json.gz` under a folder given to
`jax.profiler.trace(dir, create_perfetto_trace=True)`. On a GPU the kernels are the events on the
device's stream lines ("/device:GPU:0", threads "Stream #..."; the derived lines the trace holds
beside them, such as "XLA Ops", would count each kernel twice and are left out); a device
without stream lines (a TPU) counts its "XLA Ops" line if it has one, else all of its lines (not
yet checked on a TPU). On CPU, where there is no device line, the XLA operations run on the
host's XLA threads stand in for kernels, each with its self time (less the operations nested in
it: a loop's body, say), the executor's own bookkeeping left out.

`StepTrace` traces steps of a run (`train.profile_steps`, from `train.profile_start`) into
WORKDIR/profile, readable with TensorBoard's profile plugin or at ui.perfetto.dev, and writes
the summary beside it.
"""

from __future__ import annotations

import collections
import gzip
import json
import zlib
from pathlib import Path

# Kernel kinds by substrings of the kernel's name, first match wins (lower case).
KINDS = (
    ("collective / wait", ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective", "nccl",
                           "rendezvous", "wait")),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("matrix product", ("gemm", "gemv", "xmma", "cutlass", "nvjet", "cublas", "dot", "matmul")),
    ("copy / memset", ("memcpy", "memset", "copy")),
    ("reduction fusion", ("reduce", "reduction", "input_")),
    ("other fusion", ("fusion", "loop_", "triton")),
)
_HOST_XLA_THREADS = ("tf_XLAPjRtCpuClient", "tf_XLAEigen")  # the threads XLA's CPU backend runs operations on
_HOST_BOOKKEEPING = ("ThreadpoolListener", "ThunkExecutor", "SlinkyThreadPool", "end: ")


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in KINDS if any(m in lower for m in marks)), "other")


TRACE_FILE = "perfetto_trace.json.gz"


def traces(trace_dir: str | Path) -> set[Path]:
    """Every Perfetto trace under `trace_dir`."""
    return set(Path(trace_dir).glob(f"**/{TRACE_FILE}"))


def latest_trace(trace: str | Path) -> Path:
    """`trace` itself if it is a file, else the newest Perfetto trace under it."""
    if Path(trace).is_file():
        return Path(trace)
    found = sorted(traces(trace), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {TRACE_FILE} under {trace}; trace with "
                                f"jax.profiler.trace(dir, create_perfetto_trace=True)")
    return found[-1]


def read_events(path: Path) -> list[dict]:
    """The events of a Perfetto trace file; ValueError for one that is damaged or not a trace."""
    try:
        with gzip.open(path) as f:
            data = json.load(f)
    except (EOFError, zlib.error, gzip.BadGzipFile, ValueError) as e:  # cut short, corrupt, not JSON
        raise ValueError(f"{path} is not a readable Perfetto trace ({type(e).__name__}: {e})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError(f"{path} is not a Perfetto trace (no list of trace events)")
    return events


def kernel_events(events: list[dict]) -> tuple[list[dict], str]:
    """The kernel events of a trace's event list, and where they came from."""
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    on_device = [e for e in timed if e["pid"] in devices]
    if on_device:
        for line, source in (("Stream", "device streams"), ("XLA Ops", "device XLA Ops line")):
            chosen = [e for e in on_device if thread.get((e["pid"], e.get("tid")), "").startswith(line)]
            if chosen:
                return chosen, source
        return on_device, "device lines"
    by_thread: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in timed:
        key = (e["pid"], e.get("tid"))
        if thread.get(key, "").startswith(_HOST_XLA_THREADS):
            by_thread[key].append(e)
    host = [e for events_of_thread in by_thread.values() for e in _self_times(events_of_thread)
            if not e["name"].startswith(_HOST_BOOKKEEPING)]
    return host, "host XLA threads (no device line: CPU; self times)"


def _self_times(events: list[dict]) -> list[dict]:
    """Copies of one thread's events with each duration less its nested events' (an XLA CPU
    thread's operations nest: a while loop holds its body's, the executor holds them all), each
    with its own end ("end", for the span)."""
    out, open_events = [], []  # open_events: (end, copy) of the events enclosing the current one
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while open_events and open_events[-1][0] <= e["ts"]:
            open_events.pop()
        if open_events:
            open_events[-1][1]["dur"] -= e["dur"]
        copy = {**e, "end": e["ts"] + e["dur"]}
        open_events.append((copy["end"], copy))
        out.append(copy)
    return out


def summarize(trace: str | Path, top: int = 25, per: float = 1.0) -> dict:
    """Kernel time by kind and the `top` kernels by total time of a trace file (or of the newest one
    under a folder); times in microseconds, divided by `per`. ValueError for a damaged trace."""
    path = latest_trace(trace)
    events = read_events(path)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    try:
        kernels, source = kernel_events(events)
        for e in kernels:
            by_name[str(e["name"])].append(float(e["dur"]))
        span = _span(kernels)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # events without a trace's fields
        raise ValueError(f"{path} is not a Perfetto trace ({type(e).__name__}: {e})") from None
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
            "kernel_us": total / per, "span_us": span / per,
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["us"])),
            "top": [{"name": name[:160], "kind": kind_of(name), "count": len(d) / per, "us": sum(d) / per,
                     "mean_us": sum(d) / len(d)} for name, d in ranked]}


def _span(events: list[dict]) -> float:
    """Microseconds from the first kernel's start to the last one's end (a self time's copy keeps its
    event's end)."""
    if not events:
        return 0.0
    return max(e.get("end", e["ts"] + e["dur"]) for e in events) - min(e["ts"] for e in events)


def render(summary: dict) -> str:
    lines = [f"{summary['trace']} ({summary['source']}), per {summary['per']:g}: {summary['kernels']:,.1f} kernels, "
             f"{summary['kernel_us']:,.1f} us of kernel time in a span of {summary['span_us']:,.1f} us"]
    lines += [f"  {kind:<20} {e['count']:>10,.1f} {e['us']:>12,.1f} us {e['share']:>6.1%}"
              for kind, e in summary["by_kind"].items()]
    lines += [f"  {e['us']:>12,.1f} us {e['count']:>8,.1f} x {e['mean_us']:>9,.2f} us  {e['name']}"
              for e in summary["top"]]
    return "\n".join(lines)


PROFILE_DIR = "profile"


class StepTrace:
    """Trace steps [start, start + count) of a run with `jax.profiler` into `directory`, on this
    process only (each process would write its own trace; the run loop makes one for process 0).
    `before(step, state)` is called before each step's dispatch and `after(step, state)` after its
    evaluation, sample and checkpoint save, if due (so those of the last traced step are in the
    trace too); the first traced step waits for the steps before it and the last one for itself.
    Once the trace ends, `directory/summary-A-B.json` (`summarize` of the trace just written, per
    step) is written and `say` gets one line saying where it all is. A trace that cannot start, be
    written or be summarized is said in one line too; the run goes on either way. `first`: the
    process's first step, which compiles (step 1, or the one a resume starts at); a window holding
    it is not traced (said in one line), nor one that ended before it (an earlier process's)."""

    def __init__(self, directory: Path, start: int, count: int, say, first: int = 1):
        self.directory, self.start, self.stop, self._say = Path(directory), start, start + count - 1, say
        self.active, self.earlier = False, set()
        if start <= first <= self.stop:
            self.say(f" not taken: this run resumed at step {first}, inside it (a process's first step compiles)")
        self.taken = start > first  # (a window before `first` is done: traced, or said, by an earlier process)

    def say(self, text: str) -> None:
        steps = f"step {self.start}" if self.start == self.stop else f"steps {self.start}-{self.stop}"
        self._say(f"profile of {steps}{text}")

    def before(self, step: int, state) -> bool:
        """Start tracing if `step` is the first traced one; True once it has started."""
        import jax

        if not self.taken or step != self.start or self.active:
            return False
        jax.block_until_ready(state)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.earlier = traces(self.directory)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
        except Exception as e:  # e.g. another trace running in this process
            self.say(f" not taken: {type(e).__name__}: {e}")
            return False
        self.active = True
        return True

    def after(self, step: int, state) -> bool:
        """End the trace if `step` is the last traced one; True once it has ended."""
        import jax

        if not (self.active and step == self.stop):
            return False
        jax.block_until_ready(state)
        if not self.close():
            return True
        name = f"summary-{self.start}-{self.stop}.json"
        written = sorted(traces(self.directory) - self.earlier)
        try:
            if len(written) != 1:
                raise ValueError(f"{len(written)} new {TRACE_FILE} files under it, not one")
            summary = summarize(written[0], per=self.stop - self.start + 1)
            (self.directory / name).write_text(json.dumps(summary, indent=1) + "\n")
        except (OSError, ValueError) as e:  # the trace is there; only its summary is not
            self.say(f": {self.directory} (TensorBoard's profile plugin); no summary: {e}")
            return True
        kinds = ", ".join(f"{kind} {entry['share']:.0%}" for kind, entry in list(summary["by_kind"].items())[:4])
        self.say(f": {self.directory} (TensorBoard's profile plugin, or {written[0].relative_to(self.directory)} at "
                 f"ui.perfetto.dev; {name}); per step {summary['kernels']:,.0f} kernels, "
                 f"{summary['kernel_us'] / 1e3:,.1f} ms on {summary['source']}: {kinds}")
        return True

    def close(self, cut_short: bool = False) -> bool:
        """Stop the trace and write it; False, said in a line, if that failed. `cut_short`: the run
        ends inside the window (preempted, or stopped by an error), which is said too."""
        import jax

        if not self.active:
            return False
        self.active = False
        try:
            jax.profiler.stop_trace()
        except Exception as e:  # e.g. a full disk, or a file where its folder should be
            _forget_failed_trace()
            self.say(f": the trace could not be written to {self.directory}: {type(e).__name__}: {e}")
            return False
        if cut_short:
            self.say(f": the run ended inside it; the trace so far is in {self.directory} (no summary)")
        return True


def _forget_failed_trace() -> None:
    """After a `stop_trace` that failed to write, jax still holds the stopped session as the running
    one, and every later `start_trace` in the process would fail; clear it (jax's private state,
    where it is as in jax 0.10)."""
    try:
        from jax._src import profiler

        with profiler._profile_state.lock:
            profiler._profile_state.reset()
    except (ImportError, AttributeError):
        pass
