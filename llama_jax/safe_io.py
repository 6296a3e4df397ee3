"""Writing outputs without losing anything: destinations checked up front, written whole or not at all.

Every command that writes a directory (`convert`, `export`, `save_model`) goes through
`atomic_directory`: the destination may not be, or contain, one of the command's inputs, and
`--overwrite` replaces only a directory holding nothing but what that command itself writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import fnmatch
import functools
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Iterator


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """A kind of directory a command writes: a name for messages and the entries it may hold."""

    name: str
    entries: tuple[str, ...]  # file or directory names, glob patterns allowed
    utf8_path: bool = False  # written through TensorStore, which takes only UTF-8 paths

    def writes(self, entry: str) -> bool:
        return any(fnmatch.fnmatchcase(entry, pattern) for pattern in self.entries)


def file_in_the_way(path: Path, itself: bool = True) -> Path | None:
    """The file (anything but a directory) at `path` (if `itself`) or above it, which keeps a folder
    from being made there, or None. (At most one can exist: nothing exists below a file.)"""
    return next((p for p in ([path] if itself else []) + list(path.parents) if p.exists() and not p.is_dir()), None)


def shown_as_utf8(text: str) -> str:
    """`text` as UTF-8 text can hold it: bytes of a command-line argument or a path that are not
    UTF-8 (which Python keeps as lone surrogates) shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def non_utf8_path(path: str | os.PathLike, option: str) -> str | None:
    """Why `option` `path` cannot hold checkpoints (a run's, or a model directory's parameters), as
    one line: its absolute path holds a byte that is not UTF-8 (TensorStore, which reads and writes
    them, takes only UTF-8 paths); None when it is UTF-8."""
    text = os.fspath(Path(path).absolute())
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        byte = os.fsencode(text[e.start])[0]  # (Python holds an undecodable byte as a lone surrogate)
        return (f"{option} {shown_as_utf8(text)}: its path holds the byte {byte:#04x}, which is not UTF-8; "
                f"checkpoints are read and written only at UTF-8 paths, so rename the directory or give another "
                f"{option}")


def real_path(path: str | os.PathLike) -> Path:
    """`path` with its symbolic links followed (`Path.resolve`, which raises RuntimeError for a
    loop of links before Python 3.13; `broken_link` names a link that leads nowhere)."""
    return Path(os.path.realpath(path))


def broken_link(path: str | os.PathLike) -> str | None:
    """Why a symbolic link at or above `path` leads nowhere ("PATH is a symbolic link to T, which
    does not exist", "PATH: LINK is ... which loops back to itself"), or None when none does."""
    absolute = Path(path).absolute()
    link = next((p for p in [absolute, *absolute.parents] if p.is_symlink() and not p.exists()), None)
    if link is None:
        return None
    try:
        os.stat(link)
        ending = "which does not exist"  # (made since: a race, named as it was)
    except OSError as e:
        ending = "which loops back to itself" if e.errno == errno.ELOOP else "which does not exist"
    where = f"{path}" if link == absolute else f"{path}: {link}"
    return f"{where} is a symbolic link to {os.readlink(link)}, {ending}"


