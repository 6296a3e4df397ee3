"""`make demo`: the project's main job on a laptop.

Trains a SentencePiece tokenizer and a small LLaMA on an English corpus every CPython carries
(the documentation text of `pydoc_data.topics`), on CPU, with checkpoints, held-out evaluation and
samples, then compares held-out perplexity with a unigram baseline.
"""

from __future__ import annotations

from pathlib import Path

from llama_jax.experiment import base_config


def get_config():
    config = base_config("debug", vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                         max_seq_len=256, tie_embeddings=True)
    config.optimizer.update(lr=2e-3, warmup_steps=50, weight_decay=0.05, min_lr_ratio=0.1)
    config.train.update(steps=500, batch_size=16, seq_len=128, log_every=20, eval_every=100, eval_batches=8,
                        sample_every=200, sample_prompt="The ", sample_tokens=40)
    config.data.update(source="embedded", tokenizer="train", tokenizer_vocab_size=2048, eval_fraction=0.05)
    config.checkpoint.update(every=200, max_to_keep=2)
    return config


def run_demo(workdir: str | Path, overrides: list[str] = ()) -> None:
    import jax

    from llama_jax import data as data_lib
    from llama_jax.evaluate import held_out_batches
    from llama_jax.experiment import apply_overrides
    from llama_jax.run import train_and_evaluate
    from llama_jax.run_data import eval_max_batches, split_documents, target_counts

    config = apply_overrides(get_config(), overrides)
    workdir = Path(workdir).absolute()
    print(f"llama-jax demo: {config.train.steps} steps of a small LLaMA on pydoc_data.topics "
          f"({jax.device_count()} {jax.devices()[0].platform} device(s)); workdir {workdir}")
    result = train_and_evaluate(config, workdir)
    if result.preempted:
        print(f"stopped at step {result.final_step} of {config.train.steps}; run `make demo` again to resume")
        return
    print()
    ev = result.eval
    if ev is None:
        print("no held-out evaluation (train.eval_batches=0)")
    else:
        data, t = result.data, config.train
        held_out = next(iter(data.eval_sets.values()))
        evaluated = held_out_batches((tokens for tokens, _ in split_documents(held_out)), t.seq_len,
                                     t.batch_size // t.grad_accum, eval_max_batches(t))
        counts = target_counts(data.train.sources[0].split, data.tokenizer)
        baseline = data_lib.unigram_perplexity(counts, list(evaluated))
        print(f"held-out perplexity: model {ev['eval_perplexity']:.1f} vs unigram baseline {baseline:.1f} "
              f"(loss {ev['eval_loss']:.3f} nats/token, next-token accuracy {ev['eval_accuracy']:.1%})")
    print(f"sample: {config.train.sample_prompt}{result.sample}")
    print(f"workdir:     {workdir}")
    print(f"checkpoints: {workdir / 'checkpoints'}")
    print(f"metrics:     {workdir / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {workdir})")
    print(f"loss plot:   {workdir / 'loss.png'}")
