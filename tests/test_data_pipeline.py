"""Training on prepared data end to end: epochs and tokens in the metrics, mixtures with
per-source evaluation, `data inspect`, raw sources prepared once into the workdir."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from llama_jax.cli import main
from llama_jax.data import EmbeddedCorpus
from llama_jax.experiment import load_config
from llama_jax.prepare import open_corpus, open_prepared, prepare
from llama_jax.run_data import STAGING_PREFIX
from llama_jax.safe_io import OWNER_FILE, DirectoryLock
from llama_jax.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
B, L = 8, 32  # train.batch_size, train.seq_len


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    corpus = EmbeddedCorpus()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_sentencepiece((corpus[i] for i in range(len(corpus))), path, 512)


def data_config(tokenizer_path, **changes):
    config = load_config(TINY, [f"data.tokenizer={tokenizer_path}", "data.source=embedded", "data.eval_fraction=0.1"])
    config.data.update(**changes)
    return config.data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_path):
    """The embedded corpus, and a few text files, prepared with the same tokenizer."""
    root = tmp_path_factory.mktemp("prepared")
    prepare(data_config(tokenizer_path), root / "embedded", workers=1, shard_tokens=20_000, progress=False)
    texts = root / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    words = EmbeddedCorpus()[3].split()
    for i in range(40):
        (texts / f"{i}.txt").write_text(" ".join(rng.choice(words, 60)), encoding="utf-8")
    prepare(data_config(tokenizer_path, source="text", files=[str(texts / "*.txt")], eval_fraction=0.2),
            root / "texts-prepared", workers=1, progress=False)
    return root / "embedded", root / "texts-prepared"


def train(workdir, *overrides) -> int:
    args = ["train", "--config", TINY, "--workdir", str(workdir), "--config.model.vocab_size=512",
            f"--config.train.batch_size={B}", f"--config.train.seq_len={L}", "--config.train.log_every=1",
            "--config.optimizer.warmup_steps=1", "--config.checkpoint.async_save=False", *overrides]
    return main(args)


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_on_prepared_data_counts_epochs_and_tokens(prepared, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train(workdir, "--config.data.source=prepared", f"--config.data.path={prepared[0]}",
                 "--config.train.steps=6", "--config.train.eval_every=3", "--config.train.eval_batches=-1") == 0
    logged = records(workdir)
    rows = (open_prepared(prepared[0]).splits["train"].tokens - 1) // L
    for r in logged:
        if "loss" in r:
            assert r["tokens_seen"] == r["step"] * B * L and r["epoch"] == pytest.approx(r["step"] * B / rows)
    evaluated = [r for r in logged if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0  # llama-jax eval reads the same held-out documents
    of_run = json.loads(capsys.readouterr().out)
    assert of_run["tokens"] == evaluated[-1]["eval_tokens"]
    assert of_run["loss"] == pytest.approx(evaluated[-1]["eval_loss"], rel=1e-5)
    assert not (workdir / "data").exists()  # prepared data is read where it is


def test_a_run_saved_before_hashed_row_orders_keeps_its_orders(prepared, tmp_path, capsys):
    """Runs record their row-order scheme in their data stream; one whose checkpoints record none
    (an earlier release's, which seeded epoch e's order with train.seed + e) resumes with the
    orders it started with, and goes on recording none."""
    from llama_jax.packed import ORDER, Source, TrainRows, order_seed
    from llama_jax.run_data import build_data

    workdir = tmp_path / "run"
    overrides = ["--config.data.source=prepared", f"--config.data.path={prepared[0]}", "--config.train.seed=5"]
    assert train(workdir, *overrides, "--config.train.steps=2") == 0
    info_file = workdir / "checkpoints" / "2" / "run" / "metadata"
    info = json.loads(info_file.read_text())
    assert [entry["order"] for entry in info["data_stream"]] == [ORDER]
    config = load_config(str(workdir / "config.json"))
    split = open_prepared(prepared[0]).splits["train"]

    def rows_of(seed: int, step: int) -> np.ndarray:
        return TrainRows([Source.create("data", split, 1.0, L, seed)], L, B).batch(step, range(B))["tokens"]

    assert np.array_equal(build_data(config, None, workdir).train_rows(7)["tokens"], rows_of(order_seed(5, 0), 7))
    for entry in info["data_stream"]:  # as an earlier release saved it
        del entry["order"]
    info_file.write_text(json.dumps(info))
    data = build_data(config, None, workdir)
    assert np.array_equal(data.train_rows(7)["tokens"], rows_of(5, 7)) and "order" not in data.stream[0]
    assert train(workdir, *overrides, "--config.train.steps=4") == 0
    latest_file = workdir / "checkpoints" / "4" / "run" / "metadata"
    resumed = json.loads(latest_file.read_text())
    assert resumed["data_stream"] == info["data_stream"]
    # a process that would read the rows otherwise than the checkpoint it resumes from was saved with
    # stops (here the latest checkpoint, read to decide, says hashed orders; step 2 was saved without)
    resumed["data_stream"][0]["order"] = ORDER
    latest_file.write_text(json.dumps(resumed))
    capsys.readouterr()
    assert train(workdir, *overrides, "--config.train.steps=4", "--resume-from", "2") == 2
    assert (f"was saved with rows in an earlier release's order, and this process would read them in the order "
            f"{ORDER!r}; resume it as it started") in capsys.readouterr().err
    assert latest_file.is_file()  # refused before anything was set aside


def test_a_runs_relative_data_path_read_from_elsewhere_is_refused(prepared, tmp_path, monkeypatch, capsys):
    """A run's config.json keeps data.path as given; `eval --workdir` and `data inspect --workdir`
    from another directory, where that relative path names other prepared data, refuse in one line
    rather than score or show the other data as the run's."""
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    for directory, data in ((started, prepared[0]), (elsewhere, prepared[1])):
        directory.mkdir()
        (directory / "prep").symlink_to(data)  # the same name, other documents (the same tokenizer)
    monkeypatch.chdir(started)
    assert train("run", "--config.data.source=prepared", "--config.data.path=prep", "--config.train.steps=2") == 0
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    for command in (["eval", "--workdir", "../started/run"],
                    ["data", "inspect", "--workdir", "../started/run", "--step", "1"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and re.fullmatch(
            rf"llama-jax {command[0]}.*: error: \S+/started/run trained on data \(.*\), not on data \(.*\), the data "
            rf"its config.json names as read from {re.escape(str(elsewhere))}; run the command from the directory the "
            rf"run was started in, or give the data to score with --config FILE", err), err
    assert not list((started / "run").glob("eval-*.json"))
    assert main(["eval", "--workdir", "../started/run", "--config.data.path=prep"]) == 0  # other data, asked for
    [other] = (started / "run").glob("eval-*.json")  # a name of its own: it never replaces the run's own score
    assert re.fullmatch(r"eval-2-[0-9a-f]{8}\.json", other.name)
    assert json.loads(other.read_text())["data"]["path"] == "prep"
    capsys.readouterr()
    (elsewhere / "prep").unlink()
    assert main(["eval", "--workdir", "../started/run"]) == 2
    assert capsys.readouterr().err.strip() == (f"llama-jax eval: error: prep (read from {elsewhere}) does not exist; give "
                                               f"a directory written by llama-jax prepare-data")
    monkeypatch.chdir(started)
    assert main(["eval", "--workdir", "run"]) == 0
    assert {p.name for p in (started / "run").glob("eval-*.json")} == {"eval-2.json", other.name}


def mixture_config(tmp_path, mixture: str) -> Path:
    """A config file: the tiny config on prepared data, with `data.mixture` set to the literal `mixture`."""
    config = tmp_path / "mixture.py"
    config.write_text("from configs.tiny import get_config as tiny\n\n"
                      "def get_config():\n"
                      "    config = tiny()\n"
                      "    config.data.source = 'prepared'\n"
                      f"    config.data.mixture = {mixture}\n"
                      "    return config\n")
    return config


def test_a_mixture_reports_each_source(prepared, tmp_path, capsys):
    config = mixture_config(tmp_path, f"{{'docs': {{'path': '{prepared[0]}', 'weight': 3}}, "
                                      f"'texts': {{'path': '{prepared[1]}', 'weight': 1}}}}")
    workdir = tmp_path / "run"
    args = ["train", "--config", str(config), "--workdir", str(workdir), "--config.model.vocab_size=512",
            f"--config.train.batch_size={B}", f"--config.train.seq_len={L}", "--config.train.log_every=1",
            "--config.train.steps=4", "--config.train.eval_every=4", "--config.checkpoint.async_save=False",
            "--config.optimizer.warmup_steps=1"]
    assert main(args) == 0
    last = records(workdir)[-1]
    assert last["tokens_seen/docs"] == 4 * 6 * L and last["tokens_seen/texts"] == 4 * 2 * L  # 3:1 of 8 rows
    for name in ("docs", "texts"):
        assert last[f"epoch/{name}"] > 0 and last[f"eval_loss/{name}"] > 0
    # each source's training loss on its rows of the step; the step's loss lies between them
    assert min(last["nll/docs"], last["nll/texts"]) <= last["nll"] <= max(last["nll/docs"], last["nll/texts"])
    both = last["eval_tokens/docs"] + last["eval_tokens/texts"]
    assert last["eval_tokens"] == both
    assert last["eval_loss"] == pytest.approx((last["eval_loss/docs"] * last["eval_tokens/docs"]
                                               + last["eval_loss/texts"] * last["eval_tokens/texts"]) / both)

    # a resume continues the same rows of the same documents: other weights, data or rows per step are refused
    logged = (workdir / "metrics.jsonl").read_text()
    other_data = "trained on docs (0.75 of the rows, "
    for change, message in (("data.mixture.texts.weight=2", other_data),
                            (f"data.mixture.texts.path={prepared[0]}", other_data),
                            (f"train.batch_size={2 * B}", f"trained with train.batch_size={B}, not {2 * B}: the run's "
                                                          f"place in each epoch is counted in its rows"),
                            (f"train.seq_len={L // 2}", f"trained with train.seq_len={L}, not {L // 2}")):
        assert main([*args, "--config.train.steps=6", f"--config.{change}"]) == 2
        assert message in capsys.readouterr().err, change
    assert (workdir / "metrics.jsonl").read_text() == logged
    assert main([*args, "--config.train.steps=6", "--config.data.mixture.docs.weight=6",  # the same 3:1
                 "--config.data.mixture.texts.weight=2"]) == 0

    # 3:29 scaled to 0.03:0.29: the docs' share 3/32 becomes 0.09375000000000001 in float, and the
    # slot at 0.09375 of the batch moves to texts from step 768 on; refused, where 6:58 is taken
    shutil.rmtree(workdir)
    weights = ["--config.data.mixture.docs.weight=3", "--config.data.mixture.texts.weight=29"]
    assert main([*args, "--config.train.steps=2", "--config.train.eval_every=0", *weights]) == 0
    capsys.readouterr()
    scaled = [w.replace("=3", "=0.03").replace("=29", "=0.29") for w in weights]
    assert main([*args, "--config.train.steps=3", "--config.train.eval_every=0", *scaled]) == 2
    assert ("trained on data.mixture weights whose shares these weights give too, but rounded otherwise: some slots "
            "of its batches would read another source") in capsys.readouterr().err
    doubled = [w.replace("=3", "=6").replace("=29", "=58") for w in weights]
    assert main([*args, "--config.train.steps=3", "--config.train.eval_every=0", *doubled]) == 0


def test_a_mixture_source_without_held_out_documents_leaves_the_others_named(prepared, tokenizer_path, tmp_path):
    """With one of two sources holding out nothing, the other's held-out loss was logged only as
    `eval_loss`, not `eval_loss/NAME` as every source with held-out documents is."""
    texts = prepared[1].parent / "texts"
    none_held = tmp_path / "none-held-out"
    prepare(data_config(tokenizer_path, source="text", files=[str(texts / "*.txt")], eval_fraction=0.0), none_held,
            workers=1, progress=False)
    config = mixture_config(tmp_path, f"{{'docs': {{'path': '{prepared[0]}', 'weight': 1}}, "
                                      f"'texts': {{'path': '{none_held}', 'weight': 1}}}}")
    workdir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--workdir", str(workdir), "--config.model.vocab_size=512",
                 f"--config.train.batch_size={B}", f"--config.train.seq_len={L}", "--config.train.steps=1",
                 "--config.train.eval_every=1", "--config.checkpoint.async_save=False",
                 "--config.optimizer.warmup_steps=0"]) == 0
    last = records(workdir)[-1]
    assert last["eval_loss/docs"] == last["eval_loss"] > 0 and last["eval_tokens/docs"] == last["eval_tokens"]
    assert not any(key.endswith("/texts") for key in last if key.startswith("eval_"))


