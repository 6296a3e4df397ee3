"""A run's directory without JAX: the files a run writes there, what `llama-jax train` refuses of
its --workdir, and what `llama-jax export` refuses of its --workdir, destination and step (the
run's committed checkpoints, `checkpoint_steps.committed_steps`). The commands check these before
importing JAX (a bad path is refused at once); `run.train_and_evaluate` checks the --workdir
again, for the Python API and for the processes of a multi-process run, which check it once they
have joined, and `run.export_model` the export's paths and step, for the Python API."""

from __future__ import annotations

import fnmatch
import json
import time
from pathlib import Path

from llama_jax.checkpoint_steps import check_step_names, committed_steps
from llama_jax.model_dir import MODEL_DIR
from llama_jax.safe_io import (PARTIAL_SUFFIX, RUN_DATA_DIR, SET_ASIDE_DIR, check_destination,
                               check_outside_runs_and_models, check_run_config, check_writable, file_in_the_way,
                               holds_lock, holds_no_run, holds_run, non_utf8_path, run_directory_problem)
from llama_jax.sweep import SPEC_FILE, check_trial_settings


class RunError(ValueError):
    """A problem with the run's inputs or workdir: reported as one line."""


RUN_TOKENIZER = "tokenizer.model"  # the run's own copy of its tokenizer
PROGRESS_FILE = "progress.json"  # {"committed_step": N}: the newest checkpoint the run saw committed
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
# The tokenizer and generation files of the model a fine-tune started from (its end-of-sequence ids,
# Hugging Face tokenizer settings), which `export` writes with the run's parameters.
MODEL_TOKENIZER_DIR = "tokenizer_files"
RUN_FILES = ("config.json", METRICS_FILE, "checkpoints", RUN_TOKENIZER, LOSS_PLOT, PROGRESS_FILE, RUN_DATA_DIR,
             MODEL_TOKENIZER_DIR, RUN_DATA_DIR + PARTIAL_SUFFIX, MODEL_TOKENIZER_DIR + PARTIAL_SUFFIX)
MODEL_FILES = ("model_config.json", "params.json", "consolidated.*.pth", "*.safetensors", "pytorch_model*.bin")
REMOVAL_WAIT_S = 10.0  # how long a step that failed to read may take to disappear before it is called damaged


def check_workdir(workdir: Path) -> None:
    """RunError unless `workdir` is new, a run's, or a directory holding nothing the run would write
    over and no model (sub-directories of one's own, such as RUN/init, are fine)."""
    problem = non_utf8_path(workdir, "--workdir")
    if problem is not None:
        raise RunError(problem)
    blocking = file_in_the_way(workdir)
    if blocking is not None:
        raise RunError(f"--workdir {workdir}: {blocking} is a file, not a directory")
    check_writable(workdir, "--workdir", into=True)
    check_outside_runs_and_models(workdir, "--workdir")
    if (workdir / "checkpoints").exists() and not (workdir / "checkpoints").is_dir():
        raise RunError(f"--workdir {workdir}: {workdir / 'checkpoints'} is a file; a run keeps its checkpoints in "
                       f"that directory, so move the file away or use another --workdir")
    for name, use in ((METRICS_FILE, "appends its metrics"), (LOSS_PLOT, "plots its losses"),
                      (PROGRESS_FILE, "records its progress")):  # (before the run, not once it has trained)
        if (workdir / name).exists() and not (workdir / name).is_file():
            raise RunError(f"--workdir {workdir}: {workdir / name} is not a file; a run {use} there, so move it away "
                           f"or use another --workdir")
    aside = workdir / SET_ASIDE_DIR  # (a link to nothing as well: the resume failed on it with a raw errno line)
    for path, kind, fits in ((aside, "a directory", Path.is_dir), (aside / METRICS_FILE, "a file", Path.is_file)):
        if (path.exists() or path.is_symlink()) and not fits(path):
            raise RunError(f"--workdir {workdir}: {path} is not {kind}; a resume moves there what the run no longer "
                           f"continues from (the checkpoints after a --resume-from step, the metrics and eval results "
                           f"after the checkpoint), so move it away or use another --workdir")
    if not workdir.exists() or holds_run(workdir):
        return
    if (workdir / SPEC_FILE).exists():
        raise RunError(f"--workdir {workdir} holds a sweep ({SPEC_FILE}; its trials run in directories of their own "
                       f"inside it); use a new or empty directory")
    check_run_config(workdir, "use another --workdir")
    clash = sorted(p.name for p in workdir.iterdir()
                   if p.name in RUN_FILES or any(fnmatch.fnmatchcase(p.name, m) for m in MODEL_FILES))
    if clash:
        raise RunError(f"{holds_no_run(workdir, clash[0])}; use a new or empty directory")


