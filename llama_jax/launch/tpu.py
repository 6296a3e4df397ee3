"""Run a llama-jax command on every worker of a Cloud TPU VM slice, through the gcloud CLI.

A launch: create the slice as a queued resource (or reuse it), wait until it is ACTIVE, ship
this checkout to every worker and install it, run the command on all workers at once (detached
from the ssh session, its output logged there and followed here: a dropped connection re-attaches,
the run goes on), then optionally copy the workdir back and delete the slice. The
training engine joins the workers into one JAX program by itself on TPU VMs.

Launching again after a preemption is the same command: a queued resource that lost its TPUs
(SUSPENDED, FAILED, or ACTIVE with its TPU VM PREEMPTED, TERMINATED or gone) is deleted and
re-created, and `llama-jax train` resumes from the latest checkpoint in its workdir, which must
therefore be on storage every worker sees and that outlives the VMs (a gcsfuse-mounted bucket).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Sequence

from llama_jax.launch import INPUT_PATHS, LaunchError, option_value
from llama_jax.signals import Terminated


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    """What an accelerator type `<prefix>-N` means for one TPU generation."""

    prefix: str  # as gcloud spells it: v4-32, v5p-128, v5litepod-16, v6e-8
    counts: str  # what N counts: "cores" (TensorCores) or "chips"
    cores_per_chip: int
    chips_per_host: int  # in a multi-host slice
    single_host_chips: int  # slices of at most this many chips are one host
    runtime_version: str  # default TPU VM image
    chip_counts: tuple[int, ...] | None = None  # the slice sizes there are, where a short list says it
    min_chips: int = 1  # the smallest slice


# The one table of TPU facts.
TPU_FAMILIES = (
    TpuFamily("v4", "cores", cores_per_chip=2, chips_per_host=4, single_host_chips=4,
              runtime_version="tpu-ubuntu2204-base", min_chips=4),
    TpuFamily("v5p", "cores", cores_per_chip=2, chips_per_host=4, single_host_chips=4,
              runtime_version="v2-alpha-tpuv5", min_chips=4),
    TpuFamily("v5litepod", "chips", cores_per_chip=1, chips_per_host=4, single_host_chips=8,
              runtime_version="v2-alpha-tpuv5-lite", chip_counts=(1, 4, 8, 16, 32, 64, 128, 256)),
    TpuFamily("v6e", "chips", cores_per_chip=1, chips_per_host=4, single_host_chips=8,
              runtime_version="v2-alpha-tpuv6e", chip_counts=(1, 4, 8, 16, 32, 64, 128, 256)),
)

# The states of a TPU VM (the API's Node.State values) whose TPUs are gone, and NOT_FOUND for one that is
# gone itself (deleted: a queued resource's TPU VM exists from its provisioning on); its queued resource
# leaves ACTIVE only once the service suspends it, so an ACTIVE one's TPU VM is asked too (`describe_state`).
NODE_LOST_STATES = ("PREEMPTED", "TERMINATED", "NOT_FOUND")
# What a launch does with a queued resource in each state (the API's QueuedResource.State values,
# plus those of NODE_LOST_STATES, which `describe_state` gives for an ACTIVE one whose node is in one).
QUEUED_RESOURCE_STATES = {
    "ACTIVE": "use",
    "CREATING": "wait", "ACCEPTED": "wait", "PROVISIONING": "wait", "WAITING_FOR_RESOURCES": "wait",
    "SUSPENDING": "wait", "DELETING": "wait",
    "SUSPENDED": "recreate", "FAILED": "recreate", **dict.fromkeys(NODE_LOST_STATES, "recreate"),
}
POLL_SECONDS = 30
REMOTE_DIR = "llama-jax"  # the checkout on every worker, relative to the ssh user's home
REMOTE_TARBALL = "llama-jax.tar.gz"
# jax 0.10 needs Python 3.11, and the TPU VM images (Ubuntu 22.04) have 3.10: each worker gets a
# virtual environment of Python 3.11 inside the checkout, made by uv (which fetches that Python
# when the image lacks it) and kept across launches; the run uses its interpreter.
REMOTE_PYTHON_VERSION = "3.11"
REMOTE_PYTHON = ".venv/bin/python"  # relative to REMOTE_DIR
LAUNCH_DIR = ".launch"  # relative to REMOTE_DIR: each launch NAME's NAME.log, .status, .pid, .id, .lock
# relative to REMOTE_DIR: the files the last ship unpacked there, NUL-separated and sorted byte by byte (a name
# no launch's files take); each ship brings its own as SHIPPED.new and removes the last one's files it lacks
SHIPPED = f"{LAUNCH_DIR}/.shipped"
SSH_LOST = 255  # gcloud's exit status when the ssh connection failed or dropped (a command's own 255 comes as 1)
RECONNECTS = 5  # re-attaches in a row after lost connections before the launcher gives up (the run goes on)
RECONNECT_WAIT_S = 10  # before the first; doubled each time
CONNECTED_S = 300  # a connection that lasted this long worked: the next lost one is the first in a row
REATTACH_LINES = 20  # of the log shown again when following a command started earlier
REMOTE_INSTALL = ("python3 -m pip install -q uv",
                  f"python3 -m uv venv -q --allow-existing --python {REMOTE_PYTHON_VERSION} .venv",
                  f'python3 -m uv pip install -q --python {REMOTE_PYTHON} -e . "jax[tpu]"')


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """An accelerator type resolved against the table: its chips and workers (hosts)."""

    accelerator: str
    family: TpuFamily
    chips: int

    @property
    def workers(self) -> int:
        if self.chips <= self.family.single_host_chips:
            return 1
        return self.chips // self.family.chips_per_host


def tpu_slice(accelerator: str) -> TpuSlice:
    """Resolve an accelerator type such as v4-32; one error line for anything the table does not know."""
    prefix, _, size = accelerator.partition("-")
    family = next((f for f in TPU_FAMILIES if f.prefix == prefix), None)
    if family is None or not size.isdigit() or int(size) < 1 or str(int(size)) != size:
        known = ", ".join(f"{f.prefix}-N (N {'TensorCores' if f.counts == 'cores' else 'chips'})"
                          for f in TPU_FAMILIES)
        raise LaunchError(f"unknown accelerator type {accelerator!r}; expected one of {known}, e.g. v4-32")
    n = int(size)
    chips, rest = divmod(n, family.cores_per_chip) if family.counts == "cores" else (n, 0)
    if rest:
        raise LaunchError(f"{accelerator}: {n} TensorCores is not a whole number of chips "
                          f"({family.cores_per_chip} per {family.prefix} chip)")
    if chips < family.min_chips:
        smallest = family.min_chips * (family.cores_per_chip if family.counts == "cores" else 1)
        raise LaunchError(f"{accelerator}: the smallest {family.prefix} slice is {family.prefix}-{smallest} "
                          f"({family.min_chips} chips, one host)")
    if chips > family.single_host_chips and chips % family.chips_per_host:
        raise LaunchError(f"{accelerator}: {chips} chips is not a whole number of hosts "
                          f"({family.chips_per_host} chips per {family.prefix} host)")
    if family.chip_counts and chips not in family.chip_counts:
        raise LaunchError(f"{accelerator}: {family.prefix} slices have {', '.join(map(str, family.chip_counts))} "
                          f"chips, not {chips}")
    return TpuSlice(accelerator, family, chips)


@dataclasses.dataclass(frozen=True)
class TpuLaunch:
    """Everything one `llama-jax launch tpu` does."""

    name: str  # the queued resource and its TPU VM node
    zone: str
    slice: TpuSlice
    command: tuple[str, ...]  # llama-jax arguments run on every worker, e.g. ("train", "--config", ...)
    runtime_version: str | None = None  # default: the family's
    spot: bool = False
    project: str | None = None
    setup: str | None = None  # extra shell run on every worker after installing (e.g. mount a bucket)
    copy_back: str | None = None  # local directory receiving worker 0's workdir
    delete_after: bool = False
    max_restarts: int = 0  # re-launches after a preemption during the run
    internal_ip: bool = False  # ssh and scp to the workers' internal IP addresses (from inside their VPC network)
    # tells this launch's command on the workers from an earlier launch's of the same name
    launch_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12], compare=False)

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
            raise LaunchError(f"--name {self.name!r}: use 1 to 63 lowercase letters, digits and hyphens, starting "
                              f"with a letter and not ending with a hyphen" + (f" (this one has {len(self.name)})"
                                                                              if len(self.name) > 63 else ""))
        if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z][a-z0-9]*", self.zone):
            raise LaunchError(f"--zone {self.zone!r} is not a Google Cloud zone; valid: a region and its zone's "
                              f"suffix, e.g. us-central2-b (v4), us-east5-a (v5p), us-central1-ai1a")
        if self.runtime_version is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.runtime_version):
            raise LaunchError(f"--runtime-version {self.runtime_version!r}: use letters, digits, dots, hyphens and "
                              f"underscores, starting with a letter or digit, e.g. tpu-ubuntu2204-base")
        # a project ID, a legacy domain-scoped one (DOMAIN:ID) or the project's number: gcloud takes each
        if self.project is not None and not re.fullmatch(r"([a-z0-9][-a-z0-9.]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]|[0-9]+",
                                                         self.project):
            raise LaunchError(f"--project {self.project!r} is not a Google Cloud project ID; valid: 6 to 30 lowercase "
                              f"letters, digits and hyphens, starting with a letter and not ending with a hyphen, "
                              f"e.g. my-project-123 (or the project's number)")
        if self.max_restarts < 0:
            raise LaunchError(f"--max-restarts must be 0 or more, got {self.max_restarts}")
        if self.setup is not None:
            _check_shell_syntax(self.setup)

    @property
    def runtime(self) -> str:
        return self.runtime_version or self.slice.family.runtime_version

    @property
    def tarball(self) -> Path:
        """This process's packed checkout (two launches of one name, or two users of one /tmp, share none)."""
        return Path(tempfile.gettempdir()) / f"llama-jax-{self.name}-{os.getpid()}.tar.gz"


