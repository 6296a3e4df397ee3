"""llama-jax: LLaMA models in JAX/Flax, exact against the PyTorch reference.

The names below are imported on first use, so that importing the package (as the `llama-jax`
command and data-preparation workers do) does not import JAX and Flax before they are needed.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "llama_jax.checkpoint", "save_model": "llama_jax.checkpoint",
    "PRESETS": "llama_jax.config", "LLaMAConfig": "llama_jax.config", "RopeScaling": "llama_jax.config",
    "from_hf_state_dict": "llama_jax.convert.hf", "to_hf_state_dict": "llama_jax.convert.hf",
    "KVCache": "llama_jax.model", "LLaMA": "llama_jax.model", "abstract_params": "llama_jax.model",
    "init_params": "llama_jax.model", "param_count": "llama_jax.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
