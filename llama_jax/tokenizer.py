"""Tokenizers of the LLaMA family behind one small interface.

LLaMA 1/2, TinyLlama and Code Llama ship a SentencePiece `tokenizer.model` (a protobuf);
LLaMA 3 ships a tiktoken rank file under the same name (lines of `base64(token bytes) rank`).
`load_tokenizer` tells them apart by content and returns a `Tokenizer` whose `encode(text)`
gives the ids Meta's reference code gives (BOS first by default, no EOS). `train_sentencepiece`
makes a new SentencePiece model with LLaMA 2's settings, for small experiments.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm

from llama_jax.config import check_flag, is_int
from llama_jax.safe_io import atomic_file, signals_held


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the project needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int  # -1 when the model has none
    special_ids: frozenset[int]  # ids that are not text (BOS, EOS, unknown, chat markers, ...)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS in front and/or EOS at the end when asked."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; BOS, EOS and pad ids are dropped wherever they occur."""
        ...


def unicode_problem(text: str, from_argv: bool = False) -> str | None:
    """None when `text` is Unicode text, else what is not: a lone surrogate, which a JSON escape
    such as \\ud800 gives, or, in text from the command line (`from_argv`), a byte of another
    encoding that Python passed on escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if from_argv and 0xDC80 <= code <= 0xDCFF:  # Python's escape of an undecodable byte
            return f"byte {code - 0xDC00:#04x} at character {e.start}"
        return f"a lone surrogate \\u{code:04x} at character {e.start}"
    return None


def _describe(value: object) -> str:
    shape = getattr(value, "shape", None)
    return f"an array of shape {shape}" if shape is not None else f"{value!r}"[:60]


def _checked_flags(bos: object, eos: object) -> None:
    check_flag(bos, "bos")
    check_flag(eos, "eos")


def check_tokenizer(tokenizer: object, name: str = "tokenizer") -> None:
    """TypeError unless `tokenizer` is a loaded tokenizer (a path to one is not)."""
    if isinstance(tokenizer, (str, bytes, os.PathLike)) or not all(
            hasattr(tokenizer, a) for a in ("encode", "decode", "vocab_size")):
        raise TypeError(f"{name} must be a loaded tokenizer (llama_jax.tokenizer.load_tokenizer(path)), got "
                        f"{_describe(tokenizer)}")


def _checked_text(text: str) -> str:
    problem = unicode_problem(text) if isinstance(text, str) else f"a {type(text).__name__}, not a str"
    if problem:
        raise ValueError(f"the text to encode is not Unicode text ({problem})")
    return text


def _checked_ids(ids: Sequence[int], vocab_size: int, drop: set[int]) -> list[int]:
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__") or getattr(ids, "ndim", 1) != 1:
        raise ValueError(f"ids to decode must be one sequence of token ids (a list or 1-D array of integers), got "
                         f"{_describe(ids)}")
    ids = list(ids)  # (an iterator is read once)
    bad = [i for i in ids if not is_int(i)]
    if bad:
        raise ValueError(f"ids to decode must be integers, got {bad[0]!r}")
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [i for i in out if i not in drop]


class SentencePieceTokenizer:
    """A SentencePiece model (LLaMA 1/2, TinyLlama, Code Llama)."""

    def __init__(self, model_proto: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`; same as Meta's `Tokenizer.encode(text, bos, eos)`."""
        _checked_flags(bos, eos)
        return self.sp.encode(_checked_text(text), add_bos=bos, add_eos=eos)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Control and unknown pieces; found on first use (a pass over the vocabulary), which only
        decoding generated text makes (generate, lm-eval)."""
        return frozenset(i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without BOS/EOS/pad; bytes that are not valid UTF-8 become U+FFFD."""
        return self.sp.decode(_checked_ids(ids, self.vocab_size, {self.bos_id, self.eos_id, self.pad_id}))

    @functools.cached_property
    def _without_dummy_prefix(self) -> spm.SentencePieceProcessor:
        """This model with its normalizer's add_dummy_prefix off: it puts no space before a text it
        encodes, and takes none off the start of a text it decodes."""
        # A second normalizer_spec (ModelProto field 3) holding add_dummy_prefix (its field 3) = false:
        # protobuf merges it into the first, as the model's own spec with that one setting changed.
        return spm.SentencePieceProcessor(model_proto=self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00")

    def encode_infilling(self, text: str) -> list[int]:
        """Ids of `text` without the space SentencePiece puts before it: a text that continues
        another (Meta's Code Llama `encode_infilling`, which encodes "☺" + text and drops "▁☺")."""
        return self._without_dummy_prefix.encode(_checked_text(text))

    def decode_infilling(self, ids: Sequence[int]) -> str:
        """Text of `ids` that continues another: the first piece's leading space is kept (Meta's
        Code Llama `decode_infilling`); without BOS/EOS/pad, as `decode`."""
        return self._without_dummy_prefix.decode(_checked_ids(ids, self.vocab_size,
                                                              {self.bos_id, self.eos_id, self.pad_id}))


# LLaMA 3's pre-tokenizer regex, as published with Meta's llama3 tokenizer.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# LLaMA 3's 256 special tokens; their ids follow the last rank. The names are LLaMA 3.1's, as the
# Hugging Face tokenizer.json of LLaMA 3.1, 3.2 and 3.3 (and transformers' converter) gives them; 3.1
# named some ids that LLaMA 3.0 reserved and renumbered the reserved ones. Every 3.x has the same rank
# file, and 3.0 models were not trained on those ids, so this one table serves them all. (Meta's code
# calls 128005 <|step_id|> and, from 3.2 on, 128011 <|image|>: reserved here, as in transformers.)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: ends a 3.1 instruct model's tool call
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 248)),
]