# ---- gcloud command lines ---------------------------------------------------------------------


def _gcloud(tpu: TpuLaunch, *args: str) -> list[str]:
    project = ["--project", tpu.project] if tpu.project else []
    return ["gcloud", "compute", "tpus", *args, "--zone", tpu.zone, *project]


def create_command(tpu: TpuLaunch) -> list[str]:
    spot = ["--spot"] if tpu.spot else []
    return _gcloud(tpu, "queued-resources", "create", tpu.name, "--node-id", tpu.name,
                   "--accelerator-type", tpu.slice.accelerator, "--runtime-version", tpu.runtime, *spot)


def describe_command(tpu: TpuLaunch) -> list[str]:
    return _gcloud(tpu, "queued-resources", "describe", tpu.name, "--format=value(state.state)")


def node_describe_command(tpu: TpuLaunch) -> list[str]:
    return _gcloud(tpu, "tpu-vm", "describe", tpu.name, "--format=value(state)")


def delete_command(tpu: TpuLaunch) -> list[str]:
    """Delete the queued resource and its TPU VMs (--force), without asking (--quiet)."""
    return _gcloud(tpu, "queued-resources", "delete", tpu.name, "--force", "--quiet")


def _connect(tpu: TpuLaunch) -> list[str]:
    """What `tpu-vm ssh` and `tpu-vm scp` take to reach the workers."""
    return ["--internal-ip"] if tpu.internal_ip else []


