"""LLaMAConfig: presets, validation and Hugging Face config.json translation."""

import pytest
import transformers

from llama_jax import PRESETS, LLaMAConfig, RopeScaling, param_count
from tests.reference import hf_config_dict

# Parameter counts as published (model cards, papers, `sum(p.numel())` of the released weights).
PUBLISHED_PARAM_COUNTS = {
    "llama1-7b": 6_738_415_616,
    "llama1-13b": 13_015_864_320,
    "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "codellama-7b": 6_738_546_688,
    "codellama-34b": 33_743_970_304,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAM_COUNTS))
def test_preset_param_count_is_published_number(name):
    assert param_count(LLaMAConfig.from_preset(name)) == PUBLISHED_PARAM_COUNTS[name]


def test_param_count_agrees_with_transformers_for_small_presets():
    """The debug presets have no published count; the reference model counts them instead."""
    for name in ("debug", "tiny", "stories260k"):
        cfg = LLaMAConfig.from_preset(name)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
        assert param_count(cfg) == sum(p.numel() for p in hf.parameters()), name


def test_every_preset_is_checked():
    assert set(PRESETS) - {"debug", "tiny", "small", "stories260k"} == set(PUBLISHED_PARAM_COUNTS)


def test_llama3_presets_carry_rope_scaling():
    assert LLaMAConfig.from_preset("llama3-8b").rope_scaling is None
    assert LLaMAConfig.from_preset("llama3.1-8b").rope_scaling.factor == 8
    assert LLaMAConfig.from_preset("llama3.2-1b").rope_scaling.factor == 32
    assert LLaMAConfig.from_preset("llama3.2-1b").tie_embeddings
    assert LLaMAConfig.from_preset("codellama-7b").rope_theta == 1e6


@pytest.mark.parametrize("changes, field", [
    (dict(dim=100, n_heads=8), "n_heads"),
    (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope_type"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-2), "n_layers"),
    (dict(ffn_dim=2.5), "ffn_dim"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(attention_impl="magic"), "attention_impl"),
])
def test_invalid_config_names_the_field(changes, field):
    base = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, ffn_dim=128)
    with pytest.raises(ValueError, match=field):
        LLaMAConfig(**{**base, **changes})


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown preset 'llama9-1t'.*llama2-7b"):
        LLaMAConfig.from_preset("llama9-1t")


def test_replace_rejects_unknown_field():
    with pytest.raises(ValueError, match="n_layer"):
        LLaMAConfig.from_preset("debug").replace(n_layer=3)


def test_dict_round_trip():
    cfg = LLaMAConfig.from_preset("llama3.1-8b", dtype="bfloat16", remat_policy="full")
    assert LLaMAConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(LLaMAConfig.from_dict(cfg.to_dict()).rope_scaling, RopeScaling)
    assert hash(cfg) == hash(LLaMAConfig.from_dict(cfg.to_dict()))  # usable as a static jit argument


@pytest.mark.parametrize("variant", ["mha", "gqa_llama3", "mqa_tied"])
def test_hf_config_both_styles(variant):
    v4, v5 = hf_config_dict(variant, "v4"), hf_config_dict(variant, "v5")
    cfg = LLaMAConfig.from_hf(v4)
    assert cfg == LLaMAConfig.from_hf(v5)
    assert cfg.n_kv_heads == v4["num_key_value_heads"] and cfg.tie_embeddings == v4["tie_word_embeddings"]
    for style in ("v4", "v5"):
        out = cfg.to_hf(style)
        assert LLaMAConfig.from_hf(out) == cfg
        # transformers reads both styles to the same rotary parameters.
        hf_rope = transformers.LlamaConfig(**out).rope_parameters
        assert hf_rope["rope_theta"] == cfg.rope_theta
        assert hf_rope["rope_type"] == (cfg.rope_scaling.rope_type if cfg.rope_scaling else "default")
    assert "rope_parameters" in cfg.to_hf("v5") and "rope_theta" in cfg.to_hf("v4")


def test_hf_config_llama3_scaling_values():
    cfg = LLaMAConfig.from_hf(hf_config_dict("gqa_llama3", "v5"))
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert cfg.rope_theta == 500000.0


def test_hf_config_defaults_kv_heads_to_heads():
    d = hf_config_dict("mha")
    del d["num_key_value_heads"]
    assert LLaMAConfig.from_hf(d).n_kv_heads == d["num_attention_heads"]


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
])
def test_hf_config_unsupported_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        LLaMAConfig.from_hf({**hf_config_dict("mha"), **change})


def test_hf_config_missing_key_is_named():
    d = hf_config_dict("mha")
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        LLaMAConfig.from_hf(d)
