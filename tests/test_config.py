"""LLaMAConfig: presets, validation and Hugging Face config.json translation; experiment config files."""

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from ml_collections import ConfigDict

from llama_jax import PRESETS, LLaMAConfig, RopeScaling, param_count
from llama_jax.cli import main
from llama_jax.experiment import check_finite, check_run_settings, check_run_source, load_config, model_config
from llama_jax.train import build_trainer
from tests.reference import hf_config_dict

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
NAN, INF = float("nan"), float("inf")
LLAMA31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)

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
    (dict(norm_eps=INF), "norm_eps must be a finite number, got inf"),
    (dict(norm_eps=NAN), "norm_eps must be a finite number, got nan"),
    (dict(rope_theta=-INF), "rope_theta must be a finite number, got -inf"),
    (dict(rope_theta="1e4"), "rope_theta must be a finite number, got '1e4'"),
    (dict(rope_scaling={**LLAMA31, "factor": NAN}), "rope_scaling.factor must be a finite number, got nan"),
    (dict(rope_scaling=dict(rope_type="linear", factor=INF)), "rope_scaling.factor must be a finite number, got inf"),
    (dict(rope_scaling={**LLAMA31, "low_freq_factor": NAN}), "rope_scaling.low_freq_factor must be a finite"),
    (dict(rope_scaling={**LLAMA31, "high_freq_factor": INF}), "rope_scaling.high_freq_factor must be a fin"),
    (dict(rope_scaling={**LLAMA31, "original_max_position_embeddings": "abc"}),
     "rope_scaling.original_max_position_embeddings must be a positive integer, got 'abc'"),
    (dict(rope_theta=10**400), "rope_theta must be a finite number, got 1000"),  # past float's range (OverflowError)
])
def test_invalid_config_names_the_field(changes, field):
    base = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, ffn_dim=128)
    with pytest.raises(ValueError, match=field):
        LLaMAConfig(**{**base, **changes})


@pytest.mark.parametrize("rope_type, valid", [
    ("linear", "['factor']"),  # (it listed llama3's keys as valid for linear scaling)
    ("llama3", "['factor', 'high_freq_factor', 'low_freq_factor', 'original_max_position_embeddings']"),
])
def test_an_unknown_rope_scaling_key_lists_the_keys_of_its_type(rope_type, valid):
    with pytest.raises(ValueError, match=re.escape(f"rope_scaling: unknown key(s) ['foo']; valid for rope_type "
                                                   f"{rope_type!r}: {valid}")):
        RopeScaling.from_dict({"rope_type": rope_type, "factor": 4.0, "foo": 1})


def test_numpy_integers_and_bools_are_taken_as_pythons():
    import numpy as np

    tied = LLaMAConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, ffn_dim=128, tie_embeddings=np.True_)
    assert type(tied.tie_embeddings) is bool and json.loads(tied.to_json())["tie_embeddings"] is True  # savable
    assert LLaMAConfig.from_dict(ConfigDict(tied.to_dict())) == tied  # a mapping of another kind too

    scaling = RopeScaling("llama3", original_max_position_embeddings=np.int64(8192))  # was refused
    assert scaling == RopeScaling("llama3") and type(scaling.original_max_position_embeddings) is int
    assert LLaMAConfig(vocab_size=np.int32(128), dim=64, n_layers=2, n_heads=4, ffn_dim=128,
                       rope_scaling=scaling).to_json() == LLaMAConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4,
                                                                       ffn_dim=128, rope_scaling=scaling).to_json()


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="preset: unknown value 'llama9-1t'.*llama2-7b"):
        LLaMAConfig.from_preset("llama9-1t")


def test_replace_rejects_unknown_field():
    with pytest.raises(ValueError, match="n_layer"):
        LLaMAConfig.from_preset("debug").replace(n_layer=3)
    with pytest.raises(ValueError, match=r"unknown LLaMAConfig field\(s\) \['foo'\]; valid: \['vocab_size'"):
        LLaMAConfig.from_hf(hf_config_dict("gqa_llama3"), foo=1)


def test_numpy_integers_are_integers():
    import jax.numpy as jnp
    import numpy as np

    from llama_jax import init_params

    cfg = LLaMAConfig(vocab_size=np.int64(64), dim=np.int32(32), n_layers=np.array(1), n_heads=4, ffn_dim=64,
                      norm_eps=np.float32(1e-5))
    assert type(cfg.vocab_size) is int and type(cfg.norm_eps) is float  # stored as Python's: JSON takes them
    assert LLaMAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    first = init_params(cfg, rng=3)["embed"]["embedding"]
    for seed in (np.int64(3), jnp.int32(3)):
        assert np.array_equal(first, init_params(cfg, rng=seed)["embed"]["embedding"])


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
    # the storage dtype written is not read back: master weights stay float32 (the converter takes
    # the stored dtype from the tensors)
    stored_bf16 = cfg.replace(param_dtype="bfloat16")
    assert all(LLaMAConfig.from_hf(stored_bf16.to_hf(style)) == cfg for style in ("v4", "v5"))


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
     "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_theta": 500000.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
     "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}, "rope_scaling": {}},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}, "rope_scaling": None},
])
def test_hf_config_with_both_rope_keys_reads_as_transformers_does(rope):
    """A config.json with rope_scaling beside rope_parameters: a non-empty rope_scaling is the one
    transformers applies (it scaled the model a converter left unscaled)."""
    hf = {**hf_config_dict("mha", "v4"), **rope}
    expected = transformers.LlamaConfig(**copy.deepcopy(hf)).rope_parameters
    if expected["rope_type"] == "dynamic":
        with pytest.raises(ValueError, match="dynamic"):
            LLaMAConfig.from_hf(hf)
        return
    cfg = LLaMAConfig.from_hf(hf)
    assert cfg.rope_theta == expected["rope_theta"]
    assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == (expected["rope_type"], expected["factor"])


