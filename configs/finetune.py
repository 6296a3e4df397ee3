"""Fine-tuning a converted model on local JSONL files; the architecture comes from the model.

    llama-jax convert --from hf --to jax path/to/Llama-2-7b-hf models/llama2-7b
    llama-jax train --config configs/finetune.py --workdir runs/ft \\
        --config.checkpoint.init_from=models/llama2-7b \\
        --config.data.files="['data/*.jsonl']" --config.data.tokenizer=models/llama2-7b/tokenizer.model

experiments/finetune_hf.sh runs these steps and exports the result back to Hugging Face format.
FSDP over all devices, bf16 compute with fp32 master weights, a small learning rate (2e-5) with 50
warmup steps and cosine decay to 10% of it.
"""

from llama_jax.experiment import base_config


def get_config():
    config = base_config("init_from", dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch")
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.optimizer.update(lr=2e-5, weight_decay=0.0, clip_norm=1.0, schedule="cosine", warmup_steps=50,
                            min_lr_ratio=0.1)
    config.train.update(steps=1000, batch_size=32, seq_len=2048, log_every=10, eval_every=200, eval_batches=8,
                        sample_every=200, sample_prompt="The", sample_tokens=48)
    config.data.update(source="jsonl", files=[], text_key="text", tokenizer="", eval_fraction=0.01)
    config.checkpoint.update(every=200, max_to_keep=2, init_from="")
    return config
