"""Sweeps end to end: trials are real `llama-jax train` processes of configs/tiny.py (a few steps
each); a killed sweep resumes only what is missing; failures, pruning and device sharing are
recorded; bad sweeps are one line before anything runs."""

import contextlib
import csv
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import submitit  # noqa: F401  (imported here, not under a test's output capture: it reconfigures logging)

from llama_jax import sweep as sweep_lib
from llama_jax.checkpoint import RunCheckpoints
from llama_jax.cli import main
from llama_jax.experiment import load_config
from llama_jax.run import committed_steps

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
SHORT = ["--config.train.steps=4", "--config.optimizer.warmup_steps=1", "--config.checkpoint.every=2",
         "--config.train.log_every=1", "--config.train.batch_size=8"]


SHORT_OVERRIDES = [a.removeprefix("--config.") for a in SHORT]


def sweep_args(workdir, *extra) -> list[str]:
    return ["sweep", "--config", TINY, "--workdir", str(workdir), *SHORT, *extra]


def rows(workdir: Path) -> list[dict]:
    with open(workdir / "results.csv") as f:
        return list(csv.DictReader(f))


def trial(directory: Path) -> dict:
    return json.loads((directory / "trial.json").read_text())


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)  # soon after: a test kills the driver between a trial's checkpoint and its end


