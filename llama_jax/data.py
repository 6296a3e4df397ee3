"""Batches for training and evaluation.

A batch is a dict of [batch, seq_len] arrays: `tokens` (inputs), `targets` (next tokens),
`positions` (rotary positions, restarting at each document), `segment_ids` (document ids within
a packed row; tokens attend only within their document) and `loss_mask` (1 where the target
counts). The global batch of step s is a pure function of (data, seed, s), and each process
builds only its own rows of it (`llama_jax.packed`).

Documents come from a source with random access (`len(source)`, `source[i] -> str`): the
corpus embedded in CPython, local .txt/.jsonl files, or a TFDS dataset in ArrayRecord format.
`llama_jax.prepare` tokenizes them once into token shards; `Prefetcher` builds the next batches
in the background.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from llama_jax.tokenizer import unicode_problem


def pack_row(documents: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Pack documents (token arrays) into one row of seq_len inputs with next-token targets.

    A document of n tokens gives n - 1 (input, target) pairs (none for a document of one token,
    which takes no slot); documents never see each other. Pairs that do not fit are dropped;
    unused slots are padding (segment 0, masked out).
    """
    row = {k: np.zeros(seq_len, np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    start = 0
    for doc_id, doc in enumerate(documents, start=1):
        n = min(len(doc) - 1, seq_len - start)
        if start == seq_len:
            break
        if n <= 0:  # no pair: the documents after it still fit
            continue
        span = slice(start, start + n)
        row["tokens"][span] = doc[:n]
        row["targets"][span] = doc[1:n + 1]
        row["positions"][span] = np.arange(n)
        row["segment_ids"][span] = doc_id
        row["loss_mask"][span] = 1.0
        start += n
    return row


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def synthetic_batch(seed: int, step: int, rows: Sequence[int], seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Rows of a learnable synthetic batch: packed documents that are arithmetic progressions
    modulo the vocabulary (random start and stride per document), so the next token is
    predictable from the two before it. For exercising training without a dataset."""
    out = []
    for row in rows:
        rng = np.random.default_rng([seed, step, row])
        docs, length = [], 0
        while length < seq_len + 1:
            n = int(rng.integers(seq_len // 4 + 2, seq_len + 2))
            start, stride = rng.integers(0, vocab_size), rng.integers(1, max(2, min(vocab_size, 17)))
            docs.append(((start + stride * np.arange(n)) % vocab_size).astype(np.int32))
            length += n - 1
        out.append(pack_row(docs, seq_len))
    return stack_rows(out)


# ---- document sources ----------------------------------------------------------------------
# A source is anything with len(source) and source[i] -> str. Batches read documents by index.


class DocumentList:
    """Documents held in memory (for corpora that fit; large ones go through TFDS)."""

    def __init__(self, documents: list[str], origin: str):
        if not any(documents):
            raise ValueError(f"{origin} holds no non-empty document; give a corpus with text in it")
        self._documents = documents

    def __len__(self) -> int:
        return len(self._documents)

    def __getitem__(self, i: int) -> str:
        return self._documents[i]


def named_documents_sha256(named: Iterable[tuple[str, str]]) -> str:
    """The fingerprint of a corpus of (name, text) documents, in order: names, lengths and texts."""
    digest = hashlib.sha256()
    for name, text in named:
        digest.update(f"{name}\0{len(text)}\0".encode())
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()


class EmbeddedCorpus(DocumentList):
    """The English help texts that ship with every CPython (`pydoc_data.topics`): about 80
    documents, 0.5 MB, one per help topic, in the order of their sorted topic names. `sha256`
    fingerprints the corpus (topic names and texts): another Python release may give other texts."""

    def __init__(self):
        from pydoc_data.topics import topics

        names = sorted(topics)
        self.sha256 = named_documents_sha256((name, topics[name]) for name in names)
        super().__init__([topics[name] for name in names], "pydoc_data.topics")


class StdlibCorpus(DocumentList):
    """The Python source code of the standard library of the interpreter running this: every `.py`
    file under `sysconfig.get_paths()["stdlib"]` outside site-packages and the test suites
    (`test`, `tests`, `idle_test` directories), one document each, in the order of their paths
    relative to that directory (about 730 files, 12 MB, for CPython 3.11). `sha256` fingerprints
    the corpus (paths and contents): another Python version gives other documents."""

    SKIPPED = frozenset({"site-packages", "test", "tests", "idle_test"})

    def __init__(self):
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        paths = sorted((p for p in root.rglob("*.py") if not self.SKIPPED & set(p.relative_to(root).parts[:-1])),
                       key=lambda p: p.relative_to(root).as_posix())
        named = []
        for path in paths:
            try:
                named.append((path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                continue  # not UTF-8 or unreadable: not part of the corpus on this interpreter
        self.root, self.sha256 = root, named_documents_sha256(named)
        super().__init__([text for _, text in named], f"the standard library at {root}")


class TextFiles(DocumentList):
    """Documents from local files (paths or glob patterns): each `.txt` file is one document,
    each non-blank line of a `.jsonl` file is one (its `text_key` field)."""

    def __init__(self, paths: Sequence[str] | str, text_key: str = "text"):
        super().__init__(list(read_documents(paths, text_key)), f"files {paths!r}")


def expand_files(patterns: Sequence[str] | str) -> list[str]:
    """Paths matching each pattern (`**`: any number of directories, as in a shell with globstar),
    sorted within a pattern, patterns in the order given; a file that several patterns match is
    listed once, where it first appears (read twice, its documents would be split by position, so a
    held-out one's copy would be trained on)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("no files given; data.files needs paths or glob patterns of .txt/.jsonl files")
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))  # (else `**` is one level only)
        if not matched:
            raise ValueError(f"no file matches {pattern!r}; give existing paths or glob patterns")
        files += matched
    return each_file_once(files)


def each_file_once(paths: Iterable[str]) -> list[str]:
    """`paths` without those naming a file listed before (the same path, or a link to it)."""
    first: dict[str, str] = {}  # real path -> the path as given
    for path in paths:
        first.setdefault(os.path.realpath(path), path)
    return list(first.values())


def read_documents(paths: Sequence[str] | str, text_key: str = "text",
                   key_option: str = "data.text_key") -> Iterator[str]:
    """Stream the documents of `TextFiles(paths, text_key)` without holding them (`key_option`: how
    the caller's user names the JSONL field, for the message when a line lacks it)."""
    yield from read_files(expand_files(paths), text_key, key_option)


def check_not_special(path: str) -> None:
    """ValueError when `path` is there but is no regular file to read: a directory, a symbolic link to
    nothing, or a pipe, socket or device (a FIFO would block the reader until written to)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; give the files in it, e.g. {os.path.join(path, '*.txt')}")
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist; give readable files")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file (a pipe, socket or device); give readable files")


def read_files(files: Iterable[str], text_key: str = "text", key_option: str = "data.text_key") -> Iterator[str]:
    """The documents of `files` (paths, not patterns), as `read_documents` streams them."""
    for path in files:
        check_not_special(path)
        if path.endswith(".txt"):
            yield _read_txt(path)
        elif path.endswith(".jsonl"):
            yield from jsonl_texts(path, text_key, key_option)
        else:
            raise ValueError(f"{path}: unsupported file type; valid: .txt (a document per file), "
                             f".jsonl (a document per line)")


def _read_txt(path: str) -> str:
    """A .txt file's text, without a leading byte-order mark, with universal newlines (as
    `Path.read_text`); not UTF-8 is one line naming the byte."""
    text = utf8_text(Path(path).read_bytes(), path)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def jsonl_texts(path: str | os.PathLike, text_key: str, key_option: str = "data.text_key") -> Iterator[str]:
    """The `text_key` string of each non-blank line of a .jsonl file; a bad line is one line naming
    it (and `key_option`, the setting that names the field, when the field is missing). A leading
    byte-order mark is dropped."""
    with open(path, "rb") as f:  # bytes, so that a decoding error is placed on its line
        for number, raw in enumerate(f, start=1):
            line = utf8_text(raw, f"{path}:{number}", start=number == 1)
            if line.strip():
                yield _jsonl_text(line, text_key, f"{path}:{number}", key_option)


BOM = "\ufeff"  # the byte-order mark some editors write at the start of a UTF-8 file


def utf8_text(data: bytes, where: str, start: bool = True, advice: str = "the file must be UTF-8") -> str:
    """`data` decoded as UTF-8, without the byte-order mark that may begin a file (`start`: `data`
    is the file's beginning); not UTF-8 is ValueError, one line naming `where`, the byte and its
    offset in `data`, then `advice`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}: {e.reason}); "
                         f"{advice}") from None
    return text.removeprefix(BOM) if start else text


