"""The `make demo` run as a config file: a small Code-LLaMA on the Python source of the standard
library of the interpreter running it (data.source=stdlib), tokenizer trained on it, on CPU.

    llama-jax train --config configs/demo.py --workdir runs/demo
"""

from llama_jax.demo import get_config  # noqa: F401  (the demo's config lives in the package)