def test_grid_sweep_killed_midway_finishes_only_what_is_missing(tmp_path, capsys):
    workdir, config = tmp_path / "sweep", tmp_path / "experiment.py"
    config.write_text(Path(TINY).read_text())  # removed at the end: --report reads only the sweep's files
    args = sweep_args(workdir, "--sweep", "optimizer.lr=[1e-3,3e-3]", "--sweep", "train.seed=[0,1]")
    args[args.index(TINY)] = str(config)
    first_run, second_run = workdir / "lr=0.001,seed=0", workdir / "lr=0.001,seed=1"
    driver = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (second_run / "progress.json").is_file())  # trial 0 done, trial 1 has a checkpoint
    driver.kill()
    driver.wait()
    wait_for(lambda: trial(second_run)["status"] == "running" and not _alive(second_run))
    assert trial(first_run)["status"] == "done"
    first_metrics = (first_run / "metrics.jsonl").stat().st_mtime_ns
    assert not (workdir / "lr=0.003,seed=0").exists()
    committed = json.loads((second_run / "progress.json").read_text())["committed_step"]
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0  # the killed sweep could not say so itself
    assert {r["run"]: r["status"] for r in rows(workdir)}[second_run.name] == ("done" if committed == 4 else
                                                                               "interrupted")
    assert trial(second_run)["status"] == "running"  # --report only reads

    spec = (workdir / "sweep.json").read_text()
    (workdir / "sweep.json").unlink()  # lost as well: the trials' records keep a copy
    capsys.readouterr()
    assert main(args) == 0
    assert f"{workdir / 'sweep.json'} is missing: the sweep is read from the copy its trials' records keep " \
           f"(trial.json)" in capsys.readouterr().out
    assert (workdir / "sweep.json").read_text() == spec
    assert (first_run / "metrics.jsonl").stat().st_mtime_ns == first_metrics  # finished: not run again
    logged = [json.loads(line)["step"] for line in (second_run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(logged)) == [1, 2, 3, 4]
    assert all(logged.count(step) == 1 for step in range(1, committed + 1))  # resumed, not restarted
    table = rows(workdir)
    assert len(table) == 4 and all(r["status"] == "done" and r["steps"] == "4" for r in table)
    assert {(r["optimizer.lr"], r["train.seed"]) for r in table} == {("0.001", "0"), ("0.001", "1"),
                                                                    ("0.003", "0"), ("0.003", "1")}
    losses = [float(r["final_train_loss"]) for r in table]
    assert all(math.isfinite(x) for x in losses) and losses == sorted(losses)  # best first
    plots = {"loss_curves.png", "final_train_loss_vs_optimizer.lr.png", "final_train_loss_vs_train.seed.png"}
    assert {p.name for p in workdir.glob("*.png")} == plots and all((workdir / p).stat().st_size > 1000 for p in plots)
    assert "| lr=" in (workdir / "results.md").read_text()

    results = (workdir / "results.csv").read_text()
    config.unlink()
    for png in workdir.glob("*.png"):
        png.unlink()
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0
    assert (workdir / "results.csv").read_text() == results and {p.name for p in workdir.glob("*.png")} == plots
    spec = json.loads((workdir / "sweep.json").read_text())
    del spec["objective"]  # as an earlier release wrote it: the trials' own config.json says
    (workdir / "sweep.json").write_text(json.dumps(spec))
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0
    assert (workdir / "results.csv").read_text() == results

    capsys.readouterr()
    assert main(["sweep", "--workdir", str(workdir), "--report", "--sweep", "train.seed=[0]", "--parallel", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith("--report rebuilds the results from the files in --workdir alone; "
                                                    "drop --sweep, --parallel")
    damages = ["garbage\n", json.dumps({**spec, "axes": {}}), json.dumps({**spec, "axes": {"train.seed": 0}}), None]
    for damaged in damages:  # read from the trials' copy (None: a directory in sweep.json's place)
        if damaged is None:
            (workdir / "sweep.json").unlink()
            (workdir / "sweep.json").mkdir()
        else:
            (workdir / "sweep.json").write_text(damaged)
        assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0
        assert capsys.readouterr().err == (f"{workdir / 'sweep.json'} is damaged: the sweep is read from the copy its "
                                           f"trials' records keep (trial.json)\n")  # (stdout: the table alone)
        assert (workdir / "results.csv").read_text() == results
    for record in workdir.glob("*/trial.json"):  # as an earlier release wrote them, without the copy
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "sweep"}))
    files = {p: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 2  # refused, not rebuilt without the swept columns
    assert capsys.readouterr().err.strip().endswith(
        "sweep.json is damaged (not a sweep's JSON), and no trial's record keeps a copy of it (trials of an earlier "
        "release); use another --workdir")
    assert {p: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == files


def test_a_raw_source_is_prepared_once_for_every_trial(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    raw = ["--config.data.source=embedded", "--config.data.tokenizer=train", "--config.data.tokenizer_vocab_size=512",
           "--config.model.vocab_size=512", "--config.train.steps=2"]
    args = sweep_args(workdir, "--sweep", "train.seed=[0,1]", *raw)
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data: prepared once into {workdir / 'data'}" in out
    assert out.count(f"--config.data.source=prepared --config.data.path={workdir / 'data'}") == 2
    assert not workdir.exists()

    assert main(args) == 0
    # the runs end with an evaluation, but the sweep minimises the training loss (train.eval_every=0)
    assert all(r["final_eval_loss"] for r in rows(workdir))
    assert (workdir / "final_train_loss_vs_train.seed.png").is_file()
    assert not (workdir / "final_eval_loss_vs_train.seed.png").exists()
    manifest = workdir / "data" / "manifest.json"
    for seed in (0, 1):
        run = workdir / f"seed={seed}"
        assert trial(run)["status"] == "done" and not (run / "data").exists()  # no copy of its own
        data = json.loads((run / "config.json").read_text())["data"]
        assert (data["source"], data["path"]) == ("prepared", str(workdir / "data"))
    stamp = manifest.stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # a re-run checks the prepared data and keeps it
    assert manifest.stat().st_mtime_ns == stamp
    assert f"data.source=embedded: every trial reads the copy prepared in {workdir / 'data'}" in capsys.readouterr().out

    # An axis over a data setting leaves each trial to prepare its own data.
    assert main([*sweep_args(tmp_path / "other", "--sweep", "data.eval_fraction=[0.1,0.2]", *raw), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "prepared once" not in out and "data.source=prepared" not in out and "eval_fraction=0.2" in out


def test_trials_of_an_earlier_row_order_are_not_joined_by_trials_in_the_current_one(tmp_path, capsys):
    """A sweep whose begun trials were trained by a release before hashed row orders (their
    checkpoints record no order) is refused, before anything is written, where trials would begin
    now in the current orders; once every trial has begun, a re-run and --report go on."""
    workdir = tmp_path / "sweep"
    args = sweep_args(workdir, "--sweep", "optimizer.lr=[1e-3,3e-3]", "--config.data.source=embedded",
                      "--config.data.tokenizer=train", "--config.data.tokenizer_vocab_size=512",
                      "--config.model.vocab_size=512", "--config.train.steps=2")
    assert main(args) == 0
    for metadata in (workdir / "lr=0.001").glob("checkpoints/*/run/metadata"):  # as an earlier release saved it
        info = json.loads(metadata.read_text())
        info["data_stream"] = [{k: v for k, v in entry.items() if k != "order"} for entry in info["data_stream"]]
        metadata.write_text(json.dumps(info))
    assert main(args) == 0  # every trial has begun (and finished)
    shutil.rmtree(workdir / "lr=0.003")  # not begun when the earlier release stopped
    files = sorted(p for p in workdir.rglob("*"))
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{workdir}: lr=0.001 trained with an earlier release, which orders each epoch's rows otherwise; the 1 "
        f"trial(s) still to begin would draw theirs in this release's order, not comparable; finish the sweep with "
        f"the release that started it, or run it again in a new --workdir (--report reports this one as it is)")
    assert sorted(p for p in workdir.rglob("*")) == files
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0


def test_a_trial_killed_by_a_signal_says_so_and_its_log_follows_the_run(tmp_path):
    workdir = tmp_path / "sweep"
    run = workdir / "seed=0"
    driver = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *sweep_args(
        workdir, "--sweep", "train.seed=[0]", "--config.train.steps=400")], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (run / "progress.json").is_file())
    assert "step 2: loss" in (run / "train.log").read_text()  # written as the run goes, not when it ends
    os.kill(_trial_pid(run), 9)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 2, out
    assert trial(run)["status"] == "failed"
    assert trial(run)["error"] == "killed by SIGKILL (the system's out-of-memory killer sends it, as does kill -9)"


def test_ctrl_c_in_the_terminal_saves_the_running_trial(tmp_path):
    """Ctrl-C reaches the sweep's whole process group: its trial stops on the sweep's SIGTERM,
    saving its step, not on the SIGINT, which ends a run without saving."""
    workdir = tmp_path / "sweep"
    run = workdir / "seed=0"
    driver = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *sweep_args(
        workdir, "--sweep", "train.seed=[0]", "--config.train.steps=4000", "--config.checkpoint.every=1000")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own terminal
    wait_for(lambda: (run / "train.log").is_file() and "step 3: loss" in (run / "train.log").read_text())
    os.killpg(driver.pid, 2)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out
    log = (run / "train.log").read_text()
    assert "preempted: checkpoint saved at step" in log and "interrupted" not in log.splitlines()[-1], log
    assert trial(run)["status"] == "interrupted"
    saved = json.loads((run / "progress.json").read_text())["committed_step"]
    assert saved >= 3 and saved % 1000  # the step it stopped at, not a periodic checkpoint


def _trial_pid(run: Path) -> int:
    return next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _holds(int(pid), run / "train.log"))


def _holds(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _alive(run: Path) -> bool:
    """Whether a trial process still holds its log open (the sweep's children get SIGTERM on its death)."""
    target = str(run / "train.log")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                    return True
            except OSError:
                continue
    return False


def test_a_trial_continued_by_hand_keeps_the_value_its_sweep_lists_it_under(tmp_path, capsys):
    """`train` in a trial's directory with a swept key left at the config's value went on with it,
    and the sweep's results still listed the trial under its own value; refused, in one line, before
    anything is written. Given the trial's values (as the sweep gives them: a dict, a number for a
    string key), the trial continues."""
    workdir = tmp_path / "sweep"
    axes = ["optimizer.lr=[1e-3]", "train.sample_prompt=[1984]", 'model.rope_scaling=[{"type":"linear","factor":2.0}]']
    assert main(sweep_args(workdir, *[a for axis in axes for a in ("--sweep", axis)])) == 0
    assert [r["status"] for r in rows(workdir)] == ["done"]
    directory = sweep_lib.trial_directories(workdir)[0]
    steps = committed_steps(directory)
    train = ["train", "--config", TINY, "--workdir", str(directory), *SHORT, "--config.train.steps=6"]
    capsys.readouterr()
    assert main(train) == 2
    assert capsys.readouterr().err == (
        f"llama-jax train: error: --workdir {directory} is trial {directory.name} of the sweep in {workdir}, which "
        f"sets optimizer.lr=0.001; this run gives optimizer.lr=0.003, and the sweep's results would list the trial "
        f"under 0.001: give --config.optimizer.lr=0.001 to continue the trial, or another --workdir\n")
    assert committed_steps(directory) == steps == [2, 4]
    own = [f"--config.{sweep_lib.override_text(k, v)}" for k, v in trial(directory)["overrides"].items()]
    assert main([*train, *own]) == 0
    assert committed_steps(directory)[-1] == 6
    # the sweep's own directory given as a run's names itself as a sweep (it said config.json was not found, or that
    # it held no checkpoint)
    for command in (["data", "inspect", "--workdir", str(workdir), "--step", "1"],
                    ["export", "--workdir", str(workdir), str(tmp_path / "model")]):
        capsys.readouterr()
        assert main(command) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            f"--workdir {workdir} is a sweep's directory (sweep.json), not a run; give one of its trials' directories "
            f"inside it (llama-jax sweep --workdir {workdir} --report lists them)")
    assert not (tmp_path / "model").exists()


def test_a_run_of_other_values_where_a_trial_goes_is_not_taken_for_the_trial(tmp_path, capsys):
    """A run trained by hand with lr=0.05 in the directory of trial lr=0.002 (before the sweep got
    there): the sweep resumed it as the trial (nothing left to train) and listed its results as
    those of lr=0.002. Refused in one line, before any trial runs; and by `train` in that directory
    once the sweep has recorded the trial there."""
    workdir = tmp_path / "sweep"
    axis = ["--sweep", "optimizer.lr=[0.001,0.002]"]
    spec, _, _ = sweep_lib.prepare(TINY, workdir, axis[1:], SHORT_OVERRIDES)
    workdir.mkdir()
    (workdir / "sweep.json").write_text(spec.to_json())
    directory = workdir / "lr=0.002"
    train = ["train", "--config", TINY, "--workdir", str(directory), *SHORT]
    assert main([*train, "--config.optimizer.lr=0.05"]) == 0
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    capsys.readouterr()
    assert main(sweep_args(workdir, *axis)) == 2
    assert capsys.readouterr().err == (
        f"llama-jax sweep: error: trial lr=0.002: {directory} holds a run trained with optimizer.lr=0.05, not the "
        f"trial's 0.002, and the sweep's results would list it under 0.002; move that run out of the sweep's "
        f"directory, then run the sweep again\n")
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
    (directory / "trial.json").write_text(json.dumps({"number": 1, "overrides": {"optimizer.lr": 0.002},
                                                      "status": "running"}))
    assert main([*train, "--config.optimizer.lr=0.002"]) == 2
    assert capsys.readouterr().err.startswith(
        f"llama-jax train: error: --workdir {directory} (trial lr=0.002 of the sweep in {workdir}) holds a run trained "
        f"with optimizer.lr=0.05, not the trial's 0.002")
    assert committed_steps(directory) == [2, 4]


def test_a_value_with_a_line_break_stays_in_its_row_of_results_md(tmp_path):
    """A swept string holding a line break (or an error line that does) ended its Markdown row early."""
    from llama_jax.results import COLUMNS, write_tables

    row = {"run": "t000", "train.sample_prompt": "a\nb|c", **dict.fromkeys(COLUMNS), "error": "one\ntwo"}
    write_tables(tmp_path, ["train.sample_prompt"], [row])
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| t000 | a b/c |") and lines[2].endswith("| one two |")


def test_a_failed_trial_is_recorded_and_the_others_complete(tmp_path, capsys):
    """A trial that fails where it runs (cuDNN's attention asks for a GPU, which only the trial's
    own backend can tell; what the config alone shows is refused before any trial starts)."""
    workdir = tmp_path / "sweep"
    args = sweep_args(workdir, "--sweep", "model.attention_impl=[xla,cudnn]", "--config.train.steps=2")
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "attention_impl=xla: llama-jax train --config" in out and "--config.model.attention_impl=cudnn" in out
    assert not workdir.exists()  # a dry run launches and writes nothing

    assert main(args) == 0
    table = {r["run"]: r for r in rows(workdir)}
    assert table["attention_impl=xla"]["status"] == "done"
    assert table["attention_impl=cudnn"]["status"] == "failed"
    assert "attention_impl='cudnn' needs a GPU with cuDNN, and this backend is cpu" in \
        table["attention_impl=cudnn"]["error"]
    assert list(table) == ["attention_impl=xla", "attention_impl=cudnn"]  # the finished trial first
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0  # what a re-run would do: the finished trial is skipped
    out = capsys.readouterr().out
    assert "attention_impl=xla: done, skipped\n" in out and "attention_impl=cudnn: llama-jax train --config" in out

    (workdir / "results.md").unlink()
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0  # rebuilt from the runs' files
    assert "attention_impl=cudnn" in (workdir / "results.md").read_text()

    capsys.readouterr()
    failing = tmp_path / "failing"  # every trial failed: the results are written, the exit status says so
    assert main(sweep_args(failing, "--sweep", "model.attention_impl=[cudnn]", "--config.train.steps=2")) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: all 1 trials failed; the error column of {failing}/results.md says why")
    assert (failing / "results.md").is_file()

    capsys.readouterr()  # a trial whose loss ends non-finite, its steps skipped, has diverged: finished, ranked last
    diverging = tmp_path / "diverging"
    args = sweep_args(diverging, "--sweep", "optimizer.lr=[1e-3,1e30]", "--config.train.on_nonfinite=skip",
                      "--config.optimizer.warmup_steps=0", "--config.optimizer.clip_norm=0",
                      "--config.optimizer.weight_decay=0")  # (lr x weight_decay of 1 or more is refused)
    assert main(args) == 0
    assert [(r["run"], r["status"], r["final_train_loss"]) for r in rows(diverging)][1] == ("lr=1e+30", "diverged",
                                                                                             "nan")
    assert rows(diverging)[0]["status"] == "done" and math.isfinite(float(rows(diverging)[0]["final_train_loss"]))
    assert "[1] diverged lr=1e+30" in capsys.readouterr().out
    assert main(args) == 0
    assert "2 of 2 trials already finished" in capsys.readouterr().out


def test_a_sweep_of_fine_tunes_resumes_after_their_init_from_directory_is_gone(tmp_path, capsys):
    """Trials that hold a run resume from their own checkpoints, as `train` does, so the model
    directory a sweep of fine-tunes started from is read only for trials yet to start."""
    from llama_jax import LLaMAConfig, init_params, save_model
    from llama_jax.data import EmbeddedCorpus
    from llama_jax.tokenizer import train_sentencepiece

    corpus, model = EmbeddedCorpus(), tmp_path / "model"
    tokenizer = train_sentencepiece((corpus[i] for i in range(len(corpus))), tmp_path / "tokenizer.model", 512)
    save_model(model, LLaMAConfig.from_preset("debug"), init_params(LLaMAConfig.from_preset("debug"), 0),
               tokenizer=tokenizer)
    workdir = tmp_path / "sweep"
    args = sweep_args(workdir, "--sweep", "train.seed=[0,1]", "--config.model.preset=init_from",
                      f"--config.checkpoint.init_from={model}", "--config.model.vocab_size=None",
                      "--config.model.ffn_dim=None", "--config.model.max_seq_len=None",
                      "--config.data.source=embedded", f"--config.data.tokenizer={model / 'tokenizer.model'}")
    assert main(args) == 0
    shutil.rmtree(model)
    second = workdir / "seed=1"
    (second / "trial.json").write_text(json.dumps({**trial(second), "status": "running"}))  # killed after its last save
    logged = (second / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert trial(second)["status"] == "done" and (second / "metrics.jsonl").read_text() == logged  # resumed at step 4
    assert "no longer exists; using the run's copy of it" in (second / "train.log").read_text()
    shutil.rmtree(second)  # a trial yet to start needs the model
    assert main(args) == 2
    assert f"trial seed=1: checkpoint.init_from: {model} " in capsys.readouterr().err


def test_random_and_optuna_searches(tmp_path, capsys, monkeypatch):
    random_dir = tmp_path / "random"

    def random_search(trials: int) -> list[str]:
        return sweep_args(random_dir, "--search", "random", "--trials", str(trials), "--seed", "3",
                          "--config.train.steps=2", "--sweep", "optimizer.lr=loguniform(1e-4,1e-2)", "--sweep",
                          "train.seed=int(0,100)")

    assert main(random_search(2)) == 0
    table = rows(random_dir)
    assert len(table) == 2 and all(r["status"] == "done" for r in table)
    lrs = [float(r["optimizer.lr"]) for r in table]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    expected = sweep_lib.random_trials({"optimizer.lr": sweep_lib.loguniform(1e-4, 1e-2),
                                        "train.seed": sweep_lib.int_range(0, 100)}, 2, 3)
    assert sorted(lrs) == sorted(t.overrides["optimizer.lr"] for t in expected)  # a pure function of the seed
    capsys.readouterr()
    assert main(random_search(3)) == 0  # extended to more trials: the first ones are the same, and finished
    assert "2 of 3 trials already finished; running the other 1" in capsys.readouterr().out
    extended = rows(random_dir)
    assert len(extended) == 3 and all(r["status"] == "done" for r in extended)
    assert {float(r["optimizer.lr"]) for r in extended} >= set(lrs)
    assert main(random_search(2)) == 2  # fewer: another sweep
    assert "holds a different sweep (not the same trials: it started with --trials 3," in capsys.readouterr().err
    big_seed = sweep_args(tmp_path / "big", "--search", "random", "--trials", "2", "--seed", str(2**40), "--dry-run",
                          "--sweep", "optimizer.lr=loguniform(1e-4,1e-2)")
    assert main(big_seed) == 0  # a random search takes any seed (Optuna's sampler: below 2**32)

    optuna_dir = tmp_path / "optuna"
    capsys.readouterr()
    assert main(sweep_args(optuna_dir, "--search", "optuna", "--trials", "3", "--dry-run", "--sweep",
                           "optimizer.lr=[3e-3,1e-7]", "--sweep", "train.seed=int(0,9)")) == 0
    assert "optuna: 3 trials chosen by TPE over optimizer.lr=[0.003,1e-07], train.seed=int(0,9), pruned by the " \
           "median rule" in capsys.readouterr().out  # as --sweep writes them (was Grid(values=(0.003, 1e-07)))
    # the pruner stops only a trial the driver sees running: a step takes some 10 ms here, so the
    # trials are long enough, and looked at often enough, to be seen between their steps
    monkeypatch.setattr(sweep_lib, "POLL_SECONDS", 0.02)
    args = sweep_args(optuna_dir, "--search", "optuna", "--trials", "3", "--config.train.steps=40",
                      "--config.checkpoint.every=20", "--sweep", "optimizer.lr=choice(3e-3,1e-7)")
    assert main(args) == 0
    import optuna

    study = optuna.load_study(study_name="llama-jax", storage=f"sqlite:///{optuna_dir / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 3 and "PRUNED" in states and "COMPLETE" in states
    statuses = {r["run"]: r["status"] for r in rows(optuna_dir)}
    for t in study.trials:
        name = f"t{t.number:03d},lr={t.params['optimizer.lr']:.4g}"
        assert statuses[name] == {"PRUNED": "pruned", "COMPLETE": "done"}[t.state.name], name
    capsys.readouterr()
    records = {name: (optuna_dir / name / "trial.json").read_text() for name in statuses}
    for name in statuses:  # damaged since: a study never returns to a finished trial, so the sweep rewrites them
        (optuna_dir / name / "trial.json").write_text('{"number": 0, "overr')
    assert main(args) == 0  # reloads the study from its SQLite file: nothing left to run
    assert "started" not in capsys.readouterr().out
    assert len(optuna.load_study(study_name="llama-jax", storage=f"sqlite:///{optuna_dir / 'optuna.db'}").trials) == 3
    for name, record in records.items():
        rewritten, before = json.loads((optuna_dir / name / "trial.json").read_text()), json.loads(record)
        assert {k: rewritten[k] for k in ("number", "overrides", "status")} == \
            {k: before[k] for k in ("number", "overrides", "status")}, name
    more = list(args)
    more[more.index("--trials") + 1] = "4"
    assert main(more) == 0  # the study goes on to a fourth trial
    assert len(optuna.load_study(study_name="llama-jax", storage=f"sqlite:///{optuna_dir / 'optuna.db'}").trials) == 4
    assert len(rows(optuna_dir)) == 4
    capsys.readouterr()
    (optuna_dir / "optuna.db").write_bytes(b"not SQLite " * 500)  # damaged: was SQLAlchemy's traceback, exit 1
    assert main(more) == 2
    assert capsys.readouterr().err == (f"llama-jax sweep: error: {optuna_dir / 'optuna.db'} cannot be used as the "
                                       f"sweep's Optuna study (file is not a database); put the study back if it is "
                                       f"damaged, or run the search in a new --workdir\n")


def test_the_optuna_study_lives_in_the_workdir_whatever_its_name(tmp_path):
    """"?" and "%" are URL syntax in the study's SQLite address; a workdir named with them keeps
    its own study (not one in a directory named by the part before "?", or in "%41" decoded)."""
    for name in ("a?x=1", "b%41", "c d#e"):
        workdir = tmp_path / name
        workdir.mkdir()
        study = sweep_lib.open_study(workdir, seed=0)
        study.enqueue_trial({"x": 1.0})
        assert (workdir / sweep_lib.STUDY_FILE).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a?x=1", "b%41", "c d#e"]


def test_a_study_damaged_inside_is_one_line(tmp_path):
    """A page of optuna.db overwritten: Optuna raises its StorageInternalError (not SQLAlchemy's
    error, which the whole-file damage in test_random_and_optuna_searches gives), a traceback."""
    import optuna

    study = sweep_lib.open_study(tmp_path, seed=0)
    for i in range(30):
        study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), float(i))
    path = tmp_path / sweep_lib.STUDY_FILE
    data = bytearray(path.read_bytes())
    data[4096 + 8:8192] = b"\xff" * (4096 - 8)
    path.write_bytes(bytes(data))
    with pytest.raises(sweep_lib.SweepError, match=r"optuna.db cannot be used as the sweep's Optuna study \(database "
                                                   r"disk image is malformed\); put the study back if it is damaged"):
        sweep_lib.open_study(tmp_path, seed=0)


def test_a_study_another_program_holds_locked_is_one_line_that_says_to_run_again(tmp_path):
    """Not damage: the sweep can go on once the lock is gone (SQLite waits 5 s for it first)."""
    import sqlite3

    sweep_lib.open_study(tmp_path, seed=0)
    holder = sqlite3.connect(tmp_path / sweep_lib.STUDY_FILE)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sweep_lib.SweepError, match=r"optuna.db cannot be used as the sweep's Optuna study "
                                                       r"\(database is locked\); once that is resolved, run the "
                                                       r"sweep again \(it resumes\)$"):
            sweep_lib.open_study(tmp_path, seed=0)
    finally:
        holder.close()