def parse_json_line(line: str):
    """The value a line of a .jsonl file holds: json.JSONDecodeError for one that is not JSON,
    ValueError for one nested too deeply to read; an integer of more digits than Python's int
    converts (4,300) is read as a float (a field other than the one read may hold one)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("JSON nested too deeply to read (thousands of levels)") from None
    except ValueError:  # the digit limit (a rare line: the hook slows every number down)
        return json.loads(line, parse_int=lambda digits: int(digits) if len(digits) < 4000 else float(digits))


def _jsonl_text(line: str, text_key: str, where: str, key_option: str) -> str:
    try:
        record = parse_json_line(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be a JSON object") from None
    except ValueError as e:
        raise ValueError(f"{where}: {e}; each line must be a JSON object") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a JSON {type(record).__name__}, not an object; each line must be a JSON object")
    if not isinstance(record.get(text_key), str):
        raise ValueError(f"{where}: no string field {text_key!r}; set {key_option} to the field holding the text")
    text = record[text_key]
    problem = unicode_problem(text)  # an escape such as \ud800: valid JSON, but no Unicode text
    if problem:
        raise ValueError(f"{where}: field {text_key!r} is not valid Unicode ({problem}); fix or drop the line")
    return text


@contextlib.contextmanager
def _without_tfds_scratch_dirs():
    """Remove the empty temporary directories TFDS makes (and leaves) when it opens a catalogue
    dataset that is not built locally, to look its description up."""
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for path in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if empty


def _tfds_not_found(name: str, data_dir: str | None) -> str:
    """Why TFDS found no dataset `name` in `data_dir`: a local data_dir that is missing or no
    directory, a version other than those built there (listed), or no such dataset."""
    local = data_dir is not None and "://" not in str(data_dir)
    if local and not Path(data_dir).is_dir():
        what = "is not a directory" if Path(data_dir).exists() else "does not exist"
        return f"data.data_dir={data_dir!r} {what}; give the directory the TFDS dataset {name!r} was built in"
    built = Path(data_dir) / name.split(":")[0] if local else None
    versions = sorted(p.name for p in built.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name)) \
        if built is not None and built.is_dir() else []
    if ":" in name and versions:
        return (f"TFDS dataset {name!r}: version {name.rsplit(':', 1)[1]} is not built in data_dir={data_dir!r}; "
                f"built there: {', '.join(versions)}")
    return (f"TFDS dataset {name!r} not found in data_dir={data_dir!r} in ArrayRecord format; build it first "
            f"(llama_jax.text_dataset.build_text_dataset, or TFDS with file_format='array_record') or fix "
            f"data.tfds_name")


def _joined_lines(error: Exception) -> str:
    """An exception's message (often several lines, from TFDS and its readers) as one line."""
    return " ".join(str(error).split())


