"""Speed and memory of `llama_jax.prepare.prepare` (what `llama-jax prepare-data` runs).

Builds a corpus of real text available offline: the Python standard library's .py files, each
one document, repeated `--repeats` times (each copy with its own last line) into JSONL files (the
large corpus), and the same files once (the small corpus, the same documents sizes at 1/repeats
of the size). Trains a SentencePiece tokenizer (`--vocab` pieces, LLaMA-2 settings) on every 10th
file. Then, each in its own process:
  encode    the tokenizer's own `encode(text, bos=True, eos=True)` over the large corpus, one
            process, timing the encode calls only: the reference speed;
  prepare   `prepare(...)` with 1 and with 2 workers, on both corpora, timing the whole call
            (reading the files twice, worker start, tokenizing, writing and hashing the shards).
Reports tokens/s, the ratio to the reference per worker (target >= 0.8), and the peak RSS of the
preparing process and of its largest worker (`ru_maxrss`), whose growth from the small corpus to
the large one should stay within 10%. Each row also shows the 1-minute load average when it ended:
other work on the machine slows the multi-worker runs first. Everything is written to a new
directory inside `--workdir` (created if missing), removed at the end, also when a step fails;
nothing else in `--workdir` is touched.

    python benchmarks/prepare_data.py [--workdir /tmp/prepare-bench] [--repeats 10] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from llama_jax.cli import OneLineParser, positive_int
from timing import scratch_dir

MiB = 2**20


def stdlib_documents() -> list[tuple[str, str]]:
    """(relative path, text) of every UTF-8 .py file of the standard library, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        try:
            documents.append((str(path.relative_to(root)), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            pass
    return documents


def write_corpus(directory: Path, documents: list[tuple[str, str]], repeats: int) -> int:
    """`repeats` JSONL files of the documents, copy r of each ending in its own comment line. Returns characters."""
    directory.mkdir(parents=True)
    chars = 0
    for r in range(repeats):
        with open(directory / f"part-{r:03d}.jsonl", "w", encoding="utf-8") as f:
            for name, text in documents:
                text = f"{text}\n# copy {r} of {name}\n"
                chars += len(text)
                f.write(json.dumps({"text": text}) + "\n")
    return chars


def data_section(corpus: Path, tokenizer: Path) -> dict:
    return {"source": "jsonl", "files": [str(corpus / "*.jsonl")], "text_key": "text", "eval_fraction": 0.01,
            "tokenizer": str(tokenizer), "tokenizer_vocab_size": 0}


def peak_rss() -> dict:
    """Peak RSS of this process and of its largest child (the workers), and the load average now."""
    return {"rss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "load": os.getloadavg()[0]}


def child_encode(corpus: Path, tokenizer_path: Path) -> dict:
    from llama_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    tokens, seconds = 0, 0.0
    for file in sorted(corpus.glob("*.jsonl")):
        texts = [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines()]
        start = time.perf_counter()
        for text in texts:
            tokens += len(tokenizer.encode(text, bos=True, eos=True))
        seconds += time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, **peak_rss()}


def child_prepare(corpus: Path, tokenizer_path: Path, output: Path, workers: int) -> dict:
    from llama_jax.prepare import prepare_with_stats

    start = time.perf_counter()
    manifest, stats = prepare_with_stats(data_section(corpus, tokenizer_path), output, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    return {"tokens": tokens, "seconds": seconds, "tokenize_seconds": stats.seconds, "shards": shards, **peak_rss()}


def run_child(*args: str) -> dict:
    """Run this script as `--child ARGS` in a new process; its result is the last stdout line."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def versions() -> str:
    import numpy
    import sentencepiece

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return (f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"sentencepiece {sentencepiece.__version__}")


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/prepare-bench",
                        help="the benchmark works in a new directory inside this one and removes only that")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="copies of the standard library in the large corpus")
    parser.add_argument("--vocab", type=positive_int, default=32000)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = child_encode(Path(rest[0]), Path(rest[1])) if kind == "encode" else \
            child_prepare(Path(rest[0]), Path(rest[1]), Path(rest[2]), int(rest[3]))
        print(json.dumps(result))
        return
    with scratch_dir(args.workdir, "prepare-bench-") as work:
        benchmark(work, args.repeats, args.vocab)


def benchmark(work: Path, repeats: int, vocab: int) -> None:
    """Every step in `work`, an empty directory."""
    from llama_jax.tokenizer import train_sentencepiece

    documents = stdlib_documents()
    large_chars = write_corpus(work / "large", documents, repeats)
    small_chars = write_corpus(work / "small", documents, 1)
    start = time.perf_counter()
    tokenizer = train_sentencepiece((text for _, text in documents[::10]), work / "tokenizer.model", vocab)
    print(f"corpus: {len(documents)} standard-library files x {repeats}: {large_chars / 1e6:.1f}M characters "
          f"(small: {small_chars / 1e6:.1f}M); tokenizer trained in {time.perf_counter() - start:.1f} s", flush=True)

    reference = run_child("encode", str(work / "large"), str(tokenizer))
    encode_rate = reference["tokens"] / reference["seconds"]
    print(f"encode, 1 process: {reference['tokens']:,} tokens in {reference['seconds']:.1f} s", flush=True)
    rows = {}
    for corpus in ("large", "small"):
        for workers in (1, 2):
            output = work / f"out-{corpus}-{workers}"
            rows[corpus, workers] = run_child("prepare", str(work / corpus), str(tokenizer), str(output), str(workers))
            print(f"prepare {corpus}, {workers} worker(s): {rows[corpus, workers]}", flush=True)
            shutil.rmtree(output)
    if rows["large", 1]["tokens"] != reference["tokens"]:  # (not an assert: `python -O` drops those)
        sys.exit(f"prepared {rows['large', 1]['tokens']:,} tokens where encoding gave {reference['tokens']:,}")

    print(f"\n{versions()}\n")
    print("| corpus | tokens | workers | s | tokens/s | ÷ (workers × encode tokens/s) | "
          "peak RSS main MiB | peak RSS worker MiB | load after |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| large | {reference['tokens']:,} | encode, 1 process | {reference['seconds']:.1f} | {encode_rate:,.0f} | "
          f"1.00 | {reference['rss_main'] / MiB:,.0f} | | {reference['load']:.2f} |")
    for (corpus, workers), r in rows.items():
        rate = r["tokens"] / r["seconds"]
        worker_rss = f"{r['rss_workers'] / MiB:,.0f}" if workers > 1 else "(in process)"
        print(f"| {corpus} | {r['tokens']:,} | {workers} | {r['seconds']:.1f} | {rate:,.0f} | "
              f"{rate / (workers * encode_rate):.2f} | {r['rss_main'] / MiB:,.0f} | {worker_rss} | {r['load']:.2f} |")
    print()
    for workers in (1, 2):
        large, small = rows["large", workers], rows["small", workers]
        growth = large["rss_main"] / small["rss_main"] - 1
        line = (f"{workers} worker(s): main peak RSS {growth:+.1%} from {small['tokens']:,} to "
                f"{large['tokens']:,} tokens")
        if workers > 1:
            line += f", worker peak RSS {large['rss_workers'] / small['rss_workers'] - 1:+.1%}"
        print(line)


if __name__ == "__main__":
    main()
