"""Submit llama-jax command lines to a SLURM cluster through submitit.

A job runs one task per node; each task runs the whole command line (all of its node's GPUs in
one process), and `llama-jax train` joins the tasks into one JAX program through JAX's SLURM
detection (`jax.distributed.initialize()` when SLURM_NTASKS > 1). JAX's SLURM detection gives
each process one GPU, its local task index, unless JAX_LOCAL_DEVICE_IDS says otherwise, so the
sbatch script exports the node's GPU indices there.

A job stopped by its time limit is requeued by submitit with the same command line, and the run
resumes from the checkpoints in its workdir: SLURM warns the job save_time_s + REQUEUE_S before
its time limit (USR2, `--signal`); submitit's handler on the first task asks the job for a
checkpoint, which here sends the command SIGTERM (a llama-jax run saves and stops, every process
at the same step) and waits up to save_time_s for it, then requeues the job (`scontrol requeue`,
which SLURM refuses for a job that is not requeueable: the script asks for `--requeue`, which a
cluster's JobRequeue=0 would otherwise withhold). A job is requeued after up to
MAX_TIMEOUT_REQUEUES time limits. A preempted job gets SIGTERM from SLURM (the command saves and
stops) or, where the cluster sets PreemptParameters=send_user_signal, the USR2 of a time limit;
it is requeued where the cluster's PreemptMode is REQUEUE or it gets USR2, and with
PreemptMode=CANCEL it ends, saved: submitting the same command again resumes it. Dry runs write
the sbatch script submitit would submit, rendered by submitit itself, and submit nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from llama_jax.launch import LaunchError
from llama_jax.safe_io import shown_as_utf8

DEFAULT_TIME_MIN = 60
WORKDIR_FOLDER = "slurm"  # submitit's folder (sbatch script, logs) inside the workdir of the command it runs
MAX_TIMEOUT_REQUEUES = 1000  # submitit's default, 3, would end a run of 1-hour jobs after 4 hours
SAVE_TIME_S = 80  # how long a requeue waits for the command to save, before `scontrol requeue` (--save-time-s)
MIN_SAVE_TIME_S = 10
REQUEUE_S = 10  # SLURM's warning (USR2) comes save_time_s + this before the time limit (or up to 60 s earlier)
MAX_SIGNAL_DELAY_S = 65535  # the longest warning sbatch's --signal takes
DRY_RUN_SCRIPT = "dry_run_submission.sh"
INSTALL_HINT = "pip install 'submitit>=1.5' (in a checkout: pip install -e '.[launch]')"


def llama_jax_command(args: Sequence[str]) -> list[str]:
    """A llama-jax command line (`train --config ...`) run with this Python, as submitit's own runner is."""
    return [sys.executable, "-m", "llama_jax.cli", *args]


@dataclasses.dataclass
class JobCommand:
    """One SLURM task's work: a command line. submitit requeues it unchanged after a timeout or a
    preemption (it has `checkpoint`); a llama-jax run then resumes from its checkpoints."""

    argv: list[str]
    save_time_s: int = SAVE_TIME_S  # how long the command is given to save before a requeue

    def __call__(self) -> None:
        global _running
        _running = subprocess.Popen(self.argv, preexec_fn=_ignoring(_requeue_signal()))
        while True:  # waits of a second: an untimed wait would keep `checkpoint` (run inside it) from reaping
            try:
                status = _running.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
        if status != 0:
            raise subprocess.CalledProcessError(status, self.argv)

    def checkpoint(self) -> Any:
        """Called by submitit (on the job's first task) before it requeues the job: the command is
        sent SIGTERM and given save_time_s to save and stop, so that the requeued job resumes from
        the step it reached (submitit then exits, which would kill a command still running)."""
        from submitit.helpers import DelayedSubmission

        if _running is not None and _running.poll() is None:
            _running.terminate()
            try:
                _running.wait(timeout=self.save_time_s)
            except subprocess.TimeoutExpired:
                pass  # the job ends at its time limit; the requeued one resumes from the last checkpoint
        return DelayedSubmission(JobCommand(list(self.argv), self.save_time_s))


_running: subprocess.Popen | None = None  # the command of this task's JobCommand, while it runs