def test_a_study_damaged_while_the_sweep_runs_is_one_line(tmp_path, capsys, monkeypatch):
    """Damage found mid-sweep (here: a trial overwrites the file), by the study's next read, is the
    same one line, exit 2."""
    workdir = tmp_path / "sweep"
    damage = "import sys; p = sys.argv[1]; n = len(open(p, 'rb').read()); open(p, 'wb').write(b'\\xff' * n)"
    monkeypatch.setattr(sweep_lib, "trial_command",
                        lambda spec, trial, directory, **_: [sys.executable, "-c", damage, str(workdir / "optuna.db")])
    args = sweep_args(workdir, "--search", "optuna", "--trials", "2", "--sweep", "optimizer.lr=loguniform(1e-3,3e-3)")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llama-jax sweep: error: {workdir / 'optuna.db'} cannot be used as the sweep's Optuna study (file "
                   "is not a database); put the study back if it is damaged, or run the search in a new --workdir"), err


def test_a_study_lost_after_trials_started_is_refused(tmp_path, capsys):
    """optuna.db removed (or left empty) once trials have started: a new study, seeded as the first,
    proposed trial 0 again (its finished run redone) and then other values under the numbers of
    the trials on disk (two t001 directories, more rows than --trials)."""
    workdir = tmp_path / "sweep"
    axes_args = ["optimizer.lr=loguniform(1e-4,1e-2)"]
    spec, axes, _ = sweep_lib.prepare(TINY, workdir, axes_args, SHORT_OVERRIDES, "optuna", trials=2)
    workdir.mkdir()
    (workdir / "sweep.json").write_text(spec.to_json())
    done = sweep_lib.Trial(0, {"optimizer.lr": 3e-3})
    (workdir / done.name(axes, True)).mkdir()
    sweep_lib.write_trial(workdir / done.name(axes, True), done, "done", spec)
    before = sorted(workdir.rglob("*"))
    args = sweep_args(workdir, "--search", "optuna", "--trials", "2", *(f"--sweep={a}" for a in axes_args))
    for study in (None, b""):
        if study is not None:
            (workdir / "optuna.db").write_bytes(study)
        assert main(args) == 2
        what = "missing" if study is None else "empty"
        assert capsys.readouterr().err == (f"llama-jax sweep: error: {workdir / 'optuna.db'} is {what}, but the trials "
                                           f"in {workdir} started from it (a new study would propose them again); put "
                                           f"the study back, or run the search in a new --workdir\n")
        assert sorted(workdir.rglob("*")) == sorted(before + ([] if study is None else [workdir / "optuna.db"]))


def test_a_trial_recorded_as_ended_but_running_in_the_study_is_not_run_again(tmp_path, capsys):
    """A sweep killed between writing a trial's final record and telling the study left the study's
    trial RUNNING: the next run resumed it, training a pruned (or finished) trial again and writing
    its record anew. The record is told to the study instead."""
    import sqlite3

    import optuna

    workdir = tmp_path / "sweep"
    args = sweep_args(workdir, "--search", "optuna", "--trials", "1", "--sweep", "optimizer.lr=loguniform(1e-3,3e-3)")
    assert main(args) == 0
    [trial_dir] = [p for p in workdir.iterdir() if (p / "trial.json").is_file()]
    record = json.loads((trial_dir / "trial.json").read_text())
    record["status"] = "pruned"  # as the pruner had stopped it
    (trial_dir / "trial.json").write_text(json.dumps(record))
    with sqlite3.connect(workdir / sweep_lib.STUDY_FILE) as db:  # as the kill left the study
        db.execute("update trials set state='RUNNING', datetime_complete=NULL where number=0")
    metrics = (trial_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "started" not in capsys.readouterr().out
    assert (trial_dir / "metrics.jsonl").read_text() == metrics  # not trained again
    study = optuna.load_study(study_name="llama-jax", storage=f"sqlite:///{workdir / sweep_lib.STUDY_FILE}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED]
    assert json.loads((trial_dir / "trial.json").read_text())["status"] == "pruned"


def test_a_resumed_optuna_trial_reports_each_step_once(tmp_path):
    """The study keeps the losses a killed sweep's trial reported; the resumed trial's metrics.jsonl
    holds them again, and Optuna warns about each step reported twice."""
    import optuna

    workdir = tmp_path / "sweep"
    steps = 120  # room for the kill to land mid-trial (the driver reports the steps it finds every 0.2 s)
    args = sweep_args(workdir, "--search", "optuna", "--trials", "1", "--sweep", "optimizer.lr=loguniform(1e-3,3e-3)",
                      f"--config.train.steps={steps}")
    driver = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def reported() -> dict:
        study = optuna.load_study(study_name="llama-jax", storage=f"sqlite:///{workdir / sweep_lib.STUDY_FILE}")
        return study.trials[0].intermediate_values if study.trials else {}

    wait_for(lambda: any(workdir.glob("t000,*")))  # the study is set up in its file before a trial starts
    wait_for(lambda: len(reported()) >= 2)
    driver.kill()
    driver.wait()
    run = next(workdir.glob("t000,*"))
    wait_for(lambda: not _alive(run))
    before = reported()
    assert 2 <= len(before) < steps
    resumed = subprocess.run([sys.executable, "-m", "llama_jax.cli", *args], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "already reported" not in resumed.stderr and "Warning" not in resumed.stderr, resumed.stderr
    assert sorted(reported()) == list(range(1, steps + 1))
    assert all(reported()[step] == value for step, value in before.items())


def _trial_beside_a_finished_one(tmp_path, warmup_steps: int):
    """An Optuna study (median pruner) with one finished trial of loss 1.0 at steps 1-6, and a second
    trial running in tmp_path/t001 with `warmup_steps`: (study, run directory, Running, signals sent)."""
    import types

    import optuna

    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    finished = study.ask()
    for step in range(1, 7):
        finished.report(1.0, step)
    study.tell(finished, 1.0)
    run = tmp_path / "t001"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"optimizer": {"warmup_steps": warmup_steps}}))
    signals = []
    active = sweep_lib.Running(sweep_lib.Trial(1, {}), run, types.SimpleNamespace(send_signal=signals.append), 0.0,
                               study.ask())
    return study, run, active, signals


