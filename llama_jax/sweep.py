"""Hyperparameter sweeps: many `llama-jax train` runs of one config, with a results table and plots.

A sweep is a config file plus axes (`--sweep optimizer.lr=[1e-3,3e-3]`, or `get_sweep()` in the
config file) and a search: `grid` (the cartesian product of lists), `random` (`--trials N` draws
from lists and distributions) or `optuna` (TPE, with a median pruner fed by the runs' losses).
Every trial is a separate `llama-jax train` process in its own sub-directory of the sweep's
workdir, so it resumes like any run; the sweep talks to it only through its command line and the
files it writes (`config.json`, `metrics.jsonl`, `progress.json`). Results are always rebuilt
from those files (`results.py`), so `--report` works at any time.

A raw text source (embedded, stdlib, text, jsonl, tfds) that no axis changes is prepared once, into
DIR/data, and every trial reads it as `data.source=prepared` (`shared_data`), instead of each
trial tokenizing the corpus again.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from llama_jax.experiment import (LATER_KEYS, NONFINITE_STOP, NOT_A_LITERAL, _failure, _parse, apply_override,
                                  check_experiment, config_module, load_config, value_at)
from llama_jax.safe_io import (DirectoryLock, check_outside_runs_and_models, check_writable, holds_lock, holds_run,
                               real_path, saved_run_setting, signals_held, write_json_atomic, write_text_atomic)
from llama_jax.signals import child_setup

SEARCHES = ("grid", "random", "optuna")
SPEC_FILE = "sweep.json"  # what the sweep is: a workdir holds one sweep
TRIAL_FILE = "trial.json"  # in each trial's directory: its overrides and status
LOG_FILE = "train.log"  # the trial process's output
STUDY_FILE = "optuna.db"  # the Optuna study (SQLite), for resuming and for optuna-dashboard
DATA_DIR = "data"  # a raw source prepared once for all trials
FINISHED = ("done", "diverged", "pruned")  # statuses a re-run skips
POLL_SECONDS = 0.2  # how often the driver reads running trials' metrics (for the pruner) and sees which ended
MAX_TRIALS = 10_000  # more is a mistake in the axes (a sweep lists its trials before it starts)


class SweepError(ValueError):
    """A problem with the sweep's definition or workdir: one line, before anything runs."""


# ---- search spaces -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grid:
    """Every value in turn (grid search); one drawn uniformly (random search)."""

    values: tuple

    def sample(self, rng: np.random.Generator) -> Any:
        return self.values[int(rng.integers(len(self.values)))]

    def suggest(self, trial, key: str) -> Any:
        return trial.suggest_categorical(key, list(self.values))

    def label(self, value: Any) -> str:
        """`value` as a trial's directory name writes it: floats to 4 significant digits, or to
        every digit when 4 would write two of this axis's values alike."""
        if not isinstance(value, float):
            return str(value)
        short = [f"{v:.4g}" for v in self.values if isinstance(v, float)]
        return repr(value) if len(set(short)) < len(short) else f"{value:.4g}"


@dataclasses.dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def suggest(self, trial, key: str) -> float:
        return trial.suggest_float(key, self.low, self.high)


