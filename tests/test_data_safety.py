"""Nothing a user does loses work: damaged checkpoints and model directories are reported in one
line (and a run resumes from the intact step when asked), destinations never swallow their
inputs, and a run keeps the tokenizer it started with."""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax import LLaMAConfig, init_params, load_model, save_model
from llama_jax import run as run_lib
from llama_jax.checkpoint import RunCheckpoints
from llama_jax.cli import main
from llama_jax.experiment import load_config
from llama_jax.train import build_trainer
from llama_jax.data import EmbeddedCorpus
from llama_jax.safe_io import sha256_file
from llama_jax.tokenizer import train_sentencepiece

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
RUN = ["--config.train.steps=4", "--config.checkpoint.every=2", "--config.optimizer.warmup_steps=1",
       "--config.train.batch_size=8", "--config.train.log_every=1", "--config.checkpoint.async_save=False"]


def train(workdir, *extra) -> int:
    return main(["train", "--config", TINY, "--workdir", str(workdir), *RUN, *extra])


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"llama-jax {command}: error: "), err
    return err


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:max(1, path.stat().st_size // 2)])
    else:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    """A 4-step run with committed checkpoints 2 and 4, and its step-4 parameters exported."""
    root = tmp_path_factory.mktemp("pristine")
    assert train(root / "run") == 0
    assert main(["export", "--workdir", str(root / "run"), str(root / "exported")]) == 0
    return root / "run", load_model(root / "exported")[1]


def saved_state(workdir: Path):
    """The full train state of checkpoint 4 of `workdir`, on the host."""
    trainer = build_trainer(load_config(TINY, [o[len("--config."):] for o in RUN]))
    checkpoints = RunCheckpoints(workdir / "checkpoints", every=2, async_save=False, read_only=True)
    try:
        return jax.device_get(checkpoints.restore_state(4, run_lib.abstract_state(trainer)))
    finally:
        checkpoints.close()


def step_entries(run: Path, step: int) -> list[str]:
    step_dir = run / "checkpoints" / str(step)
    return [str(p.relative_to(step_dir)) for p in sorted(step_dir.rglob("*"))]


def test_damage_to_each_file_of_the_latest_checkpoint(tmp_path, pristine_run, capsys):
    """Each file of checkpoint 4 emptied, truncated or removed (and each sub-directory removed):
    resume reports one line naming checkpoint 4 and the intact checkpoint 2, or, when Orbax does
    not need the damaged file, restores exactly the saved state. Never a traceback, never a fresh start."""
    run, _ = pristine_run
    pristine_state = saved_state(run)
    entries = step_entries(run, 4)
    assert len(entries) > 10
    reported = 0
    for entry in entries:
        hows = ("empty", "truncated") if (run / "checkpoints" / "4" / entry).is_file() else ("removed",)
        for how in hows:
            if how == "truncated" and (run / "checkpoints" / "4" / entry).stat().st_size < 2:
                continue
            workdir = tmp_path / f"{how}-{entry.replace('/', '_')}"
            shutil.copytree(run, workdir)
            damage(workdir / "checkpoints" / "4" / entry, how)
            capsys.readouterr()
            code = train(workdir)
            if code == 2:
                err = one_line_error(capsys, "train")
                assert re.search(r"checkpoint 4 .*(damaged|missing).*checkpoint 2 is intact: rerun with --resume-from 2",
                                 err), (entry, how, err)
                if entry == "state/_METADATA":  # (Orbax's own report of it named no file)
                    assert f"{workdir}/checkpoints/4/state/_METADATA is " in err, err
                reported += 1
            else:  # the damaged file is one this restore does not read: the whole state must be intact
                assert code == 0, (entry, how)
                jax.tree.map(np.testing.assert_array_equal, saved_state(workdir), pristine_state)
            shutil.rmtree(workdir)
    assert reported >= len(entries) // 2  # most damage is detected, not tolerated by luck


def test_resume_from_the_intact_step_after_damage(tmp_path, pristine_run, capsys):
    run, exported = pristine_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    data_files = [p for p in files_under(workdir / "checkpoints" / "4" / "state") if p.parent.name == "d"]
    damage(data_files[0], "truncated")
    assert train(workdir) == 2
    one_line_error(capsys, "train")
    assert train(workdir, "--resume-from", "2") == 0
    out = capsys.readouterr().out
    assert "resuming from checkpoint 2; checkpoints moved to " in out and "checkpoints-set-aside: 4\n" in out
    assert (workdir / "checkpoints-set-aside" / "4").is_dir()  # set aside, not deleted
    # The log holds each step once, as trained again; the abandoned steps' records are set aside.
    assert "the 2 metrics records of steps 3-4 logged after it moved to" in out
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    aside = (workdir / "checkpoints-set-aside" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside] == [3, 4]
    assert json.loads((workdir / "progress.json").read_text()) == {"committed_step": 4}
    assert main(["export", "--workdir", str(workdir), str(tmp_path / "model")]) == 0
    # Steps 3 and 4 trained again from checkpoint 2 give the same parameters, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, load_model(tmp_path / "model")[1], exported)


def test_a_step_set_aside_is_named_where_it_went(tmp_path, pristine_run, capsys):
    """After a --resume-from 2 that trained to step 3 only, step 4 lies in checkpoints-set-aside/:
    asked for, it is named there (the message listed the run's steps alone). The `eval` results of
    steps 3 and 4 go there too: they score checkpoints the run no longer continues from (they
    stayed, and read as the scores of the new checkpoints; an eval of the new step 4 replaced them)."""
    run, _ = pristine_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    results = ["eval-2.json", "eval-3.json", "eval-4.json", "eval-4-0123abcd.json", "eval-notes.json"]
    for name in results:
        (workdir / name).write_text(json.dumps({"name": name}))
    (workdir / "checkpoints-set-aside").mkdir()
    (workdir / "checkpoints-set-aside" / "eval-4.json").write_text("an earlier resume's\n")
    assert train(workdir, "--resume-from", "2", "--config.train.steps=3") == 0, capsys.readouterr().err
    assert (f"eval results of steps after 2 moved to {workdir / 'checkpoints-set-aside'}: eval-3.json, "
            f"eval-4-0123abcd.json, eval-4.json\n") in capsys.readouterr().out
    assert sorted(p.name for p in workdir.glob("eval-*.json")) == ["eval-2.json", "eval-notes.json"]
    aside = workdir / "checkpoints-set-aside"
    assert [json.loads((aside / name).read_text())["name"] for name in ("eval-3.json", "eval-4-0123abcd.json",
                                                                         "eval-4.json+")] == \
        ["eval-3.json", "eval-4-0123abcd.json", "eval-4.json"]
    assert (aside / "eval-4.json").read_text() == "an earlier resume's\n"
    assert main(["export", "--workdir", str(workdir), "--step", "4", str(tmp_path / "model")]) == 2
    assert one_line_error(capsys, "export").endswith(
        f"{workdir} has no checkpoint of step 4; valid: 2, 3 (a --resume-from of an earlier step moved step 4 to "
        f"{workdir / 'checkpoints-set-aside' / '4'}, out of the run)")
    assert not (tmp_path / "model").exists()


def test_a_metrics_line_that_is_not_utf8_is_kept_as_it_is(tmp_path, pristine_run, capsys):
    """A damaged (non-UTF-8) line in metrics.jsonl neither stops a resume nor is lost: it stays,
    byte for byte, where the records of steps after the checkpoint are moved away from."""
    run, exported = pristine_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    with open(workdir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": \xff}\n')
    assert train(workdir, "--resume-from", "2") == 0, capsys.readouterr().err
    assert b'{"step": \xff}\n' in (workdir / "metrics.jsonl").read_bytes()
    aside = (workdir / "checkpoints-set-aside" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside] == [3, 4]
    assert main(["export", "--workdir", str(workdir), str(tmp_path / "model")]) == 0
    jax.tree.map(np.testing.assert_array_equal, load_model(tmp_path / "model")[1], exported)


def test_a_signal_once_the_export_is_in_place_changes_nothing(tmp_path, pristine_run, monkeypatch, capsys):
    """SIGTERM after the exported directory is in place (while the closing line counts the
    parameters, which traces the model) ends the export as done: exit 0 and its line, not
    "terminated" over a complete output that a rerun would then refuse to overwrite."""
    import llama_jax

    run, exported = pristine_run
    count = llama_jax.param_count

    def signalled_count(model):
        os.kill(os.getpid(), signal.SIGTERM)
        return count(model)

    def own_handler(signum, frame):  # a program of one's own calling main(), with its own Ctrl-C handler
        raise AssertionError("not called")

    monkeypatch.setattr(llama_jax, "param_count", signalled_count)
    previous = signal.signal(signal.SIGINT, own_handler)
    try:
        assert main(["export", "--workdir", str(run), str(tmp_path / "model")]) == 0
        assert signal.getsignal(signal.SIGINT) is own_handler  # left as it was
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().out.startswith(f"exported step 4 of {run} (")
    jax.tree.map(np.testing.assert_array_equal, load_model(tmp_path / "model")[1], exported)


def test_the_command_export_suggests_reads_its_destination_as_an_argument(pristine_run, tmp_path, monkeypatch,
                                                                         capsys):
    """A destination named `-m` was suggested as `convert ... -m DST`, where `-m` reads as an option."""
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--workdir", str(pristine_run[0]), "--", "-m"]) == 0
    assert "; llama-jax convert --from jax --to hf ./-m DST makes a Hugging Face checkpoint of it" in \
        capsys.readouterr().out
    assert load_model(tmp_path / "-m")[0].n_layers > 0


@pytest.mark.parametrize("damage_done", ["removed", "garbled"])
def test_a_run_without_its_config_json_says_where_the_config_is_kept(tmp_path, pristine_run, capsys, damage_done):
    """A run whose config.json was lost is not taken for a foreign directory: the error names the
    copy of the config its latest checkpoint keeps, and writing that back resumes the run."""
    run, _ = pristine_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    if damage_done == "removed":
        (workdir / "config.json").unlink()
    else:
        (workdir / "config.json").write_text('{"model": ')
    before = snapshot(workdir)
    assert train(workdir) == 2
    err = one_line_error(capsys, "train")
    kept = workdir / "checkpoints" / "4" / "run" / "metadata"
    assert f"but its config.json is {'missing' if damage_done == 'removed' else 'damaged'}" in err, err
    assert f'the "config" entry of {kept}' in err and err.endswith("or use another --workdir"), err
    assert main(["eval", "--workdir", str(workdir)]) == 2
    assert one_line_error(capsys, "eval").endswith(f"{workdir / 'config.json'}, or give the run's config with "
                                                   "--config CONFIG")
    assert snapshot(workdir) == before
    (workdir / "config.json").write_text(json.dumps(json.loads(kept.read_text())["config"]))
    assert train(workdir) == 0, capsys.readouterr().err


@pytest.mark.parametrize("removed", ["checkpoints/4", "checkpoints"])
def test_a_run_whose_checkpoints_vanished_does_not_start_over(tmp_path, pristine_run, capsys, removed):
    run, _ = pristine_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    shutil.rmtree(workdir / removed)
    before = snapshot(workdir)
    assert train(workdir) == 2
    err = one_line_error(capsys, "train")
    assert "checkpoint 4 of" in err and "is missing" in err
    assert ("checkpoint 2 is intact" if removed == "checkpoints/4" else "to start over, use a new --workdir") in err
    assert snapshot(workdir) == before


def test_damaged_earlier_checkpoint_is_named_by_export(tmp_path, pristine_run, capsys):
    run, _ = pristine_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    for path in files_under(workdir / "checkpoints" / "2" / "state"):
        damage(path, "empty")
    assert train(workdir) == 0  # the latest checkpoint is intact: resume is unaffected
    capsys.readouterr()
    assert main(["export", "--workdir", str(workdir), "--step", "2", str(tmp_path / "model")]) == 2
    assert re.search(r"checkpoint 2 \(.*\) is damaged: cannot read its parameters", one_line_error(capsys, "export"))
    assert not (tmp_path / "model").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small model directory with its SentencePiece tokenizer, and its greedy continuation."""
    root = tmp_path_factory.mktemp("model")
    corpus = EmbeddedCorpus()
    tokenizer = train_sentencepiece((corpus[i] for i in range(len(corpus))), root / "tok" / "tokenizer.model", 512)
    cfg = LLaMAConfig.from_preset("debug")
    path = save_model(root / "model", cfg, init_params(cfg, 0), tokenizer=tokenizer)
    return path


def generate_args(model: Path) -> list[str]:
    return ["generate", str(model), "--prompt", "The", "--max-new-tokens", "4", "--temperature", "0"]


def test_damage_to_each_file_of_a_model_directory(tmp_path, model_dir, capsys):
    """generate and convert --from jax on a model directory with any file emptied or truncated (or
    params/ sub-directories removed): one line, or the same output as the intact directory."""
    assert main(generate_args(model_dir)) == 0
    expected = capsys.readouterr().out
    entries = [str(p.relative_to(model_dir)) for p in sorted(model_dir.rglob("*"))
               if p.name != "tokenizer.model"]
    for entry in entries:
        for how in (("empty", "truncated") if (model_dir / entry).is_file() else ("removed",)):
            damaged = tmp_path / "damaged"
            shutil.copytree(model_dir, damaged)
            damage(damaged / entry, how)
            code = main(generate_args(damaged))
            if code == 0:
                assert capsys.readouterr().out == expected, (entry, how)
            else:
                assert code == 2
                assert str(damaged) in one_line_error(capsys, "generate"), (entry, how)
            code = main(["convert", "--from", "jax", "--to", "hf", str(damaged), str(tmp_path / "hf")])
            if code == 2:
                one_line_error(capsys, "convert")
                assert not (tmp_path / "hf").exists()
            else:
                assert code == 0, (entry, how)
                capsys.readouterr()
                shutil.rmtree(tmp_path / "hf")
            assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no temporary leftovers
            shutil.rmtree(damaged)


# ---- destinations -----------------------------------------------------------------------------


def test_export_never_replaces_its_run_or_a_directory_holding_it(tmp_path, pristine_run, capsys):
    run, _ = pristine_run
    workdir = tmp_path / "runs" / "a"
    shutil.copytree(run, workdir)
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    inside_checkpoints = "the checkpoints of a run; choose a destination outside it"
    for dst, message in [(workdir, "is the input"), (tmp_path / "runs", "contains the input"),
                         (workdir / "checkpoints", inside_checkpoints),
                         (workdir / "checkpoints" / "4", inside_checkpoints),
                         (workdir / "checkpoints" / "10", inside_checkpoints)]:
        assert main(["export", "--workdir", str(workdir), "--overwrite", str(dst)]) == 2
        assert message in one_line_error(capsys, "export"), dst
    assert snapshot(tmp_path) == before
    # Inside the run is fine for a new directory, and --overwrite then replaces that model directory.
    for _ in range(2):
        assert main(["export", "--workdir", str(workdir), "--overwrite", str(workdir / "final")]) == 0
    assert load_model(workdir / "final")[0].dim == 64


def test_convert_never_replaces_its_source_or_foreign_files(tmp_path, model_dir, capsys):
    src = tmp_path / "models" / "m"
    shutil.copytree(model_dir, src)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "README.md").write_text("not a checkpoint")
    before = snapshot(tmp_path)
    for dst, message in [(src, "is the input"), (tmp_path / "models", "contains the input"),
                         (other, "holds 'README.md'"), (other / "README.md" / "x", "is a file, not a directory")]:
        assert main(["convert", "--from", "jax", "--to", "hf", "--overwrite", str(src), str(dst)]) == 2
        assert message in one_line_error(capsys, "convert"), dst
    assert snapshot(tmp_path) == before
    assert main(["convert", "--from", "jax", "--to", "hf", str(src), str(tmp_path / "hf")]) == 0
    assert main(["convert", "--from", "jax", "--to", "meta", str(src), str(tmp_path / "hf")]) == 2
    assert "holds 'config.json'" in one_line_error(capsys, "convert")  # (not "pass --overwrite": it would not help)
    assert main(["convert", "--from", "jax", "--to", "meta", "--overwrite", str(src), str(tmp_path / "hf")]) == 2
    assert "holds 'config.json'" in one_line_error(capsys, "convert")  # an HF directory is not a Meta one
    assert main(["convert", "--from", "jax", "--to", "hf", "--overwrite", str(src), str(tmp_path / "hf")]) == 0
    model_files = snapshot(src)
    assert main(["convert", "--from", "jax", "--to", "hf", str(src), str(src / "hf")]) == 0  # inside: a new entry
    assert {k: v for k, v in snapshot(src).items() if not k.startswith("hf")} == model_files


def test_save_model_never_replaces_its_tokenizer_source_or_a_run(tmp_path, model_dir, pristine_run):
    cfg, params = load_model(model_dir)
    tok = tmp_path / "tok"
    shutil.copytree(model_dir.parent / "tok", tok)
    with pytest.raises(ValueError, match="is the input"):
        save_model(tok, cfg, params, tokenizer=tok, overwrite=True)
    with pytest.raises(ValueError, match="contains the input"):
        save_model(tmp_path, cfg, params, tokenizer=tok, overwrite=True)
    run = tmp_path / "run"
    shutil.copytree(pristine_run[0], run)
    with pytest.raises(ValueError, match="holds 'checkpoints'"):
        save_model(run, cfg, params, overwrite=True)
    assert sorted(p.name for p in tok.iterdir()) == ["tokenizer.model"] and (run / "checkpoints").is_dir()


@pytest.mark.parametrize("where", ["model directory", "inside a file", "hf directory"])
def test_a_run_never_writes_over_what_it_did_not_make(tmp_path, model_dir, capsys, where):
    workdir = {"model directory": tmp_path / "model", "inside a file": tmp_path / "file" / "run",
               "hf directory": tmp_path / "hf"}[where]
    shutil.copytree(model_dir, tmp_path / "model")
    (tmp_path / "file").write_text("x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = snapshot(tmp_path)
    assert train(workdir) == 2
    assert re.search("is a file, not a directory|holds '(config.json|model_config.json|tokenizer.model)' but no "
                     "llama-jax run", one_line_error(capsys, "train"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["data.partial", "tokenizer_files.partial"])
def test_a_new_run_leaves_a_folder_named_as_its_scratch_alone(tmp_path, capsys, name):
    """A run assembles its data and its model's tokenizer files in WORKDIR/data.partial and
    WORKDIR/tokenizer_files.partial, removing what is there first: a folder of one's own of that
    name in the directory given as --workdir was deleted without a word."""
    (tmp_path / "mine" / name).mkdir(parents=True)
    (tmp_path / "mine" / name / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    assert train(tmp_path / "mine") == 2
    assert one_line_error(capsys, "train").endswith(
        f"--workdir {tmp_path / 'mine'} holds {name!r} but no llama-jax run (a run writes config.json, checkpoints/, "
        "metrics.jsonl there); use a new or empty directory")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("layout", ["model inside the run", "run inside the model"])
def test_a_run_next_to_its_init_from_directory_leaves_the_model_alone(tmp_path, model_dir, layout):
    """finetune_hf.sh keeps the converted model in RUN/init: a run directory may hold models (and
    a run inside a model directory only adds that entry to it)."""
    run, model = (tmp_path / "run", tmp_path / "run" / "init") if layout == "model inside the run" \
        else (tmp_path / "model" / "run", tmp_path / "model")
    shutil.copytree(model_dir, model)
    before = snapshot(model)
    assert train(run, "--config.model.preset=init_from", f"--config.checkpoint.init_from={model}",
                 "--config.model.vocab_size=None", "--config.model.ffn_dim=None", "--config.model.max_seq_len=None") == 0
    assert {k: v for k, v in snapshot(model).items() if not k.startswith("run")} == before


def test_a_fine_tune_resumes_exactly_after_its_init_from_directory_is_gone(tmp_path, model_dir, capsys):
    """The architecture of a model.preset=init_from run comes from its checkpoints once it has one,
    and its tokenizer from the run's copy: the model directory it started from, tokenizer included
    (as experiments/finetune_hf.sh sets it up), may be moved or deleted before a resume."""
    shutil.copytree(model_dir, tmp_path / "model")
    fine_tune = ["--config.model.preset=init_from", f"--config.checkpoint.init_from={tmp_path / 'model'}",
                 "--config.model.vocab_size=None", "--config.model.ffn_dim=None", "--config.model.max_seq_len=None",
                 "--config.data.source=embedded", f"--config.data.tokenizer={tmp_path / 'model' / 'tokenizer.model'}"]
    assert train(tmp_path / "run", *fine_tune) == 0
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "model")
    capsys.readouterr()
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path / "again"), *RUN, *fine_tune,
                 "--resume-from", "2"]) == 0
    assert f"no longer exists; using the run's copy of it ({tmp_path / 'again' / 'tokenizer.model'})" in capsys.readouterr().out
    once, resumed = (run_lib.read_checkpoint_params(tmp_path / run, 4)[3] for run in ("run", "again"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(resumed)))


def test_reading_a_live_run_is_not_misled_by_its_retention(tmp_path, pristine_run, monkeypatch):
    """A run training with max_to_keep=1 may hold no committed checkpoint for a moment, and deletes
    old steps while a reader looks at them: neither is "no checkpoint" nor a permission problem."""
    from llama_jax import safe_io

    run = tmp_path / "run"
    shutil.copytree(pristine_run[0], run)
    lock = safe_io.DirectoryLock(run, "busy")
    lock.acquire()  # as the run training there holds it
    try:
        (run / "checkpoints").rename(tmp_path / "aside")
        threading.Timer(0.5, lambda: (tmp_path / "aside").rename(run / "checkpoints")).start()
        assert run_lib.read_checkpoint_params(run)[0] == 4
    finally:
        lock.release()
    access = os.access

    def removed_while_checked(path, mode):  # the retention deletes a step between listing and checking
        shutil.rmtree(run / "checkpoints" / "2", ignore_errors=True)
        return access(path, mode)

    monkeypatch.setattr(safe_io.os, "access", removed_while_checked)
    assert safe_io.unreadable_path(run / "checkpoints" / "2") is None
    monkeypatch.undo()
    # opening the checkpoints looks at every step: one the retention deleted meanwhile (not the step
    # read, which is still there) is read again, also for an explicit step
    opened = run_lib.RunCheckpoints.__init__
    gone = []

    def older_step_removed_while_opening(self, *args, **kwargs):
        if not gone:
            gone.append(True)
            raise FileNotFoundError(2, "No such file or directory", str(run / "checkpoints" / "2"))
        opened(self, *args, **kwargs)

    monkeypatch.setattr(run_lib.RunCheckpoints, "__init__", older_step_removed_while_opening)
    lock.acquire()
    try:
        assert run_lib.read_checkpoint_params(run, step=4)[0] == 4 and gone
    finally:
        lock.release()


# ---- the tokenizer a run used -----------------------------------------------------------------


def test_export_and_resume_use_the_tokenizer_the_run_started_with(tmp_path, capsys):
    corpus = EmbeddedCorpus()
    docs = [corpus[i] for i in range(len(corpus))]
    mine = train_sentencepiece(iter(docs), tmp_path / "tokdir" / "mytok.model", 512)
    decoy = train_sentencepiece(iter(docs[:20]), tmp_path / "tokdir" / "tokenizer.model", 400)
    overrides = ["--config.data.source=embedded", f"--config.data.tokenizer={mine}", "--config.model.vocab_size=512",
                 "--config.train.sample_every=0"]
    run = tmp_path / "run"
    assert train(run, *overrides) == 0
    assert (run / "tokenizer.model").read_bytes() == mine.read_bytes()
    assert main(["export", "--workdir", str(run), str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "tokenizer.model").read_bytes() == mine.read_bytes()  # not the decoy beside it

    mine.write_bytes(decoy.read_bytes())  # the file the config names changed since the run started
    capsys.readouterr()
    assert train(run, *overrides) == 2
    assert "differs from the tokenizer this run started with" in one_line_error(capsys, "train")
    (run / "tokenizer.model").write_bytes(decoy.read_bytes())  # and the run's own copy replaced
    assert main(["export", "--workdir", str(run), "--overwrite", str(tmp_path / "model")]) == 2
    assert "not the tokenizer this run trained with" in one_line_error(capsys, "export")
    mine.write_bytes((tmp_path / "model" / "tokenizer.model").read_bytes())  # the config's file put back
    assert train(run, *overrides) == 2  # the damaged copy is named, not the data ("prepared with another tokenizer")
    assert one_line_error(capsys, "train").endswith(
        f"{run / 'tokenizer.model'} is not the tokenizer this run trained with (its checkpoints record SHA-256 "
        f"{sha256_file(mine)[:12]}...): it was changed or damaged; put that tokenizer back, or delete the file and "
        f"the run copies it again from its data")
    (run / "tokenizer.model").unlink()
    assert train(run, *overrides) == 0 and (run / "tokenizer.model").read_bytes() == mine.read_bytes()

    assert main([*generate_args(tmp_path / "model"), "--tokenizer", str(decoy)]) == 2
    assert "differs from the model's own" in one_line_error(capsys, "generate")
    assert main([*generate_args(tmp_path / "model"), "--tokenizer", str(decoy.parent)]) == 2  # its directory too
    assert "differs from the model's own" in one_line_error(capsys, "generate")


def test_trained_tokenizer_belongs_to_the_run_only_once_it_starts(tmp_path, capsys):
    overrides = ["--config.data.source=embedded", "--config.data.tokenizer=train", "--config.model.vocab_size=512",
                 "--config.data.tokenizer_vocab_size=512", "--config.train.sample_every=0"]
    run = tmp_path / "run"
    assert train(run, *overrides, "--config.train.seq_len=4096") == 2  # fails after training the tokenizer
    assert "max_seq_len" in one_line_error(capsys, "train")
    assert not run.exists()
    assert train(run, *overrides) == 0
    assert train(run, *overrides[:3], "--config.data.tokenizer_vocab_size=400", *overrides[4:]) == 2
    assert ("(the data this run started with) was prepared with another tokenizer (trained, "
            "data.tokenizer_vocab_size=512) than data.tokenizer=train (trained, data.tokenizer_vocab_size=400)"
            ) in one_line_error(capsys, "train")


def test_model_vocabulary_larger_than_the_tokenizer_samples_only_real_tokens(tmp_path, capsys):
    overrides = ["--config.data.source=embedded", "--config.data.tokenizer=train", "--config.model.vocab_size=1024",
                 "--config.data.tokenizer_vocab_size=400", "--config.train.sample_every=3",
                 "--config.train.sample_tokens=24"]
    assert train(tmp_path / "run", *overrides) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(" sample: " in line for line in out) == 2  # step 3's, and the closing one before the closing line
    assert any(line.startswith("step 3 sample: ") for line in out) and out[-2].startswith("step 4 sample: ")
    assert out[-1].startswith("step 4: loss ")


def test_retention_that_would_keep_no_checkpoint_is_refused(tmp_path, capsys):
    for setting, message in [("max_to_keep=0", "checkpoint.max_to_keep must be a positive integer"),
                             ("keep_every=-2", "checkpoint.keep_every must be a non-negative integer"),
                             ("keep_every=3", "keep_every=3 is not a multiple of checkpoint.every=2")]:
        assert train(tmp_path / "run", f"--config.checkpoint.{setting}") == 2
        assert message in one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_sigterm_while_preparing_data_leaves_nothing_behind(tmp_path):
    """Preempted before its first write (here: while training its tokenizer and tokenizing the
    corpus into a temporary directory), a run stops with one line and removes what it staged."""
    tmp, run = tmp_path / "tmp", tmp_path / "run"
    tmp.mkdir()
    command = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir", str(run), *RUN,
               "--config.data.source=embedded", "--config.data.tokenizer=train", "--config.model.vocab_size=512",
               "--config.data.tokenizer_vocab_size=512"]
    process = subprocess.Popen(command, env=dict(os.environ, TMPDIR=str(tmp)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp.glob("llama-jax-data-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(tmp.glob("llama-jax-data-*")), "the run never staged its data"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1] == "llama-jax train: terminated (SIGTERM)" and "Traceback" not in err, err
    assert list(tmp.iterdir()) == [] and not run.exists()


def test_a_second_run_in_a_busy_workdir_is_refused_and_the_first_finishes_alone(tmp_path, capsys):
    """Two trains in one workdir wrote over each other's checkpoints and logs until both crashed,
    leaving a half-written checkpoint behind. A train started while another runs there is refused
    in one line and writes nothing; the first completes as if it had been alone."""
    run = tmp_path / "run"
    args = ["train", "--config", TINY, "--workdir", str(run), "--config.train.steps=200",
            "--config.checkpoint.every=100", "--config.train.log_every=10", "--config.optimizer.warmup_steps=1"]
    first = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    config_written = (run / "config.json").stat().st_mtime_ns
    assert main(args) == 2
    err = one_line_error(capsys, "train")
    assert f"--workdir {run} is in use: another llama-jax train is running there" in err, err
    assert first.poll() is None, "the first run ended while the second was refused"
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert (run / "config.json").stat().st_mtime_ns == config_written
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 200, steps
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["100", "200"]
    assert not (run / run_lib.SET_ASIDE_DIR).exists()
    assert main(args) == 0  # the lock went with the first process: the finished run is found as it is


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write into: mode 0o500, or for root (whom modes do not stop)
    a read-only tmpfs mounted there."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without the right to mount a read-only tmpfs: no directory is unwritable")
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=True)  # (a file a failed write left open)


def test_an_unwritable_destination_is_refused_before_any_work(read_only_dir, model_dir, pristine_run, capsys):
    """Each command names the directory it cannot write, before training, converting or evaluating."""
    demo = str(ROOT / "configs" / "demo.py")
    for command, argv in [
        ("train", ["train", "--config", TINY, "--workdir", str(read_only_dir / "run"), *RUN]),
        ("convert", ["convert", "--from", "jax", "--to", "hf", str(model_dir), str(read_only_dir / "hf")]),
        ("export", ["export", "--workdir", str(pristine_run[0]), str(read_only_dir / "model")]),
        ("prepare-data", ["prepare-data", "--config", demo, "--output", str(read_only_dir / "data")]),
        ("sweep", ["sweep", "--config", TINY, "--workdir", str(read_only_dir / "sweep"), "--sweep", "train.seed=[0]"]),
        ("eval", ["eval", str(model_dir), "--config", demo, "--output", str(read_only_dir / "eval.json")]),
    ]:
        assert main(argv) == 2, command
        assert re.search(rf"cannot write a file into {re.escape(str(read_only_dir))} \((Read-only file system|"
                         rf"Permission denied)\); choose another", one_line_error(capsys, command)), command
    assert not list(read_only_dir.iterdir())


@pytest.mark.parametrize("output", ["/proc/x", "/proc/sub/x"])
def test_a_folder_that_takes_no_files_is_refused_before_any_work(output, model_dir, pristine_run, capsys):
    """/proc takes no new files, not even from root, whom `os.access` lets write anywhere: each
    command finds that out by trying, before training, preparing (the demo trains a tokenizer on the
    standard library first), converting or evaluating, and names its own option, not a temporary file."""
    demo = str(ROOT / "configs" / "demo.py")
    for command, argv, option in [
        ("train", ["train", "--config", TINY, "--workdir", output, *RUN], "--workdir"),
        ("convert", ["convert", "--from", "jax", "--to", "hf", str(model_dir), output], "destination"),
        ("export", ["export", "--workdir", str(pristine_run[0]), output], "destination"),
        ("prepare-data", ["prepare-data", "--config", demo, "--output", output], "--output"),
        ("sweep", ["sweep", "--config", TINY, "--workdir", output, "--sweep", "train.seed=[0]"], "--workdir"),
        ("eval", ["eval", str(model_dir), "--config", demo, "--output", f"{output}.json"], "--output"),
        # a dry run of a SLURM launch writes its job's script into the run's --workdir
        ("launch", ["launch", "slurm", "--dry-run", "--", "train", "--config", TINY, "--workdir", output],
         "--workdir"),
    ]:
        shown = f"{output}.json" if command == "eval" else output
        assert main(argv) == 2, command
        out, err = capsys.readouterr()
        refusal = rf": error: (after --: train: )?{option} {shown}: cannot write a file into /proc \([^)]+\); choose " \
                  rf"another {option}"
        assert out == "" and err.count("\n") == 1 and re.search(refusal, err), (command, err)
        assert ".tmp" not in err
    assert not Path("/proc/x").exists() and not Path("/proc/sub").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a file system of 1 MiB (a tmpfs mounted there), to fill up; `grow` makes it
    64 MiB, as freeing space would."""
    path = tmp_path / "small"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:  # only a new file system can be filled without filling the machine's
        pytest.skip(f"cannot mount a small tmpfs here (mounting needs root): {mounted.stderr.strip()}")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(path)], check=True)

    yield path, grow
    subprocess.run(["umount", "--lazy", str(path)], check=True)  # (a file a failed write left open)


