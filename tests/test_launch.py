"""Launchers without a cloud or a cluster: dry runs, and the real code paths against fake `gcloud`,
`sbatch` and `srun` executables that log what they are asked to do. Nothing touches the network:
every test that could reach gcloud puts a fake one first on PATH."""

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit  # noqa: F401  (imported before any test captures output, see below)

from llama_jax import cli
from llama_jax.launch import LaunchError, slurm, tpu

# submitit configures logging when first imported, which closes the handlers already there; absl's
# handler then closes its stream if that is no longer sys.stderr, as under a test's capsys, and that
# stream is pytest's own capture. Importing submitit at collection keeps the streams the same.

ROOT = Path(__file__).resolve().parents[1]
TRAIN_7B = ["train", "--config", "configs/llama2_7b_v4_32.py", "--workdir", "/mnt/gcs/runs/llama2-7b"]
TRAIN_TINY = ["train", "--config", "configs/tiny.py", "--workdir", "/mnt/gcs/runs/tiny"]
TRAIN_IN_TMP = ["train", "--config", "configs/tiny.py", "--workdir", "TMP_WORKDIR"]  # a test's tmp_path/run
ZONE = ["--zone", "us-central2-b"]  # where the dry runs below would create their slices


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def dry_run(capsys, argv: list[str]) -> tuple[str, list[list[str]]]:
    """Run a `launch tpu --dry-run`; its output and the gcloud commands in it, split as the shell would."""
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    return out, [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud ")]


# ---- TPU: the accelerator table and dry runs ----------------------------------------------------


@pytest.mark.parametrize("accelerator, chips, workers, runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"), ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"), ("v5p-128", 64, 16, "v2-alpha-tpuv5"),
    ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"), ("v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v6e-4", 4, 1, "v2-alpha-tpuv6e"), ("v6e-64", 64, 16, "v2-alpha-tpuv6e"),
])
def test_accelerator_table(accelerator, chips, workers, runtime):
    s = tpu.tpu_slice(accelerator)
    assert (s.chips, s.workers, s.family.runtime_version) == (chips, workers, runtime)


@pytest.mark.parametrize("accelerator", ["v9-8", "v4", "v4-x", "v5e-8", "v4-0", "v4-7", "v6e-10"])
def test_unknown_or_impossible_accelerator(accelerator):
    with pytest.raises(LaunchError, match="accelerator type|whole number"):
        tpu.tpu_slice(accelerator)


def test_tpu_dry_run_v4_32(capsys):
    out, commands = dry_run(capsys, ["launch", "tpu", "--name", "llama2-7b", "--zone", "us-central2-b",
                                     "--accelerator", "v4-32", "--dry-run", "--", *TRAIN_7B,
                                     "--config.train.log_every=10"])
    assert "v4-32: 16 chips on 4 workers" in out
    create, describe, node, upload, install, run = commands
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "llama2-7b"]
    assert flag(create, "--node-id") == "llama2-7b"
    assert flag(create, "--accelerator-type") == "v4-32"
    assert flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
    assert "--spot" not in create and "--project" not in create
    assert describe[3:5] == ["queued-resources", "describe"] and "--format=value(state.state)" in describe
    assert node[3:6] == ["tpu-vm", "describe", "llama2-7b"] and "--format=value(state)" in node
    assert all(flag(c, "--zone") == "us-central2-b" for c in commands)
    assert upload[3:5] == ["tpu-vm", "scp"] and "--worker=all" in upload
    assert install[3:5] == ["tpu-vm", "ssh"] and "--worker=all" in install
    assert flag(install, "--command").endswith('; python3 -m uv venv -q --allow-existing --python 3.11 .venv; '
                                               'python3 -m uv pip install -q --python .venv/bin/python -e . '
                                               '"jax[tpu]"')  # (the images' python3 is 3.10)
    assert run[3:6] == ["tpu-vm", "ssh", "llama2-7b"] and "--worker=all" in run
    assert " setsid sh -c 'echo " in flag(run, "--command")  # detached (see test_a_dropped_connection_...)
    assert (".id; .venv/bin/python -m llama_jax.cli train --config configs/llama2_7b_v4_32.py --workdir "
            "/mnt/gcs/runs/llama2-7b --config.train.log_every=10 & " in flag(run, "--command"))  # (overrides after --)
    assert "detached from the ssh session, output logged to ~/llama-jax/.launch/llama2-7b.log there" in out


def test_a_config_the_workers_copy_of_the_checkout_lacks_is_refused(tmp_path, monkeypatch, capsys):
    """The workers get the checkout's tracked and untracked-but-not-ignored files: a --config in a
    git-ignored folder, or a relative path leading out of the checkout (found here, from it), was
    accepted and missing only once the slice was created."""
    root = tmp_path / "checkout"
    (root / "configs").mkdir(parents=True)
    (root / "runs").mkdir()
    (root / ".gitignore").write_text("runs/\n")
    tiny = (Path(cli.__file__).parents[1] / "configs" / "tiny.py").read_text()
    for config in ("configs/mine.py", "runs/mine.py"):
        (root / config).write_text(tiny)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.setattr(tpu, "source_root", lambda: root)
    launch = ["launch", "tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "train", "--workdir",
              "/mnt/gcs/run", "--config"]
    assert cli.main([*launch, "configs/mine.py"]) == 0  # untracked, not ignored: shipped
    capsys.readouterr()
    for config, reason in (("runs/mine.py", "git ignores it (.gitignore), so the workers' copy of the checkout lacks "
                                            "it; move it to a folder that is shipped (configs/, say), or stop "
                                            "ignoring it"),
                           ("../checkout/configs/mine.py", f"the path leads out of the checkout {root}, of which the "
                                                           f"workers get a copy; give a file inside it, by its "
                                                           f"path relative to it")):
        assert cli.main([*launch, config]) == 2
        assert capsys.readouterr().err.strip().endswith(f"--config {config}: {reason}")


def test_a_launched_lm_eval_include_path_is_checked_where_it_will_run(tmp_path, monkeypatch, capsys):
    """lm-eval's --include-path (a directory of task files) was not checked: missing, a file, or in a
    folder git ignores (so the workers' copy lacks it), the launch went ahead and failed there."""
    root = tmp_path / "checkout"
    for folder in ("tasks", "ignored"):
        (root / folder).mkdir(parents=True)
        (root / folder / "mine.yaml").write_text("task: mine\n")
    (root / ".gitignore").write_text("ignored/\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.setattr(tpu, "source_root", lambda: root)
    monkeypatch.chdir(root)  # (where a SLURM job's command runs)
    tpu_launch = ["launch", "tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--"]
    slurm_launch = ["launch", "slurm", "--folder", str(tmp_path / "jobs"), "--dry-run", "--"]
    lm_eval = ["lm-eval", "/mnt/gcs/model", "--tasks", "mine", "--include-path"]
    for launch in (tpu_launch, slurm_launch):
        assert cli.main([*launch, *lm_eval, "tasks"]) == 0
        capsys.readouterr()
        for path, reason in (("no/such", f"no such directory under {root}, where the command will run"),
                             ("tasks/mine.yaml", f"no such directory under {root}, where the command will run")):
            assert cli.main([*launch, *lm_eval, path]) == 2
            assert capsys.readouterr().err.strip().endswith(f"--include-path {path}: {reason}")
        assert cli.main([*launch, *lm_eval[:-1], "--include", "tasks"]) == 2  # read by the launcher as given
        assert capsys.readouterr().err.strip().endswith("give --include-path once and in full (--include-path "
                                                        "tasks): the launcher reads it from the command line")
    for path, reason in (("ignored", "git ignores it (.gitignore), so the workers' copy of the checkout lacks it; "
                                     "move it to a folder that is shipped, or stop ignoring it"),
                         (str(root / "tasks"), "the workers run from their own copy of the checkout, where this path "
                                               "does not exist; give tasks (relative to the checkout)")):
        assert cli.main([*tpu_launch, *lm_eval, path]) == 2
        assert capsys.readouterr().err.strip().endswith(f"--include-path {path}: {reason}")


def test_tpu_dry_run_v5p_128_spot_copy_back_delete(capsys):
    out, commands = dry_run(capsys, ["launch", "tpu", "--name", "cpt", "--zone", "us-east5-a", "--accelerator",
                                     "v5p-128", "--spot", "--project", "my-proj", "--copy-back", "runs/back",
                                     "--delete-after", "--max-restarts", "3", "--dry-run", "--", *TRAIN_7B,
                                     "--config.train.grad_accum=16"])  # (64 chips: 16 rows of the 1,024 each)
    assert "v5p-128: 64 chips on 16 workers" in out and "up to 3 more times" in out
    create, describe, node, upload, install, run, copy_back, delete = commands
    assert flag(create, "--accelerator-type") == "v5p-128"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in create
    assert all(flag(c, "--zone") == "us-east5-a" and flag(c, "--project") == "my-proj" for c in commands)
    assert "--worker=all" in run and ".venv/bin/python -m llama_jax.cli train" in flag(run, "--command")
    assert copy_back[3:6] == ["tpu-vm", "scp", "--recurse"] and "--worker=0" in copy_back
    assert copy_back[6:8] == ["cpt:/mnt/gcs/runs/llama2-7b", "runs/back"]
    assert delete[3:6] == ["queued-resources", "delete", "cpt"] and "--force" in delete and "--quiet" in delete


def test_internal_ip_reaches_every_ssh_and_scp(capsys):
    """Workers without external IP addresses (or behind a firewall that only lets the VPC in) are
    reached at their internal ones: gcloud's tpu-vm ssh and scp both take --internal-ip."""
    out, commands = dry_run(capsys, ["launch", "tpu", "--name", "t", *ZONE, "--accelerator", "v4-8", "--internal-ip",
                                     "--copy-back", "runs/back", "--delete-after", "--dry-run", "--", *TRAIN_TINY])
    reaching = [c for c in commands if c[3] == "tpu-vm" and c[4] in ("ssh", "scp")]
    assert [c[4] for c in reaching] == ["scp", "ssh", "ssh", "scp"]  # upload, install, run, copy back
    assert all("--internal-ip" in c for c in reaching)
    assert not any("--internal-ip" in c for c in commands if c not in reaching)  # create, describe, delete
    _, commands = dry_run(capsys, ["launch", "tpu", "--name", "t", *ZONE, "--accelerator", "v4-8", "--dry-run", "--",
                                   *TRAIN_TINY])
    assert not any("--internal-ip" in c for c in commands)


def test_a_config_only_on_the_slice_is_left_to_it(capsys):
    """An absolute --config that does not exist here (a run's config.json on the slice's bucket) is
    not checked here; a relative one is loaded and its overrides checked before anything is launched."""
    resume = ["train", "--config", "/mnt/gcs/runs/tiny/config.json", "--workdir", "/mnt/gcs/runs/tiny"]
    _, commands = dry_run(capsys, ["launch", "tpu", "--name", "t", *ZONE, "--accelerator", "v4-8",
                                   "--dry-run", "--", *resume])
    assert "train --config /mnt/gcs/runs/tiny/config.json" in flag(commands[-1], "--command")


def test_runtime_version_override(capsys):
    _, commands = dry_run(capsys, ["launch", "tpu", "--name", "t", "--zone", "us-central1-ai1a", "--accelerator",
                                   "v6e-8", "--runtime-version", "tpu-vm-tf-2.16.1-pjrt", "--dry-run", "--",
                                   *TRAIN_TINY])
    assert flag(commands[0], "--runtime-version") == "tpu-vm-tf-2.16.1-pjrt"
    assert flag(commands[0], "--zone") == "us-central1-ai1a"  # (an AI zone's suffix is longer than a letter)


def bash_words(line: str) -> list[str]:
    """The words bash makes of a command line (what `line` runs with, had it been typed)."""
    done = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], capture_output=True, text=True, check=True)
    return done.stdout.split("\0")[:-1]


