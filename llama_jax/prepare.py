"""A corpus tokenized once into token shards (`llama-jax prepare-data`), and the reader of them.

`prepare(data_config, DIR)` tokenizes the documents of a config's `data` section, each with BOS
first and EOS last, in worker processes, and writes them to DIR (format `llama_jax/prepared-v1`):

    tokenizer.model               a copy of the tokenizer used (or the one trained for data.tokenizer=train)
    preparing.json                the settings (and corpus sha256) the preparation started with; a resumed
                                  preparation must match them
    <split>-<k:05d>.tokens.bin    split = train | held_out: the tokens of the shard's documents, concatenated,
                                  little-endian uint16 (vocab_size <= 65536) or uint32
    <split>-<k:05d>.index.npy     int64 [documents, 3]: offset of the document's first token in the shard,
                                  its index in the source, the UTF-8 bytes of its text
    <split>-<k:05d>.json          {"first_document", "documents", "tokens", "sha256": {"tokens", "index"}},
                                  written once both data files are complete and in place
    manifest.json                 written last: tokenizer, token dtype, shard size, data section, its
                                  document settings (`document_settings`), per-split counts and shards
                                  (and the corpus sha256 of a source that has one: text and JSONL files,
                                  stdlib, embedded; over each document's length and UTF-8 text, in order,
                                  and for stdlib and embedded each one's name too: relative path, topic)

The held-out split is the source's eval split when it has one, else `split_indices(n, eval_fraction)`.
A shard closes once it holds `shard_tokens` tokens; documents are never split. The files depend only
on the documents, the tokenizer and `shard_tokens`: not on the number of workers, and not on
whether the preparation was interrupted and resumed.

`open_prepared(DIR)` reads a finished directory: each split is one stream of tokens, read through
`np.memmap`, with its documents located by the shard indices.

Test hook: with the environment variable LLAMA_JAX_PREPARE_SHARD_PAUSE=SECONDS, preparation sleeps
that long after recording each shard, so tests can interrupt it between shards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llama_jax.data import DOCUMENT_SOURCES, expand_files, make_source, read_files, split_indices
from llama_jax.safe_io import (DirectoryBusy, DirectoryLock, check_writable, file_in_the_way,
                               finish_for_dead_processes, owned_temp_directory, scratch_path, sha256_file,
                               signals_held, write_json_atomic)
from llama_jax.tokenizer import check_trainable_size, load_tokenizer, tokenizer_file, train_sentencepiece

FORMAT = "llama_jax/prepared-v1"
DEFAULT_SHARD_TOKENS = 2**26
SPLITS = ("train", "held_out")
MANIFEST = "manifest.json"
PREPARING = "preparing.json"
TOKENIZER = "tokenizer.model"
CHUNK_CHARS = 1 << 18  # characters of text sent to a worker at a time (a chunk ends after the document crossing it)
CHUNK_DOCUMENTS = 4096  # most documents in one chunk
CHUNKS_PER_WORKER = 2  # chunks in flight per worker: the main process reads no further ahead than this
PAUSE_ENV = "LLAMA_JAX_PREPARE_SHARD_PAUSE"
_SHARD_FILE = re.compile(r"(train|held_out)-\d{5,}\.(tokens\.bin|index\.npy|json)(\.tmp)?")
_ATOMIC_TEMP = re.compile(r"\.(.+?)\.tmp-(?:.+-\d+-)?[0-9a-f]{8}")  # `safe_io.atomic_file`'s (older: no HOST-PID-)
_DOCUMENT_KEYS = {"text": ("files", "text_key"), "jsonl": ("files", "text_key"),
                  "tfds": ("tfds_name", "tfds_split", "tfds_eval_split", "data_dir", "text_key")}


def token_dtype(vocab_size: int) -> np.dtype:
    """The little-endian dtype of a prepared directory's tokens: uint16 up to 65536 ids, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}"


# ---- documents -------------------------------------------------------------------------------


@dataclasses.dataclass
class Corpus:
    """The documents of a `data` section, split into train and held-out.

    `indices[split]` are the source indices of the split's documents in order; `documents(split,
    start)` yields (source index, text) of the split's documents from position `start` on,
    reading only those (random-access sources) or streaming past the earlier ones (files)."""

    indices: dict[str, np.ndarray]
    read: Callable[[str, int], Iterator[tuple[int, str]]]
    sha256: str | None = None  # fingerprint of the documents, for sources that have one (files, stdlib, embedded)

    def documents(self, split: str, start: int = 0) -> Iterator[tuple[int, str]]:
        return self.read(split, start)


def open_corpus(data_config, output: Path | None = None) -> Corpus:
    """The documents `make_source(data_config)` gives, with the held-out split of training.

    Text and JSONL files are streamed from disk (two passes: counting, then reading), so memory
    does not grow with the corpus; other sources are read by index. What a file pattern matches in
    the `output` directory (the preparation's own files, e.g. of `docs/*` into docs/prepared) is no
    document."""
    source = data_config.get("source")
    if source not in DOCUMENT_SOURCES:
        what = "has no documents to prepare" if source in ("synthetic", "prepared") else "is not supported"
        raise ValueError(f"data.source={source!r} {what}; valid: {', '.join(DOCUMENT_SOURCES)}")
    if source in ("text", "jsonl"):
        return _streamed_corpus(data_config, output)
    train, held_out = make_source(data_config)
    origin = f"data.source={source!r}"
    _check_has_text(len(train), (train[i] for i in range(len(train))), origin)
    if held_out is not None:
        indices = {"train": np.arange(len(train)), "held_out": np.arange(len(held_out))}
        sources = {"train": train, "held_out": held_out}
    else:
        indices = dict(zip(SPLITS, split_indices(len(train), _eval_fraction(data_config))))
        sources = {"train": train, "held_out": train}

    def read(split: str, start: int) -> Iterator[tuple[int, str]]:
        return ((int(i), sources[split][int(i)]) for i in indices[split][start:])

    return Corpus(indices, read, getattr(train, "sha256", None))