@dataclasses.dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def sample(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def suggest(self, trial, key: str) -> float:
        return trial.suggest_float(key, self.low, self.high, log=True)


@dataclasses.dataclass(frozen=True)
class IntRange:
    """Integers from `low` to `high`, both included."""

    low: int
    high: int

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def suggest(self, trial, key: str) -> int:
        return trial.suggest_int(key, self.low, self.high)


def grid(*values) -> Grid:
    return _checked("grid", values)


def choice(*values) -> Grid:
    return _checked("choice", values)


def uniform(low: float, high: float) -> Uniform:
    return _checked("uniform", (low, high))


def loguniform(low: float, high: float) -> LogUniform:
    return _checked("loguniform", (low, high))


def int_range(low: int, high: int) -> IntRange:
    return _checked("int", (low, high))


Space = Grid | Uniform | LogUniform | IntRange


def space_text(space: Space) -> str:
    """`space` as --sweep writes it: [a,b,...], uniform(a,b), loguniform(a,b) or int(a,b)."""
    if isinstance(space, Grid):
        return "[" + ",".join(map(str, space.values)) + "]"
    name = {Uniform: "uniform", LogUniform: "loguniform", IntRange: "int"}[type(space)]
    return f"{name}({space.low},{space.high})"


_DISTRIBUTIONS = {"uniform": Uniform, "loguniform": LogUniform, "int": IntRange, "choice": Grid}


def _checked(kind: str, args: tuple) -> Space:
    """The space of `kind(*args)`, or SweepError saying what would be valid. NumPy scalars (the
    values of np.logspace, np.arange) are taken as Python's: a trial's command line writes its values."""
    args = tuple(a.item() if isinstance(a, np.generic) else a for a in args)
    if kind in ("grid", "choice"):
        if not args:
            raise SweepError(f"{kind}: no values, so the sweep would be empty; give at least one value")
        for i, value in enumerate(args):
            if any(type(value) is type(other) and value == other for other in args[:i]):
                raise SweepError(f"{kind}: {value!r} is listed twice; give each value once")
            if _holds_nul(value):  # a trial's value goes to its command line, which cannot carry one
                raise SweepError(f"{kind}: {value!r} holds a NUL character; remove it")
        return Grid(tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SweepError(f"{kind}{args}: needs two numbers, low and high")
    low, high = args
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SweepError(f"{kind}({low}, {high}): needs finite low < high")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"loguniform({low}, {high}): needs 0 < low")
    if kind == "int":
        if not (isinstance(low, int) and isinstance(high, int)):
            raise SweepError(f"int({low}, {high}): needs integer bounds")
        if low < -2**63 or high >= 2**63:
            raise SweepError(f"int({low}, {high}): needs bounds that fit in 64 bits, -2**63 <= low < high < 2**63")
        return IntRange(low, high)
    return _DISTRIBUTIONS[kind](float(low), float(high))


def _holds_nul(value: Any) -> bool:
    """Whether a value (a string, or a list or dict of them, at any depth) holds a NUL character."""
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return isinstance(value, (list, tuple)) and any(_holds_nul(v) for v in value)


def parse_axis(text: str) -> tuple[str, Space]:
    """`key=[a,b,...]` (grid values) or `key=uniform(a,b)`, `loguniform(a,b)`, `int(a,b)`, `choice(a,b,...)`."""
    if "=" not in text:
        raise SweepError(f"--sweep {text!r}: expected key=[v1,v2,...] or key=uniform(a,b), loguniform(a,b), "
                         "int(a,b), choice(v1,v2,...)")
    key, spec = (part.strip() for part in text.split("=", 1))
    kind = next((k for k in _DISTRIBUTIONS if spec.startswith(f"{k}(") and spec.endswith(")")), None)
    if kind is None and spec.startswith("[") and spec.endswith("]"):
        kind = "grid"
    if kind is not None:
        values = _values(spec[len(kind) + 1:-1] if kind != "grid" else spec[1:-1], text)
        try:
            return key, _checked(kind, values)
        except SweepError as e:
            raise SweepError(f"--sweep {text}: {e}") from None
    raise SweepError(f"--sweep {text!r}: cannot parse {spec!r}; expected [v1,v2,...], uniform(a,b), "
                     "loguniform(a,b), int(a,b) or choice(v1,v2,...)")


def _values(inner: str, text: str) -> tuple:
    """Comma-separated values, each a Python literal or a bare word (`[adamw,lion]`)."""
    if not inner.strip():
        return ()
    try:
        values = ast.literal_eval(f"({inner},)")
    except NOT_A_LITERAL:
        values = tuple(_parse(part.strip()) for part in inner.split(","))
    if any(isinstance(v, str) and not v for v in values):
        raise SweepError(f"--sweep {text!r}: an empty value in the list")
    return tuple(values)


def axes_from(config_path: str, texts: Sequence[str]) -> dict[str, Space]:
    """The sweep's axes: the config file's `get_sweep()` (if any), then each `--sweep` (which wins)."""
    axes, given = dict(_declared_axes(config_path)), set()
    for text in texts:
        key, space = parse_axis(text)
        if key in given:
            raise SweepError(f"--sweep {text}: {key} is swept twice; give each key once, with all its values")
        axes[key] = space  # replaces an axis get_sweep() declares
        given.add(key)
    if not axes:
        raise SweepError(f"no axes: pass --sweep key=[v1,v2] or define get_sweep() in {config_path}")
    for key in axes:  # a trial would set the inner key twice: in the outer value, then on its own
        outer = next((axis for axis in axes if key.startswith(axis + ".")), None)
        if outer is not None:
            raise SweepError(f"{key} is swept inside the swept {outer}, whose values set it too; sweep one of "
                             f"them (to vary both, list whole values of {outer})")
    return axes


def _check_not_swept(overrides: Sequence[str], axes: dict[str, Space]) -> None:
    """SweepError for a base override of a swept key, or of a key inside a swept value: every
    trial's value would replace it. (A section holding a swept key may be set: the trial's value
    then replaces that one key of it.)"""
    for override in overrides:
        key = override.split("=", 1)[0]
        for axis in axes:
            if key == axis or key.startswith(axis + "."):
                raise SweepError(f"--config.{override} sets {'the swept key' if key == axis else 'a key inside'} "
                                 f"{axis}, whose values each trial sets instead; drop the override or the axis (a "
                                 f"single value: --sweep {axis}=[VALUE])")


def _declared_axes(config_path: str) -> dict[str, Space]:
    if Path(config_path).suffix != ".py":  # a run's config.json declares no axes
        return {}
    with config_module(Path(config_path), "llama_jax_sweep_config") as module:  # (load_config has run it)
        if not hasattr(module, "get_sweep"):
            return {}
        try:
            declared = module.get_sweep()
        except (Exception, SystemExit) as e:
            raise SweepError(_failure(Path(config_path), "calling get_sweep()", e)) from None
    if not isinstance(declared, dict):
        raise SweepError(f"{config_path}: get_sweep() must return a dict of config key -> values or space")
    axes = {}
    for key, space in declared.items():
        if not isinstance(key, str) or not key:
            raise SweepError(f"{config_path}: get_sweep() has the key {key!r}; its keys are config keys such as "
                             f"'optimizer.lr'")
        try:
            if isinstance(space, (list, tuple)):
                space = grid(*space)
            elif isinstance(space, str):
                space = parse_axis(f"{key}={space}")[1]
            elif not isinstance(space, Space):
                raise SweepError("must be a list or a llama_jax.sweep space")
        except SweepError as e:
            raise SweepError(f"{config_path}: get_sweep()[{key!r}]: {str(e).replace('--sweep ', '')}") from None
        axes[key] = space
    return axes


# ---- the sweep and its trials ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What a sweep is; saved as DIR/sweep.json so a re-run continues the same sweep."""

    config: str
    overrides: tuple[str, ...]
    axes: dict[str, str]  # key -> the space, written out
    search: str
    trials: int | None
    seed: int
    config_sha256: str = ""  # of the config file's settings, so that an edited file is noticed
    objective: str = ""  # the metric trials are ranked by (`objective_key`), for reports away from the config file
    directory: str = ""  # where it started: relative paths in its config and overrides are read from there

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


@dataclasses.dataclass(frozen=True)
class Trial:
    number: int
    overrides: dict[str, Any]

    def name(self, axes: dict[str, Space], numbered: bool) -> str:
        """The trial's directory: its swept values, e.g. `lr=0.003,seed=1` (numbered for random and Optuna searches)."""
        shorts = [key.rsplit(".", 1)[-1] for key in axes]
        labels = [short if shorts.count(short) == 1 else key for key, short in zip(axes, shorts)]
        parts = [f"{label}={_short(self.overrides[key], space)}" for label, (key, space) in zip(labels, axes.items())]
        return ",".join(([f"t{self.number:03d}"] if numbered else []) + parts).replace("/", "_")


def _short(value: Any, space: Space) -> str:
    if isinstance(space, Grid):
        return space.label(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check_names(trials: Sequence[Trial], axes: dict[str, Space], numbered: bool) -> None:
    """SweepError unless every trial has a directory name of its own that the file system takes."""
    seen: dict[str, Trial] = {}
    for trial in trials:
        name = trial.name(axes, numbered)
        if len(name.encode()) > 255:
            raise SweepError(f"trial {trial.number}'s directory name ({name[:40]}...) would be {len(name.encode())} "
                             f"bytes, over the 255 a file name may have; sweep shorter values")
        if name in seen:
            raise SweepError(f"trials {seen[name].overrides} and {trial.overrides} would share the directory "
                             f"{name!r}; give values whose names differ")
        seen[name] = trial


def widest_trial(axes: dict[str, Space], trials: int) -> Trial:
    """The trial of an Optuna search whose directory name is longest: the last number, and on each
    axis the value written longest (`_longest_candidates`)."""
    widest = {key: max(_longest_candidates(space), key=lambda v, space=space: len(_short(v, space).encode()))
              for key, space in axes.items()}
    return Trial(trials - 1, widest)


def _longest_candidates(space: Space) -> tuple:
    """Values of `space` among which is one its directory label writes longest: every listed value;
    a range's ends; and for a float range, in each decade it spans, a value of 4 significant digits
    (`1.001e-05`, `-0.0001001`), as a draw there is written. Magnitudes under a millionth of the
    largest, which a range spanning zero all but never draws, are not tried."""
    if isinstance(space, Grid):
        return space.values
    low, high = space.low, space.high
    if isinstance(space, IntRange):
        return low, high
    top = max(abs(low), abs(high))
    bottom = min(abs(low), abs(high)) if low * high > 0 else top * 1e-6
    decades = range(math.floor(math.log10(bottom)), math.floor(math.log10(top)) + 1)
    return low, high, *(v for k in decades for v in (1.001 * 10.0**k, -1.001 * 10.0**k) if low <= v <= high)


def override_text(key: str, value: Any) -> str:
    """`key=value` as `--config.` takes it (floats written exactly; a string that would read as
    another value, 'None' or 'nan', quoted)."""
    quoted = isinstance(value, float) or isinstance(value, str) and _parse(value) != value
    return f"{key}={value!r}" if quoted else f"{key}={value}"


def grid_trials(axes: dict[str, Space]) -> list[Trial]:
    for key, space in axes.items():
        if not isinstance(space, Grid):
            raise SweepError(f"--search grid needs value lists, but {key} is {space}; use --search random or "
                             f"optuna with --trials N")
    count = math.prod(len(space.values) for space in axes.values())
    if count > MAX_TRIALS:
        raise SweepError(f"the grid has {count:,} trials, over the {MAX_TRIALS:,} a sweep takes; sweep fewer values "
                         f"or use --search random or optuna with --trials N")
    product = itertools.product(*(space.values for space in axes.values()))
    return [Trial(i, dict(zip(axes, values))) for i, values in enumerate(product)]


def random_trials(axes: dict[str, Space], n: int, seed: int) -> list[Trial]:
    """`n` trials, trial i drawn from a generator seeded by (seed, i): a re-run draws the same ones."""
    trials = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        trials.append(Trial(i, {key: space.sample(rng) for key, space in axes.items()}))
    return trials


def check_overrides(spec: SweepSpec, trials: Sequence[Trial], axes: dict[str, Space],
                    read_init_from: bool = True, started: Mapping[str, Path] | None = None,
                    n_devices: int | None = None) -> None:
    """Every trial's config is one `llama-jax train` accepts: the swept keys exist, take the values
    given, and every value is one a run can use (the checks `train` makes before it needs devices);
    given the `n_devices` each trial runs on, its mesh fits them and the batch and model divide by it.
    An Optuna search (no trials listed yet) is checked one axis at a time, at each of its listed values
    or at a range's ends, the other axes at their first.
    `started`: the directory of each trial (by name) that holds a run; as `train` does on resuming one,
    their `checkpoint.init_from` is not read (the run's checkpoints hold its architecture), and the
    run must have trained with the trial's values (`check_trained_with`)."""
    started = started or {}
    if trials:
        probes = trials
    else:
        ends = {key: list(space.values) if isinstance(space, Grid) else [space.low, space.high]
                for key, space in axes.items()}
        first = {key: values[0] for key, values in ends.items()}
        probes = [Trial(0, {**first, key: value}) for key, values in ends.items() for value in values]
    for trial in probes:
        name = trial.name(axes, numbered=bool(trials) and spec.search != "grid")  # its directory's name
        try:
            overrides = [*spec.overrides, *(override_text(k, v) for k, v in trial.overrides.items())]
            config = load_config(spec.config, overrides)
            model = check_experiment(config, read_init_from and name not in started)
            if name in started:
                check_trained_with(saved_run_setting(started[name]), config, axes, str(started[name]))
            if n_devices is not None:
                from llama_jax.mesh_axes import check_mesh_and_batch

                check_mesh_and_batch(config, n_devices, model)
        except ValueError as e:
            raise SweepError(f"trial {name}: {e}") from None


def check_trained_with(saved: dict, config, keys: Iterable[str], where: str) -> None:
    """ValueError where `saved`, the config.json of the run in a trial's directory (`where`, for the
    message), gives one of the swept `keys` another value than the trial's `config` does: that run
    (one started there by hand, say) trained with it, and the sweep's results would list it under
    the trial's value."""
    given = json.loads(config.to_json_best_effort())
    for key in keys:
        was, now = saved, given
        try:
            for part in key.split("."):
                was, now = was[part], now[part]
        except (KeyError, TypeError):
            continue  # a key the run's release did not record
        if was != now:
            raise ValueError(f"{where} holds a run trained with {key}={was!r}, not the trial's {now!r}, and the "
                             f"sweep's results would list it under {now!r}; move that run out of the sweep's "
                             f"directory, then run the sweep again")


# ---- running trials ----------------------------------------------------------------------------


@dataclasses.dataclass
class Running:
    trial: Trial
    directory: Path
    process: subprocess.Popen
    started: float
    optuna_trial: Any = None
    reported_steps: set[int] = dataclasses.field(default_factory=set)  # what the study holds for the trial
    metrics_offset: int = 0
    pruned: bool = False
    warmup_steps: int | None = None  # the run's optimizer.warmup_steps, once its config.json has been read
    on_nonfinite: str | None = None  # the run's train.on_nonfinite, likewise


def trial_command(spec: SweepSpec, trial: Trial, directory: Path, program: Sequence[str] | None = None,
                  data: Sequence[str] = ()) -> list[str]:
    """The `llama-jax train` command line of a trial (`program`: how to call llama-jax; `data`: the
    overrides of `shared_data`)."""
    program = list(program or [sys.executable, "-m", "llama_jax.cli"])
    return [*program, "train", "--config", spec.config, "--workdir", str(directory),
            *(f"--config.{o}" for o in spec.overrides),
            *(f"--config.{override_text(k, v)}" for k, v in trial.overrides.items()),
            *(f"--config.{o}" for o in data)]


def shared_data(config, axes: dict, workdir: Path) -> list[str]:
    """The overrides that point every trial at WORKDIR/data, the sweep's one prepared copy of the raw
    text source of `config` (the sweep's config with its base overrides); [] when the trials read
    prepared or synthetic data, when an axis changes a `data.` key (each trial then prepares its
    own), or when trials of this workdir already started on their own copies (a sweep begun by an
    earlier version resumes as it began)."""
    from llama_jax.data import DOCUMENT_SOURCES

    if config.data.source not in DOCUMENT_SOURCES or any(key.startswith("data.") for key in axes):
        return []
    if not (workdir / DATA_DIR).is_dir() and trials_started(workdir) and not _trials_read(workdir, workdir / DATA_DIR):
        return []
    return ["data.source=prepared", f"data.path={workdir / DATA_DIR}"]


def _trials_read(workdir: Path, data: Path) -> bool:
    """Whether a trial of the sweep in `workdir` has started on the prepared directory `data` (its
    run's config.json names it): one removed since (damaged, say) is prepared there again."""
    return any(saved_run_setting(trial, "data", "path") == str(data) for trial in trial_directories(workdir))


def prepare_shared_data(data_config, workdir: Path, out=print, every_trial_started: bool = False) -> None:
    """Prepare `data_config`'s documents into WORKDIR/data (resuming an interrupted preparation; a
    finished one is checked against the data settings and kept). `every_trial_started`: each trial
    resumes a run of its own, which keeps its tokenizer; a tokenizer file gone since then (with the
    model directory of a sweep of fine-tunes, say) is stood in for by the one prepared with the data."""
    from llama_jax.prepare import MANIFEST, TOKENIZER, prepare as prepare_data
    from llama_jax.tokenizer import tokenizer_file

    data, named = workdir / DATA_DIR, data_config.get("tokenizer")
    prepared = (data / MANIFEST).is_file()
    if every_trial_started and prepared and named and named != "train" and not tokenizer_file(named).exists():
        out(f"data.tokenizer={named} no longer exists; every trial has started, with the copy prepared in {data}")
        data_config = data_config.copy_and_resolve_references()
        data_config.tokenizer = str(data / TOKENIZER)
    if not prepared:
        out(f"preparing data.source={data_config.source} once for every trial, into {data}")
    prepare_data(data_config, data, progress=True, elsewhere="use another --workdir")
    if prepared:  # (checked against the settings, and kept)
        out(f"data.source={data_config.source}: every trial reads the copy prepared in {data}")


def trial_directories(workdir: str | os.PathLike) -> list[Path]:
    """The directories of the sweep's trials in `workdir`, by name: each one holding a trial record,
    a damaged one included (`read_trial` reads it as {}, so that its trial is listed as unknown);
    none where `workdir` is not a directory (yet)."""
    workdir = Path(workdir)
    return sorted(d for d in workdir.iterdir() if (d / TRIAL_FILE).exists()) if workdir.is_dir() else []


def read_trial(directory: Path) -> dict:
    """The trial record in `directory`, or {} where it is missing or damaged: not JSON, or not the
    object `write_trial` writes (a number, a dict of overrides, a status, text for an error)."""
    try:
        record = json.loads((directory / TRIAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    valid = (isinstance(record, dict) and type(record.get("number")) is int
             and isinstance(record.get("overrides"), dict) and isinstance(record.get("status"), str)
             and isinstance(record.get("error", ""), str))
    return record if valid else {}


def check_trial_settings(workdir: Path, config) -> None:
    """ValueError where `workdir` is a trial of the sweep one folder up (its trial.json there, and the
    sweep's sweep.json) and `config` gives a key the trial sweeps another value than the trial's own
    override sets: the run would go on with it while the sweep's results list the trial under its
    own value. Likewise where the run already in `workdir` trained with another value of it."""
    import copy

    def plain(value):  # a dict value (model.rope_scaling, data.mixture) is a ConfigDict once loaded
        return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value

    trial = read_trial(workdir)
    if not trial or not (workdir.parent / SPEC_FILE).is_file():
        return
    for key, value in trial["overrides"].items():
        own = override_text(key, value)  # as the sweep gives it to the trial's train
        try:
            given, expected = plain(value_at(config, key)), plain(apply_override(copy.deepcopy(config), own))
        except (KeyError, TypeError, ValueError):
            continue  # (not a key of this config: another sweep's trial.json, or one edited by hand)
        if given != expected:
            raise ValueError(f"--workdir {workdir} is trial {workdir.name} of the sweep in {workdir.parent}, which "
                             f"sets {key}={expected!r}; this run gives {key}={given!r}, and the sweep's results "
                             f"would list the trial under {value!r}: give --config.{own} to continue the trial, or "
                             f"another --workdir")
    if holds_run(workdir):
        check_trained_with(saved_run_setting(workdir), config, trial["overrides"],
                           f"--workdir {workdir} (trial {workdir.name} of the sweep in {workdir.parent})")


def finished_trial_status(directory: Path) -> str | None:
    """The recorded status of the trial in `directory` when a re-run skips it (`FINISHED`), else None."""
    status = read_trial(directory).get("status")
    return status if status in FINISHED else None


def write_trial(directory: Path, trial: Trial, status: str, spec: SweepSpec, **extra) -> None:
    """Write the trial's record, with a copy of the sweep's spec (its sweep.json) to restore that from."""
    record = {"number": trial.number, "overrides": trial.overrides, "status": status, **extra,
              "sweep": json.loads(spec.to_json())}
    write_json_atomic(directory / TRIAL_FILE, record)


def objective_key(config) -> str:
    """What a sweep minimises: held-out loss when the runs evaluate, else training loss."""
    evaluates = config.data.source != "synthetic" and config.train.eval_every > 0 and config.train.eval_batches != 0
    return "eval_loss" if evaluates else "loss"


def check_local_devices(parallel: int, devices_per_run: int | None) -> str:
    """This host's platform, if it can run `parallel` trials of `devices_per_run` devices each."""
    from llama_jax.devices import local_accelerators

    platform, n_devices = local_accelerators()
    check_devices(platform, n_devices, parallel, devices_per_run)
    return platform


def check_devices(platform: str, n_devices: int, parallel: int, devices_per_run: int | None) -> None:
    """SweepError unless a host of `n_devices` `platform` devices can run `parallel` trials of
    `devices_per_run` devices each."""
    if devices_per_run is not None:
        if devices_per_run < 1 or devices_per_run > n_devices:
            raise SweepError(f"--devices-per-run {devices_per_run}: this host has {n_devices} "
                             f"{platform} device(s); valid: 1 to {n_devices}")
        from llama_jax.devices import TPU_CHIPS_PER_PROCESS

        if platform == "tpu" and devices_per_run not in TPU_CHIPS_PER_PROCESS:  # (found at the first trial's start)
            valid = ", ".join(str(k) for k in TPU_CHIPS_PER_PROCESS if k <= n_devices)
            raise SweepError(f"--devices-per-run {devices_per_run}: a TPU host splits into processes of {valid} "
                             f"chips")
        if parallel * devices_per_run > n_devices:
            raise SweepError(f"--parallel {parallel} x --devices-per-run {devices_per_run} needs "
                             f"{parallel * devices_per_run} {platform} devices; this host has {n_devices}")
    elif parallel > 1 and platform != "cpu":
        raise SweepError(f"--parallel {parallel} on a {platform} host needs --devices-per-run K, so trials "
                         f"do not share accelerators")


def trial_statuses(workdir: str | os.PathLike) -> list[str]:
    """The recorded status of every trial of the sweep in `workdir`."""
    return [read_trial(d).get("status", "unknown") for d in trial_directories(workdir)]


class Sweep:
    """Runs trials `parallel` at a time, each on its own devices, recording each one's outcome."""

    def __init__(self, spec: SweepSpec, workdir: Path, axes: dict[str, Space], parallel: int = 1,
                 devices_per_run: int | None = None, out=print):
        self.spec, self.workdir, self.axes, self.out = spec, workdir, axes, out
        self.platform = check_local_devices(parallel, devices_per_run)
        self.parallel, self.devices_per_run = parallel, devices_per_run
        self.config = load_config(spec.config, list(spec.overrides))
        self.objective = spec.objective
        self.numbered = spec.search != "grid"
        self.data = shared_data(self.config, axes, workdir)

    def directory(self, trial: Trial) -> Path:
        return self.workdir / trial.name(self.axes, self.numbered)

    def run(self, trials: Iterator[Trial], study=None) -> None:
        """Start trials as slots free up until `trials` is exhausted and all have finished."""
        running: dict[int, Running] = {}
        pending = iter(trials)
        exhausted = False
        try:
            while running or not exhausted:
                for slot in range(self.parallel):
                    if slot in running or exhausted:
                        continue
                    trial = next(pending, None)
                    if trial is None:
                        exhausted = True
                        break
                    self._start(trial, slot, study, running)
                for slot, active in list(running.items()):
                    if study is not None:
                        self._report(active)
                    if active.process.poll() is not None:
                        with signals_held():  # recorded and out of `running` together (see `finally`)
                            self._finish(active, study)
                            del running[slot]
                time.sleep(POLL_SECONDS)
        finally:
            # Interrupted: the trials in `running` save a checkpoint and stop. Their records say so
            # before the wait, so that a second Ctrl-C (which ends it) does not leave them "running"
            # (one that completed all the same reads as finished: `results.collect`).
            with signals_held():
                for active in running.values():
                    active.process.send_signal(signal.SIGTERM)
                for active in running.values():
                    write_trial(active.directory, active.trial, "interrupted", self.spec, started=active.started,
                                ended=time.time())
            for active in running.values():
                active.process.wait()

    def _start(self, trial: Trial, slot: int, study, running: dict[int, Running]) -> None:
        """Start `trial` in `slot`, entered in `running` as its process starts."""
        from llama_jax.devices import subset_env

        directory = self.directory(trial)
        directory.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # train.log follows the run line by line
        if self.devices_per_run is not None:
            ids = list(range(slot * self.devices_per_run, (slot + 1) * self.devices_per_run))
            env = subset_env(self.platform, ids, slot, env)
        optuna_trial, reported = study_trial(study, trial) if study is not None else (None, set())
        started = time.time()
        write_trial(directory, trial, "running", self.spec, started=started)
        self.out(f"[{trial.number}] started {directory.name}")
        # The trial ignores Ctrl-C, which reaches the sweep's whole process group, and a run stops on SIGINT without
        # saving: the sweep sends its trials SIGTERM instead, on which a run saves its step and exits; it gets SIGTERM
        # too when the sweep dies (a re-run resumes it). Signals held: a trial whose process has started is in
        # `running`, for the `finally` of `run` to stop
        with open(directory / LOG_FILE, "ab") as log, signals_held():
            process = subprocess.Popen(trial_command(self.spec, trial, directory, data=self.data), stdout=log,
                                       stderr=subprocess.STDOUT, env=env, preexec_fn=child_setup())
            running[slot] = Running(trial, directory, process, started, optuna_trial, reported)

    def _report(self, active: Running) -> None:
        """Feed the run's new losses to the Optuna pruner; stop the run if it says so, once the run
        is past its learning-rate warmup (`optimizer.warmup_steps` of its config.json): until then a
        trial of a lower peak rate is behind by design, not worse. A non-finite loss (logged as null:
        a step `train.on_nonfinite=skip` passed over) is told as NaN; the pruner stops a trial whose
        every loss so far is. A run that skips such steps is stopped, warmup or not, at its first
        logged non-finite training loss or objective (in any record since the last poll, not only
        the latest): the median pruner, judging it by its best loss so far, would let a run diverged
        after a good start go on to the end, skipping steps (its held-out loss, of parameters no
        skipped step changes, may well stay finite); a run stopping at such steps stops itself."""
        from llama_jax.metrics import read_metrics

        records = read_metrics(active.directory / "metrics.jsonl")
        new = records[active.metrics_offset:]
        for record in new:
            value = record.get(self.objective)
            if value is None and self.objective in record:  # (null: non-finite)
                value = math.nan
            if isinstance(value, (int, float)) and record["step"] not in active.reported_steps:
                active.optuna_trial.report(value, record["step"])
                active.reported_steps.add(record["step"])
        active.metrics_offset = len(records)
        if active.warmup_steps is None:  # (read once the run has written it, not at every poll)
            warmup = saved_run_setting(active.directory, "optimizer", "warmup_steps")
            active.warmup_steps = warmup if isinstance(warmup, int) else None
        if active.on_nonfinite is None:
            active.on_nonfinite = saved_run_setting(active.directory, "train", "on_nonfinite")
        logged = [record[key] for record in new for key in {"loss", self.objective} if key in record]
        nonfinite = active.on_nonfinite == "skip" and not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                              for v in logged)
        past_warmup = max(active.reported_steps, default=0) > (active.warmup_steps or 0)
        if not active.pruned and active.metrics_offset and (nonfinite or past_warmup
                                                             and active.optuna_trial.should_prune()):
            active.pruned = True
            active.process.send_signal(signal.SIGTERM)  # the run saves its step and exits

    def _finish(self, active: Running, study) -> None:
        from llama_jax.results import finished_status, run_outcome

        outcome = run_outcome(active.directory, self.objective)
        if active.process.returncode == 0 and outcome["complete"]:  # (also when the pruner spoke after the last step)
            status = finished_status(outcome)
        elif active.pruned:
            status = "pruned"
        elif active.process.returncode == 0:
            status = "interrupted"
        else:
            status = "failed"
        extra = {"started": active.started, "ended": time.time()}
        if status == "failed":
            extra["error"] = killed_by(active.process.returncode) or last_error_line(active.directory / LOG_FILE)
        write_trial(active.directory, active.trial, status, self.spec, **extra)
        self.out(f"[{active.trial.number}] {status} {active.directory.name}"
                 + (f": {extra['error']}" if status == "failed" else ""))
        if study is not None:
            tell(study, active.optuna_trial, status, outcome["final"], extra.get("error", ""))


def killed_by(returncode: int) -> str | None:
    """What ended a process that a signal killed (a negative return code), else None."""
    if returncode >= 0:
        return None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}" + (" (the system's out-of-memory killer sends it, as does kill -9)"
                                  if -returncode == signal.SIGKILL else "")


def last_error_line(log: Path) -> str:
    """The run's one-line error (or the last line it printed)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if ": error:" in line]
    return (errors or lines or ["no output"])[-1]


# ---- Optuna ------------------------------------------------------------------------------------


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise SweepError("--search optuna needs Optuna: pip install 'optuna>=4' (in a checkout: "
                         "pip install -e '.[sweep]')") from None
    return optuna


@contextlib.contextmanager
def study_errors(workdir: Path) -> Iterator[None]:
    """The study's storage failing inside the block, when it is opened or later in the sweep, as one
    SweepError line: DIR/optuna.db damaged (not SQLite, cut short, a page overwritten) or a
    directory in its place; or, where a re-run can go on, locked by another program, on a full
    disk, or failing to read or write."""
    optuna = _import_optuna()
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except (DBAPIError, sqlite3.Error, optuna.exceptions.StorageInternalError) as e:
        # Optuna's own error carries SQLite's as its cause
        cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) and e.__cause__ else e
        reason = (str(getattr(cause, "orig", None) or cause).splitlines() or [type(cause).__name__])[0]
        if any(word in reason for word in ("locked", "full", "I/O error", "readonly")):
            advice = "once that is resolved, run the sweep again (it resumes)"
        else:
            advice = "put the study back if it is damaged, or run the search in a new --workdir"
        raise SweepError(f"{workdir / STUDY_FILE} cannot be used as the sweep's Optuna study ({reason}); "
                         f"{advice}") from None


def check_study_kept(workdir: Path) -> None:
    """SweepError where trials of the Optuna search in `workdir` have started but its study file is
    gone or empty: a new study would propose trials under the numbers of those on disk, running
    finished ones again and others beside them."""
    path = workdir / STUDY_FILE
    if trials_started(workdir) and (not path.exists() or path.is_file() and not path.stat().st_size):
        raise SweepError(f"{path} is {'empty' if path.exists() else 'missing'}, but the trials in {workdir} started "
                         f"from it (a new study would propose them again); put the study back, or run the search "
                         f"in a new --workdir")


def open_study(workdir: Path, seed: int):
    """The sweep's Optuna study in DIR/optuna.db (created or reloaded): TPE sampler, median pruner."""
    optuna = _import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = workdir / STUDY_FILE  # connected to directly: in a URL, "?" and "%" in the path would be URL syntax
    with study_errors(workdir):
        storage = optuna.storages.RDBStorage("sqlite:///", engine_kwargs={"creator": lambda: sqlite3.connect(path)})
        study = optuna.create_study(study_name="llama-jax", storage=storage, direction="minimize",
                                    load_if_exists=True, sampler=_sampler(optuna, seed),
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    if study.trials:  # resumed: a sampler seeded as before would propose its first points again
        resumed_seed = int(np.random.SeedSequence([seed, len(study.trials)]).generate_state(1)[0])
        study.sampler = _sampler(optuna, resumed_seed)
    return study


def _sampler(optuna, seed: int):
    """TPE seeded by `seed`, with the constant liar: a trial asked while others run (`--parallel`)
    counts their points as bad ones, so it is not proposed beside them (without it TPE knows nothing
    of running trials). Optuna's default from version 5, given here for Optuna 4, which warns that
    the option is experimental; a trial asked while none runs is proposed as without it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def optuna_trials(study, axes: dict[str, Space], n: int) -> Iterator[Trial]:
    """Trials left running by an interrupted sweep first (same parameters, same directory), then
    new ones asked of the sampler until the study holds `n`. (A sweep stopped between asking for a
    trial and suggesting its parameters left it running without some: they are suggested now.)"""
    import optuna

    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        live = optuna.trial.Trial(study, frozen._trial_id)  # suggests a parameter it holds as held
        yield Trial(frozen.number, {key: space.suggest(live, key) for key, space in axes.items()})
    while len(study.trials) < n:
        asked = study.ask()
        yield Trial(asked.number, {key: space.suggest(asked, key) for key, space in axes.items()})


def _study_trials(study, axes: dict[str, Space], states: tuple) -> Iterator[tuple[Any, Trial]]:
    """The study's trials in `states` that hold a value of every axis: each as the study keeps it,
    and as the sweep's Trial."""
    for frozen in study.get_trials(deepcopy=False, states=states):
        if all(key in frozen.params for key in axes):
            yield frozen, Trial(frozen.number, {key: frozen.params[key] for key in axes})


def tell_recorded_outcomes(study, sweep: Sweep) -> None:
    """Tell the study the outcome of each trial it holds as running whose record says it ended (a
    sweep killed between writing a trial's record and telling the study): resumed, it would run
    again, a pruned trial trained further."""
    import optuna

    from llama_jax.results import run_outcome

    for frozen, trial in _study_trials(study, sweep.axes, (optuna.trial.TrialState.RUNNING,)):
        directory = sweep.directory(trial)
        record = read_trial(directory)
        if record.get("status") in (*FINISHED, "failed"):
            tell(study, optuna.trial.Trial(study, frozen._trial_id), record["status"],
                 run_outcome(directory, sweep.objective)["final"], record.get("error", ""))


def rewrite_lost_records(study, sweep: Sweep) -> None:
    """The trial.json of each trial the study has finished whose record was damaged or removed since,
    written again from the study and the run's files (a grid or random sweep runs such a trial
    again, which rewrites it; a study never returns to a finished trial)."""
    import optuna

    from llama_jax.results import finished_status, run_outcome

    states = optuna.trial.TrialState
    for frozen, trial in _study_trials(study, sweep.axes, (states.COMPLETE, states.PRUNED, states.FAIL)):
        directory = sweep.directory(trial)
        if not directory.is_dir() or read_trial(directory):
            continue
        outcome, extra = run_outcome(directory, sweep.objective), {}
        if frozen.state == states.COMPLETE:
            status = "done"
        elif outcome["complete"]:  # diverged (pruned in the study; failed in one of an earlier release)
            status = finished_status(outcome)
        else:  # (a run that failed at its point, `failed_at_its_point`, is pruned in the study, and failed)
            error = last_error_line(directory / LOG_FILE)
            status = "failed" if frozen.state == states.FAIL or failed_at_its_point(error) else "pruned"
            extra = {"error": error} if status == "failed" else {}
        write_trial(directory, trial, status, sweep.spec, **extra)


def study_trial(study, trial: Trial) -> tuple[Any, set[int]]:
    """The study's trial for `trial`, and the steps it holds losses of (a resumed trial's)."""
    import optuna

    frozen = study.get_trials(deepcopy=False)[trial.number]
    return optuna.trial.Trial(study, frozen._trial_id), set(frozen.intermediate_values)


# How the error line of a run begins or holds what failed at the trial's point: a non-finite loss
# (`train.on_nonfinite=stop`); memory its devices lack, as XLA says it (RESOURCE_EXHAUSTED: on a GPU or
# TPU, and for a state that does not fit; "INTERNAL: ... Out of memory allocating N bytes." for a step
# on CPU). Not a SIGKILL, which the out-of-memory killer sends but so does kill -9.
FAILED_AT_ITS_POINT = (NONFINITE_STOP, "RESOURCE_EXHAUSTED", "Out of memory")


def failed_at_its_point(error: str) -> bool:
    """Whether a failed trial's error line (`last_error_line`) says its point failed it, not the run
    around it: a non-finite loss or an out-of-memory error (`FAILED_AT_ITS_POINT`)."""
    return any(marker in error for marker in FAILED_AT_ITS_POINT)


def tell(study, optuna_trial, status: str, final: float | None, error: str = "") -> None:
    """Tell the study how a trial ended (`error`: a failed one's error line). A diverged one, and
    one that failed at its point (`failed_at_its_point`: its run stopped at a non-finite loss, or
    ran out of device memory), are told pruned: TPE counts a pruned trial's point as a bad one
    (after every complete trial), while it leaves failed trials out, and would go on proposing
    points beside them (ever larger batches, say, each of them out of memory)."""
    import optuna

    states = optuna.trial.TrialState
    if status in ("pruned", "diverged") or status == "failed" and failed_at_its_point(error):
        study.tell(optuna_trial, state=states.PRUNED)
    elif status == "done" and final is not None and math.isfinite(final):
        study.tell(optuna_trial, final)
    elif status != "interrupted":  # an interrupted trial stays RUNNING and is resumed by the next run
        study.tell(optuna_trial, state=states.FAIL)


# ---- the command -------------------------------------------------------------------------------


def prepare(config: str, workdir: str | os.PathLike, axis_texts: Sequence[str], overrides: Sequence[str],
            search: str = "grid", trials: int | None = None, seed: int = 0, out=print,
            probe: bool = True, n_devices: int | None = None) -> tuple[SweepSpec, dict, list]:
    """Check everything about a sweep before anything runs: (spec, axes, trials; [] for optuna).
    `probe`: whether WORKDIR is written to learn that it may be (`check_writable`; False for a dry run);
    `n_devices`: the devices each trial runs on, to check its mesh against (`check_overrides`)."""
    workdir = Path(workdir).absolute()
    check_workdir_path(workdir, probe)  # first: the trials' mesh checks import JAX (seconds), this needs none
    saved = saved_spec(workdir, out)
    started = {p.name: p for p in workdir.iterdir() if holds_run(p)} if saved else {}
    spec, axes, listed = plan_trials(config, axis_texts, overrides, search, trials, seed, saved.get("axes", ()),
                                     started=started, n_devices=n_devices)
    if search == "optuna":
        _import_optuna()
    check_workdir(workdir, spec, saved)
    if search == "optuna":
        check_study_kept(workdir)
    _check_trial_paths(workdir, axes, listed, numbered=search != "grid")
    _check_one_row_order(workdir, spec, axes, listed, started)
    if saved and trials_started(workdir):  # where its trials started stays the record (none: an earlier release's),
        # and so does its config file's path (`check_workdir`: the same file, perhaps named otherwise now)
        spec = dataclasses.replace(spec, directory=saved.get("directory", ""), config=saved.get("config", spec.config))
    return spec, axes, listed


def _check_one_row_order(workdir: Path, spec: SweepSpec, axes: dict, listed: list[Trial],
                         started: Mapping[str, Path]) -> None:
    """SweepError when trials trained by a release before the current row orders (`packed.ORDER`)
    would be joined by trials that begin now, in the current orders: their losses would not be
    measured on the same data order."""
    from llama_jax.run import run_info_file
    from llama_jax.run_data import reads_earlier_order

    infos = {name: run_info_file(path) for name, path in started.items()}
    earlier = sorted(name for name, info in infos.items() if reads_earlier_order(info))
    begun = {name for name, info in infos.items() if info}
    names = {trial.name(axes, spec.search != "grid") for trial in listed}
    waiting = len(names - begun) if spec.search != "optuna" else max(spec.trials - len(begun), 0)
    if earlier and waiting:
        raise SweepError(f"{workdir}: {', '.join(earlier)} trained with an earlier release, which orders each "
                         f"epoch's rows otherwise; the {waiting} trial(s) still to begin would draw theirs in this "
                         f"release's order, not comparable; finish the sweep with the release that started it, or "
                         f"run it again in a new --workdir (--report reports this one as it is)")


def plan_trials(config: str, axis_texts: Sequence[str], overrides: Sequence[str], search: str = "grid",
                trials: int | None = None, seed: int = 0, saved_axes: Sequence[str] = (),
                read_init_from: bool = True, started: Mapping[str, Path] | None = None,
                n_devices: int | None = None) -> tuple[SweepSpec, dict, list]:
    """A sweep's spec, axes and trials, each trial's config checked as `train` checks it before it
    needs devices (and against `n_devices` devices per trial, if given); no workdir involved.
    `saved_axes`: the order a resumed sweep named its axes in.
    `read_init_from=False`: for a sweep checked away from the machine that holds its init_from;
    `started`: the directories of the trials that resume a run of their own, by name (`check_overrides`)."""
    base = load_config(config, list(overrides))  # the config file and base overrides, one line if wrong
    if search not in SEARCHES:
        raise SweepError(f"--search {search!r}; valid: {', '.join(SEARCHES)}")
    if search != "grid" and (trials is None or trials < 1 or trials > MAX_TRIALS):
        raise SweepError(f"--search {search} needs --trials N (1 <= N <= {MAX_TRIALS:,})")
    axes = axes_from(config, axis_texts)
    _check_not_swept(overrides, axes)
    if search == "optuna":
        _check_told_apart(axes)
    if set(saved_axes) == set(axes):  # the order its trials were named and drawn in
        axes = {key: axes[key] for key in saved_axes}
    settings = settings_sha256(load_config(config) if overrides else base)  # the file's own
    spec = SweepSpec(str(Path(config).absolute()), tuple(overrides), {k: repr(v) for k, v in axes.items()},
                     search, trials if search != "grid" else None, seed, settings, objective_key(base), os.getcwd())
    listed = grid_trials(axes) if search == "grid" else random_trials(axes, trials, seed) if search == "random" \
        else []
    check_names([widest_trial(axes, trials)] if search == "optuna" else listed, axes, numbered=search != "grid")
    check_overrides(spec, listed, axes, read_init_from, started, n_devices)
    return spec, axes, listed


def _check_told_apart(axes: dict[str, Space]) -> None:
    """SweepError for a list of an Optuna search holding values Python compares equal (1, 1.0, True):
    the study records a suggested value as the first choice equal to it, so a trial run with 1.0
    would be held as 1 (and resumed as 1, in another directory)."""
    for key, space in axes.items():
        values = space.values if isinstance(space, Grid) else ()
        twins = [(a, b) for i, b in enumerate(values) for a in values[:i] if a == b]
        if twins:
            raise SweepError(f"--search optuna: {key} lists {twins[0][0]!r} and {twins[0][1]!r}, which Optuna holds "
                             f"as one value (they compare equal); list one of them")


def settings_sha256(config) -> str:
    """sha256 of a config's settings as sorted JSON, leaving out the keys added to `base_config`
    since sweeps first recorded it (`LATER_KEYS`) while they hold their defaults: a sweep started
    before a key existed resumes after it is added."""
    settings = json.loads(config.to_json_best_effort())
    for key, default in LATER_KEYS.items():
        section, name = key.split(".")
        if settings.get(section, {}).get(name, default) == default:
            settings.get(section, {}).pop(name, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def saved_spec(workdir: Path, out: Callable[[str], None] | None = None) -> dict:
    """The sweep.json of `workdir`; where it is missing or damaged, the copy of it the trials' records
    keep (said through `out`), else {} (none: no sweep) or SweepError (damaged)."""
    path = workdir / SPEC_FILE
    saved = None
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        if _is_spec(saved):
            return saved
    kept = _spec_kept_by_trials(workdir)
    if kept:
        if out is not None:
            out(f"{path} is {'damaged' if path.exists() else 'missing'}: the sweep is read from the copy its trials' "
                f"records keep ({TRIAL_FILE})")
        return kept
    if path.exists():
        copies = ", and no trial's record keeps a copy of it (trials of an earlier release)" \
            if trials_started(workdir) else ""
        raise SweepError(f"{path} is damaged (not a sweep's JSON){copies}; use another --workdir")
    return {}


def _is_spec(saved: Any) -> bool:
    """Whether `saved` is a sweep.json's object (its swept axes as `SweepSpec.to_json` writes them)."""
    axes = saved.get("axes") if isinstance(saved, dict) else None
    return isinstance(axes, dict) and bool(axes) and all(isinstance(v, str) for v in axes.values())


def _spec_kept_by_trials(workdir: Path) -> dict:
    """The sweep's spec as its trials' records keep it ({} where none does). They must agree on what
    makes the sweep what it is (a random or Optuna search extended to more trials: the largest
    count), each trial setting the keys it sweeps; SweepError otherwise (a trial of another sweep?)."""
    def what_it_is(spec: dict) -> dict:  # (a hand-edited copy's odd values compare as their text)
        overrides = spec.get("overrides")
        return {**{k: v for k, v in spec.items() if k != "trials"},
                "overrides": sorted(map(str, overrides)) if isinstance(overrides, list) else overrides}

    copies = {}
    for directory in trial_directories(workdir):
        trial = read_trial(directory)
        if _is_spec(trial.get("sweep")):
            copies[directory.name] = trial["sweep"]
            if set(trial["overrides"]) != set(trial["sweep"]["axes"]):
                raise SweepError(f"{directory / TRIAL_FILE} sets {sorted(trial['overrides'])}, not the keys its sweep "
                                 f"sweeps ({sorted(trial['sweep']['axes'])}): put the sweep's {SPEC_FILE} back, or use "
                                 f"another --workdir")
    first = next(iter(copies), None)
    other = next((name for name, spec in copies.items() if what_it_is(spec) != what_it_is(copies[first])), None)
    if other is not None:
        raise SweepError(f"the trials {first} and {other} of {workdir} keep copies of {SPEC_FILE} that differ (a trial "
                         f"of another sweep?); put the sweep's {SPEC_FILE} back, or use another --workdir")
    return max(copies.values(), key=lambda spec: spec["trials"] if type(spec.get("trials")) is int else 0, default={})


_SPEC_FIELDS = {"config_sha256": "config file's settings", "objective": "objective"}  # how a changed field is named


def _same_overrides(saved: Any, given: Sequence[str]) -> bool:
    """Whether the KEY=VALUE overrides sweep.json recorded (`saved`, as read) and those given set
    the same config: the same ones in any order, provided no key is set twice or inside another's
    value (then the order decides)."""
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        return False  # a damaged or hand-edited sweep.json
    keys = [o.split("=", 1)[0] for o in given]
    overlapping = any(i != j and (a == b or b.startswith(a + "."))
                      for i, a in enumerate(keys) for j, b in enumerate(keys))
    return not overlapping and sorted(saved) == sorted(given)


def _same_file(saved: Any, given: str) -> bool:
    """Whether sweep.json's config path and the one given name the same file (through `..` or
    symlinks, say); its settings are compared apart (config_sha256)."""
    return isinstance(saved, str) and real_path(saved) == real_path(given)


def start_directory(workdir: str | os.PathLike, out=print) -> Path:
    """The directory a sweep in `workdir` runs in: once a trial has started, the one the sweep
    started in, where the relative paths of its config and overrides (data, tokenizer, init_from)
    point, so that every trial reads the same files wherever the sweep is resumed from; the
    current one for a sweep with no trial yet, one recorded before directories were, or if that
    directory is gone (said in a line)."""
    here, workdir = Path.cwd(), Path(workdir).absolute()
    if not trials_started(workdir):
        return here
    recorded = saved_spec(workdir).get("directory")
    if not isinstance(recorded, str) or not recorded or Path(recorded) == here:
        return here
    if not Path(recorded).is_dir():
        out(f"this sweep started in {recorded}, which is gone: relative paths in its config and overrides are read "
            f"from {here}")
        return here
    out(f"this sweep started in {recorded}: relative paths in its config and overrides are read from there")
    return Path(recorded)


def trials_started(workdir: Path) -> bool:
    """Whether a trial of the sweep in `workdir` has started (it has a trial.json)."""
    return bool(trial_directories(workdir))


def _check_trial_paths(workdir: Path, axes: dict, listed: list[Trial], numbered: bool) -> None:
    """SweepError when something other than a directory (a file, a link to nothing) is where a
    trial's directory goes: the trial could not start there, after the trials before it ran."""
    for trial in listed:
        path = workdir / trial.name(axes, numbered)
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            what = "a link to nothing" if not path.exists() else "a file"
            raise SweepError(f"{path} is {what}, where the directory of trial {path.name} goes; move it away")


def check_workdir_path(workdir: Path, probe: bool = True) -> None:
    """SweepError or ValueError unless a sweep may write in `workdir` (absolute): no file there, a
    folder this process may write (`probe`: as `check_writable`'s), and not inside a run's
    checkpoints or a model's parameters."""
    if workdir.exists() and not workdir.is_dir():
        raise SweepError(f"--workdir {workdir} is a file, not a directory")
    check_writable(workdir, "--workdir", into=True, probe=probe)
    check_outside_runs_and_models(workdir, "--workdir")


def check_workdir(workdir: Path, spec: SweepSpec, saved: dict) -> None:
    """SweepError unless `workdir` (where `check_workdir_path` found nothing wrong) is new, empty,
    holds this same sweep (`saved`, its sweep.json), or holds a sweep none of whose trials has started
    (a sweep that stopped at a check or while preparing its data may be given again with other
    arguments)."""
    from llama_jax.launch.slurm import WORKDIR_FOLDER

    if saved:
        mine = json.loads(spec.to_json())
        # a field this version adds is compared only where the sweep recorded it; the directory it runs
        # in is the one it started in (`start_directory`)
        changed = sorted(k for k in mine if saved.get(k) != mine[k] and (k in saved or k not in _SPEC_FIELDS)
                         and k != "directory"
                         and not (k == "overrides" and _same_overrides(saved.get(k), mine[k]))
                         and not (k == "config" and _same_file(saved.get(k), mine[k]))
                         and not (k == "trials" and _more_trials(saved, mine)))
        if changed and trials_started(workdir):
            what = ", ".join(_SPEC_FIELDS.get(k, k) for k in changed)
            flags = [f"--{k} {saved[k]}" for k in changed
                     if k in ("search", "trials", "seed") and saved.get(k) is not None]
            started = f": it started with {' '.join(flags)}" if flags else ""
            if "trials" in changed and "search" not in changed:
                started += ", which a larger --trials extends"
            raise SweepError(f"{workdir} holds a different sweep (not the same {what}{started}); re-run it with the "
                             f"same arguments and config file, or use another --workdir")
    elif workdir.is_dir() and any(p.name != WORKDIR_FOLDER for p in workdir.iterdir()):  # `launch slurm`'s folder
        raise SweepError(f"--workdir {workdir} is not empty and holds no sweep ({SPEC_FILE}); use a new directory")


def _more_trials(saved: dict, mine: dict) -> bool:
    """Whether sweep `mine` extends the random or Optuna search `saved` (their sweep.json fields) to
    more trials: a random search's trial i is drawn from (seed, i), so the first ones stay the same,
    and a study goes on asking its sampler."""
    return mine["search"] in ("random", "optuna") and saved.get("search") == mine["search"] \
        and isinstance(saved.get("trials"), int) and mine["trials"] > saved["trials"]


def check_no_trial_running(workdir: Path) -> None:
    """SweepError if a process still runs in the directory of a trial the sweep may start (one not
    finished) and holds its lock: a trial of an earlier sweep process that a second Ctrl-C or a kill
    left saving its step, or a run started there by hand. The trial would fail on that lock."""
    busy = next((trial for trial in trial_directories(workdir)
                 if finished_trial_status(trial) is None and holds_lock(trial)), None)
    if busy is not None:
        raise SweepError(f"{busy} is in use: a llama-jax train is still running there (a trial of an earlier "
                         f"sweep process finishing its save?); wait for it to end, then run the sweep again")


def run_sweep(spec: SweepSpec, axes: dict, listed: list[Trial], workdir: str | os.PathLike, parallel: int = 1,
              devices_per_run: int | None = None, out=print) -> None:
    """Run the trials that are not finished yet (a re-run skips done and pruned ones and resumes the rest).
    One sweep at a time in a workdir: it holds the directory's lock (`safe_io.DirectoryLock`)."""
    workdir = Path(workdir).absolute()
    sweep = Sweep(spec, workdir, axes, parallel, devices_per_run, out)
    new_workdir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(workdir, f"--workdir {workdir} is in use: this sweep is already running there (it holds "
                                  "the directory's lock); wait for it to end or stop it, then run it again to go on")
    lock.acquire()
    try:
        check_no_trial_running(workdir)
        new_spec = not (workdir / SPEC_FILE).exists()
        write_text_atomic(workdir / SPEC_FILE, spec.to_json())  # a failed write keeps the sweep's record
        if sweep.data:
            try:
                started = bool(listed) and all(holds_run(sweep.directory(t)) for t in listed)
                prepare_shared_data(sweep.config.data, workdir, out, every_trial_started=started)
            except ValueError:  # bad input (found before preparation writes anything): leave no trace
                if new_spec:
                    (workdir / SPEC_FILE).unlink()
                if new_workdir and not any(workdir.iterdir()):
                    workdir.rmdir()
                raise
        if spec.search == "optuna":
            study = open_study(workdir, spec.seed)
            with study_errors(workdir):
                tell_recorded_outcomes(study, sweep)
                rewrite_lost_records(study, sweep)
                sweep.run(optuna_trials(study, axes, spec.trials), study)
            return
        todo = [t for t in listed if finished_trial_status(sweep.directory(t)) is None]
        if len(todo) < len(listed):
            out(f"{len(listed) - len(todo)} of {len(listed)} trials already finished; running the other {len(todo)}")
        sweep.run(iter(todo))
    finally:
        lock.release()


def describe(spec: SweepSpec, axes: dict, listed: list[Trial], workdir: str | os.PathLike) -> list[str]:
    """What a sweep would run (`--dry-run`): one line per trial with its command (a finished one
    marked so: a re-run skips it)."""
    import shlex

    workdir = Path(workdir).absolute()
    numbered = spec.search != "grid"
    data = shared_data(load_config(spec.config, list(spec.overrides)), axes, workdir)
    lines = [f"data: prepared once into {workdir / DATA_DIR}, read by every trial"] if data else []
    if spec.search == "optuna":
        space = ", ".join(f"{k}={space_text(v)}" for k, v in axes.items())
        return lines + [f"optuna: {spec.trials} trials chosen by TPE over {space}, pruned by the median rule; "
                        f"study in {workdir / STUDY_FILE}"]
    described = []
    for t in listed:
        directory = workdir / t.name(axes, numbered)
        status = finished_trial_status(directory)
        what = f"{status}, skipped" if status else shlex.join(trial_command(spec, t, directory, ["llama-jax"], data))
        described.append(f"{directory.name}: {what}")
    return lines + described


def submit_to_slurm(spec: SweepSpec, axes: dict, listed: list[Trial], workdir: str | os.PathLike, job: dict,
                    dry_run: bool = False) -> str:
    """Submit the unfinished trials as one SLURM job array (a job per trial); returns what to tell the
    user. `job`: the keywords of `launch.slurm.submit_array` (nodes, gpus_per_node, ...). A dry run
    submits and writes nothing; what it returns holds the array's sbatch script."""
    from llama_jax.launch import slurm

    if spec.search == "optuna":
        raise SweepError("--on slurm runs grid and random searches (an Optuna search decides each trial from the "
                         "ones before it, so it runs trials itself: use --on local)")
    workdir = Path(workdir).absolute()
    directories = {t.number: workdir / t.name(axes, numbered=spec.search != "grid") for t in listed}
    todo, queued = unfinished_on_slurm(listed, directories, dry_run)
    waiting = f"; {len(queued)} trial(s) still queued or running (jobs {', '.join(queued)}) are not submitted " \
              f"again" if queued else ""
    if not todo:
        if not dry_run:  # (read from the trials' copy where it was lost)
            write_text_atomic(workdir / SPEC_FILE, spec.to_json())
        return f"every trial of {workdir} has finished or is queued{waiting}; llama-jax sweep --workdir " \
               f"{workdir} --report collects the results"
    commands = [trial_command(spec, t, directories[t.number]) for t in todo]
    if dry_run:
        script = slurm.array_script(commands, workdir / slurm.WORKDIR_FOLDER, **job)
        return f"# the sbatch script of {len(commands)} trial(s) (not submitted)\n{script}"
    new = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        job_ids = slurm.submit_array(commands, workdir / slurm.WORKDIR_FOLDER, **job)
    except BaseException:  # nothing submitted (no sbatch here, say): a workdir made for it is not left behind
        if new:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    write_text_atomic(workdir / SPEC_FILE, spec.to_json())
    for trial, job_id in zip(todo, job_ids):
        directories[trial.number].mkdir(exist_ok=True)
        write_trial(directories[trial.number], trial, "submitted", spec, job=job_id)
    return (f"submitted {len(job_ids)} trial(s) as SLURM job array {job_ids[0].split('_')[0]}{waiting}; "
            f"llama-jax sweep --workdir {workdir} --report collects the results")


def unfinished_on_slurm(listed: list[Trial], directories: dict[int, Path], dry_run: bool = False
                        ) -> tuple[list[Trial], list[str]]:
    """(the trials to submit, the job ids of trials submitted earlier that SLURM still holds): a
    trial submitted before is submitted again only once its job has left the queue unfinished.
    A dry run away from the cluster (no squeue) shows those trials as to be submitted."""
    from llama_jax.launch import LaunchError, slurm
    from llama_jax.results import run_outcome

    records = {t.number: read_trial(directories[t.number]) for t in listed}
    submitted = {n for n, record in records.items() if record.get("status") == "submitted"}
    todo = [t for t in listed if records[t.number].get("status") not in FINISHED
            and not (t.number in submitted and run_outcome(directories[t.number])["complete"])]
    jobs = {t.number: records[t.number]["job"] for t in todo
            if t.number in submitted and isinstance(records[t.number].get("job"), str)}
    try:
        queued = slurm.queued_or_running(list(jobs.values())) if jobs else set()
    except LaunchError:
        if not dry_run:
            raise
        queued = set()
    return [t for t in todo if jobs.get(t.number) not in queued], sorted(queued)
