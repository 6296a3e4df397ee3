"""The `make demo` run as a config file: a small LLaMA on the documentation corpus every CPython
ships (pydoc_data.topics), tokenizer trained on it, on CPU.

    llama-jax train --config configs/demo.py --workdir runs/demo
"""

from llama_jax.demo import get_config  # noqa: F401  (the demo's config lives in the package)