def _streamed_corpus(data_config, output: Path | None) -> Corpus:
    """The corpus of text or JSONL files, counted and fingerprinted in a first pass; every later
    pass reads the same files and checks that it read the same documents (a ValueError if the
    files changed meanwhile)."""
    files, text_key = data_config.get("files") or [], data_config.get("text_key", "text")
    files = [files] if isinstance(files, str) else list(files)  # (a str is one pattern, not its characters)
    origin = f"files {files!r}"
    own = None if output is None else Path(output).resolve()
    paths = [path for path in expand_files(files) if own is None or not Path(path).resolve().is_relative_to(own)]
    count, has_text, digest = 0, False, hashlib.sha256()
    for text in read_files(paths, text_key):
        count, has_text = count + 1, has_text or bool(text)
        _fingerprint(digest, text)
    _check_has_text(count, [has_text], origin)
    indices = dict(zip(SPLITS, split_indices(count, _eval_fraction(data_config))))
    members = {}
    for split in SPLITS:
        members[split] = np.zeros(count, bool)
        members[split][indices[split]] = True
    changed = ValueError(f"{origin} changed while they were being prepared (the documents read differ from those "
                         f"counted first); prepare them again into a new --output once the files stay unchanged")

    def read(split: str, start: int) -> Iterator[tuple[int, str]]:
        position, again, read_count = 0, hashlib.sha256(), 0
        for i, text in enumerate(read_files(paths, text_key)):
            if i >= count:
                raise changed
            _fingerprint(again, text)
            read_count = i + 1
            if members[split][i]:
                if position >= start:
                    yield i, text
                position += 1
        if read_count != count or again.digest() != digest.digest():
            raise changed

    return Corpus(indices, read, digest.hexdigest())


def _fingerprint(digest, text: str) -> None:
    """Add a document to a corpus fingerprint: its UTF-8 length, then its text."""
    utf8 = text.encode()
    digest.update(len(utf8).to_bytes(8, "little") + utf8)


def _check_has_text(count: int, texts: Iterable, origin: str) -> None:
    if count == 0:
        raise ValueError(f"{origin} holds no documents; give a corpus with text in it")
    if not any(texts):
        raise ValueError(f"{origin} holds no non-empty document; give a corpus with text in it")


def _eval_fraction(data_config) -> float:
    return data_config.get("eval_fraction", 0.01)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def document_settings(data: Any, absolute: bool = True) -> dict:
    """The keys of a `data` section that decide which documents a split holds, local paths made
    absolute (`_absolute`), so that spellings of the same files compare equal; `absolute=False`:
    as they are written."""
    source = data.get("source")
    keys = ["source", *_DOCUMENT_KEYS.get(source, ())]
    if not (source == "tfds" and data.get("tfds_eval_split")):
        keys.append("eval_fraction")
    settings = {key: _jsonable(data.get(key)) for key in keys}
    if not absolute:
        return settings
    if isinstance(settings.get("files"), list):
        settings["files"] = [_absolute(pattern) for pattern in settings["files"]]
    if settings.get("data_dir"):
        settings["data_dir"] = _absolute(settings["data_dir"])
    return settings


def recorded_documents(manifest: dict) -> dict:
    """The document settings a finished directory was prepared with (`document_settings`, paths as
    they were read then); for a directory of an earlier release, which recorded only the data
    section, with its relative paths read from the current directory."""
    recorded = manifest.get("documents")
    return recorded if isinstance(recorded, dict) else document_settings(manifest.get("data") or {})


def _absolute(path: Any) -> Any:
    """A local path or glob (`~` expanded) as an absolute one, read from the current directory;
    URLs (gs://) and non-strings as they are."""
    if not isinstance(path, str) or not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


# ---- the tokenizer ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizerChoice:
    """Which tokenizer a preparation uses: a file (its sha256), or one trained of `trained_vocab_size` pieces."""

    sha256: str | None
    trained_vocab_size: int | None
    file: Path | None = None

    def describe(self) -> str:
        if self.trained_vocab_size is not None and self.file is None:
            return f"trained, data.tokenizer_vocab_size={self.trained_vocab_size}"
        return f"sha256 {self.sha256[:12]}"

    def matches(self, recorded: TokenizerChoice) -> bool:
        if self.sha256 is not None:
            return self.sha256 == recorded.sha256
        return self.trained_vocab_size == recorded.trained_vocab_size


def requested_tokenizer(data_config) -> TokenizerChoice:
    """The tokenizer `data.tokenizer` names (loaded once to check it), or the request to train one."""
    given = data_config.get("tokenizer") or ""
    if given == "train":
        vocab_size = data_config.get("tokenizer_vocab_size")
        check_trainable_size(vocab_size, "data.tokenizer_vocab_size")
        return TokenizerChoice(None, vocab_size)
    if not given:
        raise ValueError("data.tokenizer is empty; give a tokenizer.model path (or 'train' to train one "
                         "on the training documents)")
    load_tokenizer(given)
    path = tokenizer_file(given)
    return TokenizerChoice(sha256_file(path), None, path)


def _recorded_tokenizer(sha256: str, data: dict) -> TokenizerChoice:
    trained = data.get("tokenizer_vocab_size") if data.get("tokenizer") == "train" else None
    return TokenizerChoice(sha256, trained)


def _train_tokenizer(corpus: Corpus, vocab_size: int, progress: bool) -> Path:
    """A SentencePiece model trained on the train split, in a new temporary directory."""
    count = len(corpus.indices["train"])
    _say(progress, f"training a {vocab_size}-piece SentencePiece tokenizer on the {count} training documents")
    path = None
    try:
        with signals_held():  # (a killed process's is removed by the next; one stopped by a signal, here)
            path = owned_temp_directory("llama-jax-tokenizer-") / TOKENIZER
        train_sentencepiece((text for _, text in corpus.documents("train")), path, vocab_size)
        load_tokenizer(path)
    except BaseException:
        if path is not None:
            shutil.rmtree(path.parent, ignore_errors=True)
        raise
    return path


# ---- tokenizing ------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
    """A chunk of tokenized documents: per document its source index, then their tokens
    concatenated, and per document its token count and UTF-8 bytes."""

    sources: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    nbytes: np.ndarray


_worker: dict[str, Any] = {}


def _load_encoder(tokenizer_path: str, dtype: str) -> None:
    """Load the tokenizer `_encode_texts` uses in this process."""
    _worker["tokenizer"] = load_tokenizer(tokenizer_path)
    _worker["dtype"] = np.dtype(dtype)


