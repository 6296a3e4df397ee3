"""Launchers: run `llama-jax` command lines on machines elsewhere.

`tpu` drives the gcloud CLI to run a command on every worker of a Cloud TPU VM slice; `slurm`
submits commands to a SLURM cluster through submitit. A launched run is a process started from
its command line, like a local one: launchers never import the run loop, and a re-launched
`llama-jax train` resumes from the checkpoints in its workdir by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


class LaunchError(ValueError):
    """A launch that cannot go ahead (missing tool, bad input, a failed cloud command): one line."""


def option_value(command: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in a command line (`--flag V` or `--flag=V`), or None."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


INPUT_PATHS = {"--config": "file", "--include-path": "directory"}  # what a launched command reads, by flag


def check_input_paths(command: Sequence[str], base: Path) -> None:
    """Refuse a relative `--config` file or lm-eval `--include-path` directory that does not exist
    under `base`, where the command will run."""
    for flag, kind in INPUT_PATHS.items():
        value = option_value(command, flag)
        exists = Path.is_file if kind == "file" else Path.is_dir
        if value and not Path(value).is_absolute() and not exists(base / value):
            raise LaunchError(f"{flag} {value}: no such {kind} under {base}, where the command will run")