def test_the_command_reaches_every_worker_as_given(capsys, tmp_path):
    """Typed from the dry run's line, the remote shell runs the launched command with its arguments
    exactly as given: spaces, quotes, brackets, $, backquotes, backslashes and globs untouched."""
    command = ["train", "--config", "configs/tiny.py", "--workdir", "/mnt/gcs/runs/a b", "--config.data.source=text",
               """--config.data.files=['a b.txt', "it's $HOME `id` \\\\ *.txt"]""", "--config.train.seed", "3"]
    out, commands = dry_run(capsys, ["launch", "tpu", "--name", "t", *ZONE, "--accelerator", "v4-8", "--dry-run",
                                     "--", *command])
    [line] = [line for line in out.splitlines() if "llama_jax.cli" in line]
    remote = flag(bash_words(line), "--command")
    assert remote == flag(commands[-1], "--command")
    worker = tmp_path / "home"  # a worker's home, its environment's python saying what it got
    python = worker / tpu.REMOTE_DIR / tpu.REMOTE_PYTHON
    python.parent.mkdir(parents=True)
    write_fake(python, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                       f"'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n")
    done = subprocess.run(["bash", "-c", remote], cwd=worker, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == ["-m", "llama_jax.cli", *command]  # (after a log's header)


# ---- TPU: the real code path against a fake gcloud ----------------------------------------------

FAKE_GCLOUD = """#!{python}
# A stand-in for gcloud: logs its arguments; one queued resource whose state lives in a file, and its
# TPU VM's in another (READY when there is none).
import json, os, sys, tarfile
args, env = sys.argv[1:], os.environ
state_file, log = env["FAKE_STATE"], env["FAKE_LOG"]
node_file = state_file + ".node"
group, verb = args[2], args[3]
entry = [group, verb]
failing_verb, _, failing_text = env.get("FAKE_FAIL", ":").partition(":")  # e.g. ssh:pip install
if verb == failing_verb and failing_text in " ".join(args):
    with open(log, "a") as f:
        f.write(json.dumps(entry + ["failed"]) + "\\n")
    sys.exit(1)
if verb == "describe":
    if not os.path.exists(state_file):
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\\n")
        print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Requested entity was not found.",
              file=sys.stderr)
        sys.exit(1)
    if group == "tpu-vm":
        node = open(node_file).read() if os.path.exists(node_file) else "READY"
        entry.append(node)
        if node == "NOT_FOUND":  # deleted
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\\n")
            print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Requested entity was not found.",
                  file=sys.stderr)
            sys.exit(1)
        print(node)
    else:
        states = open(state_file).read().split()
        print(states[0])  # the first state; later describes see the next ones, if any
        open(state_file, "w").write("\\n".join(states[1:] or states))
        entry.append(states[0])
elif verb == "create":
    open(state_file, "w").write(env.get("FAKE_CREATED_STATE", "ACTIVE"))
elif verb == "delete":
    os.remove(state_file)
    if os.path.exists(node_file):
        os.remove(node_file)
    if env.get("FAKE_WORKER"):  # whether the launched command had ended by then
        ended = os.path.exists(os.path.join(env["FAKE_WORKER"], "llama-jax", ".launch", "run.status"))
        entry.append("after the command" if ended else "WHILE THE COMMAND RUNS")
elif verb == "scp" and args[4].endswith(".tar.gz"):
    entry.append(sorted(tarfile.open(args[4]).getnames()))
    if env.get("FAKE_WORKER"):  # the upload lands in the worker's home
        import shutil
        shutil.copy(args[4], os.path.join(env["FAKE_WORKER"], args[5].partition(":")[2]))
elif verb == "ssh":
    command = args[args.index("--command") + 1]
    entry.append(command)
    if "llama_jax.cli" in command:
        preempt = int(env.get("FAKE_PREEMPTIONS", "0"))
        count_file = state_file + ".runs"
        runs = int(open(count_file).read()) if os.path.exists(count_file) else 0
        open(count_file, "w").write(str(runs + 1))
        if runs < preempt:  # the queued resource SUSPENDED, or (FAKE_PREEMPTED_QR=ACTIVE) not yet: its TPU VM
            open(state_file, "w").write(env.get("FAKE_PREEMPTED_QR", "SUSPENDED"))
            if env.get("FAKE_PREEMPTED_QR") == "ACTIVE":  # PREEMPTED, or (FAKE_PREEMPTED_NODE=NOT_FOUND) gone
                open(node_file, "w").write(env.get("FAKE_PREEMPTED_NODE", "PREEMPTED"))
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\\n")
            sys.exit(int(env.get("FAKE_PREEMPTED_STATUS", "255")))  # 0: the run saved and exited cleanly
        if env.get("FAKE_WORKER"):  # a worker's shell runs the command line, as sshd would
            import signal, subprocess
            shell = subprocess.Popen(["bash", "-c", command], cwd=env["FAKE_WORKER"], stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
            drops_file = state_file + ".drops"  # how many connections drop yet
            drops = int(open(drops_file).read()) if os.path.exists(drops_file) else 0
            if drops:  # a line of output, then the connection is gone: sshd's side of the session with it
                open(drops_file, "w").write(str(drops - 1))
                print(shell.stdout.readline(), end="", flush=True)
                os.killpg(shell.pid, signal.SIGKILL)
                shell.wait()
                status, note = 255, "dropped"
            else:  # the command may end once the shell follows its log (its first line: started or re-attached)
                print(shell.stdout.readline(), end="", flush=True)
                open(os.path.join(env["FAKE_WORKER"], "release"), "w").close()
                for line in shell.stdout:
                    print(line, end="", flush=True)
                status = shell.wait()
                note = "exit %d" % status
            with open(log, "a") as f:
                f.write(json.dumps(entry[:2] + [note]) + "\\n")
            sys.exit(status)
        print("step 10: loss 1.2345 (from the workers)")
    elif env.get("FAKE_WORKER"):  # the install, run by the worker's shell, its python3 a stand-in (FAKE_WORKER-bin)
        import subprocess
        path = env["FAKE_WORKER"] + "-bin" + os.pathsep + env["PATH"]
        status = subprocess.run(["bash", "-c", command], cwd=env["FAKE_WORKER"], env=dict(env, PATH=path)).returncode
        if status:
            entry.append("exit %d" % status)
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\\n")
            sys.exit(status)
with open(log, "a") as f:
    f.write(json.dumps(entry) + "\\n")
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A fake gcloud first on PATH; returns (set_state, logged_calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    state, log = tmp_path / "state", tmp_path / "log.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_STATE", str(state))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the launch packs its tarball
    assert Path(tpu.shutil.which("gcloud")) == gcloud  # never the real one

    def set_state(*states):
        state.write_text("\n".join(states))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return set_state, calls


def launch_args(*extra):
    return ["launch", "tpu", "--name", "run", "--zone", "us-central2-b", "--accelerator", "v4-32", *extra,
            "--", *TRAIN_TINY]


def verbs(calls):
    return [" ".join(c[:2]) + (f" {c[2]}" if c[1] == "describe" and len(c) > 2 else "") for c in calls]


SHIP_AND_RUN = ["tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]
ACTIVE = ["queued-resources describe ACTIVE", "tpu-vm describe READY"]  # its TPU VM asked too
RAN = [*SHIP_AND_RUN, *ACTIVE]  # a run, then the slice's state: still ACTIVE


def test_existing_active_resource_is_reused(fake_gcloud, capfd, tmp_path):
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    assert cli.main(launch_args()) == 0
    assert verbs(calls()) == [*ACTIVE, *RAN]
    upload, install, run = calls()[2:5]
    assert "llama_jax/cli.py" in upload[2] and "configs/tiny.py" in upload[2] and ".venv" not in str(upload[2])
    assert "pip install" in install[2]
    assert install[2].index("uv venv") < install[2].index("uv pip install")  # into a Python 3.11 environment
    assert ".id; .venv/bin/python -m llama_jax.cli train --config configs/tiny.py --workdir /mnt/gcs/runs/tiny & " \
           in run[2]
    assert "step 10: loss 1.2345" in capfd.readouterr().out  # the workers' output streams through
    assert not list(tmp_path.glob("llama-jax-*.tar.gz"))  # the shipped tarball is cleaned up


def test_the_files_to_ship_are_listed_at_the_start_and_at_each_ship(fake_gcloud, monkeypatch, tmp_path):
    """git lists the checkout once before anything runs (the --config check, and a launch stops there
    without git), then once per ship, as the checkout is then: not a third time for the first check."""
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    git_log = tmp_path / "git.log"
    bin_dir = Path(tpu.shutil.which("gcloud")).parent
    write_fake(bin_dir / "git", f"#!/bin/sh\necho \"$*\" >> {shlex.quote(str(git_log))}\n"
                                f"exec {shlex.quote(shutil.which('git'))} \"$@\"\n")
    monkeypatch.setenv("FAKE_PREEMPTIONS", "1")
    assert cli.main(launch_args("--max-restarts", "1")) == 0
    assert verbs(calls()).count("tpu-vm scp") == 2  # shipped, preempted, shipped again
    assert sum("ls-files" in line for line in git_log.read_text().splitlines()) == 3


def test_ctrl_c_while_packing_the_checkout_leaves_no_tarball(fake_gcloud, monkeypatch, capsys, tmp_path):
    """The tarball was removed once uploaded, but not when packing it stopped halfway: Ctrl-C (or a
    full disk) left a partial llama-jax-NAME-PID.tar.gz in the temporary folder."""
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    add = tarfile.TarFile.add

    def add_then_ctrl_c(tar, name, *args, **kwargs):
        add(tar, name, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, as the terminal sends it

    monkeypatch.setattr(tarfile.TarFile, "add", add_then_ctrl_c)
    assert cli.main(launch_args()) == 130
    assert capsys.readouterr().err.endswith("llama-jax launch: interrupted\n")
    assert verbs(calls()) == ACTIVE  # nothing was uploaded
    assert not list(tmp_path.glob("llama-jax-*"))


def test_ctrl_c_while_the_slice_is_waited_for_names_what_delete_after_left(fake_gcloud, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) while a queued resource this launch made waits for TPUs left it, with
    --delete-after, without a word: a slice that becomes ACTIVE later costs until it is deleted."""
    set_state, calls = fake_gcloud  # no resource yet: the launch makes it
    monkeypatch.setenv("FAKE_CREATED_STATE", "WAITING_FOR_RESOURCES")
    monkeypatch.setattr(tpu.time, "sleep", lambda seconds: os.kill(os.getpid(), signal.SIGINT))  # in the wait
    for extra, said in ((["--delete-after"], True), ([], False)):
        assert cli.main(launch_args(*extra)) == 130
        err = capsys.readouterr().err.splitlines()
        assert err[-1] == "llama-jax launch: interrupted"
        assert (err[-2] == "llama-jax launch: interrupted, so --delete-after did not delete queued resource run (if "
                "this launch got as far as making it); once its workdir is not needed: `gcloud compute tpus "
                "queued-resources delete run --force --quiet --zone us-central2-b`") == said
    assert "queued-resources delete" not in verbs(calls())


def test_missing_resource_is_created(fake_gcloud):
    set_state, calls = fake_gcloud
    assert cli.main(launch_args("--spot")) == 0
    assert verbs(calls()) == ["queued-resources describe", "queued-resources create",
                              *ACTIVE, *RAN]


@pytest.mark.parametrize("state", ["SUSPENDED", "FAILED", "PREEMPTED"])
def test_preempted_resource_is_deleted_and_recreated(fake_gcloud, state):
    set_state, calls = fake_gcloud
    set_state(state)
    assert cli.main(launch_args()) == 0
    assert verbs(calls()) == [f"queued-resources describe {state}", "queued-resources delete",
                              "queued-resources describe", "queued-resources create",
                              *ACTIVE, *RAN]


def test_pending_resource_is_waited_for(fake_gcloud):
    set_state, calls = fake_gcloud
    set_state("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    spec = tpu.TpuLaunch(name="run", zone=ZONE[1], slice=tpu.tpu_slice("v4-8"), command=tuple(TRAIN_TINY))
    assert tpu.launch(spec, poll_seconds=0) == 0
    assert verbs(calls()) == ["queued-resources describe WAITING_FOR_RESOURCES",
                              "queued-resources describe PROVISIONING", *ACTIVE, *RAN]


def test_preemption_during_the_run_relaunches(fake_gcloud, monkeypatch):
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    monkeypatch.setenv("FAKE_PREEMPTIONS", "1")
    assert cli.main(launch_args("--max-restarts", "1", "--delete-after")) == 0
    assert verbs(calls()) == [*ACTIVE, *SHIP_AND_RUN,
                              "queued-resources describe SUSPENDED",  # after the failed run: preempted?
                              "queued-resources describe SUSPENDED", "queued-resources delete",
                              "queued-resources describe", "queued-resources create",
                              *ACTIVE, *RAN, "queued-resources delete"]


def test_preemption_without_restarts_reports_and_exits_with_the_status(fake_gcloud, monkeypatch, capfd, tmp_path):
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    monkeypatch.setenv("FAKE_PREEMPTIONS", "1")
    with pytest.raises(SystemExit) as exit_:
        cli.main(launch_args("--copy-back", str(tmp_path / "back")))
    assert exit_.value.code == 255
    assert "launch again with the same command to resume" in capfd.readouterr().err
    assert "tpu-vm scp" not in verbs(calls())[-1]  # nothing to copy back from a preempted slice


def test_a_preempted_run_that_exits_cleanly_is_relaunched(fake_gcloud, monkeypatch, capfd):
    """A preempted train saves its step and exits 0; the slice's state says it did not finish."""
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    monkeypatch.setenv("FAKE_PREEMPTIONS", "2")
    monkeypatch.setenv("FAKE_PREEMPTED_STATUS", "0")
    with pytest.raises(SystemExit) as exit_:
        cli.main(launch_args("--max-restarts", "1"))
    assert exit_.value.code == 1
    assert verbs(calls()).count("queued-resources create") == 1  # re-created once, preempted again
    assert "launch again with the same command to resume" in capfd.readouterr().err
    set_state("ACTIVE")
    assert cli.main(launch_args("--max-restarts", "1")) == 0  # the third run finishes


@pytest.mark.parametrize("node", ["PREEMPTED", "NOT_FOUND"])
def test_a_preempted_tpu_vm_whose_queued_resource_is_still_active_is_not_done(fake_gcloud, monkeypatch, capfd,
                                                                              tmp_path, node):
    """A preempted TPU VM is PREEMPTED, or already deleted (NOT_FOUND), while its queued resource may
    still say ACTIVE: the run, which exited 0 (a preempted train saves and exits 0), was taken for
    done, and the slice, without its TPUs, reused. The TPU VM's state is asked too now, and a missing
    one was taken for a usable slice: it is lost as a PREEMPTED one is."""
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    monkeypatch.setenv("FAKE_PREEMPTIONS", "1")
    monkeypatch.setenv("FAKE_PREEMPTED_STATUS", "0")
    monkeypatch.setenv("FAKE_PREEMPTED_QR", "ACTIVE")
    monkeypatch.setenv("FAKE_PREEMPTED_NODE", node)
    with pytest.raises(SystemExit) as exit_:
        cli.main(launch_args("--copy-back", str(tmp_path / "back")))  # (nothing copied back)
    assert exit_.value.code == 1 and "launch again with the same command to resume" in capfd.readouterr().err
    preempted = ["queued-resources describe ACTIVE", f"tpu-vm describe {node}"]
    assert verbs(calls()) == [*ACTIVE, *SHIP_AND_RUN, *preempted]
    Path(os.environ["FAKE_LOG"]).unlink()  # launched again: re-created, not reused
    assert cli.main(launch_args()) == 0
    assert f"queued resource run: ACTIVE, its TPU VM {node}\n" in capfd.readouterr().err
    assert verbs(calls()) == [*preempted, "queued-resources delete", "queued-resources describe",
                              "queued-resources create", *ACTIVE, *RAN]
    Path(os.environ["FAKE_LOG"]).unlink()  # with --max-restarts, within the launch
    Path(os.environ["FAKE_STATE"] + ".runs").unlink()
    assert cli.main(launch_args("--max-restarts", "1")) == 0
    assert verbs(calls()) == [*ACTIVE, *SHIP_AND_RUN, *preempted, *preempted, "queued-resources delete",
                              "queued-resources describe", "queued-resources create", *ACTIVE, *RAN]


def test_copy_back_and_delete_after_a_run(fake_gcloud, tmp_path, capsys):
    """The workdir lands in DIR/NAME whether DIR existed or not (scp -r copies into a directory
    that exists, so DIR is made first); a DIR/NAME already there is refused before anything runs:
    scp would merge two runs' checkpoints."""
    set_state, calls = fake_gcloud
    set_state("ACTIVE")
    back = tmp_path / "back" / "more"
    assert cli.main(launch_args("--copy-back", str(back), "--delete-after")) == 0
    *_, copy_back, delete = calls()
    assert copy_back[:2] == ["tpu-vm", "scp"] and delete[:2] == ["queued-resources", "delete"]
    assert f"tpu-vm scp --recurse run:/mnt/gcs/runs/tiny {back} --worker=0" in capsys.readouterr().err
    assert back.is_dir()
    (back / "tiny").mkdir()
    (back / "tiny" / "metrics.jsonl").write_text("{}\n")  # an earlier copy, or another run of that name
    (Path(os.environ["FAKE_LOG"])).unlink()
    assert cli.main(launch_args("--copy-back", str(back))) == 2
    assert capsys.readouterr().err == (f"llama-jax launch: error: --copy-back {back}: the workdir would be copied to "
                                       f"{back / 'tiny'}, which already exists; move it away, or give another "
                                       f"directory\n")
    assert not Path(os.environ["FAKE_LOG"]).exists()  # no gcloud command ran


def test_a_copy_back_folder_that_takes_no_files_is_refused_before_the_slice_is_made(fake_gcloud, capsys):
    """/proc takes no new files (for root too, which os.access lets write there): refused before any
    gcloud command, not after the run when its workdir would be copied."""
    set_state, _ = fake_gcloud
    set_state("ACTIVE")
    for back in ("/proc/back", "/proc/sub/back"):
        assert cli.main(launch_args("--copy-back", back)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"llama-jax launch: error: --copy-back {back}: cannot write a file into /proc (")
        assert len(err.splitlines()) == 1
        assert not Path(os.environ["FAKE_LOG"]).exists()  # no gcloud command ran


def test_delete_after_a_failed_install_and_not_after_a_failed_copy_back(fake_gcloud, monkeypatch, capsys, tmp_path):
    """--delete-after deletes a slice the launch created and could not install on (nothing of
    anyone's is on it), but keeps a reused one (it may hold earlier runs' files) and one whose
    workdir could not be copied back: deleting it would lose that workdir."""
    set_state, calls = fake_gcloud
    monkeypatch.setenv("FAKE_FAIL", "ssh:pip install")
    assert cli.main(launch_args("--delete-after")) == 2
    assert verbs(calls()) == ["queued-resources describe", "queued-resources create",
                              *ACTIVE, "tpu-vm scp", "tpu-vm ssh", "queued-resources delete"]
    assert capsys.readouterr().err.splitlines()[-1].endswith("tpu-vm ssh ...` failed with exit status 1")
    set_state("ACTIVE")
    assert cli.main(launch_args("--delete-after")) == 2
    assert verbs(calls())[-1] == "tpu-vm ssh"  # reused: kept

    set_state("ACTIVE")
    (Path(os.environ["FAKE_LOG"])).unlink()
    monkeypatch.setenv("FAKE_FAIL", "scp:--recurse")
    assert cli.main(launch_args("--copy-back", str(tmp_path / "back"), "--delete-after")) == 2
    assert verbs(calls())[-1] == "tpu-vm scp" and calls()[-1][-1] == "failed"  # no delete after it
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "queued resource run is kept, not deleted, so that the workdir on worker 0 is not lost: copy it, then "
        "`gcloud compute tpus queued-resources delete run --force --quiet --zone us-central2-b`")


def test_resource_failing_right_after_creation_is_one_error(fake_gcloud, monkeypatch, capsys):
    set_state, calls = fake_gcloud
    monkeypatch.setenv("FAKE_CREATED_STATE", "FAILED")
    assert cli.main(launch_args()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("llama-jax launch: error: queued resource run is FAILED right after its creation; see "
                       "`gcloud compute tpus queued-resources describe run --zone us-central2-b`")  # (its zone was cut)
    assert verbs(calls()) == ["queued-resources describe", "queued-resources create",
                              "queued-resources describe FAILED"]  # no loop of re-creations
    # --delete-after deletes it, as it does a slice the launch made that fails its install (it was left)
    (Path(os.environ["FAKE_LOG"])).unlink()
    assert cli.main(launch_args("--delete-after")) == 2  # (FAILED: deleted, created again, FAILED)
    assert verbs(calls()) == ["queued-resources describe FAILED", "queued-resources delete", "queued-resources describe",
                              "queued-resources create", "queued-resources describe FAILED", "queued-resources delete"]


@pytest.fixture
def fake_worker(fake_gcloud, tmp_path, monkeypatch):
    """fake_gcloud whose ssh runs a launched command's remote shell here, in a worker's home whose
    environment's python stands for the command: it prints a step, waits until the fake ssh lets it
    end (the connection that does not drop), prints another and exits 3. Returns (drop, starts): drop(n)
    makes the next n connections drop after a line of output; starts() counts the commands started."""
    worker = tmp_path / "worker"
    python = worker / tpu.REMOTE_DIR / tpu.REMOTE_PYTHON
    python.parent.mkdir(parents=True)
    write_fake(python, "#!/bin/sh\necho started >> ../starts\necho 'step 1'\n"
                       "i=0; while [ ! -e ../release ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n"
                       "echo 'step 2'\nexit 3\n")
    (tmp_path / "worker-bin").mkdir()
    write_fake(tmp_path / "worker-bin" / "python3", "#!/bin/sh\n")  # the install's pip and uv: done
    monkeypatch.setenv("FAKE_WORKER", str(worker))
    fake_gcloud[0]("ACTIVE")

    def drop(n):
        Path(os.environ["FAKE_STATE"] + ".drops").write_text(str(n))

    def starts():
        return len((worker / "starts").read_text().splitlines()) if (worker / "starts").exists() else 0

    return drop, starts


def test_a_dropped_connection_re_attaches_to_the_running_command(fake_gcloud, fake_worker, monkeypatch, capfd):
    """The command ran in the ssh session, and a dropped connection (ssh exit status 255) ended it and
    was taken for its failure: reported, and --delete-after deleted the slice. It runs detached
    now: the launcher re-attaches, gets the command's own status, and deletes only after it ended."""
    _, calls = fake_gcloud
    drop, starts = fake_worker
    drop(2)
    waits = []
    monkeypatch.setattr(tpu.time, "sleep", waits.append)
    with pytest.raises(SystemExit) as exit_:
        cli.main(launch_args("--delete-after"))
    assert exit_.value.code == 3
    assert starts() == 1  # started once, followed three times
    assert waits == [10, 20]
    out, err = capfd.readouterr()
    assert "step 2" in out
    assert "llama-jax launch: lost the connection to the workers (ssh exit status 255); the command goes on there; " \
           "re-attaching in 20s (2 of 5)" in err
    assert "llama-jax launch: the command exited with status 3 on the TPU" in err
    assert [c for c in calls() if c[:2] == ["tpu-vm", "ssh"]][1:] == [["tpu-vm", "ssh", "dropped"]] * 2 + [
        ["tpu-vm", "ssh", "exit 3"]]
    assert calls()[-1] == ["queued-resources", "delete", "after the command"]


def test_lost_connections_are_counted_in_a_row(fake_gcloud, fake_worker, monkeypatch):
    """A run of days loses its connection more often than RECONNECTS times: only lost connections
    in a row (none lasting CONNECTED_S) make the launcher give up."""
    drop, starts = fake_worker
    drop(tpu.RECONNECTS + 2)
    clock, waits = iter(range(0, 10**6, tpu.CONNECTED_S)), []  # each connection lasts CONNECTED_S
    monkeypatch.setattr(tpu, "time", SimpleNamespace(sleep=waits.append, monotonic=lambda: next(clock)))
    with pytest.raises(SystemExit) as exit_:
        cli.main(launch_args())
    assert exit_.value.code == 3 and starts() == 1
    assert waits == [tpu.RECONNECT_WAIT_S] * (tpu.RECONNECTS + 2)


def test_a_launcher_that_cannot_reconnect_leaves_the_command_running(fake_gcloud, fake_worker, monkeypatch,
                                                                     capsys, tmp_path):
    """After RECONNECTS lost connections in a row the launcher gives up without a word of failure for
    the command, copying back or deleting anything; launched again, it follows the command still
    running instead of starting another."""
    _, calls = fake_gcloud
    drop, starts = fake_worker
    drop(99)
    monkeypatch.setattr(tpu.time, "sleep", lambda seconds: None)
    launch = launch_args("--delete-after", "--copy-back", str(tmp_path / "back"))
    assert cli.main(launch) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("llama-jax launch: error: lost the connection to the workers 6 times in a "
                                           "row (ssh exit status 255); the command is left running on the workers "
                                           "(output: ~/llama-jax/.launch/run.log on each): launch again with the same "
                                           "command to follow it, or stop it (a train saves first): `gcloud compute "
                                           "tpus tpu-vm ssh run --worker=all --command 'kill -TERM $(cat "
                                           "llama-jax/.launch/run.pid)'")
    assert "llama-jax launch: the command exited with status" not in err
    assert verbs(calls()).count("tpu-vm scp") == 1 and "queued-resources delete" not in verbs(calls())  # the upload
    for _ in range(100):  # (the detached command starts on its own time)
        if starts():
            break
        time.sleep(0.1)
    assert starts() == 1 and not (Path(os.environ["FAKE_WORKER"]) / "llama-jax/.launch/run.status").exists()
    worker = Path(os.environ["FAKE_WORKER"])  # a second launch's ship leaves the running command's checkout alone
    (worker / tpu.REMOTE_TARBALL).write_text("not a tarball")
    spec = tpu.TpuLaunch(name="run", zone=ZONE[1], slice=tpu.tpu_slice("v4-32"), command=tuple(TRAIN_TINY))
    done = subprocess.run(["bash", "-c", tpu.install_shell(spec)], cwd=worker, capture_output=True, text=True)
    assert done.returncode == 0 and "still running here: its checkout is left as it is" in done.stderr
    assert not (worker / tpu.REMOTE_TARBALL).exists()
    drop(0)
    with pytest.raises(SystemExit) as exit_:
        cli.main(launch)
    assert exit_.value.code == 3 and starts() == 1
    assert "the command of launch run was started here already: following it" in capsys.readouterr().err
    assert calls()[-1] == ["queued-resources", "delete", "after the command"]


def test_a_file_deleted_or_renamed_here_since_the_last_launch_leaves_the_workers(fake_gcloud, fake_worker,
                                                                                 monkeypatch, tmp_path):
    """Each ship unpacked the checkout over the last one, so a config, module or test deleted or
    renamed here stayed on the workers; it is removed now, and nothing else is: the environment, a
    relative workdir, the launches' files, and files the launcher never shipped."""
    root = tmp_path / "checkout"  # what is shipped: untracked files not ignored count too
    files = ["setup.py", "configs/a.py", "configs/old one.py", "configs/é.py", "llama_jax/x.py", "tests/test_x.py",
             "docs/notes/a.md", "docs/notes/old/b.md"]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.setattr(tpu, "source_root", lambda: root)
    worker = Path(os.environ["FAKE_WORKER"]) / tpu.REMOTE_DIR
    for name in ["runs/demo/metrics.jsonl", "configs/mine.py"]:  # a relative workdir; a file put there by hand
        (worker / name).parent.mkdir(parents=True, exist_ok=True)
        (worker / name).write_text("kept\n")

    def launch():
        spec = tpu.TpuLaunch(name="run", zone=ZONE[1], slice=tpu.tpu_slice("v4-8"), command=tuple(TRAIN_TINY))
        assert tpu.launch(spec) == 3  # (the stand-in command's status)
        return sorted(str(path.relative_to(worker)) for path in worker.rglob("*") if path.is_file())

    kept = [".launch/.shipped", *(f".launch/run.{suffix}" for suffix in ("id", "lock", "log", "pid", "status")),
            ".venv/bin/python", "configs/mine.py", "runs/demo/metrics.jsonl"]
    assert launch() == sorted(files + kept)
    for name in ["configs/old one.py", "configs/é.py", "tests/test_x.py"]:
        (root / name).unlink()
    (root / "llama_jax/x.py").rename(root / "llama_jax/y.py")
    shutil.rmtree(root / "docs/notes")  # a folder (of folders) that became a file: unpacked once the folders' files,
    (root / "docs/notes").write_text("# notes\n")  # Python's caches and the folders they leave empty are gone
    for cache in ["docs/notes/__pycache__/a.cpython-311.pyc", "docs/notes/old/__pycache__/b.cpython-311.pyc"]:
        (worker / cache).parent.mkdir(parents=True)
        (worker / cache).write_bytes(b"\0")
    assert launch() == sorted(["setup.py", "configs/a.py", "docs/notes", "llama_jax/y.py"] + kept)
    assert (worker / tpu.SHIPPED).read_bytes() == b"configs/a.py\0docs/notes\0llama_jax/y.py\0setup.py\0"


def test_what_no_launch_shipped_in_the_way_of_a_folder_or_file_stops_the_install(fake_gcloud, fake_worker,
                                                                                 monkeypatch, tmp_path, capfd):
    """A folder that became a file here, or a file that became a folder, stopped the install with
    tar's "Cannot open: File exists" when the worker's folder held files no launch shipped: even
    Python's caches of the shipped code. Those go now; a file the user keeps there (a run's workdir)
    stops the install with a line naming it, before anything on the worker changed."""
    root = tmp_path / "checkout"
    for name in ["setup.py", "llama_jax/data/__init__.py", "configs/a.py"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.setattr(tpu, "source_root", lambda: root)
    worker = Path(os.environ["FAKE_WORKER"]) / tpu.REMOTE_DIR
    spec = tpu.TpuLaunch(name="run", zone=ZONE[1], slice=tpu.tpu_slice("v4-8"), command=tuple(TRAIN_TINY))

    def tree():
        return {str(path.relative_to(worker)): path.read_bytes() for path in worker.rglob("*") if path.is_file()}

    assert tpu.launch(spec) == 3
    users = ["llama_jax/data/runs/r1/metrics.jsonl", "configs/mine"]  # a workdir; a file put there by hand
    for name in [*users, "llama_jax/data/__pycache__/__init__.cpython-311.pyc"]:
        (worker / name).parent.mkdir(parents=True, exist_ok=True)
        (worker / name).write_text("kept\n")
    shutil.rmtree(root / "llama_jax/data")  # a folder that became a file, a file (on the worker) a folder
    (root / "llama_jax/data").write_text("# data\n")
    (root / "configs/mine").mkdir()
    (root / "configs/mine/b.py").write_text("# b\n")
    before = tree()
    capfd.readouterr()
    with pytest.raises(tpu.LaunchError, match="tpu-vm ssh"):
        tpu.launch(spec)
    assert ": 2 file(s) in ~/llama-jax that no launch listed as shipped (.launch/.shipped) stand where this " \
           "launch's files go (a folder of the checkout became a file, or a file a folder): configs/mine " \
           "llama_jax/data/runs/r1/metrics.jsonl; move them out of ~/llama-jax, then launch again (the checkout " \
           "there is left as it was)\n" in capfd.readouterr().err
    assert tree() == before and not (worker.parent / tpu.REMOTE_TARBALL).exists()
    for name in users:  # moved away
        (worker / name).unlink()
    assert tpu.launch(spec) == 3
    assert (worker / "llama_jax/data").read_text() == "# data\n" and (worker / "configs/mine/b.py").is_file()
    assert (worker / tpu.SHIPPED).read_bytes() == b"configs/a.py\0configs/mine/b.py\0llama_jax/data\0setup.py\0"


def test_a_checkout_shipped_before_the_files_were_listed_is_left_with_a_note(fake_gcloud, fake_worker, monkeypatch,
                                                                            tmp_path, capfd):
    """A worker's checkout from a launch that listed no files (.launch/.shipped) cannot tell the files
    that launch shipped from the user's: none is removed, and the launch said nothing of the stale
    ones left; it says so now, once, and how to get a clean copy."""
    root = tmp_path / "checkout"
    for name in ["setup.py", "configs/a.py"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    monkeypatch.setattr(tpu, "source_root", lambda: root)
    worker = Path(os.environ["FAKE_WORKER"]) / tpu.REMOTE_DIR
    for name in ["setup.py", "configs/old.py"]:  # shipped by a launch that kept no list, or the user's: kept
        (worker / name).parent.mkdir(parents=True, exist_ok=True)
        (worker / name).write_text("# before\n")
    spec = tpu.TpuLaunch(name="run", zone=ZONE[1], slice=tpu.tpu_slice("v4-8"), command=tuple(TRAIN_TINY))
    note = ": ~/llama-jax has no list of the files a launch shipped there (.launch/.shipped; older launches " \
           "wrote none), so files deleted or renamed in the checkout since stay there (only listed ones are " \
           "removed: others may be yours); for a clean copy, remove all of ~/llama-jax but .venv and any workdir " \
           "before the next launch\n"
    assert tpu.launch(spec) == 3
    assert note in capfd.readouterr().err
    assert (worker / "configs/old.py").is_file() and (worker / "setup.py").read_text() == "# setup.py\n"
    assert tpu.launch(spec) == 3
    assert note not in capfd.readouterr().err and (worker / "configs/old.py").is_file()  # (the echoed ssh has it)


# ---- SLURM --------------------------------------------------------------------------------------


def test_a_command_whose_workdir_has_a_default_is_launched(capsys, tmp_path, monkeypatch):
    """demo's --workdir defaults to runs/demo: not given, nothing for the launcher to read twice
    (the check of --workdir given once and in full refused it)."""
    monkeypatch.chdir(ROOT)
    assert cli.main(["launch", "slurm", "--dry-run", "--folder", str(tmp_path / "jobs"), "--", "demo"]) == 0
    assert "demo" in (tmp_path / "jobs" / slurm.DRY_RUN_SCRIPT).read_text()
    assert cli.main(["launch", "slurm", "--dry-run", "--", "train", "--config=configs/tiny.py",
                     f"--workdir={tmp_path / 'run'}"]) == 0  # the =forms are read as argparse reads them
    capsys.readouterr()


def test_slurm_dry_run_two_nodes_of_eight_gpus(capsys, tmp_path):
    workdir = tmp_path / "run"
    argv = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time-min", "1440",
            "--account", "proj", "--dry-run", "--", "train", "--config", "configs/tinyllama_1b_8gpu.py",
            "--workdir", str(workdir), "--config.train.log_every=5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    script_path = workdir / "slurm" / slurm.DRY_RUN_SCRIPT
    script = script_path.read_text()
    assert out == f"# {script_path} (not submitted)\n{script}"
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --account=proj",
                 "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]:
        assert line in script.splitlines()
    assert (f"-m llama_jax.cli train --config configs/tinyllama_1b_8gpu.py --workdir {workdir} "
            f"--config.train.log_every=5") in script
    assert "srun" in script and "--array" not in script
    assert sorted(os.listdir(workdir)) == ["slurm"] and os.listdir(workdir / "slurm") == [slurm.DRY_RUN_SCRIPT]


def test_the_cpus_per_node_reach_the_task(capsys, tmp_path):
    """srun of Slurm 22.05 to 23.02 does not take the job's --cpus-per-task: the task, all of a node's
    GPUs and their input pipeline, ran on one CPU unless srun is given the count too."""
    assert cli.main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-node", "32", "--dry-run",
                     "--", "train", "--config", "configs/tinyllama_1b_8gpu.py", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [srun] = [shlex.split(line) for line in lines if line.startswith("srun ")]
    assert "#SBATCH --cpus-per-task=32" in lines and "--cpus-per-task=32" in srun


def test_a_task_that_fails_ends_the_jobs_other_tasks(capsys, tmp_path):
    """srun leaves a job's other tasks running when one exits with an error (unless the cluster sets
    KillOnBadExit): they waited in a collective for the lost process, holding every node, until JAX's
    heartbeat timeout aborted them. srun is told to end them at once, with or without --cpus-per-node."""
    for options in ([], ["--cpus-per-node", "32"]):
        assert cli.main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", *options, "--dry-run", "--",
                         "train", "--config", "configs/tinyllama_1b_8gpu.py", "--workdir", str(tmp_path)]) == 0
        [srun] = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("srun ")]
        assert "--kill-on-bad-exit=1" in srun
    [path] = slurm.submit_array([["llama-jax", "demo"]] * 2, tmp_path / "array", dry_run=True)  # (a sweep's trials)
    assert "--kill-on-bad-exit=1" in Path(path).read_text()


def test_the_gpus_may_be_requested_as_a_generic_resource(capsys, tmp_path):
    """--gpus-per-node needs SLURM's select/cons_tres (sbatch refuses it elsewhere): --gpus-by-gres asks
    for the same GPUs as --gres=gpu:G, which clusters with select/cons_res or select/linear take too;
    the tasks still see the node's G GPUs."""
    def script(*options):
        assert cli.main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", *options, "--dry-run", "--",
                         "train", "--config", "configs/tinyllama_1b_8gpu.py", "--workdir", str(tmp_path)]) == 0
        return [line for line in capsys.readouterr().out.splitlines()
                if line.startswith(("#SBATCH --gpus", "#SBATCH --gres", "export JAX_LOCAL_DEVICE_IDS"))]

    assert script("--gpus-by-gres") == ["#SBATCH --gres=gpu:8", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]
    assert script() == ["#SBATCH --gpus-per-node=8", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]