def test_hf_config_llama3_scaling_values():
    cfg = LLaMAConfig.from_hf(hf_config_dict("gqa_llama3", "v5"))
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert cfg.rope_theta == 500000.0


@pytest.mark.parametrize("scaling, missing", [
    ({"rope_type": "linear"}, "factor"),
    ({"type": "linear"}, "factor"),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}, "high_freq_factor, low_freq_factor, "
                                                                 "original_max_position_embeddings"),
])
def test_an_incomplete_rope_scaling_is_refused(scaling, missing):
    """Filling the gaps with LLaMA-3.1's values would change the model (transformers 4 refuses
    these; 5 takes a missing original_max_position_embeddings to be max_position_embeddings)."""
    hf = {**hf_config_dict("gqa_llama3", "v4"), "rope_scaling": scaling}
    with pytest.raises(ValueError, match=f"rope_scaling of type '{scaling.get('rope_type', 'linear')}' without "
                                         f"{missing}; it needs"):
        LLaMAConfig.from_hf(hf)


@pytest.mark.parametrize("scaling", [{"factor": 8.0}, {"rope_theta": 5e5, "factor": 8.0}])
def test_a_rope_scaling_without_a_type_is_refused(scaling):
    """(It was taken for no scaling at all, silently; an object of nothing but theta is.)"""
    hf = {**hf_config_dict("gqa_llama3", "v4"), "rope_scaling": scaling}
    with pytest.raises(ValueError, match="rope_type"):
        LLaMAConfig.from_hf(hf)
    assert LLaMAConfig.from_hf({**hf, "rope_scaling": {"rope_theta": 5e5}}).rope_scaling is None
    default = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}  # as transformers 5 writes
    assert LLaMAConfig.from_hf({**hf, "rope_scaling": default}).rope_scaling is None


@pytest.mark.parametrize("change, message", [
    ({"partial_rotary_factor": 0.5},
     "config.json: partial_rotary_factor=0.5 is not supported; LLaMA rotates whole heads"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0, "partial_rotary_factor": 0.5}},
     "config.json: rope_scaling.partial_rotary_factor=0.5 is not supported"),
    ({"rope_scaling": {"rope_type": "default", "factor": 4.0}},
     "config.json: rope_scaling of rope_type 'default' has key(s) ['factor'], which that type does not use"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 4.0}},
     "config.json: rope_parameters of rope_type 'default' has key(s) ['factor']"),
])
def test_rotary_settings_llama_does_not_compute_are_refused(change, message):
    """(A partial factor with linear scaling makes transformers fail; without, it ignores it, and
    a default type's factor: each was dropped silently.)"""
    with pytest.raises(ValueError, match=re.escape(message)):
        LLaMAConfig.from_hf({**hf_config_dict("mha"), **change})


def test_a_whole_head_partial_rotary_factor_is_accepted_with_any_rope_type():
    """transformers 5 writes partial_rotary_factor 1.0 into the rope object (it was an unknown key of a
    llama3 one)."""
    hf = hf_config_dict("gqa_llama3", "v5")
    expected = LLaMAConfig.from_hf(hf)
    hf["rope_parameters"]["partial_rotary_factor"] = 1.0
    assert LLaMAConfig.from_hf(hf) == expected
    assert LLaMAConfig.from_hf({**hf_config_dict("mha"), "partial_rotary_factor": 1}) == \
        LLaMAConfig.from_hf(hf_config_dict("mha"))


def test_hf_config_swish_is_silu():
    """transformers maps hidden_act 'swish' to the same SiLU as 'silu' (some LLaMA exports write it)."""
    import torch
    from transformers.activations import ACT2FN

    x = torch.linspace(-4, 4, 9)
    assert torch.equal(ACT2FN["swish"](x), ACT2FN["silu"](x))
    assert LLaMAConfig.from_hf({**hf_config_dict("mha"), "hidden_act": "swish"}) == LLaMAConfig.from_hf(
        hf_config_dict("mha"))


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


@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": INF}, "rms_norm_eps must be a positive number, got inf"),
    ({"rope_theta": NAN}, "rope_theta must be a positive number, got nan"),
    ({"rope_theta": None}, "rope_theta must be a positive number, got None"),
    ({"rope_theta": [10000]}, "rope_theta must be a positive number, got [10000]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}},
     "rope_parameters: rope_theta must be a positive number, got None"),
    ({"num_attention_heads": None}, "num_attention_heads must be a positive integer, got None"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"head_dim": {}}, "head_dim must be a positive integer, got {}"),
    ({"num_key_value_heads": 2.0}, "num_key_value_heads must be a positive integer, got 2.0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),  # not bool("false")
    # the model's own checks, in the file's names (they named n_kv_heads, dim, ... which the file does not have)
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=4"),
    ({"hidden_size": 63, "num_attention_heads": 3, "num_key_value_heads": 3},
     "head_dim = hidden_size / num_attention_heads = 21 must be even for rotary embeddings"),
])
def test_hf_config_values_of_the_wrong_kind_are_named(change, message):
    with pytest.raises(ValueError) as error:
        LLaMAConfig.from_hf({**hf_config_dict("mha"), **change})
    assert str(error.value) == f"config.json: {message}"