def test_inspect_shows_a_step_and_covers_an_epoch(prepared, capsys):
    base = ["data", "inspect", "--config", TINY, "--config.data.source=prepared", f"--config.data.path={prepared[1]}",
            f"--config.train.batch_size={B}", f"--config.train.seq_len={L}"]
    assert main(base + ["--step", "3", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^row \d+: source 'data', epoch 0, packed row \d+ of \d+; \d+ of 32 targets counted$",
                          out, re.M)) == 3
    assert re.search(r"^  document \d+ \(source index \d+\), tokens \[\d+, \d+\)$", out, re.M)
    assert "tokens seen before this step: 512" in out  # steps 1 and 2, of 8 rows of 32
    assert main([*base, "--config.train.batch_size=1", "--step", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"step 1: 1 row of {L} tokens\n")
    assert main(base + ["--epoch"]) == 0
    assert re.search(r"of its ([\d,]+) tokens in whole rows \1 \(100\.00%\) seen once, 0 \(0\.00%\) more than once, "
                     r"0 \(0\.00%\) never", capsys.readouterr().out)


def test_a_raw_source_is_prepared_once_into_the_workdir(tokenizer_path, tmp_path, capsys, monkeypatch):
    """... in a temporary directory first, where a process killed outright leaves its staging
    directory behind: the next run's preparation removes those whose process is gone."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead = socket.gethostname(), gone.stdout.strip()
    owners = {"killed": f"{host} {dead}", "running": f"{host} {os.getpid()}", "elsewhere": f"another-host {dead}",
              "unowned": None}
    for name, owner in owners.items():
        (tmp_path / "tmp" / f"{STAGING_PREFIX}{name}" / "data").mkdir(parents=True)
        if owner:
            (tmp_path / "tmp" / f"{STAGING_PREFIX}{name}" / OWNER_FILE).write_text(owner)
    workdir = tmp_path / "run"
    raw = ["--config.data.source=embedded", f"--config.data.tokenizer={tokenizer_path}", "--config.train.steps=2"]
    assert train(workdir, *raw) == 0
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == \
           [f"{STAGING_PREFIX}{name}" for name in ("elsewhere", "running", "unowned")]
    manifest = workdir / "data" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert train(workdir, *raw[:-1], "--config.train.steps=3") == 0  # resumes on the same prepared data
    assert manifest.stat().st_mtime_ns == stamp and [r["step"] for r in records(workdir) if "loss" in r] == [1, 2, 3]
    assert main(["data", "inspect", "--workdir", str(workdir), "--step", "1", "--rows", "1"]) == 0
    assert "row 0: source 'data'" in capsys.readouterr().out


def test_a_runs_damaged_copy_of_its_documents_is_prepared_again_as_the_error_says(tokenizer_path, tmp_path, capsys,
                                                                                     monkeypatch):
    """The run's prepared copy of a raw source (WORKDIR/data) damaged, in its manifest or a shard,
    or removed: the resume names the file and how to go on (prepare-data with the run's own
    settings into that place, which it accepts inside the run), and doing so resumes the run."""
    monkeypatch.chdir(tmp_path)
    raw = ["--config.data.source=embedded", f"--config.data.tokenizer={tokenizer_path}"]
    assert train("run", *raw, "--config.train.steps=2") == 0
    data = tmp_path / "run" / "data"
    recipe = (rf"prepare it again in its place: llama-jax prepare-data --config {tmp_path}/run/config.json --output "
              rf"{data}, from the directory the run was started in \(its documents and tokens are checked against "
              rf"those its checkpoints trained on\)")
    index_file = next(data.glob("train-*.index.npy"))  # damage found only when the index is first read
    kept = index_file.read_bytes()
    index = np.load(index_file)
    index[:, 0] = index[::-1, 0]
    np.save(index_file, index)
    capsys.readouterr()
    assert train("run", *raw, "--config.train.steps=3") == 2
    assert re.fullmatch(rf"llama-jax train: error: {index_file} is damaged: its document offsets do not ascend from 0 "
                        rf"within the shard's \d+ tokens; remove {data} and {recipe}; or start a new run with another "
                        rf"--workdir", capsys.readouterr().err.strip())
    index_file.write_bytes(kept)
    shard = next(data.glob("train-*.tokens.bin"))
    for damaged, problem in ((data / "manifest.json", r"\S+/manifest.json cannot be read \(.*\)"),
                             (shard, rf"\S+/{shard.name} is truncated: 10 bytes, expected \d+ \(.*\)")):
        kept = damaged.read_bytes()
        with open(damaged, "r+b") as f:
            f.truncate(10)
        capsys.readouterr()
        assert train("run", *raw, "--config.train.steps=3") == 2
        assert re.fullmatch(rf"llama-jax train: error: {problem}; remove {data} and {recipe}; or start a new run "
                            rf"with another --workdir", capsys.readouterr().err.strip())
        assert main(["eval", "--workdir", "run"]) == 2
        assert re.fullmatch(rf"llama-jax eval: error: {problem}; remove {data} and {recipe}; or give the data to "
                            rf"score with --config FILE", capsys.readouterr().err.strip())
        if damaged.name == "manifest.json":  # (the shard stays damaged: the copy prepared again replaces it)
            damaged.write_bytes(kept)
    shutil.rmtree(data)
    assert train("run", *raw, "--config.train.steps=3") == 2
    assert re.fullmatch(rf"llama-jax train: error: {data}, the run's prepared copy of its documents, is missing; its "
                        rf"checkpoints trained on it: put it back, or {recipe}; or start a new run with another "
                        rf"--workdir", capsys.readouterr().err.strip())
    assert main(["prepare-data", "--config", "run/config.json", "--output", "run/data", "--workers", "1"]) == 0
    assert train("run", *raw, "--config.train.steps=3") == 0
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == [1, 2, 3]
    assert main(["prepare-data", "--config", "run/config.json", "--output", "run/elsewhere"]) == 2  # only its place
    assert capsys.readouterr().err.strip().endswith(
        f"--output run/elsewhere is inside the run {tmp_path / 'run'}; give a directory outside it (or, for the run's "
        f"own copy of its documents, {data} itself)")
    synthetic = tmp_path / "synthetic"  # a run that reads no documents: its data/ is no copy of them
    synthetic.mkdir()
    settings = json.loads((tmp_path / "run" / "config.json").read_text())
    (synthetic / "config.json").write_text(json.dumps({**settings, "data": {**settings["data"], "source": "synthetic"}}))
    assert main(["prepare-data", "--config", "run/config.json", "--output", "synthetic/data"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--output synthetic/data is inside the run {synthetic}; give a directory outside it")
    fresh = tmp_path / "fresh"  # a run with no checkpoint yet, whose data/ someone began to prepare by hand
    (fresh / "data").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "config.json", fresh)
    (fresh / "data" / "preparing.json").write_text("{}")
    assert train("fresh", *raw, "--config.train.steps=3") == 2  # (it prepared its own, then failed to move it there)
    assert capsys.readouterr().err.strip().endswith(
        f"{fresh / 'data'}, the run's prepared copy of its documents, has no manifest.json (incomplete or damaged); "
        f"finish it (llama-jax prepare-data --output {fresh / 'data'} with the run's data settings), or remove it and "
        f"the run prepares its documents as it starts")
    assert sorted(p.name for p in fresh.iterdir()) == ["config.json", "data"]
    lock = DirectoryLock(tmp_path / "run", "held")
    lock.acquire()  # as a running train holds it (whose first start moves its own prepared copy there)
    try:
        for present in (True, False):
            if not present:
                shutil.rmtree(data)
            assert main(["prepare-data", "--config", "run/config.json", "--output", "run/data"]) == 2
            assert capsys.readouterr().err.strip().endswith(f"--output run/data: the run {tmp_path / 'run'} is "
                                                            f"running (it holds its directory's lock); wait for it "
                                                            f"to end")
    finally:
        lock.release()


def test_a_resume_naming_the_same_files_otherwise_goes_on(tokenizer_path, tmp_path, monkeypatch):
    """A raw source's files compare as the paths they name: `./texts/*.txt`, its absolute form
    (from anywhere) and `~/texts/*.txt` are the `texts/*.txt` the run started with."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for i in range(12):
        (tmp_path / "texts" / f"{i}.txt").write_text(EmbeddedCorpus()[i], encoding="utf-8")
    monkeypatch.setenv("HOME", str(tmp_path))
    raw = ["--config.data.source=text", f"--config.data.tokenizer={tokenizer_path}", "--config.data.eval_fraction=0"]
    for steps, cwd, files in ((1, tmp_path, "texts/*.txt"), (2, tmp_path, "./texts/*.txt"),
                              (3, tmp_path / "elsewhere", str(tmp_path / "texts" / "*.txt")),
                              (4, tmp_path / "elsewhere", "~/texts/*.txt")):
        monkeypatch.chdir(cwd)
        assert train(tmp_path / "run", *raw, f"--config.data.files=['{files}']", f"--config.train.steps={steps}") \
            == 0, files
    assert [r["step"] for r in records(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_a_raw_source_runs_relative_files_are_the_runs_from_anywhere(tokenizer_path, tmp_path, monkeypatch, capsys):
    """A run's config.json keeps data.files and data.tokenizer as given ('texts/*.txt', 'tok.model',
    read from where the run started). From another directory that holds other files of those
    names, `eval --workdir`, `data inspect --workdir` and a resume with the run's own settings
    still read the run's prepared copy (WORKDIR/data) and its tokenizer; other spellings that name
    other files from here are refused, saying where they were read from."""
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    for directory, first in ((started, 0), (elsewhere, 20)):
        (directory / "texts").mkdir(parents=True)
        for i in range(12):
            (directory / "texts" / f"{i}.txt").write_text(EmbeddedCorpus()[first + i], encoding="utf-8")
    shutil.copy(tokenizer_path, started / "tok.model")
    (elsewhere / "tok.model").write_bytes(b"another file of that name")
    raw = ["--config.data.source=text", "--config.data.tokenizer=tok.model", "--config.data.eval_fraction=0.25"]
    monkeypatch.chdir(started)
    assert train("run", *raw, "--config.data.files=['texts/*.txt']", "--config.train.steps=2") == 0
    seen = {}
    for cwd, run in ((started, "run"), (elsewhere, "../started/run")):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        assert main(["eval", "--workdir", run]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert main(["data", "inspect", "--workdir", run, "--step", "1"]) == 0
        shown = capsys.readouterr().out.splitlines()
        notices = [line for line in shown if line.startswith("data.tokenizer=")]
        assert notices == ([] if cwd == started else [  # the other tok.model here is not the run's
            f"data.tokenizer=tok.model (read from {elsewhere}) differs from the tokenizer this run started with; "
            f"using the run's copy of that (../started/run/tokenizer.model), as the run's own settings name it"])
        seen[cwd.name] = scored, shown[len(notices):]
    assert seen["elsewhere"] == seen["started"]  # the same documents, scored and shown alike
    assert seen["started"][0]["workdir"] == str(started / "run")
    assert main(["train", "--config", "../started/run/config.json", "--workdir", "../started/run",
                 "--config.train.steps=3", "--config.checkpoint.async_save=False"]) == 0
    assert [r["step"] for r in records(started / "run") if "loss" in r] == [1, 2, 3]
    assert train(started / "run", *raw, f"--config.data.tokenizer={started / 'tok.model'}",
                 "--config.data.files=['./texts/*.txt']", "--config.train.steps=4") == 2
    assert capsys.readouterr().err.strip().endswith(
        f"was prepared with data.files=['{started}/texts/*.txt'], not ['{elsewhere}/texts/*.txt'] (read from "
        f"{elsewhere}); use the run's data settings (its config.json) or another --workdir")
    assert main(["eval", "--workdir", "../started/run", "--config.data.eval_fraction=0.5"]) == 2
    assert capsys.readouterr().err.strip().endswith(  # config.json's files, with another split: not read from here
        f"data.files=['texts/*.txt'] is ../started/run/config.json's, relative to the directory the run started in; "
        f"read from {elsewhere} it names other files than the run was prepared from (['{started}/texts/*.txt']); "
        f"run the command from there, or give data.files as absolute paths")
    monkeypatch.chdir(started)  # resumed with another spelling of the same files, which config.json keeps
    assert train("run", *raw, "--config.data.files=['./texts/*.txt']", "--config.train.steps=4") == 0
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--workdir", "../started/run"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == seen["started"][0]["documents"]
    config_json = started / "run" / "config.json"
    kept = config_json.read_text()
    assert kept.count("./texts/*.txt") == 1
    config_json.write_text(kept.replace("./texts/*.txt", "./other/*.txt"))  # edited by hand: not what it trained on
    assert main(["eval", "--workdir", "../started/run"]) == 2
    assert "it names other files than the run was prepared from" in capsys.readouterr().err
    config_json.write_text(kept)
    data = started / "run" / "data"
    shutil.move(data, tmp_path / "data")
    for command in (["eval", "--workdir", "../started/run"], ["data", "inspect", "--workdir", "../started/run",
                                                               "--step", "1"]):
        assert main(command) == 2  # not the files of that name here
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and re.search(r"error: \S*started/run/data, the run's prepared copy of its documents, "
                                              r"is missing; ", err), err
    data.mkdir()  # there, without its manifest
    assert main(["eval", "--workdir", "../started/run"]) == 2
    assert re.search(r"error: \S*started/run/data, the run's prepared copy of its documents, has no manifest.json "
                     r"\(incomplete or damaged\); ", capsys.readouterr().err)
    data.rmdir()
    shutil.move(tmp_path / "data", data)
    for i in range(3):  # the data prepared again in place, from the files as they are now
        (started / "texts" / f"{i}.txt").write_text(EmbeddedCorpus()[40 + i], encoding="utf-8")
    shutil.rmtree(data)
    monkeypatch.chdir(started)
    prepare(load_config(str(started / "run" / "config.json")).data, data, workers=1, progress=False)
    monkeypatch.chdir(elsewhere)
    assert main(["data", "inspect", "--workdir", "../started/run", "--step", "1"]) == 2
    assert re.fullmatch(rf"llama-jax data inspect: error: \S+/run trained on data \(.*\), not on data \(.*\), the data "
                        rf"its config.json names \({re.escape(str(data))}\): changed since; .*",
                        capsys.readouterr().err.strip())


def test_prepared_data_checks_a_named_tokenizer(prepared, tokenizer_path, tmp_path, capsys):
    """data.tokenizer with prepared data: the tokenizer the data was prepared with (a file or its
    directory) is accepted; another one is refused in one line before anything is written."""
    base = ["--config.data.source=prepared", f"--config.data.path={prepared[0]}", "--config.train.steps=1",
            "--config.train.eval_every=0"]
    assert train(tmp_path / "file", *base, f"--config.data.tokenizer={tokenizer_path}") == 0
    assert train(tmp_path / "dir", *base, f"--config.data.tokenizer={tokenizer_path.parent}") == 0
    corpus = EmbeddedCorpus()
    other = train_sentencepiece((corpus[i] for i in range(len(corpus))), tmp_path / "other" / "tokenizer.model", 480)
    capsys.readouterr()
    assert train(tmp_path / "other-run", *base, f"--config.data.tokenizer={other}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"data.tokenizer={other} is not the tokenizer {prepared[0]} was prepared with" in err[0]
    assert not (tmp_path / "other-run").exists()


def test_a_prepared_directory_changed_after_preparation_is_one_line(prepared, tokenizer_path, tmp_path, capsys):
    """A replaced tokenizer (its ids are not the data's) and a shard index whose offsets were
    rewritten are named before they are trained on."""
    import shutil

    corpus = EmbeddedCorpus()
    other = train_sentencepiece((corpus[i] for i in range(len(corpus))), tmp_path / "other" / "tokenizer.model", 480)
    swapped = shutil.copytree(prepared[0], tmp_path / "swapped")
    shutil.copyfile(other, swapped / "tokenizer.model")
    reordered = shutil.copytree(prepared[0], tmp_path / "reordered")
    index_file = reordered / "train-00000.index.npy"
    index = np.load(index_file)
    index[:, 0] = index[::-1, 0]
    np.save(index_file, index)
    for directory, message in ((swapped, f"{swapped / 'tokenizer.model'} does not match the sha256 in manifest.json"),
                               (reordered, f"{index_file} is damaged: its document offsets do not ascend from 0")):
        assert train(tmp_path / directory.name / "run", "--config.data.source=prepared",
                     f"--config.data.path={directory}", "--config.train.steps=2", "--config.train.eval_every=0") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert err[0].endswith(f"; remove {reordered} to prepare it again, or give another directory")
    with pytest.raises(ValueError, match=rf"^{re.escape(message)} .*; remove {reordered} to prepare it again, or give "
                                         rf"another --output$"):  # preparing it again does not call it prepared
        prepare(data_config(tokenizer_path), reordered, workers=1, shard_tokens=20_000, progress=False)


@pytest.mark.parametrize("change, message", [
    ({"mixture.docs.weight": 0}, r"data.mixture.docs.weight=0.0 must be a positive number"),
    ({"mixture.docs.weight": "nan"}, r"config key data.mixture.docs.weight: nan is not a finite number"),
    ({"mixture.docs.path": "/nonexistent/prepared"},
     r"/nonexistent/prepared does not exist; give a directory written by llama-jax prepare-data"),
    ({"train.seq_len": 4096}, r"train.seq_len=4096 exceeds the model's max_seq_len=128"),
    ({"mixture": "{'docs': 3}"}, r"data.mixture.docs needs a path \(a directory written by llama-jax prepare-data\) "
                                 r"and a weight, e.g. \{'path': '/data/c4', 'weight': 0.8\}"),
    ({"mixture": "{'docs': {'path': 'DOCS', 'wieght': 9}}"},
     r"data.mixture.docs has no setting 'wieght'; valid: path, weight"),
    ({"mixture": "{'docs': {'path': 5, 'weight': 1}}"},  # (a TypeError traceback)
     r"data.mixture.docs.path=5 must be a directory path \(a string\), e.g. '/data/c4'$"),
    ({"mixture": f"{{'docs': {{'path': 'DOCS', 'weight': {10**308}}}, "
                 f"'again': {{'path': 'DOCS', 'weight': {10**308}}}}}"},
     r"config key data.mixture.again.weight: a whole number of 309 digits is beyond float32's range"),
    ({"mixture": "{'docs': {'path': 'DOCS', 'weight': 1e308}}"},
     r"config key data.mixture.docs.weight: 1e\+308 is beyond float32's range"),
    ({"mixture": "{'docs': {'path': 'DOCS', 'weight': 1}, ' ': {'path': 'DOCS', 'weight': 1}}"},  # (eval_loss/ )
     r"data.mixture has a source named ' '; give each source a name for its metrics and messages, e.g. 'web' "
     r"\(eval_loss/web\)$"),
])
def test_bad_mixtures_and_lengths_are_one_line(prepared, tmp_path, capsys, change, message):
    key, value = next(iter(change.items()))
    mixture = value.replace("DOCS", str(prepared[0])) if key == "mixture" \
        else f"{{'docs': {{'path': '{prepared[0]}', 'weight': 1.0}}}}"
    config = mixture_config(tmp_path, mixture)
    workdir = tmp_path / "run"
    args = ["train", "--config", str(config), "--workdir", str(workdir), "--config.model.vocab_size=512"]
    if key != "mixture":
        args.append(f"--config.data.{key}={value}" if key.startswith("mixture") else f"--config.{key}={value}")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not workdir.exists()


def test_a_resume_on_other_documents_of_the_same_size_is_refused(prepared, tokenizer_path, tmp_path, capsys):
    """Counts alone would pass data prepared from other text of the same size; the corpus
    fingerprint does not. (Words in another order: SentencePiece pieces never span a space, so
    every count stays the same.)"""
    texts = tmp_path / "texts"
    shutil.copytree(prepared[1].parent / "texts", texts)
    (texts / "0.txt").write_text(" ".join(reversed((texts / "0.txt").read_text().split())), encoding="utf-8")
    other = tmp_path / "other-prepared"
    prepare(data_config(tokenizer_path, source="text", files=[str(texts / "*.txt")], eval_fraction=0.2),
            other, workers=1, progress=False)
    mine, theirs = open_prepared(prepared[1]), open_prepared(other)
    assert [(s.documents, s.tokens) for s in mine.splits.values()] == \
           [(s.documents, s.tokens) for s in theirs.splits.values()]
    assert mine.manifest["corpus_sha256"] != theirs.manifest["corpus_sha256"]
    run = [f"--config.data.path={prepared[1]}", "--config.data.source=prepared", "--config.train.eval_every=0"]
    assert train(tmp_path / "run", *run, "--config.train.steps=2") == 0
    capsys.readouterr()
    assert train(tmp_path / "run", *run, "--config.train.steps=4", f"--config.data.path={other}") == 2
    err = capsys.readouterr().err
    assert f"corpus sha256 {mine.manifest['corpus_sha256'][:12]}" in err and "a resume continues the same" in err
    missing = tmp_path / "no.model"
    assert train(tmp_path / "run", *run, "--config.train.steps=4", f"--config.data.tokenizer={missing}") == 2
    assert f"data.tokenizer={tmp_path / 'no.model'}: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["append", "remove", "replace"])
def test_files_changed_while_being_prepared_are_refused(tmp_path, change):
    files = [tmp_path / f"{i}.jsonl" for i in range(2)]
    for i, file in enumerate(files):
        file.write_text("".join(json.dumps({"text": f"document {i}.{j}"}) + "\n" for j in range(5)))
    corpus = open_corpus(data_config(None, source="jsonl", files=[str(tmp_path / "*.jsonl")], eval_fraction=0.0))
    documents = corpus.documents("train")
    assert next(documents) == (0, "document 0.0")
    lines = files[1].read_text().splitlines(keepends=True)
    edited = {"append": lines + [json.dumps({"text": "one more"}) + "\n"], "remove": lines[:-1],
              "replace": lines[:-1] + [json.dumps({"text": "document 1.X"}) + "\n"]}[change]
    files[1].write_text("".join(edited))
    with pytest.raises(ValueError, match=r"changed while they were being prepared .* into a new --output"):
        list(documents)
