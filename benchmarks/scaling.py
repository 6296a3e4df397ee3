"""Scaling shape on CPU: per-device memory under FSDP over 1-8 virtual devices, and step time as
the model doubles against its FLOPs.

1. Memory. For N in `--devices` (default 1 2 4 8; the list must hold 1, the reference of the
   ratios, and each N must divide the global batch and the model's dim), a fresh process with
   `XLA_FLAGS=--xla_force_host_platform_device_count=N` (it must be set before JAX starts) runs
   `llama_jax.plan.plan` (what `llama-jax plan --devices N` runs): the train step compiled ahead
   of time for an FSDP mesh (data=1, fsdp=N, tensor=1), nothing allocated. Reported per device:
   parameters + optimizer state (from the shardings), compiled temporaries and the estimated
   peak (arguments + outputs - donated + temporaries), each against N=1; the ideal for
   parameters + optimizer state is 1/N. Model: dim 512, 8 layers, 8 heads, FFN 1408, vocab 8000,
   float32 (34M parameters), global batch 8 x 256.
2. Step time. On one CPU device, the jitted train step (`Trainer.step`) at a fixed batch
   (default 8 x 64 tokens) as the model doubles, in two series from the same base model:
   layers 4 -> 8 -> 16 (dim 512) and dim 256 -> 512 -> 1024 (8 layers; heads keep a head dim of
   64, FFN = 2.75 x dim). One process builds every model, compiles it and runs one warm-up
   step, then times `--repeats` rounds of each model in turn (round-robin, so that load from
   other processes falls on all models alike; in each round an untimed step of the model, then a
   timed one: the first step after another model's re-faults memory); the median per model.
   Reported: the measured time ratio to the series' first point against the model-FLOPs ratio
   (`llama_jax.metrics.flops_per_token`) and the parameter ratio.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--series layers dim] [--repeats 5] [--json FILE]

Virtual CPU devices share the machine's cores, so only the memory figures of part 1 mean
anything; step time across devices is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama_jax.cli import OneLineParser, positive_int
from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(dim=512, n_layers=8, n_heads=8, ffn_dim=1408, vocab_size=8000)


def model_fields(dim: int, layers: int, vocab: int) -> dict:
    heads = max(1, dim // 64)
    return dict(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                ffn_dim=int(2.75 * dim), max_seq_len=256)


def make_config(point: dict):
    from llama_jax.experiment import base_config

    config = base_config("debug", **point["model"])
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.update(batch_size=point["batch"], seq_len=point["seq_len"], steps=1000)
    config.optimizer.update(warmup_steps=0)
    return config


# ---- worker: one point in this (fresh) process -------------------------------------------------

def worker(point: dict) -> dict:
    if point["kind"] == "memory":
        from llama_jax.plan import plan

        start = time.perf_counter()
        result = plan(make_config(point))
        result["compile_seconds"] = time.perf_counter() - start
        return result

    import jax

    from llama_jax.data import synthetic_batch
    from llama_jax.experiment import model_config
    from llama_jax.metrics import flops_per_token
    from llama_jax.model import param_count
    from llama_jax.train import build_trainer, global_batch

    # every model built, compiled and warmed up first; then the steps are timed round-robin
    # (`round_robin`), so that load from other processes falls on all of them alike
    models = []
    for fields in point["models"]:
        config = make_config({**point, "model": fields})
        trainer = build_trainer(config)
        batch = global_batch(trainer.mesh, synthetic_batch(0, 0, range(point["batch"]), point["seq_len"],
                                                          fields["vocab_size"]))
        box = [trainer.init_state(0)]

        def step(trainer=trainer, batch=batch, box=box):
            box[0], metrics = trainer.step(box[0], batch)
            jax.block_until_ready(metrics)

        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        step()  # warm-up
        cfg = model_config(config.model)
        models.append({"step": step, "times": [], "compile_and_first_step_seconds": first,
                       "flops_per_step": flops_per_token(cfg, point["seq_len"]) * point["batch"] * point["seq_len"],
                       "param_count": param_count(cfg)})
    for m, times in zip(models, round_robin([m["step"] for m in models], point["repeats"])):
        m["times"] = times
    return [{"step_seconds": statistics.median(m["times"]), "step_times": m["times"],
             **{k: m[k] for k in ("compile_and_first_step_seconds", "flops_per_step", "param_count")}}
            for m in models]


def round_robin(steps: list, repeats: int) -> list[list[float]]:
    """Seconds of each of `steps` in each of `repeats` rounds, every step in turn, each timed call
    after an untimed one of the same step: the first step after another model's re-faults the
    memory that one left (train_step.py measured a step timed so at 0.65 x its speed alone)."""
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, seconds in zip(steps, times):
            seconds.append(median_seconds(step, 1, warmup=1))
    return times


def run_point(point: dict) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if point.get("devices", 1) > 1:
        flags.append(f"--xla_force_host_platform_device_count={point['devices']}")
    env["XLA_FLAGS"] = " ".join(flags)
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(point)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    if done.returncode:
        raise RuntimeError(f"point {point} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- driver ------------------------------------------------------------------------------------

def check_devices(parser, devices: list[int], batch: int) -> None:
    """One line, before any work, for device counts the memory part cannot plan or compare: the
    ratios are to N=1, and FSDP splits the global batch and the model's dim over the N devices."""
    if 1 not in devices:
        parser.error(f"--devices {' '.join(map(str, devices))} lacks 1; the memory ratios are to one device, "
                     f"e.g. --devices 1 {' '.join(map(str, devices))}")
    for n in devices:
        for what, size in ((f"--memory-batch {batch}", batch), (f"the model's dim {BASE['dim']}", BASE["dim"])):
            if size % n:
                parser.error(f"--devices {n} does not divide {what}; FSDP splits it over the devices")