def test_memory_whole_nodes_qos_and_features_are_requested(capsys, tmp_path):
    """A job without a memory request gets the cluster's default, often a few GB per CPU, and a
    training process beyond it is killed by its cgroup: --mem-gb asks for memory per node (0: all
    of it, SLURM's spelling of a whole node's memory), --exclusive for whole nodes; --qos and
    --constraint reach the script too. None of them is asked for unless given."""
    def script(*options):
        assert cli.main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", *options, "--dry-run", "--",
                         "train", "--config", "configs/tinyllama_1b_8gpu.py", "--workdir", str(tmp_path)]) == 0
        return capsys.readouterr().out.splitlines()

    lines = script("--mem-gb", "0", "--exclusive", "--qos", "high", "--constraint", "a100&ib")
    for line in ["#SBATCH --mem=0G", "#SBATCH --exclusive", "#SBATCH --qos=high", "#SBATCH --constraint='a100&ib'"]:
        assert line in lines
    assert "#SBATCH --mem=480G" in script("--mem-gb", "480")
    assert not [line for line in script() if line.split("=")[0] in (
        "#SBATCH --mem", "#SBATCH --exclusive", "#SBATCH --qos", "#SBATCH --constraint")]


def test_the_job_keeps_the_users_own_wckey(tmp_path):
    """submitit books every job to the wckey "submitit": where the cluster tracks wckeys (TrackWCKey)
    the job's usage went there instead of the user's default wckey, and where it enforces them
    (AccountingStorageEnforce=wckeys) sbatch refused a user without that wckey."""
    [path] = slurm.submit_array([["llama-jax", "demo"]], tmp_path / "jobs", dry_run=True)
    assert "--wckey" not in Path(path).read_text()