def test_hf_config_errors_name_the_files_keys_unless_an_override_is_at_fault():
    bad = {**hf_config_dict("mha"), "num_key_value_heads": 3}
    with pytest.raises(ValueError, match=r"^config.json: num_key_value_heads=3 must divide num_attention_heads=4$"):
        LLaMAConfig.from_hf(bad, param_dtype="bfloat16")  # (from_hf_state_dict passes one: the file is at fault)
    with pytest.raises(ValueError, match=r"^n_kv_heads=3 must divide n_heads=4$"):
        LLaMAConfig.from_hf(hf_config_dict("mha"), n_kv_heads=3)


# ---- experiment config files ------------------------------------------------------------------


def one_line_error(capsys) -> str:
    """The CLI's stderr, checked to be a single error line without a traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


BAD_CONFIG_FILES = {
    "syntax.py": ("x = 1\ndef get_config(:\n", "syntax.py, line 2: syntax error: "),
    "imports.py": ("import no_such_module_xyz\n",
                   "imports.py, line 1: ModuleNotFoundError while running it: No module named 'no_such_module_xyz'"),
    "raises.py": ("def get_config():\n    raise KeyError('two\\nlines')\n",
                  "raises.py, line 2: KeyError while calling get_config(): 'two\\nlines'"),
    "exits.py": ("raise SystemExit(0)\n",  # a scheduler would take exit 0 for a finished run
                 "exits.py: exited (sys.exit(0)) while running it; a config file defines get_config() and must not"),
    "exits_in_get_config.py": ("import sys\ndef get_config():\n    sys.exit(3)\n",
                               "exits_in_get_config.py: exited (sys.exit(3)) while calling get_config()"),
    "wrong_type.py": ("from llama_jax.experiment import base_config\n\n\ndef get_config():\n"
                      "    config = base_config('tiny')\n    config.train.batch_size = '16'\n    return config\n",
                      "wrong_type.py, line 6: TypeError while calling get_config(): Could not override field "
                      "'batch_size'"),  # ml_collections' error names no section: the line does
    "none.py": ("def get_config():\n    return None\n",
                "none.py: get_config() returned None; expected an ml_collections.ConfigDict"),
    "plain.py": ("def get_config():\n    return {'train': {}}\n",
                 "plain.py: get_config() returned a dict ({'train': {}}); expected an ml_collections.ConfigDict"),
    "missing.py": ("x = 1\n", "missing.py: defines no get_config()"),
    "none_section.py": ("from llama_jax.experiment import base_config\n\n\ndef get_config():\n"
                        "    config = base_config('tiny')\n    config.train = None\n    return config\n",
                        "none_section.py: config.train is None, not a section of keys; start from"),
    "broken.json": ("{not json", "broken.json: not valid JSON (Expecting property name"),
    "array.json": ("[1, 2]", "array.json: holds a list ([1, 2]), not a JSON object of config sections"),
    "hf.json": ('{"model_type": "llama", "hidden_size": 64}',
                "hf.json: the config has no checkpoint, data, mesh, model, optimizer, train section(s)"),
    "partial_section.py": ("from llama_jax.experiment import base_config\n\n\ndef get_config():\n"
                           "    config = base_config('tiny')\n    config.mesh = {'data': 1, 'fsdp': -1}\n"
                           "    return config\n",  # was a traceback (AttributeError: 'tensor')
                           "partial_section.py: config.mesh has no tensor; start from "
                           "llama_jax.experiment.base_config() and set the keys to change"),
    "sectionless.py": ("import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict()\n",
                       "sectionless.py: the config has no checkpoint, data, mesh, model, optimizer, train section(s)"),
    "config.yaml": ("train: {}", "config.yaml: not a config file; expected a .py file defining get_config() (or the config.json"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIG_FILES))
def test_bad_config_file_is_one_line(name, tmp_path, capsys):
    text, message = BAD_CONFIG_FILES[name]
    (tmp_path / name).write_text(text)
    assert main(["train", "--config", str(tmp_path / name), "--workdir", str(tmp_path / "w")]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"llama-jax train: error: {tmp_path / name}") and message in err, err
    assert not (tmp_path / "w").exists()


def test_a_mesh_size_of_true_in_a_file_is_refused(tmp_path, capsys):
    """True is an int to Python (and to ml_collections' type check): it made a mesh of size 1 and
    then a TypeError traceback from NumPy."""
    (tmp_path / "mesh.py").write_text("from llama_jax.experiment import base_config\n\n\ndef get_config():\n"
                                      "    config = base_config('tiny')\n    config.mesh.tensor = True\n"
                                      "    return config\n")
    assert main(["train", "--config", str(tmp_path / "mesh.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert one_line_error(capsys) == ("llama-jax train: error: mesh.tensor=True: must be a positive integer or -1 "
                                      "(all remaining devices)")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("line, message", [
    ("config.checkpoint = {**config.checkpoint.to_dict(), 'init_from': 5}",  # (a TypeError traceback)
     "checkpoint.init_from must be a model directory's path (a string; '' for none), got an int (5)"),
    ("config.optimizer = {**config.optimizer.to_dict(), 'lr': {'warmup': 1e-4, 'peak': 3e-4}}",  # (in two lines)
     "config key optimizer.lr is a setting, not a section of keys; got {'peak': 0.0003, 'warmup': 0.0001}")])
def test_a_file_setting_of_the_wrong_kind_is_one_line(line, message, tmp_path, capsys):
    (tmp_path / "kind.py").write_text(f"from llama_jax.experiment import base_config\n\n\ndef get_config():\n"
                                      f"    config = base_config('tiny')\n    {line}\n    return config\n")
    assert main(["train", "--config", str(tmp_path / "kind.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert one_line_error(capsys) == f"llama-jax train: error: {message}"
    assert not (tmp_path / "w").exists()


def test_a_mixture_that_is_not_a_dict_is_named(tmp_path, capsys):
    """A file's data section set whole, its mixture a list: the line took the list's first item
    for a name that is not a string."""
    (tmp_path / "mix.py").write_text("from llama_jax.experiment import base_config\n\n\ndef get_config():\n"
                                     "    config = base_config('tiny')\n    data = config.data.to_dict()\n"
                                     "    data.update(source='prepared', mixture=[{'path': '/d', 'weight': 1}])\n"
                                     "    config.data = data\n    return config\n")
    assert main(["plan", "--config", str(tmp_path / "mix.py")]) == 2
    assert one_line_error(capsys).startswith("llama-jax plan: error: data.mixture is a list; give a dict of names, "
                                             "e.g. {'web': {'path': '/data/web', 'weight': 0.8}")


def test_a_config_file_with_an_argument_is_named(tmp_path, capsys):
    """ml_collections' FILE:ARG form: the line said only that no such file exists."""
    assert main(["plan", "--config", f"{TINY}:small"]) == 2
    assert one_line_error(capsys) == (f"llama-jax plan: error: config file {TINY}:small not found; llama-jax calls "
                                      f"get_config() without an argument, so give --config {TINY} and set keys with "
                                      f"--config.KEY=VALUE instead of :small")


def test_config_directory_is_named(tmp_path, capsys):
    assert main(["plan", "--config", str(tmp_path)]) == 2
    assert one_line_error(capsys) == (f"llama-jax plan: error: {tmp_path}: is a directory; "
                                      "expected a Python config file such as configs/tiny.py")


def test_run_config_json_loads_back_and_takes_overrides(tmp_path):
    overrides = ["optimizer.lr=1", "data.files=['a.txt']", "mesh.fsdp=2", "model.rope_theta=5e5"]
    config = load_config(TINY)
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    assert load_config(tmp_path / "config.json").to_dict() == config.to_dict()
    loaded = load_config(tmp_path / "config.json", overrides)
    assert loaded.to_dict() == load_config(TINY, overrides).to_dict()
    assert type(loaded.optimizer.lr) is float and loaded.data.files == ["a.txt"]
    with pytest.raises(ValueError, match="config key 'train.steps' is int"):
        load_config(tmp_path / "config.json", ["train.steps=abc"])


def test_an_older_runs_config_json_takes_the_defaults_of_keys_added_since(tmp_path):
    saved = load_config(TINY).to_dict()
    del saved["train"]["on_nonfinite"], saved["checkpoint"]["keep_every"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_config(tmp_path / "config.json", ["train.on_nonfinite=skip"])
    assert loaded.train.on_nonfinite == "skip" and loaded.checkpoint.keep_every == 0
    check_run_settings(loaded)


def test_a_decimal_key_a_config_json_gives_as_a_whole_number_takes_a_decimal(tmp_path):
    """A run's config.json edited to `"weight_decay": 0` (JSON's whole number): the override
    --config.optimizer.weight_decay=0.1 was refused ("config key 'optimizer.weight_decay' is int")."""
    saved = load_config(TINY).to_dict()
    saved["optimizer"]["weight_decay"], saved["train"]["z_loss"] = 0, 0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_config(tmp_path / "config.json", ["optimizer.weight_decay=0.1", "train.z_loss=1e-4"])
    assert (loaded.optimizer.weight_decay, loaded.train.z_loss) == (0.1, 1e-4)


def test_a_config_files_own_forms(tmp_path):
    """What a Python config file may do: link keys (an override of one sets both, and overrides
    that cannot both hold are refused), return a FrozenConfigDict, import a module beside it."""
    (tmp_path / "shapes.py").write_text("STEPS = 40\n")
    (tmp_path / "mine.py").write_text(
        "import ml_collections\nfrom shapes import STEPS\nfrom llama_jax.experiment import base_config\n\n\n"
        "def get_config():\n    config = base_config()\n    config.train.steps = STEPS\n"
        "    config.checkpoint.every = config.train.get_ref('steps')\n    return config\n\n\n"
        "def get_frozen():\n    return ml_collections.FrozenConfigDict(get_config())\n")
    (tmp_path / "frozen.py").write_text("from mine import get_frozen as get_config\n")
    assert load_config(tmp_path / "frozen.py", ["train.steps=100"]).train.steps == 100
    linked = load_config(tmp_path / "mine.py", ["train.steps=100"])
    assert (linked.train.steps, linked.checkpoint.every) == (100, 100)  # the link the file made holds
    with pytest.raises(ValueError, match=r"^--config.checkpoint.every=50 also changed train.steps, which the config "
                                         r"file links to it \(get_ref\), so --config.train.steps=100 cannot hold"):
        load_config(tmp_path / "mine.py", ["train.steps=100", "checkpoint.every=50"])
    both = load_config(tmp_path / "mine.py", ["train.steps=100", "checkpoint.every=100"])
    assert (both.train.steps, both.checkpoint.every) == (100, 100)
    # the last values are what count: a linked key's value given on the way is not checked
    last = load_config(tmp_path / "mine.py", ["train.steps=100", "checkpoint.every=50", "checkpoint.every=100"])
    assert (last.train.steps, last.checkpoint.every) == (100, 100)
    with pytest.raises(ValueError, match=r"^--config.checkpoint.every=30 also changed train.steps, .* so "
                                         r"--config.train.steps=100 cannot hold"):
        load_config(tmp_path / "mine.py", ["train.steps=100", "checkpoint.every=100", "checkpoint.every=30"])
    # a key computed from others fails only with the values given: named, not a traceback from ml_collections
    (tmp_path / "computed.py").write_text(
        "from mine import get_config as mine\n\n\ndef get_config():\n    config = mine()\n"
        "    config.optimizer.warmup_steps = config.train.get_ref('steps') // config.train.get_ref('grad_accum')\n"
        "    return config\n")
    assert load_config(tmp_path / "computed.py", ["train.grad_accum=4"]).optimizer.warmup_steps == 10
    with pytest.raises(ValueError, match=r"^config key optimizer.warmup_steps, which the config file computes from "
                                         r"other keys \(get_ref\), cannot be computed with the values given "
                                         r"\(ZeroDivisionError: integer division or modulo by zero\)"):
        load_config(tmp_path / "computed.py", ["train.grad_accum=0"])
    overridden = load_config(tmp_path / "computed.py", ["train.grad_accum=0", "optimizer.warmup_steps=5"])
    assert overridden.optimizer.warmup_steps == 5  # replaced before it was computed: its check is grad_accum's
    # an unknown key under a section holding such a key names the sections there, not the value's error
    with pytest.raises(ValueError, match=r"^unknown config key 'optimizer.warmup' \(in override "
                                         r"'optimizer.warmup.x=1'\); valid sections of optimizer: none$"):
        load_config(tmp_path / "computed.py", ["train.grad_accum=0", "optimizer.warmup.x=1"])
    # a dataclass of the file's own, annotations postponed: dataclasses look the module up in sys.modules, where
    # it was not ("line 8: AttributeError while running it: 'NoneType' object has no attribute '__dict__'")
    (tmp_path / "sizes.py").write_text(
        "from __future__ import annotations\n\nimport dataclasses\n\nfrom llama_jax.experiment import base_config\n"
        "\n\n@dataclasses.dataclass\nclass Size:\n    dim: int\n\n\ndef get_config():\n"
        "    return base_config('debug', dim=Size(32).dim)\n")
    assert load_config(tmp_path / "sizes.py").model.dim == 32
    # a section the file froze takes overrides (a traceback: "FrozenConfigDict is immutable"), its links kept
    (tmp_path / "frozen_section.py").write_text(
        "import ml_collections\nfrom mine import get_config as mine\n\n\ndef get_config():\n    config = mine()\n"
        "    config.model = ml_collections.FrozenConfigDict(config.model)\n    return config\n")
    thawed = load_config(tmp_path / "frozen_section.py", ["model.dim=32", "train.steps=100"])
    assert (thawed.model.dim, thawed.checkpoint.every) == (32, 100)
    assert str(tmp_path) not in sys.path and "llama_jax_config_sizes" not in sys.modules


def test_a_value_config_json_cannot_record_is_refused(tmp_path, capsys):
    """A NumPy scalar set by a config file trained, but the run's config.json recorded it as text
    ("unserializable object: 1e-05"), so `--config DIR/config.json` refused the run it wrote."""
    head = ("import numpy as np\nfrom llama_jax.config import RopeScaling\n"
            "from llama_jax.experiment import base_config\n")
    for name, line, message in (
            ("eps.py", "config.model.norm_eps = np.float32(1e-5)",
             "config key model.norm_eps holds a float32 (np.float32(1e-05)), which the run's config.json cannot "
             "record; give a Python value (int(x), float(x), bool(x), a string, or a list or dict of them)"),
            ("tied.py", "config.model.tie_embeddings = np.bool_(True)", "config key model.tie_embeddings holds a bool"),
            ("files.py", "config.data.files = ['a.txt', np.str_('b.txt'), {'c.txt'}]",
             "config key data.files[2] holds a set ({'c.txt'})")):
        (tmp_path / name).write_text(f"{head}\n\ndef get_config():\n    config = base_config('tiny')\n    {line}\n"
                                     f"    return config\n")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            load_config(tmp_path / name)
    assert main(["train", "--config", str(tmp_path / "eps.py"), "--workdir", str(tmp_path / "w")]) == 2
    assert one_line_error(capsys).startswith("llama-jax train: error: config key model.norm_eps holds a float32")
    assert not (tmp_path / "w").exists()
    # what config.json records as it is: a NumPy float64 (a float), a RopeScaling (as its dict)
    (tmp_path / "fine.py").write_text(f"{head}\n\ndef get_config():\n    config = base_config('tiny')\n"
                                      f"    config.model.rope_scaling = RopeScaling('linear', 2.0)\n"
                                      f"    config.model.rope_theta = np.float64(5e5)\n    return config\n")
    config = load_config(tmp_path / "fine.py")
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    assert model_config(load_config(tmp_path / "config.json").model) == model_config(config.model)


def test_experiment_api_arguments_of_the_wrong_kind_are_refused():
    import jax
    import numpy as np

    # a string was read as overrides of one character each ("override 't': expected key=value")
    with pytest.raises(TypeError, match=r"^overrides must be a list of 'key=value' strings "
                                        r"\(e.g. \['train.steps=5'\]\), got the string 'train.steps=5'$"):
        load_config(TINY, "train.steps=5")
    with pytest.raises(TypeError, match=r"^overrides must be .*, got 5 among them$"):
        load_config(TINY, ["train.steps=5", 5])
    assert load_config(TINY, (o for o in ["train.steps=5"])).train.steps == 5  # any iterable of strings
    config = load_config(TINY, ["model.dim=32", "model.n_layers=1", "model.ffn_dim=64", "train.batch_size=8"])
    for call, error, message in (
            (lambda: build_trainer(config.to_dict()), TypeError,
             r"^config must be an experiment config \(llama_jax.experiment.load_config\(path, overrides\)\), "
             r"got dict$"),
            (lambda: build_trainer(config, devices=[]), TypeError, r"^devices must be a list of JAX devices"),
            (lambda: build_trainer(config, devices=1), TypeError,
             r"^devices must be a list of JAX devices \(e.g. jax.devices\(\)\[:4\]\), got 1$"),
            (lambda: build_trainer(config, devices=jax.devices()[:1]).init_state(2**32 + 5), ValueError,
             r"^seed must be an integer in \[0, 2\*\*32\), got 4294967301$"),  # was seed 5's state
            (lambda: build_trainer(config, devices=jax.devices()[:1]).init_state(1.5), ValueError,
             r"^seed must be an integer in \[0, 2\*\*32\), got 1.5$")):
        with pytest.raises(error, match=message):
            call()
    assert build_trainer(config, devices=np.array(jax.devices()[:2])).mesh.size == 2  # an array of them too


def test_string_and_mapping_overrides():
    config = load_config(TINY, ["train.sample_prompt=1984", "data.mixture={'a': {'path': '/d', 'weight': 2}}"])
    assert config.train.sample_prompt == "1984"
    assert load_config(TINY, ["train.sample_prompt=1e-400"]).train.sample_prompt == "1e-400"  # text, not a float
    assert config.data.mixture.to_dict() == {"a": {"path": "/d", "weight": 2}}
    cleared = load_config(TINY, ["data.mixture={'a': {'path': '/d', 'weight': 2}}", "data.mixture={}"])
    assert cleared.data.mixture.to_dict() == {}
    # a whole value given after an override inside it replaces both (it crashed with a KeyError)
    replaced = load_config(TINY, ["data.mixture={'a': {'path': '/d', 'weight': 1}}", "data.mixture.a.weight=2",
                                  "data.mixture={'b': {'path': '/e', 'weight': 1}}"])
    assert replaced.data.mixture.to_dict() == {"b": {"path": "/e", "weight": 1}}
    unscaled = load_config(TINY, ["model.rope_scaling={'rope_type': 'linear', 'factor': 2.0}",
                                  "model.rope_scaling.factor=3.0", "model.rope_scaling=None"])
    assert unscaled.model.rope_scaling is None
    # rope_scaling given whole replaces a dict it holds (from the file, a run's config.json or an earlier
    # override: it said "is ConfigDict")
    llama3 = "{'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, " \
             "'original_max_position_embeddings': 8192}"
    rescaled = load_config(TINY, ["model.rope_scaling={'rope_type': 'linear', 'factor': 2.0}",
                                  f"model.rope_scaling={llama3}"])
    assert model_config(rescaled.model).rope_scaling == RopeScaling("llama3")
    # a decimal field holding a whole number takes a decimal later (it said "is int")
    assert load_config(TINY, ["model.rope_theta=500000", "model.rope_theta=1e6"]).model.rope_theta == 1e6
    assert load_config(TINY, ["data.mixture={'a': {'path': '/d', 'weight': 1}}", "data.mixture.a.weight=0.5"]
                       ).data.mixture.a.weight == 0.5
    with pytest.raises(ValueError, match=r"config key 'train.steps' is int, got '3.5' \(float\)"):
        load_config(TINY, ["train.steps=3.5"])  # a count stays a count
    # names are strings: config.json writes a number as one, and sources are ordered by name
    for mixture in ("{2: {'path': '/d', 'weight': 1}}", "{1: {'path': '/d', 'weight': 1}, 'b': {'path': '/e'}}"):
        with pytest.raises(ValueError, match=r"^data.mixture: every name must be a string \(quote it"):
            load_config(TINY, [f"data.mixture={mixture}"])
    with pytest.raises(ValueError, match=r"^data.mixture: a name may not contain a dot .*, got 'c4.en'$"):
        load_config(TINY, ["data.mixture={'c4.en': {'path': '/d', 'weight': 1}}"])


@pytest.mark.parametrize("override, message", [
    ("checkpoint.async_save=None", "checkpoint.async_save must be True or False, got None"),
    ("train.sample_prompt=None", "train.sample_prompt must be a string, got None ('' for none; for the text None, "
                                 "quote it: \"--config.train.sample_prompt='None'\")"),
    ("model=None", "config key 'model' is a section and cannot be None; set its keys (--config.model.KEY=VALUE)"),
    ("data=null", "config key 'data' is a section and cannot be None; set its keys (--config.data.KEY=VALUE)"),
    # (it said "config key 'mesh' is ConfigDict, got '8' (int)", naming nothing a user could set)
    ("mesh=8", "config key 'mesh' is a section of keys (data, fsdp, tensor), not a setting; set one of them: "
               "--config.mesh.KEY=VALUE"),
    ("data.files=[1,2]", "data.files must be a list of paths or glob patterns (strings), got [1, 2]"),
    ("train.steps=1e3", "config key 'train.steps' is int, got '1e3' (float); give a whole number: "
                        "--config.train.steps=1000"),
    # (a traceback from ml_collections, which orders the names; a dotted one, its error naming no key)
    ("model.rope_scaling={'rope_type': 'linear', 'factor': 2.0, 1: 2}",
     "model.rope_scaling: every name must be a string (quote it, e.g. {'2': ...}), got 1"),
    ("model.rope_scaling={'rope_type': 'linear', 'factor': 2.0, 'a.b': 2}",
     "model.rope_scaling: a name may not contain a dot (it would read as a key inside it), got 'a.b'"),
    # (it said "model.rope_scaling must be a RopeScaling, a dict or None", a type no override gives)
    ("model.rope_scaling={'rope_type': 'linear', 'factor': 2.0",
     "config key 'model.rope_scaling' takes a Python dict or None, got \"{'rope_type': 'linear', 'factor': 2.0\" "
     "(str); give a Python dict: \"--config.model.rope_scaling={'rope_type': 'linear', 'factor': 2.0}\""),
    ("data.eval_fraction=None", "data.eval_fraction must be a number with 0 <= eval_fraction < 1, got None"),
    ("data.tokenizer=None", "data.tokenizer must be a string, got None ('' for none; for the text None, quote it: "
                            "\"--config.data.tokenizer='None'\")"),
    ("data.text_key=None", "data.text_key must be a string, got None (for the text None, quote it: "
                           "\"--config.data.text_key='None'\")"),  # '' names no field
    # a key of another source than data.source (synthetic here): the run would not train on it
    ("data.mixture={'a': {'path': '/d', 'weight': 1}}", "data.mixture is set, but data.source=synthetic does not "
                                                        "read it; set data.source=prepared to train on it, or "
                                                        "data.mixture={}"),
    ("data.path=/d", "data.path is set, but data.source=synthetic does not read it; set data.source=prepared to "
                     "train on it, or data.path=''"),
    ("data.files=['a.txt']", "data.files is set, but data.source=synthetic does not read it; set data.source=text "
                             "or jsonl to train on it, or data.files=[]"),
    ("data.tfds_name=c4", "data.tfds_name is set, but data.source=synthetic does not read it; set data.source=tfds "
                          "to train on it, or data.tfds_name=''"),
])
def test_values_of_the_wrong_kind_are_refused_before_the_run(override, message, tmp_path, capsys):
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), f"--config.{override}"]) == 2
    assert one_line_error(capsys) == f"llama-jax train: error: {message}"
    assert not (tmp_path / "w").exists()