def ssh_command(tpu: TpuLaunch, shell: str, worker: str = "all") -> list[str]:
    return _gcloud(tpu, "tpu-vm", "ssh", tpu.name, f"--worker={worker}", *_connect(tpu), "--command", shell)


def upload_command(tpu: TpuLaunch) -> list[str]:
    return _gcloud(tpu, "tpu-vm", "scp", str(tpu.tarball), f"{tpu.name}:{REMOTE_TARBALL}", "--worker=all",
                   *_connect(tpu))


def copy_back_command(tpu: TpuLaunch) -> list[str]:
    return _gcloud(tpu, "tpu-vm", "scp", "--recurse", f"{tpu.name}:{remote_workdir(tpu)}", str(tpu.copy_back),
                   "--worker=0", *_connect(tpu))


def copy_back_target(tpu: TpuLaunch) -> Path:
    """Where --copy-back DIR puts the workdir: DIR/NAME, NAME being the workdir's own (scp -r into
    a directory that exists; the launch makes DIR just before the copy, so the layout does not
    depend on whether DIR was there)."""
    return Path(tpu.copy_back) / PurePosixPath(remote_workdir(tpu)).name


def check_copy_back(tpu: TpuLaunch) -> None:
    """LaunchError if the copy would land in something that is there already: scp merges into it,
    and the files of two runs mixed in one checkpoints/ would resume from whichever step is last."""
    if remote_workdir(tpu).rstrip("/").rsplit("/", 1)[-1] in ("", ".", ".."):  # scp -r: no name of its own there
        workdir = option_value(tpu.command, "--workdir")
        raise LaunchError(f"--copy-back {tpu.copy_back}: the command's --workdir {workdir} does not end in the "
                          f"workdir's own name, which its copy takes there (DIR/NAME); give --workdir as a path "
                          f"ending in that name, e.g. /mnt/gcs/runs/NAME")
    target = copy_back_target(tpu)
    if target.is_symlink() or target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LaunchError(f"--copy-back {tpu.copy_back}: the workdir would be copied to {target}, which already "
                          f"exists; move it away, or give another directory")


