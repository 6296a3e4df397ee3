"""Orbax checkpointing cost: async-save overhead on the run loop, and save/restore throughput.

Model: dim 512, 8 layers, 8 heads, FFN 1408, vocab 8000, float32 (34M parameters; with AdamW's
two moments the train state is ~400 MB), synthetic data.

1. Overhead on the mean step time. The project's real run loop (`llama-jax train`, a fresh
   process each) runs `--steps` steps (default 40) logging every 10, in this order:
     none    checkpoint.every > steps: nothing saved inside the measured window (the run's forced
             save of the final step comes after the last log record, outside it);
     async   checkpoint.every=10, checkpoint.async_save=True (the default);
     sync    checkpoint.every=10, checkpoint.async_save=False;
     none    again, so the baseline is bracketed and its run-to-run spread is visible.
   The mean step time is taken from the logged `tokens_per_second` windows after the first
   (steps 11..40: compilation and warm-up are out; each window holds exactly one save started at
   the step that opened it, while the save of the last step happens after the last record).
   Overhead = mean step time with saves / mean of the two baseline runs - 1; target: at most 5%
   for async saves every 10 steps.
2. Save and restore throughput. In this process: `RunCheckpoints` (what the run loop uses)
   saving the state synchronously (`save` + `wait`) and `restore_state` onto the trainer's
   shardings, against `shutil.copytree` of the written step directory and against reading its
   files (plain `readinto`); the state is the one after one train step (AdamW moments not all
   zero). MB/s of state bytes (save, restore) or of file bytes (copy, read)
   and the ratios. Files are read from the page cache (it is not dropped: the machine is shared).

Medians of `--repeats` after one warm-up each; compile times are not part of any figure.

    python benchmarks/checkpointing.py [--steps 40] [--batch 8] [--seq-len 64] [--repeats 3] [--json FILE]

The default batch is 8 x 64 tokens rather than 8 x 256: at 8 x 256 a step took 6-7 s on the
2 shared cores this was written on, too slow for four runs; the state (what a save writes) is
the same, and a shorter step makes the save overhead relatively larger, not smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 10


def median_seconds(fn, repeats: int, warmup: int = 1, between=None) -> float:
    for _ in range(warmup):
        fn()
        if between:
            between()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if between:
            between()
    return statistics.median(times)


def model_overrides(args) -> dict:
    return dict(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                n_kv_heads=args.heads, ffn_dim=args.ffn, max_seq_len=args.seq_len)


def run_loop(args, every: int, async_save: bool) -> dict:
    """One `llama-jax train` process; mean step time over the log windows after the first."""
    with tempfile.TemporaryDirectory(prefix="llama_jax_ckpt_bench_") as workdir:
        overrides = [f"--config.model.{k}={v}" for k, v in model_overrides(args).items()]
        overrides += [f"--config.train.batch_size={args.batch}", f"--config.train.seq_len={args.seq_len}",
                      f"--config.train.steps={args.steps}", f"--config.train.log_every={LOG_EVERY}",
                      "--config.optimizer.warmup_steps=0", "--config.data.source=synthetic",
                      f"--config.checkpoint.every={every}", f"--config.checkpoint.async_save={async_save}",
                      "--config.checkpoint.max_to_keep=2"]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llama_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
                        "--workdir", workdir, *overrides], check=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ, LLAMA_JAX_SINGLE_PROCESS="1"))
        wall = time.perf_counter() - start
        logged = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
        steps_saved = sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
    windows = [r for r in logged if "tokens_per_second" in r][1:]
    tokens = args.batch * args.seq_len
    # seconds per step of each window: window tokens / tokens per second / steps in the window
    per_step = [tokens / r["tokens_per_second"] for r in windows]
    return {"every": every, "async_save": async_save, "windows": [r["step"] for r in windows],
            "step_seconds_per_window": per_step, "mean_step_seconds": statistics.mean(per_step),
            "process_wall_seconds": wall, "kept_checkpoints": steps_saved}


def overhead_runs(args) -> dict:
    never = args.steps + 1000
    order = [("none", never, True), ("async", LOG_EVERY, True), ("sync", LOG_EVERY, False), ("none", never, True)]
    runs: dict[str, list[dict]] = {}
    for name, every, async_save in order:
        result = run_loop(args, every, async_save)
        runs.setdefault(name, []).append(result)
        print(f"  {name:5s} every={every:<5d} mean step {result['mean_step_seconds']:.3f} s "
              f"(windows {', '.join(f'{s:.3f}' for s in result['step_seconds_per_window'])}); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    baseline = statistics.mean(r["mean_step_seconds"] for r in runs["none"])
    summary = {"baseline_mean_step_seconds": baseline,
               "baseline_runs": [r["mean_step_seconds"] for r in runs["none"]]}
    for name in ("async", "sync"):
        seconds = runs[name][0]["mean_step_seconds"]
        summary[name] = {"mean_step_seconds": seconds, "overhead": seconds / baseline - 1}
    return {"runs": runs, "summary": summary}


def dir_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def read_files(path: Path) -> int:
    """Read every file under `path` into one reused buffer; bytes read."""
    files = [p for p in path.rglob("*") if p.is_file()]
    buffer = bytearray(max((p.stat().st_size for p in files), default=0))
    view, total = memoryview(buffer), 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            n = f.readinto(view)
            while n:
                total += n
                n = f.readinto(view)
    return total


def throughput(args) -> dict:
    import jax

    from llama_jax.checkpoint import RunCheckpoints
    from llama_jax.data import synthetic_batch
    from llama_jax.experiment import base_config
    from llama_jax.run import abstract_state
    from llama_jax.train import build_trainer, global_batch

    config = base_config("debug", **model_overrides(args))
    config.train.update(batch_size=args.batch, seq_len=args.seq_len, steps=1000)
    trainer = build_trainer(config)
    state = trainer.init_state(0)
    # one train step, so that AdamW's moments are not all zeros (zeros would compress to nothing)
    batch = synthetic_batch(0, 0, range(args.batch), args.seq_len, args.vocab)
    state, _ = trainer.step(state, global_batch(trainer.mesh, batch))
    jax.block_until_ready(state)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    info = {"config": json.loads(config.to_json_best_effort()), "model": trainer.model_config.to_dict(), "step": 0}
    target = abstract_state(trainer)

    with tempfile.TemporaryDirectory(prefix="llama_jax_ckpt_io_") as tmp:
        tmp = Path(tmp)
        checkpoints = RunCheckpoints(tmp / "checkpoints", every=1, max_to_keep=None, async_save=False)
        step = [0]

        def save():
            step[0] += 1
            checkpoints.save(step[0], state, info, force=True)
            checkpoints.wait()

        def drop_saved():  # keep one step on disk: the directory the copy and read figures use
            for s in checkpoints.all_steps():
                if s != 1:
                    shutil.rmtree(checkpoints.step_dir(s))
            checkpoints.reload()

        save_s = median_seconds(save, args.repeats, between=drop_saved)
        step_dir = checkpoints.step_dir(1)
        file_bytes, n_files = dir_bytes(step_dir)

        def restore():
            jax.block_until_ready(checkpoints.restore_state(1, target))

        restore_s = median_seconds(restore, args.repeats)
        checkpoints.close()

        copy_dst = tmp / "copy"
        copy_s = median_seconds(lambda: shutil.copytree(step_dir, copy_dst), args.repeats,
                                between=lambda: shutil.rmtree(copy_dst))
        read_s = median_seconds(lambda: read_files(step_dir), args.repeats)
    mb = 1e6
    return {"state_bytes": state_bytes, "checkpoint_file_bytes": file_bytes, "checkpoint_files": n_files,
            "save_seconds": save_s, "restore_seconds": restore_s, "copytree_seconds": copy_s,
            "read_files_seconds": read_s,
            "save_MB_per_s": state_bytes / save_s / mb, "restore_MB_per_s": state_bytes / restore_s / mb,
            "copytree_MB_per_s": file_bytes / copy_s / mb, "read_files_MB_per_s": file_bytes / read_s / mb,
            "save_over_copytree": save_s / copy_s, "restore_over_read_files": restore_s / read_s,
            "restore_over_copytree": restore_s / copy_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in dict(dim=512, layers=8, heads=8, ffn=1408, vocab=8000, batch=8, seq_len=64,
                              steps=40, repeats=3).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--skip-overhead", action="store_true", help="only the save/restore throughput")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.steps < 3 * LOG_EVERY:
        parser.error(f"--steps must be at least {3 * LOG_EVERY} (the first log window is warm-up)")

    import jax
    import orbax.checkpoint as ocp

    print(f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, {os.cpu_count()} CPUs, "
          f"{jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict = {"args": vars(args), "jax": jax.__version__, "orbax": ocp.__version__}
    print("save/restore throughput ...", flush=True)
    results["throughput"] = io = throughput(args)
    if not args.skip_overhead:
        print(f"run loop, {args.steps} steps of {args.batch} x {args.seq_len} tokens, log every {LOG_EVERY}:",
              flush=True)
        results["overhead"] = overhead_runs(args)

    print(f"\nstate {io['state_bytes'] / 1e6:.0f} MB in memory; checkpoint {io['checkpoint_file_bytes'] / 1e6:.0f} MB "
          f"in {io['checkpoint_files']} files")
    print("\n| operation | seconds | MB/s | x copytree | x read files |")
    print("|---|---|---|---|---|")
    for label, key, mbs in (("save (sync, RunCheckpoints)", "save_seconds", "save_MB_per_s"),
                            ("restore (RunCheckpoints.restore_state)", "restore_seconds", "restore_MB_per_s"),
                            ("shutil.copytree of the step directory", "copytree_seconds", "copytree_MB_per_s"),
                            ("read the step directory's files", "read_files_seconds", "read_files_MB_per_s")):
        s = io[key]
        print(f"| {label} | {s:.2f} | {io[mbs]:,.0f} | {s / io['copytree_seconds']:.2f} | "
              f"{s / io['read_files_seconds']:.2f} |")
    if "overhead" in results:
        summary = results["overhead"]["summary"]
        base = summary["baseline_mean_step_seconds"]
        runs = ", ".join(f"{s:.3f}" for s in summary["baseline_runs"])
        print(f"\n| checkpointing in the run loop | mean step s | overhead | target <= 5% |")
        print("|---|---|---|---|")
        print(f"| none (baseline: mean of runs {runs}) | {base:.3f} | | |")
        for name, label in (("async", "async save every 10 steps"), ("sync", "sync save every 10 steps")):
            row = summary[name]
            met = ("met" if row["overhead"] <= 0.05 else "not met") if name == "async" else "(reference)"
            print(f"| {label} | {row['mean_step_seconds']:.3f} | {row['overhead']:+.1%} | {met} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
