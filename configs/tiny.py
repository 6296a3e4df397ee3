"""A tiny LLaMA that trains on CPU in seconds; works unchanged on 1 or 8 devices.

    llama-jax train --config configs/tiny.py --workdir /tmp/tiny
    llama-jax train --config configs/tiny.py --config.mesh.tensor=2 --config.train.steps=50 ...
"""

from ml_collections import ConfigDict

from llama_jax import optim
from llama_jax.experiment import model_section


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model_section("debug", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 ffn_dim=176, max_seq_len=128)
    config.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.optimizer = optim.default_config()
    config.optimizer.update(lr=3e-3, warmup_steps=10, weight_decay=0.01)
    config.train = ConfigDict(dict(steps=60, batch_size=16, seq_len=64, grad_accum=1, seed=0, log_every=10,
                                   z_loss=0.0))
    config.data = ConfigDict(dict(source="synthetic"))
    return config