def _check_shell_syntax(setup: str) -> None:
    """LaunchError unless bash parses `setup` (`bash -n` runs nothing): a syntax error would fail
    on every worker only once the slice is up and the checkout installed."""
    bash = shutil.which("bash")
    if bash is None:  # (the workers' shell checks it)
        return
    parsed = subprocess.run([bash, "-n", "-c", setup], capture_output=True, text=True, errors="replace")
    if parsed.returncode:
        first = (parsed.stderr.strip().splitlines() or ["bash -n refuses it"])[0]
        problem = re.sub(r"^.*?: line \d+: (syntax error: )?", "", first)  # (bash: -c: line 1: ...)
        raise LaunchError(f"--setup {setup!r} is not valid shell ({problem}); it runs on "
                          f"every worker after the install, as bash runs it")


def _make_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LaunchError(f"--copy-back {path}: cannot make the directory ({e.strerror or e})") from None


def launch_file(tpu: TpuLaunch) -> str:
    """The path, relative to REMOTE_DIR, that this launch name's files on a worker share, each with
    its own suffix (.log, .status, .pid, .id, .lock)."""
    return f"{LAUNCH_DIR}/{tpu.name}"


def install_shell(tpu: TpuLaunch) -> str:
    """Unpack the shipped checkout over the previous one, remove the files the previous ship unpacked
    that this one lacks (deleted or renamed here since: `SHIPPED`) and the folders that leaves empty
    (what else is there, a relative workdir, the Python environment, the launches' files, stays; a
    checkout an older launch shipped without the list has nothing removed, and the worker says so) and
    install it into that environment (`REMOTE_INSTALL`); a worker where this launch name's command is
    still running keeps the checkout it runs from (`run_shell` follows it).
    Where a shipped path changed type (a folder became a file, or a file a folder), what stands in its
    way goes only if the previous ship unpacked it or it is Python's cache of that code (__pycache__):
    anything else there (say a run's workdir) stops the install, on that worker, before it changes
    anything, with a line naming it."""
    lock = f"{REMOTE_DIR}/{launch_file(tpu)}.lock"
    running = (f"if [ -e {lock} ] && ! flock -n -s {lock} true; then echo \"llama-jax launch: $(hostname): the "
               f"command of launch {tpu.name} is still running here: its checkout is left as it is\" >&2; "
               f"rm -f {REMOTE_TARBALL}; exit 0; fi")
    new, here = f"{SHIPPED}.new", f"~/{REMOTE_DIR}"
    # what stands where the new list's files go: each file under a folder where a file goes (not a link to
    # one, which tar replaces) and anything not a folder where a folder goes; less Python's caches and
    # the files the previous ship listed (pruned below): what is left, no launch listed as its own
    in_the_way = ("xargs -0 -r sh -c 'for f do [ ! -d \"$f\" ] || [ -L \"$f\" ] || find \"$f\" ! -type d -print0; "
                  "p=$f; while [ \"${p%/*}\" != \"$p\" ]; do p=${p%/*}; if [ -e \"$p\" ] || [ -L \"$p\" ]; then "
                  "[ -d \"$p\" ] || find \"$p\" -maxdepth 0 -print0; fi; done; done' in_the_way < " + new +
                  " | grep -zv /__pycache__/ | LC_ALL=C sort -zu | "
                  f"if [ -e {SHIPPED} ]; then LC_ALL=C comm -z -23 - {SHIPPED}; else cat; fi")
    check = (f"(cd {REMOTE_DIR} && blocking=$({in_the_way} | tr '\\0' '\\n') && n=$(echo \"$blocking\" | wc -l) && "
             f"if [ -n \"$blocking\" ]; then echo \"llama-jax launch: $(hostname): $n file(s) in {here} that no launch "
             f"listed as shipped ({SHIPPED}) stand where this launch's files go (a folder of the checkout became "
             f"a file, or a file a folder): $(echo \"$blocking\" | head -n 3 | paste -sd ' ')$([ $n -le 3 ] || "
             f"echo ' ...'); move them out of {here}, then launch again (the checkout there is left as it was)\" >&2; "
             f"exit 1; fi) || {{ rm -f {REMOTE_TARBALL} {REMOTE_DIR}/{new}; exit 1; }}")
    # the files the previous list has and the new one lacks removed before unpacking, and the folders they
    # leave empty: a file that became a folder (or the reverse, at any depth) unpacks then; a listed name
    # that is now a folder someone made there is left alone
    prune = (f"(cd {REMOTE_DIR} && if [ -e {SHIPPED} ]; then LC_ALL=C comm -z -23 {SHIPPED} {new} | "
             "xargs -0 -r sh -c 'for f do [ -d \"$f\" ] || rm -f -- \"$f\"; d=${f%/*}; [ \"$d\" = \"$f\" ] || "
             "[ ! -d \"$d\" ] || rmdir -p --ignore-fail-on-non-empty -- \"$d\"; done' prune; "
             f"elif [ -e setup.py ]; then echo \"llama-jax launch: $(hostname): {here} has no list of the files a "
             f"launch shipped there ({SHIPPED}; older launches wrote none), so files deleted or renamed in the "
             f"checkout since stay there (only listed ones are removed: others may be yours); for a clean copy, "
             f"remove all of {here} but .venv and any workdir before the next launch\" >&2; fi)")
    # a folder where a file goes holds at most Python's caches and empty folders now (the check): removed
    make_room = (f"(cd {REMOTE_DIR} && xargs -0 -r sh -c 'for f do if [ -d \"$f\" ] && [ ! -L \"$f\" ]; then "
                 "find \"$f\" -type d -name __pycache__ -prune -exec rm -rf -- {} +; "
                 f"find \"$f\" -depth -type d -empty -delete; fi; done' make_room < {new})")
    steps = [running, f"mkdir -p {REMOTE_DIR}", f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} {new}", check, prune,
             make_room, f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}", f"rm {REMOTE_TARBALL}", f"cd {REMOTE_DIR}",
             f"mv {new} {SHIPPED}", *REMOTE_INSTALL]
    return "set -e; " + "; ".join(steps + ([tpu.setup] if tpu.setup else []))