def check_train_workdir(workdir: Path, config) -> None:
    """What `llama-jax train` refuses of its --workdir (`workdir`, absolute) with `config`: the
    directory itself (`check_workdir`), and the settings of a sweep's trial that the run would
    change (`sweep.check_trial_settings`)."""
    check_workdir(workdir)
    check_trial_settings(workdir, config)


def check_export(workdir: Path, dst, overwrite: bool, step: int | None = None) -> None:
    """What `llama-jax export` refuses before it reads the run's checkpoints: a --workdir (`workdir`,
    absolute) that is no run's directory, a destination `dst` where writing a model directory
    would lose something (`safe_io.check_destination`), and a run that does not hold checkpoint
    `step` (default: the latest; `checkpoint_step`) or holds a step's folder it could not read."""
    problem = run_directory_problem(workdir)
    if problem is not None:
        raise RunError(problem)
    check_destination(dst, MODEL_DIR, overwrite, [workdir])
    checkpoint_step(workdir, step)
    check_step_names(workdir / "checkpoints", saves=False)


def recorded_step(workdir: Path) -> int | None:
    """The latest step the run saw committed, from WORKDIR/progress.json (None: none yet)."""
    path = workdir / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        step = json.loads(path.read_text())["committed_step"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        step = None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        present = committed_steps(workdir)
        fix = (f"write {{\"committed_step\": {present[-1]}}} into it if checkpoint {present[-1]} is the run's latest"
               if present else "remove it if the run never saved a checkpoint")
        raise RunError(f"{path} is damaged (expected {{\"committed_step\": N}}, the run's latest checkpoint); "
                       f"{fix}, or use a new --workdir")
    return step


def latest_missing(workdir: Path, recorded: int) -> str:
    """The start of the error for a run whose latest committed checkpoint, as progress.json records it, is gone."""
    return f"checkpoint {recorded} of {workdir} is missing (recorded in {PROGRESS_FILE} as the latest committed step); "


def checkpoint_step(workdir: Path, step: int | None = None) -> int:
    """`step` (default: the latest) if `workdir` holds it as a committed checkpoint; RunError otherwise."""
    workdir, problem = Path(workdir), run_directory_problem(workdir)
    if problem is not None:
        raise RunError(problem)
    steps, deadline = committed_steps(workdir), time.monotonic() + REMOVAL_WAIT_S
    while not steps and holds_lock(workdir) and time.monotonic() < deadline:  # a run training there may be
        time.sleep(0.1)  # between removing its only checkpoint and committing the next (max_to_keep=1)
        steps = committed_steps(workdir)
    if not steps:
        raise RunError(f"{workdir} holds no committed checkpoint (checkpoints/<step>/); give a run's --workdir")
    recorded = recorded_step(workdir)
    if step is None and recorded is not None and steps[-1] < recorded:
        raise RunError(latest_missing(workdir, recorded) + f"--step {steps[-1]} reads the latest one present")
    step = steps[-1] if step is None else step
    if step not in steps:
        aside = sorted(p for p in (workdir / SET_ASIDE_DIR).glob(f"{step}*") if p.name.rstrip("+") == str(step))
        where = (f" (a --resume-from of an earlier step moved step {step} to {', '.join(map(str, aside))}, out of "
                 f"the run)" if aside else "")  # (set aside again: `4+`, `4++`, ...)
        raise RunError(f"{workdir} has no checkpoint of step {step}; valid: {', '.join(map(str, steps))}{where}")
    return step