# Meta encodes long text piecewise: tiktoken gets at most 400k characters at a time, and runs of
# whitespace or non-whitespace are cut every 25k characters (BPE on one huge piece is very slow).
_MAX_CHUNK = 400_000
_MAX_RUN = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_RUN + 1, _MAX_RUN + 1))


def _pieces(text: str) -> Iterator[str]:
    for start in range(0, len(text), _MAX_CHUNK):
        chunk = text[start:start + _MAX_CHUNK]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for at in range(run.start() + _MAX_RUN, run.end(), _MAX_RUN):
                yield chunk[cut:at]
                cut = at
        yield chunk[cut:]


class TiktokenTokenizer:
    """LLaMA 3's byte-level BPE: tiktoken ranks plus the 256 special tokens after them."""

    def __init__(self, mergeable_ranks: dict[bytes, int]):
        import tiktoken  # only LLaMA 3 files need it

        n = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = {tok: n + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.vocab_size: int = n + len(LLAMA3_SPECIAL_TOKENS)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = -1
        self.special_ids = frozenset(self.special_tokens.values())

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of `text`; special-token text in it is encoded as ordinary text, as Meta's default."""
        _checked_flags(bos, eos)
        ids = [self.bos_id] if bos else []
        for piece in _pieces(_checked_text(text)):
            ids += self.encoding.encode_ordinary(piece)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without BOS/EOS; other special tokens come out as their text."""
        return self.encoding.decode(_checked_ids(ids, self.vocab_size, {self.bos_id, self.eos_id}))


def _parse_tiktoken(data: bytes, path: Path) -> dict[bytes, int] | None:
    """The ranks of a tiktoken file, or None when `data` is not one (its first line is no rank line);
    ValueError naming the line of `path` that breaks one: a line that is not `base64(token) rank`
    after lines that are, or a token listed a second time."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except (ValueError, binascii.Error):
            if not ranks:
                return None
            raise ValueError(f"{path}: line {number} of this tiktoken rank file is not a base64 token, a space and "
                             f"its rank: {line[:60]!r}") from None
        if token in ranks:
            raise ValueError(f"{path}: line {number} lists the token {token!r} again (an earlier line gave it rank "
                             f"{ranks[token]}); each token has one rank")
        ranks[token] = rank
    return ranks


def check_fits(tokenizer: Tokenizer, vocab_size: int, remedy: str = "use the model's own tokenizer") -> None:
    """ValueError unless every id of `tokenizer` is below a model's `vocab_size`; `remedy` ends it."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{vocab_size}; {remedy}")


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file a tokenizer path names: `path` itself, or the tokenizer.model in directory `path`."""
    path = Path(path)
    return path / "tokenizer.model" if path.is_dir() else path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a SentencePiece or tiktoken `tokenizer.model` (or a directory holding one).

    Bad input raises ValueError with a one-line message naming the file.
    """
    if Path(path).is_dir() and not tokenizer_file(path).is_file():
        raise ValueError(f"{path}: a directory without tokenizer.model; give a tokenizer.model file "
                         "or a directory holding one")
    path = tokenizer_file(path)
    if path.exists() and not path.is_file():  # a FIFO or a device: reading it could wait forever
        raise ValueError(f"{path}: not a regular file; give a tokenizer.model file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise ValueError(f"{path}: empty file, not a tokenizer model")

    if data.startswith(codecs.BOM_UTF8) and _parse_tiktoken(data[len(codecs.BOM_UTF8):], path) is not None:
        raise ValueError(f"{path}: a tiktoken rank file that starts with a UTF-8 byte order mark (written by an "
                         f"editor?), which tiktoken does not read; remove those first 3 bytes")
    ranks = _parse_tiktoken(data, path)
    if ranks is not None:
        if set(ranks.values()) != set(range(len(ranks))):
            raise ValueError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1}, each once")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError(f"{path}: tiktoken file lacks some of the 256 single-byte tokens")
        return TiktokenTokenizer(ranks)
    try:
        tokenizer = SentencePieceTokenizer(data)
    except RuntimeError:
        raise ValueError(f"{path}: neither a SentencePiece model nor a tiktoken rank file (corrupt?)") from None
    missing = [name for name, i in (("BOS", tokenizer.bos_id), ("EOS", tokenizer.eos_id)) if i < 0]
    if missing:  # LLaMA texts start with BOS, and documents end with EOS
        raise ValueError(f"{path}: this SentencePiece model defines no {' or '.join(missing)} piece; LLaMA "
                         f"tokenizers define both (train one with bos_id and eos_id set, as tools/train_tokenizer.py "
                         f"does)")
    return tokenizer


def check_piece_count(value: object, name: str = "vocab_size") -> None:
    """ValueError unless `value` is a number of pieces SentencePiece can train: its settings are
    32-bit integers, and a larger or fractional one failed inside it as "cannot parse ... as int"."""
    if not is_int(value) or not 1 <= value < 2**31:
        raise ValueError(f"{name} must be a positive integer below 2**31, got {value!r}")


def check_trainable_size(vocab_size: object, name: str = "vocab_size", byte_fallback: bool = True, unk_id: int = 0,
                         bos_id: int = 1, eos_id: int = 2, pad_id: int = -1, **_: Any) -> None:
    """ValueError unless `train_sentencepiece` (its settings as keywords) can train `vocab_size`
    pieces: a count SentencePiece takes, with room for the special pieces (it fails without a reason
    below that); `name` is the setting's, for the message."""
    check_piece_count(vocab_size, name)
    specials = [piece for piece, id_ in zip(("unk", "bos", "eos", "pad"), (unk_id, bos_id, eos_id, pad_id)) if id_ >= 0]
    if vocab_size < len(specials):
        byte_pieces = " and the 256 byte pieces" if byte_fallback else ""
        raise ValueError(f"a vocabulary of {vocab_size} piece{'s' if vocab_size != 1 else ''} cannot hold the "
                         f"{len(specials)} special pieces ({', '.join(specials)}){byte_pieces}, let alone the corpus's "
                         f"characters; give a vocabulary size of at least {len(specials) + 256 * byte_fallback + 1}")


class _Lines:
    """The non-empty lines of `texts`, UTF-8, each ended by a newline, for SentencePiece's trainer."""

    def __init__(self, texts: Iterable[str], max_bytes: int):
        self.texts = iter(texts)
        self.count = self.long = 0  # lines given, and those of them the trainer skips for their length
        self.max_bytes = max_bytes

    def __iter__(self) -> Iterator[bytes]:
        for text in self.texts:
            for line in text.split("\n"):
                if line:
                    try:
                        data = line.encode()
                    except UnicodeEncodeError:
                        raise ValueError(f"line {self.count + 1} of the text is no Unicode text: it holds "
                                         f"{unicode_problem(line)}") from None
                    self.count += 1
                    self.long += len(data) > self.max_bytes
                    yield data + b"\n"


class _TrainerFailed(Exception):
    """SentencePiece's trainer failed (`_trained_model`), not the training lines' iterator."""


def _trained_model(lines: _Lines, flags: dict[str, Any]) -> bytes:
    """The model SentencePiece trains on `lines` with `flags`, trained in a child process
    (llama_jax/spm_trainer.py) that this one feeds and waits for: the training runs in native code,
    where Ctrl-C or the `llama-jax` command's SIGTERM would be raised only once it is done (minutes
    on a large corpus); here they are raised at once, and the child is stopped. `_TrainerFailed`:
    SentencePiece's message, or how the child ended (a Python error of its own: after its traceback);
    an error of the lines' iterator is raised as it was."""
    # (as they are, for the trainer's Python wrapper to read as in this process; a value JSON has no form
    # for, a path say, as its text)
    flags_line = json.dumps(flags, default=str).encode() + b"\n"
    trainer = [sys.executable, "-P", str(Path(__file__).with_name("spm_trainer.py")), str(os.getpid())]
    child: subprocess.Popen | None = None
    feeding_error: list[BaseException] = []

    def feed():
        """The lines to the trainer, from a thread of their own: the trainer may stop reading before
        they end (it failed, or it has the sample it wanted) and write a model larger than the pipe
        holds, which this thread's writes must not keep it from. A failing iterator stops the trainer
        (its model would be of part of the text). The flags go first, as one line of JSON (not as an
        argument: a long user_defined_symbols list was more than an argument may hold)."""
        try:
            with contextlib.suppress(BrokenPipeError):  # the trainer stopped reading
                child.stdin.write(flags_line)
                for line in lines:
                    child.stdin.write(line)
                child.stdin.flush()
        except BaseException as e:
            feeding_error.append(e)
            child.kill()
        finally:
            with contextlib.suppress(BrokenPipeError):  # (what stayed in the buffer of a trainer that stopped)
                child.stdin.close()

    try:
        with signals_held():  # (a child started is one the `finally` below stops)
            child = subprocess.Popen(trainer, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1 << 20)
        feeder = threading.Thread(target=feed, name="sentencepiece-lines", daemon=True)
        feeder.start()
        output = child.stdout.read()
        status = child.wait()
        feeder.join()
    finally:
        if child is not None:
            if child.poll() is None:
                child.kill()
            child.stdout.close()
            child.wait()
    if feeding_error:
        raise feeding_error[0]
    if status == 0:
        return output
    if status == 1 and output:
        raise _TrainerFailed(output.decode())
    raise _TrainerFailed(f"its process ended with status {status}" if status > 0 else
                         f"its process was ended by {signal.Signals(-status).name}")


def train_sentencepiece(
    texts: Iterable[str],
    output_path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.99995,
    num_threads: int = 2,
    **options: Any,
) -> Path:
    """Train a SentencePiece model on `texts` with LLaMA 2's settings; write it to `output_path`.

    Each text is split into lines and every non-empty line is one training sentence, so no piece
    holds a newline (newlines go through byte fallback, as in LLaMA). Lines longer than
    `max_sentence_length` bytes (4192, LLaMA's value) are skipped by sentencepiece. All lines are
    used (no sampling), so the same texts give the same model: for BPE whatever `num_threads`
    (which the bytes record), for a unigram model only with the same `num_threads` (its pieces'
    ids and scores depend on how the trainer splits its work). `options` are further trainer flags
    (e.g. `input_sentence_size`, `user_defined_symbols`, `minloglevel=0` for the trainer's log).
    The training runs in a child process, stopped when Ctrl-C or SIGTERM is raised here. The file
    is written atomically. Returns its path.
    """
    flags: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        num_threads=num_threads,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=4192,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,  # a small corpus may not support vocab_size pieces
        minloglevel=2,
    )
    flags.update(options)
    check_trainable_size(**flags)
    lines = _Lines(texts, flags["max_sentence_length"])
    try:
        model = _trained_model(lines, flags)
    except _TrainerFailed as e:
        if lines.count == 0:
            raise ValueError("no text to train the tokenizer on") from None
        if lines.long == lines.count:
            raise ValueError(f"every line of the text is longer than the {lines.max_bytes} bytes SentencePiece trains "
                             f"on (it skips longer lines); break the text into lines") from None
        # Drop the "INTERNAL: src/file.cc(123) [condition]" prefix of sentencepiece's messages; some
        # are nothing but that prefix, and then the condition is the reason.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        prefix = re.match(r"[A-Z_]+: \S+\(\d+\) \[(.*?)\]\s*(.*)", reason)
        if prefix:
            reason = prefix[2] or f"its check {prefix[1]} failed"
        needed = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", reason)
        if needed:  # the rest of that message names a sentencepiece option this function does not take
            byte_pieces = ", the 256 byte pieces" if flags["byte_fallback"] else ""
            reason = (f"a vocabulary of {needed[1]} pieces cannot hold the {needed[2]} that training needs (the "
                      f"corpus's characters{byte_pieces} and the special pieces); give a vocabulary size of at "
                      f"least {needed[2]}")
        raise ValueError(f"sentencepiece training failed: {reason}") from None

    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp, open(tmp, "wb") as f:
        f.write(model)
        f.flush()
        os.fsync(f.fileno())
    return output
