"""Peak memory and wall time of `llama-jax convert` on a checkpoint of realistic size.

Builds a random Hugging Face checkpoint (default ~1.6 GB, float32, sharded safetensors), then
measures in separate processes, one after another on the same files:
  read      reading every input file once,
  copy      copying the input directory (read + write the same bytes: the floor for a converter),
  hf->jax   `llama-jax convert --from hf --to jax`,
  jax->hf   `llama-jax convert --from jax --to hf`,
and reports wall time as ratios to the read and to the copy, and peak RSS against the target
1.3 x checkpoint size + 512 MiB. The page cache is dropped before every step when the benchmark
may (root on Linux), so each step reads from disk; otherwise all reads are warm and it says so.
Everything is written to a new directory inside `--workdir` (created if missing), removed at the
end, also when a step fails; nothing else in `--workdir` is touched.

    python benchmarks/convert_memory.py [--workdir /tmp/llama-jax-convert-bench] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llama_jax.cli import OneLineParser, positive_int
from timing import scratch_dir

MiB = 2**20


def make_checkpoint(path: Path, layers: int, dim: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> int:
    """A random HF checkpoint written one layer per shard with the `safetensors` package."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    hd = dim // heads
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=dim,
                  intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)

    groups = [{"model.embed_tokens.weight": w(vocab, dim)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({p + "input_layernorm.weight": np.ones(dim, np.float32),
                       p + "post_attention_layernorm.weight": np.ones(dim, np.float32),
                       p + "self_attn.q_proj.weight": w(heads * hd, dim), p + "self_attn.k_proj.weight": w(kv_heads * hd, dim),
                       p + "self_attn.v_proj.weight": w(kv_heads * hd, dim), p + "self_attn.o_proj.weight": w(dim, heads * hd),
                       p + "mlp.gate_proj.weight": w(ffn, dim), p + "mlp.up_proj.weight": w(ffn, dim),
                       p + "mlp.down_proj.weight": w(dim, ffn)})
    groups.append({"model.norm.weight": np.ones(dim, np.float32), "lm_head.weight": w(vocab, dim)})
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
        total += sum(a.nbytes for a in group.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process, started from a small parent."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    print("   ", out.strip().splitlines()[-1] if out.strip() else "")
    return seconds, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


READ_ALL = "import sys,pathlib\nfor p in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n" \
           "    f=open(p,'rb')\n    while f.read(1<<24): pass\n"


def main() -> None:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/llama-jax-convert-bench",
                    help="the benchmark works in a new directory inside this one and removes only that")
    ap.add_argument("--layers", type=positive_int, default=12)
    ap.add_argument("--dim", type=positive_int, default=1536)
    ap.add_argument("--ffn", type=positive_int, default=4096)
    ap.add_argument("--vocab", type=positive_int, default=32000)
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dim % 24:
        ap.error(f"--dim {args.dim} is not a multiple of 24; the checkpoint has 12 heads of an even head dim")

    if args.make_only:  # --workdir: the scratch directory the parent made
        make_checkpoint(Path(args.workdir) / "hf", args.layers, args.dim, 12, 4, args.ffn, args.vocab)
        return
    with scratch_dir(args.workdir, "convert-bench-") as work:
        benchmark(work)


def benchmark(work: Path) -> None:
    """Every step in `work`, an empty directory."""
    # Built in a child process: a fork of a parent holding the arrays would inflate children's peak RSS.
    subprocess.run([sys.executable, __file__, "--make-only", *sys.argv[1:], "--workdir", str(work)], check=True)
    size = json.loads((work / "hf" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"checkpoint: {size / MiB:,.0f} MiB float32 in {len(list((work / 'hf').glob('*.safetensors')))} shards")
    cli = [sys.executable, "-m", "llama_jax.cli", "convert"]
    runs = {
        "read hf files": [sys.executable, "-c", READ_ALL, str(work / "hf")],
        "copy hf files": [sys.executable, "-c", "import shutil,sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                          str(work / "hf"), str(work / "hf-copy")],
        "hf -> jax": cli + ["--from", "hf", "--to", "jax", str(work / "hf"), str(work / "jax")],
        "read jax files": [sys.executable, "-c", "import os,sys\nfor r,_,fs in os.walk(sys.argv[1]):\n"
                           "  for f in fs: open(os.path.join(r,f),'rb').read()", str(work / "jax")],
        "copy jax files": [sys.executable, "-c", "import shutil,sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                           str(work / "jax"), str(work / "jax-copy")],
        "jax -> hf": cli + ["--from", "jax", "--to", "hf", str(work / "jax"), str(work / "hf-out")],
    }
    results, cold = {}, True
    for label, cmd in runs.items():
        cold = drop_page_cache() and cold
        print(f"{label} ...")
        results[label] = measure(cmd)
    print(f"\npage cache: {'dropped before each step (cold reads)' if cold else 'not dropped (warm reads)'}")
    target = 1.3 * size + 512 * MiB
    print(f"| step | wall s | x read | x copy | peak RSS MiB | RSS / target ({target / MiB:,.0f} MiB) |")
    print("|---|---|---|---|---|---|")
    for label, fmt in (("hf -> jax", "hf"), ("jax -> hf", "jax")):
        (sec, rss), read_sec, copy_sec = results[label], results[f"read {fmt} files"][0], results[f"copy {fmt} files"][0]
        print(f"| {label} | {sec:.1f} | {sec / read_sec:.1f} | {sec / copy_sec:.2f} | {rss / MiB:,.0f} | {rss / target:.2f} |")
    for label in ("read hf files", "copy hf files", "read jax files", "copy jax files"):
        print(f"| {label} | {results[label][0]:.1f} | | | {results[label][1] / MiB:,.0f} | |")


if __name__ == "__main__":
    main()
