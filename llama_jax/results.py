"""A sweep's results, read back from the files its runs wrote: a table (CSV and Markdown) and plots.

Nothing here depends on the sweep process being alive: `llama-jax sweep --workdir DIR --report`
rebuilds everything from the sweep's `sweep.json` and each trial's `trial.json`, `config.json`,
`metrics.jsonl` and `progress.json`, also while trials are still running.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from llama_jax.metrics import last_per_step, read_metrics
from llama_jax.safe_io import atomic_file, holds_lock

OBJECTIVE_LABELS = {"eval_loss": "final eval loss", "loss": "final train loss"}  # how plots name what a sweep ranks by
COLUMNS = ("status", "steps", "final_eval_loss", "best_eval_loss", "final_train_loss", "tokens_per_second")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_outcome(directory: Path, objective: str = "eval_loss") -> dict[str, Any]:
    """What a run's files say: steps done, losses, throughput (the median of the logged tokens/s),
    whether it reached train.steps, `final` (the last value of `objective`, what a sweep minimises)
    and `loss_curve`, the logged (step, training loss) pairs."""
    # progress.json before the log: a run records its last step there only once the log holds that
    # step's records, so a run finishing between the two reads is read as not finished yet (read the
    # other way round, as finished with its closing records missing)
    committed = _json(directory / "progress.json").get("committed_step")
    committed = committed if type(committed) is int else None  # (a damaged record counts as none)
    records = read_metrics(directory / "metrics.jsonl")
    train, evals = last_per_step(records, "loss"), last_per_step(records, "eval_loss")
    speed = last_per_step(records, "tokens_per_second")
    train_config = _json(directory / "config.json").get("train")
    target = train_config.get("steps") if isinstance(train_config, dict) else None
    steps = max([s for s, _ in train] + [committed or 0])
    complete = isinstance(target, int) and isinstance(committed, int) and committed >= target
    # a finished run logged its last step (and its closing evaluation there): final values of an earlier
    # step, where the log lost its last lines, would rank the run by what it was not
    at = target if complete else None
    return {
        "steps": steps,
        "complete": complete,
        "final_eval_loss": _last(records, "eval_loss", at),
        "best_eval_loss": min(v for _, v in evals) if evals else None,
        "final_train_loss": _last(records, "loss", at),
        # the median of the logged windows: the last alone may hold a checkpoint's save
        "tokens_per_second": statistics.median(v for _, v in speed) if speed else None,
        "final": _last(records, objective, at),
        "log_damage": _log_damage(directory, records, at),
        "loss_curve": train,
    }


def _log_damage(directory: Path, records: list[dict], last_step: int | None) -> str | None:
    """What a finished run's metrics.jsonl lacks of its `last_step` (the training record, and the
    closing evaluation where the run evaluated), if anything: lines lost to damage or removal."""
    if last_step is None:
        return None
    lacking = [what for what, key in (("training", "loss"), ("evaluation", "eval_loss"))
               if _last(records, key, last_step) is None and (key == "loss" or any(key in r for r in records))]
    if not lacking:
        return None
    return (f"{directory / 'metrics.jsonl'} holds no {' or '.join(lacking)} record of the last step, {last_step} "
            f"(damaged or removed): the run's final values are left out")


def _last(records: list[dict], key: str, at: int | None = None) -> float | None:
    """`key` of the last record holding it: NaN where that record has null (the run logged a
    non-finite value, e.g. on a step `train.on_nonfinite=skip` passed over); None if none has it,
    or if that record is not of step `at` (when given)."""
    held = [r for r in records if key in r]
    if not held or at is not None and held[-1]["step"] != at:
        return None
    return held[-1][key] if isinstance(held[-1][key], (int, float)) else math.nan


def finished_status(outcome: dict) -> str:
    """A complete run's status: `diverged` where its objective ended non-finite, else `done`."""
    final = outcome["final"]
    return "diverged" if final is not None and not math.isfinite(final) else "done"


def sweep_objective(spec: dict, trials: list[Path]) -> str:
    """The metric the sweep of `spec` (its sweep.json) ranks trials by: recorded there, or, for a
    sweep.json written before it was recorded, decided from the config file, else from the config
    a trial (of `trials`, its directories) ran."""
    from llama_jax.experiment import load_config
    from llama_jax.sweep import objective_key

    if spec.get("objective") in OBJECTIVE_LABELS:
        return spec["objective"]
    for path, overrides in [(spec.get("config"), spec.get("overrides", [])),
                            *((trial / "config.json", []) for trial in trials)]:
        try:
            return objective_key(load_config(path, overrides))
        except (TypeError, ValueError):
            continue
    return "eval_loss"