def check_destination(dst: str | os.PathLike, kind: OutputKind, overwrite: bool,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The absolute `dst` if writing a `kind` there loses nothing; ValueError/FileExistsError otherwise."""
    if os.path.basename(os.fspath(dst).rstrip("/")) in (".", ".."):  # (renaming onto it fails, after all the work)
        raise ValueError(f"destination {dst} ends in '.' or '..', which cannot be replaced; give the directory by its "
                         f"own name ({os.path.abspath(dst)})")
    dst = Path(dst).absolute()
    if kind.utf8_path and (problem := non_utf8_path(dst, "destination")):
        raise ValueError(problem)
    real = real_path(dst)
    for source in inputs:
        source = real_path(source)
        if real == source or real in source.parents:
            relation = "is" if real == source else "contains"
            raise ValueError(f"destination {dst} {relation} the input {source}; choose a destination outside it")
    blocking = file_in_the_way(real, itself=False)  # (dst itself a file: said below)
    if blocking is not None:
        raise ValueError(f"cannot create {dst}: {blocking} is a file, not a directory")
    check_outside_runs_and_models(dst, "destination")
    check_writable(dst, "destination")  # it is created, or replaced, beside itself
    if not dst.exists() and not dst.is_symlink():
        return dst
    # what --overwrite would refuse is said first, with or without it: passing it would not help
    if dst.is_symlink():  # replacing it would replace the link, not what it points to
        raise ValueError(f"{dst} is a symbolic link (to {real}); --overwrite replaces only a {kind.name} itself, "
                         f"not a link to one: give the path it points to, or another destination")
    if not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a directory; --overwrite replaces only a {kind.name}, so choose "
                         f"another destination")
    foreign = foreign_entries(dst, kind)
    if foreign:
        raise ValueError(f"{describe_foreign(dst, kind, foreign)}; --overwrite "
                         f"replaces only a {kind.name}, so choose another destination")
    if not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")
    return dst


def foreign_entries(directory: Path, kind: OutputKind) -> list[str]:
    """The names in `directory` that a `kind` does not hold, sorted: what replacing it would lose."""
    return sorted(p.name for p in directory.iterdir() if not kind.writes(p.name))


def describe_foreign(directory: Path, kind: OutputKind, foreign: list[str]) -> str:
    """`foreign_entries` for a message: "DIR holds 'NAME' (and N more), which is not part of a KIND"."""
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    return f"{directory} holds {foreign[0]!r}{more}, which is not part of a {kind.name}"


def check_folder(path: str | os.PathLike, option: str, what: str) -> Path:
    """The absolute `path` if a folder may be made (or is) there: no file at or above it, and not
    inside a run's checkpoints or a model's params/; ValueError naming `option` otherwise (`what`:
    what the directory is for, as the message ends: "give a directory {what}")."""
    leads_nowhere = broken_link(path)
    if leads_nowhere:
        raise ValueError(f"{option} {leads_nowhere}; give a directory {what}")
    given, path = path, Path(path).absolute()
    blocking = file_in_the_way(path)
    if blocking is not None:
        where = "is a file" if blocking == path else f"is under {blocking}, a file"
        raise ValueError(f"{option} {given} {where}; give a directory {what}")
    check_outside_runs_and_models(path, option, shown=given)
    return path


RUN_DATA_DIR = "data"  # WORKDIR/data: a raw source prepared for the run (its own copy of its documents)
PARTIAL_SUFFIX = ".partial"  # RUN/data.partial: a run's folder being moved into place (what was there is removed)
SET_ASIDE_DIR = "checkpoints-set-aside"  # a run's checkpoints after a --resume-from step, metrics after a resumed step


def check_outside_runs_and_models(path: str | os.PathLike, what: str,
                                  shown: str | os.PathLike | None = None) -> None:
    """ValueError when what is to be written at `path` (a directory or a file) would lie inside a
    run's checkpoints/ (or those it set aside), where it is read as a checkpoint or deleted with one
    by the run's retention, or inside a model directory's params/, which an --overwrite onto the
    model replaces whole: either way it would be lost without a word. The message names it as
    `what` and `shown` (the path as given; `path` if unset). (Beside a model's own files, as
    MODEL/run, an --overwrite refuses to go.)"""
    real, shown = real_path(path), path if shown is None else shown
    params = next((d for d in [real, *real.parents]
                   if d.name == "params" and (d.parent / "model_config.json").is_file()), None)
    if params is not None:
        where = "is" if params == real else "is inside"
        raise ValueError(f"{what} {shown} {where} {params}, the parameters of the model directory {params.parent}; "
                         f"choose a {what} outside it")
    checkpoints = runs_checkpoints(real)
    if checkpoints is not None:
        raise ValueError(f"{what} {shown} is inside {checkpoints}, the checkpoints of a run; choose a "
                         f"{what} outside it")


def runs_checkpoints(path: str | os.PathLike) -> Path | None:
    """The checkpoints/ of a run (or those it set aside) at or above `path`, its links followed; None if none."""
    real = real_path(path)
    return next((p for p in [real, *real.parents] if p.name in ("checkpoints", SET_ASIDE_DIR) and holds_run(p.parent)),
                None)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, kind: OutputKind, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `dst`; on success it replaces `dst`, on error it is removed.

    `dst` is checked first (`check_destination`), so nothing is created when it is refused. An
    existing `dst` is moved aside just before the new one is renamed into place; whatever stops
    that (an error, a signal) puts it back; without `overwrite`, a `dst` another process made while
    this one wrote is left as it is (FileExistsError). What a process of this host killed while
    writing `dst` left beside it is settled first (`finish_for_dead_processes`).
    """
    finish_for_dead_processes(Path(dst).absolute())
    dst = check_destination(dst, kind, overwrite, inputs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = scratch_path(dst, "tmp"), scratch_path(dst, "old")
    settled = False
    try:  # (made inside: a signal between making it and the `try` left it behind)
        tmp.mkdir()
        yield tmp
        with signals_held():  # the swap and the old output's removal, whole: Ctrl-C waits for them
            if not overwrite and (dst.exists() or dst.is_symlink()):  # none when checked: another wrote it since
                raise FileExistsError(f"{dst} was created by another process while this one wrote it, and is left as "
                                      f"it is; pass --overwrite (overwrite=True) to replace it, or choose another "
                                      f"destination")
            if dst.exists():
                os.replace(dst, old)
            os.replace(tmp, dst)
            _settle(dst, old)
            settled = True
    finally:  # decided by what is on disk, so that a signal between the two renames changes nothing
        if not settled:
            _settle(dst, old)
        if tmp.exists():
            _remove_tree(tmp)


def scratch_path(dst: Path, role: str) -> Path:
    """DST's hidden sibling for `role` ("tmp": the output being written, a file or a directory;
    "old": the one it replaces), named after this host and process, so that one a killed process
    left is known (`finish_for_dead_processes`)."""
    return dst.parent / f"{_scratch_prefix(dst, role)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


NAME_MAX = 255  # bytes in a file name, on the file systems Linux uses
_PROCESS_PART = len("4194304-xxxxxxxx")  # the largest pid Linux gives, and the random part


def _scratch_prefix(dst: Path, role: str) -> str:
    """The start of `scratch_path`'s names for `dst`, up to the pid. A destination name too long to
    fit in full (within ~30 bytes of NAME_MAX) is shortened to its start and a hash of the whole."""
    host = socket.gethostname()
    name, fixed = dst.name, len(os.fsencode(f"..{role}-{host}-")) + _PROCESS_PART
    if len(os.fsencode(name)) + fixed > NAME_MAX:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        start = name
        while start and len(os.fsencode(f"{start}~{digest}")) + fixed > NAME_MAX:
            start = start[:-1]
        name = f"{start}~{digest}"
    return f".{name}.{role}-{host}-"


def _settle(dst: Path, old: Path, by_this_process: bool = True) -> None:
    """After a replacement of `dst` by a new output, finished or not (`by_this_process`, or by a
    process killed while at it): the previous output `old` is removed once the new one is in place,
    else put back. One that cannot be removed (write-protected, say) is left where it is, and said
    so: the replacement itself is done."""
    if old.exists():
        if dst.exists():
            try:
                shutil.rmtree(old)
            except OSError as e:
                when = "replaced" if by_this_process else "replaced earlier"
                print(f"llama-jax: {dst} {when}, but the previous one could not be removed ({e.strerror or e}); "
                      f"it is kept at {old}: remove it by hand", file=sys.stderr)
        else:
            os.replace(old, dst)


def finish_for_dead_processes(dst: Path) -> None:
    """What a process of this host killed while writing `dst` left beside it: its unfinished output
    is removed, and an output it was replacing is settled as it would have settled it."""
    for role in ("old", "tmp"):
        prefix = _scratch_prefix(dst, role)
        for path in dst.parent.glob(glob.escape(prefix) + "*") if dst.parent.is_dir() else ():
            # PID-xxxxxxxx exactly: a host named HOST-9 (a peer on a shared file system) is not process 9 here
            pid = re.fullmatch(r"(\d+)-[0-9a-f]{8}", path.name[len(prefix):])
            if pid and not _process_alive(int(pid.group(1))):
                if role == "old":
                    _settle(dst, path, by_this_process=False)
                elif path.is_dir() and not path.is_symlink():
                    _remove_tree(path)
                else:
                    with contextlib.suppress(OSError):  # (another user's, in a shared directory: left)
                        path.unlink(missing_ok=True)


def owned_temp_directory(prefix: str) -> Path:
    """A new directory in the system's temporary directory, named `prefix...`, recording which
    process owns it (OWNER_FILE: "HOST PID"). First removes the `prefix` directories that processes
    killed outright (SIGKILL, out of memory) left on this host: this user's, whose owner is gone."""
    for directory in Path(tempfile.gettempdir()).glob(glob.escape(prefix) + "*"):
        try:
            host, pid = (directory / OWNER_FILE).read_text().split()
            if host == socket.gethostname() and directory.stat().st_uid == os.getuid() and \
                    not _process_alive(int(pid)):
                shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError):  # no owner recorded (yet), or not a directory
            continue
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    (directory / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}")
    return directory


OWNER_FILE = "owner"  # in an `owned_temp_directory`

_HOLDING = [0]  # `signals_held` blocks active


@contextlib.contextmanager
def signals_held():
    """While active, the command line's SIGINT and SIGTERM wait (`signals.raising_signals`), so that
    a few steps are not cut in two: making a temporary directory and handing it to the code that
    removes it when the command stops (a signal in between left it behind)."""
    _HOLDING[0] += 1
    try:
        yield
    finally:
        _HOLDING[0] -= 1


def holding_signals() -> bool:
    return _HOLDING[0] > 0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _remove_tree(path: Path, seconds: float = 5.0) -> None:
    """Remove `path`, again while threads still finishing their writes (an interrupted Orbax save)
    add to it, for up to `seconds`; what cannot be removed is left."""
    deadline = time.monotonic() + seconds
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def holds_run(directory: str | os.PathLike) -> bool:
    """Whether DIRECTORY/config.json is a llama-jax run's resolved config (not, say, a Hugging Face config)."""
    saved = saved_run_setting(directory)
    return isinstance(saved, dict) and {"model", "train", "checkpoint"} <= set(saved)


def run_directory_problem(workdir: str | os.PathLike, for_a_model: str = "") -> str | None:
    """Why --workdir `workdir` cannot be a training run's directory (missing, a file, a model
    directory: `for_a_model` says what to do with one instead), as one line; None when it may be one."""
    workdir, expected = Path(workdir), "the --workdir of llama-jax train"
    if not workdir.exists():
        return f"--workdir {broken_link(workdir) or f'{workdir} does not exist'}; give a run's directory ({expected})"
    if not workdir.is_dir():
        return f"--workdir {workdir}: is a file; expected a run's directory ({expected})"
    if (workdir / "checkpoints").is_dir() and (problem := non_utf8_path(workdir, "--workdir")):
        return problem
    checkpoints = runs_checkpoints(workdir)
    if checkpoints is not None:
        where = "is" if checkpoints == real_path(workdir) else "is inside"
        return (f"--workdir {workdir} {where} {checkpoints}, the checkpoints of the run {checkpoints.parent}; give the "
                f"run's directory: --workdir {checkpoints.parent}")
    foreign = isinstance(saved_run_setting(workdir), dict) and not holds_run(workdir)  # a Hugging Face model's, say
    if foreign and not (workdir / "checkpoints").is_dir():  # (with checkpoints: a run's, damaged; check_run_config)
        return f"{holds_no_run(workdir, 'config.json')}; give a run's directory ({expected})"
    if (workdir / "config.json").exists():
        return None
    if (workdir / "model_config.json").is_file():
        return f"--workdir {workdir} is a model directory, not a run ({expected})" + \
            (f"; {for_a_model}" if for_a_model else "")
    from llama_jax.sweep import SPEC_FILE  # (sweep imports this module)

    if (workdir / SPEC_FILE).is_file():
        return (f"--workdir {workdir} is a sweep's directory ({SPEC_FILE}), not a run; give one of its trials' "
                f"directories inside it (llama-jax sweep --workdir {workdir} --report lists them)")
    return None


def holds_no_run(workdir: str | os.PathLike, entry: str) -> str:
    """The start of the line saying that --workdir `workdir` holds `entry`, a file of a run or a model, but no run."""
    return (f"--workdir {workdir} holds {entry!r} but no llama-jax run (a run writes config.json, checkpoints/, "
            f"metrics.jsonl there)")


def saved_run_setting(directory: str | os.PathLike, *keys: str):
    """The setting at `keys` (e.g. "train", "seq_len"; none: the whole file) of DIRECTORY/config.json,
    a run's resolved config; None when the file cannot be read or holds no such setting."""
    try:
        value = json.loads((Path(directory) / "config.json").read_text())
        for key in keys:
            value = value[key]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return value


def check_run_config(workdir: str | os.PathLike, otherwise: str) -> None:
    """ValueError when WORKDIR holds a run's checkpoints but its config.json is missing or damaged:
    every checkpoint keeps the config it ran with, and the message names the latest one's copy;
    `otherwise`: the other way out, for the message."""
    workdir = Path(workdir)
    if holds_run(workdir):
        return
    saved = sorted((p for p in workdir.glob("checkpoints/*/run/metadata") if p.parts[-3].isdigit()),
                   key=lambda p: int(p.parts[-3]))  # checkpoints/STEP/run/metadata, by step
    if saved:
        state = "damaged (not a run's resolved config)" if (workdir / "config.json").exists() else "missing"
        raise ValueError(f"--workdir {workdir} holds a run's checkpoints, but its config.json is {state}; every "
                         f"checkpoint keeps the config it ran with (the \"config\" entry of {saved[-1]}): write "
                         f"that back as {workdir / 'config.json'}, or {otherwise}")


def enclosing_run_or_model(path: str | os.PathLike) -> Path | None:
    """The nearest directory at or above `path` that is a llama-jax run or model directory, if any."""
    path = Path(path).absolute()
    owners = (d for d in [path, *path.parents] if d.is_dir() and (holds_run(d) or (d / "model_config.json").is_file()))
    return next(owners, None)


def check_writable(path: str | os.PathLike, option: str, into: bool = False, probe: bool = True) -> None:
    """ValueError unless `path` can be created or replaced: its nearest existing parent is a
    directory this process may write (not on a read-only file system, not immutable).
    `into`: `path` is a directory written into, checked itself when it exists.
    `probe`: the OS is asked by creating a file there (removed at once, the folder's modification
    time put back, so that a refusal after the check leaves it as it was), as the write will; without
    it (a dry run, which writes nothing) `os.access` is asked, which lets root write anywhere, even
    into /proc, and may miss a read-only bind mount."""
    path = Path(path).absolute()
    leads_nowhere = broken_link(path)
    if leads_nowhere:
        raise ValueError(f"{option} {leads_nowhere}; remove the link or choose another {option}")
    existing = next(p for p in ([path] if into else []) + list(path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a directory")
    if probe:
        times = existing.stat()
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".llama-jax-probe-"):
                pass
        except OSError as e:
            raise ValueError(cannot_write(option, path, existing, e)) from None
        with contextlib.suppress(OSError):  # the folder's times as they were: the probe changed nothing in it
            os.utime(existing, ns=(times.st_atime_ns, times.st_mtime_ns))
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(cannot_write(option, path, existing, "read-only file system or no permission"))


def cannot_write(option: str, path: str | os.PathLike, folder: Path, reason: OSError | str) -> str:
    """The error line for an `option` `path` whose file cannot be written into `folder`, for `reason`
    (the OS's error: its message, not the name of the temporary file it may be about)."""
    if isinstance(reason, OSError):
        reason = reason.strerror or str(reason)
    return f"{option} {path}: cannot write a file into {folder} ({reason}); choose another {option}, in a folder " \
           f"this user may write"


class DirectoryBusy(ValueError):
    """Another holder has the directory's lock."""


class DirectoryLock:
    """An exclusive advisory lock (`flock`) on a directory, held from `acquire` until `release` or
    until the process ends, whichever comes first; no file is written for it. A second holder, in
    this process or another, gets DirectoryBusy(`busy_message`). On a file system without such
    locks (some network file systems refuse them) nothing is locked."""

    def __init__(self, directory: str | os.PathLike, busy_message: str):
        self.directory, self.busy_message = Path(directory), busy_message
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock if it is not held already; the directory must exist."""
        if self._fd is not None:
            return
        try:
            self._fd = _locked_descriptor(self.directory, fcntl.LOCK_EX)
        except BlockingIOError:
            raise DirectoryBusy(self.busy_message) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def holds_lock(directory: str | os.PathLike) -> bool:
    """Whether a process holds `directory`'s DirectoryLock now. The probe takes a shared lock and
    drops it at once: a holder starting in that instant is told the directory is in use."""
    try:
        fd = _locked_descriptor(directory, fcntl.LOCK_SH)
    except BlockingIOError:
        return True
    except OSError:  # the directory cannot be opened
        return False
    if fd is not None:
        os.close(fd)
    return False


def _locked_descriptor(directory: str | os.PathLike, operation: int) -> int | None:
    """A descriptor of `directory` holding the `flock` lock `operation` (taken without waiting), or
    None where the file system has no such locks. BlockingIOError: another holder has the lock."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # no flock on this file system
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write; when the block ends without an error it replaces
    `path` in one rename, so a reader (or a later run) never sees half a file. Otherwise it is
    removed and `path` is left as it was."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():  # the rename would fail once the file is written
        raise ValueError(f"{path} is a directory, where a file is written; move it away")
    finish_for_dead_processes(path)  # the temporary file of a process killed while writing it
    tmp = scratch_path(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` in one rename (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, value, default=None) -> None:
    """`value` as indented JSON (`default`: as for `json.dumps`), written as `write_text_atomic` writes."""
    write_text_atomic(path, json.dumps(value, indent=2, default=default) + "\n")


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst`, which appears whole or not at all (`atomic_file`)."""
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


RESULTS_FILE_MAX = 64 * 2**20  # bytes: a larger file is no results file of a command here (they are kilobytes)


def read_results(path: Path):
    """What the results file `path` holds, read as JSON; None when it is no regular file (a FIFO or
    a device could block or never end), larger than RESULTS_FILE_MAX, unreadable or not JSON."""
    try:
        return json.loads(path.read_text()) if path.is_file() and path.stat().st_size <= RESULTS_FILE_MAX else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def check_results_file(path: str | os.PathLike, option: str, command: str, keys: Iterable[str]) -> Path:
    """`path` if a command's JSON results may be written there: not a directory, not under a file,
    on a writable file system, and either new or a JSON object holding all of `keys` (a results
    file of the same command, which a rerun replaces). ValueError naming `option` otherwise."""
    if not str(path).strip():
        raise ValueError(f"{option} is empty; give the path of a JSON file to write")
    if str(path).endswith("/"):  # (Path drops the slash: a file of that name was written)
        raise ValueError(f"{option} {path} ends in '/', which names a directory; give the path of a JSON file to "
                         f"write")
    path = Path(path).absolute()
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give the path of a JSON file to write")
    if path.exists() and not path.is_file():  # a FIFO or a device: reading it could block or never end
        raise ValueError(f"{option} {path} is not a regular file; give the path of a JSON file to write")
    check_outside_runs_and_models(path, option)
    check_writable(path, option)
    if path.exists() or path.is_symlink():
        held = read_results(path)
        if not isinstance(held, dict) or not set(keys) <= held.keys():
            raise ValueError(f"{option} {path} exists and is not a results file of `{command}`; choose another "
                             f"{option} (only an earlier result is replaced)")
    return path


_signal_error: list[BaseException] = []  # the signal exception being raised in this command, if any


def note_signal(error: BaseException | None) -> None:
    """Record the exception a signal (Ctrl-C, SIGTERM) is about to raise in the main thread (None:
    forget it, as a new command starts). A library may turn it into an error of its own (TensorStore
    reports a read it was interrupted in as a failed read); `raise_noted_signal` tells the two apart."""
    _signal_error[:] = [] if error is None else [error]


def raise_noted_signal() -> None:
    """Raise the noted signal's exception, if a signal arrived: call it before taking an error for
    damage."""
    if _signal_error:
        raise _signal_error[0] from None


@functools.cache  # once per process
def quiet_abandoned_reads() -> None:
    """Keep the reads a failed restore abandoned from printing after its error. When one array of
    an Orbax restore cannot be read, Orbax closes its asyncio loop while TensorStore goes on
    reading the others; each then hands its result to the closed loop (`call_soon_threadsafe`
    raises "Event loop is closed" from a TensorStore thread, with no frame of anyone's code), which
    Python prints with a traceback after the caller already has the one error that matters, and
    warns of Orbax's coroutines never awaited, or asyncio logs their failures as never retrieved.
    Installed once, before the first restore, for exactly those: the same errors raised by any
    other code are shown as before."""

    def orphaned(error: BaseException | None, tb) -> bool:
        return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and tb is not None
                and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")

    unraisablehook, excepthook = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = lambda u: None if orphaned(u.exc_value, u.exc_traceback) else unraisablehook(u)
    sys.excepthook = lambda kind, error, tb: None if orphaned(error, tb) else excepthook(kind, error, tb)
    # (the warning names the asyncio frame that dropped the coroutine, not the coroutine's module)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning,
                            module="asyncio")

    def abandoned_read_failed(record: logging.LogRecord) -> bool:  # TensorStore's errors carry its spec
        error = record.exc_info[1] if record.exc_info else None
        return (str(record.msg).startswith(("Task exception was never retrieved", "Future exception was never "
                                            "retrieved")) and "tensorstore_spec" in str(error))

    logging.getLogger("asyncio").addFilter(lambda record: not abandoned_read_failed(record))


def describe_value(value: object) -> str:
    """A value as an error message names it: None, or its type and (when short) its repr."""
    if value is None:
        return "None"
    name, text = type(value).__name__, repr(value)
    short = len(text) <= 40 and "\n" not in text
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}" + (f" ({text})" if short else "")


def read_json_object(path: str | os.PathLike, holds: str) -> dict:
    """The JSON object in the file `path`; ValueError (one line naming the file) when it is not
    valid JSON or not an object. `holds`: what the object should hold, for the message."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # invalid JSON or not UTF-8
        raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON object of {holds}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds {describe_value(value)}, not a JSON object of {holds}")
    return value


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unreadable_path(directory: str | os.PathLike) -> Path | None:
    """The first file or directory at or under `directory` that exists but this process has no
    permission to read (a checkpoint that is intact but not ours to read is not damaged), or None
    (also for paths removed meanwhile: a checkpoint the retention deleted is not unreadable)."""
    try:
        for path in [Path(directory), *Path(directory).rglob("*")]:
            if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)) and path.exists():
                return path  # (there after the check: not just removed by a run's retention)
    except FileNotFoundError:  # removed while it was walked
        pass
    return None


def damage_reason(error: BaseException, directory: str | os.PathLike | None = None) -> str:
    """One line on why reading a checkpoint failed: the innermost error's first line (TensorStore,
    JSON and OS errors name the key or file there), plus the empty files under `directory`."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:  # the chain a traceback would show
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    telling = [e for e in chain if str(e).strip() and not isinstance(e, (StopIteration, KeyError))]
    innermost = telling[-1] if telling else chain[0]
    first = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
    first = first.split(" [tensorstore_spec=")[0]  # (TensorStore appends its whole spec)
    reason = f"{type(innermost).__name__}: {first}"[:400]
    if directory is not None and Path(directory).is_dir():
        empty = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*")
                       if p.is_file() and p.stat().st_size == 0)
        if empty:
            reason += f"; empty file(s): {', '.join(empty[:5])}"
    return reason