def test_an_override_without_its_value_does_not_take_the_next_option(tmp_path, capsys):
    """`--config.KEY VALUE` took the next option as the value: `--config.train.sample_prompt --dry-run`
    set the prompt to "--dry-run" and the sweep ran its trials instead of printing them."""
    command = ["sweep", "--config", TINY, "--workdir", str(tmp_path / "w"), "--sweep", "optimizer.lr=[1e-3]",
               "--config.train.sample_prompt", "--dry-run"]
    assert main(command) == 2
    assert one_line_error(capsys) == ("llama-jax: error: --config.train.sample_prompt: missing value; give a value "
                                      "that starts with '--' as --config.train.sample_prompt=VALUE")
    assert not (tmp_path / "w").exists()
    assert main(["plan", "--config", TINY, "--config.train.sample_prompt", "--"]) == 2  # (launch's separator)
    assert one_line_error(capsys).startswith("llama-jax: error: --config.train.sample_prompt: missing value")
    assert main(["plan", "--config", TINY, "--config.train.sample_prompt=--dry-run", "--config.mesh.fsdp", "-1",
                 "--config.train.sample_prompt", "-x"]) == 0  # given with '=', or not an option: a value
    capsys.readouterr()


def test_prepared_data_may_keep_the_settings_of_the_source_it_came_from():
    """A config whose raw source was prepared (as a sweep does) trains on the prepared directory."""
    check_run_source(load_config(TINY, ["data.source=prepared", "data.path=/d", "data.files=['a.txt']",
                                        "data.tfds_name=c4"]).data)


