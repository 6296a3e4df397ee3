"""Orbax checkpointing cost: async-save overhead on the run loop, and save/restore throughput.

Model: dim 512, 8 layers, 8 heads, FFN 1408, vocab 8000, float32 (34M parameters; with AdamW's
two moments the train state is ~400 MB), synthetic data.

1. Overhead on the mean step time. The project's real run loop (`llama-jax train` on synthetic
   data, a fresh process each) logs every 10 steps; the mean step time of each log window comes
   from the `tokens_per_second` it logs (the first window, which follows compilation, is left
   out). Runs:
     none    `--baseline-steps` (30) steps, checkpoint.every > steps: nothing is saved inside any
             window (the run's forced save of the final step comes after its last record);
     async   `--steps` (60) steps, checkpoint.every=20, checkpoint.async_save=True (the default);
     sync    the same with checkpoint.async_save=False, for comparison.
   With saves every 20 steps and windows of 10, windows that start with a save (steps 21-30,
   41-50) alternate with windows that hold none (11-20, 31-40, 51-60); the save of step 60
   comes after the last record. A window with a save holds exactly what a run saving every 10
   steps pays per 10 steps, so the overhead of saving every 10 steps is
   (mean step time of the windows with a save) / (mean step time of the windows without) - 1,
   both from the same process, interleaved in time: on a shared machine, load from other
   processes moved a whole run's mean step time by 20-50% between runs, far more than the
   effect measured. (This relies on an async save finishing within 10 steps, which the windows
   without a save show: they would be slower otherwise.) The run that never saves is the
   reference for those clean windows. Target: at most 5% for async saves.
2. Save and restore throughput. In this process: `RunCheckpoints` (what the run loop uses)
   saving the state synchronously (`save` + `wait`) and `restore_state` onto the trainer's
   shardings, against `shutil.copytree` of the written step directory and against reading its
   files (plain `readinto`); the state is the one after one train step (AdamW moments not all
   zero). Also timed: an async save's blocking part (until `save` returns) and its whole
   time until committed. MB/s of state bytes (save, restore) or of file bytes (copy, read)
   and the ratios. Files are read from the page cache (it is not dropped: the machine is shared).
   Then synchronous saves keeping one checkpoint, back to back and after `--pause` (20) seconds
   idle, with the kernel CPU time of each: on a VM that returns freed memory to its hypervisor,
   a save after a pause (as in a run saving every few seconds or more) writes into memory the
   VM must fault in again.

Medians of `--repeats` after one warm-up each; compile times are not part of any figure.

    python benchmarks/checkpointing.py [--steps 60] [--save-every 20] [--batch 8] [--seq-len 64] [--pause 20]
                                       [--json FILE]

The default batch is 8 x 64 tokens rather than 8 x 256: at 8 x 256 a step took 6-7 s on the
2 shared cores this was written on, too slow for these runs; the state (what a save writes) is
the same, and a shorter step makes the save overhead relatively larger, not smaller.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_jax.cli import OneLineParser, positive_int
from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 10


def model_overrides(args) -> dict:
    return dict(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                n_kv_heads=args.heads, ffn_dim=args.ffn, max_seq_len=args.seq_len)


def run_loop(args, steps: int, every: int, async_save: bool) -> dict:
    """One `llama-jax train` process; seconds per step of each log window after the first, and
    whether a save started at the step that opened the window."""
    with tempfile.TemporaryDirectory(prefix="llama_jax_ckpt_bench_") as workdir:
        overrides = [f"--config.model.{k}={v}" for k, v in model_overrides(args).items()]
        overrides += [f"--config.train.batch_size={args.batch}", f"--config.train.seq_len={args.seq_len}",
                      f"--config.train.steps={steps}", f"--config.train.log_every={LOG_EVERY}",
                      "--config.optimizer.warmup_steps=0", "--config.data.source=synthetic",
                      f"--config.checkpoint.every={every}", f"--config.checkpoint.async_save={async_save}",
                      "--config.checkpoint.max_to_keep=2"]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llama_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
                        "--workdir", workdir, *overrides], check=True, capture_output=True, cwd=ROOT,
                       env=dict(os.environ, LLAMA_JAX_SINGLE_PROCESS="1"))
        wall = time.perf_counter() - start
        logged = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
        kept = sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
    windows = [r for r in logged if "tokens_per_second" in r][1:]  # the first holds warm-up steps
    tokens = args.batch * args.seq_len
    per_step = [tokens / r["tokens_per_second"] for r in windows]
    # the window ending at step e runs steps e-9..e; a save at step e-10 starts inside it
    with_save = [r["step"] - LOG_EVERY > 0 and (r["step"] - LOG_EVERY) % every == 0 for r in windows]
    save_windows = [t for t, w in zip(per_step, with_save) if w]
    clean_windows = [t for t, w in zip(per_step, with_save) if not w]
    return {"steps": steps, "every": every, "async_save": async_save, "window_ends": [r["step"] for r in windows],
            "step_seconds_per_window": per_step, "window_has_save": with_save,
            "mean_step_seconds": statistics.mean(per_step),
            "save_window_mean_step_seconds": statistics.mean(save_windows) if save_windows else None,
            "clean_window_mean_step_seconds": statistics.mean(clean_windows) if clean_windows else None,
            "process_wall_seconds": wall, "kept_checkpoints": kept}


def overhead_runs(args) -> dict:
    runs = {"none": run_loop(args, args.baseline_steps, args.baseline_steps + 1000, True)}
    for name, async_save in (("async", True), ("sync", False)):
        runs[name] = run_loop(args, args.steps, args.save_every, async_save)
    summary = {"none_mean_step_seconds": runs["none"]["mean_step_seconds"]}
    for name, r in runs.items():
        flags = "".join("S" if w else "-" for w in r["window_has_save"])
        print(f"  {name:5s} every={r['every']:<5d} windows ({flags}): "
              f"{', '.join(f'{s:.3f}' for s in r['step_seconds_per_window'])} s/step", flush=True)
        if name != "none":
            save, clean = r["save_window_mean_step_seconds"], r["clean_window_mean_step_seconds"]
            summary[name] = {"save_window_mean_step_seconds": save, "clean_window_mean_step_seconds": clean,
                             "overhead_paired": save / clean - 1,
                             "overhead_vs_none_run": save / runs["none"]["mean_step_seconds"] - 1}
    summary["load_average_end"] = os.getloadavg()[0]
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

        # an async save: the part `save` blocks for (copying the state off the device) and the rest
        async_checkpoints = RunCheckpoints(tmp / "async", every=1, max_to_keep=None, async_save=True)
        blocking, total = [], []
        for i in range(args.repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            async_checkpoints.save(i + 1, state, info, force=True)
            returned = time.perf_counter()
            async_checkpoints.wait()
            if i:
                blocking.append(returned - start)
                total.append(time.perf_counter() - start)
        async_checkpoints.close()

        paused = saves_after_pauses(tmp / "paused", state, info, args.pause)

        copy_dst = tmp / "copy"
        copy_s = median_seconds(lambda: shutil.copytree(step_dir, copy_dst), args.repeats,
                                between=lambda: shutil.rmtree(copy_dst))
        read_s = median_seconds(lambda: read_files(step_dir), args.repeats)
    mb = 1e6
    return {"state_bytes": state_bytes, "checkpoint_file_bytes": file_bytes, "checkpoint_files": n_files,
            "save_seconds": save_s, "restore_seconds": restore_s, "copytree_seconds": copy_s,
            "read_files_seconds": read_s, "async_save_blocking_seconds": statistics.median(blocking),
            "async_save_until_committed_seconds": statistics.median(total),
            "save_MB_per_s": state_bytes / save_s / mb, "restore_MB_per_s": state_bytes / restore_s / mb,
            "copytree_MB_per_s": file_bytes / copy_s / mb, "read_files_MB_per_s": file_bytes / read_s / mb,
            "save_over_copytree": save_s / copy_s, "restore_over_read_files": restore_s / read_s,
            "restore_over_copytree": restore_s / copy_s, "saves_after_pauses": paused}


def saves_after_pauses(directory: Path, state, info: dict, pause: int) -> list[dict]:
    """Synchronous saves keeping one checkpoint (each frees the previous one's files), back to back
    and after `pause` seconds idle: wall and kernel (system) CPU seconds of each. Where the host
    hands freed memory back to its hypervisor (a VM's free page reporting), the page cache of a
    save that follows a pause is built in memory the VM must fault in again."""
    from llama_jax.checkpoint import RunCheckpoints

    checkpoints = RunCheckpoints(directory, every=1, max_to_keep=1, async_save=False)
    rows = []
    for step, idle in enumerate((0, 0, 0, pause, 0, 0, pause, 0), start=1):
        time.sleep(idle)
        system, start = os.times().system, time.perf_counter()
        checkpoints.save(step, state, info, force=True)
        checkpoints.wait()
        rows.append({"pause_seconds": idle, "save_seconds": time.perf_counter() - start,
                     "system_cpu_seconds": os.times().system - system})
    checkpoints.close()
    return rows[2:]  # after two warm-ups


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    for name, default in dict(dim=512, layers=8, heads=8, ffn=1408, vocab=8000, batch=8, seq_len=64,
                              steps=60, save_every=20, baseline_steps=30, repeats=3, pause=20).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=default)
    parser.add_argument("--skip-overhead", action="store_true", help="only the save/restore throughput")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.save_every % LOG_EVERY or args.save_every < 2 * LOG_EVERY or args.steps < LOG_EVERY + 2 * args.save_every:
        parser.error(f"--save-every must be a multiple of {LOG_EVERY}, at least {2 * LOG_EVERY}, and --steps at least "
                     f"{LOG_EVERY} + 2 x --save-every (so that windows with and without a save alternate)")
    if args.baseline_steps < 3 * LOG_EVERY:
        parser.error(f"--baseline-steps must be at least {3 * LOG_EVERY} (the first log window is warm-up)")

    import jax
    import orbax.checkpoint as ocp

    print(f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, {os.cpu_count()} CPUs, "
          f"{jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict = {"args": vars(args), "jax": jax.__version__, "orbax": ocp.__version__}
    print("save/restore throughput ...", flush=True)
    results["throughput"] = io = throughput(args)
    if not args.skip_overhead:
        print(f"run loop, batch {args.batch} x {args.seq_len}, log every {LOG_EVERY} steps (S: a save starts in the "
              f"window, -: none):", flush=True)
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
    print(f"\nasync save (RunCheckpoints, async_save=True, nothing else running in this process): `save` returns "
          f"after {io['async_save_blocking_seconds']:.2f} s, committed after {io['async_save_until_committed_seconds']:.2f} s")
    print("\nsync saves keeping one checkpoint, each after the pause given: " + ", ".join(
        f"{r['pause_seconds']} s idle -> {r['save_seconds']:.2f} s ({r['system_cpu_seconds']:.2f} s system CPU)"
        for r in io["saves_after_pauses"]))
    if "overhead" in results:
        summary = results["overhead"]["summary"]
        print(f"\n| checkpointing in the run loop | s/step, windows with a save | s/step, windows without | "
              f"overhead of a save every {LOG_EVERY} steps | target <= 5% | s/step of the run that never saves |")
        print("|---|---|---|---|---|---|")
        for name, label in (("async", f"async save every {args.save_every} steps"),
                            ("sync", f"sync save every {args.save_every} steps")):
            row = summary[name]
            met = ("met" if row["overhead_paired"] <= 0.05 else "not met") if name == "async" else "(reference)"
            print(f"| {label} | {row['save_window_mean_step_seconds']:.3f} | {row['clean_window_mean_step_seconds']:.3f} | "
                  f"{row['overhead_paired']:+.1%} | {met} | {summary['none_mean_step_seconds']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
