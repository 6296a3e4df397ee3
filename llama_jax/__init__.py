"""llama-jax: LLaMA models in JAX/Flax, exact against the PyTorch reference."""

from llama_jax.checkpoint import load_model, save_model
from llama_jax.config import PRESETS, LLaMAConfig, RopeScaling
from llama_jax.convert.hf import from_hf_state_dict, to_hf_state_dict
from llama_jax.model import KVCache, LLaMA, abstract_params, init_params, param_count

__version__ = "0.1.0"

__all__ = [
    "KVCache", "LLaMA", "LLaMAConfig", "PRESETS", "RopeScaling", "abstract_params", "from_hf_state_dict",
    "init_params", "load_model", "param_count", "save_model", "to_hf_state_dict",
]