def check_dims(parser, dims: list[int]) -> None:
    """One line, before any work, for a dim the dim series cannot build a model of: it gives a
    model of dim D max(1, D // 64) heads, which must divide D into an even head dim."""
    for dim in dims:
        heads = model_fields(dim, 1, 1)["n_heads"]
        if dim % heads or dim // heads % 2:
            parser.error(f"--dims {dim}: the dim series gives it {heads} heads (dim // 64), which do not divide it "
                         f"into an even head dim; give multiples of 64 (or even dims below 128)")


def memory_table(memory: list[dict]) -> list[str]:
    """Markdown rows of the memory plans, each against the plan for one device (wherever it is in
    the list)."""
    mib = 2**20
    one = next(p for p in memory if p["devices"] == 1)
    one_state = one["params"] + one["opt_state"]
    one_peak = one["arguments"] + one["outputs"] - one["aliased"] + one["temporaries"]
    lines = []
    for p in memory:
        state = p["params"] + p["opt_state"]
        peak = p["arguments"] + p["outputs"] - p["aliased"] + p["temporaries"]
        lines.append(f"| {p['devices']} | {state / mib:.1f} | {state / one_state:.3f} | {1 / p['devices']:.3f} | "
                     f"{p['temporaries'] / mib:.1f} | {p['temporaries'] / one['temporaries']:.2f} | {peak / mib:.1f} | "
                     f"{peak / one_peak:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--memory-batch", type=positive_int, default=8, help="global batch of the memory plans")
    parser.add_argument("--memory-seq-len", type=positive_int, default=256)
    parser.add_argument("--series", nargs="*", choices=["layers", "dim"], default=["layers", "dim"])
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[4, 8, 16], help="the layers series")
    parser.add_argument("--dims", type=positive_int, nargs="+", default=[256, 512, 1024], help="the dim series")
    parser.add_argument("--batch", type=positive_int, default=8, help="batch of the step-time points")
    parser.add_argument("--seq-len", type=positive_int, default=64)
    parser.add_argument("--vocab", type=positive_int, default=8000)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    check_devices(parser, args.devices, args.memory_batch)
    if "dim" in args.series:
        check_dims(parser, args.dims)

    import jax

    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict = {"args": vars(args), "jax": jax.__version__, "memory": [], "step_time": {}}

    base = {**BASE, "n_kv_heads": BASE["n_heads"], "max_seq_len": args.memory_seq_len}
    for n in args.devices:
        point = {"kind": "memory", "devices": n, "model": base, "batch": args.memory_batch,
                 "seq_len": args.memory_seq_len}
        p = run_point(point)
        results["memory"].append(p)
        print(f"  plan on {n} device(s): params+opt {(p['params'] + p['opt_state']) / 2**20:.1f} MiB, "
              f"temporaries {p['temporaries'] / 2**20:.1f} MiB (compiled in {p['compile_seconds']:.0f} s)", flush=True)

    series = {"layers": [(512, n) for n in args.layers], "dim": [(d, 8) for d in args.dims]}
    shapes = list(dict.fromkeys(shape for name in args.series for shape in series[name]))
    if shapes:
        point = {"kind": "step", "models": [model_fields(dim, layers, args.vocab) for dim, layers in shapes],
                 "batch": args.batch, "seq_len": args.seq_len, "repeats": args.repeats}
        measured = dict(zip(shapes, run_point(point)))
        for (dim, layers), r in measured.items():
            print(f"  dim {dim}, {layers} layers: {r['step_seconds']:.3f} s/step ({r['param_count'] / 1e6:.1f}M params; "
                  f"compile + first step {r['compile_and_first_step_seconds']:.1f} s)", flush=True)
    for name in args.series:
        rows = [{"dim": dim, "layers": layers, **measured[dim, layers]} for dim, layers in series[name]]
        first = rows[0]
        for r in rows:
            r["time_ratio"] = r["step_seconds"] / first["step_seconds"]
            r["flops_ratio"] = r["flops_per_step"] / first["flops_per_step"]
            r["param_ratio"] = r["param_count"] / first["param_count"]
            r["time_over_flops_ratio"] = r["time_ratio"] / r["flops_ratio"]
        results["step_time"][name] = rows

    print(f"\nFSDP, {results['memory'][0]['param_count'] / 1e6:.1f}M parameters, global batch "
          f"{args.memory_batch} x {args.memory_seq_len}, per device:")
    print("\n| devices | params + opt MiB | x N=1 | ideal 1/N | temporaries MiB | x N=1 | est. peak MiB | x N=1 |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(memory_table(results["memory"])))
    for name, rows in results["step_time"].items():
        print(f"\nstep time, {name} doubling, batch {args.batch} x {args.seq_len}, 1 CPU device:")
        print("\n| dim | layers | params M | s/step | time ratio | FLOPs ratio | params ratio | time / FLOPs ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['dim']} | {r['layers']} | {r['param_count'] / 1e6:.1f} | {r['step_seconds']:.3f} | "
                  f"{r['time_ratio']:.2f} | {r['flops_ratio']:.2f} | {r['param_ratio']:.2f} | "
                  f"{r['time_over_flops_ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
