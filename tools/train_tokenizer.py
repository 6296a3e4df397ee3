#!/usr/bin/env python
r"""Train a LLaMA-style SentencePiece tokenizer.model on text files.

    python tools/train_tokenizer.py --input 'corpus/*.txt' --input docs.jsonl --vocab-size 8000 \
        --output tokenizer.model

Inputs are files or glob patterns. A `.jsonl` file holds one JSON object per line and each
object's `--jsonl-key` string is a document; any other file is one UTF-8 text document, read
line by line (training takes every non-empty line as one sentence, so finer document
boundaries would change nothing). Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import errno
import glob
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from llama_jax.cli import OneLineParser, _error_text, int_at_least
from llama_jax.data import check_not_special, each_file_once, jsonl_texts, utf8_text
from llama_jax.safe_io import cannot_write, check_outside_runs_and_models, check_writable, real_path
from llama_jax.signals import Terminated, raising_signals, stopped_status
from llama_jax.tokenizer import check_trainable_size, load_tokenizer, train_sentencepiece


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """The files named by `patterns`, in order, each once; ValueError when one names nothing."""
    files: list[str] = []
    for pattern in patterns:
        if not pattern.strip():
            raise ValueError("--input is empty; give a file or a glob pattern, e.g. 'corpus/*.txt'")
        is_glob = glob.has_magic(pattern)
        names = sorted(glob.glob(pattern, recursive=True)) if is_glob else [pattern]
        matches = [m for m in names if Path(m).is_file()]
        if not is_glob:
            check_not_special(pattern)
        if not matches:
            raise ValueError(f"{pattern}: matches no file" if is_glob else f"{pattern}: no such file")
        files += matches
    return [Path(f) for f in each_file_once(files)]


class Corpus:
    """Streams the documents of the input files and counts what it read."""

    def __init__(self, files: list[Path], jsonl_key: str):
        self.files, self.jsonl_key = files, jsonl_key
        self.documents = 0
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            jsonl = path.suffix == ".jsonl"
            self.documents += not jsonl  # a text file is one document, a .jsonl line one
            try:
                for text in jsonl_texts(path, self.jsonl_key, "--jsonl-key") if jsonl else _text_lines(path):
                    self.documents += jsonl
                    self.chars += len(text)
                    yield text
            except OSError as e:
                raise ValueError(f"{path}: cannot read ({e.strerror})") from None


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, streamed, without a leading byte-order mark."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            yield from f
    except UnicodeDecodeError:
        with open(path, "rb") as f:  # again as bytes, to name the line and byte
            for number, raw in enumerate(f, start=1):
                utf8_text(raw, f"{path}:{number}")
        raise


def check_arguments(args, inputs: list[Path]) -> None:
    """ValueError for a setting training would refuse late or obscurely, or an --output that would
    replace a file not meant to be replaced (an input, or any file without --overwrite)."""
    check_trainable_size(args.vocab_size, "--vocab-size")
    if args.jsonl_key is not None and not any(path.suffix == ".jsonl" for path in inputs):
        raise ValueError(f"--jsonl-key {args.jsonl_key} names a field of .jsonl files, and no --input is one; "
                         f"leave it out, or give the .jsonl files")
    if not args.output.strip():
        raise ValueError("--output is empty; give the path of the file to write, e.g. tokenizer.model")
    output = Path(args.output)
    if output.is_dir() or args.output.endswith("/"):  # (a folder not there yet: Path drops the slash)
        what = "is a directory" if output.is_dir() else "names a directory (it ends in /)"
        raise ValueError(f"--output {args.output} {what}; give the path of the file to write, "
                         f"e.g. {output / 'tokenizer.model'}")
    if output.exists() and not output.is_file():  # (--overwrite would put a file in place of the device or pipe)
        raise ValueError(f"--output {args.output} is not a regular file (a pipe, socket or device); give the path "
                         f"of the file to write")
    if any(real_path(output) == real_path(path) for path in inputs):
        raise ValueError(f"--output {output} is one of the --input files; give another path")
    check_outside_runs_and_models(output, "--output")
    if output.exists() and not args.overwrite:
        raise ValueError(f"--output {output} exists; pass --overwrite to replace it")
    check_writable(output, "--output")


def unwritable(output: Path, error: OSError) -> str:
    """The error line for an --output that could not be written (the folder checked before training
    changed since): the folder it would go into (the nearest one on its path that exists) and why,
    where the OS's error names a temporary file beside it or a folder on its way."""
    folder = next(p for p in output.absolute().parents if p.is_dir())
    return cannot_write("--output", output, folder, error)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", action="append", required=True, help="file or glob pattern; repeatable")
    parser.add_argument("--jsonl-key", help="field holding the text in .jsonl files (default: text)")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="where to write tokenizer.model")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="(default bpe)")
    parser.add_argument("--num-threads", type=int_at_least(1, 1024), default=2,  # (SentencePiece's limits)
                        help="training threads, 1 to 1024 (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)

    try:
        with raising_signals():  # Ctrl-C, SIGTERM: one line, and no --output (it is written whole or not at all)
            return _train(args, parser.prog)
    except (KeyboardInterrupt, Terminated) as e:
        return stopped_status(parser.prog, e)


def _train(args, prog: str) -> int:
    start = time.time()
    try:
        corpus = Corpus(resolve_inputs(args.input), "text" if args.jsonl_key is None else args.jsonl_key)
        check_arguments(args, corpus.files)
        print(f"training a {args.vocab_size}-piece {args.model_type} tokenizer on {len(corpus.files)} file(s)",
              flush=True)
        try:
            output = train_sentencepiece(corpus, args.output, args.vocab_size, model_type=args.model_type,
                                         num_threads=args.num_threads)
        except OSError as e:  # writing --output (an input that cannot be read is a ValueError)
            if e.errno in (errno.ENOSPC, errno.EFBIG):
                raise  # (said in those words below)
            raise ValueError(unwritable(Path(args.output), e)) from None
        vocab_size = load_tokenizer(output).vocab_size
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {_error_text(e, args)}", file=sys.stderr)  # (a full disk names --output)
        return 2
    fewer = f" (fewer than --vocab-size {args.vocab_size}: the corpus supports no more)" \
        if vocab_size < args.vocab_size else ""
    print(f"wrote {output}: {vocab_size} pieces{fewer} from {corpus.documents} documents "
          f"({corpus.chars / 1e6:.1f}M characters) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
