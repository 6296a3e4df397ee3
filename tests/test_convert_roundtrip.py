"""Round trips through every format are bit-exact, and --verify checks Meta checkpoints in Meta's layout."""

import jax
import numpy as np
import pytest

from llama_jax import load_model
from llama_jax.cli import main
from tests.test_convert_hf import write_hf_dir
from tests.test_convert_meta import make_meta_dir, reference
from tests.reference import hf_config_dict, make_hf_model


def convert(src_fmt, src, dst_fmt, dst, *extra):
    assert main(["convert", "--from", src_fmt, "--to", dst_fmt, str(src), str(dst), *extra]) == 0


def assert_same_model(a, b):
    (cfg_a, params_a), (cfg_b, params_b) = load_model(a, as_numpy=True), load_model(b, as_numpy=True)
    assert cfg_a == cfg_b
    assert jax.tree.structure(params_a) == jax.tree.structure(params_b)
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


@pytest.mark.parametrize("case, shards", [("llama3", 2), ("mqa_tied", 4), ("llama1", 1)])
def test_meta_jax_hf_jax(tmp_path, case, shards):
    src = make_meta_dir(tmp_path / "meta", case, shards)
    rope = ["--rope-scaling-factor", "16"] if case == "llama3" else []
    convert("meta", src, "jax", tmp_path / "jax1", *rope)
    convert("jax", tmp_path / "jax1", "hf", tmp_path / "hf", "--max-shard-size", "200KB")
    convert("hf", tmp_path / "hf", "jax", tmp_path / "jax2")
    assert_same_model(tmp_path / "jax1", tmp_path / "jax2")
    cfg, _ = load_model(tmp_path / "jax2", as_numpy=True)
    assert cfg.tie_embeddings == (case == "mqa_tied")
    if case == "llama3":
        assert cfg.rope_scaling.factor == 16 and cfg.rope_theta == 500000.0


@pytest.mark.parametrize("variant, shards", [("mha", 2), ("mqa_tied", 2)])
def test_hf_jax_meta_jax(tmp_path, variant, shards):
    config_dict = hf_config_dict(variant, "v4")
    src = write_hf_dir(tmp_path / "hf", make_hf_model(config_dict, seed=5), config_dict, "safetensors")
    convert("hf", src, "jax", tmp_path / "jax1")
    convert("jax", tmp_path / "jax1", "meta", tmp_path / "meta")
    # --overwrite replaces what the Meta writer wrote (llama_jax.json included), stale shards too
    convert("jax", tmp_path / "jax1", "meta", tmp_path / "meta", "--shards", str(shards), "--overwrite")
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == shards
    assert (tmp_path / "meta" / "tokenizer.model").is_file()
    convert("meta", tmp_path / "meta", "jax", tmp_path / "jax2")
    assert_same_model(tmp_path / "jax1", tmp_path / "jax2")


def test_verify_meta_runs_metas_layout(tmp_path, capsys):
    src = make_meta_dir(tmp_path / "meta", "llama3", 2)
    convert("meta", src, "jax", tmp_path / "jax", "--rope-scaling-factor", "16", "--verify")
    out = capsys.readouterr().out
    assert "verify meta (pytorch (meta layout)) vs jax (llama_jax)" in out and "(ok;" in out
    convert("jax", tmp_path / "jax", "meta", tmp_path / "meta2", "--verify")
    assert "vs meta (pytorch (meta layout))" in capsys.readouterr().out


def test_verify_catches_a_wrong_rotary_permutation(tmp_path, capsys, monkeypatch):
    from llama_jax.convert import meta

    src = make_meta_dir(tmp_path / "meta", "llama3", 2)
    monkeypatch.setattr(meta, "_meta_to_hf_rotary", lambda w, n_heads: w)  # the classic converter bug
    assert main(["convert", "--from", "meta", "--to", "jax", str(src), str(tmp_path / "jax"),
                 "--rope-scaling-factor", "16", "--verify"]) == 2
    assert "verification failed" in capsys.readouterr().err
    assert not (tmp_path / "jax").exists()


def test_meta_reference_forward_matches_transformers():
    """The PyTorch Meta-layout forward used by --verify is itself right."""
    import tempfile
    from pathlib import Path

    from llama_jax.convert.verify import meta_logits
    from tests.reference import hf_logits

    hf_config, model, _ = reference("llama2")
    tokens = np.random.default_rng(1).integers(0, 256, (2, 16)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        logits, engine = meta_logits(make_meta_dir(Path(d) / "m", "llama2", 2), tokens, None)
    np.testing.assert_allclose(logits, hf_logits(model, tokens), atol=1e-4, rtol=0)