def run_shell(tpu: TpuLaunch) -> str:
    """Start the command on the worker detached from the ssh session (its own session, stdin from
    /dev/null, output appended to LAUNCH_DIR/NAME.log, exit status to NAME.status when it ends; it
    holds NAME.lock while it runs), unless this launch started it there already or a command of
    this name is still running there; then follow the log until the command ends and exit with its
    status. Run again after a dropped connection, it re-attaches: it never starts a second copy."""
    f = launch_file(tpu)
    command = f"{REMOTE_PYTHON} -m llama_jax.cli {shlex.join(tpu.command)}"
    # (the id is written once detached: a start cut short with its session is started again on re-attaching)
    detached = f"echo {tpu.launch_id} > {f}.id; {command} & echo $! > {f}.pid; wait $!; echo $? > {f}.status"
    start = (f"rm -f {f}.status; touch {f}.log; "
             f'from="-c +$(($(wc -c < {f}.log) + 1))"; '
             f'echo "==== llama-jax launch {tpu.name} ({tpu.launch_id}), $(date -u)" >> {f}.log; '
             f"setsid sh -c {shlex.quote(detached)} < /dev/null >> {f}.log 2>&1 &")
    attach = (f'echo "llama-jax launch: $(hostname): the command of launch {tpu.name} was started here already: '
              f'following it (~/{REMOTE_DIR}/{f}.log), from its last {REATTACH_LINES} lines" >&2; '
              f'from="-n {REATTACH_LINES}"')
    follow = (f"exec 9>&-; flock -s {f}.lock true & tail $from -f --pid=$! {f}.log; "
              f'if [ -e {f}.status ]; then s=$(cat {f}.status); [ "$s" != {SSH_LOST} ] && exit "$s"; '
              f'echo "llama-jax launch: $(hostname): the command exited with status {SSH_LOST}, ssh\'s own: exiting '
              f'with 1" >&2; exit 1; fi; '
              f'echo "llama-jax launch: $(hostname): the command ended without recording its exit status" >&2; exit 1')
    return (f"cd {REMOTE_DIR} && mkdir -p {LAUNCH_DIR} && exec 9>> {f}.lock && "
            f'if flock -n 9 && [ "$(cat {f}.id 2>/dev/null)" != {tpu.launch_id} ]; then {start} '
            f"else {attach}; fi; {follow}")


def remote_workdir(tpu: TpuLaunch) -> str:
    """The command's --workdir as a path scp understands (relative paths are inside the remote checkout)."""
    workdir = option_value(tpu.command, "--workdir")
    if workdir is None:
        raise LaunchError("--copy-back needs a command with --workdir")
    return workdir if workdir.startswith("/") else f"{REMOTE_DIR}/{workdir}"


# ---- dry run ----------------------------------------------------------------------------------


