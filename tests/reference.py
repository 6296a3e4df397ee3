"""Tiny Hugging Face reference models built locally (random weights, no network)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

# Shapes that cover the architecture's variants. Each LLaMA-3 scaling puts rotary frequencies in all
# three of its bands: head dim 16 with rope_theta 500000 and an original context of 64 (gqa_llama3) or
# of 128 with other band edges (mha_llama3), head dim 32 with LLaMA 3.2's own scaling (gqa_llama32_tied).
VARIANTS = {
    "mha": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                tie_word_embeddings=False),
    "gqa_llama3": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=64),
                       tie_word_embeddings=False),
    "gqa_llama32_tied": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
                             rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192),
                             max_position_embeddings=131072, tie_word_embeddings=True),
    "mha_llama3": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=2.0,
                                         high_freq_factor=8.0, original_max_position_embeddings=128),
                       tie_word_embeddings=False),
    "mqa_tied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                     tie_word_embeddings=True),
}


def hf_config_dict(variant: str, style: str = "v4", vocab_size: int = 256) -> dict:
    """config.json contents as the Hub (transformers 4.x, "v4") or transformers 5.x ("v5") writes them."""
    v = dict(VARIANTS[variant])
    d = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size,
             max_position_embeddings=256, hidden_act="silu", initializer_range=0.02,
             attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)
    theta, scaling = v.pop("rope_theta"), v.pop("rope_scaling")
    d.update(v)
    if style == "v4":
        d.update(rope_theta=theta, rope_scaling=scaling, torch_dtype="float32")
    else:
        d.update(rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta}, dtype="float32")
    return d


def make_hf_model(config_dict: dict, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**config_dict)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 1.0; randomise them so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