def _init_worker(tokenizer_path: str, dtype: str) -> None:
    """Load the tokenizer once per worker process; a worker process ends when its parent does. It
    ignores Ctrl-C, which a terminal sends the whole process group: the parent stops its workers
    (each would otherwise die printing a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # (blocked from its start: `_ctrl_c_blocked`)
    _load_encoder(tokenizer_path, dtype)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel: int) -> None:
    """Exit once `sentinel` (the parent's) signals that the parent has ended, however it ended:
    a worker waiting for work would otherwise never notice a parent killed with SIGKILL."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, lengths, UTF-8 bytes) of `texts`, each encoded with BOS and EOS, one string at a
    time (SentencePiece encodes a single string on the calling thread only). Each document's ids
    become an array at once, so at most one document is held as a list of Python ints."""
    tokenizer, dtype = _worker["tokenizer"], _worker["dtype"]
    encoded = [np.array(tokenizer.encode(text, bos=True, eos=True), dtype) for text in texts]
    lengths = np.array([len(ids) for ids in encoded], np.int64)
    nbytes = np.array([len(text.encode("utf-8")) for text in texts], np.int64)
    return np.concatenate(encoded) if encoded else np.zeros(0, dtype), lengths, nbytes


def _chunks(documents: Iterator[tuple[int, str]]) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(source indices, texts) of consecutive documents, about CHUNK_CHARS characters at a time."""
    sources, texts, size = [], [], 0
    for index, text in documents:
        sources.append(index)
        texts.append(text)
        size += len(text)
        if size >= CHUNK_CHARS or len(texts) >= CHUNK_DOCUMENTS:
            yield np.array(sources, np.int64), texts
            sources, texts, size = [], [], 0
    if texts:
        yield np.array(sources, np.int64), texts


class Encoder:
    """Tokenizes chunks of documents, results in order: in this process (workers=1) or in
    `workers` spawned processes, started on first use, with at most CHUNKS_PER_WORKER chunks per
    worker in flight, so the documents are read only that far ahead of the writing."""

    def __init__(self, tokenizer_path: Path, dtype: np.dtype, workers: int):
        self.initargs, self.workers = (str(tokenizer_path), dtype.str), workers
        self._pool: ProcessPoolExecutor | None = None

    def encode(self, documents: Iterator[tuple[int, str]]) -> Iterator[Encoded]:
        if self.workers == 1:
            _load_encoder(*self.initargs)
            for sources, texts in _chunks(documents):
                yield Encoded(sources, *_encode_texts(texts))
            return
        pending: collections.deque = collections.deque()
        for sources, texts in _chunks(documents):
            # held: a submit may start a worker process (see `close`); it may find one that died meanwhile
            with signals_held(), _worker_deaths():
                pool = self._started()
                with _ctrl_c_blocked():
                    future = pool.submit(_encode_texts, texts)
            pending.append((sources, future))
            if len(pending) >= CHUNKS_PER_WORKER * self.workers:
                yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=self.initargs)
        return self._pool

    def close(self) -> None:
        """Stop the workers, once they have finished the chunks already queued. A signal waits while
        the pool starts or stops (for up to `signals.IMPORT_WAIT_S`): one that interrupts either leaves
        the named semaphores of its queues unreleased when the command exits (the multiprocessing
        resource tracker then warns of them after the command's last line)."""
        if self._pool is not None:
            with signals_held():
                self._pool.shutdown(wait=True, cancel_futures=True)


def _collect(sources: np.ndarray, future) -> Encoded:
    with _worker_deaths():
        return Encoded(sources, *future.result())


@contextlib.contextmanager
def _ctrl_c_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread inside the block: a worker process started there inherits the
    mask, so that a Ctrl-C cannot reach it before `_init_worker` ignores it (this process still gets
    the signal, by another thread or when the block ends). Not around the pool's creation: its
    queues start multiprocessing's resource tracker, which unblocks SIGINT afterwards."""
    resource_tracker.ensure_running()  # (started again here if it has died)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _worker_deaths() -> Iterator[None]:
    """A tokenizer worker found dead inside the block (by a result, or by the next submit) as one line."""
    try:
        yield
    except BrokenProcessPool:
        raise ChildProcessError("a tokenizer worker process died (killed, or out of memory?); run the command "
                                "again to continue where it stopped, with fewer --workers if memory is short") from None


# ---- writing ---------------------------------------------------------------------------------


class ShardWriter:
    """Writes a split's shards from shard `number` and split position `first_document` on.

    Tokens stream into `<name>.tokens.bin.tmp`; when the shard holds `shard_tokens` tokens (or at
    `finish`) the file is renamed into place, the index is written the same way, and then the
    shard's `.json` record."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, number: int,
                 first_document: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.number, self.first_document = number, first_document
        self.pause = float(os.environ.get(PAUSE_ENV) or 0)
        self._file = None

    def add(self, chunk: Encoded) -> None:
        """Append a chunk's documents, closing shards as they fill."""
        ends = np.cumsum(chunk.lengths)
        starts = ends - chunk.lengths
        d, n = 0, len(chunk.lengths)
        while d < n:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens
            e = min(int(np.searchsorted(ends, starts[d] + room, side="left")) + 1, n)
            self._write(chunk.tokens[starts[d]:ends[e - 1]], starts[d:e] - starts[d], chunk.sources[d:e],
                        chunk.nbytes[d:e])
            if self._tokens >= self.shard_tokens:
                self._close()
            d = e

    def finish(self) -> None:
        if self._file is not None:
            self._close()

    def _path(self, suffix: str) -> Path:
        return self.directory / f"{shard_name(self.split, self.number)}{suffix}"

    def _open(self) -> None:
        self._file = open(self._path(".tokens.bin.tmp"), "wb")
        self._hash = hashlib.sha256()
        self._rows: list[np.ndarray] = []
        self._tokens = self._documents = 0

    def _write(self, tokens: np.ndarray, offsets: np.ndarray, sources: np.ndarray, nbytes: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, self.dtype).data
        self._file.write(data)
        self._hash.update(data)
        self._rows.append(np.stack([offsets + self._tokens, sources, nbytes], axis=1).astype(np.int64))
        self._tokens += len(tokens)
        self._documents += len(offsets)

    def _close(self) -> None:
        _close_durably(self._file)
        self._file = None
        os.replace(self._path(".tokens.bin.tmp"), self._path(".tokens.bin"))
        index = io.BytesIO()
        np.save(index, np.concatenate(self._rows), allow_pickle=False)
        with open(self._path(".index.npy.tmp"), "wb") as f:
            f.write(index.getbuffer())
            _close_durably(f)
        os.replace(self._path(".index.npy.tmp"), self._path(".index.npy"))
        record = {"first_document": self.first_document, "documents": self._documents, "tokens": self._tokens,
                  "sha256": {"tokens": self._hash.hexdigest(), "index": hashlib.sha256(index.getbuffer()).hexdigest()}}
        write_json_atomic(self._path(".json"), record)
        self.first_document += self._documents
        self.number += 1
        if self.pause:
            time.sleep(self.pause)


