"""A tiny LLaMA that trains on CPU in seconds on synthetic data; works unchanged on 1 or 8 devices.

    llama-jax train --config configs/tiny.py --workdir runs/tiny
    llama-jax train --config configs/tiny.py --workdir runs/tiny-long --config.train.steps=500
"""

from llama_jax.experiment import base_config


def get_config():
    config = base_config("debug", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                         max_seq_len=128)
    config.optimizer.update(lr=3e-3, warmup_steps=10, weight_decay=0.01)
    config.train.update(steps=60, batch_size=16, seq_len=64, log_every=10)
    config.checkpoint.update(every=30, max_to_keep=2)
    return config
