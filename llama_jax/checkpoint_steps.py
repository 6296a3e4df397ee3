"""A run's checkpoint steps without JAX: which folders of WORKDIR/checkpoints are committed steps,
as the run's Orbax CheckpointManager lists them (`checkpoint.RunCheckpoints`), and the step
folders no run could read or save (`check_step_names`). `export` checks the step it exports
before it imports JAX.

A step's folder is named by its number alone (`0`, `8`; not `08`). On local and network disks a
step is written under a temporary name and renamed into place, so a folder of that name is a
committed step; on an object store's FUSE mount (`on_object_store_mount`) it is written in place
and committed by COMMIT_MARKER, written last (`checkpoint.atomicity_options`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MOUNTS_FILE = Path("/proc/mounts")
# FUSE file systems over an object store, where renaming a directory copies its objects one by one
OBJECT_STORE_FUSE = ("fuse.gcsfuse", "fuse.s3fs", "fuse.rclone")
COMMIT_MARKER = "commit_success.txt"  # Orbax's ocp.path.atomicity.COMMIT_SUCCESS_FILE
STEP_NAME = r"0|[1-9]\d*"  # as Orbax's standard name format reads a step's folder name


def on_object_store_mount(path: str | os.PathLike) -> bool:
    """Whether `path` lies on a FUSE mount of an object store (a bucket mounted with gcsfuse), as
    the mount table MOUNTS_FILE says: its innermost mount point above `path` is of a type in
    OBJECT_STORE_FUSE. (No mount table, as off Linux: False.)"""
    try:
        table = os.fsdecode(MOUNTS_FILE.read_bytes())
    except OSError:
        return False
    real, found, fstype = os.path.realpath(path), "", ""
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # \040 is a space
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(found):  # the innermost; of one point mounted twice, the later
            found, fstype = point, fields[2]
    return fstype in OBJECT_STORE_FUSE


def committed_steps(workdir: Path) -> list[int]:
    """The committed checkpoint steps of the run in `workdir`, ascending: the folders of
    WORKDIR/checkpoints named by their step alone (a link to one as well), holding COMMIT_MARKER
    where the steps are committed by it. (Orbax's `utils.checkpoint_steps` also takes a folder such
    as `backup_6` for step 6, which the manager then looks for at `6`.)"""
    directory = Path(workdir) / "checkpoints"
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    by_marker = on_object_store_mount(directory)
    return sorted(int(p.name) for p in entries if re.fullmatch(STEP_NAME, p.name) and p.is_dir()
                  and (not by_marker or (p / COMMIT_MARKER).exists()))


def check_step_names(directory: Path, saves: bool) -> None:
    """ValueError for a folder named as a step but not as Orbax names one (`08`, a copy made by
    hand): Orbax reads it as step 8 and looks for it at `8`, so the run could neither resume nor set
    it aside; and, for a run that `saves`, for a file or a link to nothing named as a step (`8`):
    the save of step 8 replaced the file without a word, and failed on the link once the step was
    trained."""
    entries = sorted(directory.iterdir(), key=lambda p: p.name) if directory.is_dir() else []
    steps = [p for p in entries if re.fullmatch("[0-9]+", p.name)]
    odd = [p.name for p in steps if p.name != str(int(p.name)) and p.is_dir()]
    if odd:
        raise ValueError(f"{directory / odd[0]} is no checkpoint of this run (a step's folder is named by its number "
                         f"alone, as {int(odd[0])}) but would be read as step {int(odd[0])}; move it out of "
                         f"{directory}")
    blocking = next((p for p in steps if p.name == str(int(p.name)) and not p.is_dir()), None) if saves else None
    if blocking is not None:
        what = "a link to nothing" if blocking.is_symlink() and not blocking.exists() else "a file"
        raise ValueError(f"{blocking} is {what}, not a checkpoint, where the run saves step {blocking.name}; move it "
                         f"out of {directory}")