def test_the_pruner_stops_a_trial_only_after_its_learning_rate_warmup(tmp_path):
    """Within its warmup a trial of a lower peak rate is behind by design: the median pruner, told
    each step's loss, stops a worse trial only at its first step past optimizer.warmup_steps."""
    import types

    study, run, active, signals = _trial_beside_a_finished_one(tmp_path, warmup_steps=3)
    for step in range(1, 5):  # twice the finished trial's loss at every step
        with open(run / "metrics.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "loss": 2.0}) + "\n")
        sweep_lib.Sweep._report(types.SimpleNamespace(objective="loss"), active)
        assert signals == ([signal.SIGTERM] if step == 4 else []), step
    assert active.pruned


def test_the_pruner_stops_a_trial_whose_every_loss_is_non_finite(tmp_path):
    """With train.on_nonfinite=skip a run logs a non-finite loss as null and goes on. Left out of
    what the pruner was told, a trial diverged from its first steps ran to the end; told as NaN,
    it is stopped at its first step past warmup."""
    import types

    study, run, active, signals = _trial_beside_a_finished_one(tmp_path, warmup_steps=1)
    for step in range(1, 4):
        with open(run / "metrics.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "loss": None}) + "\n")
        sweep_lib.Sweep._report(types.SimpleNamespace(objective="loss"), active)
        assert signals == ([signal.SIGTERM] if step >= 2 else []), step
    assert active.pruned
    assert all(math.isnan(v) for v in study.trials[1].intermediate_values.values())


@pytest.mark.parametrize("on_nonfinite, objective", [("skip", "loss"), ("skip", "eval_loss"), ("stop", "loss")])
def test_a_run_that_skips_non_finite_steps_is_stopped_at_its_first_non_finite_loss(tmp_path, on_nonfinite,
                                                                                   objective):
    """A trial ahead of the finished one (loss 0.5 against 1.0) whose training loss turns
    non-finite: the median pruner judges it by its best loss so far, so with
    train.on_nonfinite=skip it ran to the end, skipping every step; it is stopped at that step,
    also when ranked by its held-out loss, which stays finite (no skipped step changes the
    parameters). A run that stops at such a step stops itself, and is left to."""
    import types

    study, run, active, signals = _trial_beside_a_finished_one(tmp_path, warmup_steps=1)
    (run / "config.json").write_text(json.dumps({"optimizer": {"warmup_steps": 1},
                                                 "train": {"on_nonfinite": on_nonfinite}}))
    for step, loss in enumerate([0.5, 0.5, None, None], start=1):
        with open(run / "metrics.jsonl", "a") as log:
            log.write(json.dumps({"step": step, "loss": loss, "eval_loss": 0.5}) + "\n")
        sweep_lib.Sweep._report(types.SimpleNamespace(objective=objective), active)
        assert signals == ([signal.SIGTERM] if step >= 3 and on_nonfinite == "skip" else []), step
    assert active.pruned == (on_nonfinite == "skip")


def test_a_skipping_run_is_stopped_at_a_non_finite_loss_logged_between_two_polls(tmp_path):
    """The sweep polls a run's log while the run goes on: a non-finite training loss followed by a
    finite one before the next poll is the run's first non-finite loss all the same (read as the
    latest record alone, it was seen or missed by when the poll came)."""
    import types

    study, run, active, signals = _trial_beside_a_finished_one(tmp_path, warmup_steps=1)
    (run / "config.json").write_text(json.dumps({"optimizer": {"warmup_steps": 1},
                                                 "train": {"on_nonfinite": "skip"}}))
    with open(run / "metrics.jsonl", "a") as log:
        for step, loss in enumerate([0.5, None, 0.5], start=1):
            log.write(json.dumps({"step": step, "loss": loss}) + "\n")
    sweep_lib.Sweep._report(types.SimpleNamespace(objective="loss"), active)
    assert signals == [signal.SIGTERM] and active.pruned


@pytest.mark.parametrize("committed, returncode, status", [
    (4, 0, "done"),  # the pruner spoke after the run's last step: it finished (it was recorded pruned)
    (2, 0, "pruned"),  # stopped by the pruner: saved its step and exited
    (2, 1, "pruned"),
])
def test_a_trial_the_pruner_stopped_is_pruned_unless_it_had_finished(tmp_path, committed, returncode, status):
    import types

    run = tmp_path / "t000"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"steps": 4}}))
    (run / "progress.json").write_text(json.dumps({"committed_step": committed}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "eval_loss": 5.5 - s}) + "\n"
                                               for s in range(1, committed + 1)))
    active = sweep_lib.Running(sweep_lib.Trial(0, {"optimizer.lr": 1e-3}), run,
                               types.SimpleNamespace(returncode=returncode), 0.0, pruned=True)
    printed = []
    spec = sweep_lib.SweepSpec("experiment.py", (), {"optimizer.lr": "Grid(values=(0.001,))"}, "optuna", 1, 0)
    sweep_lib.Sweep._finish(types.SimpleNamespace(objective="eval_loss", out=printed.append, spec=spec), active, None)
    assert trial(run)["status"] == status and printed == [f"[0] {status} t000"]
    assert trial(run)["sweep"] == json.loads(spec.to_json())  # the copy a lost sweep.json is read from


def test_the_trials_copies_of_sweep_json_stand_in_for_it_only_when_they_agree(tmp_path):
    """A random search extended from 2 to 4 trials: its lost sweep.json is read as the larger one.
    A trial whose copy is of another sweep (copied in from elsewhere), or that sets other keys
    than its copy sweeps, is refused rather than reported under the wrong axes."""
    seed_axis = {"train.seed": "Choice(values=(0, 1, 2))"}
    first = sweep_lib.SweepSpec("experiment.py", ("train.steps=4",), seed_axis, "random", 2, 0, "abc", "loss", "/w")
    extended = dataclasses.replace(first, trials=4)
    workdir = tmp_path / "sweep"
    for number, spec in ((0, first), (3, extended)):
        (workdir / f"t{number}").mkdir(parents=True)
        sweep_lib.write_trial(workdir / f"t{number}", sweep_lib.Trial(number, {"train.seed": number % 3}), "done", spec)
    assert sweep_lib.saved_spec(workdir) == json.loads(extended.to_json())
    assert trial(workdir / "t0")["sweep"] == json.loads(first.to_json())
    foreign = dataclasses.replace(first, axes={"optimizer.lr": "Grid(values=(0.001,))"})
    (workdir / "t9").mkdir()
    sweep_lib.write_trial(workdir / "t9", sweep_lib.Trial(9, {"optimizer.lr": 0.001}), "done", foreign)
    with pytest.raises(sweep_lib.SweepError, match=r"^the trials t0 and t9 of \S+ keep copies of sweep.json that "
                                                   r"differ \(a trial of another sweep\?\); put the sweep's sweep.json "
                                                   r"back, or use another --workdir$"):
        sweep_lib.saved_spec(workdir)
    sweep_lib.write_trial(workdir / "t9", sweep_lib.Trial(9, {"optimizer.lr": 0.001}), "done", first)
    with pytest.raises(sweep_lib.SweepError, match=r"t9/trial.json sets \['optimizer.lr'\], not the keys its sweep "
                                                   r"sweeps \(\['train.seed'\]\)"):
        sweep_lib.saved_spec(workdir)
    (workdir / "sweep.json").write_text(first.to_json())  # sweep.json itself, when it is whole, is what counts
    assert sweep_lib.saved_spec(workdir) == json.loads(first.to_json())


def test_shared_data_removed_after_trials_started_on_it_is_prepared_there_again(tmp_path):
    """A sweep's D/data removed (damaged, say) once trials have trained on it: the trials go on
    reading D/data, prepared there again (they fell back to preparing their own copies); trials of
    an earlier release, which prepared their own, go on as they began."""
    config = load_config(TINY, ["data.source=embedded"])
    workdir = tmp_path / "sweep"
    trial_dir = workdir / "lr=0.001"
    trial_dir.mkdir(parents=True)
    spec = sweep_lib.SweepSpec(TINY, ("data.source=embedded",), {"optimizer.lr": "Grid(values=(0.001,))"}, "grid",
                               None, 0)
    sweep_lib.write_trial(trial_dir, sweep_lib.Trial(0, {"optimizer.lr": 0.001}), "done", spec)
    shared = ["data.source=prepared", f"data.path={workdir / 'data'}"]
    for path, expected in ((str(workdir / "data"), shared), (str(trial_dir / "data"), [])):
        (trial_dir / "config.json").write_text(json.dumps({"data": {"source": "prepared", "path": path}}))
        assert sweep_lib.shared_data(config, {"optimizer.lr": None}, workdir) == expected


def test_results_table_cells():
    from llama_jax.results import _cell

    assert [_cell(v) for v in (3e-4, 4.12345, 20389.4, 1e30, -1e13, None, 7, "cosine")] == \
        ["0.0003", "4.123", "20,389", "1e+30", "-1e+13", "", "7", "cosine"]  # 1e30 was 31 digits


def test_only_finished_runs_are_plotted_as_final(tmp_path):
    """A pruned, failed or interrupted run stops early: its last loss beside finished runs' would
    draw a trend that is not there."""
    from llama_jax.results import plot

    def row(name, status, loss):
        return {"run": name, "optimizer.lr": 1e-3, "status": status, "objective": loss, "curve": [(1, 5.0), (2, loss)]}

    stopped = [row("a", "pruned", 4.0), row("b", "failed", 4.5), row("c", "interrupted", 3.9)]
    assert [p.name for p in plot(tmp_path, ["optimizer.lr"], [*stopped, row("d", "done", 3.0)], "final train loss")] \
        == ["final_train_loss_vs_optimizer.lr.png", "loss_curves.png"]
    assert [p.name for p in plot(tmp_path, ["optimizer.lr"], stopped, "final train loss")] == ["loss_curves.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curves.png"]  # the earlier plot does not linger


def test_plots_rebuilt_by_two_reports_at_once(tmp_path, monkeypatch):
    """`sweep --report` while the sweep (or another --report) rebuilds the same plots: an earlier
    plot both remove as stale is gone for the one that comes second, which goes on."""
    from llama_jax.results import plot

    row = {"run": "a", "optimizer.lr": 1e-3, "status": "done", "objective": 3.0, "curve": [(1, 5.0), (2, 3.0)]}
    plot(tmp_path, ["optimizer.lr"], [row], "final train loss")
    unlink = Path.unlink

    def removed_by_the_other_report_first(self, missing_ok=False):
        if self.suffix == ".png" and self.exists():
            unlink(self)
        return unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", removed_by_the_other_report_first)
    assert [p.name for p in plot(tmp_path, ["optimizer.lr"], [row], "final train loss")] \
        == ["final_train_loss_vs_optimizer.lr.png", "loss_curves.png"]


def test_a_resumed_optuna_study_does_not_propose_its_first_points_again(tmp_path):
    """Each run of a sweep reloads its study; the sampler's first draws are random (TPE's start-up
    trials), so one seeded as in the first run would repeat what that run proposed."""
    axes = {"optimizer.lr": sweep_lib.loguniform(1e-5, 1e-1)}
    proposed = []
    for _ in range(3):  # a sweep run that asks for one trial, finishes it, and stops
        study = sweep_lib.open_study(tmp_path, seed=0)
        trial = next(sweep_lib.optuna_trials(study, axes, len(study.trials) + 1))
        proposed.append(trial.overrides["optimizer.lr"])
        sweep_lib.tell(study, sweep_lib.study_trial(study, trial)[0], "done", 1.0)
    assert len(set(proposed)) == 3, proposed


def _study_past_its_start_up(directory: Path):
    """The sweep's study in `directory` (made here), holding 10 finished trials of optimizer.lr over
    [1e-4, 1e-2] (TPE's start-up trials: it proposes from them after these), the best at 1e-3."""
    import optuna

    directory.mkdir()
    study = sweep_lib.open_study(directory, seed=0)
    space = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i in range(10):
        lr = 10 ** (-4 + 2 * i / 9)
        study.add_trial(optuna.trial.create_trial(params={"optimizer.lr": lr}, distributions=space,
                                                  value=abs(math.log10(lr) + 3)))
    return study


@pytest.mark.parametrize("resumed", [False, True])
def test_an_optuna_trial_asked_while_another_runs_is_not_proposed_beside_it(tmp_path, monkeypatch, resumed):
    """With --parallel N the study is asked for a trial while others run. TPE without the constant
    liar (Optuna 4's default, stood in for here) ignores running trials, so it proposes the same
    point whatever they are; the sweep's sampler, new or reloaded, steers away from a running one."""
    import functools

    import optuna

    monkeypatch.setattr(optuna.samplers, "TPESampler", functools.partial(optuna.samplers.TPESampler,
                                                                        constant_liar=False))
    axes = {"optimizer.lr": sweep_lib.loguniform(1e-4, 1e-2)}

    def second_while_first_runs(directory: Path, first: float) -> float:
        study = _study_past_its_start_up(directory)
        if resumed:
            study = sweep_lib.open_study(directory, seed=0)
        study.enqueue_trial({"optimizer.lr": first})
        trials = sweep_lib.optuna_trials(study, axes, 12)
        assert next(trials).overrides == {"optimizer.lr": first}  # running while the next is asked
        return next(trials).overrides["optimizer.lr"]

    alone = second_while_first_runs(tmp_path / "far", 1e-2)  # (a running trial far away)
    beside = second_while_first_runs(tmp_path / "near", alone)  # one running where it would go
    assert beside != alone