def test_the_job_is_warned_before_its_limit_and_may_be_requeued(tmp_path):
    """submitit requeues a job with `scontrol requeue`, which SLURM refuses for a job that is not
    requeueable (a cluster's JobRequeue=0 makes that every job's default, and a preempted one is
    then cancelled instead of requeued): the script asks for --requeue. The warning comes the
    command's time to save, and the requeue's, before the limit."""
    [path] = slurm.submit_array([["llama-jax", "demo"]], tmp_path / "jobs", dry_run=True)
    lines = Path(path).read_text().splitlines()
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --signal=USR2@90" in lines and slurm.SAVE_TIME_S + slurm.REQUEUE_S == 90


def test_a_large_models_save_gets_the_time_asked_for(capsys, tmp_path, monkeypatch):
    """A requeue gave every command 80 s to save: the state of a large model on shared storage (tens
    to hundreds of GB) took longer, so the job was killed mid-save at each time limit and lost the
    work since its previous checkpoint. --save-time-s S moves SLURM's warning to S + 10 s before
    the limit, and the job's pickled command waits S for the save."""
    monkeypatch.chdir(ROOT)
    argv = ["launch", "slurm", "--save-time-s", "600", "--time-min", "21", "--folder", str(tmp_path / "jobs"),
            "--dry-run", "--", "train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    assert "#SBATCH --signal=USR2@610" in capsys.readouterr().out.splitlines()
    [path] = slurm.submit_array([["llama-jax", "demo"]] * 2, tmp_path / "array", save_time_s=300, dry_run=True)
    assert "#SBATCH --signal=USR2@310" in Path(path).read_text().splitlines()


def test_a_launched_sweep_is_checked_and_passed_on_as_given(capsys, tmp_path, monkeypatch):
    """Its axes and every trial's config are checked here; the workdir is the sweep's to write there."""
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "sweep"
    sweep = ["sweep", "--config", "configs/tiny.py", "--workdir", str(workdir), "--sweep", "optimizer.lr=[1e-3,2e-3]",
             "--config.train.steps=20"]
    assert cli.main(["launch", "slurm", "--folder", str(tmp_path / "jobs"), "--dry-run", "--", *sweep]) == 0
    assert shlex.join(["-m", "llama_jax.cli", *sweep]) in capsys.readouterr().out
    assert not workdir.exists()


def test_submit_array_dry_run(tmp_path):
    commands = [["llama-jax", "train", "--config", "configs/tiny.py", "--workdir", f"sweep/{i}",
                 f"--config.optimizer.lr={lr}"] for i, lr in enumerate([1e-3, 3e-3, 1e-2])]
    [path] = slurm.submit_array(commands, tmp_path / "jobs", gpus_per_node=2, time_min=30, dry_run=True)
    script = Path(path).read_text()
    assert "#SBATCH --array=0-2%3" in script.splitlines()
    assert "#SBATCH --time=30" in script and "#SBATCH --gpus-per-node=2" in script
    for i, argv in enumerate(commands):
        assert f"# array task {i} runs (through submitit's pickle): {shlex.join(argv)}" in script


def write_fake(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake sbatch (keeps a copy of the script, answers a job id) and srun (submitit wants it on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    submitted = tmp_path / "submitted.sh"
    write_fake(bin_dir / "sbatch", f"#!/bin/sh\ncp \"$1\" {submitted}\necho 'Submitted batch job 4242'\n")
    write_fake(bin_dir / "srun", "#!/bin/sh\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return submitted


def test_a_refused_submission_says_so_and_leaves_no_job_files(fake_slurm, tmp_path):
    """(sbatch exiting 1 silently gave `sbatch failed: FailedJobError('')`, and left the jobs'
    pickles in the folder.)"""
    write_fake(tmp_path / "bin" / "sbatch", "#!/bin/sh\nexit 1\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "notes.txt").write_text("mine\n")
    with pytest.raises(slurm.LaunchError, match=r"^sbatch failed: it printed no reason$"):
        slurm.submit_array([["true"], ["false"]], tmp_path / "jobs", nodes=1)
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("count", [1, 3])
def test_dry_run_shows_exactly_what_is_submitted(fake_slurm, tmp_path, count):
    commands = [[sys.executable, "-c", f"open({str(tmp_path / f'ran{i}')!r}, 'w').write('yes')"]
                for i in range(count)]
    options = dict(nodes=2, gpus_per_node=4, partition="gpu", account="proj", cpus_per_node=16)
    ids = slurm.submit_array(commands, tmp_path / "jobs", **options)
    assert ids == (["4242"] if count == 1 else [f"4242_{i}" for i in range(count)])
    [dry] = slurm.submit_array(commands, tmp_path / "jobs", dry_run=True, **options)
    assert Path(dry).read_text() == fake_slurm.read_text()

    # On a node, submitit runs the pickled job: the command line itself.
    from submitit.core.utils import DelayedSubmission

    pickle = tmp_path / "jobs" / (f"{ids[-1]}_submitted.pkl")
    job = DelayedSubmission.load(pickle)
    assert isinstance(job.function, slurm.JobCommand) and job.function.argv == commands[-1]
    job.result()
    assert (tmp_path / f"ran{count - 1}").read_text() == "yes"
    assert job.function.checkpoint().function.argv == commands[-1]  # requeued unchanged
    assert job.function.save_time_s == slurm.SAVE_TIME_S


def test_a_submitted_job_waits_for_the_save_time_asked_for(fake_slurm, tmp_path):
    """The pickled command carries --save-time-s to the node, where submitit's requeue handler
    waits that long for the save (and requeues a command that keeps it)."""
    from submitit.core.utils import DelayedSubmission

    [job_id] = slurm.submit_array([["true"]], tmp_path / "jobs", save_time_s=600, time_min=21)
    job = DelayedSubmission.load(tmp_path / "jobs" / f"{job_id}_submitted.pkl").function
    assert job.save_time_s == 600 and job.checkpoint().function.save_time_s == 600


def test_a_requeue_waits_the_save_time_for_a_command_still_saving():
    """A command still saving after save_time_s is left to the time limit: the requeue waited that
    long, not a fixed 80 s."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    job = slurm.JobCommand([sys.executable, "-c", code], save_time_s=2)
    slurm._running = subprocess.Popen(job.argv)
    try:
        time.sleep(1)  # (its SIGTERM handler set)
        began = time.monotonic()
        again = job.checkpoint().function
        waited = time.monotonic() - began
        assert slurm._running.poll() is None  # still saving: it was not killed
    finally:
        slurm._running.send_signal(signal.SIGKILL)
        slurm._running.wait()
        slurm._running = None
    assert 2 <= waited < 10 and again.save_time_s == 2


def test_job_command_outlives_the_requeue_signal():
    """SLURM signals every process of a job before its time limit; only submitit acts on it."""
    code = "import os, signal; os.kill(os.getpid(), signal.SIGUSR2); print('still running')"
    slurm.JobCommand([sys.executable, "-c", code])()  # raises CalledProcessError if the signal killed it


def test_job_command_outlives_the_requeue_signal_submitit_is_told_to_use(monkeypatch, tmp_path):
    """submitit's SUBMITIT_PREEMPT_SIGNAL (read when it is imported) changes the signal the script
    asks SLURM for and the one submitit acts on: the command ignored USR2 alone, and the other
    signal killed it unsaved at every time limit."""
    from submitit.core.job_environment import JobEnvironment

    monkeypatch.setattr(JobEnvironment, "USR_SIG", "HUP")
    [path] = slurm.submit_array([["llama-jax", "demo"]], tmp_path / "jobs", dry_run=True)
    assert "#SBATCH --signal=HUP@90" in Path(path).read_text().splitlines()
    code = "import os, signal; os.kill(os.getpid(), signal.SIGHUP); print('still running')"
    slurm.JobCommand([sys.executable, "-c", code])()


@contextlib.contextmanager
def _warned_once(appears: Path, on_usr2, within_s: float):
    """Inside the block, SLURM's warning (USR2) reaches this process once `appears` exists (or after
    `within_s`), handled by `on_usr2` as submitit's handler would be; the previous handler after."""
    import threading

    def warn():
        deadline = time.monotonic() + within_s
        while not appears.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, on_usr2)
    try:
        threading.Thread(target=warn, daemon=True).start()
        yield
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_requeue_lets_the_command_save_first(tmp_path):
    """submitit asks the job for its checkpoint before it requeues it (and then exits, killing what
    still runs): the command gets SIGTERM, as a preempted run does, and the time to save."""
    code = ("import pathlib, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path(sys.argv[1]).write_text('saved'), sys.exit(0)))\n"
            "pathlib.Path(sys.argv[2]).touch()\n"
            "time.sleep(60)\n")
    saved, started = tmp_path / "saved", tmp_path / "started"
    job = slurm.JobCommand([sys.executable, "-c", code, str(saved), str(started)])
    requeued = []

    def on_usr2(signum, frame):  # as submitit's handler: in the main thread, while the job waits for its command
        began = time.monotonic()
        requeued.append((job.checkpoint(), time.monotonic() - began))

    with _warned_once(started, on_usr2, within_s=60):  # SLURM's warning before the time limit
        job()  # returns once the command has saved and exited 0
    (again, waited), = requeued
    assert saved.read_text() == "saved" and again.function.argv == job.argv
    assert waited < slurm.SAVE_TIME_S / 4  # reaped as soon as it exited, not after the whole allowance
    assert slurm._executor(slurm._import_submitit(), tmp_path, dry_run=True).max_num_timeout == \
        slurm.MAX_TIMEOUT_REQUEUES  # not submitit's default of 3 time limits


# `llama-jax train` whose last step's training record waits a moment (SLURM's warning lands there) and
# whose closing evaluation outlasts the requeue's wait
SLOW_CLOSING = """
import pathlib, sys, time
import llama_jax.run as run
from llama_jax import cli, metrics
warned, last, write = pathlib.Path(sys.argv.pop(1)), int(sys.argv.pop(1)), metrics.MetricsWriter.write

def write_then_wait(self, step, record):
    write(self, step, record)
    if step == last and "loss" in record:
        warned.touch()
        time.sleep(1)

metrics.MetricsWriter.write = write_then_wait
run.evaluate = lambda *args, **kwargs: time.sleep(600)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_run_requeued_during_its_closing_evaluation_is_not_finished_until_it_is_logged(tmp_path, monkeypatch):
    """SLURM's warning lands in a real `llama-jax train`'s last step: the requeue's SIGTERM lets the run
    go on into its closing evaluation (saved first), the requeue stops waiting after --save-time-s, and
    the job's end kills the run mid-evaluation. Its progress.json recorded the last step before the
    evaluation, so the run read as finished without its final held-out loss: `sweep --on slurm` never
    submitted the trial again (where the job was not requeued: a preemption with PreemptMode=CANCEL)
    and its report ranked it `done` with no objective. The last step is recorded once its evaluation
    is logged; the requeued job, the same command, evaluates and finishes the run."""
    from llama_jax.data import EmbeddedCorpus
    from llama_jax.results import run_outcome
    from llama_jax.tokenizer import train_sentencepiece

    corpus = EmbeddedCorpus()
    tokenizer = train_sentencepiece((corpus[i] for i in range(len(corpus))), tmp_path / "tokenizer.model", 512)
    workdir, warned = tmp_path / "run", tmp_path / "warned"
    train = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
             *[f"--config.{o}" for o in ("data.source=embedded", f"data.tokenizer={tokenizer}", "model.vocab_size=512",
                                         "train.steps=4", "train.batch_size=8", "train.log_every=1",
                                         "optimizer.warmup_steps=1", "checkpoint.every=2", "train.sample_tokens=0")]]
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # (the commands' environment)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    job = slurm.JobCommand([sys.executable, "-c", SLOW_CLOSING, str(warned), "4", *train], save_time_s=10)

    def on_usr2(signum, frame):  # submitit's handler: the checkpoint, then the requeue, which ends the job
        job.checkpoint()
        slurm._running.kill()

    try:
        with _warned_once(warned, on_usr2, within_s=240), pytest.raises(subprocess.CalledProcessError) as killed:
            job()  # warned in the last step
    finally:
        slurm._running = None
    assert killed.value.returncode == -signal.SIGKILL
    assert "4" in os.listdir(workdir / "checkpoints")  # the last step saved before the evaluation
    outcome = run_outcome(workdir)
    assert not outcome["complete"] and outcome["final_eval_loss"] is None, outcome

    slurm.JobCommand([sys.executable, "-m", "llama_jax.cli", *train])()  # the requeued job
    outcome = run_outcome(workdir)
    assert outcome["complete"] and outcome["final_eval_loss"] is not None, outcome
    assert json.loads((workdir / "progress.json").read_text()) == {"committed_step": 4}


def test_slurm_cli_submits(fake_slurm, tmp_path, capsys):
    argv = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--folder", str(tmp_path / "jobs"), "--",
            "llama-jax", "train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("submitted SLURM job 4242: 2 node(s) x 8 GPU(s)")
    assert "#SBATCH --nodes=2" in fake_slurm.read_text()


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v9-8", "--dry-run", "--", *TRAIN_TINY],
     "unknown accelerator type 'v9-8'"),
    (["tpu", "--name", "Run_1", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY],
     "--name 'Run_1': use 1 to 63 lowercase letters, digits and hyphens, starting with a letter and not ending "
     "with a hyphen"),
    (["tpu", "--name", "a" * 64, *ZONE, "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY],
     "not ending with a hyphen (this one has 64)"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", *TRAIN_TINY],
     "give the llama-jax command to run after --"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run"],
     "give the llama-jax command to run after --"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--spot", "true", "--dry-run", "--", *TRAIN_TINY],
     "'true' before --: launch tpu takes no such argument (its flags such as --dry-run take no value)"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "python", "train.py"],
     "after --: 'python' is not a llama-jax command"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--"], "after --: nothing given"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--setup", "if true", "--dry-run", "--", *TRAIN_TINY],
     "--setup 'if true' is not valid shell (unexpected end of file); it runs on every worker after the install"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "launch", "slurm", "--", *TRAIN_TINY],
     "after --: launch runs on this machine, not on the machines it launches on; expected one of"),  # not "no command"
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "train", "--config",
      "configs/missing.py", "--workdir", "w"], "--config configs/missing.py: no such file"),
    (["tpu", "--name", "n", "--zone", "us-central2", "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY],
     "--zone 'us-central2' is not a Google Cloud zone; valid: a region and its zone's suffix, e.g. us-central2-b"),
    (["tpu", "--name", "Bad_Name", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY],
     "--name 'Bad_Name'"),
    # --runtime-version and --project go into the gcloud commands as they are
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--runtime-version", "v2 alpha;reboot", "--dry-run",
      "--", *TRAIN_TINY], "--runtime-version 'v2 alpha;reboot': use letters, digits, dots, hyphens and underscores, "
                          "starting with a letter or digit, e.g. tpu-ubuntu2204-base"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--runtime-version=-x", "--dry-run", "--", *TRAIN_TINY],
     "--runtime-version '-x': use letters"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--project", "My_Project", "--dry-run", "--",
      *TRAIN_TINY], "--project 'My_Project' is not a Google Cloud project ID; valid: 6 to 30 lowercase letters, "
                    "digits and hyphens, starting with a letter and not ending with a hyphen, e.g. my-project-123"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--project", "proj", "--dry-run", "--", *TRAIN_TINY],
     "--project 'proj' is not a Google Cloud project ID"),  # too short
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--project", "my-project-", "--dry-run", "--",
      *TRAIN_TINY], "--project 'my-project-' is not a Google Cloud project ID"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--project", "1project", "--dry-run", "--", *TRAIN_TINY],
     "--project '1project' is not a Google Cloud project ID"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--project", "p" * 31, "--dry-run", "--", *TRAIN_TINY],
     "is not a Google Cloud project ID"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--copy-back", "d", "--dry-run", "--",
      "plan", "--config", "configs/tiny.py"], "--copy-back needs a command with --workdir"),
    (["slurm", "--nodes", "0", "--dry-run", "--", *TRAIN_IN_TMP], "--nodes must be at least 1"),
    (["slurm", "--gpus-per-node", "0", "--dry-run", "--", *TRAIN_IN_TMP], "--gpus-per-node must be at least 1"),
    (["slurm", "--dry-run", *TRAIN_IN_TMP], "give the llama-jax command to run after --"),
    (["slurm", "--dry-run", "--", "plan", "--config", "configs/tiny.py"], "--folder is required"),
    # the launched command's flags, parsed here, and its mesh and batch against the devices it will have
    (["slurm", "--dry-run", "--folder", "TMP_WORKDIR", "--", "train", "--config", "configs/tiny.py"],
     "after --: train: the following arguments are required: --workdir"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY, "--bogus"],
     "after --: train: unrecognized arguments: --bogus"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-32", "--dry-run", "--", *TRAIN_TINY,
      "--config.mesh.data=3"], "mesh: the device count, 16, is not divisible by the fixed mesh sizes"),
    (["slurm", "--nodes", "2", "--gpus-per-node", "8", "--dry-run", "--", *TRAIN_IN_TMP,
      "--config.train.batch_size=12"], "train.batch_size / train.grad_accum = 12 is not divisible by mesh.data x "
                                       "mesh.fsdp = 16"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-08", "--dry-run", "--", *TRAIN_TINY],
     "unknown accelerator type 'v4-08'"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v5litepod-12", "--dry-run", "--", *TRAIN_TINY],
     "v5litepod-12: v5litepod slices have 1, 4, 8, 16, 32, 64, 128, 256 chips, not 12"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-4", "--dry-run", "--", *TRAIN_TINY],
     "v4-4: the smallest v4 slice is v4-8 (4 chips, one host)"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v5p-2", "--dry-run", "--", *TRAIN_TINY],
     "v5p-2: the smallest v5p slice is v5p-8"),
    (["slurm", "--job-name", "x\n#SBATCH --exclusive", "--dry-run", "--", *TRAIN_IN_TMP],
     "--job-name 'x\\n#SBATCH --exclusive': use letters, digits and . _ + -"),
    (["slurm", "--partition", "gpu\n#SBATCH --account=x", "--dry-run", "--", *TRAIN_IN_TMP],
     "--partition 'gpu\\n#SBATCH --account=x': use letters, digits and . _ + - ,"),
    (["slurm", "--account", "a b", "--dry-run", "--", *TRAIN_IN_TMP], "--account 'a b': use letters, digits"),
    (["slurm", "--qos", "a b", "--dry-run", "--", *TRAIN_IN_TMP], "--qos 'a b': use letters, digits"),
    (["slurm", "--constraint", "a100\n#SBATCH --qos=x", "--dry-run", "--", *TRAIN_IN_TMP],
     "--constraint 'a100\\n#SBATCH --qos=x': use node feature names (letters, digits and . _ + -) and SLURM's "
     "operators & | [ ] ( ) *"),
    (["slurm", "--mem-gb", "-1", "--dry-run", "--", *TRAIN_IN_TMP],
     "--mem-gb must be at least 0 (0: all of each node's memory), got -1"),
    # the launched command's config and values, checked before anything is launched
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY,
      "--config.train.stepz=3"], "unknown config key 'train.stepz'"),
    (["slurm", "--dry-run", "--", *TRAIN_IN_TMP, "--config.optimizer.lr", "-1"],
     "after --: train: optimizer.lr: got -1.0; valid: a number in [0, inf)"),
    (["slurm", "--dry-run", "--", "sweep", "--config", "configs/tiny.py", "--workdir", "TMP_WORKDIR", "--sweep",
      "optimizer.lrr=[1e-3,2e-3]"], "trial lrr=0.001: unknown config key 'optimizer.lrr'"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "sweep", "--config",
      "configs/tiny.py", "--workdir", "/mnt/gcs/sweep", "--sweep", "optimizer.lr=[1e-3,-2e-3]"],
     "after --: sweep: trial lr=-0.002: optimizer.lr: got -0.002; valid: a number in [0, inf)"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "sweep", "--config",
      "configs/tiny.py", "--workdir", "/mnt/gcs/sweep", "--sweep", "mesh.fsdp=[4,8]"],
     "after --: sweep: trial fsdp=8: mesh: data x fsdp x tensor = 1 x 8 x 1 = 8, but the device count is 4"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY, "--config.mesh.tensor=4"],
     "after --: train: model.n_kv_heads=2 is not divisible by mesh.tensor=4"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "sweep", "--config",
      "configs/tiny.py", "--workdir", "/mnt/gcs/sweep", "--search", "random", "--sweep",
      "optimizer.lr=loguniform(1e-4,1e-2)"],
     "--search random needs --trials N"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "sweep", "--config",
      "configs/tiny.py", "--workdir", "/mnt/gcs/sweep", "--sweep", "optimizer.lr=[1e-3,2e-3]", "--trials", "3"],
     "--trials applies to --search random and optuna"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "sweep", "--workdir",
      "/mnt/gcs/sweep", "--sweep", "optimizer.lr=[1e-3,2e-3]"], "--config is required"),
    (["tpu", "--name", "n", "--zone", "", "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY],
     "--zone is empty; give a value"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "train", "--config",
      "configs/tiny.py", "--workdir", ""], "after --: train: --workdir is empty; give a value"),
    (["slurm", "--nodes", "2", "--dry-run", "--", *TRAIN_IN_TMP, "--num-processes", "2", "--coordinator", "h:1",
      "--process-id", "0"], "after --: train: --num-processes is the launcher's to set (one process per TPU "
                            "worker or SLURM node, found by JAX itself); drop --num-processes, --coordinator, "
                            "--process-id"),
    # a relative workdir is on each worker's own disk: split over several workers, gone after a restart
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-32", "--dry-run", "--", "train", "--config",
      "configs/tiny.py", "--workdir", "runs/tiny"],
     "after --: train: --workdir runs/tiny is relative, on each worker's own disk (under ~/llama-jax), and each of "
     "this v4-32's 4 workers would write its own part of every checkpoint there"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--max-restarts", "3", "--dry-run", "--", "train",
      "--config", "configs/tiny.py", "--workdir", "runs/tiny"],
     "a restart after preemption re-creates the slice with empty disks, so --max-restarts would start the run over; "
     "give a directory on storage every worker mounts and that outlives the slice, e.g. /mnt/gcs/runs/tiny"),
    # a launched sweep runs its trials on the one host it is sent to
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "sweep", "--config",
      "configs/tiny.py", "--workdir", "/mnt/gcs/sweep", "--sweep", "train.seed=[0,1]", "--on", "slurm"],
     "after --: sweep --on slurm submits a job per trial from a SLURM login node"),
    (["slurm", "--nodes", "2", "--dry-run", "--", "sweep", "--config", "configs/tiny.py", "--workdir",
      "TMP_WORKDIR", "--sweep", "train.seed=[0,1]"], "after --: sweep runs its trials on one host, and this "
                                                     "launch has 2"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-32", "--dry-run", "--", "sweep", "--workdir",
      "/mnt/gcs/sweep", "--report"], "after --: sweep rebuilds its report on one host, and this launch has 4"),
    (["slurm", "--gpus-per-node", "8", "--dry-run", "--", "sweep", "--config", "configs/tiny.py", "--workdir",
      "TMP_WORKDIR", "--sweep", "train.seed=[0,1]", "--parallel", "2"],
     "after --: sweep: --parallel 2 on a gpu host needs --devices-per-run K"),
    (["slurm", "--partition", "", "--dry-run", "--", *TRAIN_IN_TMP], "--partition is empty; give a value"),
    (["slurm", "--partition", "gpu,", "--dry-run", "--", *TRAIN_IN_TMP],
     "--partition 'gpu,' has an empty name in its list; give names separated by single commas"),
    (["slurm", "--time-min", "2", "--dry-run", "--", *TRAIN_IN_TMP],  # (its warning came before it started)
     "--time-min must be at least 3, got 2: SLURM warns a job 90 s before its limit"),
    (["slurm", "--time-min", "-5", "--dry-run", "--", *TRAIN_IN_TMP],  # (not "at least 1")
     "--time-min must be at least 3, got -5: SLURM warns a job 90 s before its limit"),
    # a job that saves for S s is warned S + 10 s before its limit, and works at least as long
    (["slurm", "--save-time-s", "600", "--time-min", "20", "--dry-run", "--", *TRAIN_IN_TMP],
     "--time-min must be at least 21, got 20: SLURM warns a job 610 s before its limit (--save-time-s 600 + 10)"),
    (["slurm", "--save-time-s", "5", "--dry-run", "--", *TRAIN_IN_TMP],
     "--save-time-s must be from 10 to 65525, got 5: the command needs time to save"),
    (["slurm", "--save-time-s", "65526", "--time-min", "5000", "--dry-run", "--", *TRAIN_IN_TMP],
     "--save-time-s must be from 10 to 65525, got 65526"),
    # what the other commands refuse of their arguments alone (a slice was made, and everything installed on it,
    # for a command that failed there at once)
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "generate", "--prompt", "hi"],
     "after --: generate: give a model directory or --workdir RUN (one of them)"),
    (["slurm", "--dry-run", "--", "generate", "/mnt/m", "--prompt", "hi", "--prompts-file", ""],
     "after --: generate: --prompts-file is empty; give a value"),
    (["slurm", "--dry-run", "--", "generate", "/mnt/m", "--prompt", "hi", "--config.model.max_seq_len=4096"],
     "after --: generate: --config.model.max_seq_len=4096: llama-jax generate reads no experiment config"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "plan", "--config",
      "configs/tiny.py", "--devices", "0"], "after --: plan: --devices must be a positive number of virtual CPU"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "lm-eval", "/mnt/m", "--tasks", ","],
     "after --: lm-eval: no task given; pass --tasks NAME"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "data", "inspect"],
     "after --: data: give --config CONFIG (prepared data, or a raw source prepared now) or --workdir RUN"),
    (["slurm", "--dry-run", "--", "eval", "--step", "3", "/mnt/m"],
     "after --: eval: --step needs --workdir (a model directory holds one set of parameters)"),
    # one process per host: every host would run it alone (both writing eval's results, say)
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-32", "--dry-run", "--", "eval", "/mnt/m", "--config",
      "configs/tiny.py"], "after --: eval runs as one process, and this launch starts one on each of its 4 hosts; "
                          "launch it on one (--nodes 1, or a single-host TPU slice such as v4-8): only train runs "
                          "across hosts"),
    (["slurm", "--nodes", "2", "--dry-run", "--", "data", "inspect", "--config", "configs/tiny.py", "--step", "1"],
     "after --: data inspect runs as one process, and this launch starts one on each of its 2 hosts"),
    (["slurm", "--dry-run", "--folder", "TMP_WORKDIR", "--", "sweep", "--workdir", "TMP_WORKDIR", "--report",
      "--trials", "3"], "after --: sweep: --report rebuilds the results from the files in --workdir alone; drop "
                        "--trials"),
    (["slurm", "--folder", "README.md", "--dry-run", "--", *TRAIN_IN_TMP],
     "--folder README.md is a file; give a directory for the job's script and logs"),
    (["slurm", "--folder", "/proc/jobs", "--dry-run", "--", *TRAIN_IN_TMP],  # (a folder that takes no files)
     "--folder /proc/jobs: cannot write a file into /proc ("),
    (["slurm", "--folder", "README.md/jobs", "--dry-run", "--", *TRAIN_IN_TMP],
     f"--folder README.md/jobs is under {ROOT / 'README.md'}, a file; give a directory for the job's script"),
    # scp -r names the copy after the workdir's last part: `..` would have put it beside DIR, merging
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--copy-back", "TMP_WORKDIR", "--dry-run", "--", "train",
      "--config", "configs/tiny.py", "--workdir", "/mnt/gcs/runs/.."],
     "the command's --workdir /mnt/gcs/runs/.. does not end in the workdir's own name"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--copy-back", "README.md", "--dry-run", "--",
      *TRAIN_TINY], "--copy-back README.md is a file; give a directory to receive the run's workdir"),
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "sweep", "--config",
      "configs/tiny.py", "--workdir", "/mnt/gcs/sweep", "--sweep", "train.seed=[0,1]", "--devices-per-run", "3"],
     "after --: sweep: --devices-per-run 3: a TPU host splits into processes of 1, 2, 4 chips"),  # (at a trial)
    # the launcher reads --workdir and --config from the command line: as argparse takes them, or refused
    (["tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--copy-back", "TMP_WORKDIR", "--dry-run", "--",
      "train", "--config", "configs/tiny.py", "--work", "/mnt/gcs/runs/x"],
     "after --: train: give --workdir once and in full (--workdir /mnt/gcs/runs/x): the launcher reads it"),
    (["slurm", "--dry-run", "--", *TRAIN_IN_TMP, "--workdir", "TMP_WORKDIR2"],
     "after --: train: give --workdir once and in full"),
    (["slurm", "--dry-run", "--", "train", "--conf", "configs/tiny.py", "--workdir", "TMP_WORKDIR"],
     "after --: train: give --config once and in full (--config configs/tiny.py)"),
])
def test_bad_input(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "run"
    assert cli.main(["launch", *[str(workdir) if a == "TMP_WORKDIR" else a for a in argv]]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("llama-jax launch: error: ") and message in captured.err
    assert not workdir.exists()


def test_a_job_folder_with_a_line_break_is_refused(capsys, tmp_path, monkeypatch):
    """The logs' paths are #SBATCH lines of the script: a line break in the folder (here from the
    run's --workdir) cut them, and sbatch would have dropped every option after it; exit 0 before."""
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "run\necho hi"
    assert cli.main(["launch", "slurm", "--dry-run", "--", "train", "--config", "configs/tiny.py", "--workdir",
                     str(workdir)]) == 2
    message = (f"the job folder {str(workdir / 'slurm')!r} (--folder, or the --workdir's slurm/) holds a control "
               f"character, which would break the sbatch script's #SBATCH lines; use a path without one\n")
    assert capsys.readouterr().err == f"llama-jax launch: error: {message}"
    # a sweep's trials on SLURM: its dry run renders the same script
    assert cli.main(["sweep", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "s\nx"), "--sweep",
                     "train.seed=[0,1]", "--on", "slurm", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama-jax sweep: error: the job folder ") and "holds a control character" in err, err
    assert list(tmp_path.iterdir()) == []


def test_bytes_that_are_not_utf8_in_the_command_or_the_job_folder(capsys, tmp_path, monkeypatch):
    """The sbatch script is UTF-8 text: a path whose bytes are not UTF-8 stopped its writing with a bare
    "'utf-8' codec can't encode character" line, after the job folder and an empty script were made.
    In the command it is shown escaped in the script's comment (the task gets the argument itself)."""
    monkeypatch.chdir(ROOT)
    jobs, workdir = tmp_path / "jobs", os.fsdecode(bytes(tmp_path / "run") + b"\xff")
    assert cli.main(["launch", "slurm", "--dry-run", "--folder", str(jobs), "--", "train", "--config",
                     "configs/tiny.py", "--workdir", workdir]) == 0
    assert f"--workdir '{tmp_path / 'run'}\\xff'\n" in capsys.readouterr().out
    shutil.rmtree(jobs)
    assert cli.main(["launch", "slurm", "--dry-run", "--folder", os.fsdecode(bytes(jobs) + b"\xff"), "--", "train",
                     "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        f"llama-jax launch: error: the job folder {jobs}\\xff (--folder, or the --workdir's slurm/) holds bytes that "
        f"are not UTF-8, which the sbatch script (UTF-8 text) cannot hold; use a path without them\n")
    # the job folder inside such a --workdir: the workdir is named first, which could not hold the run's checkpoints
    assert cli.main(["launch", "slurm", "--dry-run", "--", "train", "--config", "configs/tiny.py", "--workdir",
                     workdir]) == 2
    assert capsys.readouterr().err == (
        f"llama-jax launch: error: after --: train: --workdir {tmp_path / 'run'}\\xff: its path holds the byte 0xff, "
        f"which is not UTF-8; checkpoints are read and written only at UTF-8 paths, so rename the directory or give "
        f"another --workdir\n")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_inside_a_runs_checkpoints_or_a_dangling_link_is_refused(capsys, tmp_path, monkeypatch):
    """submitit's folder inside a run's checkpoints/ would put its files among the steps Orbax reads;
    one at a link to nothing could not be made."""
    monkeypatch.chdir(ROOT)
    dangling = tmp_path / "jobs"
    dangling.symlink_to(tmp_path / "gone")
    assert cli.main(["launch", "slurm", "--folder", str(dangling), "--dry-run", "--", *TRAIN_TINY]) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax launch: error: --folder {dangling} is a symbolic link to {tmp_path / 'gone'}, which does not "
        f"exist; give a directory for the job's script and logs")
    run, step = tmp_path / "run", tmp_path / "run" / "checkpoints" / "4"
    step.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}, "checkpoint": {}}))  # as a run's holds
    given = os.path.relpath(step)  # named as given, as the other --folder messages do
    assert cli.main(["launch", "slurm", "--folder", given, "--dry-run", "--", *TRAIN_TINY]) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax launch: error: --folder {given} is inside {run / 'checkpoints'}, the checkpoints of a run; choose "
        f"a --folder outside it")
    assert not any(step.iterdir())