def test_an_append_to_the_set_aside_metrics_cut_short_loses_no_record(tmp_path):
    """A resume sets aside the records logged after its checkpoint; one whose append a full disk cut
    short left them in metrics.jsonl and half a line in the set-aside log, which the next resume's
    first record used to be glued to (and lost with)."""
    from llama_jax.run import SET_ASIDE_DIR, set_aside_metrics_after

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    (tmp_path / SET_ASIDE_DIR).mkdir()
    aside = tmp_path / SET_ASIDE_DIR / "metrics.jsonl"
    aside.write_text(json.dumps({"step": 9, "loss": 2.0}) + "\n" + '{"step": 3, "lo')
    assert set_aside_metrics_after(tmp_path, 2) == [3, 4, 5]
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [9, 3, 4, 5]


def test_tensorboard_events_that_no_longer_fit_raise_no_traceback(tmp_path, monkeypatch):
    """Closing the metrics writer when TensorBoard's last events no longer fit (a full disk): its
    close runs in a thread of its own, whose traceback used to print before the run's one error
    line. (tensorboardX's writer stands in failing as it does there: when and whether its buffered
    events need a new block of the disk depends on its worker thread's timing.)"""
    from llama_jax import metrics

    class FullDisk:
        def __init__(self, logdir, **kwargs):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics, "_import_tensorboardx", lambda: types.SimpleNamespace(SummaryWriter=FullDisk))
    in_threads = []
    monkeypatch.setattr(threading, "excepthook", in_threads.append)
    writer = metrics.MetricsWriter(tmp_path / "run")
    writer.close()
    assert not in_threads, [hook.exc_value for hook in in_threads]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_full_disk_that_is_not_the_workdirs_is_not_blamed_on_it(small_disk, tmp_path):
    """A full device elsewhere (here standard output's file) is not said to be the workdir's."""
    disk, _ = small_disk
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
        while True:
            filler.write(bytes(64 << 10))
    with open(disk / "train.log", "w") as log:
        failed = subprocess.run([sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir",
                                 str(tmp_path / "run"), "--config.train.steps=4", "--config.optimizer.warmup_steps=1",
                                 "--config.train.log_every=1"],
                                stdout=log, stderr=subprocess.PIPE, text=True, timeout=300)
    assert failed.returncode == 2 and failed.stderr.splitlines() == [
        "llama-jax train: error: no space left on the device holding standard output; free some space and run the "
        "command again: a run resumes from its last committed checkpoint"], failed.stderr