def dry_run_lines(tpu: TpuLaunch, unlisted: str | None = None) -> list[str]:
    """The commands a launch runs on a fresh queued resource, in order, as shell lines with comments;
    `unlisted`: why git could not list the files to ship here (`shipped_files`'s error), if it could not."""
    s = tpu.slice
    lines = [f"# {s.accelerator}: {s.chips} chips on {s.workers} worker{'s' if s.workers > 1 else ''}, "
             f"runtime version {tpu.runtime}"]
    if unlisted:
        lines += [f"# NOT READY: a launch from here stops before anything runs: {unlisted}",
                  "# (so which files the workers would get, --config among them, is not checked here)"]
    lines += ["# create the queued resource (skipped if it exists; deleted and re-created first if SUSPENDED, "
              "FAILED, or ACTIVE with its TPU VM PREEMPTED, TERMINATED or NOT_FOUND)",
              shlex.join(create_command(tpu)),
              f"# poll every {POLL_SECONDS}s until ACTIVE, then ask its TPU VM's state (also after the run: the "
              "run is done only if neither lost its TPUs)",
              shlex.join(describe_command(tpu)),
              shlex.join(node_describe_command(tpu)),
              "# ship this checkout (git ls-files: tracked and untracked, not ignored) to every worker, install it",
              "# (the upload: the checkout's tarball cannot be built here, see NOT READY)" if unlisted
              else shlex.join(upload_command(tpu)),
              shlex.join(ssh_command(tpu, install_shell(tpu))),
              f"# run on {f'all {s.workers} workers' if s.workers > 1 else 'its one worker'}, detached from the ssh "
              f"session, output logged to ~/{REMOTE_DIR}/{launch_file(tpu)}.log there and followed here",
              f"# (run again after a dropped connection, ssh exit status {SSH_LOST}, up to {RECONNECTS} times in a "
              f"row, it re-attaches ({tpu.launch_id}: this launch's own id); a command of this name still running "
              f"there is followed, not started again)",
              shlex.join(ssh_command(tpu, run_shell(tpu)))]
    if tpu.max_restarts:
        lines.append(f"# if the TPU was preempted during the run: up to {tpu.max_restarts} more times, "
                     "re-create, ship and run again")
    if tpu.copy_back:
        lines += [f"# copy the workdir back from worker 0 to {copy_back_target(tpu)} (making {tpu.copy_back} first)",
                  shlex.join(copy_back_command(tpu))]
    if tpu.delete_after:
        lines += ["# delete the queued resource and its TPU VMs", shlex.join(delete_command(tpu))]
    return lines


# ---- launching --------------------------------------------------------------------------------


def launch(tpu: TpuLaunch, poll_seconds: float = POLL_SECONDS) -> int:
    """Run the launch; returns the exit status of the command on the workers (1 when the slice was
    preempted after the command exited 0: a preempted train saves and exits 0, unfinished).
    The caller lists the files to ship first (`shipped_files`, as `llama-jax launch tpu` does), so
    that a checkout git cannot list stops the launch before anything runs; each ship lists them
    again, as they are then (hours may have passed: a slice's wait, a preempted run)."""
    if shutil.which("gcloud") is None:
        raise LaunchError("gcloud not found on PATH: install the Google Cloud CLI "
                          "(https://cloud.google.com/sdk/docs/install), or use --dry-run")
    if tpu.copy_back:
        check_copy_back(tpu)  # fail before anything runs
    try:
        status, preempted = _run_until_done(tpu, poll_seconds)
        return _after_the_run(tpu, status, preempted)
    except (KeyboardInterrupt, Terminated):
        if tpu.delete_after:  # (gcloud's delete takes minutes: not while the user stops the launch)
            _note(f"interrupted, so --delete-after did not delete queued resource {tpu.name} (if this launch got "
                  f"as far as making it); once its workdir is not needed: `{shlex.join(delete_command(tpu))}`")
        raise


def _after_the_run(tpu: TpuLaunch, status: int, preempted: bool) -> int:
    """Report how the run ended, copy the workdir back and delete the slice as asked; the launch's
    exit status."""
    if preempted:
        _note("the TPU was preempted during the run; launch again with the same command to resume")
        status = status or 1  # not done, whatever the workers' last word
    elif status:
        _note(f"the command exited with status {status} on the TPU")
    if tpu.copy_back and not preempted:
        try:
            check_copy_back(tpu)  # (again: hours may have passed)
            _make_directory(Path(tpu.copy_back))
            _run(copy_back_command(tpu))
        except LaunchError as e:
            if tpu.delete_after:  # deleting the slice would lose the workdir on worker 0
                raise LaunchError(f"{e}; queued resource {tpu.name} is kept, not deleted, so that the workdir on "
                                  f"worker 0 is not lost: copy it, then `{shlex.join(delete_command(tpu))}`") from None
            raise
    if tpu.delete_after:
        _run(delete_command(tpu))
    return status


def _run_until_done(tpu: TpuLaunch, poll_seconds: float) -> tuple[int, bool]:
    """Bring up the slice, ship and run the command, again after each preemption up to
    `max_restarts` times; (the command's exit status, whether the last run was preempted)."""
    for attempt in range(tpu.max_restarts + 1):
        made = []  # the resource, once this launch has created it (also when it then fails to become ACTIVE)
        try:
            ensure_active(tpu, poll_seconds, made)
            ship(tpu)
        except Exception:  # e.g. the install failed on a slice this launch made: nothing of anyone's is on it
            if tpu.delete_after and made:
                _run(delete_command(tpu), check=False)
            raise
        status, preempted = _run_and_follow(tpu)
        if not preempted:
            break
        if attempt < tpu.max_restarts:
            _note(f"the TPU was preempted during the run; re-launching ({attempt + 1} of {tpu.max_restarts})")
    return status, preempted