def test_a_launched_train_whose_workdir_holds_a_model_or_a_sweep_is_refused(capsys, tmp_path, monkeypatch):
    """train refuses such a --workdir where it runs; launched, the job's folder was made inside it
    first (a model directory that an export --overwrite then refused) and the job failed on the cluster."""
    monkeypatch.chdir(ROOT)
    model, sweep = tmp_path / "model", tmp_path / "sweep"
    model.mkdir()
    (model / "model_config.json").write_text("{}")
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    for workdir, message in ((model, "holds 'model_config.json' but no llama-jax run (a run writes config.json, "
                                      "checkpoints/, metrics.jsonl there)"),
                             (sweep, "holds a sweep (sweep.json; its trials run in directories of their own inside it)")):
        train = ["train", "--config", "configs/tiny.py", "--workdir", str(workdir)]
        assert cli.main(["launch", "slurm", "--dry-run", "--", *train]) == 2
        assert capsys.readouterr().err.strip() == (f"llama-jax launch: error: after --: train: --workdir {workdir} "
                                                   f"{message}; use a new or empty directory")
        assert not (workdir / slurm.WORKDIR_FOLDER).exists()
        assert cli.main(train) == 2  # as train itself says
        assert capsys.readouterr().err.strip() == f"llama-jax train: error: --workdir {workdir} {message}; use a new " \
                                                  f"or empty directory"