def collect(workdir: Path, spec: dict) -> tuple[list[str], list[dict[str, Any]], str]:
    """(swept keys, one row per trial, the objective), best first: finished trials by their final
    objective. `spec`: the sweep's sweep.json, as read (`sweep.saved_spec`)."""
    from llama_jax.sweep import TRIAL_FILE, read_trial, trial_directories

    keys = list(spec["axes"])
    sweep_running = holds_lock(workdir)
    trials = trial_directories(workdir)  # (a damaged record's trial gets its row)
    objective = sweep_objective(spec, trials)
    rows = []
    for directory in trials:
        trial = read_trial(directory)
        outcome = run_outcome(directory, objective)
        status = trial.get("status", "unknown")
        if status in ("running", "submitted", "interrupted") and outcome["complete"]:
            # finished since the sweep last looked (or on a cluster), or after the SIGTERM of an interrupted
            # sweep had reached it past its last step
            status = finished_status(outcome)
        elif status == "running" and not sweep_running:
            status = "interrupted"  # its sweep was killed before it could say so; a re-run resumes it
        row = {"run": directory.name, **{k: trial.get("overrides", {}).get(k) for k in keys}, "status": status}
        row.update({k: outcome[k] for k in COLUMNS[1:]})
        row["objective"] = outcome["final"]
        row["error"] = trial.get("error") or outcome["log_damage"] or ""
        if not trial:  # (its status: unknown)
            row["error"] = f"{directory / TRIAL_FILE} is damaged; run the sweep command again to rewrite it"
        row["curve"] = outcome["loss_curve"]
        rows.append(row)
    rows.sort(key=_rank)
    return keys, rows, objective


def _rank(row: dict) -> tuple:
    value = row["objective"]
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    return (row["status"] != "done", not finite, value if finite else 0.0, row["run"])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # (thousands separated, as tokens/s; a swept 1e30 is not written out in digits)
        return f"{value:,.0f}" if 1e4 <= abs(value) < 1e12 else f"{value:.4g}"
    return str(value)


def _markdown_cell(value: Any) -> str:
    """`_cell` as a cell of a Markdown table's row: no '|' (a column's end) nor line break (the row's)."""
    return " ".join(_cell(value).replace("|", "/").splitlines())


def write_tables(workdir: Path, keys: list[str], rows: list[dict]) -> str:
    """DIR/results.csv and DIR/results.md, each replaced whole or not at all; returns the Markdown table."""
    header = ["run", *keys, *COLUMNS, "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_markdown_cell(row[h]) for h in header) + " |" for row in rows]
    table = "\n".join(lines) + "\n"
    # both destinations are checked before either is replaced
    with atomic_file(workdir / "results.csv") as csv_tmp, atomic_file(workdir / "results.md") as md_tmp:
        with open(csv_tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row in rows:
                writer.writerow(["" if row[h] is None else row[h] for h in header])
        md_tmp.write_text(table)
    return table


def plot(workdir: Path, keys: list[str], rows: list[dict], objective_label: str) -> list[Path]:
    """Final objective against each swept key (one line per value of another key with few
    values), and every run's training-loss curve; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stale in workdir.glob(f"{objective_label.replace(' ', '_')}_vs_*.png"):  # a key may have no plot now
        stale.unlink(missing_ok=True)  # (or by another report rebuilding them at once)
    finished = [r for r in rows if r["status"] == "done"  # a pruned, failed or interrupted run's last loss is not final
                and isinstance(r["objective"], (int, float)) and math.isfinite(r["objective"])]
    for key in keys:
        numeric = [r for r in finished if isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        if not numeric:
            continue
        others = [k for k in keys if k != key and 1 < len({str(r[k]) for r in numeric}) <= 6]
        group = others[0] if others else None
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in sorted({str(r[group]) for r in numeric} if group else {""}):
            points = sorted((r[key], r["objective"]) for r in numeric if not group or str(r[group]) == label)
            ax.plot(*zip(*points), "o-", label=f"{group}={label}" if group else None)
        values = [r[key] for r in numeric]
        if min(values) > 0 and max(values) / min(values) >= 10:  # a decade or more
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(objective_label)
        ax.grid(alpha=0.3)
        if group:
            ax.legend()
        fig.tight_layout()
        path = workdir / f"{objective_label.replace(' ', '_')}_vs_{key}.png"
        _save_figure(fig, path)
        written.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    with_curves = [r for r in rows if r["curve"]]
    for r in with_curves:
        ax.plot(*zip(*r["curve"]), label=r["run"], alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    if 0 < len(with_curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, workdir / "loss_curves.png")
    written.append(workdir / "loss_curves.png")
    return written


def _save_figure(fig, path: Path) -> None:
    """Write `fig` to the PNG `path`, which is replaced whole or not at all; close the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def report(workdir: str | Path, out=None) -> str:
    """Rebuild results.csv, results.md and the plots from the runs' files; return the table. (`out`:
    where a line that sweep.json was read from the trials' copy goes; default stderr, beside the table.)"""
    from llama_jax.sweep import SPEC_FILE, SweepError, saved_spec

    workdir = Path(workdir).absolute()
    out = out or functools.partial(print, file=sys.stderr)
    # (a damaged sweep.json no trial keeps a copy of: refused, nothing rewritten)
    spec = saved_spec(workdir, out)
    if not spec:
        raise SweepError(f"{workdir} holds no sweep ({SPEC_FILE} not found); give the --workdir of a sweep")
    keys, rows, objective = collect(workdir, spec)
    if not rows:
        out(f"{workdir}: no trial of this sweep has started yet (no trial directory), so the table has no rows")
    table = write_tables(workdir, keys, rows)
    plot(workdir, keys, rows, OBJECTIVE_LABELS[objective])
    return table