@pytest.mark.parametrize("override, message", [
    ("model.rope_theta=nan", "config key model.rope_theta: nan is not a finite number"),
    ("optimizer.lr=inf", "config key optimizer.lr: inf is not a finite number"),
    ("optimizer.b1=-Infinity", "config key optimizer.b1: -inf is not a finite number"),
    ("train.z_loss=NaN", "config key train.z_loss: nan is not a finite number"),
    ("optimizer.lr=1e-400", "config key 'optimizer.lr': 1e-400 is too small for a float (it would be 0.0); give 0 if "
                            "that is meant"),  # (was a learning rate of 0, without a word)
    ("optimizer.eps=1e-40", "config key optimizer.eps: 1e-40 is below float32's smallest normal number (1.2e-38), so "
                            "training would compute with 0; give a value of a usual size"),
    # (was a NaN loss from the second step: 0/0 on the parameters whose gradient is 0)
    ("optimizer.clip_norm=1e-40", "config key optimizer.clip_norm: 1e-40 is below float32's smallest normal number "
                                  "(1.2e-38), so training would compute with 0; give a value of a usual size"),
    # (was every update clipped to 0: a run that trained nothing)
])
def test_nonfinite_override_names_the_key(override, message, tmp_path, capsys):
    with pytest.raises(ValueError) as err:
        load_config(TINY, [override])
    assert str(err.value) == message
    assert main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), f"--config.{override}"]) == 2
    assert one_line_error(capsys) == f"llama-jax train: error: {message}"