@pytest.mark.parametrize("project", ["my-proj", "a" * 30, "example.com:my-project", "123456789012"])
def test_project_ids_gcloud_takes_are_passed_on(project, capsys):
    _, commands = dry_run(capsys, ["launch", "tpu", "--name", "t", *ZONE, "--accelerator", "v4-8", "--project",
                                   project, "--dry-run", "--", *TRAIN_TINY])
    assert all(flag(c, "--project") == project for c in commands)


def test_a_dry_run_without_git_prints_the_plan_and_says_what_it_could_not_check(capsys, tmp_path, monkeypatch):
    """A launch ships the files git lists of the checkout, and stops without git; a dry run (which
    needs no gcloud either) printed nothing but that error. It prints the plan, and says so in it;
    the upload, whose tarball cannot be built, is said instead of shown with a path never made."""
    git = shutil.which("git")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(tpu.uuid, "uuid4", lambda: tpu.uuid.UUID(int=7))  # one launch id for both dry runs
    argv = ["launch", "tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY]
    _, with_git = dry_run(capsys, argv)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out, without_git = dry_run(capsys, argv)
    upload = next(c for c in with_git if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"])
    assert without_git == [c for c in with_git if c is not upload]
    assert "# (the upload: the checkout's tarball cannot be built here, see NOT READY)" in out.splitlines()
    assert ".tar.gz n:" not in out
    assert out.splitlines()[1:3] == [
        "# NOT READY: a launch from here stops before anything runs: git not found on PATH: launching ships the files "
        "git lists of this checkout (tracked, and untracked but not ignored); install git",
        "# (so which files the workers would get, --config among them, is not checked here)"]
    # what needs no git is still checked
    assert cli.main([*argv[:-len(TRAIN_TINY)], "train", "--workdir", "/mnt/gcs/r", "--config",
                     "../" + ROOT.name + "/configs/tiny.py"]) == 2
    assert "the path leads out of the checkout" in capsys.readouterr().err
    (empty / "git").symlink_to(git)
    assert "NOT READY" not in dry_run(capsys, argv)[0]


def test_a_dry_run_outside_a_git_checkout_prints_the_plan(tmp_path):
    """A copy of the project that is no git checkout: the same, run as a program from the copy."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "llama_jax", copy / "llama_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", copy / "configs")
    shutil.copy(ROOT / "setup.py", copy)
    env = {**os.environ, "PYTHONPATH": str(copy), "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # (if tmp is in one)
    done = subprocess.run([sys.executable, "-m", "llama_jax.cli", "launch", "tpu", "--name", "n", *ZONE,
                           "--accelerator", "v4-8", "--dry-run", "--", *TRAIN_TINY], cwd=copy, capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == (f"# NOT READY: a launch from here stops before anything runs: cannot list the files of {copy} "
                        f"with git: fatal: not a git repository (or any of the parent directories): .git")
    assert lines[-1].startswith("gcloud compute tpus tpu-vm ssh n --worker=all --command 'cd llama-jax && ")
    assert ".venv/bin/python -m llama_jax.cli train --config configs/tiny.py" in lines[-1]


def test_a_launch_without_git_stops_before_the_slice_is_made(fake_gcloud, capsys, tmp_path, monkeypatch):
    """With a --config not checked here (on the slice's bucket), the launch created the queued
    resource, and only then failed to pack the checkout."""
    set_state, calls = fake_gcloud
    monkeypatch.setenv("PATH", str(Path(tpu.shutil.which("gcloud")).parent))  # the fake gcloud, no git
    assert cli.main(["launch", "tpu", "--name", "run", *ZONE, "--accelerator", "v4-8", "--", "train", "--config",
                     "/mnt/gcs/runs/tiny/config.json", "--workdir", "/mnt/gcs/runs/tiny"]) == 2
    assert capsys.readouterr().err.startswith("llama-jax launch: error: git not found on PATH")
    assert calls() == []


def test_a_config_outside_the_shipped_checkout_is_refused(capsys, tmp_path):
    """The workers get the checkout, not this machine's other files."""
    config = tmp_path / "mine.py"
    config.write_text((ROOT / "configs" / "tiny.py").read_text())
    base = ["launch", "tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--dry-run", "--", "train",
            "--workdir", "/mnt/gcs/runs/tiny", "--config"]
    assert cli.main([*base, str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax launch: error: --config {config}: the workers run from their own copy of the checkout, where "
        f"this path does not exist; give a file under {ROOT.resolve()}, by its path relative to it")
    assert cli.main([*base, str(ROOT.resolve() / "configs" / "tiny.py")]) == 2  # inside it, but by this machine's path
    assert capsys.readouterr().err.strip().endswith("does not exist; give configs/tiny.py (relative to the checkout)")


def test_missing_tools_are_one_line(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    git = shutil.which("git")
    monkeypatch.setenv("PATH", str(empty))  # no gcloud, no sbatch, no git
    tpu_launch = ["launch", "tpu", "--name", "n", *ZONE, "--accelerator", "v4-8", "--", *TRAIN_TINY]
    assert cli.main(tpu_launch) == 2
    assert capsys.readouterr().err == ("llama-jax launch: error: git not found on PATH: launching ships the files git "
                                       "lists of this checkout (tracked, and untracked but not ignored); install "
                                       "git\n")
    (empty / "git").symlink_to(git)
    assert cli.main(tpu_launch) == 2
    assert capsys.readouterr().err == ("llama-jax launch: error: gcloud not found on PATH: install the Google "
                                       "Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run\n")
    folder = tmp_path / "run"
    argv = ["launch", "slurm", "--", "train", "--config", "configs/tiny.py", "--workdir", str(folder)]
    assert cli.main(argv) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err
    write_fake(empty / "sbatch", "#!/bin/sh\nexit 1\n")  # a client without srun: submitit's RuntimeError was raised
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == ("llama-jax launch: error: srun not found on PATH: submit from a SLURM login "
                                       "node, or use --dry-run\n")
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert cli.main([*argv[:2], "--dry-run", *argv[2:]]) == 2
    assert capsys.readouterr().err == ("llama-jax launch: error: SLURM launching needs submitit: "
                                       "pip install 'submitit>=1.5' (in a checkout: pip install -e '.[launch]')\n")
    assert not folder.exists() and not list(tmp_path.glob("llama-jax-*"))


# ---- experiments scripts ------------------------------------------------------------------------


@pytest.fixture
def script_env(tmp_path):
    """Environment for the experiments scripts: this checkout's llama-jax, and a gcloud that must not be called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    llama_jax = bin_dir / "llama-jax"  # this Python's llama-jax, whether or not an entry point is installed
    write_fake(llama_jax, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m llama_jax.cli \"$@\"\n")
    write_fake(bin_dir / "gcloud", f"#!/bin/sh\ntouch {tmp_path}/gcloud-was-called\nexit 99\n")
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LLAMA_JAX=str(llama_jax),
                WORKDIR=str(tmp_path / "run"))


@pytest.mark.parametrize("script, accelerator, workers, config", [
    ("llama2_7b_v4_32.sh", "v4-32", 4, "configs/llama2_7b_v4_32.py"),
    ("llama3_8b_v5p.sh", "v5p-64", 8, "configs/llama3_8b_v5p.py"),
])
def test_tpu_experiment_scripts_dry_run(script, accelerator, workers, config, script_env, tmp_path):
    done = subprocess.run([str(ROOT / "experiments" / script), "--dry-run", "--config.train.seed", "3", "--spot",
                           "--config.train.log_every=7"],  # (the seed's value went to the launcher, which refused it)
                          env=script_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{accelerator}: " in done.stdout and f"on {workers} workers" in done.stdout
    commands = [shlex.split(line) for line in done.stdout.splitlines() if line.startswith("gcloud ")]
    assert "--spot" in commands[0] and flag(commands[0], "--accelerator-type") == accelerator
    run = flag(commands[-1], "--command")
    assert f"train --config {config} --workdir {tmp_path / 'run'} --config.train.seed 3 --config.train.log_every=7" \
        in run
    assert not (tmp_path / "gcloud-was-called").exists()


def test_slurm_experiment_script_dry_run(script_env, tmp_path):
    done = subprocess.run([str(ROOT / "experiments" / "tinyllama_slurm.sh"), "--dry-run", "--config.train.seed", "3",
                           "--partition", "gpu", "--config.train.log_every=7"], env=script_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    script = (tmp_path / "run" / "slurm" / slurm.DRY_RUN_SCRIPT).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --mem=0G" in script  # whole nodes' memory
    assert "#SBATCH --cpus-per-task=32" in script  # (SLURM's default is often one CPU for the 8 GPUs)
    assert (f"train --config configs/tinyllama_1b_8gpu.py --workdir {tmp_path / 'run'} --config.train.seed 3 "
            f"--config.train.log_every=7" in script)


@pytest.mark.parametrize("script", ["llama2_7b_v4_32.sh", "llama3_8b_v5p.sh", "tinyllama_slurm.sh"])
def test_launch_experiment_scripts_help_is_their_own_usage(script, script_env, tmp_path):
    """--help went to the launcher, whose usage asks for the --name, --zone and --accelerator (or
    --nodes) the script gives it, and says nothing of the --config.* split or the environment."""
    for args in (["--help"], ["--dry-run", "--config.train.seed", "3", "-h"]):
        done = subprocess.run([f"./{script}", *args], env=script_env, cwd=ROOT / "experiments", capture_output=True,
                              text=True, timeout=120)  # (a path relative to a directory tinyllama_slurm.sh leaves)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert f"experiments/{script} [launch flags ...] [--config.key=value ...]" in done.stdout
        assert "Environment: " in done.stdout and "usage: llama-jax" not in done.stdout
    assert not (tmp_path / "gcloud-was-called").exists() and not (tmp_path / "run").exists()


def test_experiment_scripts_run_with_sh_say_they_need_bash(tmp_path):
    """`sh script.sh` (dash, Debian's sh) stopped at once on `set: Illegal option -o pipefail`."""
    for script in sorted((ROOT / "experiments").glob("*_*.sh")):
        done = subprocess.run(["dash", str(script), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and done.stderr == (
            f"{script.name}: error: this is a bash script; run it as {script}, or with bash {script}, not sh\n")
    assert list(tmp_path.iterdir()) == []


def test_a_slurm_task_count_that_is_not_a_number_is_named(monkeypatch, capsys, tmp_path):
    """Inside a SLURM job, `train` joins the job's processes when SLURM_NTASKS > 1: a value that is
    not a count was a bare `invalid literal for int()` line."""
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "abc")
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir)]) == 2
    assert capsys.readouterr().err == (
        "llama-jax train: error: SLURM_NTASKS='abc' (SLURM_JOB_ID is set): expected the job's number of tasks, a "
        "positive integer; run inside a SLURM job step, or unset SLURM_JOB_ID outside one\n")
    assert not workdir.exists()


def test_a_gcloud_error_is_its_error_lines_joined():
    """Its last line alone was the end of a list of ways out ("- set the property `core/project`")."""
    stderr = ("ERROR: (gcloud.compute.tpus.queued-resources.describe) Error parsing [queued_resource].\n"
              "The [queued_resource] resource is not properly specified.\n"
              "Failed to find attribute [project]. The attribute can be set in the following ways: \n"
              "- provide the argument `--project` on the command line\n- set the property `core/project`\n")
    assert tpu.gcloud_error(stderr, 1) == (
        "Error parsing [queued_resource]. The [queued_resource] resource is not properly specified. Failed to find "
        "attribute [project]. The attribute can be set in the following ways: - provide the argument `--project` on "
        "the command line - set the property `core/project`")
    assert tpu.gcloud_error("Updating...\npermission denied\n", 1) == "permission denied"
    assert tpu.gcloud_error("", 3) == "exit status 3"
