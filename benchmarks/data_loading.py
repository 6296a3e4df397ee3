"""Data loading against the train step: does the step ever wait on data?

For each config, `configs/tiny.py` on the embedded corpus and the demo's on its own (the
standard library's source), prepared once with a tokenizer trained on it: the time to build one global batch from the prepared directory
(`TrainRows.batch`, what the run loop's prefetch thread calls), the time of one train step on
this machine (compile excluded), and the time the run loop's `Prefetcher` makes a 30-step
training loop wait for data. Medians of the repeats; the ratio step / batch says how many times
over the loader keeps up.

    python benchmarks/data_loading.py [--steps 30]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from llama_jax.cli import OneLineParser, int_at_least

ROOT = Path(__file__).resolve().parents[1]


def configs():
    from llama_jax.demo import get_config as demo_config
    from llama_jax.experiment import load_config

    tiny = load_config(str(ROOT / "configs" / "tiny.py"), [])
    tiny.data.update(source="embedded", tokenizer="train", tokenizer_vocab_size=2048)
    tiny.model.vocab_size = 2048
    return {"tiny": tiny, "demo": demo_config()}


def measure(name: str, config, steps: int) -> dict:
    import jax

    from llama_jax.data import Prefetcher
    from llama_jax.run_data import build_data
    from llama_jax.train import build_trainer, global_batch

    trainer = build_trainer(config)
    with tempfile.TemporaryDirectory() as workdir:
        data = build_data(config, trainer.model_config, Path(workdir))
        try:
            batch_times = []
            for step in range(steps):
                start = time.perf_counter()
                data.train_rows(step)
                batch_times.append(time.perf_counter() - start)
            state = trainer.init_state(config.train.seed)
            state, _ = trainer.step(state, global_batch(trainer.mesh, data.train_rows(0)))  # compile
            jax.block_until_ready(state)
            step_times, waits = [], []
            with Prefetcher(data.train_rows, 1) as prefetch:
                for step in range(1, steps + 1):
                    start = time.perf_counter()
                    batch = prefetch.next(step)
                    waited = time.perf_counter()
                    state, metrics = trainer.step(state, global_batch(trainer.mesh, batch))
                    jax.block_until_ready(metrics)
                    waits.append(waited - start)
                    step_times.append(time.perf_counter() - waited)
        finally:
            data.discard()
    t = config.train
    batch_s, step_s = statistics.median(batch_times), statistics.median(step_times)
    return {"config": name, "batch": f"{t.batch_size} x {t.seq_len}", "batch_ms": batch_s * 1e3,
            "batches_per_s": 1 / batch_s, "step_ms": step_s * 1e3, "step_over_batch": step_s / batch_s,
            "median_wait_ms": statistics.median(waits[1:]) * 1e3, "total_wait_ms": sum(waits[1:]) * 1e3}


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int_at_least(2), default=30,
                        help="steps of the loop; the wait before the first is left out, so at least 2")
    args = parser.parse_args(argv)
    rows = [measure(name, config, args.steps) for name, config in configs().items()]
    print("| config | batch | build one batch, ms | batches/s | train step, ms | step / batch | "
          "wait per step (median), ms | wait over the loop, ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['batch_ms']:.2f} | {r['batches_per_s']:.0f} | {r['step_ms']:.1f} "
              f"| {r['step_over_batch']:.0f}x | {r['median_wait_ms']:.3f} | {r['total_wait_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
