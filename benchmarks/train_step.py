"""Training speed on CPU: llama-jax against PyTorch + transformers on the same model, side by side.

Both train the same architecture (float32; default dim 512, 8 layers, 8 heads, FFN 1408, vocab
8000, ~34M parameters) on the same random batches of 8 x 256 tokens with AdamW:
  llama-jax step   `Trainer.step` (the jitted, donated train step the run loop calls; on CPU a
                   gradient program and an update program);
  llama-jax train  the whole `llama-jax train` process on synthetic data (data, logging and
                   metrics included), from the tokens/s it logs after the first window;
  reference        `transformers.LlamaForCausalLM` (eager attention, as in the parity tests,
                   and `sdpa`) with `torch.optim.AdamW`, forward + backward + step.
The llama-jax step is timed with scanned layers (`model.scan_layers=True`, the default: one
compiled layer applied with `nn.scan`) and unrolled (`scan_layers=False`). The run also measures
XLA's float32 matmul rate (2048^2) and PyTorch's, and reports model FLOP utilisation against XLA's
(model FLOPs as in `llama_jax.metrics.flops_per_token`).

Everything in one process is compiled and warmed up first, then timed in rounds: each round
measures both matmul rates and every implementation in turn (three steps each, the first untimed:
a step that follows other work re-faults the memory that work left, which a training run, always
repeating its own step, does not), so that the machine's slow spells fall on all of them alike.
Ratios to PyTorch and MFU are taken within each round and reported as medians over the rounds
(tokens/s too); compile time is reported apart. The whole `llama-jax train` process runs after
the rounds, in its own process, and is compared with the rounds' medians.

    python benchmarks/train_step.py [--repeats 5] [--variants]

`--variants` also times the llama-jax step with `jax.nn.dot_product_attention`, and the whole
process with 4 KiB pages (`llama_jax.backend_tuning`'s huge-page restart turned off), to show
where the time goes. Like `llama-jax`, the script restarts itself once with glibc's huge-page
tunable where that applies; PyTorch runs under the same setting.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from decode import check_heads
from llama_jax.cli import OneLineParser, positive_int
from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]
MATMUL_N, MATMUL_REPEATS = 2048, 4  # the reference product; timed this many times per round (median)
STEPS_PER_ROUND = 2  # timed train steps of each implementation per round (median), after an untimed one


class Timed:
    """One implementation in the rounds: its step, compile + first step seconds if known, and the
    seconds of its step in each round."""

    def __init__(self, step, first: float | None = None):
        self.step, self.first, self.seconds = step, first, []

    def measure(self, repeats: int) -> None:
        """The median of `repeats` steps after an untimed one: the first step after other work
        re-faults the memory that work left (a training run only ever repeats its own step)."""
        self.seconds.append(median_seconds(self.step, repeats, warmup=1))


def matmul_steps() -> dict[str, Callable[[], object]]:
    """One float32 2048 x 2048 matmul in XLA and in PyTorch, each a callable that waits for it."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    t = torch.ones(MATMUL_N, MATMUL_N)
    return {"xla": lambda: f(a).block_until_ready(), "torch": lambda: t @ t}


def jax_config(args, **model_changes):
    from llama_jax.experiment import base_config

    config = base_config("debug", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                         n_kv_heads=args.heads, ffn_dim=args.ffn, max_seq_len=args.seq_len, **model_changes)
    config.train.update(batch_size=args.batch, seq_len=args.seq_len, steps=1000)
    config.optimizer.update(lr=1e-4, warmup_steps=0, weight_decay=0.1)
    return config


def jax_step(args, batches, **model_changes) -> Timed:
    """llama-jax's `Trainer.step`, compiled and warmed up; `first` is compile + the first step."""
    import jax

    from llama_jax.train import build_trainer, global_batch

    trainer = build_trainer(jax_config(args, **model_changes))
    box = [trainer.init_state(0)]
    placed = [global_batch(trainer.mesh, b) for b in batches]

    def step(batch=placed[1]):
        box[0], metrics = trainer.step(box[0], batch)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    step(placed[0])
    first = time.perf_counter() - start
    step()
    return Timed(step, first)


def torch_step(args, batches, attn: str) -> Timed:
    """transformers + AdamW forward, backward and update, warmed up."""
    import torch
    import transformers

    from llama_jax.config import LLaMAConfig, to_hf_config

    shape = LLaMAConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                        n_kv_heads=args.heads, ffn_dim=args.ffn, max_seq_len=args.seq_len)
    config = transformers.LlamaConfig(**to_hf_config(shape))
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    inputs = torch.from_numpy(batches[1]["tokens"]).long()
    labels = torch.from_numpy(batches[1]["targets"]).long()

    def step():
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    return Timed(step)


