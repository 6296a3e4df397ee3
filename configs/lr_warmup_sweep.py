"""A learning-rate x warmup sweep of the demo model, sized for a laptop CPU (minutes).

    llama-jax sweep --config configs/lr_warmup_sweep.py --workdir runs/lr-warmup --parallel 2

The demo's model and corpus (pydoc_data.topics, held-out documents for evaluation), shortened to
200 steps; every trial trains the same SentencePiece tokenizer on the training documents.
experiments/lr_warmup_sweep.sh runs it; docs/lr_warmup_sweep/ holds the results of one run.
"""

from llama_jax.demo import get_config as demo_config


def get_config():
    config = demo_config()
    config.train.update(steps=200, eval_every=50, eval_batches=4, sample_every=0)
    config.checkpoint.update(every=100, max_to_keep=1)
    return config


def get_sweep():
    return {"optimizer.lr": [3e-4, 1e-3, 3e-3, 1e-2], "optimizer.warmup_steps": [10, 50]}