def _record_ranges(split: str, splits) -> list[tuple[str, int, int, bool]]:
    """(split name, first record, end, whether it is the whole split) of each part of a TFDS split spec."""
    import tensorflow_datasets as tfds

    return [(part.splitname, part.from_ or 0, splits[part.splitname].num_examples if part.to is None else part.to,
             part.from_ is None and part.to is None)
            for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)]


def _slice_reversed(ranges: list[tuple[str, int, int, bool]]) -> bool:
    """Whether a TFDS split spec's `_record_ranges` hold a slice whose start is not before its end (`train[3:1]`,
    `train[50%:10%]`): TFDS reads other records for one (`train[2:1]` of 3 records reads record 2), or fails on a
    negative count. (A whole split may be empty.)"""
    return any(start >= end and not whole for _, start, end, whole in ranges)


def _shared_records(ranges: list[tuple[str, int, int, bool]], others: list[tuple[str, int, int, bool]]) -> int:
    """How many records two TFDS split specs' `_record_ranges` both read."""
    return sum(max(0, min(end, other_end) - max(start, other_start))
               for name, start, end, _ in ranges for other, other_start, other_end, _ in others if name == other)


def _feature_kind(feature) -> tuple | None:
    """(shape, dtype) of a TFDS feature, None for one without (a nested FeaturesDict, say)."""
    try:
        return tuple(feature.shape), np.dtype(feature.np_dtype)
    except (AttributeError, TypeError, ValueError):  # ValueError: np.dtype of a dict (FeaturesDict)
        return None