def time_train_process(args, **env) -> float:
    """tokens/s that `llama-jax train` logs (median over its log windows after the first); `env`:
    changes to its environment."""
    with tempfile.TemporaryDirectory() as workdir:
        overrides = [f"--config.model.{k}={v}" for k, v in dict(
            vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
            ffn_dim=args.ffn, max_seq_len=args.seq_len).items()]
        steps = 2 + 2 * args.repeats
        overrides += [f"--config.train.batch_size={args.batch}", f"--config.train.seq_len={args.seq_len}",
                      f"--config.train.steps={steps}", "--config.train.log_every=2", "--config.optimizer.warmup_steps=0",
                      f"--config.checkpoint.every={steps}", "--config.data.source=synthetic"]
        subprocess.run([sys.executable, "-m", "llama_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
                        "--workdir", workdir, *overrides], check=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ, LLAMA_JAX_SINGLE_PROCESS="1", **env))
        logged = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_second"] for r in logged if "tokens_per_second" in r][1:]
        return statistics.median(rates)


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    for name, default in dict(dim=512, layers=8, heads=8, ffn=1408, vocab=8000, batch=8, seq_len=256,
                              repeats=5).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=default)
    parser.add_argument("--variants", action="store_true", help="also time other attention and 4 KiB pages")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    check_heads(parser, args.dim, args.heads)

    import jax
    import torch

    from llama_jax.experiment import model_config
    from llama_jax.metrics import flops_per_token

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len + 1)).astype(np.int32)
        batches.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                        "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch, 1)),
                        "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
                        "loss_mask": np.ones((args.batch, args.seq_len), np.float32)})
    tokens = args.batch * args.seq_len
    per_token = flops_per_token(model_config(jax_config(args).model), args.seq_len)

    steps = {"llama-jax Trainer.step, scanned layers (default)": jax_step(args, batches),
             "llama-jax Trainer.step, unrolled layers (`model.scan_layers=False`)":
                 jax_step(args, batches, scan_layers=False)}
    if args.variants:
        steps["llama-jax Trainer.step, scanned, `attention_impl=dot_product`"] = jax_step(
            args, batches, attention_impl="dot_product")
    for attn in ("eager", "sdpa"):
        steps[f"transformers + AdamW ({attn})"] = torch_step(args, batches, attn)
    matmuls = {name: Timed(fn) for name, fn in matmul_steps().items()}
    for _ in range(args.repeats):
        for m in matmuls.values():
            m.measure(MATMUL_REPEATS)
        for t in steps.values():
            t.measure(STEPS_PER_ROUND)

    flop_rates = {name: [2 * MATMUL_N**3 / s for s in m.seconds] for name, m in matmuls.items()}
    rates = {name: [tokens / s for s in t.seconds] for name, t in steps.items()}
    best_torch_by_round = [max(r) for r in zip(*(v for k, v in rates.items() if k.startswith("transformers")))]
    xla_rate, torch_rate = (statistics.median(flop_rates[name]) for name in ("xla", "torch"))
    print(f"jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"matmul 2048^2 float32, median of {args.repeats} rounds: XLA {xla_rate / 1e9:.0f} GFLOP/s, "
          f"PyTorch {torch_rate / 1e9:.0f} GFLOP/s; {per_token / 1e6:.0f} MFLOP per token; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")

    rows = {}
    for name, per_round in rates.items():
        rows[name] = {"tokens_per_s": statistics.median(per_round),
                      "vs_best_torch": statistics.median(r / b for r, b in zip(per_round, best_torch_by_round)),
                      "mfu": statistics.median(r * per_token / x for r, x in zip(per_round, flop_rates["xla"])),
                      "first_step_s": steps[name].first, "per_round_tokens_per_s": per_round}
    best_torch = statistics.median(best_torch_by_round)
    processes = {"llama-jax train (whole process)": {}}
    if args.variants:  # glibc's hugetlb tunable set to 0: the command keeps 4 KiB pages (no restart)
        processes["llama-jax train (whole process), 4 KiB pages"] = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    for name, env in processes.items():  # after the rounds: against their medians
        rate = time_train_process(args, **env)
        rows[name] = {"tokens_per_s": rate, "vs_best_torch": rate / best_torch, "mfu": rate * per_token / xla_rate,
                      "first_step_s": None}

    print("\n| work | tokens/s | x best PyTorch | MFU vs XLA matmul | compile + first step, s |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        first = f"{row['first_step_s']:.1f}" if row["first_step_s"] is not None else ""
        print(f"| {name} | {row['tokens_per_s']:,.0f} | {row['vs_best_torch']:.2f} | {row['mfu']:.0%} | {first} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"xla_matmul_flops": flop_rates["xla"],
                                               "torch_matmul_flops": flop_rates["torch"], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    # as `llama-jax` does: restart with glibc's huge-page tunable where it applies, so that the step
    # measured here runs as in the command (PyTorch runs in the same process, under the same setting)
    from llama_jax.backend_tuning import restart_with_huge_pages

    restart_with_huge_pages()
    sys.exit(main())
