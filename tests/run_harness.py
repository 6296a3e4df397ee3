"""`llama-jax train` in a process that dies where a test tells it to, as a preempted VM would.

    python -m tests.run_harness train --config ... --workdir ...

Environment:
    KILL_AFTER_STEP=s    SIGKILL right after step s is logged, once a checkpoint is committed
    KILL_DURING_SAVE=s   SIGKILL right after the (asynchronous) save of step s has started
    KILL_AFTER_COMMIT=s  SIGKILL when the second step after the first one logged once checkpoint s
                         is committed is logged (the run has passed the end of a step twice since);
                         the first step logged after s waits for that commit
    KILL_BEFORE_MARKER=s SIGKILL when the save of step s, committed by marker file, is written in
                         full and its marker is not
    MOUNTS_FILE=path     the mount table read in place of /proc/mounts (a checkpoints directory
                         it lists on a gcsfuse mount is committed by marker file)
Without either it is exactly `llama-jax`.
"""

import os
import signal
import sys
import time
from pathlib import Path


def committed_steps(checkpoint_dir: Path) -> list[int]:
    """Step directories Orbax has committed (temporary ones carry a suffix and are not listed)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())


def _kill_after_step(step_to_kill: int) -> None:
    from llama_jax import metrics

    original = metrics.MetricsWriter.write

    def write(self, step, record):
        original(self, step, record)
        if step == step_to_kill:
            workdir = Path(self._file.name).parent
            deadline = time.monotonic() + 120
            while not committed_steps(workdir / "checkpoints") and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    metrics.MetricsWriter.write = write


def _kill_after_commit(checkpoint_step: int) -> None:
    from llama_jax import metrics

    original, seen, waited = metrics.MetricsWriter.write, [], []

    def write(self, step, record):
        original(self, step, record)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoints = Path(self._file.name).parent / "checkpoints"
        if not waited and step > checkpoint_step:  # the commit finishes in Orbax's thread: wait for it here
            waited.append(step)  # (once), or a slow one would be seen only after the run's end
            deadline = time.monotonic() + 120
            while checkpoint_step not in committed_steps(checkpoints) and time.monotonic() < deadline:
                time.sleep(0.05)
        if seen or checkpoint_step in committed_steps(checkpoints):
            seen.append(step)

    metrics.MetricsWriter.write = write


def _kill_during_save(step_to_kill: int) -> None:
    from llama_jax import checkpoint

    original = checkpoint.RunCheckpoints.save

    def save(self, step, *args, **kwargs):
        started = original(self, step, *args, **kwargs)
        if started and step == step_to_kill:
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    checkpoint.RunCheckpoints.save = save


def _kill_before_marker(step_to_kill: int) -> None:
    import orbax.checkpoint as ocp

    commit = ocp.path.atomicity.CommitFileTemporaryPath
    original = commit.finalize

    async def finalize(self):  # (in Orbax's saving thread, once every item of the step is written)
        if self.get_final().name == str(step_to_kill):
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self)

    commit.finalize = finalize


if __name__ == "__main__":
    if os.environ.get("MOUNTS_FILE"):
        from llama_jax import checkpoint_steps

        checkpoint_steps.MOUNTS_FILE = Path(os.environ["MOUNTS_FILE"])
    if os.environ.get("KILL_AFTER_STEP"):
        _kill_after_step(int(os.environ["KILL_AFTER_STEP"]))
    if os.environ.get("KILL_AFTER_COMMIT"):
        _kill_after_commit(int(os.environ["KILL_AFTER_COMMIT"]))
    if os.environ.get("KILL_DURING_SAVE"):
        _kill_during_save(int(os.environ["KILL_DURING_SAVE"]))
    if os.environ.get("KILL_BEFORE_MARKER"):
        _kill_before_marker(int(os.environ["KILL_BEFORE_MARKER"]))
    from llama_jax.cli import main

    sys.exit(main(sys.argv[1:]))