def _requeue_signal() -> signal.Signals:
    """The signal SLURM sends every process of the job before its time limit (the script's
    `--signal`), submitit's cue to requeue: USR2, or the one submitit's SUBMITIT_PREEMPT_SIGNAL names."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    return SlurmJobEnvironment._usr_sig()


def _ignoring(signum: signal.Signals):
    """What the command's process runs first: the requeue signal is submitit's, and the command
    runs on until the requeue stops it."""
    return lambda: signal.signal(signum, signal.SIG_IGN)


def submit(command: Sequence[str], folder: str | Path, **options: Any) -> str:
    """Submit one command line as one job (options as for `submit_array`); its job id, or with
    dry_run the path of the sbatch script."""
    return submit_array([command], folder, **options)[0]


def submit_array(commands: list[list[str]], folder: str | Path, *, dry_run: bool = False, **options: Any) -> list[str]:
    """Submit one job per command line, as one job array (a plain job for a single command).
    `options`: nodes, gpus_per_node, partition, time_min (minutes), account, qos, constraint,
    cpus_per_node, mem_gb (per node; 0: all of its memory), exclusive, job_name, save_time_s
    (seconds the command has to save before a requeue), gpus_by_gres (the GPUs requested as
    `--gres=gpu:G`, not `--gpus-per-node=G`); defaults in `_job_parameters`.

    Returns the job ids; with dry_run, writes the sbatch script into `folder` instead and returns
    its path as a one-element list. Commands are full argv lists, run as given on the nodes."""
    if dry_run:
        path = Path(folder) / DRY_RUN_SCRIPT
        script = array_script(commands, folder, **options)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        return [str(path)]
    parameters = _job_parameters(commands, **options)
    submitit = _import_submitit()
    for tool in ("sbatch", "srun"):  # (submitit refuses to start without srun, with a traceback)
        if shutil.which(tool) is None:
            raise LaunchError(f"{tool} not found on PATH: submit from a SLURM login node, or use --dry-run")
    executor = _executor(submitit, folder, dry_run=False)
    executor.update_parameters(**parameters)
    save_time_s = parameters["signal_delay_s"] - REQUEUE_S  # (the warning's lead leaves the command this to save)
    before = set(Path(folder).iterdir()) if Path(folder).is_dir() else set()
    jobs = []
    try:
        with executor.batch():
            for argv in commands:
                jobs.append(executor.submit(JobCommand(list(argv), save_time_s)))
    except submitit.core.utils.FailedJobError as e:
        for left in set(Path(folder).iterdir()) - before:  # the jobs' pickles and script, for no job
            if left.is_file():
                left.unlink()
        said = str(e).strip().splitlines()[-1] if str(e).strip() else "it printed no reason"
        raise LaunchError(f"sbatch failed: {said}") from None
    return [job.job_id for job in jobs]


def _check_job_folder(folder: str | Path) -> None:
    """LaunchError for a folder whose path the sbatch script cannot hold: its logs' paths are
    #SBATCH lines, which a line break (or another control character) would cut."""
    if any(ord(c) < 32 or ord(c) == 127 for c in str(folder)):
        raise LaunchError(f"the job folder {str(folder)!r} (--folder, or the --workdir's {WORKDIR_FOLDER}/) holds a "
                          f"control character, which would break the sbatch script's #SBATCH lines; use a path "
                          f"without one")
    if shown_as_utf8(str(folder)) != str(folder):
        raise LaunchError(f"the job folder {shown_as_utf8(str(folder))} (--folder, or the --workdir's "
                          f"{WORKDIR_FOLDER}/) holds bytes that are not UTF-8, which the sbatch script (UTF-8 text) "
                          f"cannot hold; use a path without them")


def array_script(commands: list[list[str]], folder: str | Path, **options: Any) -> str:
    """The sbatch script `submit_array` submits for these commands (options as there), rendered
    without SLURM and written nowhere."""
    parameters = _job_parameters(commands, **options)
    executor = _executor(_import_submitit(), folder, dry_run=True)
    executor.update_parameters(**parameters)
    return submission_script(executor, len(commands))


def _job_parameters(commands: list[list[str]], *, nodes: int = 1, gpus_per_node: int = 1, partition: str | None = None,
                    time_min: int = DEFAULT_TIME_MIN, account: str | None = None, qos: str | None = None,
                    constraint: str | None = None, cpus_per_node: int | None = None, mem_gb: int | None = None,
                    exclusive: bool = False, job_name: str = "llama-jax", save_time_s: int = SAVE_TIME_S,
                    gpus_by_gres: bool = False) -> dict[str, Any]:
    """The executor parameters of `submit_array`'s options, once they are checked."""
    _check(commands, save_time_s, nodes=nodes, gpus_per_node=gpus_per_node, time_min=time_min,
           cpus_per_node=cpus_per_node)
    if mem_gb is not None and mem_gb < 0:
        raise LaunchError(f"--mem-gb must be at least 0 (0: all of each node's memory), got {mem_gb}")
    if constraint is not None and not re.fullmatch(r"[\w.+&|\[\]()*-]+", constraint):
        raise LaunchError(f"--constraint {constraint!r}: use node feature names (letters, digits and . _ + -) and "
                          f"SLURM's operators & | [ ] ( ) * (it is written into the sbatch script)")
    for flag, value, extra in (("--job-name", job_name, ""), ("--partition", partition, ","),
                               ("--account", account, ""), ("--qos", qos, "")):
        if value is not None and not re.fullmatch(rf"[\w.+{extra}-]+", value):  # each is a line of the sbatch script
            raise LaunchError(f"{flag} {value!r}: use letters, digits and . _ + -{' ,' if extra else ''} (it is "
                              f"written into the sbatch script)")
        if value is not None and extra and "" in value.split(extra):
            raise LaunchError(f"{flag} {value!r} has an empty name in its list; give names separated by single "
                              f"commas, e.g. gpu,gpu-large")
    # a task that fails ends the job's other tasks at once (srun's default, a cluster's KillOnBadExit=0, leaves them
    # waiting in a collective for the lost process until JAX's heartbeat timeout aborts them);
    # srun of Slurm 22.05 to 23.02 does not take the job's --cpus-per-task: without its own, the task gets one CPU
    srun_args = ["--kill-on-bad-exit=1", *([f"--cpus-per-task={cpus_per_node}"] if cpus_per_node is not None else [])]
    # --gpus-per-node needs SelectType=select/cons_tres; a generic resource (gres) request works on more clusters
    gpus = dict(gres=f"gpu:{gpus_per_node}") if gpus_by_gres else dict(gpus_per_node=gpus_per_node)
    return dict(job_name=job_name, nodes=nodes, ntasks_per_node=1, **gpus, time=time_min,
                partition=partition, account=account, qos=qos, constraint=constraint, cpus_per_task=cpus_per_node,
                mem=None if mem_gb is None else f"{mem_gb}G", exclusive=exclusive or None, srun_args=srun_args,
                signal_delay_s=save_time_s + REQUEUE_S, additional_parameters={"requeue": True},
                wckey=None,  # (submitit's "submitit": jobs booked to it, or refused where wckeys are enforced)
                setup=_setup_lines(commands, gpus_per_node))


