"""`llama-jax prepare-data` and its reader: the token shards hold exactly what the tokenizer gives
for each document, the files are independent of the number of workers and of interruptions, and
every kind of bad input is one line with nothing written.

The corpus is a JSONL file of a few hundred paragraphs of `pydoc_data.topics` (plus non-ASCII and
empty documents); shards hold SHARD_TOKENS tokens, so each split spans many shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama_jax import prepare as prepare_lib
from llama_jax.cli import main
from llama_jax.data import EmbeddedCorpus, split_indices
from llama_jax.experiment import base_config, load_config
from llama_jax.prepare import open_prepared, prepare, verify
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

ROOT = Path(__file__).parents[1]
SHARD_TOKENS = 500
EVAL_FRACTION = 0.1
CONFIG = """from llama_jax.experiment import base_config


def get_config():
    config = base_config("debug")
    config.data.update(source="jsonl", files=[{files!r}], tokenizer={tokenizer!r}, eval_fraction={eval_fraction})
    return config
"""


def corpus_documents() -> list[str]:
    """Every 8th paragraph of the embedded help texts, an empty document and some non-ASCII ones."""
    topics = EmbeddedCorpus()
    paragraphs = [p for i in range(len(topics)) for p in topics[i].split("\n\n") if p.strip()]
    return paragraphs[::8] + ["", "naïve café, Ünïcödé ✓ — 𝔘𝔫𝔦", "x" * 700, "\n"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """The corpus file, its documents, two tokenizers and a config file naming them."""
    root = tmp_path_factory.mktemp("prepare_inputs")
    documents = corpus_documents()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    topics = EmbeddedCorpus()
    tokenizer = train_sentencepiece((topics[i] for i in range(len(topics))), root / "tok" / "tokenizer.model", 512)
    other = train_sentencepiece((topics[i] for i in range(len(topics))), root / "other.model", 600)
    config = root / "config.py"
    config.write_text(CONFIG.format(files=str(corpus), tokenizer=str(tokenizer), eval_fraction=EVAL_FRACTION))
    return dict(root=root, documents=documents, corpus=corpus, tokenizer=tokenizer, other=other, config=config)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """The corpus prepared in one uninterrupted run, in this process."""
    out = tmp_path_factory.mktemp("prepared") / "ref"
    prepare(load_config(inputs["config"]).data, out, workers=1, shard_tokens=SHARD_TOKENS, progress=False)
    return out


def expected_splits(inputs) -> dict[str, list[int]]:
    train, held_out = split_indices(len(inputs["documents"]), EVAL_FRACTION)
    return {"train": [int(i) for i in train], "held_out": [int(i) for i in held_out]}


def file_contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def snapshot(*directories: Path) -> dict[str, tuple[int, int]]:
    """Every path under `directories` (themselves included) -> (size, mtime_ns)."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for d in directories for p in [d, *sorted(d.rglob("*"))]}


def test_shards_hold_every_document_as_the_tokenizer_encodes_it(inputs, reference):
    tokenizer = load_tokenizer(inputs["tokenizer"])
    documents = inputs["documents"]
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["format"] == "llama_jax/prepared-v1" and manifest["token_dtype"] == "uint16"
    assert manifest["tokenizer"] == {"file": "tokenizer.model", "sha256": hashlib.sha256(
        inputs["tokenizer"].read_bytes()).hexdigest(), "vocab_size": 512, "bos_id": 1, "eos_id": 2}
    assert (reference / "tokenizer.model").read_bytes() == inputs["tokenizer"].read_bytes()
    assert manifest["data"]["files"] == [str(inputs["corpus"])]
    prepared = open_prepared(reference)
    for split, indices in expected_splits(inputs).items():
        encoded = [tokenizer.encode(documents[i], bos=True, eos=True) for i in indices]
        summary, reader = manifest["splits"][split], prepared.splits[split]
        assert summary["documents"] == reader.documents == len(indices)
        assert summary["tokens"] == reader.tokens == sum(map(len, encoded))
        assert summary["bytes"] == reader.bytes == sum(len(documents[i].encode("utf-8")) for i in indices)
        assert len(summary["shards"]) > 2
        assert summary["shards"] == [f"{split}-{k:05d}" for k in range(len(summary["shards"]))]
        # The files themselves, read without the reader.
        stream, rows, first = [], [], 0
        for name in summary["shards"]:
            tokens = np.fromfile(reference / f"{name}.tokens.bin", np.dtype("<u2"))
            index = np.load(reference / f"{name}.index.npy", allow_pickle=False)
            record = json.loads((reference / f"{name}.json").read_text())
            assert record == {"first_document": first, "documents": len(index), "tokens": len(tokens), "sha256": {
                "tokens": hashlib.sha256((reference / f"{name}.tokens.bin").read_bytes()).hexdigest(),
                "index": hashlib.sha256((reference / f"{name}.index.npy").read_bytes()).hexdigest()}}
            assert index.dtype == np.int64 and index.shape == (len(index), 3)
            lengths = [len(encoded[d]) for d in range(first, first + len(index))]
            assert list(index[:, 0]) == list(np.cumsum([0] + lengths[:-1]))
            is_last = name == summary["shards"][-1]
            assert is_last or len(tokens) - lengths[-1] < SHARD_TOKENS <= len(tokens)  # closes once full
            stream.append(tokens)
            rows.append(index)
            first += len(index)
        rows = np.concatenate(rows)
        assert np.concatenate(stream).tolist() == [t for ids in encoded for t in ids]
        assert rows[:, 1].tolist() == indices
        assert rows[:, 2].tolist() == [len(documents[i].encode("utf-8")) for i in indices]
        for d, i in enumerate(indices):
            assert reader.document_tokens(d).tolist() == encoded[d]
            assert reader.document_info(d)[1:] == (i, len(documents[i].encode("utf-8")))


