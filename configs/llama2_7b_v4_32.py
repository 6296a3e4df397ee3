"""LLaMA-2 7B pre-training on a TPU v4-32 (16 chips): FSDP over all chips, remat, bf16 compute.

Global batch 256 x 4096 tokens (1M tokens/step, as in the LLaMA-2 paper), AdamW with the paper's
betas, cosine decay to 10% over 500k steps with 2000 warmup steps.

    llama-jax plan --config configs/llama2_7b_v4_32.py --devices 16
    llama-jax train --config configs/llama2_7b_v4_32.py --workdir gs://bucket/runs/llama2-7b
"""

from ml_collections import ConfigDict

from llama_jax import optim
from llama_jax.experiment import model_section


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = model_section("llama2-7b", dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")
    config.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    config.optimizer = optim.default_config()
    config.optimizer.update(lr=3e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0,
                            schedule="cosine", warmup_steps=2000, min_lr_ratio=0.1)
    config.train = ConfigDict(dict(steps=500_000, batch_size=256, seq_len=4096, grad_accum=1, seed=0,
                                   log_every=10, z_loss=0.0))
    config.data = ConfigDict(dict(source="synthetic"))
    return config