def _close_durably(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


AGAIN = "prepare the data again"  # what a reader of a damaged prepared directory is told to do


class DamagedData(ValueError):
    """A prepared directory's file that is missing, unreadable or inconsistent with the others:
    `problem` names the file and what is wrong with it, `advice` what to do (its message is both).
    A caller that knows a better way to recover says `problem` with its own advice."""

    def __init__(self, problem: str, advice: str = AGAIN):
        super().__init__(f"{problem}; {advice}")
        self.problem = problem


def _read_json(path: Path, again: str = AGAIN) -> Any:
    """The JSON value in `path`; DamagedData (naming it, then `again`) when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedData(f"{path} is missing", again) from None
    except (ValueError, OSError) as e:
        raise DamagedData(f"{path} cannot be read ({str(e).splitlines()[0]})", again) from None


# ---- preparing -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreparationStats:
    """What one call of `prepare` tokenized (0 when the directory was already prepared)."""

    documents: int
    tokens: int
    seconds: float
    already_prepared: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prepare(data_config, output_dir: str | os.PathLike, workers: int | None = None,
            shard_tokens: int | None = None, progress: bool = True,
            elsewhere: str = "give another --output") -> dict:
    """Tokenize the documents of `data_config` into token shards in `output_dir`; return the manifest.

    A directory an earlier call left unfinished is resumed (its finished shards kept, the rest
    written again, the same bytes as one uninterrupted run); a finished one with the same document
    settings and tokenizer is left untouched. Anything else there is refused with a ValueError.
    `workers`: tokenizer processes (None: one per core; 1: none, all in this process), started with
    `spawn`, which imports the calling script again: a script calls this under
    `if __name__ == "__main__":`. `shard_tokens`: tokens per shard (None: DEFAULT_SHARD_TOKENS for a
    new directory, whatever an earlier call chose for one it started; a number is refused where an
    earlier call chose another).
    `elsewhere`: how the caller's user prepares into another directory, for the messages."""
    return prepare_with_stats(data_config, output_dir, workers, shard_tokens, progress, elsewhere)[0]


def _check_not_a_starting_worker() -> None:
    """RuntimeError where this process is a worker starting up: `spawn` imports the calling script
    again in each worker, so a script that calls `prepare` outside `if __name__ == "__main__":`
    calls it again there (the worker then found the directory locked and died, and the caller was
    told only that a worker died)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # (set while a worker starts up, as
        # multiprocessing's own check of starting processes then reads it)
        raise RuntimeError("llama_jax.prepare.prepare was called again in a tokenizer worker as it started: the "
                           "workers are started with `spawn`, which imports the calling script again; call it "
                           "under `if __name__ == \"__main__\":` (or with workers=1)")


def prepare_with_stats(data_config, output_dir: str | os.PathLike, workers: int | None = None,
                       shard_tokens: int | None = None, progress: bool = True,
                       elsewhere: str = "give another --output") -> tuple[dict, PreparationStats]:
    """`prepare`, also returning what this call tokenized and how fast."""
    _check_not_a_starting_worker()
    out = Path(output_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}; give a positive number of tokenizer processes")
    if shard_tokens is not None and (not isinstance(shard_tokens, int) or shard_tokens < 1):
        raise ValueError(f"shard_tokens={shard_tokens!r}; give a positive number of tokens per shard")
    state = _directory_state(out)
    finish_for_dead_processes(out.absolute())  # a staging directory beside it that a killed `_start` left
    if state == "finished":
        never = f"{elsewhere} (a prepared directory is never overwritten)"
        # what a reader checks (not the shards' sha256: --verify): "nothing to do" is not said of a damaged one
        prepared = open_prepared(out, again=redo_advice(out, elsewhere))  # (damage is said with that advice)
        manifest = prepared.manifest
        _check_settings(manifest, data_config, f"{out} is already prepared", never)
        recorded = _recorded_shard_tokens(out, manifest)
        if shard_tokens is not None and recorded is not None and recorded != shard_tokens:
            raise ValueError(f"{out} is already prepared with shard_tokens={recorded}, not {shard_tokens}; leave "
                             f"--shard-tokens out to use it as it is, or {never}")
        for split in prepared.splits.values():
            split.check_indices()
        _say(progress, f"{out} is already prepared ({MANIFEST} present); nothing to do (the documents are not "
                       f"read again: for an edited corpus {elsewhere})")
        return manifest, PreparationStats(0, 0, 0.0, already_prepared=True)
    corpus = open_corpus(data_config, out)  # a missing corpus is named before a missing tokenizer
    request = requested_tokenizer(data_config)
    lock = DirectoryLock(out, f"{out} is being prepared by another llama-jax process (it holds the directory's "
                              f"lock); wait for it to end, or {elsewhere}")
    try:  # one preparation at a time: two would write over each other's shards
        if state == "partial":
            lock.acquire()
            record = _check_partial(out, data_config, request, corpus, shard_tokens)
            _say(progress, f"resuming the preparation of {out}")
        else:
            record = _start(out, data_config, request, corpus,
                            DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens, progress)
            lock.acquire()
        return _finish(out, corpus, record, workers, progress)
    finally:
        lock.release()


def redo_advice(out: Path, elsewhere: str = "give another --output") -> str:
    """How a user prepares a damaged directory `out` again (a prepared directory is never overwritten)."""
    return f"remove {out} to prepare it again, or {elsewhere}"


def _recorded_shard_tokens(out: Path, manifest: dict) -> int | None:
    """The shard size a finished directory was prepared with: in its manifest, or, for a manifest of an
    earlier release, which does not record it, in its preparing.json (None if that cannot be read)."""
    if "shard_tokens" in manifest:
        return manifest["shard_tokens"]
    try:
        return _read_json(out / PREPARING)["shard_tokens"]
    except (ValueError, KeyError, TypeError):
        return None


def _directory_state(out: Path) -> str:
    """'new', 'partial' (preparing.json, no manifest.json) or 'finished'; ValueError for anything else."""
    if not out.exists():
        blocking = file_in_the_way(out.absolute())
        if blocking is not None:
            raise ValueError(f"cannot create {out}: {blocking} is a file, not a directory")
        check_writable(out, "--output")
        return "new"
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory; give a new directory (or one prepare-data started)")
    names = sorted(os.listdir(out))
    if MANIFEST in names:
        return "finished"
    if PREPARING in names:
        return "partial"
    if names:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        raise ValueError(f"{out} holds {names[0]!r}{more} but no prepared data ({MANIFEST} or {PREPARING}); "
                         f"give a new or empty directory")
    check_writable(out, "--output")  # an empty directory is replaced by the prepared one
    return "new"


def check_prepared(out: Path, data_config, what: str | None, advice: str, again: str = AGAIN,
                   runs_own: bool = False) -> dict:
    """The manifest of a finished directory, if it was prepared with the settings asked for now;
    else ValueError: "{what} with data.KEY=recorded, not requested; {advice}", or, for a manifest
    that cannot be read, "...; {again}". `runs_own`: `out` is a run's own copy of its data and
    `data_config` the run's own settings (its config.json), which name it whatever directory
    their relative paths would be read from now: the documents are not compared."""
    manifest = _read_manifest(out, again)
    _check_settings(manifest, data_config, what or f"{out} is already prepared", advice, runs_own)
    return manifest


def _check_settings(manifest: dict, data_config, what: str, advice: str, runs_own: bool = False) -> None:
    """`check_prepared`'s comparison of a manifest already read and checked with the settings asked for now."""
    if not runs_own:
        _check_same_documents(recorded_documents(manifest), data_config, what, advice)
    recorded = _recorded_tokenizer(manifest["tokenizer"]["sha256"], manifest.get("data") or {})
    _check_same_tokenizer(recorded, requested_tokenizer(data_config), data_config, what, advice)


def _check_same_tokenizer(recorded: TokenizerChoice, request: TokenizerChoice, data_config, what: str,
                          advice: str) -> None:
    if not request.matches(recorded):
        raise ValueError(f"{what} with another tokenizer ({recorded.describe()}) than "
                         f"data.tokenizer={data_config.get('tokenizer')} ({request.describe()}); {advice}")


def _check_same_documents(recorded: dict, data_config, what: str, advice: str) -> None:
    recorded = document_settings(recorded)  # (paths recorded relative by earlier releases made absolute too)
    wanted = document_settings(data_config)
    as_written = document_settings(data_config, absolute=False)
    for key in sorted(set(recorded) | set(wanted)):
        if recorded.get(key) != wanted.get(key):
            where = read_from(as_written.get(key)) if key in PATH_KEYS else ""
            raise ValueError(f"{what} with data.{key}={recorded.get(key)!r}, not {wanted.get(key)!r}{where}; "
                             f"{advice}")


PATH_KEYS = ("files", "data_dir")  # the document settings that name local paths


def read_from(value: Any) -> str:
    """" (read from CWD)" for a path setting (a path, or a list of them) holding one relative to the
    current directory, which it names a file of; "" otherwise."""
    return f" (read from {Path.cwd()})" if is_relative(value) else ""


def is_relative(value: Any) -> bool:
    """Whether a path setting's value (a path, or a list of them) holds one relative to the current directory."""
    paths = value if isinstance(value, list) else [value]
    return any(isinstance(path, str) and path and "://" not in path and not os.path.isabs(os.path.expanduser(path))
               for path in paths)


def _check_partial(out: Path, data_config, request: TokenizerChoice, corpus: Corpus,
                   shard_tokens: int | None) -> dict:
    """The record of an unfinished preparation, if it can be resumed with these settings
    (`shard_tokens` None: its own shard size); else a ValueError saying why not."""
    record = _read_json(out / PREPARING)
    try:
        settings, tokenizer = record["documents"], record["tokenizer"]
        recorded = TokenizerChoice(tokenizer["sha256"], tokenizer["trained_vocab_size"])
        assumed = record["format"] == FORMAT and all(key in record for key in ("shard_tokens", "splits", "data"))
    except (KeyError, TypeError):
        assumed = False
    if not assumed:
        raise ValueError(f"{out / PREPARING} is not the record of a {FORMAT} preparation; "
                         f"remove {out} to prepare it again")
    advice = f"resume with the same settings, or remove {out} to prepare it again"
    _check_same_documents(settings, data_config, f"{out} was started", advice)
    _check_same_tokenizer(recorded, request, data_config, f"{out} was started", advice)
    if shard_tokens is not None and record["shard_tokens"] != shard_tokens:
        raise ValueError(f"{out} was started with shard_tokens={record['shard_tokens']}, not {shard_tokens}; "
                         f"resume with --shard-tokens {record['shard_tokens']}, or remove {out} to prepare it again")
    counts = {split: len(corpus.indices[split]) for split in SPLITS}
    if record["splits"] != counts:
        raise ValueError(f"{out} was started on a corpus of {record['splits']} documents, now it has {counts}; "
                         f"the documents changed, so remove {out} to prepare it again")
    if record.get("corpus_sha256", corpus.sha256) != corpus.sha256:  # recorded since the file sources had one
        raise ValueError(f"{out} was started on other documents (corpus sha256 {record['corpus_sha256'][:12]}, now "
                         f"{corpus.sha256[:12]}): the corpus changed since, so remove {out} to prepare it again")
    kept = out / TOKENIZER
    if not kept.is_file() or sha256_file(kept) != recorded.sha256:
        raise ValueError(f"{kept} is missing or differs from the tokenizer recorded in {PREPARING}; "
                         f"remove {out} to prepare it again")
    return record


def _start(out: Path, data_config, request: TokenizerChoice, corpus: Corpus, shard_tokens: int,
           progress: bool) -> dict:
    """Create `out` holding the tokenizer and preparing.json, in one rename."""
    source = request.file or _train_tokenizer(corpus, request.trained_vocab_size, progress)
    stage = None
    try:
        tokenizer = load_tokenizer(source)
        record = {"format": FORMAT, "data": _jsonable(data_config), "documents": document_settings(data_config),
                  "tokenizer": {"sha256": sha256_file(source), "trained_vocab_size": request.trained_vocab_size},
                  "token_dtype": token_dtype(tokenizer.vocab_size).name, "shard_tokens": shard_tokens,
                  "splits": {split: len(corpus.indices[split]) for split in SPLITS},
                  **({"corpus_sha256": corpus.sha256} if corpus.sha256 else {})}
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = scratch_path(out, "tmp")
        stage.mkdir()
        shutil.copyfile(source, stage / TOKENIZER)
        write_json_atomic(stage / PREPARING, record)
        try:
            os.replace(stage, out)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise DirectoryBusy(f"--output {out} was started meanwhile by another llama-jax prepare-data; wait for "
                                f"it to end, or give another --output") from None
    finally:
        if request.file is None:
            shutil.rmtree(source.parent, ignore_errors=True)
        if stage is not None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return record


def _finish(out: Path, corpus: Corpus, record: dict, workers: int,
            progress: bool) -> tuple[dict, PreparationStats]:
    """Write every unfinished shard, then the manifest."""
    tokenizer = load_tokenizer(out / TOKENIZER)
    dtype = np.dtype(record["token_dtype"]).newbyteorder("<")
    done = {split: finished_shards(out, split, dtype) for split in SPLITS}
    _remove_unfinished(out, done)
    total = sum(len(corpus.indices[split]) for split in SPLITS)
    before = sum(r["documents"] for records in done.values() for r in records)  # (an earlier call's)
    bar = _progress_bar(progress, total, before, out)
    lines = progress and bar.disable  # no terminal (a job's log): a line now and then instead of the bar
    started, documents, tokens = time.perf_counter(), 0, 0
    said = started
    encoder = Encoder(out / TOKENIZER, dtype, workers)
    try:
        for split in SPLITS:
            first = sum(r["documents"] for r in done[split])
            writer = ShardWriter(out, split, dtype, record["shard_tokens"], len(done[split]), first)
            for chunk in encoder.encode(corpus.documents(split, first)):
                writer.add(chunk)
                documents, tokens = documents + len(chunk.lengths), tokens + len(chunk.tokens)
                bar.update(len(chunk.lengths))
                now = time.perf_counter()
                rate = tokens / max(now - started, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
                if lines and now - said >= PROGRESS_LINE_SECONDS:
                    print(f"preparing {out}: {before + documents:,} of {total:,} documents "
                          f"({(before + documents) / total:.1%}), {rate:,.0f} tokens/s", file=sys.stderr, flush=True)
                    said = now
            writer.finish()
    finally:
        encoder.close()
        bar.close()
    seconds = time.perf_counter() - started
    manifest = _manifest(out, corpus, record, tokenizer, dtype)
    write_json_atomic(out / MANIFEST, manifest)
    return manifest, PreparationStats(documents, tokens, seconds)


def finished_shards(out: Path, split: str, dtype: np.dtype) -> list[dict]:
    """The records of the split's consecutive finished shards from shard 0: each with its .json
    and both data files of the recorded sizes."""
    records, first = [], 0
    while True:
        name = shard_name(split, len(records))
        try:
            record = json.loads((out / f"{name}.json").read_text())
            complete = (record["first_document"] == first
                        and (out / f"{name}.tokens.bin").stat().st_size == record["tokens"] * dtype.itemsize
                        and _index_shape(out / f"{name}.index.npy") == (record["documents"], 3))
        except (OSError, ValueError, KeyError, TypeError):
            complete = False
        if not complete:
            return records
        records.append(record)
        first += record["documents"]


def _index_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of an int64 .npy file whose data is all there, else None."""
    try:
        index = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return index.shape if index.dtype == np.dtype("<i8") else None


def _remove_unfinished(out: Path, done: dict[str, list[dict]]) -> None:
    """Delete the shard files and temporary files of the preparation that are not finished shards."""
    keep = {f"{shard_name(split, k)}{suffix}" for split in SPLITS for k in range(len(done[split]))
            for suffix in (".tokens.bin", ".index.npy", ".json")}
    for path in out.iterdir():
        temp = _ATOMIC_TEMP.fullmatch(path.name)
        ours = _SHARD_FILE.fullmatch(path.name) or (temp and (temp.group(1) in (MANIFEST, PREPARING, TOKENIZER)
                                                              or _SHARD_FILE.fullmatch(temp.group(1))))
        if ours and path.name not in keep and path.is_file():
            path.unlink()


def _manifest(out: Path, corpus: Corpus, record: dict, tokenizer, dtype: np.dtype) -> dict:
    splits = {}
    for split in SPLITS:
        records = finished_shards(out, split, dtype)
        documents = sum(r["documents"] for r in records)
        if documents != len(corpus.indices[split]):
            raise RuntimeError(f"{out}: {split} has {documents} documents in its shards, expected "
                               f"{len(corpus.indices[split])}")
        names = [shard_name(split, k) for k in range(len(records))]
        splits[split] = {"documents": documents, "tokens": sum(r["tokens"] for r in records),
                         "bytes": sum(int(np.load(out / f"{name}.index.npy", mmap_mode="r")[:, 2].sum())
                                      for name in names),
                         "shards": names}
    manifest = {"format": FORMAT,
                "tokenizer": {"file": TOKENIZER, "sha256": record["tokenizer"]["sha256"],
                              "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                              "eos_id": tokenizer.eos_id},
                "token_dtype": dtype.name, "shard_tokens": record["shard_tokens"], "data": record["data"],
                "documents": record["documents"], "splits": splits}
    if corpus.sha256:
        manifest["corpus_sha256"] = corpus.sha256
    return manifest


def _say(progress: bool, line: str) -> None:
    """A status line on stdout (the progress bar and errors go to stderr)."""
    if progress:
        print(line, flush=True)


PROGRESS_LINE_SECONDS = 60.0  # how often a preparation without a terminal says how far it is


def _progress_bar(progress: bool, total: int, initial: int, out: Path):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="doc", desc=f"preparing {out.name}",
                disable=None if progress else True,  # None: only on a terminal
                file=sys.stderr, dynamic_ncols=True)


def summary_lines(manifest: dict, output_dir: str | os.PathLike,
                  stats: PreparationStats | None = None) -> list[str]:
    """A few lines describing a prepared directory (and what the call that prepared it did)."""
    tok = manifest["tokenizer"]
    lines = [f"{output_dir}: {tok['vocab_size']}-token tokenizer (sha256 {tok['sha256'][:12]}), "
             f"{manifest['token_dtype']} tokens"]
    for split in SPLITS:
        s = manifest["splits"][split]
        lines.append(f"  {split + ':':<9} {s['documents']:>12,} documents {s['tokens']:>15,} tokens "
                     f"{s['bytes']:>15,} bytes  {len(s['shards']):>5,} shards")
    if stats is not None and stats.already_prepared:
        lines.append("already prepared: nothing tokenized")
    elif stats is not None:
        lines.append(f"tokenized {stats.documents:,} documents ({stats.tokens:,} tokens) in {stats.seconds:.1f} s: "
                     f"{stats.tokens_per_second:,.0f} tokens/s")
    return lines


# ---- reading ---------------------------------------------------------------------------------


class PreparedSplit:
    """One split of a prepared directory as a single stream of tokens (its shards in order).

    Offsets are positions in that stream; documents are numbered 0..documents-1 in split order.
    Token files are read through `np.memmap`; a shard's index (24 bytes per document) is loaded
    the first time the shard's documents are looked up, and kept. Tokens read are checked to be ids of
    the tokenizer's `vocab_size`. `again`: what a user is told to do when an index or tokens are damaged."""

    def __init__(self, name: str, directory: Path, shards: list[str], records: list[dict], dtype: np.dtype,
                 vocab_size: int, documents: int, tokens: int, nbytes: int, again: str = AGAIN):
        self.name, self.documents, self.tokens, self.bytes, self.again = name, documents, tokens, nbytes, again
        self.directory, self.shard_names, self.dtype, self.vocab_size = directory, shards, dtype, vocab_size
        self._token_starts = np.cumsum([0] + [r["tokens"] for r in records], dtype=np.int64)
        self._document_starts = np.cumsum([0] + [r["documents"] for r in records], dtype=np.int64)
        self._token_files: list[np.ndarray | None] = [None] * len(shards)
        self._indices: list[np.ndarray | None] = [None] * len(shards)
        self._offsets: list[np.ndarray | None] = [None] * len(shards)

    def _shard_tokens(self, k: int) -> np.ndarray:
        if self._token_files[k] is None:
            self._token_files[k] = np.memmap(self.directory / f"{self.shard_names[k]}.tokens.bin", self.dtype, "r",
                                             shape=(int(self._token_starts[k + 1] - self._token_starts[k]),))
        return self._token_files[k]

    def _read_tokens(self, k: int, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of shard k as int32; DamagedData for an id the tokenizer does not have."""
        tokens = np.asarray(self._shard_tokens(k)[start:stop], np.int32)
        if len(tokens) and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            bad = tokens[(tokens >= self.vocab_size) | (tokens < 0)][0]
            raise DamagedData(f"{self.directory / self.shard_names[k]}.tokens.bin is damaged: it holds the token id "
                              f"{bad}, outside the tokenizer's {self.vocab_size} ids", self.again)
        return tokens

    def _index(self, k: int) -> np.ndarray:
        if self._indices[k] is None:
            index = self._read_index(k)
            self._offsets[k] = np.ascontiguousarray(index[:, 0])
            self._indices[k] = index
        return self._indices[k]

    def _read_index(self, k: int) -> np.ndarray:
        """Shard k's index, checked: DamagedData unless its document offsets ascend from 0 within the shard."""
        file = self.directory / f"{self.shard_names[k]}.index.npy"
        index = np.load(file, allow_pickle=False)
        offsets = index[:, 0]  # columns: first token (within the shard), index in the source, UTF-8 bytes
        tokens = int(self._token_starts[k + 1] - self._token_starts[k])
        if len(index) and (offsets[0] != 0 or (np.diff(offsets) <= 0).any() or offsets[-1] >= tokens
                           or (index[:, 1:] < 0).any()):
            raise DamagedData(f"{file} is damaged: its document offsets do not ascend from 0 within the shard's "
                              f"{tokens} tokens", self.again)
        return index

    def check_indices(self) -> None:
        """Read and check every shard's index now (a reader checks each when it first reads it)."""
        for k in range(len(self.shard_names)):
            self._read_index(k)

    def _shard_offsets(self, k: int) -> np.ndarray:
        """Offsets of the shard's documents within the shard (contiguous, for binary search)."""
        self._index(k)
        return self._offsets[k]

    def _locate_document(self, d: int) -> tuple[int, int]:
        if not 0 <= d < self.documents:
            raise IndexError(f"document {d} is outside the {self.documents} documents of split {self.name}")
        k = int(np.searchsorted(self._document_starts, d, side="right")) - 1
        return k, d - int(self._document_starts[k])

    def token_range(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int32 (across shards as needed)."""
        if not 0 <= start <= stop <= self.tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside the {self.tokens} tokens of split {self.name}")
        out = np.empty(stop - start, np.int32)
        k, position = int(np.searchsorted(self._token_starts, start, side="right")) - 1, start
        while position < stop:
            base, end = int(self._token_starts[k]), min(stop, int(self._token_starts[k + 1]))
            out[position - start:end - start] = self._read_tokens(k, position - base, end - base)
            position, k = end, k + 1
        return out

    def document_tokens(self, d: int) -> np.ndarray:
        """The tokens of document d (BOS ... EOS) as int32."""
        k, row = self._locate_document(d)
        index = self._index(k)
        start = int(index[row, 0])
        end_of_shard = int(self._token_starts[k + 1] - self._token_starts[k])
        stop = int(index[row + 1, 0]) if row + 1 < len(index) else end_of_shard
        return self._read_tokens(k, start, stop)

    def document_starts_in(self, start: int, stop: int) -> np.ndarray:
        """Stream offsets (int64, ascending) of the documents whose first token lies in [start, stop)."""
        start, stop = max(start, 0), min(stop, self.tokens)
        found = []
        k = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        while start < stop and k < len(self.shard_names) and self._token_starts[k] < stop:
            base, offsets = int(self._token_starts[k]), self._shard_offsets(k)
            found.append(offsets[np.searchsorted(offsets, start - base):np.searchsorted(offsets, stop - base)] + base)
            k += 1
        return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)

    def document_at(self, offset: int) -> int:
        """The document holding stream offset `offset`."""
        if not 0 <= offset < self.tokens:
            raise IndexError(f"offset {offset} is outside the {self.tokens} tokens of split {self.name}")
        k = int(np.searchsorted(self._token_starts, offset, side="right")) - 1
        row = int(np.searchsorted(self._shard_offsets(k), offset - self._token_starts[k], side="right")) - 1
        return int(self._document_starts[k]) + row

    def document_info(self, d: int) -> tuple[int, int, int]:
        """(stream offset of its first token, its index in the source, UTF-8 bytes of its text)."""
        k, row = self._locate_document(d)
        offset, source, nbytes = (int(v) for v in self._index(k)[row])
        return int(self._token_starts[k]) + offset, source, nbytes


@dataclasses.dataclass
class Prepared:
    """A finished prepared directory."""

    path: Path
    manifest: dict
    tokenizer_path: Path
    tokenizer_sha256: str
    splits: dict[str, PreparedSplit]


def open_prepared(path: str | os.PathLike, tokenizer_sha256: str | None = None, again: str | None = None) -> Prepared:
    """Open a directory `prepare` finished, checking its structure cheaply (no hashing of shards):
    the manifest, the tokenizer file against its sha256 there, every listed shard's three files,
    the size of each token file and the shape of each index. With `tokenizer_sha256`, the data must
    have been prepared with that tokenizer. Every problem is a ValueError of one line naming the file
    (DamagedData for damage). `again`: what to do about damage, now or in an index found damaged
    when it is first read (default: each message's own advice; for an index, remove the directory
    to prepare it again)."""
    path = Path(path)
    try:
        return _open_checked(path, tokenizer_sha256, again or redo_advice(path, "give another directory"))
    except DamagedData as e:
        if again is None:
            raise
        raise DamagedData(e.problem, again) from None


def _open_checked(path: Path, tokenizer_sha256: str | None, again: str) -> Prepared:
    """`open_prepared`'s checks; `again`: the advice for an index found damaged when first read."""
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        where = "" if path.is_absolute() else f" (read from {Path.cwd()})"
        raise ValueError(f"{path}{where} {what}; give a directory written by llama-jax prepare-data")
    if not (path / MANIFEST).is_file():
        if (path / PREPARING).is_file():
            raise ValueError(f"{path}: the preparation did not finish (no {MANIFEST}); run llama-jax prepare-data "
                             f"again with the same settings to complete it")
        raise ValueError(f"{path} has no {MANIFEST}; give a directory written by llama-jax prepare-data")
    manifest = _read_manifest(path)
    sha = manifest["tokenizer"]["sha256"]
    if tokenizer_sha256 is not None and tokenizer_sha256 != sha:
        raise ValueError(f"{path} was prepared with another tokenizer (sha256 {sha[:12]}) than this run's "
                         f"({tokenizer_sha256[:12]}); prepare the data again with it or use the run's tokenizer")
    tokenizer_path = path / manifest["tokenizer"]["file"]
    if not tokenizer_path.is_file():
        raise DamagedData(f"{tokenizer_path} is missing")
    if sha256_file(tokenizer_path) != sha:  # the data's tokens are ids of that tokenizer only
        raise DamagedData(f"{tokenizer_path} does not match the sha256 in {MANIFEST} (it was replaced or changed)",
                          "put the tokenizer the data was prepared with back, or prepare the data again")
    dtype, vocab_size = np.dtype(manifest["token_dtype"]).newbyteorder("<"), manifest["tokenizer"]["vocab_size"]
    splits = {split: _open_split(path, split, manifest["splits"][split], dtype, vocab_size, again) for split in SPLITS}
    return Prepared(path, manifest, tokenizer_path, sha, splits)


def _read_manifest(directory: Path, again: str = AGAIN) -> dict:
    """DIR/manifest.json; DamagedData (naming it, then `again`) unless it can be read and has the
    format string and the fields a reader needs."""
    file = directory / MANIFEST
    manifest = _read_json(file, again)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DamagedData(f"{file}: format {found!r}, expected {FORMAT!r}", again)
    if not _well_formed(manifest):
        raise DamagedData(f"{file} lacks fields of a {FORMAT} manifest (tokenizer, token_dtype, splits, data)", again)
    return manifest


def _well_formed(manifest: dict) -> bool:
    try:
        tokenizer, splits = manifest["tokenizer"], manifest["splits"]
        return (manifest["token_dtype"] in ("uint16", "uint32") and isinstance(tokenizer["sha256"], str)
                and isinstance(manifest.get("data", {}), dict) and isinstance(manifest.get("documents", {}), dict)
                and isinstance(tokenizer["file"], str) and _is_count(tokenizer["vocab_size"])
                and all(_well_formed_split(splits[s]) for s in SPLITS))
    except (KeyError, TypeError):
        return False


def _well_formed_split(summary: dict) -> bool:
    return (all(_is_count(summary[key]) for key in ("documents", "tokens", "bytes"))
            and isinstance(summary["shards"], list) and all(isinstance(name, str) for name in summary["shards"]))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _open_split(path: Path, split: str, summary: dict, dtype: np.dtype, vocab_size: int,
                again: str) -> PreparedSplit:
    records, documents, tokens = [], 0, 0
    for k, name in enumerate(summary["shards"]):
        if Path(name).name != name or name in ("", ".", ".."):  # a path: files that are not this directory's
            raise DamagedData(f"{path / MANIFEST}: split {split} lists the shard {name!r}, which is not the name of "
                              f"a file in {path}")
        if name != shard_name(split, k):  # (another split's shards: held-out documents trained on, or the reverse)
            raise DamagedData(f"{path / MANIFEST}: split {split} lists the shard {name!r} as its shard {k}, expected "
                              f"{shard_name(split, k)!r}")
        record = _read_json(path / f"{name}.json")
        try:
            first, count, length = record["first_document"], record["documents"], record["tokens"]
        except (KeyError, TypeError):
            first = count = length = None
        if not all(_is_count(v) for v in (first, count, length)):
            raise DamagedData(f"{path / name}.json lacks first_document, documents or tokens")
        if first != documents:
            raise DamagedData(f"{path / name}.json: first_document {first}, expected {documents} (the documents of "
                              f"the shards before it)")
        _check_shard_files(path, name, count, length, dtype)
        records.append(record)
        documents, tokens = documents + count, tokens + length
    if (documents, tokens) != (summary["documents"], summary["tokens"]):
        raise DamagedData(f"{path / MANIFEST}: split {split} lists {summary['documents']} documents and "
                          f"{summary['tokens']} tokens, its shards hold {documents} and {tokens}")
    unlisted = path / f"{shard_name(split, len(records))}.json"
    if unlisted.exists():  # a shard left out of the manifest: its documents would silently go unread
        raise DamagedData(f"{unlisted} is a shard that {path / MANIFEST} does not list (split {split} lists "
                          f"{len(records)})")
    return PreparedSplit(split, path, summary["shards"], records, dtype, vocab_size, documents, tokens,
                         summary["bytes"], again)


def _check_shard_files(path: Path, name: str, documents: int, tokens: int, dtype: np.dtype) -> None:
    token_file, index_file = path / f"{name}.tokens.bin", path / f"{name}.index.npy"
    for file in (token_file, index_file):
        if not file.is_file():
            raise DamagedData(f"{file} is missing")
    size, expected = token_file.stat().st_size, tokens * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "too long"
        raise DamagedData(f"{token_file} is {what}: {size} bytes, expected {expected} ({tokens} {dtype.name} tokens)")
    shape = _index_shape(index_file)
    if shape != (documents, 3):
        found = "unreadable (truncated or not an int64 .npy file)" if shape is None else f"of shape {shape}"
        raise DamagedData(f"{index_file} is {found}, expected int64 of shape ({documents}, 3)")


def verify(path: str | os.PathLike) -> dict:
    """Check the sha256 of every shard file against its .json record and of the tokenizer against
    the manifest; DamagedData (one line naming the file) at the first mismatch.
    Returns {"files": shard files checked, "bytes": their total size}."""
    prepared = open_prepared(path)  # checks the tokenizer's sha256
    files = nbytes = 0
    for split in prepared.splits.values():
        for name in split.shard_names:
            recorded = _read_json(prepared.path / f"{name}.json").get("sha256")
            for kind, suffix in (("tokens", ".tokens.bin"), ("index", ".index.npy")):
                file = prepared.path / f"{name}{suffix}"
                if not (isinstance(recorded, dict) and isinstance(recorded.get(kind), str)):
                    raise DamagedData(f"{prepared.path / name}.json records no sha256 of its {kind} file")
                if sha256_file(file) != recorded[kind]:
                    raise DamagedData(f"{file} does not match the sha256 recorded in {name}.json (damaged?)")
                files, nbytes = files + 1, nbytes + file.stat().st_size
    return {"files": files, "bytes": nbytes}