def test_nonfinite_values_in_files_are_found_at_any_depth(tmp_path):
    (tmp_path / "inf.py").write_text("from llama_jax.experiment import base_config\n\n\ndef get_config():\n"
                                     "    config = base_config()\n    config.optimizer.eps = float('inf')\n"
                                     "    return config\n")
    with pytest.raises(ValueError, match=r"^config key optimizer.eps: inf is not a finite number$"):
        load_config(tmp_path / "inf.py")
    text = load_config(TINY).to_json_best_effort(indent=2)
    (tmp_path / "config.json").write_text(text.replace('"z_loss": 0.0', '"z_loss": NaN'))
    with pytest.raises(ValueError, match=r"^config key train.z_loss: nan is not a finite number$"):
        load_config(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"^config key a.b\[1\].c: -inf is not a finite number$"):
        check_finite(ConfigDict({"a": {"b": [1.0, {"c": -INF}]}, "d": "nan"}))


def test_demo_and_trainer_check_the_same_way(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--config.optimizer.weight_decay=inf"]) == 2
    assert one_line_error(capsys) == "llama-jax demo: error: config key optimizer.weight_decay: inf is not a finite number"
    assert not (tmp_path / "demo").exists()
    config = load_config(TINY)
    config.optimizer.clip_norm = NAN  # built in Python, not loaded: the trainer checks it too
    with pytest.raises(ValueError, match=r"^config key optimizer.clip_norm: nan is not a finite number$"):
        build_trainer(config)


def test_the_demo_refuses_synthetic_data_before_it_trains(tmp_path, capsys):
    """The demo ends by generating text from its export; on random tokens there is no tokenizer for
    that, and it failed there, once trained, with generate's "pass --tokenizer PATH"."""
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--config.data.source=synthetic", "--config.train.eval_every=0",
                 "--config.train.sample_every=0"]) == 2
    assert one_line_error(capsys) == (
        "llama-jax demo: error: data.source=synthetic draws random tokens without a tokenizer, and the demo ends by "
        "generating text from its export; give it documents (its default: data.source=stdlib)")
    assert not workdir.exists()


