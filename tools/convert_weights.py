#!/usr/bin/env python
"""Convert LLaMA weights between Hugging Face, Meta and llama_jax checkpoints.

Same as `llama-jax convert`; e.g.
    python tools/convert_weights.py --from hf --to jax path/to/hf-model out/model --verify
"""

import sys

from llama_jax.cli import main

if __name__ == "__main__":
    # as the llama-jax program itself (main() without argv), which a signal leaves without the
    # interpreter's teardown: that raced the writes still finishing in threads (tracebacks, and a
    # temporary directory written into again after its removal)
    sys.argv[1:1] = ["convert"]
    sys.exit(main())
