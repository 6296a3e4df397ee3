"""`make demo`: the project's whole loop on a laptop, on a corpus every Python carries.

A small Code-LLaMA trained on the code of the interpreter running it: the Python source of the
standard library (`data.source=stdlib`, about 730 files and 3.9M tokens; 5% of the files held
out). The corpus is prepared once into WORKDIR/data with a 4,096-piece SentencePiece tokenizer
trained on the training files; then 500 steps on CPU with checkpoints, held-out evaluation and
samples; then the final checkpoint is exported as a model directory (WORKDIR/model) and as a
Hugging Face directory (WORKDIR/hf), and a greedy continuation is generated from the export.
The run sees about a quarter of an epoch, so held-out loss follows training loss instead of
drifting away from it as it does on a corpus the model can memorise.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llama_jax.experiment import base_config

PROMPT = "def"
FINAL_WINDOW = 5  # logged training losses averaged for the closing summary


def get_config():
    config = base_config("debug", vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                         max_seq_len=256, tie_embeddings=True)
    config.optimizer.update(lr=2e-3, warmup_steps=50, weight_decay=0.05, min_lr_ratio=0.1)
    config.train.update(steps=500, batch_size=16, seq_len=128, log_every=20, eval_every=100, eval_batches=16,
                        sample_every=250, sample_prompt=PROMPT, sample_tokens=48)
    config.data.update(source="stdlib", tokenizer="train", tokenizer_vocab_size=4096, eval_fraction=0.05)
    config.checkpoint.update(every=250, max_to_keep=2)
    return config


def summary_lines(result, workdir: Path, baseline: float | None) -> list[str]:
    """The closing summary's figures, all read from what the run logged (WORKDIR/metrics.jsonl)."""
    from llama_jax.metrics import read_metrics

    logged = read_metrics(workdir / "metrics.jsonl")  # a damaged line (kept in the log) is skipped
    # (null: a step train.on_nonfinite=skip passed over, not applied)
    trained = [r for r in logged if isinstance(r.get("loss"), (int, float))][-FINAL_WINDOW:]
    lines = []
    if trained:
        train_loss = sum(r["loss"] for r in trained) / len(trained)
        last = trained[-1]
        timed = next((r for r in reversed(trained) if "tokens_per_second" in r), None)  # the first step has none
        speed = f"{timed['tokens_per_second']:,.0f} tokens/s, MFU {timed['mfu']:.1%}, " if timed else ""
        lines.append(f"train loss {train_loss:.3f} nats/token (mean of the last {len(trained)} logged steps); "
                     f"{speed}epoch {last.get('epoch', 0):.2f}")
    ev = result.eval
    if ev is not None:
        gap = f", {ev['eval_loss'] - train_loss:+.3f} from train" if trained else ""
        against = f" vs unigram baseline {baseline:.1f}" if baseline is not None else ""
        lines.append(f"held-out loss {ev['eval_loss']:.3f} nats/token{gap}; perplexity {ev['eval_perplexity']:.1f}"
                     f"{against}; next-token accuracy {ev['eval_accuracy']:.1%}")
    return lines


def unigram_baseline(result, config) -> float:
    from llama_jax import data as data_lib
    from llama_jax.evaluate import held_out_batches
    from llama_jax.run_data import eval_max_batches, split_documents, target_counts

    data, t = result.data, config.train
    held_out = next(iter(data.eval_sets.values()))
    evaluated = held_out_batches((tokens for tokens, _ in split_documents(held_out)), t.seq_len,
                                 t.batch_size // t.grad_accum, eval_max_batches(t))
    counts = target_counts(data.train.sources[0].split, data.tokenizer)
    return data_lib.unigram_perplexity(counts, list(evaluated))


def export(workdir: Path, result) -> tuple[Path, Path, bool]:
    """The final checkpoint as a model directory and as a Hugging Face directory; the third value
    says whether they were written now. A finished demo given again keeps the exports it made of
    that checkpoint (and what was added to them since, such as eval.json); a demo that trained
    further replaces them."""
    from llama_jax.convert.pipeline import convert
    from llama_jax.run import export_model

    model_dir, hf_dir = workdir / "model", workdir / "hf"
    if _exported_after(workdir, result.final_step) and \
            not any("loss" in record for record in result.logged):  # nothing trained this time
        return model_dir, hf_dir, False
    check_exports(workdir)
    export_model(workdir, model_dir, overwrite=True)
    convert("jax", model_dir, "hf", hf_dir, overwrite=True, progress=False)
    return model_dir, hf_dir, True


def check_exports(workdir: Path) -> None:
    """ValueError when WORKDIR/model or WORKDIR/hf, which the demo replaces with its exports, is
    a link or a file, or holds what no such export holds (both, before either is written)."""
    from llama_jax.convert.pipeline import OUTPUT_KINDS
    from llama_jax.model_dir import MODEL_DIR
    from llama_jax.safe_io import describe_foreign, foreign_entries

    for directory, kind in ((workdir / "model", MODEL_DIR), (workdir / "hf", OUTPUT_KINDS["hf"])):
        way_out = f"the demo replaces {directory} with its export of the final checkpoint"
        if directory.is_symlink() or directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} is a {'link' if directory.is_symlink() else 'file'}, not the {kind.name} "
                             f"the demo wrote; {way_out}: move it away, or give the demo another --workdir")
        foreign = foreign_entries(directory, kind) if directory.is_dir() else []
        if foreign:
            raise ValueError(f"{describe_foreign(directory, kind, foreign)}; {way_out}: move {foreign[0]!r} out of "
                             f"it, or give the demo another --workdir")