def test_a_tokenizer_that_does_not_fit_names_its_destination(small_disk, tmp_path):
    disk, _ = small_disk
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of some text to train on, word{i % 97}\n" for i in range(3000)))
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
        while True:
            filler.write(bytes(4 << 10))
    out = disk / "tokenizer.model"
    failed = subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(corpus),
                             "--vocab-size", "400", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and failed.stderr.splitlines() == [
        f"train_tokenizer.py: error: no space left on the device holding {out}; free some space and run the command "
        "again"], failed.stderr
    assert not out.exists()


def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(small_disk, model_dir):
    """A checkpoint that no longer fits: one line saying the disk is full (not Orbax's tracebacks
    from its writer threads, nor TensorStore's message naming a temporary file); once there is
    room, the same command resumes and logs every step once. A converted or copied file either
    appears whole or not at all."""
    disk, grow = small_disk
    run = disk / "run"
    command = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir", str(run),
               "--config.train.steps=40", "--config.checkpoint.every=10"]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"llama-jax train: error: no space left on the device holding {run}; free some space and run the command "
        "again: a run resumes from its last committed checkpoint"], failed.stderr

    # what the failed train left free depends on how far its last write got: leave less room than
    # the conversion needs (about 0.6 MiB) but enough for it to start writing
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    if free > 128 << 10:
        (disk / "filler").write_bytes(bytes(free - (128 << 10)))
    converted = subprocess.run([sys.executable, "-m", "llama_jax.cli", "convert", "--from", "jax", "--to", "meta",
                                str(model_dir), str(disk / "meta")], capture_output=True, text=True, timeout=300)
    assert converted.returncode == 2 and converted.stderr.splitlines() == [
        f"llama-jax convert: error: no space left on the device holding {disk / 'meta'}; free some space and run "
        "the command again"], converted.stderr
    assert not (disk / "meta").exists()
    (disk / "filler").unlink(missing_ok=True)
    from llama_jax.safe_io import copy_file_atomic

    larger_than_the_disk = disk.parent / "big.bin"
    larger_than_the_disk.write_bytes(os.urandom(2 << 20))
    with pytest.raises(OSError, match="No space left on device"):
        copy_file_atomic(larger_than_the_disk, disk / "copy")
    assert sorted(p.name for p in disk.iterdir()) == ["run"]  # no part of the copy, nor of the conversion

    grow()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40], steps
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "40"


