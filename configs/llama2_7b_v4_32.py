"""LLaMA-2 7B pre-training on a TPU v4-32 (16 chips): FSDP over all chips, remat, bf16 compute.

Global batch 1024 x 4096 tokens (4M tokens/step, as in the LLaMA-2 paper) in 64 micro-batches of
16 rows, one row per chip: remat_policy=dots_no_batch keeps every projection's output for the
backward, 42,496 values per token and layer (85 KB in bf16), 10.4 GiB per chip for one row of
4,096 tokens over 32 layers, of a v4 chip's 32 GiB (16 rows per chip would keep 166 GiB; the plan
below, on CPU devices, puts the peak at 34 GiB, as the CPU program keeps those outputs as float32).
AdamW with the paper's betas and epsilon, cosine decay to 10% over 500k steps (2.1T tokens) with
2000 warmup steps. Not yet run on a TPU.

    llama-jax plan --config configs/llama2_7b_v4_32.py --devices 16
    llama-jax train --config configs/llama2_7b_v4_32.py --workdir /mnt/gcs/runs/llama2-7b

Paths are on a bucket mounted with gcsfuse at /mnt/gcs on every worker (the workdir, the prepared
data and init_from are read and written as local paths). The tokens are prepared once, from c4/en
in TFDS ArrayRecord format, on one machine:

    llama-jax prepare-data --config configs/llama2_7b_v4_32.py --output /mnt/gcs/data/c4-en-llama2 \
        --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 --config.data.tfds_eval_split=validation \
        --config.data.data_dir=/mnt/gcs/tensorflow_datasets --config.data.tokenizer=/mnt/gcs/llama2/tokenizer.model
"""

from llama_jax.experiment import base_config


def get_config():
    config = base_config("llama2-7b", dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch",
                         attention_impl="auto")  # splash on TPU
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.optimizer.update(lr=3e-4, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, clip_norm=1.0,
                            schedule="cosine", warmup_steps=2000, min_lr_ratio=0.1)
    config.train.update(steps=500_000, batch_size=1024, seq_len=4096, grad_accum=64, seed=0,
                        log_every=10, z_loss=0.0)
    config.data.update(source="prepared", path="/mnt/gcs/data/c4-en-llama2")  # see the docstring
    config.train.update(eval_every=1000, eval_batches=320)  # 320 micro-batches of 16 rows: 21M tokens
    config.checkpoint.update(every=1000, max_to_keep=3, keep_every=10_000)
    return config