def _exported_after(workdir: Path, step: int) -> bool:
    """Whether both exports (WORKDIR/model, WORKDIR/hf) were written after the checkpoint of `step`
    was (a directory is written whole or not at all, so a config file in each dates it; the same
    time, on a file system that keeps whole seconds, counts as after: the export follows its
    checkpoint)."""
    checkpoint = workdir / "checkpoints" / str(step)
    configs = [workdir / "model" / "model_config.json", workdir / "hf" / "config.json"]
    return checkpoint.is_dir() and all(c.is_file() and c.stat().st_mtime >= checkpoint.stat().st_mtime
                                       for c in configs)


def run_demo(workdir: str | Path, overrides: list[str] = ()) -> int:
    """The demo; returns its exit status (that of the closing `generate`, which reports its own errors)."""
    from llama_jax.experiment import apply_overrides, check_experiment
    from llama_jax.run_files import check_train_workdir
    from llama_jax.safe_io import holds_run

    config = apply_overrides(get_config(), overrides)
    if config.data.source == "synthetic":  # its export would have no tokenizer to generate text with
        raise ValueError("data.source=synthetic draws random tokens without a tokenizer, and the demo ends by "
                         "generating text from its export; give it documents (its default: data.source=stdlib)")
    # before importing JAX: a bad override fails at once (a resume takes an init_from model from its checkpoints)
    check_experiment(config, read_init_from=not holds_run(workdir))
    workdir = Path(workdir).absolute()
    if not (workdir / "checkpoints").is_dir():  # no run there yet, so the exports will be written: a bad --workdir
        check_exports(workdir)  # too is refused before JAX is imported, in the order of the checks below
        check_train_workdir(workdir, config)
    import jax

    from llama_jax.cli import main as cli
    from llama_jax.run import LOSS_PLOT, committed_steps, train_and_evaluate

    steps = committed_steps(workdir) if workdir.is_dir() else []
    if not (steps and steps[-1] >= config.train.steps and _exported_after(workdir, steps[-1])):
        check_exports(workdir)  # the exports will be written: refused before the run trains, not once it is done
    data = "the Python standard library's source" if config.data.source == "stdlib" else \
        f"data.source={config.data.source}"
    print(f"llama-jax demo: {config.train.steps} steps of a small LLaMA on {data} "
          f"({jax.device_count()} {jax.devices()[0].platform} device(s)); workdir {workdir}")
    result = train_and_evaluate(config, workdir)
    if result.preempted:  # (the run said how to resume: the same command)
        print(f"stopped at step {result.final_step} of {config.train.steps}")
        return 0
    print()
    baseline = unigram_baseline(result, config) if result.eval is not None else None
    print("\n".join(summary_lines(result, workdir, baseline)))
    if result.sample is not None:
        print(f"sample (temperature 0.8, top-k 40): {config.train.sample_prompt}{result.sample}")
    model_dir, hf_dir, written = export(workdir, result)
    print(f"\n{'exported' if written else 'exported earlier,'} the final checkpoint: {model_dir} (llama_jax) and "
          f"{hf_dir} (Hugging Face); in transformers:")
    print(f'    transformers.AutoModelForCausalLM.from_pretrained("{hf_dir}")')
    # 64 tokens, fewer where the model's context has no room for them after the prompt
    tokenizer = result.data.tokenizer
    prompt = len(tokenizer.encode(PROMPT, bos=True, eos=False)) if tokenizer is not None else 1
    new_tokens = max(1, min(64, config.model.max_seq_len - prompt))
    command = f"llama-jax generate {shlex.quote(str(model_dir))} --prompt {PROMPT!r} --temperature 0"
    print(f"greedy continuation, `{command}{'' if new_tokens == 64 else f' --max-new-tokens {new_tokens}'}`:")
    status = cli(["generate", str(model_dir), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens",
                  str(new_tokens), "--no-stream"])
    print(f"\nworkdir:     {workdir}")
    print(f"checkpoints: {workdir / 'checkpoints'}")
    print(f"metrics:     {workdir / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {shlex.quote(str(workdir))})")
    print(f"loss plot:   {workdir / LOSS_PLOT}")
    return status
