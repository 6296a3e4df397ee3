"""TinyLlama-1.1B pre-training on one 8-GPU host: data parallel x FSDP with gradient accumulation.

TinyLlama's recipe: global batch 1024 x 2048 tokens (2M tokens/step), lr 4e-4 cosine to 4e-5,
2000 warmup steps, weight decay 0.1. Here 2 replicas x 4-way FSDP, 8 micro-batches per step:
16 rows of 2048 tokens per GPU, for which remat_policy=dots_no_batch keeps 17,920 values per token
and layer for the backward, about 24 GiB in bf16 over the 22 layers (by count, not measured on a
GPU), so 80 GB GPUs; on 40 GB ones, train.grad_accum=16 halves it.

    llama-jax plan --config configs/tinyllama_1b_8gpu.py --devices 8

The tokens are prepared once (16 tokenizer processes on the host):

    llama-jax prepare-data --config configs/tinyllama_1b_8gpu.py --output /data/slimpajama-tinyllama --workers 16 \
        --config.data.source=jsonl "--config.data.files=['/data/slimpajama/*.jsonl']" \
        --config.data.tokenizer=/data/tinyllama/tokenizer.model --config.data.eval_fraction=0.001
"""

from llama_jax.experiment import base_config


def get_config():
    # model.scan_layers=False (unrolled) trained the 0.89B step of benchmarks/gpu.py 1.07x faster on one
    # H200 without remat (no copies of layer slices); not yet measured with this remat policy and FSDP
    config = base_config("tinyllama-1.1b", dtype="bfloat16", param_dtype="float32",
                         remat_policy="dots_no_batch", attention_impl="auto")  # cuDNN flash attention on GPU
    config.mesh.update(data=2, fsdp=-1, tensor=1)
    config.optimizer.update(lr=4e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
                            schedule="cosine", warmup_steps=2000, min_lr_ratio=0.1)
    config.train.update(steps=1_430_000, batch_size=1024, seq_len=2048, grad_accum=8, seed=0,
                        log_every=10, z_loss=0.0)
    config.data.update(source="prepared", path="/data/slimpajama-tinyllama")  # see the docstring
    config.train.update(eval_every=2000, eval_batches=20)
    config.checkpoint.update(every=2000, max_to_keep=3, keep_every=50_000)
    return config
