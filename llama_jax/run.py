"""An experiment run end to end: data, training, checkpoints with exact resume, logs, eval, samples.

`train_and_evaluate(config, workdir)` is what `llama-jax train` calls. Re-running it with the
same workdir resumes from the latest committed checkpoint; since the batch of step s is a pure
function of (data, seed, s) and the step is deterministic, every loss after a resume is the one
the uninterrupted run would have logged. SIGTERM (a TPU preemption notice) saves the current
step and returns cleanly.

Workdir layout: config.json (resolved config), checkpoints/<step>/{state,run}, metrics.jsonl,
TensorBoard event files, tokenizer.model (when trained by the run), loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from llama_jax import data as data_lib
from llama_jax import metrics as metrics_lib
from llama_jax.checkpoint import RunCheckpoints, check_same_architecture, load_model
from llama_jax.config import LLaMAConfig
from llama_jax.tokenizer import check_fits
from llama_jax.train import Trainer, TrainState, build_trainer, global_batch

ON_NONFINITE = ("stop", "skip")


class RunError(ValueError):
    """A problem with the run's inputs or workdir: reported as one line."""


# ---- data ------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunData:
    train_rows: Callable[[int], dict]  # step -> this process's rows of the global batch
    eval_rows: Callable[[int], dict] | None  # k -> this process's rows of the k-th eval batch
    tokenizer: object | None
    dataset: data_lib.TextDataset | None


def build_data(config, model: LLaMAConfig, workdir: Path) -> RunData:
    d, t = config.data, config.train
    rows = data_lib.rows_for_process(t.batch_size, jax.process_index(), jax.process_count())
    if d.source == "synthetic":
        return RunData(lambda s: data_lib.synthetic_batch(t.seed, s, rows, t.seq_len, model.vocab_size),
                       None, None, None)
    train_docs, eval_docs = data_lib.make_source(d)
    tokenizer = _tokenizer(d, train_docs, eval_docs is None, workdir)
    check_fits(tokenizer, model.vocab_size)
    dataset = data_lib.TextDataset(train_docs, tokenizer, t.seq_len, t.seed, d.eval_fraction, eval_docs)
    eval_rows = data_lib.rows_for_process(t.batch_size // t.grad_accum, jax.process_index(), jax.process_count())
    return RunData(lambda s: dataset.batch(s, rows), lambda k: dataset.eval_batch(k, eval_rows), tokenizer, dataset)


def _tokenizer(d, docs, holds_eval_documents: bool, workdir: Path):
    from llama_jax.tokenizer import load_tokenizer, train_sentencepiece

    if d.tokenizer == "train":  # a SentencePiece model trained on the run's training documents only
        path = workdir / "tokenizer.model"
        if not path.exists():
            if jax.process_count() > 1:
                raise RunError("data.tokenizer=train needs a single process; train it once with "
                               "tools/train_tokenizer.py and pass its path")
            indices = data_lib.split_indices(len(docs), d.eval_fraction)[0] if holds_eval_documents \
                else range(len(docs))
            print(f"training a {d.tokenizer_vocab_size}-piece SentencePiece tokenizer on the {len(indices)} "
                  f"training documents")
            train_sentencepiece((docs[int(i)] for i in indices), path, d.tokenizer_vocab_size)
        return load_tokenizer(path)
    if not d.tokenizer:
        raise RunError(f"data.tokenizer is empty; give a tokenizer.model path (or 'train') for data.source={d.source}")
    return load_tokenizer(d.tokenizer)


# ---- state -----------------------------------------------------------------------------------


def abstract_state(trainer: Trainer) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: restores land directly on this mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(trainer.abstract_state), trainer.state_shardings)


def initial_state(config, trainer: Trainer, checkpoints: RunCheckpoints, workdir: Path) -> tuple[TrainState, int]:
    """Resume from the latest committed checkpoint, else start from `checkpoint.init_from`, else fresh."""
    latest = checkpoints.latest_step()
    if latest is not None:
        info = checkpoints.run_info(latest)
        check_same_architecture(info["model"], trainer.model_config, f"{workdir} (checkpoint {latest})")
        try:
            return checkpoints.restore_state(latest, abstract_state(trainer)), latest
        except ValueError:  # Orbax: the saved tree does not have the structure of this state
            saved = info["config"].get("optimizer", {})
            changed = [f"optimizer.{k}" for k, v in config.optimizer.items() if saved.get(k) != v]
            raise RunError(f"{workdir} (checkpoint {latest}) holds an optimizer state that does not fit this "
                           f"config's optimizer" + (f" (changed: {', '.join(changed)})" if changed else "") +
                           "; resume with the run's optimizer settings or use another --workdir") from None
    if config.checkpoint.init_from:
        return state_from_model(config.checkpoint.init_from, trainer), 0
    return trainer.init_state(config.train.seed), 0