def test_a_sweep_whose_files_cannot_be_written_keeps_its_record_and_results(tmp_path):
    """Running a finished sweep again, or its --report, where its files no longer fit (here past the
    file size limit, as on a full disk): one line, and sweep.json, results.csv and results.md stay
    whole. (sweep.json cut short made every later run of the sweep refuse the workdir as damaged.)"""
    workdir = tmp_path / "sweep"
    command = [sys.executable, "-m", "llama_jax.cli", "sweep", "--config", TINY, "--workdir", str(workdir),
               "--sweep", "train.seed=[0]", *RUN]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    kept = ["sweep.json", "results.csv", "results.md"]
    before = {name: (workdir / name).read_bytes() for name in kept}
    assert min(map(len, before.values())) > 128
    limited = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
               "(128, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); os.execv(sys.executable, sys.argv[1:])"]
    for again in (command, [*command[:4], "--workdir", str(workdir), "--report"]):
        failed = subprocess.run([*limited, *again], capture_output=True, text=True, timeout=300)
        assert failed.returncode == 2 and failed.stderr.splitlines()[0].startswith(
            "llama-jax sweep: error: a file grew past this process's file size limit (ulimit -f: 128 bytes) while "
            f"writing {workdir}; raise the limit"), failed.stderr
        assert len(failed.stderr.splitlines()) == 1, failed.stderr
        assert {name: (workdir / name).read_bytes() for name in kept} == before
        assert not [p.name for p in workdir.iterdir() if ".tmp-" in p.name]
    assert subprocess.run(command, capture_output=True, text=True, timeout=300).returncode == 0