# what `llama-jax train` prints when its run stops at a non-finite loss, or runs out of memory (as
# XLA says it on CPU: in a step, under `ulimit -v 6000000` with train.batch_size=8192; for a state that
# does not fit, model.ffn_dim=1000000000; and on a GPU, BFC allocator's wording)
NONFINITE_LINE = ("llama-jax train: error: loss or gradient became NaN/Inf in 1 step(s) up to step 2; stopped "
                  "(train.on_nonfinite=stop). No such step was applied to the state; latest checkpoint: none")
OUT_OF_MEMORY_LINES = [
    "llama-jax train: error: the computation failed: INTERNAL: Error dispatching computation: Out of memory "
    "allocating 20761945552 bytes.; a run resumes from its last committed checkpoint",
    "llama-jax train: error: the train state (4,291.5 GiB of parameters and optimizer state) does not fit in the "
    "memory of 1 CPU device(s) (RESOURCE_EXHAUSTED: Out of memory allocating 512000000000 bytes); train a smaller "
    "model, or shard the state over more devices (mesh.fsdp)",
    "llama-jax train: error: the computation failed: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
    "33762398024 bytes.; a run resumes from its last committed checkpoint"]


@pytest.mark.parametrize("status, error", [("diverged", ""), ("failed", NONFINITE_LINE),
                                           *(("failed", line) for line in OUT_OF_MEMORY_LINES)])
def test_optuna_trials_that_diverged_or_ran_out_of_memory_count_against_their_point(tmp_path, status, error):
    """A trial whose objective ended non-finite (diverged, with train.on_nonfinite=skip), whose run
    stopped at a non-finite loss (failed, with the default stop), or ran out of memory, was told
    failed, and TPE leaves failed trials out: what it proposed next was the same wherever trials
    diverged (or ran out of memory: a larger batch beside them, say). Told pruned, their point
    counts as a bad one; such a trial's record, lost since, is written again as it was."""
    import types

    axes = {"optimizer.lr": sweep_lib.loguniform(1e-4, 1e-2)}

    def next_after_diverged(directory: Path, diverged_lr: float):
        study = _study_past_its_start_up(directory)
        for _ in range(3):
            study.enqueue_trial({"optimizer.lr": diverged_lr})
        trials = sweep_lib.optuna_trials(study, axes, 14)
        for _ in range(3):
            diverged = next(trials)
            sweep_lib.tell(study, sweep_lib.study_trial(study, diverged)[0], status, math.nan, error)
        return study, diverged, next(trials).overrides["optimizer.lr"]

    _, _, proposed = next_after_diverged(tmp_path / "far", 1e-2)
    study, diverged, beside = next_after_diverged(tmp_path / "near", proposed)  # diverged where it goes
    assert beside != proposed

    spec = sweep_lib.SweepSpec("experiment.py", (), {"optimizer.lr": repr(axes["optimizer.lr"])}, "optuna", 14, 0)
    sweep = types.SimpleNamespace(axes=axes, objective="loss", spec=spec,
                                  directory=lambda t: tmp_path / "near" / t.name(axes, numbered=True))
    run = sweep.directory(diverged)
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"steps": 2}}))
    if status == "diverged":  # it ran to the end
        (run / "progress.json").write_text(json.dumps({"committed_step": 2}))
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": null}\n')
    else:
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
        (run / sweep_lib.LOG_FILE).write_text(f"{error}\n")
    sweep_lib.rewrite_lost_records(study, sweep)
    assert trial(run)["status"] == status and trial(run).get("error", "") == error


@pytest.mark.parametrize("error", ["killed by SIGKILL (the system's out-of-memory killer sends it, as does kill -9)",
                                   "llama-jax train: error: the computation failed: INTERNAL: device lost"])
def test_an_optuna_trial_that_failed_otherwise_is_told_failed(error):
    """A trial killed (by the out-of-memory killer, or by hand) or failing for another reason says
    nothing against its point: the study holds it failed."""
    import optuna

    study = optuna.create_study()
    sweep_lib.tell(study, study.ask(), "failed", None, error)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


def test_an_optuna_trial_asked_but_not_given_its_parameters_is_resumed_with_them(tmp_path):
    """A sweep stopped between the study's ask (a RUNNING trial, committed) and the suggestion of its
    parameters left a trial without them; every later run of the sweep failed with a KeyError."""
    axes = {"optimizer.lr": sweep_lib.loguniform(1e-5, 1e-1), "train.seed": sweep_lib.choice(0, 1)}
    study = sweep_lib.open_study(tmp_path, seed=0)
    stopped = study.ask()
    stopped.suggest_float("optimizer.lr", 1e-5, 1e-1, log=True)  # the seed never suggested
    study = sweep_lib.open_study(tmp_path, seed=0)  # the next run of the sweep
    resumed = next(sweep_lib.optuna_trials(study, axes, 2))
    assert resumed.number == stopped.number and resumed.overrides["optimizer.lr"] == stopped.params["optimizer.lr"]
    assert resumed.overrides["train.seed"] in (0, 1)
    assert study.trials[stopped.number].params == resumed.overrides  # recorded in the study, as asked ones are


