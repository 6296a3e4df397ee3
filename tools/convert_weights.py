#!/usr/bin/env python
"""Convert LLaMA weights between Hugging Face, Meta and llama_jax checkpoints.

Same as `llama-jax convert`; e.g.
    python tools/convert_weights.py --from hf --to jax path/to/hf-model out/model --verify
"""

import sys

from llama_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
