"""A learning-rate x warmup sweep of the demo model, sized for a laptop CPU (minutes).

    llama-jax sweep --config configs/lr_warmup_sweep.py --workdir runs/lr-warmup-sweep --parallel 2

The demo's model on the corpus the demo used before it moved to the standard library's source
(pydoc_data.topics, 2,048-piece tokenizer, 5% of the documents held out), shortened to 200 steps;
the sweep prepares the corpus (and trains its SentencePiece tokenizer) once, into WORKDIR/data,
and every trial reads it.
experiments/lr_warmup_sweep.sh runs it; docs/lr_warmup_sweep/ holds the results of one run.
"""

from llama_jax.demo import get_config as demo_config


def get_config():
    config = demo_config()
    config.train.update(steps=200, eval_every=50, eval_batches=4, sample_every=0)
    config.data.update(source="embedded", tokenizer_vocab_size=2048)
    config.model.vocab_size = 2048
    config.checkpoint.update(every=100, max_to_keep=1)
    return config


def get_sweep():
    return {"optimizer.lr": [3e-4, 1e-3, 3e-3, 1e-2], "optimizer.warmup_steps": [10, 50]}