def test_init_from_preset_takes_the_model_but_not_its_storage_dtype(tmp_path):
    """A converted bfloat16 checkpoint stores bfloat16 parameters; fine-tuned with its model as the
    preset, the master weights (and Adam's moments) must not become bfloat16 too."""
    from llama_jax import init_params, save_model

    stored = LLaMAConfig.from_preset("debug", param_dtype="bfloat16", dtype="bfloat16", scan_layers=False,
                                     rope_theta=500000.0)
    save_model(tmp_path / "model", stored, init_params(stored, 0))
    taken = model_config(ConfigDict({"preset": "init_from"}), str(tmp_path / "model"))
    assert taken == stored.replace(param_dtype="float32", dtype="float32", scan_layers=True)
    assert model_config(ConfigDict({"preset": "init_from", "dtype": "bfloat16", "n_layers": None}),
                        str(tmp_path / "model")) == taken.replace(dtype="bfloat16")


PLANNED_CONFIGS = sorted(p.name for p in Path(TINY).parent.glob("*.py") if "llama-jax plan" in p.read_text())


@pytest.mark.parametrize("name", PLANNED_CONFIGS)
def test_the_plan_command_in_a_config_docstring_runs_and_agrees_with_it(name):
    """The `llama-jax plan ... --devices N` of each config's docstring is accepted on CPU (that of
    llama3_8b_v5p.py was refused: it read an init_from that exists only on the TPU's bucket), and the
    tokens per step the docstring gives are the plan's."""
    root = Path(TINY).parents[1]
    text = (root / "configs" / name).read_text()
    line = next(line.strip() for line in text.splitlines() if line.strip().startswith("llama-jax plan "))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "llama_jax.cli", *shlex.split(line)[1:]], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens = int(re.search(r"([\d,]+) tokens per step", done.stdout).group(1).replace(",", ""))
    claimed = re.search(r"\((\d+)M tokens/step", text)
    assert claimed and int(claimed.group(1)) == round(tokens / 2**20), (claimed, tokens)


def test_the_llama2_v4_config_keeps_activations_a_v4_chip_holds():
    """remat_policy=dots_no_batch keeps every projection's output (q, k, v, o, gate, up, down) of
    every layer for the backward. At 4 micro-batches the config gave each of the v4-32's 16 chips 16
    rows of 4,096 tokens: 166 GiB kept in bf16, on chips of 32 GiB (a plan on CPU devices said 455
    GiB, taken for the CPU's attention kernel). The docstring's figure: 10.4 GiB at one row per chip."""
    path = Path(TINY).parent / "llama2_7b_v4_32.py"
    config = load_config(path)
    model, t = model_config(config.model), config.train
    assert (model.remat_policy, model.dtype) == ("dots_no_batch", "bfloat16")
    tokens_per_chip = t.batch_size // t.grad_accum // 16 * t.seq_len
    outputs = model.head_dim * (model.n_heads + 2 * model.n_kv_heads) + 2 * model.dim + 2 * model.ffn_dim
    kept = tokens_per_chip * outputs * 2 * model.n_layers
    assert round(kept / 2**30, 1) == 10.4 and "10.4 GiB per chip" in path.read_text()
    assert kept < 32 * 2**30 / 2  # half a v4 chip: the state, gradients and logits need the rest