def test_parallel_trials_each_get_their_own_devices(tmp_path):
    workdir = tmp_path / "sweep"
    assert main(sweep_args(workdir, "--sweep", "train.seed=[0,1]", "--config.train.steps=2", "--parallel", "2",
                           "--devices-per-run", "4")) == 0
    runs = [workdir / "seed=0", workdir / "seed=1"]
    spans = [(trial(r)["started"], trial(r)["ended"]) for r in runs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # both ran at once
    for run in runs:
        checkpoints = RunCheckpoints(run / "checkpoints", every=2, async_save=False, read_only=True)
        assert math.prod(checkpoints.run_info(2)["mesh"].values()) == 4
        checkpoints.close()


def test_the_cpu_device_count_is_the_last_one_xla_flags_gives(tmp_path, capsys, monkeypatch):
    """XLA reads the last --xla_force_host_platform_device_count of XLA_FLAGS (the test setup appends
    its 8 to any the environment gives): the host's count a sweep checks its trials against was the
    first one's."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 "
                                    "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    assert main(sweep_args(tmp_path / "sweep", "--sweep", "train.seed=[0,1]", "--devices-per-run", "64",
                           "--dry-run")) == 2
    assert "--devices-per-run 64: this host has 8 cpu device(s); valid: 1 to 8" in capsys.readouterr().err


def test_a_random_search_is_checked_at_its_draws_not_its_ends():
    """Every trial of a random search is drawn and checked before any runs, and a draw never reaches a
    range's upper end: optimizer.b2 in [0, 1) swept as uniform(0.95, 1.0) is a valid search."""
    spec, axes, trials = sweep_lib.plan_trials(TINY, ["optimizer.b2=uniform(0.95,1.0)"], [], search="random",
                                               trials=3)
    assert len(trials) == 3 and all(0.95 <= t.overrides["optimizer.b2"] < 1.0 for t in trials)


def test_numpy_values_of_get_sweep_are_taken_as_pythons():
    """get_sweep() returning np.logspace(-4, -2, 3) failed every trial: its override read
    "optimizer.lr=np.float64(0.0001)", refused as text ("is float, got 'np.float64(0.0001)' (str)")."""
    import numpy as np

    rates, seeds = sweep_lib.grid(*np.logspace(-4, -2, 3)), sweep_lib.grid(*np.arange(2))
    config = load_config(TINY, [sweep_lib.override_text("optimizer.lr", rates.values[0]),
                                sweep_lib.override_text("train.seed", seeds.values[1])])
    assert (config.optimizer.lr, config.train.seed) == (1e-4, 1)
    assert sweep_lib.int_range(np.int64(0), np.int64(200)) == sweep_lib.int_range(0, 200)  # ("needs two numbers")


def test_a_string_value_reaches_its_trial_as_that_string():
    """A trial's override was `key=value` as written: the string 'None' of --sweep
    "train.sample_prompt=['None']" reached the trial as None, refused with "quote it"."""
    for text in ("None", "null", "nan", "1984", "a=b", "[1]", "x"):
        assert load_config(TINY, [sweep_lib.override_text("train.sample_prompt", text)]).train.sample_prompt == text


@pytest.mark.parametrize("extra, message", [
    (["--sweep", "optimizer.nope=[1,2]"], "unknown config key 'optimizer.nope'"),
    (["--sweep", "optimizer.lr=[1e-3,fast]"], "config key 'optimizer.lr' is float, got 'fast'"),
    (["--sweep", "optimizer.lr=[1e-3"], "cannot parse '\\[1e-3'"),
    (["--sweep", "optimizer.lr=loguniform(0,1)"], "loguniform\\(0, 1\\): needs 0 < low"),
    (["--sweep", "optimizer.lr=uniform(1)"], "needs two numbers"),
    (["--sweep", "train.seed=[]"], "no values, so the sweep would be empty"),
    (["--sweep", "optimizer.lr=uniform(1e-4,1e-3)"], "--search grid needs value lists"),
    (["--sweep", "train.seed=[0,1]", "--search", "random"], "--search random needs --trials N"),
    (["--sweep", "train.seed=[0,1]", "--devices-per-run", "64"], "--devices-per-run 64: this host has 8 cpu"),
    (["--sweep", "train.seed=[0,1]", "--parallel", "3", "--devices-per-run", "4"], "needs 12 cpu devices"),
    (["--sweep", "train.seed=[0,1]", "--devices-per-run", "64", "--dry-run"], "--devices-per-run 64: this host"),
    (["--sweep", "train.seed=[0,1]", "--on", "slurm", "--devices-per-run", "2"],
     "--devices-per-run shares this host among trials; with --on slurm each trial is a job of its own"),
    ([], "no axes: pass --sweep"),
    (["--sweep", "optimizer.lr=[1e-3]", "--sweep", "optimizer.lr=[2e-3]"], "optimizer.lr is swept twice"),
    # a key inside another swept key: each trial set it twice, the second value winning whatever its name said
    (["--sweep", "model.rope_scaling=[{'type':'linear','factor':2.0},{'type':'linear','factor':3.0}]", "--sweep",
      "model.rope_scaling.factor=[4.0,8.0]"], "model.rope_scaling.factor is swept inside the swept model.rope_scaling"),
    (["--sweep", "train.seed=[0,1]", "--trials", "3"], "--trials applies to --search random and optuna"),
    (["--sweep", "train.seed=[0,1]", "--nodes", "2"], "--nodes shapes SLURM jobs; it applies with --on slurm only"),
    (["--sweep", "train.seed=[0,1]", "--gpus-by-gres"], "--gpus-by-gres shapes SLURM jobs; it applies with --on "
                                                         "slurm only"),
    # a base override that every trial's value would replace
    (["--sweep", "optimizer.lr=[1e-3,2e-3]", "--config.optimizer.lr=5e-3"],
     r"--config.optimizer.lr=5e-3 sets the swept key optimizer.lr, .* drop the override or the axis"),
    # every trial's values are checked as `train` checks them, before any trial runs
    (["--sweep", "optimizer.lr=[1e-3,-1]"], r"trial lr=-1: optimizer.lr: got -1.0; valid: a number in \[0, inf\)"),
    (["--sweep", "train.seed=[0]", "--config.train.steps=-5"],
     "trial seed=0: train.steps must be a positive integer, got -5"),
    (["--sweep", "optimizer.name=choice(adamw,sgd)"], "trial name=sgd: optimizer.name: unknown optimizer 'sgd'"),
    (["--sweep", "optimizer.lr=uniform(-1,1)", "--search", "optuna", "--trials", "2"],
     "trial lr=-1: optimizer.lr: got -1.0"),  # an Optuna search is checked at each axis's ends
    (["--sweep", "checkpoint.keep_every=int(3,5)", "--search", "random", "--trials", "2"],
     r"trial t000,keep_every=\d: checkpoint.keep_every=\d is not a multiple of checkpoint.every=2"),
    (["--sweep", "train.seed=[0,1]", "--config.checkpoint.keep_every=3"],
     "trial seed=0: checkpoint.keep_every=3 is not a multiple of checkpoint.every=2"),
    # and against the devices each trial gets (here all 8 CPU devices, or --devices-per-run), --on slurm a job's
    (["--sweep", "train.grad_accum=[1,2]"], "trial grad_accum=2: micro-batch train.batch_size / train.grad_accum = 4 "
                                            "is not divisible by mesh.data x mesh.fsdp = 8"),
    (["--sweep", "mesh.tensor=[1,4]", "--config.mesh.fsdp=-1"],
     "trial tensor=4: model.n_kv_heads=2 is not divisible by mesh.tensor=4"),
    (["--sweep", "mesh.fsdp=[2,4]", "--devices-per-run", "2", "--dry-run"],
     r"trial fsdp=4: mesh: data x fsdp x tensor = 1 x 4 x 1 = 4, but the device count is 2"),
    (["--sweep", "mesh.fsdp=[2,4]", "--on", "slurm", "--gpus-per-node", "4", "--dry-run"],
     r"trial fsdp=2: mesh: data x fsdp x tensor = 1 x 2 x 1 = 2, but the device count is 4"),
    # every trial gets a directory of its own, and a sweep lists its trials before it starts
    (["--sweep", "optimizer.lr=[1e-3,0.001]"], "grid: 0.001 is listed twice; give each value once"),
    (["--sweep", "optimizer.lr=[1,1.0]", "--search", "optuna", "--trials", "2"],  # the study would hold 1.0 as 1
     r"--search optuna: optimizer.lr lists 1 and 1.0, which Optuna holds as one value"),
    (["--sweep", "train.seed=[{[]},2]"], r"trial seed=\{\[\]\}: config key 'train.seed' is int, got '\{\[\]\}'"),
    (["--sweep", "train.sample_prompt=['a\\x00b','c']"], r"grid: 'a\\x00b' holds a NUL character; remove it"),
    (["--sweep", "data.text_key=[a/b,a_b]"], "trials {'data.text_key': 'a/b'} and {'data.text_key': 'a_b'} would "
                                              "share the directory 'text_key=a_b'"),
    (["--sweep", f"train.sample_prompt=[{'x' * 300}]"],
     r"name \(sample_prompt=xxx.*\) would be 314 bytes, over the 255"),
    (["--sweep", f"train.sample_prompt=choice(short,{'x' * 300})", "--search", "optuna", "--trials", "2"],
     r"name \(t001,sample_prompt=xxx.*\) would be 319 bytes, over the 255"),  # Optuna: the longest it could draw
    (["--sweep", f"train.sample_prompt=choice(short,{'x' * 225})", "--sweep", "optimizer.lr=loguniform(1e-5,1e-3)",
      "--search", "optuna", "--trials", "2"], r"would be 257 bytes, over the 255"),  # a draw such as lr=1.234e-05
    (["--sweep", f"train.seed=int(0,{2**64})", "--search", "random", "--trials", "1"],
     r"int\(0, 18446744073709551616\): needs bounds that fit in 64 bits"),
    # the shared data of a raw source is prepared before the first trial: bad input there leaves nothing behind
    (["--sweep", "train.seed=[0]", "--config.data.source=text", "--config.data.files=['/nonexistent/*.txt']",
      "--config.data.tokenizer=train"], r"no file matches '/nonexistent/\*.txt'"),
    ([f"--sweep=train.seed=[{','.join(map(str, range(100)))}]",
      f"--sweep=train.eval_batches=[{','.join(map(str, range(1, 102)))}]"], "the grid has 10,100 trials, over"),
    (["--sweep", "train.seed=int(0,9)", "--search", "random", "--trials", "100000000"], "1 <= N <= 10,000"),
])
def test_bad_sweeps_are_one_line_and_run_nothing(tmp_path, capsys, extra, message):
    import re

    workdir = tmp_path / "sweep"
    assert main(sweep_args(workdir, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("llama-jax sweep: error:") and re.search(message, err), err
    assert not workdir.exists()


def test_what_stands_where_a_trial_goes_is_one_line_and_a_damaged_record_a_row(tmp_path, capsys):
    """A file or a link to nothing where a trial's directory goes: the sweep ran the trials before
    it, then failed with a raw errno (its --dry-run listed the trial as to run); a trial.json that is
    a directory: --report left the trial out, where a damaged one gets a row."""
    workdir = tmp_path / "sweep"
    axis = ["--sweep", "train.seed=[0,1]"]
    spec, _, _ = sweep_lib.prepare(TINY, workdir, axis[1:], SHORT_OVERRIDES)
    workdir.mkdir()
    (workdir / "sweep.json").write_text(spec.to_json())
    (workdir / "seed=1").symlink_to(tmp_path / "gone")
    for dry_run in (["--dry-run"], []):
        assert main(sweep_args(workdir, *axis, *dry_run)) == 2
        assert capsys.readouterr().err.strip() == (f"llama-jax sweep: error: {workdir / 'seed=1'} is a link to "
                                                   f"nothing, where the directory of trial seed=1 goes; move it away")
    (workdir / "seed=1").unlink()
    (workdir / "seed=1").write_text("notes\n")
    assert main(sweep_args(workdir, *axis, "--dry-run")) == 2
    assert "seed=1 is a file, where the directory of trial seed=1 goes" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == ["seed=1", "sweep.json"]  # nothing ran
    (workdir / "seed=1").unlink()
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0  # (it printed an empty table without a word)
    assert capsys.readouterr().err == (f"{workdir}: no trial of this sweep has started yet (no trial directory), so "
                                       f"the table has no rows\n")
    assert rows(workdir) == []
    (workdir / "seed=0" / "trial.json").mkdir(parents=True)
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0
    [row] = rows(workdir)
    assert row["run"] == "seed=0" and row["status"] == "unknown" and "trial.json is damaged" in row["error"]


def test_a_runs_config_json_and_a_failing_get_sweep(tmp_path, capsys):
    """A run's config.json declares no axes; a get_sweep() that raises is one line naming the file."""
    (tmp_path / "config.json").write_text(load_config(TINY).to_json_best_effort())  # as a run writes it
    assert main(["sweep", "--config", str(tmp_path / "config.json"), "--workdir", str(tmp_path / "sweep"),
                 "--sweep", "train.seed=[0,1]", "--dry-run"]) == 0
    assert "seed=1: llama-jax train --config" in capsys.readouterr().out
    failing = tmp_path / "failing.py"
    failing.write_text(Path(TINY).read_text() + "\n\ndef get_sweep():\n    raise RuntimeError('no axes today')\n")
    assert main(["sweep", "--config", str(failing), "--workdir", str(tmp_path / "sweep"), "--dry-run"]) == 2
    line = failing.read_text().splitlines().index("    raise RuntimeError('no axes today')") + 1
    assert capsys.readouterr().err.strip() == (
        f"llama-jax sweep: error: {failing}, line {line}: RuntimeError while calling get_sweep(): no axes today")
    for declared, message in (
            ("{1: [1, 2]}", "get_sweep() has the key 1; its keys are config keys such as"),
            ("{'optimizer.lr': []}", "get_sweep()['optimizer.lr']: grid: no values"),
            ("{'optimizer.lr': 'loguniform(0,1)'}",
             "get_sweep()['optimizer.lr']: optimizer.lr=loguniform(0,1): loguniform(0, 1): needs 0 < low")):
        failing.write_text(Path(TINY).read_text() + f"\n\ndef get_sweep():\n    return {declared}\n")
        assert main(["sweep", "--config", str(failing), "--workdir", str(tmp_path / "sweep"), "--dry-run"]) == 2
        assert capsys.readouterr().err.strip().startswith(f"llama-jax sweep: error: {failing}: {message}")
    assert not (tmp_path / "sweep").exists()


def test_get_sweep_imports_a_module_beside_the_config(tmp_path, capsys):
    """get_sweep() importing a module beside its file (as get_config() may) failed with
    ModuleNotFoundError: the sweep ran the file again without its folder on sys.path."""
    (tmp_path / "my_axes.py").write_text("AXES = {'train.seed': [0, 1]}\n")
    config = tmp_path / "declares.py"
    config.write_text(Path(TINY).read_text() + "\n\ndef get_sweep():\n    import my_axes\n\n    return my_axes.AXES\n")
    assert main(["sweep", "--config", str(config), "--workdir", str(tmp_path / "sweep"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seed=0: llama-jax train --config" in out and "seed=1: llama-jax train --config" in out
    assert str(tmp_path) not in sys.path


def test_values_that_round_alike_get_directories_of_their_own(tmp_path, capsys):
    assert main(sweep_args(tmp_path / "sweep", "--sweep", "optimizer.lr=[1e-3,1.00001e-3,3e-3]", "--dry-run")) == 0
    names = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["lr=0.001", "lr=0.00100001", "lr=0.003"]  # every digit, on this axis only where needed


def test_a_sweep_resumed_from_elsewhere_reads_its_relative_paths_where_it_started(tmp_path):
    """Resumed from another directory, with the config and workdir named from there (`..`), a sweep
    runs its trials in the directory it started in: a relative init_from there names the same
    model for every trial, not the other directory's model of that name."""
    from llama_jax import init_params, save_model
    from llama_jax.experiment import model_config

    cfg = model_config(load_config(TINY).model)
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    for directory, seed in ((started, 0), (elsewhere, 1)):  # a model of the same name and shape in each
        save_model(directory / "base", cfg, init_params(cfg, seed))
    args = ["--sweep", "optimizer.lr=[1e-3,2e-3]", "--config.checkpoint.init_from=base", *SHORT]
    cli = [sys.executable, "-m", "llama_jax.cli", "sweep"]
    first = subprocess.run([*cli, "--config", TINY, "--workdir", "sweep", *args], cwd=started, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(started / "sweep" / "lr=0.002")  # as if the sweep had stopped before this trial
    again = subprocess.run([*cli, "--config", os.path.relpath(TINY, elsewhere), "--workdir", "../started/sweep",
                            *args], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    first_loss = {name: json.loads((started / "sweep" / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
                  for name in ("lr=0.001", "lr=0.002")}
    assert first_loss["lr=0.001"] == first_loss["lr=0.002"], first_loss  # step 1: the same model, data and seed
    assert f"this sweep started in {started}: relative paths in its config and overrides are read from there" \
        in again.stdout
    # its trials keep one copy of the spec, the config file named as it started (the same file, named otherwise
    # here): a lost sweep.json is read from them (they differed, and were refused as of two sweeps)
    copies = [json.loads((started / "sweep" / name / "trial.json").read_text())["sweep"]
              for name in ("lr=0.001", "lr=0.002")]
    assert copies[0] == copies[1] and copies[0]["config"] == str(Path(TINY).absolute())
    (started / "sweep" / "sweep.json").unlink()
    assert sweep_lib.saved_spec(started / "sweep") == copies[0]


def test_paths_given_by_way_of_another_directory_are_recorded_without_it(tmp_path, monkeypatch, capsys):
    """`--config` and `--workdir` given as `../...` from a directory that may be gone by the next
    resume are recorded as the paths they name: every trial's workdir and the shared data.path."""
    (tmp_path / "started").mkdir(), (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["sweep", "--config", os.path.relpath(TINY), "--workdir", "../started/sweep", "--sweep",
                 "optimizer.lr=[1e-3,2e-3]", "--config.data.source=embedded", "--config.data.tokenizer=train",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "started" / "sweep"
    assert f" --workdir {sweep}/lr=0.001 " in out and f"--config.data.path={sweep}/data" in out, out
    assert ".." not in out and "elsewhere" not in out, out


def test_a_sweep_runs_where_it_started_once_a_trial_has(tmp_path, monkeypatch):
    """Before any trial starts, a sweep given again (with other arguments, say) runs where it is
    given; a sweep recorded by an earlier release, without its directory, keeps running where it
    is run, and the guess is not recorded as where it started."""
    workdir, started, elsewhere = tmp_path / "sweep", tmp_path / "started", tmp_path / "elsewhere"
    started.mkdir(), elsewhere.mkdir()
    overrides = [o.removeprefix("--config.") for o in SHORT]
    monkeypatch.chdir(started)
    spec, _, listed = sweep_lib.prepare(TINY, workdir, ["train.seed=[0]"], overrides)
    workdir.mkdir()
    (workdir / "sweep.json").write_text(spec.to_json())
    monkeypatch.chdir(elsewhere)
    said = []
    assert sweep_lib.start_directory(workdir, said.append) == elsewhere and not said
    (workdir / "seed=0").mkdir()
    sweep_lib.write_trial(workdir / "seed=0", listed[0], "running", spec)
    assert sweep_lib.start_directory(workdir, said.append) == started
    assert said == [f"this sweep started in {started}: relative paths in its config and overrides are read from there"]
    earlier = {k: v for k, v in json.loads(spec.to_json()).items() if k != "directory"}
    (workdir / "sweep.json").write_text(json.dumps(earlier))
    assert sweep_lib.start_directory(workdir, said.append) == elsewhere and len(said) == 1
    assert sweep_lib.prepare(TINY, workdir, ["train.seed=[0]"], overrides)[0].directory == ""


def test_a_workdir_holding_another_sweep_is_refused(tmp_path, capsys):
    """Other axes, overrides or config-file settings than the sweep that started trials in the
    workdir are refused; the same axes (or overrides) in another order are the same sweep, with the
    same trial names; a sweep that started no trial may be given again with other arguments."""
    config = tmp_path / "config.py"
    config.write_text(Path(TINY).read_text())
    workdir = tmp_path / "sweep"
    overrides = [o.removeprefix("--config.") for o in SHORT]
    spec, axes, listed = sweep_lib.prepare(str(config), workdir, ["train.seed=[0,1]", "optimizer.lr=[1e-3,2e-3]"],
                                           overrides)
    launched = tmp_path / "launched"  # `launch slurm -- sweep` makes submitit's folder before the job runs the sweep
    (launched / "slurm").mkdir(parents=True)
    sweep_lib.prepare(str(config), launched, ["train.seed=[0,1]"], overrides)
    (launched / "notes.txt").write_text("not the sweep's\n")
    with pytest.raises(sweep_lib.SweepError, match="is not empty and holds no sweep"):
        sweep_lib.prepare(str(config), launched, ["train.seed=[0,1]"], overrides)
    workdir.mkdir()
    (workdir / "sweep.json").write_text(spec.to_json())
    args = ["sweep", "--config", str(config), "--workdir", str(workdir), *SHORT, "--dry-run"]
    assert main([*args, "--sweep", "train.seed=[0,2]"]) == 0  # no trial has started: accepted
    capsys.readouterr()
    (workdir / "seed=0,lr=0.001").mkdir()
    sweep_lib.write_trial(workdir / "seed=0,lr=0.001", listed[0], "running", spec)
    before = sorted(workdir.rglob("*"))

    assert main([*args, "--sweep", "train.seed=[0,2]", "--sweep", "optimizer.lr=[1e-3,2e-3]"]) == 2
    assert "holds a different sweep (not the same axes)" in capsys.readouterr().err
    swapped = sweep_lib.prepare(str(config), workdir, ["optimizer.lr=[1e-3,2e-3]", "train.seed=[0,1]"], overrides)
    assert list(swapped[1]) == ["train.seed", "optimizer.lr"] and swapped[2] == listed
    assert [t.name(swapped[1], False) for t in swapped[2]] == [t.name(axes, False) for t in listed]
    axes_args = ["train.seed=[0,1]", "optimizer.lr=[1e-3,2e-3]"]
    assert sweep_lib.prepare(str(config), workdir, axes_args, overrides[::-1])[2] == listed  # overrides in any order
    with pytest.raises(sweep_lib.SweepError, match=r"not the same overrides"):
        sweep_lib.prepare(str(config), workdir, axes_args, [*overrides, "train.steps=3"])
    for twice in (["train.steps=3", "train.steps=4"], ["data.mixture={'a': {'path': 'x'}}", "data.mixture.a.weight=2"]):
        assert not sweep_lib._same_overrides(twice, twice[::-1])  # a key set twice: the order decides
    recorded = json.loads((workdir / "sweep.json").read_text())
    for damaged in (None, [1, "train.steps=4"]):  # a hand-edited sweep.json
        (workdir / "sweep.json").write_text(json.dumps({**recorded, "overrides": damaged}))
        with pytest.raises(sweep_lib.SweepError, match=r"not the same overrides"):
            sweep_lib.prepare(str(config), workdir, axes_args, overrides)
    (workdir / "sweep.json").write_text(json.dumps(recorded))
    config.write_text(config.read_text().replace("weight_decay=0.01", "weight_decay=0.5"))  # edited between runs
    assert load_config(str(config)).optimizer.weight_decay != load_config(TINY).optimizer.weight_decay
    assert main([*args, "--sweep", "train.seed=[0,1]", "--sweep", "optimizer.lr=[1e-3,2e-3]"]) == 2
    assert "holds a different sweep (not the same config file's settings)" in capsys.readouterr().err
    assert sorted(workdir.rglob("*")) == before


def test_a_different_search_trials_or_seed_is_refused_naming_what_the_sweep_started_with(tmp_path):
    """The refusal named the field that changed but not its value, which the user may no longer have."""
    workdir, axes_args = tmp_path / "sweep", ["optimizer.lr=loguniform(1e-4,1e-2)"]
    spec, _, listed = sweep_lib.prepare(TINY, workdir, axes_args, SHORT_OVERRIDES, "random", trials=2, seed=5)
    workdir.mkdir()
    (workdir / "sweep.json").write_text(spec.to_json())
    (workdir / "t000").mkdir()
    sweep_lib.write_trial(workdir / "t000", listed[0], "done", spec)
    for given, started in [({"search": "random", "trials": 1, "seed": 5},
                            "trials: it started with --trials 2, which a larger --trials extends"),
                           ({"search": "random", "trials": 2, "seed": 0}, "seed: it started with --seed 5"),
                           ({"search": "optuna", "trials": 2, "seed": 5}, "search: it started with --search random")]:
        with pytest.raises(sweep_lib.SweepError) as refused:
            sweep_lib.prepare(TINY, workdir, axes_args, SHORT_OVERRIDES, **given)
        assert str(refused.value) == (f"{workdir} holds a different sweep (not the same {started}); re-run it with "
                                      f"the same arguments and config file, or use another --workdir")
    assert sweep_lib.prepare(TINY, workdir, axes_args, SHORT_OVERRIDES, "random", trials=3, seed=5)[2][:2] == listed


def test_a_key_added_since_a_sweep_started_leaves_its_settings_hash_alone():
    """sweep.json records a hash of the config's settings; a key added to base_config later (with
    its default) must not change it, or every sweep started before would be refused on resume as "a
    different sweep". The hash of the config without the added keys, as sweeps recorded it before
    (sha256 of its sorted JSON), is the hash with them at their defaults; other values count."""
    import hashlib

    from llama_jax.experiment import LATER_KEYS

    config = load_config(TINY)
    before_the_keys = load_config(TINY)
    for key in LATER_KEYS:
        section, name = key.split(".")
        del before_the_keys[section][name]
    recorded = hashlib.sha256(before_the_keys.to_json_best_effort(sort_keys=True).encode()).hexdigest()
    assert sweep_lib.settings_sha256(config) == recorded
    assert sweep_lib.settings_sha256(load_config(TINY, ["train.profile_steps=2"])) != recorded


def test_a_sweep_already_running_in_the_workdir_is_refused(tmp_path, capsys):
    """The same sweep started again while it runs would start its unfinished trials twice: refused
    in one line while another holder has the workdir's lock, and nothing is written."""
    from llama_jax.safe_io import DirectoryLock

    workdir = tmp_path / "sweep"
    workdir.mkdir()
    running = DirectoryLock(workdir, "held by the test")
    running.acquire()
    try:
        assert main(sweep_args(workdir, "--sweep", "train.seed=[0,1]")) == 2
        assert f"--workdir {workdir} is in use: this sweep is already running there" in capsys.readouterr().err
        assert list(workdir.iterdir()) == []
    finally:
        running.release()


def test_a_trial_forked_as_its_sweep_dies_stops(monkeypatch):
    """The trial's setup finds its parent is no longer the sweep (here: a sweep pid that is not its
    parent's) and sends itself SIGTERM, which ends it even where the command line's handler, which
    the fork copied and which holds signals back inside `signals_held`, was in place."""
    from llama_jax import signals
    from llama_jax.safe_io import signals_held

    with monkeypatch.context() as patched:
        patched.setattr(os, "getpid", lambda: 1)  # the pid the setup takes for the sweep's
        setup = signals.child_setup()
    with signals.raising_signals(), signals_held():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"], preexec_fn=setup)
    assert child.wait(timeout=60) == -signal.SIGTERM


def test_a_trial_directory_still_in_use_is_refused_before_anything_runs(tmp_path, capsys):
    """A trial whose process outlived its sweep (a second Ctrl-C, a killed driver) may still be
    saving its step, holding its workdir's lock: a re-run started meanwhile stops at once in one
    line instead of starting that trial again and recording it failed on the lock."""
    from llama_jax.safe_io import DirectoryLock

    workdir = tmp_path / "sweep"
    assert main(sweep_args(workdir, "--sweep", "train.seed=[0,1]")) == 0
    capsys.readouterr()
    (workdir / "seed=1" / "trial.json").write_text(json.dumps({"number": 1, "overrides": {"train.seed": 1},
                                                               "status": "interrupted"}))
    assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0
    assert {row["run"]: row["status"] for row in rows(workdir)} == {"seed=0": "done", "seed=1": "done"}  # (complete)
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    running = DirectoryLock(workdir / "seed=1", "held by the test")
    running.acquire()
    try:
        assert main(sweep_args(workdir, "--sweep", "train.seed=[0,1]")) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"llama-jax sweep: error: {workdir / 'seed=1'} is in use: a llama-jax train is still running "
                       "there (a trial of an earlier sweep process finishing its save?); wait for it to end, then "
                       "run the sweep again"), err
        assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
    finally:
        running.release()
    finished = DirectoryLock(workdir / "seed=0", "held by the test")  # a finished trial, which a re-run skips
    finished.acquire()
    try:
        assert main(sweep_args(workdir, "--sweep", "train.seed=[0,1]")) == 0
    finally:
        finished.release()
    assert trial(workdir / "seed=1")["status"] == "done"


CTRL_C = """
import os, signal, sys, threading, time, json
from pathlib import Path
from llama_jax import cli, sweep

workdir, when = Path(sys.argv[1]), sys.argv[2]

# a trial that takes 20 s to stop after SIGTERM when pressed twice, as a run saving a large checkpoint may
STOPS = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(float(sys.argv[2])), "
         "sys.exit(0))); open(sys.argv[1], 'w').close(); time.sleep(600)")
def trial_command(spec, trial, directory, **_):
    return [sys.executable, "-c", STOPS, str(directory / "started"), "20" if when == "twice" else "0"]
sweep.trial_command = trial_command

def status(directory):
    try:
        return json.loads((directory / "trial.json").read_text())["status"]
    except (OSError, ValueError):
        return None

def press_ctrl_c_twice(directory):
    while not (directory / "started").exists():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 5
    while status(directory) != "interrupted" and time.monotonic() < deadline:
        time.sleep(0.05)
    pressed.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)  # while the sweep waits for its trial to stop

class CtrlCAtTheStart(sweep.Running):
    def __init__(self, *args):  # the trial's process is running, not yet in the sweep's list
        os.kill(os.getpid(), signal.SIGINT)
        super().__init__(*args)

pressed = []  # when the second Ctrl-C was sent
if when == "twice":
    threading.Thread(target=press_ctrl_c_twice, args=(workdir / "seed=0",), daemon=True).start()
else:
    sweep.Running = CtrlCAtTheStart
code = cli.main([*sys.argv[3:], "--workdir", str(workdir)])
# the sweep ended without waiting the 20 s its trial takes to stop after a second Ctrl-C
quick = time.monotonic() - pressed[-1] < 15 if pressed else when != "twice"
print(code, status(workdir / "seed=0"), quick, flush=True)
"""


@pytest.mark.parametrize("when", ["twice", "at_the_start"])
def test_ctrl_c_leaves_the_trial_recorded_as_interrupted(tmp_path, when):
    """The first Ctrl-C asks the trials to save and stop; a second one ends the sweep without
    waiting for them (`twice`). Either way, and also for a Ctrl-C that lands just as a trial's
    process has started (`at_the_start`), their records say `interrupted`, not `running`."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C)
    command = [sys.executable, str(script), str(tmp_path / "sweep"), when, "sweep", "--config", TINY, *SHORT,
               "--sweep", "train.seed=[0]"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        out, err = driver.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the trial, still stopping
    assert out.splitlines() == ["[0] started seed=0", "130 interrupted True"], (out, err)
    assert err == "llama-jax sweep: interrupted\n", err


def test_a_sweep_submitted_to_slurm_as_a_job_array(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "sweep"
    args = sweep_args(workdir, "--sweep", "train.seed=[0,1,2]", "--on", "slurm", "--gpus-per-node", "4",
                      "--partition", "gpu")
    assert main([*args, "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-2%3" in script and "#SBATCH --gpus-per-node=4" in script
    assert f"--workdir {workdir / 'seed=2'} " in script and f"{workdir / 'slurm'}/%A_%a_0_log.out" in script
    assert not workdir.exists()
    assert main([*args, "--save-time-s", "300", "--time-min", "11", "--dry-run"]) == 0  # (launch slurm's option)
    assert "#SBATCH --signal=USR2@310" in capsys.readouterr().out.splitlines()
    assert main([*args, "--gpus-by-gres", "--dry-run"]) == 0  # (launch slurm's option)
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --gres=gpu:4" in lines and not [line for line in lines if "gpus-per-node" in line]
    quoted = tmp_path / "it's a sweep"  # the script shown is valid shell, as the one submitted
    assert main([*sweep_args(quoted, "--sweep", "train.seed=[0,1]", "--on", "slurm"), "--dry-run"]) == 0
    srun = shlex.split(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("srun ")))
    assert srun[srun.index("--output") + 1] == f"{quoted}/slurm/%A_%a_%t_log.out" and srun[-1] == f"{quoted}/slurm"
    assert not quoted.exists()

    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no sbatch: nothing submitted, and no workdir left
    assert main(args) == 2
    assert not workdir.exists()
    monkeypatch.setenv("PATH", path)

    bin_dir = tmp_path / "bin"  # a fake sbatch answering a job id (submitit also wants srun on PATH)
    bin_dir.mkdir()
    for name, text in (("sbatch", "#!/bin/sh\necho 'Submitted batch job 77'\n"), ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(args) == 0
    assert "submitted 3 trial(s) as SLURM job array 77" in capsys.readouterr().out
    assert [trial(workdir / f"seed={i}")["job"] for i in range(3)] == ["77_0", "77_1", "77_2"]
    with warnings.catch_warnings(record=True) as caught:  # no run has a loss curve yet
        warnings.simplefilter("always")
        assert main(["sweep", "--workdir", str(workdir), "--report"]) == 0
    assert [str(w.message) for w in caught if w.filename.endswith("results.py")] == []
    assert [r["status"] for r in rows(workdir)] == ["submitted"] * 3
    assert (workdir / "loss_curves.png").is_file()

    # submitted again: only the trial whose job SLURM no longer lists (a fake squeue lists the others)
    (bin_dir / "squeue").write_text("#!/bin/sh\nprintf '12_0\\n77_0\\n77_1\\n'\n")
    (bin_dir / "squeue").chmod(0o755)
    capsys.readouterr()
    assert main(args) == 0
    assert "submitted 1 trial(s) as SLURM job array 77; 2 trial(s) still queued or running (jobs 77_0, 77_1) are " \
           "not submitted again" in capsys.readouterr().out
    assert [trial(workdir / f"seed={i}")["job"] for i in range(2)] == ["77_0", "77_1"]
    spec = (workdir / "sweep.json").read_text()
    (workdir / "sweep.json").unlink()  # lost: read from the trials' copy, and written again with nothing to submit
    (bin_dir / "squeue").write_text("#!/bin/sh\nprintf '77_0\\n77_1\\n%s\\n'\n" % trial(workdir / "seed=2")["job"])
    assert main(args) == 0
    assert "has finished or is queued" in capsys.readouterr().out
    assert (workdir / "sweep.json").read_text() == spec
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller' >&2\n"
                                    "exit 1\n")
    assert main(args) == 2  # whether the jobs still run is unknown: nothing is submitted
    assert "squeue could not list this user's jobs (slurm_load_jobs error: Unable to contact slurm controller)" \
        in capsys.readouterr().err
    assert main([*args, "--dry-run"]) == 0  # a dry run (away from the cluster) shows them as to be submitted
    assert "#SBATCH --array=0-2%3" in capsys.readouterr().out


def test_the_lr_warmup_sweep_script_takes_flags_with_or_without_a_workdir(tmp_path):
    """experiments/lr_warmup_sweep.sh [WORKDIR] [sweep flags]: a first argument that is a flag is
    one (it was taken for the workdir)."""
    env = {**os.environ, "LLAMA_JAX": str(Path(sys.executable).parent / "llama-jax"), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    script = str(ROOT / "experiments" / "lr_warmup_sweep.sh")
    cases = {("--dry-run",): tmp_path / "runs" / "lr-warmup-sweep", (str(tmp_path / "w"), "--dry-run"): tmp_path / "w"}
    for args, workdir in cases.items():
        out = subprocess.run(["bash", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert f"--workdir {workdir}/lr=0.01,warmup_steps=50 " in out.stdout
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
    # --report: the sweep's own (it was refused for the --config and --parallel the script adds)
    report = subprocess.run(["bash", script, str(tmp_path / "w"), "--report"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 2 and report.stderr.strip() == (
        f"llama-jax sweep: error: {tmp_path / 'w'} holds no sweep (sweep.json not found); give the --workdir of a "
        f"sweep"), report.stderr
    missing = subprocess.run(["bash", script, "--dry-run"], cwd=tmp_path, env={**env, "LLAMA_JAX": "/nonexistent"},
                             capture_output=True, text=True, timeout=300)  # (bash's "No such file or directory")
    assert missing.returncode == 2 and missing.stderr == ("lr_warmup_sweep.sh: error: LLAMA_JAX=/nonexistent is not a "
                                                          "command; give the path of llama-jax, or unset it\n")


def test_a_finished_trial_whose_log_lost_its_last_step_is_not_ranked_by_an_earlier_one(tmp_path):
    """A finished trial's metrics.jsonl cut short (or removed) gave an earlier step's loss as its
    final one, and ranked it by that, without a word."""
    from llama_jax.results import collect

    losses = {"a": [4.0, 3.0, 2.0, 1.5], "b": [4.0, 3.0, 2.5, 1.8], "c": [4.0, 3.0, 2.5, None]}  # c: diverged
    made = sweep_lib.SweepSpec("experiment.py", (), {"train.seed": "Grid(values=('a', 'b', 'c'))"}, "grid", None, 0)
    for name, values in losses.items():
        run = tmp_path / name
        run.mkdir()
        sweep_lib.write_trial(run, sweep_lib.Trial(0, {"train.seed": name}), "done", made)
        (run / "config.json").write_text(json.dumps({"train": {"steps": 4}}))
        (run / "progress.json").write_text(json.dumps({"committed_step": 4}))
        speeds = {2: 100.0, 3: 110.0, 4: 30.0}  # (none for the first step; the last window held a save)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": v, **(
            {"tokens_per_second": speeds[s]} if s in speeds else {})}) + "\n" for s, v in enumerate(values, start=1)))
    spec = {"axes": {"train.seed": ["a", "b", "c"]}, "objective": "loss"}
    rows = collect(tmp_path, spec)[1]
    assert [(r["run"], r["final_train_loss"], r["error"]) for r in rows[:2]] == [("a", 1.5, ""), ("b", 1.8, "")]
    assert rows[0]["tokens_per_second"] == 100.0  # the median of the run's figures, not the last one
    assert rows[2]["run"] == "c" and math.isnan(rows[2]["final_train_loss"]) and rows[2]["error"] == ""
    log = tmp_path / "a" / "metrics.jsonl"
    log.write_text(log.read_text()[:-10])  # the last line cut short
    rows = collect(tmp_path, spec)[1]
    assert [(r["run"], r["final_train_loss"], r["objective"]) for r in rows[:2]] == [("b", 1.8, 1.8), ("a", None, None)]
    assert rows[1]["error"] == (f"{log} holds no training record of the last step, 4 (damaged or removed): the run's "
                                f"final values are left out")
    # a run that evaluated, whose closing evaluation record is lost: its objective is not an earlier evaluation's
    log = tmp_path / "b" / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [*map(json.loads, log.read_text().splitlines()),
                                                            {"step": 2, "eval_loss": 3.5}]))
    row = next(r for r in collect(tmp_path, {**spec, "objective": "eval_loss"})[1] if r["run"] == "b")
    assert (row["final_train_loss"], row["final_eval_loss"], row["objective"]) == (1.8, None, None)
    assert row["error"] == (f"{log} holds no evaluation record of the last step, 4 (damaged or removed): the run's "
                            f"final values are left out")
    (tmp_path / "b" / "trial.json").write_text('{"number": 0, "overr')  # a trial record cut short
    rows = {r["run"]: r for r in collect(tmp_path, spec)[1]}
    damaged = f"{tmp_path / 'b' / 'trial.json'} is damaged; run the sweep command again to rewrite it"
    assert (rows["b"]["status"], rows["b"]["error"]) == ("unknown", damaged)  # (rewritten: test_random_and_optuna...)
    assert sweep_lib.trial_statuses(tmp_path) == ["done", "unknown", "done"]  # (as a sweep's end reads them)
    # valid JSON of the wrong shape is damage too (each was a traceback in --report and at a sweep's end)
    for record in ('{"number": 0, "overrides": "x", "status": "done"}', '{"number": 0, "overrides": {}, "status": 3}',
                   '{"number": 0, "overrides": {}, "status": "done", "error": 5}', '[1]'):
        (tmp_path / "b" / "trial.json").write_text(record)
        rows = {r["run"]: r for r in collect(tmp_path, spec)[1]}
        assert (rows["b"]["status"], rows["b"]["error"]) == ("unknown", damaged), record
    for name, text in (("progress.json", '{"committed_step": "abc"}'), ("config.json", '{"train": 5}')):
        (tmp_path / "c" / name).write_text(text)  # c: its committed step or its target unknown, so its steps
        row = next(r for r in collect(tmp_path, spec)[1] if r["run"] == "c")  # are those its log holds
        assert (row["status"], row["steps"]) == ("done", 3), name


def test_help_states_the_search_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "grid (default): every combination" in shown and "random and optuna searches (default 0)" in shown
    assert "at once on this host (default 1)" in shown