def _run_and_follow(tpu: TpuLaunch) -> tuple[int, bool]:
    """Run the command on the workers (`run_shell`), re-attaching after a lost connection while the
    slice is ACTIVE; (its exit status, whether the slice was preempted). Gives up, leaving the
    command running (nothing copied back or deleted), after RECONNECTS lost connections in a row."""
    lost = 0
    try:
        while True:
            started = time.monotonic()
            status = _run(ssh_command(tpu, run_shell(tpu)), check=False)
            try:  # also after a clean exit: a preempted train saves and exits 0
                preempted = describe_state(tpu) != "ACTIVE"
            except LaunchError as e:
                _note(f"{e}; taking the slice as still there")
                preempted = False
            if status != SSH_LOST or preempted:
                return status, preempted
            if time.monotonic() - started >= CONNECTED_S:
                lost = 0
            if lost == RECONNECTS:
                raise LaunchError(f"lost the connection to the workers {lost + 1} times in a row (ssh exit status "
                                  f"{SSH_LOST}); {_left_running(tpu)}")
            wait = RECONNECT_WAIT_S * 2 ** lost
            lost += 1
            _note(f"lost the connection to the workers (ssh exit status {SSH_LOST}); the command goes on there; "
                  f"re-attaching in {wait}s ({lost} of {RECONNECTS})")
            time.sleep(wait)
    except (KeyboardInterrupt, Terminated):
        _note(f"interrupted; {_left_running(tpu)}")
        raise


def _left_running(tpu: TpuLaunch) -> str:
    return (f"the command is left running on the workers (output: ~/{REMOTE_DIR}/{launch_file(tpu)}.log on each): "
            f"launch again with the same command to follow it, or stop it (a train saves first): "
            f"`{shlex.join(ssh_command(tpu, f'kill -TERM $(cat {REMOTE_DIR}/{launch_file(tpu)}.pid)'))}`")


def ensure_active(tpu: TpuLaunch, poll_seconds: float = POLL_SECONDS, made: list | None = None) -> bool:
    """Bring the queued resource to ACTIVE: create it, reuse it, or replace one that lost its TPUs.
    Whether it was created now (a reused one may hold files of earlier runs); `made`, when given,
    gets an entry once it is, also when it then fails to become ACTIVE."""
    created, last = False, ""
    while True:
        state = describe_state(tpu)
        if state != last:
            shown = f"ACTIVE, its TPU VM {state}" if state in NODE_LOST_STATES else state or "does not exist"
            _note(f"queued resource {tpu.name}: {shown}")
        last = state
        action = "create" if state is None else QUEUED_RESOURCE_STATES.get(state)
        if action == "use":
            return created
        if action in ("create", "recreate") and created:
            raise LaunchError(f"queued resource {tpu.name} is {state or 'gone'} right after its creation; "
                              f"see `{shlex.join(_gcloud(tpu, 'queued-resources', 'describe', tpu.name))}`")
        if action == "create":
            _run(create_command(tpu))
            created = True
            if made is not None:
                made.append(tpu.name)
        elif action == "recreate":
            _note(f"deleting queued resource {tpu.name} ({state}) to create it again")
            _run(delete_command(tpu))
        elif action == "wait":
            time.sleep(poll_seconds)
        else:
            raise LaunchError(f"queued resource {tpu.name} is in state {state!r}, which this launcher does not know")


def describe_state(tpu: TpuLaunch) -> str | None:
    """The queued resource's state, or None if it does not exist; for an ACTIVE one whose TPU VM
    is PREEMPTED or TERMINATED, or does not exist (NOT_FOUND), that (`NODE_LOST_STATES`): its
    queued resource may still say ACTIVE, until the service suspends it."""
    state = _describe(describe_command(tpu), f"queued resource {tpu.name}")
    if state != "ACTIVE":
        return state
    node = _describe(node_describe_command(tpu), f"TPU VM {tpu.name}") or "NOT_FOUND"
    return node if node in NODE_LOST_STATES else state