def test_workers_give_byte_identical_directories(inputs, reference, tmp_path, monkeypatch, capsys):
    """... and without a terminal (a job's log) the progress is a line now and then, not a bar."""
    monkeypatch.setattr(prepare_lib, "CHUNK_CHARS", 2000)  # many chunks, so both workers get some
    monkeypatch.setattr(prepare_lib, "PROGRESS_LINE_SECONDS", 0.0)  # a line per chunk
    manifest = prepare(load_config(inputs["config"]).data, tmp_path / "two", workers=2, shard_tokens=SHARD_TOKENS)
    assert manifest == json.loads((reference / "manifest.json").read_text())
    assert file_contents(tmp_path / "two") == file_contents(reference)
    said = capsys.readouterr().err.splitlines()
    total = len(inputs["documents"])
    assert len(said) > 2 and all(re.fullmatch(rf"preparing {tmp_path / 'two'}: [\d,]+ of {total:,} documents "
                                              rf"\(\d+\.\d%\), [\d,]+ tokens/s", line) for line in said), said
    assert said[-1].startswith(f"preparing {tmp_path / 'two'}: {total:,} of {total:,} documents (100.0%)")


@pytest.mark.parametrize("noticed", [False, True])
def test_a_worker_that_dies_is_one_line(inputs, noticed):
    """A tokenizer worker killed (as the out-of-memory killer would) is reported, not a traceback:
    found by a result, or (`noticed`: the pool found it dead while this process wrote a shard) by
    the next submit."""
    encoder = prepare_lib.Encoder(inputs["tokenizer"], np.dtype(np.uint16), workers=2)
    try:
        pool = encoder._started()
        pool.submit(int).result()  # the workers are up
        os.kill(next(iter(pool._processes)), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while noticed and not pool._broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool._broken or not noticed
        with pytest.raises(ChildProcessError, match=r"^a tokenizer worker process died \(killed, or out of memory"):
            list(encoder.encode(enumerate(inputs["documents"])))
    finally:
        encoder.close()


def test_a_script_calling_prepare_without_a_main_guard_is_told_why(inputs, tmp_path):
    """The workers start with `spawn`, which imports the calling script again: one that calls
    `prepare` at its top level called it again in each worker, which found the directory locked and
    died; the caller said only that a worker died (killed, or out of memory?). The worker now says
    why, and the script guarded as it says runs."""
    call = (f"from llama_jax.experiment import load_config\nfrom llama_jax.prepare import prepare\n"
            f"prepare(load_config({str(inputs['config'])!r}).data, {str(tmp_path / 'out')!r}, workers=2, "
            f"progress=False)\n")
    script = tmp_path / "script.py"
    script.write_text(call)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode != 0
    assert ("RuntimeError: llama_jax.prepare.prepare was called again in a tokenizer worker as it started: the "
            "workers are started with `spawn`, which imports the calling script again; call it under "
            "`if __name__ == \"__main__\":` (or with workers=1)") in ran.stderr
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    script.write_text('if __name__ == "__main__":\n' + "".join(f"    {line}\n" for line in call.splitlines()))
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert open_prepared(tmp_path / "out").manifest["splits"].keys() == {"train", "held_out"}


SIGTERM_IN_SHUTDOWN = """
import os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
import numpy as np
from llama_jax import prepare, signals

shutdown = ProcessPoolExecutor.shutdown
def shutdown_after_a_signal(pool, *args, **kwargs):  # SIGTERM lands on the shutdown's first line
    os.kill(os.getpid(), signal.SIGTERM)
    return shutdown(pool, *args, **kwargs)
ProcessPoolExecutor.shutdown = shutdown_after_a_signal

def main():
    encoder = prepare.Encoder(sys.argv[1], np.dtype(np.uint16), workers=2)
    try:
        with signals.raising_signals():
            try:
                print(sum(len(c.lengths) for c in encoder.encode(enumerate(["one", "two", "three"]))), flush=True)
            finally:
                encoder.close()
            time.sleep(60)  # the command goes on; a signal held back during the shutdown ends it here
    except signals.Terminated:
        print("terminated", flush=True)
    os._exit(143)  # as the command line leaves after a signal: without the interpreter's teardown


if __name__ == "__main__":  # (the spawned workers import this file)
    main()
"""


def test_sigterm_while_the_workers_stop_leaves_no_semaphores(inputs, tmp_path):
    """The tokenizer pool's queues hold named semaphores, released when the pool has shut down;
    a SIGTERM inside the shutdown waits until it is done, or the multiprocessing resource tracker
    finds them leaked when the command exits (a warning after its last line)."""
    script = tmp_path / "sigterm_in_shutdown.py"
    script.write_text(SIGTERM_IN_SHUTDOWN)
    done = subprocess.run([sys.executable, str(script), str(inputs["tokenizer"])], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 143 and done.stdout.split() == ["3", "terminated"], done
    assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def test_ctrl_c_in_the_terminal_stops_the_preparation_in_one_line(inputs, tmp_path):
    """Ctrl-C reaches the tokenizer workers too (the whole process group): they leave stopping to
    the command, which says `interrupted` last, with no worker's traceback before it. Pressed as
    soon as the first worker process exists: one still starting up must not take it either."""
    command = [sys.executable, "-m", "llama_jax.cli", "prepare-data", "--config", str(inputs["config"]),
               "--output", str(tmp_path / "out"), "--workers", "2", "--shard-tokens", str(SHARD_TOKENS)]
    env = {**os.environ, prepare_lib.PAUSE_ENV: "0.2", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # a terminal of its own
    try:
        deadline = time.monotonic() + 60
        while len(_children(process.pid)) < 2:  # multiprocessing's resource tracker, then the first worker
            assert process.poll() is None and time.monotonic() < deadline, "no worker process was started"
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    assert err.rstrip("\n").endswith("llama-jax prepare-data: interrupted") and "Traceback" not in err, err


def test_killed_preparation_resumes_to_the_same_files(inputs, reference, tmp_path, capsys):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llama_jax.cli", "prepare-data", "--config", str(inputs["config"]),
               "--output", str(out), "--workers", "2", "--shard-tokens", str(SHARD_TOKENS)]
    env = {**os.environ, prepare_lib.PAUSE_ENV: "0.2", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not (out / "train-00001.json").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no shard was finished in time"
            time.sleep(0.02)
        workers = _children(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (out / "manifest.json").exists()
        left = sorted(p.name for p in out.iterdir())
        finished = [n for n in left if n.startswith("train-") and n.endswith(".json")]
        assert "train-00000.json" in finished and len(finished) < len(list(reference.glob("train-*.json")))
        deadline = time.monotonic() + 15  # the worker processes end with their parent
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    finally:
        for pid in [process.pid] + workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    (out / "train-00005.tokens.bin.tmp").write_bytes(b"\x01\x02" * 7)  # as a kill mid-shard leaves it
    (out / ".manifest.json.tmp-0123abcd").write_text("{")
    stage = Path(f"{out.parent}/.{out.name}.tmp-{socket.gethostname()}-{process.pid}-89abcdef")  # a killed _start's
    (stage / "tokenizer.model").parent.mkdir()

    # resumed without --shard-tokens: with the shard size it was started with, not the default
    assert main(["prepare-data", "--config", str(inputs["config"]), "--output", str(out), "--workers", "1"]) == 0
    assert "tokenized" in capsys.readouterr().out
    assert file_contents(out) == file_contents(reference)
    assert not stage.exists()  # the process that staged it is gone

    before = snapshot(out)
    assert main(["prepare-data", "--config", str(inputs["config"]), "--output", str(out), "--verify"]) == 0
    printed = capsys.readouterr()
    assert "is already prepared" in printed.out and "already prepared: nothing tokenized" in printed.out
    assert "verified" in printed.out
    assert snapshot(out) == before


def test_a_resume_removes_what_a_kill_left_of_shards_past_99999(inputs, reference, tmp_path):
    """Shard names have five digits up to shard 99,999 and more after it (a corpus of 10**8 documents
    in shards of 2**16 tokens has more): a resume removes the unfinished files of those too."""
    out = tmp_path / "many"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()  # as a preparation killed before its end leaves it
    (out / "train-100000.tokens.bin.tmp").write_bytes(b"\x01\x02" * 7)  # as a kill mid-shard leaves it
    (out / ".train-100000.json.tmp-0123abcd").write_text("{")
    prepare(load_config(inputs["config"]).data, out, workers=1, progress=False)
    assert file_contents(out) == file_contents(reference)


def test_a_second_preparation_of_the_same_output_is_refused(inputs, reference, tmp_path, capsys):
    """Two prepare-data writing one --output would write over each other's shards: the second,
    started while the first runs, is refused in one line, and the first finishes unharmed."""
    out = tmp_path / "out"
    args = ["prepare-data", "--config", str(inputs["config"]), "--output", str(out), "--workers", "1",
            "--shard-tokens", str(SHARD_TOKENS)]
    env = {**os.environ, prepare_lib.PAUSE_ENV: "0.2", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    first = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train-00000.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, "no shard was finished in time"
            time.sleep(0.02)
        capsys.readouterr()
        assert main(args) == 2
        assert capsys.readouterr().err == (f"llama-jax prepare-data: error: {out} is being prepared by another "
                                           f"llama-jax process (it holds the directory's lock); wait for it to end, "
                                           f"or give another --output\n")
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        first.kill()
    assert file_contents(out) == file_contents(reference)


def test_an_interrupted_preparation_does_not_resume_on_edited_files(tmp_path, capsys):
    """Shards already written hold the old documents: finishing with the new ones would mix two corpora.
    A finished directory is not compared with the files again (they may be gone), and says so."""
    corpus, topics = tmp_path / "corpus.jsonl", EmbeddedCorpus()
    documents = [topics[i][:400] for i in range(len(topics))]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    tokenizer = train_sentencepiece(documents, tmp_path / "tokenizer.model", 512)
    data = base_config().data
    data.update(source="jsonl", files=[str(corpus)], tokenizer=str(tokenizer), eval_fraction=EVAL_FRACTION)
    out = tmp_path / "prepared"
    prepare(data, out, workers=1, shard_tokens=SHARD_TOKENS, progress=False)
    (out / "manifest.json").unlink()  # as if it had been stopped before its last shard
    resumed = prepare(data, out, workers=1, shard_tokens=SHARD_TOKENS, progress=False)  # the same files: it resumes
    (out / "manifest.json").unlink()
    corpus.write_text("".join(json.dumps({"text": text.upper()}) + "\n" for text in documents))  # as many documents
    with pytest.raises(ValueError, match=rf"{out} was started on other documents \(corpus sha256 "
                                         rf"{resumed['corpus_sha256'][:12]}, now \w{{12}}\): the corpus changed"):
        prepare(data, out, workers=1, shard_tokens=SHARD_TOKENS, progress=False)
    finished = tmp_path / "finished"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    assert prepare(data, finished, workers=1, shard_tokens=SHARD_TOKENS, progress=False) == resumed
    corpus.unlink()
    capsys.readouterr()
    assert prepare(data, finished, workers=1, shard_tokens=SHARD_TOKENS) == resumed
    assert "nothing to do (the documents are not read again: for an edited corpus give another --output)" \
        in capsys.readouterr().out
    assert prepare(data, finished, workers=1, progress=False) == resumed  # no shard size asked for: its own
    written = (finished / "manifest.json").read_text()
    earlier = {k: v for k, v in json.loads(written).items() if k != "shard_tokens"}  # an earlier release's manifest
    for manifest in (written, json.dumps(earlier)):
        (finished / "manifest.json").write_text(manifest)
        with pytest.raises(ValueError, match=rf"^{finished} is already prepared with shard_tokens={SHARD_TOKENS}, "
                                             rf"not 999; leave --shard-tokens out to use it as it is, or give another "
                                             rf"--output \(a prepared directory is never overwritten\)$"):
            prepare(data, finished, workers=1, shard_tokens=999, progress=False)
    (finished / "manifest.json").write_text(written)
    # a caller other than prepare-data (a sweep) names its own way to another directory
    assert prepare(data, finished, workers=1, shard_tokens=SHARD_TOKENS, elsewhere="use another --workdir") == resumed
    assert "for an edited corpus use another --workdir)" in capsys.readouterr().out
    # its own output damaged: preparing again means removing it first
    (finished / "manifest.json").write_text("")
    with pytest.raises(ValueError, match=rf"^{finished}/manifest.json cannot be read \(.*\); remove {finished} to "
                                         rf"prepare it again, or give another --output$"):
        prepare(data, finished, workers=1, shard_tokens=SHARD_TOKENS, progress=False)


def test_an_interrupted_preparation_of_the_help_texts_does_not_resume_on_another_releases(inputs, tmp_path,
                                                                                          monkeypatch):
    """pydoc_data.topics changes between Python releases (as many topics, other words): shards already
    written hold the texts the preparation started with, so a resume on others is refused."""
    from pydoc_data import topics

    data = base_config().data
    data.update(source="embedded", tokenizer=str(inputs["tokenizer"]), eval_fraction=EVAL_FRACTION)
    out = tmp_path / "prepared"
    started = prepare(data, out, workers=1, shard_tokens=50_000, progress=False)
    assert started["corpus_sha256"] == EmbeddedCorpus().sha256
    (out / "manifest.json").unlink()  # as if it had been stopped before its last shard
    first = sorted(topics.topics)[0]
    monkeypatch.setitem(topics.topics, first, topics.topics[first].upper())
    with pytest.raises(ValueError, match=rf"^{out} was started on other documents \(corpus sha256 "
                                         rf"{started['corpus_sha256'][:12]}, now \w{{12}}\): the corpus changed"):
        prepare(data, out, workers=1, progress=False)


def test_reader_streams_across_shards(inputs, reference):
    tokenizer = load_tokenizer(inputs["tokenizer"])
    train = expected_splits(inputs)["train"]
    encoded = [tokenizer.encode(inputs["documents"][i], bos=True, eos=True) for i in train]
    stream = np.array([t for ids in encoded for t in ids], np.int32)
    starts = np.cumsum([0] + [len(ids) for ids in encoded[:-1]])
    split = open_prepared(reference).splits["train"]
    assert split.tokens == len(stream) and split.documents == len(encoded)
    shard_ends = np.cumsum([json.loads((reference / f"{n}.json").read_text())["tokens"] for n in split.shard_names])
    rng = np.random.default_rng(0)
    ranges = [(0, len(stream)), (0, 0), (len(stream), len(stream)), (5, 5)]
    ranges += [(max(0, e - a), min(len(stream), e + b)) for e in shard_ends for a, b in ((1, 1), (3, 700), (0, 2))]
    ranges += [tuple(sorted(rng.integers(0, len(stream) + 1, 2))) for _ in range(40)]
    for start, stop in ranges:
        window = split.token_range(int(start), int(stop))
        assert window.dtype == np.int32 and np.array_equal(window, stream[start:stop]), (start, stop)
        found = split.document_starts_in(int(start), int(stop))
        assert found.dtype == np.int64 and found.tolist() == [s for s in starts if start <= s < stop]
    assert split.document_starts_in(0, len(stream)).tolist() == starts.tolist()
    for offset in [0, 1, len(stream) - 1, *shard_ends[:-1], *(shard_ends[:-1] - 1), *rng.integers(0, len(stream), 50)]:
        d = split.document_at(int(offset))
        assert d == np.searchsorted(starts, offset, side="right") - 1
        assert split.document_info(d)[0] <= offset < split.document_info(d)[0] + len(split.document_tokens(d))
    for d in range(split.documents):
        assert split.document_info(d)[0] == starts[d] and split.document_at(int(starts[d])) == d
    with pytest.raises(IndexError):
        split.token_range(0, len(stream) + 1)
    with pytest.raises(IndexError):
        split.document_at(len(stream))


def test_trained_tokenizer_and_no_held_out_split(inputs, tmp_path):
    data = load_config(inputs["config"]).data
    data.update(tokenizer="train", tokenizer_vocab_size=400, eval_fraction=0.0)
    manifest = prepare(data, tmp_path / "trained", workers=1, shard_tokens=SHARD_TOKENS, progress=False)
    expected = train_sentencepiece(inputs["documents"], tmp_path / "expected.model", 400)
    assert (tmp_path / "trained" / "tokenizer.model").read_bytes() == expected.read_bytes()
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(expected.read_bytes()).hexdigest()
    assert manifest["splits"]["held_out"] == {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
    assert manifest["splits"]["train"]["documents"] == len(inputs["documents"])
    split = open_prepared(tmp_path / "trained").splits["train"]
    tokenizer = load_tokenizer(expected)
    assert split.document_tokens(3).tolist() == tokenizer.encode(inputs["documents"][3], bos=True, eos=True)
    before = snapshot(tmp_path / "trained")
    assert prepare(data, tmp_path / "trained", progress=False) == manifest  # found prepared: not trained again
    assert snapshot(tmp_path / "trained") == before


# ---- bad input ---------------------------------------------------------------------------------------------------


def damaged_copy(reference: Path, case: Path, damage: str) -> Path:
    out = case / "prepared"
    shutil.copytree(reference, out)
    if damage == "truncate":
        with open(out / "train-00001.tokens.bin", "r+b") as f:
            f.truncate(100)
    elif damage == "remove-index":
        (out / "train-00002.index.npy").unlink()
    elif damage == "remove-manifest":
        (out / "manifest.json").unlink()
    elif damage == "flip":
        data = bytearray((out / "held_out-00000.tokens.bin").read_bytes())
        data[10] ^= 1
        (out / "held_out-00000.tokens.bin").write_bytes(bytes(data))
    elif damage == "unhashed-shard":  # a shard record without the sha256 of its files
        record = json.loads((out / "train-00000.json").read_text())
        del record["sha256"]
        (out / "train-00000.json").write_text(json.dumps(record))
    elif damage == "shards-elsewhere":  # the shards of another prepared directory, whose hashes match
        manifest = json.loads((out / "manifest.json").read_text())
        train = manifest["splits"]["train"]
        train["shards"] = [str(reference / name) for name in train["shards"]]
        (out / "manifest.json").write_text(json.dumps(manifest))
        for own in out.glob("train-*"):
            own.unlink()
    elif damage == "held-out-lists-train":  # evaluation would read training documents
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["splits"]["held_out"] = manifest["splits"]["train"]
        (out / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "unlisted-shard":  # the last train shard left out of the manifest, its counts too
        manifest = json.loads((out / "manifest.json").read_text())
        train = manifest["splits"]["train"]
        last = json.loads((out / f"{train['shards'].pop()}.json").read_text())
        train["documents"] -= last["documents"]
        train["tokens"] -= last["tokens"]
        (out / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "token-beyond-vocab":
        tokens = np.fromfile(out / "train-00001.tokens.bin", "<u2")
        tokens[7] = 60000
        tokens.tofile(out / "train-00001.tokens.bin")
    return out


PREPARE = ["prepare-data", "--config", "{config}", "--output", "{case}/out"]
CASES = [
    ("empty-corpus", PREPARE + ["--config.data.files=['{case}/empty.jsonl']"],
     r"files \['\S+/empty.jsonl'\] holds no documents; give a corpus with text in it"),
    ("blank-documents", PREPARE + ["--config.data.files=['{case}/blank.jsonl']"],
     r"files \['\S+/blank.jsonl'\] holds no non-empty document"),
    ("files-missing", PREPARE + ["--config.data.files=['{case}/nowhere/*.jsonl']"],
     r"no file matches '\S+/nowhere/\*.jsonl'"),
    ("unknown-source", PREPARE + ["--config.data.source=web"],
     r"data.source='web' is not supported; valid: embedded, stdlib, text, jsonl, tfds$"),
    ("prepared-source", PREPARE + ["--config.data.source=prepared"],
     r"data.source='prepared' has no documents to prepare; valid: embedded, stdlib, text, jsonl, tfds$"),
    ("synthetic-source", PREPARE + ["--config.data.source=synthetic"],
     r"data.source='synthetic' has no documents to prepare; valid: embedded, stdlib, text, jsonl, tfds"),
    ("tokenizer-missing", PREPARE + ["--config.data.tokenizer={case}/nope.model"], r"\S+/nope.model: no such file"),
    ("tokenizer-unset", PREPARE + ["--config.data.tokenizer="], r"data.tokenizer is empty; give a tokenizer.model"),
    ("tokenizer-training-fails", PREPARE + ["--config.data.tokenizer=train", "--config.data.tokenizer_vocab_size=10"],
     r"sentencepiece training failed: a vocabulary of 10 pieces cannot hold the \d+ that training needs .*; "
     r"give a vocabulary size of at least \d+"),
    ("no-config", ["prepare-data", "--output", "{case}/out"], r"--config is required to prepare data"),
    ("override-not-read", ["prepare-data", "--config", "{config}", "--output", "{case}/out",
                           "--config.model.vocab_size=512"],
     r"--config.model.vocab_size=512: llama-jax prepare-data reads only the data section\(s\) of the config"),
    ("output-empty", ["prepare-data", "--config", "{config}", "--output", ""],
     r"--output is empty; give a value"),
    ("output-in-a-runs-checkpoints", ["prepare-data", "--config", "{config}", "--output", "{run}/checkpoints/99"],
     r"--output \S+/run/checkpoints/99 is inside the run \S+/run; give a directory outside it"),
    ("output-in-a-model-directory", ["prepare-data", "--config", "{config}", "--output", "{model}/data"],
     r"--output \S+/model/data is inside the model directory \S+/model; give a directory outside it"),
    ("output-an-existing-folder-in-a-models-params", ["prepare-data", "--config", "{config}", "--output",
                                                      "{model}/params/data"],  # an --overwrite of the model deletes it
     r"--output \S+/model/params/data is inside the model directory \S+/model; give a directory outside it$"),
    # an existing empty folder inside a run or a model directory, made by hand, is refused as a new one is
    ("output-an-existing-empty-folder-in-a-run", ["prepare-data", "--config", "{config}", "--output", "{run}/notes"],
     r"--output \S+/run/notes is inside the run \S+/run; give a directory outside it$"),
    ("output-an-existing-empty-folder-in-a-model-directory", ["prepare-data", "--config", "{config}", "--output",
                                                              "{model}/notes"],
     r"--output \S+/model/notes is inside the model directory \S+/model; give a directory outside it$"),
    # a run, a model directory or a sweep itself holds files of its own, and no prepared data
    ("output-is-a-run", ["prepare-data", "--config", "{config}", "--output", "{run}"],
     r"\S+/run holds 'checkpoints' \(and 2 more\) but no prepared data \(manifest.json or preparing.json\)"),
    ("output-is-a-model-directory", ["prepare-data", "--config", "{config}", "--output", "{model}"],
     r"\S+/model holds 'model_config.json' \(and 2 more\) but no prepared data"),
    ("output-is-a-sweep", ["prepare-data", "--config", "{config}", "--output", "{sweep}"],
     r"\S+/sweep holds 'sweep.json' but no prepared data"),
    ("output-is-a-file", ["prepare-data", "--config", "{config}", "--output", "{case}/empty.jsonl"],
     r"\S+/empty.jsonl is a file, not a directory"),
    ("output-holds-other-files", ["prepare-data", "--config", "{config}", "--output", "{case}"],
     r"\S+ holds 'blank.jsonl' \(and 1 more\) but no prepared data"),
    ("finished-with-other-settings", ["prepare-data", "--config", "{config}", "--output", "{reference}",
                                      "--config.data.eval_fraction=0.2"],
     r"\S+/ref is already prepared with data.eval_fraction=0.1, not 0.2; give another --output \(a prepared "
     r"directory is never overwritten\)$"),
    ("finished-with-other-tokenizer", ["prepare-data", "--config", "{config}", "--output", "{reference}",
                                       "--config.data.tokenizer={other}"],
     r"\S+/ref is already prepared with another tokenizer \(sha256 \w+\) than data.tokenizer=\S+other.model"),
    ("finished-with-other-shard-tokens", ["prepare-data", "--config", "{config}", "--output", "{reference}",
                                          "--shard-tokens", "999"],
     r"\S+/ref is already prepared with shard_tokens=500, not 999; leave --shard-tokens out to use it as it is, or "
     r"give another --output \(a prepared directory is never overwritten\)$"),
    ("partial-with-other-settings", ["prepare-data", "--config", "{config}", "--output", "{remove-manifest}",
                                     "--config.data.eval_fraction=0.2"],
     r"\S+/prepared was started with data.eval_fraction=0.1, not 0.2; resume with the same settings"),
    ("partial-with-other-shard-tokens", ["prepare-data", "--config", "{config}", "--output", "{remove-manifest}",
                                         "--shard-tokens", "999"],
     r"\S+/prepared was started with shard_tokens=500, not 999; resume with --shard-tokens 500"),
    ("verify-with-workers", ["prepare-data", "--verify", "--output", "{reference}", "--workers", "4"],
     r"--workers: --verify without --config checks the prepared shards and tokenizes nothing; drop --workers$"),
    ("verify-unfinished", ["prepare-data", "--verify", "--output", "{remove-manifest}"],
     r"\S+/prepared: the preparation did not finish \(no manifest.json\)"),
    ("truncated-shard", ["prepare-data", "--verify", "--output", "{truncate}"],
     r"\S+/train-00001.tokens.bin is truncated: 100 bytes, expected \d+ \(\d+ uint16 tokens\); remove \S+/prepared "
     r"to prepare it again, or give another --output$"),
    ("missing-shard-file", ["prepare-data", "--verify", "--output", "{remove-index}"],
     r"\S+/train-00002.index.npy is missing; remove \S+/prepared to prepare it again, or give another --output$"),
    ("damaged-shard", ["prepare-data", "--verify", "--output", "{flip}"],
     r"\S+/held_out-00000.tokens.bin does not match the sha256 recorded in held_out-00000.json"),
    ("unhashed-shard", ["prepare-data", "--verify", "--output", "{unhashed-shard}"],
     r"\S+/prepared/train-00000.json records no sha256 of its tokens file; remove \S+/prepared to prepare it again"),
    # preparing a finished directory again reads it as a run would: "nothing to do" is not said of a damaged one
    ("finished-but-truncated", ["prepare-data", "--config", "{config}", "--output", "{truncate}"],
     r"\S+/train-00001.tokens.bin is truncated: 100 bytes, expected \d+ \(\d+ uint16 tokens\); remove "
     r"\S+/prepared to prepare it again, or give another --output$"),
    ("shards-elsewhere", ["prepare-data", "--verify", "--output", "{shards-elsewhere}"],
     r"\S+/manifest.json: split train lists the shard '\S+/ref/train-00000', which is not the name of a file in "
     r"\S+/prepared; remove \S+/prepared to prepare it again, or give another --output$"),
    ("held-out-lists-train", ["prepare-data", "--verify", "--output", "{held-out-lists-train}"],
     r"\S+/manifest.json: split held_out lists the shard 'train-00000' as its shard 0, expected 'held_out-00000'; "
     r"remove \S+/prepared to prepare it again"),
    ("unlisted-shard", ["prepare-data", "--verify", "--output", "{unlisted-shard}"],
     r"\S+/prepared/train-\d{5}.json is a shard that \S+/manifest.json does not list \(split train lists \d+\); "
     r"remove \S+/prepared to prepare it again"),
]


@pytest.mark.parametrize("args, error", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(args, error, inputs, reference, tmp_path, capsys, monkeypatch):
    case = tmp_path / "case"
    case.mkdir()
    (case / "empty.jsonl").write_text("")
    (case / "blank.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    owners = tmp_path / "owners"  # a run (its resolved config.json) and a model directory
    (owners / "run" / "checkpoints").mkdir(parents=True)
    (owners / "run" / "config.json").write_text(json.dumps({"model": {}, "train": {}, "checkpoint": {}}))
    (owners / "model").mkdir()
    (owners / "model" / "model_config.json").write_text("{}")
    (owners / "model" / "params" / "data").mkdir(parents=True)  # an empty folder made there by hand
    (owners / "run" / "notes").mkdir(), (owners / "model" / "notes").mkdir()  # likewise
    (owners / "sweep").mkdir()
    (owners / "sweep" / "sweep.json").write_text("{}")
    paths = {"config": inputs["config"], "case": case, "reference": reference, "other": inputs["other"],
             "run": owners / "run", "model": owners / "model", "sweep": owners / "sweep"}
    for damage in ("truncate", "remove-index", "remove-manifest", "flip", "unhashed-shard", "shards-elsewhere",
                   "held-out-lists-train", "unlisted-shard"):
        if any("{" + damage + "}" in a for a in args):
            paths[damage] = damaged_copy(reference, case, damage)
    argv = [re.sub(r"\{([\w-]+)\}", lambda m: str(paths[m.group(1)]), a) for a in args]
    before = snapshot(case, reference, owners)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(r"llama-jax prepare-data: error: .*" + error + ".*", lines[0]), lines[0]
    assert snapshot(case, reference, owners) == before
    assert not list((tmp_path / "tmp").iterdir())  # e.g. no tokenizer trained for nothing


def test_open_prepared_checks(reference, tmp_path):
    sha = json.loads((reference / "manifest.json").read_text())["tokenizer"]["sha256"]
    assert open_prepared(reference, tokenizer_sha256=sha).tokenizer_sha256 == sha
    with pytest.raises(ValueError, match=r"prepared with another tokenizer \(sha256 \w+\) than this run's "
                                         r"\(000000000000\); prepare the data again with it or use the run's"):
        open_prepared(reference, tokenizer_sha256="0" * 64)
    shards = len(list(reference.glob("train-*.json"))) + len(list(reference.glob("held_out-*.json")))
    assert verify(reference)["files"] == 2 * shards
    out = damaged_copy(reference, tmp_path, "truncate")
    with pytest.raises(ValueError, match=r"train-00001.tokens.bin is truncated: 100 bytes"):
        open_prepared(out)
    with pytest.raises(ValueError, match=r"does not exist; give a directory written by llama-jax prepare-data"):
        open_prepared(tmp_path / "nope")


def test_a_token_beyond_the_tokenizer_is_damage_when_read(reference, tmp_path):
    """(An id beyond the model's vocabulary, which its embedding lookup clamps, was trained on
    silently.) The tokens file keeps its size, so the cheap checks on opening pass."""
    out = damaged_copy(reference, tmp_path, "token-beyond-vocab")
    split = open_prepared(out).splits["train"]
    damaged = json.loads((out / "train-00000.json").read_text())["tokens"] + 7  # its stream offset
    error = (r"train-00001.tokens.bin is damaged: it holds the token id 60000, outside the tokenizer's 512 ids; "
             r"remove \S+/prepared to prepare it again")
    with pytest.raises(ValueError, match=error):
        split.token_range(damaged, damaged + 1)
    with pytest.raises(ValueError, match=error):
        split.document_tokens(split.document_at(damaged))
    assert split.token_range(0, damaged).size == damaged  # the tokens before it read as they are


def test_a_manifest_whose_data_record_is_damaged_is_one_line(reference, tmp_path):
    """Its recorded data settings are compared with a run's: a damaged record is named, never a
    traceback."""
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "data": "damaged"}))
    with pytest.raises(ValueError, match=r"manifest.json lacks fields of a llama_jax/prepared-v1 manifest "
                                         r"\(tokenizer, token_dtype, splits, data\); prepare the data again"):
        open_prepared(out)


def test_one_file_pattern_given_as_a_string_is_one_pattern(tmp_path):
    """(A str was read as a list of its characters: "no file matches 't'"; the other readers of
    data.files take it as one pattern.)"""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    settings = {"source": "jsonl", "text_key": "text", "eval_fraction": 0.2}
    as_str = prepare_lib.open_corpus({**settings, "files": str(tmp_path / "a.jsonl")})
    as_list = prepare_lib.open_corpus({**settings, "files": [str(tmp_path / "a.jsonl")]})
    assert as_str.sha256 == as_list.sha256 and [list(i) for i in as_str.indices.values()] == [
        list(i) for i in as_list.indices.values()]


def test_an_output_that_the_file_patterns_match_is_not_read_as_documents(inputs, reference, tmp_path, capsys):
    """`--output docs/prepared` with data.files=['docs/*']: the pattern matched the directory the
    preparation had just created, which failed as "docs/prepared: is a directory" and left it
    half-prepared; a resumed one failed so at once."""
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(inputs["corpus"], docs / "corpus.jsonl")
    config = tmp_path / "config.py"
    config.write_text(CONFIG.format(files=str(docs / "*"), tokenizer=str(inputs["tokenizer"]),
                                    eval_fraction=EVAL_FRACTION))
    out = docs / "prepared"
    args = ["prepare-data", "--config", str(config), "--output", str(out), "--workers", "1",
            "--shard-tokens", str(SHARD_TOKENS)]
    shards = lambda directory: {name: data for name, data in file_contents(directory).items()  # noqa: E731
                                if name.endswith((".bin", ".npy"))}
    assert main(args) == 0, capsys.readouterr().err
    assert shards(out) and shards(out) == shards(reference)
    (out / "manifest.json").unlink()  # as a preparation killed before its end leaves it: resumed
    assert main(args) == 0, capsys.readouterr().err
    assert "resuming the preparation" in capsys.readouterr().out
    assert shards(out) == shards(reference) and (out / "manifest.json").is_file()
