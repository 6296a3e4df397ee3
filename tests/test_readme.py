"""The README's Python examples that need nothing but a small model run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def python_example(heading: str) -> str:
    """The first ```python block under `heading` (a whole heading line of README.md)."""
    text = README.read_text()
    after = text[text.index(f"\n{heading}\n"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_python_examples(tmp_path):
    from tests.test_checkpoint import sentencepiece_model

    namespace = {}
    exec(python_example("## Using the model"), namespace)
    cfg, params, logits = namespace["cfg"], namespace["params"], namespace["logits"]
    assert logits.shape == (1, 16, cfg.vocab_size) and logits.dtype == np.float32  # as its comment says

    llama_jax = namespace["llama_jax"]
    namespace.update(state_dict=llama_jax.to_hf_state_dict(cfg, params), hf_config_dict=cfg.to_hf())
    exec(python_example("## Hugging Face weights in memory"), namespace)
    assert namespace["cfg"] == cfg.replace(dtype="float32")  # from_hf: float32 compute and master weights
    assert namespace["state_dict"]["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.dim, cfg.dim)  # [out, in]

    tokenizer = sentencepiece_model(tmp_path / "tok" / "tokenizer.model", 400)
    example = python_example("## Model directories")
    example = example.replace("out/my-model", str(tmp_path / "my-model")).replace("path/with/tokenizer", str(tokenizer))
    exec(example, namespace)
    assert namespace["cfg"] == cfg.replace(dtype="float32")
    assert (tmp_path / "my-model" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
