"""In-memory Hugging Face state dict <-> params mapping."""

import numpy as np
import pytest

from llama_jax import LLaMAConfig, from_hf_state_dict, init_params, to_hf_state_dict
from llama_jax.model import unstack_layers
from tests.reference import hf_config_dict, make_hf_model, state_dict_numpy


@pytest.fixture(scope="module")
def tied():
    hf_config = hf_config_dict("mqa_tied")
    return hf_config, state_dict_numpy(make_hf_model(hf_config))


def test_round_trip_is_bit_exact():
    cfg = LLaMAConfig.from_hf(hf_config_dict("gqa_llama3"))
    params = init_params(cfg, 1)
    state = to_hf_state_dict(cfg, params)
    cfg2, params2 = from_hf_state_dict(state, cfg.to_hf())
    assert cfg2 == cfg
    for a, b in zip(*(sorted(_flat(p).items()) for p in (params, params2))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1]), b[1])
    # Unscanned params map to the same tensors, and come back unscanned when the config says so.
    unscanned = to_hf_state_dict(cfg, unstack_layers(params, cfg.n_layers))
    assert all(np.array_equal(unscanned[k], state[k]) for k in state)
    cfg3, params3 = from_hf_state_dict(state, cfg.to_hf(), scan_layers=False)
    assert not cfg3.scan_layers and sorted(params3) == sorted(unstack_layers(params, cfg.n_layers))
    np.testing.assert_array_equal(params3["layers_1"]["attn"]["q"]["kernel"],
                                  np.asarray(params["layers"]["attn"]["q"]["kernel"][1]))


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", 3, r"parameter \['layers'\]\['attn'\]\['k'\]\['kernel'\] has shape \(2, "),  # no layer 2 to read
    ("n_layers", 1, r"has shape \(2, .*config expects \(1, "),  # layer 1 would be dropped
    ("ffn_dim", 48, r"has shape .*config expects"),
])
def test_params_that_do_not_fit_the_config_are_refused(field, value, message):
    cfg = LLaMAConfig.from_hf(hf_config_dict("gqa_llama3"))
    params = init_params(cfg, 1)
    with pytest.raises(ValueError, match=message):
        to_hf_state_dict(cfg.replace(**{field: value}), params)


def test_tied_model_with_and_without_lm_head(tied):
    hf_config, state = tied
    assert "lm_head.weight" in state  # model.state_dict() lists the tied weight
    cfg, with_head = from_hf_state_dict(state, hf_config)
    hub_style = {k: v for k, v in state.items() if k != "lm_head.weight"}
    _, without_head = from_hf_state_dict(hub_style, hf_config)
    assert "lm_head" not in with_head
    np.testing.assert_array_equal(with_head["embed"]["embedding"], without_head["embed"]["embedding"])
    assert "lm_head.weight" not in to_hf_state_dict(cfg, with_head)


def test_hf_layout_matches_reference_state_dict(tied):
    hf_config, state = tied
    cfg, params = from_hf_state_dict(state, hf_config)
    back = to_hf_state_dict(cfg, params)
    assert set(back) == set(state) - {"lm_head.weight"}
    for name, array in back.items():
        assert array.shape == state[name].shape and array.flags.c_contiguous
        np.testing.assert_array_equal(array, state[name])


def test_bfloat16_params(tied):
    import ml_dtypes

    hf_config, state = tied
    cfg, params = from_hf_state_dict(state, hf_config, param_dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and params["embed"]["embedding"].dtype == ml_dtypes.bfloat16


def test_missing_tensor_is_named(tied):
    hf_config, state = tied
    state = dict(state)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf_state_dict(state, hf_config)


def test_extra_tensor_is_named(tied):
    hf_config, state = tied
    state = {**state, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        from_hf_state_dict(state, hf_config)


def test_misshaped_tensor_names_both_shapes(tied):
    hf_config, state = tied
    state = {**state, "model.layers.2.self_attn.k_proj.weight": np.zeros((32, 64), np.float32)}
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight has shape \(32, 64\), "
                                         r"config expects \(16, 64\)"):
        from_hf_state_dict(state, hf_config)


def test_weights_that_are_no_floats_or_beyond_the_dtype_are_named(tied):
    """An integer or complex tensor was cast (a complex one lost its imaginary part with a warning),
    and a value beyond float16's range became inf."""
    hf_config, state = tied
    norm = state["model.norm.weight"]
    for dtype in (np.int32, np.complex64):
        with pytest.raises(ValueError, match=rf"^model\.norm\.weight has dtype {np.dtype(dtype).name}; weights are one "
                                             rf"of float32, float16, bfloat16, float64$"):
            from_hf_state_dict({**state, "model.norm.weight": norm.astype(dtype)}, hf_config)
    large = {**state, "model.norm.weight": np.full_like(norm, 7e4)}
    with pytest.raises(ValueError, match=r"^tensor model\.norm\.weight holds 70000, beyond float16's range"):
        from_hf_state_dict(large, hf_config, param_dtype="float16")
    assert from_hf_state_dict(large, hf_config, param_dtype="bfloat16")[1]["final_norm"]["scale"].max() == 70144


def test_derived_rotary_buffers_are_ignored(tied):
    hf_config, state = tied
    state = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    from_hf_state_dict(state, hf_config)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