def _holds_text(feature) -> bool:
    """Whether a TFDS feature holds one string per record (`Text`, or a string `Tensor` of shape ())."""
    return _feature_kind(feature) == ((), np.dtype(object))


class TfdsSource:
    """One split of a TFDS dataset prepared in ArrayRecord format, read by random access through
    `tfds.data_source` (no TensorFlow). Reads only: the dataset must already be built."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None, text_key: str = "text",
                 split_option: str = "data.tfds_split"):
        import tensorflow_datasets as tfds
        from google.protobuf.json_format import ParseError

        self._where = f"data.tfds_name={name!r} with {split_option}={split!r}"
        try:
            with _without_tfds_scratch_dirs():
                self._records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except (tfds.core.registered.DatasetNotFoundError, NotImplementedError):
            # NotImplementedError: a catalogue dataset not built there, or built without random access
            raise ValueError(_tfds_not_found(name, data_dir)) from None
        except ParseError as e:  # its dataset_info.json: of a newer TFDS (a field this one lacks), or damaged
            raise ValueError(f"{self._where}: its dataset_info.json in data_dir={data_dir!r} cannot be read "
                             f"({str(e).splitlines()[0]}); it was written by another TFDS release than this one "
                             f"({tfds.__version__}) or is damaged: build the dataset again with this one") from None
        except (ValueError, AssertionError) as e:  # a bad name, version or split, often in several lines
            raise ValueError(f"{self._where}: {_joined_lines(e)}") from None
        self.ranges = _record_ranges(split, self._records.dataset_info.splits)
        if _slice_reversed(self.ranges):
            raise ValueError(f"{self._where}: a slice whose start is not before its end selects no records; give "
                             f"slices that do, e.g. 'train[:90%]'")
        features = self._records.dataset_info.features
        if text_key not in features:
            raise ValueError(f"TFDS dataset {name!r} has no feature {text_key!r}; valid: {sorted(features)}")
        if not _holds_text(features[text_key]):
            texts = sorted(key for key in features if _holds_text(features[key]))
            feature, shape_dtype = features[text_key], _feature_kind(features[text_key])
            kind = type(feature).__name__ + (f" of {shape_dtype[1]} with shape {shape_dtype[0]}" if shape_dtype else "")
            raise ValueError(f"TFDS dataset {name!r}: feature {text_key!r} is not text ({kind}); set data.text_key "
                             f"to a text feature (valid: {texts})")
        self._text_key, self._data_dir = text_key, data_dir

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> str:
        try:
            record = self._records[i]
        except (RuntimeError, ValueError) as e:  # a file damaged, cut short or missing (ValueError: an empty record)
            raise ValueError(f"{self._where}: record {i} cannot be read ({_joined_lines(e)}); the dataset's files in "
                             f"data_dir={self._data_dir!r} are damaged or incomplete: build it again") from None
        return utf8_text(record[self._text_key], f"{self._where}: record {i}, feature {self._text_key!r}",
                         start=False, advice="set data.text_key to a feature of UTF-8 text")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


SOURCES = ("embedded", "stdlib", "text", "jsonl", "tfds", "synthetic")  # raw sources (and random tokens)
DOCUMENT_SOURCES = tuple(s for s in SOURCES if s != "synthetic")  # those with documents to prepare or evaluate


def make_source(data_config) -> tuple[Sequence[str] | None, Sequence[str] | None]:
    """(train source, eval source or None) from the `data` config section. `text` and `jsonl`
    both read `files` (the suffix decides how); `synthetic` has no documents: (None, None)."""
    source = data_config.get("source")
    text_key = data_config.get("text_key", "text")
    if source == "embedded":
        return EmbeddedCorpus(), None
    if source == "stdlib":
        return StdlibCorpus(), None
    if source in ("text", "jsonl"):
        return TextFiles(data_config.get("files") or [], text_key), None
    if source == "tfds":
        name, data_dir = data_config.get("tfds_name"), data_config.get("data_dir")
        if not name:
            raise ValueError("data.tfds_name is empty; give the TFDS dataset name for source=tfds")
        split, eval_split = data_config.get("tfds_split") or "train", data_config.get("tfds_eval_split")
        train = TfdsSource(name, split, data_dir, text_key)
        if not eval_split:
            return train, None
        held = TfdsSource(name, eval_split, data_dir, text_key, "data.tfds_eval_split")
        shared = _shared_records(train.ranges, held.ranges)
        if shared:  # held-out documents would be trained on
            raise ValueError(f"data.tfds_eval_split={eval_split!r} reads {shared} of the records data.tfds_split="
                             f"{split!r} trains on; give splits with no record in common (e.g. 'train[:90%]' and "
                             f"'train[90%:]', or the dataset's validation split)")
        return train, held
    if source == "synthetic":
        return None, None
    raise ValueError(f"data.source={source!r} is not supported; valid: {', '.join(SOURCES)}")


# ---- held-out split ------------------------------------------------------------------------


def held_out(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the documents held out for evaluation: the ceil(fraction * n) smallest hashes.

    Ranking rather than comparing each hash with `fraction` guarantees a small corpus at least
    one eval document; a document's assignment depends only on its hash and the corpus size. The
    product is exact for the fraction as written (0.07 of 100 documents is 7, where the float
    product, 7.000000000000001, would round up to 8)."""
    if fraction == 0 or len(hashes) == 0:
        return np.zeros(len(hashes), bool)
    k = math.ceil(Fraction(str(fraction)) * len(hashes))
    return hashes <= np.partition(hashes, k - 1)[k - 1]