def queued_or_running(job_ids: Sequence[str]) -> set[str]:
    """Those of `job_ids` (`ARRAY_INDEX` as `submit_array` returns them) that SLURM still lists,
    waiting or running, among this user's jobs (`squeue`)."""
    import getpass

    try:
        listed = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--user={getpass.getuser()}"],
                                capture_output=True, text=True, timeout=120, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        raise LaunchError(f"squeue could not list this user's jobs ({detail[-1] if detail else type(e).__name__}), "
                          f"so whether job(s) {', '.join(job_ids)} still run is unknown; run this from a SLURM "
                          f"login node") from None
    return set(job_ids) & set(listed)


def min_time_min(save_time_s: int) -> int:
    """The shortest time limit (minutes) for a job given save_time_s to save: it leaves as long for
    work as the warning's lead (SLURM's USR2 there starts the save and the requeue)."""
    return math.ceil(2 * (save_time_s + REQUEUE_S) / 60)


def _check(commands: list[list[str]], save_time_s: int, **counts: int | None) -> None:
    if not commands or any(not list(argv) for argv in commands):
        raise LaunchError("nothing to submit: give at least one non-empty command line")
    most = MAX_SIGNAL_DELAY_S - REQUEUE_S
    if not MIN_SAVE_TIME_S <= save_time_s <= most:
        raise LaunchError(f"--save-time-s must be from {MIN_SAVE_TIME_S} to {most}, got {save_time_s}: the command "
                          f"needs time to save, and SLURM's warning comes at most {MAX_SIGNAL_DELAY_S} s before the "
                          f"time limit (--save-time-s + {REQUEUE_S} to requeue)")
    least, lead = min_time_min(save_time_s), save_time_s + REQUEUE_S
    if counts.get("time_min") is not None and counts["time_min"] < least:  # (before the check of 1 below)
        raise LaunchError(f"--time-min must be at least {least}, got {counts['time_min']}: SLURM warns a job {lead} "
                          f"s before its limit (--save-time-s {save_time_s} + {REQUEUE_S}), where it saves and is "
                          f"requeued, so a shorter job would be requeued again and again before it trained")
    for name, value in counts.items():
        if value is not None and value < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise LaunchError(f"SLURM launching needs submitit: {INSTALL_HINT}") from None
    return submitit


def _executor(submitit, folder: str | Path, dry_run: bool):
    """submitit's SlurmExecutor; for a dry run, one that renders scripts on a machine without SLURM."""
    _check_job_folder(folder)
    if not dry_run:
        return submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)

    class OfflineSlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # SlurmExecutor refuses to start without srun on PATH
            return 1

    return OfflineSlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES)


def _setup_lines(commands: list[list[str]], gpus_per_node: int) -> list[str]:
    """Lines of the sbatch script before srun: what each task runs (as comments) and its GPUs for JAX."""
    def shown(argv: Sequence[str]) -> str:
        return shown_as_utf8(shlex.join(argv)).replace("\n", "\\n")  # a comment must stay one line, and UTF-8

    if len(commands) == 1:
        lines = [f"# every task runs (through submitit's pickle): {shown(commands[0])}"]
    else:
        lines = [f"# array task {i} runs (through submitit's pickle): {shown(argv)}" for i, argv in enumerate(commands)]
    return lines + [f"export JAX_LOCAL_DEVICE_IDS={','.join(str(i) for i in range(gpus_per_node))}"]


def submission_script(executor, count: int) -> str:
    """The sbatch script submitit writes for `count` submissions with this executor: a job array when
    count > 1 (as SlurmExecutor._internal_process_submissions sets map_count), else a plain job."""
    from submitit.slurm.slurm import _make_sbatch_string

    parameters = dict(executor.parameters, **({"map_count": count} if count > 1 else {}))
    return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **parameters)