def _has_checkpoints(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_init_from(path: str, model: LLaMAConfig) -> None:
    """RunError unless `path` is a model directory with the architecture of `model`."""
    from llama_jax.checkpoint import load_config

    try:
        saved = load_config(path)
    except (ValueError, OSError) as e:
        raise RunError(f"checkpoint.init_from: {e}") from None
    check_same_architecture(saved.to_dict(), model, f"checkpoint.init_from={path}")


def state_from_model(path: str, trainer: Trainer) -> TrainState:
    """A fresh state whose parameters come from a model directory (e.g. converted weights)."""
    check_init_from(path, trainer.model_config)
    _, params = load_model(path, shardings=trainer.state_shardings.params)
    params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, nn.meta.unbox(trainer.abstract_state.params))
    init_opt = jax.jit(trainer.optimizer.init, out_shardings=trainer.state_shardings.opt_state)
    with trainer.context():
        opt_state = init_opt(params)

    def zero():  # step and skipped need buffers of their own: the train step donates both
        return jax.device_put(np.zeros((), np.int32), trainer.state_shardings.step)

    return TrainState(zero(), params, opt_state, zero())


def export_model(workdir: str | Path, dst: str | Path, step: int | None = None, overwrite: bool = False) -> tuple:
    """Write the parameters of a run's checkpoint (default: the latest) as a model directory
    (`save_model`), with the run's tokenizer when it has one; `llama-jax convert --from jax`
    takes it on to Hugging Face or Meta format. Returns (path, step, config)."""
    from llama_jax.checkpoint import save_model

    workdir = Path(workdir).absolute()
    if not _has_checkpoints(workdir / "checkpoints"):
        raise RunError(f"{workdir} holds no committed checkpoint (checkpoints/<step>/); give a run's --workdir")
    checkpoints = RunCheckpoints(workdir / "checkpoints", every=1, async_save=False, read_only=True)
    try:
        steps = checkpoints.all_steps()
        step = steps[-1] if step is None else step
        if step not in steps:
            raise RunError(f"{workdir} has no checkpoint of step {step}; valid: {', '.join(map(str, steps))}")
        info = checkpoints.run_info(step)
        model = LLaMAConfig.from_dict(info["model"])
        params = checkpoints.restore_params(step, model)
    finally:
        checkpoints.close()
    tokenizer = info["config"]["data"].get("tokenizer")
    tokenizer_dir = workdir if tokenizer == "train" else Path(tokenizer).parent if tokenizer else None
    if tokenizer_dir is not None and not (tokenizer_dir / "tokenizer.model").is_file():
        tokenizer_dir = None
    return save_model(dst, model, params, tokenizer_dir=tokenizer_dir, overwrite=overwrite), step, model


# ---- evaluation and samples ------------------------------------------------------------------


def evaluate(trainer: Trainer, params, data: RunData, n_batches: int) -> dict[str, float]:
    """Token-weighted mean loss, perplexity and accuracy over the fixed eval batches."""
    nll = correct = tokens = 0.0
    for k in range(n_batches):
        m = jax.device_get(trainer.eval_metrics(params, global_batch(trainer.mesh, data.eval_rows(k))))
        nll += float(m["nll"]) * float(m["tokens"])
        correct += float(m["accuracy"]) * float(m["tokens"])
        tokens += float(m["tokens"])
    mean = nll / max(tokens, 1.0)
    return {"eval_loss": mean, "eval_perplexity": float(np.exp(mean)), "eval_accuracy": correct / max(tokens, 1.0)}


def sample(config, trainer: Trainer, params, tokenizer, seed: int) -> str:
    from llama_jax.generate import generate_text

    with trainer.context(per_device_attention=False):
        return generate_text(trainer.model_config, params, tokenizer, config.train.sample_prompt,
                             max_new_tokens=config.train.sample_tokens, temperature=0.8, top_k=40, seed=seed)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training (and eval) loss against step, from the whole metrics.jsonl (resumed runs included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    # A resumed run logs again the steps after its checkpoint: keep the latest value per step.
    train = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
    evals = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step.

    Single-process runs only: in a multi-process run the processes must agree on the step to
    save, which JAX's preemption sync manager (started by `jax.distributed.initialize`, which
    handles SIGTERM itself) does through `CheckpointManager.reached_preemption`.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class RunResult:
    logged: list[dict]
    final_step: int
    preempted: bool
    eval: dict[str, float] | None
    sample: str | None
    data: RunData


def validate_run_config(config) -> None:
    t, c = config.train, config.checkpoint
    if t.on_nonfinite not in ON_NONFINITE:
        raise RunError(f"train.on_nonfinite={t.on_nonfinite!r}; valid: {', '.join(ON_NONFINITE)}")
    for key in ("eval_every", "eval_batches", "sample_every", "sample_tokens"):
        if not isinstance(t[key], int) or t[key] < 0:
            raise RunError(f"train.{key} must be a non-negative integer, got {t[key]!r}")
    if not isinstance(c.every, int) or c.every < 1:
        raise RunError(f"checkpoint.every must be a positive integer, got {c.every!r}")