def split_indices(n: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) document indices of a source of n documents with no eval split of its own."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} is out of range; valid: 0 <= eval_fraction < 1")
    mask = held_out(index_hashes(n), eval_fraction)
    if mask.all():  # any fraction above 0 holds out at least one document
        if n == 1:
            raise ValueError(f"data.eval_fraction={eval_fraction} holds out the corpus's only document (any value "
                             f"above 0 holds out at least one); set data.eval_fraction=0 or add documents")
        raise ValueError(f"data.eval_fraction={eval_fraction} holds out all {n} documents (it holds out "
                         f"ceil(eval_fraction x {n})); valid: 0 <= eval_fraction <= {n - 1}/{n}, or add documents")
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def index_hashes(n: int) -> np.ndarray:
    """A salted 64-bit hash (splitmix64) of each document index 0..n-1."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(_SPLIT_SALT)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


_SPLIT_SALT = 0x9E3779B97F4A7C15


# ---- batches -------------------------------------------------------------------------------


class Subset:
    """Documents `indices` of a source, by position."""

    def __init__(self, source: Sequence[str], indices: Sequence[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.source[int(self.indices[i])]

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def unigram_perplexity(train_counts: np.ndarray, eval_batch_list: list[dict[str, np.ndarray]]) -> float:
    """Perplexity of an add-one smoothed unigram model on the masked targets of the eval batches:
    the baseline a language model has to beat."""
    log_probs = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
    nll = sum(-(log_probs[b["targets"]] * b["loss_mask"]).sum() for b in eval_batch_list)
    n = sum(b["loss_mask"].sum() for b in eval_batch_list)
    if n == 0:
        raise ValueError("the eval batches have no target with loss_mask 1")
    return float(np.exp(nll / n))


# ---- prefetch ------------------------------------------------------------------------------


class Prefetcher:
    """Builds the batches of steps start, start + 1, ... in a background thread, `depth` ahead,
    so the accelerator does not wait on input. One thread calling `fn` in step order keeps the
    sequence the same as direct calls; `next(step)` must follow that order."""

    def __init__(self, fn: Callable[[int], dict], start: int, depth: int = 2):
        self._fn, self._expected = fn, start
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True)
        self._thread.start()

    def _produce(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (self._fn(step), None)
            except Exception as e:  # handed to the consumer, which raises it
                item = (None, e)
            self._queue.put(item)
            if item[1] is not None:
                return
            step += 1

    def next(self, step: int) -> dict:
        if self._stop.is_set():
            raise RuntimeError("the Prefetcher is closed")
        if step != self._expected:
            raise ValueError(f"Prefetcher.next({step}): the next prefetched step is {self._expected}")
        batch, error = self._queue.get()
        if error is not None:
            self.close()  # the thread has stopped; later calls say so instead of waiting
            raise error
        self._expected += 1
        return batch

    def close(self) -> None:
        """Stop the thread: it finishes the batch it is building, then exits."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):  # emptying the queue unblocks a pending put
            while True:
                self._queue.get_nowait()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
