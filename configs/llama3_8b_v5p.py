"""LLaMA-3 8B continued pre-training on a TPU v5p-64 (32 chips): FSDP x tensor parallel 2.

Starts from converted weights (`llama-jax convert --from hf --to jax ...`), short warmup,
warmup-stable-decay schedule at a continued-pre-training learning rate, z-loss for stability.
Global batch 128 x 8192 tokens (1M tokens/step). The plan below leaves out init_from, which it
would read (and which is only on the bucket, once converted): the preset is the same model.

    llama-jax plan --config configs/llama3_8b_v5p.py --devices 32 --config.checkpoint.init_from=
    llama-jax train --config configs/llama3_8b_v5p.py --workdir /mnt/gcs/runs/llama3-8b-cpt

Paths are on a bucket mounted with gcsfuse at /mnt/gcs on every worker. The tokens are prepared
once, from c4/en in TFDS ArrayRecord format, on one machine, with LLaMA 3's tokenizer (its
tiktoken file):

    llama-jax prepare-data --config configs/llama3_8b_v5p.py --output /mnt/gcs/data/c4-en-llama3 \
        --config.data.source=tfds --config.data.tfds_name=c4/en:3.1.0 --config.data.tfds_eval_split=validation \
        --config.data.data_dir=/mnt/gcs/tensorflow_datasets --config.data.tokenizer=/mnt/gcs/llama3/tokenizer.model
"""

from llama_jax.experiment import base_config


def get_config():
    config = base_config("llama3-8b", dtype="bfloat16", param_dtype="float32", remat_policy="full",
                         attention_impl="auto")  # splash on TPU
    config.mesh.update(data=1, fsdp=-1, tensor=2)
    config.optimizer.update(lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                            schedule="wsd", warmup_steps=200, min_lr_ratio=0.1, decay_fraction=0.2)
    config.train.update(steps=20_000, batch_size=128, seq_len=8192, grad_accum=1, seed=0,
                        log_every=10, z_loss=1e-4)
    config.data.update(source="prepared", path="/mnt/gcs/data/c4-en-llama3")  # see the docstring
    config.train.update(eval_every=500, eval_batches=20)
    config.checkpoint.update(every=500, max_to_keep=3, init_from="/mnt/gcs/llama3-8b-jax")
    return config