def train_and_evaluate(config, workdir: str | Path, progress: bool = True, devices=None) -> RunResult:
    """Train `config.train.steps` steps in `workdir`, resuming if it holds checkpoints.

    Ends with an evaluation of the final parameters (when the data has a held-out split) and a
    text sample (when it has a tokenizer), also when the workdir already holds the final step.
    `devices`: the devices of the mesh (default: all).
    """
    from tqdm import tqdm

    validate_run_config(config)
    trainer = build_trainer(config, devices)
    workdir = Path(workdir).absolute()
    cfg, t = trainer.model_config, config.train
    data = build_data(config, cfg, workdir)  # bad data or tokenizer fails here, before any write
    if config.checkpoint.init_from and not _has_checkpoints(workdir / "checkpoints"):
        check_init_from(config.checkpoint.init_from, cfg)  # also before anything is written
    checkpoints = RunCheckpoints(workdir / "checkpoints", config.checkpoint.every, config.checkpoint.max_to_keep,
                                 config.checkpoint.keep_every, config.checkpoint.async_save)
    state, start = initial_state(config, trainer, checkpoints, workdir)
    main_process = jax.process_index() == 0
    if main_process:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    run_info = {"config": json.loads(config.to_json_best_effort()), "model": cfg.to_dict()}
    writer = metrics_lib.MetricsWriter(workdir)
    peak = metrics_lib.peak_flops_per_device()
    preemption = _Preemption()
    prefetch = data_lib.Prefetcher(data.train_rows, start)
    bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=None if progress and main_process else True)
    logged, eval_metrics, text, skipped_seen = [], None, None, int(state.skipped)
    evaluates, samples = bool(data.eval_rows and t.eval_batches), bool(data.tokenizer and t.sample_tokens)
    evaluated_at = sampled_at = None
    window_start, window_tokens, step, saved_step = time.perf_counter(), 0, start, start
    try:
        for step in range(start + 1, t.steps + 1):
            state, step_metrics = trainer.step(state, global_batch(trainer.mesh, prefetch.next(step - 1)))
            window_tokens += t.batch_size * t.seq_len
            bar.update(1)
            record = {}
            if step % t.log_every == 0 or step == t.steps:
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                per_device = window_tokens / (time.perf_counter() - window_start) / trainer.mesh.size
                values.update(tokens_per_second=per_device * trainer.mesh.size,
                              tflops_per_device=metrics_lib.tflops_per_device(per_device, cfg, t.seq_len),
                              mfu=metrics_lib.mfu(per_device, cfg, t.seq_len, peak))
                record.update(values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_second']:,.0f}",
                                mfu=f"{values['mfu']:.1%}")
                window_start, window_tokens = time.perf_counter(), 0
            if evaluates and t.eval_every and step % t.eval_every == 0:
                eval_metrics, evaluated_at = evaluate(trainer, state.params, data, t.eval_batches), step
                record.update(eval_metrics)
            if samples and t.sample_every and step % t.sample_every == 0:
                text, sampled_at = sample(config, trainer, state.params, data.tokenizer, seed=step), step
                bar.write(f"step {step} sample: {t.sample_prompt}{text}")
            if record:
                writer.write(step, record)
                logged.append({"step": step, **record})
            if step == start + 1 and not record:  # leave compilation out of the throughput figures
                jax.block_until_ready(state.step)
                window_start, window_tokens = time.perf_counter(), 0
            if record or checkpoints.due(step):
                skipped_seen = _check_finite(state, skipped_seen, step, t.on_nonfinite, checkpoints, bar)
            if checkpoints.save(step, state, {**run_info, "step": step}):
                saved_step = step
            if preemption.requested or checkpoints.reached_preemption(step):
                if saved_step != step:
                    checkpoints.save(step, state, {**run_info, "step": step}, force=True)
                checkpoints.wait()
                bar.write(f"preempted: checkpoint saved at step {step}; run the same command again to resume")
                return RunResult(logged, step, True, eval_metrics, text, data)
        if saved_step != step:
            checkpoints.save(step, state, {**run_info, "step": step}, force=True)
        if evaluates and evaluated_at != step:  # the final parameters, unless just evaluated
            eval_metrics = evaluate(trainer, state.params, data, t.eval_batches)
            if step > start:
                writer.write(step, eval_metrics)
                logged.append({"step": step, **eval_metrics})
        if samples and sampled_at != step:
            text = sample(config, trainer, state.params, data.tokenizer, seed=step)
        checkpoints.wait()
    finally:
        bar.close()
        prefetch.close()
        preemption.restore()
        writer.close()
        checkpoints.wait()
        checkpoints.close()
    if main_process and (workdir / "metrics.jsonl").exists():
        plot_losses(workdir / "metrics.jsonl", workdir / "loss.png")
    return RunResult(logged, step, False, eval_metrics, text, data)


def _check_finite(state: TrainState, skipped_seen: int, step: int, on_nonfinite: str, checkpoints, bar) -> int:
    skipped = int(state.skipped)
    if skipped > skipped_seen:
        if on_nonfinite == "stop":
            latest = checkpoints.latest_step()
            raise RunError(f"loss or gradient became NaN/Inf by step {step}; stopped (train.on_nonfinite=stop). "
                           f"The state was not updated by that step; latest checkpoint: "
                           f"{latest if latest is not None else 'none'}")
        bar.write(f"step {step}: skipped {skipped - skipped_seen} step(s) with a non-finite loss or gradient")
    return skipped