def test_a_file_size_limit_is_one_line_and_the_run_resumes_without_it(tmp_path):
    """A checkpoint file past the process's size limit (ulimit -f): one line saying so (not
    TensorStore's OUT_OF_RANGE message), and the same command without the limit resumes."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "llama_jax.cli", "train", "--config", TINY, "--workdir", str(run),
               "--config.train.steps=20", "--config.checkpoint.every=10"]
    limit = 256 << 10  # above config.json and the metrics, below the checkpoint's parameter file
    with_limit = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                  f"({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
                  "os.execv(sys.executable, sys.argv[1:])", *command]
    failed = subprocess.run(with_limit, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"llama-jax train: error: a file grew past this process's file size limit (ulimit -f: 256 KiB) while "
        f"writing {run}; raise the limit (ulimit -f unlimited) and run the command again: a run resumes from its "
        "last committed checkpoint"], failed.stderr
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20], steps


def test_a_file_too_large_for_its_file_system_is_not_blamed_on_ulimit(monkeypatch):
    """Without a size limit on the process, "File too large" is the file system's own limit."""
    import argparse
    import errno
    import resource

    from llama_jax import cli

    monkeypatch.setattr(cli.resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    error = ValueError("OUT_OF_RANGE: Error writing local file: File too large [os_error_code=27]")
    assert cli._error_text(error, argparse.Namespace(command="convert", dst="/mnt/usb/model")) == (
        "a file grew past the largest file its file system holds while writing /mnt/usb/model; use another file "
        "system and run the command again")
    assert os.strerror(errno.EFBIG) == "File too large"


def test_library_errors_wait_for_the_commands_outcome(caplog):
    """Orbax logs a failed write as absl errors with tracebacks while the command reports the same
    failure as its error line: they are held until the command ends, then shown if it succeeded
    and dropped if it failed."""
    from absl import logging as absl_logging

    from llama_jax import cli

    cli._NOISE.install()
    for succeeded in (True, False):
        caplog.clear()
        cli._NOISE.start()
        try:
            absl_logging.error("a checkpoint write failed")
            assert "a checkpoint write failed" not in caplog.text
        finally:
            cli._NOISE.end(succeeded)
        assert ("a checkpoint write failed" in caplog.text) == succeeded
    # a command run inside another (the demo runs generate) leaves them to the outer one (it dropped them)
    caplog.clear()
    cli._NOISE.start()
    try:
        absl_logging.error("a checkpoint write failed")
        assert cli.main(["presets"]) == 0
        assert "a checkpoint write failed" not in caplog.text
    finally:
        cli._NOISE.end(succeeded=True)
    assert "a checkpoint write failed" in caplog.text
    cli._NOISE.end(succeeded=True)  # as after a command that succeeded: later records are shown


def test_a_program_calling_a_command_gets_its_loggers_back():
    """`main` quiets absl and asyncio while a command runs; a program that called it (a notebook,
    whose own event loop logs through asyncio) kept them quiet for good, its own errors unseen."""
    script = """if True:
        import logging
        from llama_jax.cli import main
        logging.getLogger("absl").setLevel(logging.INFO)
        assert main(["presets"]) == 0
        print(logging.getLogger("absl").level, logging.getLogger("asyncio").level)
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.split()[-2:] == [str(logging.INFO), str(logging.NOTSET)], (result.stdout, result.stderr)


def test_a_signal_raised_where_python_cannot_raise_it_still_stops_the_command():
    """Ctrl-C or SIGTERM that lands in a garbage-collection callback (JAX has one) raises there,
    where Python prints the exception and drops it: the command went on to the end and exited 0.
    The signal is sent again and stops the command where it is."""
    script = """if True:
        import signal
        import time
        from llama_jax import cli, signals
        cli._NOISE.install()
        # Ctrl-C as a terminal gives it (a shell's background job starts with it ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)

        class RaisesOnCollection:  # as a garbage-collection callback that the signal interrupts
            def __init__(self, error):
                self.error = error

            def __del__(self):
                raise self.error

        for error, expected in ((signals.Terminated(), signals.Terminated), (KeyboardInterrupt(), KeyboardInterrupt)):
            try:
                with signals.raising_signals():
                    RaisesOnCollection(error)
                    time.sleep(30)
                print("went on")
            except expected:
                print("stopped")
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.split() == ["stopped", "stopped"] and result.stderr == "", (result.stdout, result.stderr)


def test_a_signal_during_an_import_waits_for_the_import(tmp_path):
    """Ctrl-C during `import jax` crashed the interpreter (jaxlib's extension module, its
    initialisation interrupted, segfaults when freed). A signal that arrives while a module is
    being imported is raised once the import is done; an import that does not end is interrupted
    after `IMPORT_WAIT_S`."""
    for name, seconds in (("slow_module", 0.2), ("hung_module", 60)):
        (tmp_path / f"{name}.py").write_text(
            "import os, signal, time\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            f"time.sleep({seconds})  # the signal arrives here, in the module's body\n"
            "WHOLE = True\n")
    script = """if True:
        import importlib, sys, time
        from llama_jax import signals
        signals.IMPORT_WAIT_S = 4.0  # far beyond the slow import, even on a busy machine
        for name in ("slow_module", "hung_module"):
            with signals.raising_signals():
                try:
                    importlib.import_module(name)
                    time.sleep(60)
                except KeyboardInterrupt:  # (said here: a print between the import and the sleep could be cut)
                    module = sys.modules.get(name)
                    print("interrupted", "after the whole import" if module and module.WHOLE else "in the import")
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert result.stdout.splitlines() == ["interrupted after the whole import", "interrupted in the import"], result


def test_ctrl_c_while_the_command_is_imported_is_one_line(tmp_path):
    """Ctrl-C in the first fraction of a second of `llama-jax` (while llama_jax.cli, imported by its
    console script, imports what it needs) printed a KeyboardInterrupt traceback: the command
    takes it from the top of that import on, with its one line and exit status. The script here is
    the console script, except that it sends itself SIGINT as the command's modules are imported."""
    script = tmp_path / "llama-jax"  # (the name the program is known by)
    script.write_text("""if True:
        import os, signal, sys

        class InterruptOnImport:  # Ctrl-C as llama_jax.cli imports the package's modules
            def find_spec(self, name, path=None, target=None):
                if name == "llama_jax.distributed":
                    os.kill(os.getpid(), signal.SIGINT)

        sys.meta_path.insert(0, InterruptOnImport())
        from llama_jax.cli import main
        sys.exit(main())
    """)
    result = subprocess.run([sys.executable, str(script), "presets"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "llama-jax: interrupted\n"), result


def test_a_signal_inside_signals_held_waits_for_its_end():
    """A temporary directory made and handed to the code that removes it when the command stops:
    a SIGTERM in between left it behind (seen in test_sigterm_while_preparing_data_leaves_nothing_behind).
    Inside `signals_held` the signal waits; it is raised once the block is over."""
    script = """if True:
        import os, signal, time
        from llama_jax import signals
        from llama_jax.safe_io import signals_held

        with signals.raising_signals():
            try:
                with signals_held():
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.5)
                    print("the block ended whole")
                time.sleep(30)
            except signals.Terminated:
                print("terminated after the block")
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert result.stdout.splitlines() == ["the block ended whole", "terminated after the block"], result


def test_a_program_interrupted_while_xla_compiles_ends_with_its_status():
    """Ctrl-C or SIGTERM could stop a command while XLA still compiled in threads of its own; the
    interpreter's teardown then freed the XLA client under them, and the process ended in a
    segmentation fault or abort after its "interrupted" line. It ends with its status."""
    script = """if True:
        import sys, threading, time
        import jax, jax.numpy as jnp
        from llama_jax import cli, signals

        def long_to_compile(x):
            for i in range(400):
                x = jnp.sin(x @ x.T) + i
            return x

        def interrupted_while_compiling(args):
            threading.Thread(target=lambda: jax.jit(long_to_compile)(jnp.ones((64, 64))), daemon=True).start()
            time.sleep(1)
            raise {error}

        cli.cmd_presets = interrupted_while_compiling
        sys.argv = ["llama-jax", "presets"]
        sys.exit(cli.main())
    """
    for error, status, said in (("KeyboardInterrupt", 130, "interrupted"),
                                ("signals.Terminated", 143, "terminated (SIGTERM)")):
        result = subprocess.run([sys.executable, "-c", script.format(error=error)], capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        assert (result.returncode, result.stderr) == (status, f"llama-jax presets: {said}\n"), result


def test_a_signal_after_the_command_is_done_does_not_hide_its_outcome():
    """Ctrl-C or SIGTERM in the interpreter's teardown, after the command had written its result,
    killed the process (status -2 or -15, no message) or was dropped with a traceback: the
    caller could not tell the work was complete. Once the command is over, the status is its
    own."""
    script = """if True:
        import atexit, os, signal, sys, time
        from llama_jax import cli

        def slow_teardown():
            os.kill(os.getpid(), signal.{signal})
            time.sleep(0.3)
            print("teardown finished", flush=True)

        def done(args):
            atexit.register(slow_teardown)
            print("result written", flush=True)

        cli.cmd_presets = done
        sys.argv = ["llama-jax", "presets"]
        sys.exit(cli.main())
    """
    for signame in ("SIGINT", "SIGTERM"):
        result = subprocess.run([sys.executable, "-c", script.format(signal=signame)], capture_output=True,
                                text=True, timeout=120, cwd=ROOT)
        assert (result.returncode, result.stdout, result.stderr) == (0, "result written\nteardown finished\n", ""), \
            (signame, result)


def test_a_read_interrupted_by_a_signal_is_not_taken_for_damage(pristine_run, monkeypatch):
    """TensorStore reports a read that SIGTERM or Ctrl-C interrupted as a failed read ("Encountered
    error while reading ..."): export said the (intact) checkpoint was damaged. The signal stops
    the command as a signal; a read that fails without one is still damage."""
    from llama_jax import signals
    from llama_jax.checkpoint import CheckpointDamaged

    checkpoints = RunCheckpoints(pristine_run[0] / "checkpoints", every=2, async_save=False, read_only=True)

    def read_interrupted_by(signum):
        def restore(*args, **kwargs):
            try:
                os.kill(os.getpid(), signum) if signum else None
                raise OSError("the file vanished")
            except BaseException as e:  # what TensorStore makes of whatever stopped its read
                raise Exception("Encountered error while reading array index (0,)") from e
        return restore

    try:
        for signum, expected in ((signal.SIGTERM, signals.Terminated), (signal.SIGINT, KeyboardInterrupt),
                                 (None, CheckpointDamaged)):
            monkeypatch.setattr(checkpoints.manager, "restore", read_interrupted_by(signum))
            with pytest.raises(expected), signals.raising_signals():
                checkpoints.run_info(4)
    finally:
        checkpoints.close()


def test_a_file_written_whole_is_refused_where_a_directory_stands(tmp_path):
    """(`sweep --report` with a results.csv directory failed with the rename's raw errno line.)"""
    from llama_jax.safe_io import write_text_atomic

    (tmp_path / "results.csv").mkdir()
    with pytest.raises(ValueError, match=r"results.csv is a directory, where a file is written; move it away$"):
        write_text_atomic(tmp_path / "results.csv", "a,b\n")
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left


def test_what_a_killed_writer_left_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A process killed outright (SIGKILL) while writing a file whole, or training a tokenizer in a
    temporary directory, leaves its scratch behind: the next writer of the same file (the next
    tokenizer training) removes what dead processes of this host left, never a live one's."""
    import socket
    import tempfile

    from llama_jax.safe_io import OWNER_FILE, owned_temp_directory, write_text_atomic

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = {"dead": tmp_path / f".loss.png.tmp-{host}-{dead}-0123abcd",
            "live": tmp_path / f".loss.png.tmp-{host}-{os.getpid()}-4567cdef",
            # a writer on HOST-<dead pid>, a peer sharing the directory: not this host's process
            "peer": tmp_path / f".loss.png.tmp-{host}-{dead}-{os.getpid()}-89abcdef"}
    for path in left.values():
        path.write_bytes(b"")
    write_text_atomic(tmp_path / "loss.png", "png")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["loss.png", left["live"].name, left["peer"].name])

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    for name, owner in (("dead", dead), ("live", os.getpid())):
        (tmp_path / "tmp" / f"llama-jax-tokenizer-{name}").mkdir(parents=True)
        (tmp_path / "tmp" / f"llama-jax-tokenizer-{name}" / OWNER_FILE).write_text(f"{host} {owner}")
    mine = owned_temp_directory("llama-jax-tokenizer-")
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted(["llama-jax-tokenizer-live", mine.name])
    assert (mine / OWNER_FILE).read_text() == f"{host} {os.getpid()}"


def test_a_long_file_name_is_written_whole_and_its_scratch_found_again(tmp_path, monkeypatch):
    """A destination name near the file system's limit still gets a scratch name within it (the
    host and pid would push it over), and what a dead writer of it left is still recognised."""
    from llama_jax import safe_io

    target = tmp_path / ("r" * 250 + ".md")  # 253 bytes: a valid name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    with monkeypatch.context() as patch:
        patch.setattr(os, "getpid", lambda: int(dead))
        left = safe_io.scratch_path(target, "tmp")
    assert len(os.fsencode(left.name)) <= safe_io.NAME_MAX
    left.write_bytes(b"half")
    safe_io.write_text_atomic(target, "whole\n")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_text() == "whole\n"


def test_a_sweep_report_replaces_both_tables_or_neither(tmp_path):
    """(A results.md directory was refused only after results.csv had been replaced.)"""
    from llama_jax.results import write_tables

    (tmp_path / "results.csv").write_text("the previous report\n")
    (tmp_path / "results.md").mkdir()
    with pytest.raises(ValueError, match=r"results.md is a directory, where a file is written; move it away$"):
        write_tables(tmp_path, ["optimizer.lr"], [])
    assert (tmp_path / "results.csv").read_text() == "the previous report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.md"]
