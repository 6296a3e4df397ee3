"""A run's directory without JAX: the files a run writes there, what `llama-jax train` refuses of
its --workdir, and what `llama-jax export` refuses of its --workdir and destination. The commands
check these before importing JAX (a bad path is refused at once); `run.train_and_evaluate` checks
the --workdir again, for the Python API and for the processes of a multi-process run, which check
it once they have joined, and `run.export_model` the export's paths, for the Python API."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from llama_jax.model_dir import MODEL_DIR
from llama_jax.safe_io import (PARTIAL_SUFFIX, RUN_DATA_DIR, SET_ASIDE_DIR, check_destination,
                               check_outside_runs_and_models, check_run_config, check_writable, file_in_the_way,
                               holds_no_run, holds_run, non_utf8_path, run_directory_problem)
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


def check_export(workdir: Path, dst, overwrite: bool) -> None:
    """What `llama-jax export` refuses before it reads the run's checkpoints: a --workdir (`workdir`,
    absolute) that is no run's directory, and a destination `dst` where writing a model directory
    would lose something (`safe_io.check_destination`). Whether the run holds the step to export is
    checked after, through Orbax."""
    problem = run_directory_problem(workdir)
    if problem is not None:
        raise RunError(problem)
    check_destination(dst, MODEL_DIR, overwrite, [workdir])
