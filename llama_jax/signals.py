"""How the `llama-jax` command takes Ctrl-C and SIGTERM: raised where the command is, so that what it
staged or half-written is cleaned up on the way out, never inside an import or a held section."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable


class Terminated(BaseException):
    """SIGTERM arrived while the command was not in a training loop (which treats it as preemption):
    raised where the command was, so that what it had staged or half-written is cleaned up on the way
    out, as for Ctrl-C."""


@contextlib.contextmanager
def raising_signals():
    """While active, SIGTERM raises `Terminated` in the main thread instead of ending the process
    on the spot, and Ctrl-C raises KeyboardInterrupt as usual; both are noted first
    (`safe_io.note_signal`: a library that turns them into errors of its own must not have them
    taken for damaged files). A signal that arrives while a module is being imported waits until
    the import is done, for up to IMPORT_WAIT_S: an extension module (jaxlib's) whose
    initialisation is interrupted crashes the interpreter when it is freed; so does one that arrives
    inside `safe_io.signals_held`. The previous handlers are back afterwards, and the signal noted
    is forgotten."""
    from llama_jax.safe_io import holding_signals, note_signal

    held_since: dict[int, float] = {}  # signal -> when first held back for an import or by `signals_held`

    def handle(error_type):
        def raise_noted(signum, frame):
            now = time.monotonic()
            if (_importing(frame) or holding_signals()) and now - held_since.setdefault(signum, now) < IMPORT_WAIT_S:
                # unless raised meanwhile (by a second Ctrl-C after the import)
                signal_again(signum, after=0.05, unless=lambda: signum not in held_since)
                return
            held_since.pop(signum, None)
            error = error_type()
            note_signal(error)
            raise error
        return raise_noted

    note_signal(None)
    handled = [(signal.SIGTERM, Terminated)]
    # (Python's handler, or a program's while it started: not when started with Ctrl-C ignored)
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _interrupted_at_once):
        handled.append((signal.SIGINT, KeyboardInterrupt))
    try:
        previous = {s: signal.signal(s, handle(e)) for s, e in handled}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    RAISING.update(previous)
    try:
        yield
    finally:
        RAISING.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)
        note_signal(None)  # (a failed read after the block, a later call's, is not this signal's doing)


def stopped_status(prog: str, error: BaseException) -> int:
    """Say in one line that `prog` was stopped by Ctrl-C (KeyboardInterrupt) or SIGTERM (`Terminated`),
    as `raising_signals` raised it, and return the exit status a shell gives such a stop."""
    if isinstance(error, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
    return 128 + signal.SIGTERM


def interrupt_at_once(prog: str) -> None:
    """For a program starting up: until `raising_signals` takes Ctrl-C, it ends the program at once
    with `stopped_status`'s line (`prog: interrupted`) and exit status, without the interpreter's
    teardown. A KeyboardInterrupt in the imports ended in a traceback, and there is nothing yet to
    clean up. Not where Ctrl-C is ignored (the program was started so)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _AT_ONCE[0] = prog
        signal.signal(signal.SIGINT, _interrupted_at_once)


def _interrupted_at_once(signum, frame) -> None:
    status = stopped_status(_AT_ONCE[0], KeyboardInterrupt())
    sys.stderr.flush()
    os._exit(status)


_AT_ONCE = [""]  # the program `interrupt_at_once` names


RAISING: set[int] = set()  # the signals `raising_signals` handles while it is active


def ignore_signals(signals=(signal.SIGINT, signal.SIGTERM)) -> None:
    """`signals` are ignored from now on: once a command's work is done, Ctrl-C or SIGTERM would
    only misreport how it ended."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


IMPORT_WAIT_S = 10.0  # longest a signal waits for an import to finish (a hung import still stops)


def signal_again(signum: int, after: float, unless=lambda: False) -> None:
    """Send `signum` to this process `after` seconds from now, from a timer thread: where the
    signal was caught (a handler, an unraisable-exception hook) it can neither wait nor be raised
    again. Nothing is sent if `unless()` is true by then."""
    def send():
        if not unless():
            os.kill(os.getpid(), signum)
    threading.Timer(after, send).start()


def child_setup() -> Callable[[], None]:
    """What a child process of the command runs before its program (`subprocess.Popen`'s
    `preexec_fn`): it ignores Ctrl-C, which a terminal sends the whole process group (the command
    stops its children its own way), takes SIGTERM's default action (not the command's handler,
    which the fork copied and which may hold it back), and gets SIGTERM when the command's process
    dies, so that a killed command leaves no orphan running. libc is loaded here, in the parent:
    loading a library in the forked child of a process with threads can deadlock. The last is
    skipped where libc has no prctl."""
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    parent_pid = os.getpid()

    def setup():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:  # the parent died before that call: no SIGTERM would come
                os.kill(os.getpid(), signal.SIGTERM)
    return setup


def _importing(frame) -> bool:
    """Whether `frame` runs inside Python's import machinery (a module's body or its loading)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False