def _describe(argv: list[str], what: str) -> str | None:
    """The state a gcloud describe command prints, or None if the resource does not exist."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout.strip()
    if "NOT_FOUND" in done.stderr or "not found" in done.stderr.lower():
        return None
    raise LaunchError(f"gcloud could not describe {what}: {gcloud_error(done.stderr, done.returncode)}")


def gcloud_error(stderr: str, returncode: int) -> str:
    """gcloud's error as one line: its lines from the first `ERROR:` on, joined, without the prefix
    naming the gcloud command (its last line alone may be the end of a list of ways out)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("ERROR:")), None)
    if start is None:
        return lines[-1] if lines else f"exit status {returncode}"
    return re.sub(r"^ERROR:\s*(\(gcloud[^)]*\)\s*)?", "", " ".join(lines[start:]))


def ship(tpu: TpuLaunch) -> None:
    """Copy this checkout to every worker and install it there."""
    try:  # (a tarball half-written when packing failed or was interrupted is removed too)
        count = pack_checkout(source_root(), tpu.tarball)
        _note(f"packed {count} files of {source_root()} ({tpu.tarball.stat().st_size / 1e6:.1f} MB)")
        _run(upload_command(tpu))
    finally:
        tpu.tarball.unlink(missing_ok=True)
    _run(ssh_command(tpu, install_shell(tpu)))


def source_root() -> Path:
    """The checkout this package runs from (what is shipped to the workers)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "setup.py").is_file():
        raise LaunchError(f"launching ships a source checkout of llama-jax; {root} is an installed copy")
    return root


def shipped_files(root: Path) -> list[str]:
    """The files of the checkout `root` that the workers get: tracked, and untracked but not ignored
    (`git ls-files`), uncommitted edits included; paths relative to `root`."""
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError("git not found on PATH: launching ships the files git lists of this checkout (tracked, and "
                          "untracked but not ignored); install git") from None
    if listed.returncode:
        raise LaunchError(f"cannot list the files of {root} with git: {listed.stderr.strip()}")
    return [name for name in listed.stdout.split("\0") if name and (root / name).is_file()]


def check_shipped(root: Path, flag: str, path: str, shipped: Sequence[str] | None) -> None:
    """LaunchError unless `path`, the launched command's `flag` (its --config file or lm-eval's
    --include-path directory), is in the copy of the checkout the workers run in: a path of this
    machine, one leading out of the checkout or one git ignores is not shipped. `shipped`: root's
    `shipped_files`, or None where git cannot list them (a dry run: only the path is checked). An
    absolute path this machine lacks is left to the workers (a bucket mounted there, say); a relative
    one the checkout lacks, to `check_input_paths`."""
    what = INPUT_PATHS[flag]
    if Path(path).is_absolute() and Path(path).exists():  # a path on this machine
        local = Path(path).resolve()
        valid = f"{local.relative_to(root)} (relative to the checkout)" if local.is_relative_to(root) else \
            f"a {what} under {root}, by its path relative to it"
        raise LaunchError(f"{flag} {path}: the workers run from their own copy of the checkout, where this path "
                          f"does not exist; give {valid}")
    if Path(path).is_absolute() or not (root / path).exists():
        return
    relative = os.path.normpath(path)
    if relative == ".." or relative.startswith("../"):
        raise LaunchError(f"{flag} {path}: the path leads out of the checkout {root}, of which the workers get a "
                          f"copy; give a {what} inside it, by its path relative to it")
    posix = Path(relative).as_posix()
    if shipped is not None and not any(name == posix or name.startswith(posix + "/") for name in shipped):
        raise LaunchError(f"{flag} {path}: git ignores it (.gitignore), so the workers' copy of the checkout lacks "
                          f"it; move it to a folder that is shipped{' (configs/, say)' if flag == '--config' else ''}, "
                          f"or stop ignoring it")


def pack_checkout(root: Path, tarball: Path) -> int:
    """Write root's `shipped_files` as a .tar.gz, with their list as `SHIPPED`.new; the number of files."""
    files = shipped_files(root)
    listing = b"".join(name + b"\0" for name in sorted(map(os.fsencode, files)))  # (as `comm` compares them)
    listed = tarfile.TarInfo(f"{SHIPPED}.new")
    listed.size = len(listing)
    with tarfile.open(tarball, "w:gz") as tar:
        for name in files:
            tar.add(root / name, arcname=name)
        tar.addfile(listed, io.BytesIO(listing))
    return len(files)


def _run(argv: Sequence[str], check: bool = True) -> int:
    """Run a command with the terminal as its stdout and stderr, after echoing it."""
    _note("$ " + shlex.join(argv))
    status = subprocess.run(list(argv)).returncode
    if check and status:
        raise LaunchError(f"`{shlex.join(argv[:5])} ...` failed with exit status {status}")
    return status


def _note(message: str) -> None:
    print(f"llama-jax launch: {message}", file=sys.stderr, flush=True)
