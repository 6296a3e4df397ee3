"""Meta's checkpoint layout (params.json + consolidated.NN.pth): parity with transformers, round trips, bad input.

Fixtures are Meta-format directories this file builds itself from tiny transformers models, with
its own name table, rotary reordering and shard splitting, so that `llama_jax.convert.meta` is
checked against an independent statement of the layout rather than against itself.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch

from llama_jax import LLaMA, LLaMAConfig, RopeScaling, from_hf_state_dict
from llama_jax.cli import main
from llama_jax.signals import Terminated
from llama_jax.convert.hf import tensor_specs
from llama_jax.convert.meta import read_meta, write_meta
from llama_jax.convert.source import ConversionError
from tests.reference import hf_config_dict, hf_logits, make_hf_model, state_dict_numpy

PARITY_TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 20)).astype(np.int32)

# Each case: (reference variant, HF config overrides, params.json keys, embedding split axis).
# FFN widths are ones Meta's formula produces: dim 64 gives int(2*256/3) = 170, dim 128 gives 341.
CASES = {
    # LLaMA-2: multi-head attention, embedding split along the model dim. 170 -> multiple of 32 -> 192.
    "llama2": ("mha", dict(intermediate_size=192),
               dict(multiple_of=32, norm_eps=1e-5, vocab_size=256), 1),
    # LLaMA-1: vocab_size -1, norm_eps 1e-6, no n_kv_heads key.
    "llama1": ("mha", dict(intermediate_size=192, rms_norm_eps=1e-6),
               dict(multiple_of=64, norm_eps=1e-6, vocab_size=-1), 1),
    # LLaMA-3.1: GQA, vocabulary split, theta 500000, scaled rope. int(341 * 1.3) = 443 -> multiple of 64 -> 448.
    "llama3": ("gqa_llama3", dict(intermediate_size=448),
               dict(multiple_of=64, ffn_dim_multiplier=1.3, n_kv_heads=2, norm_eps=1e-5, rope_theta=500000.0,
                    use_scaled_rope=True, vocab_size=256), 0),
    # Multi-query attention, tied embeddings (no output.weight). int(170 * 0.75) = 127 -> multiple of 32 -> 128.
    "mqa_tied": ("mqa_tied", dict(intermediate_size=128),
                 dict(multiple_of=32, ffn_dim_multiplier=0.75, n_kv_heads=1, norm_eps=1e-6, vocab_size=256), 1),
}
# Meta's params.json has no field for it: LLaMA-3.1 scaling always uses an original context of 8192.
LLAMA3_ROPE = dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)


@functools.cache
def reference(case: str):
    """(HF config dict, transformers model, HF state dict) for a case."""
    variant, overrides, _, _ = CASES[case]
    hf_config = {**hf_config_dict(variant, "v5"), **overrides}
    if case == "llama3":
        hf_config["rope_parameters"] = {**LLAMA3_ROPE, "rope_theta": 500000.0}
    model = make_hf_model(hf_config)
    return hf_config, model, state_dict_numpy(model)


# ---- the test's own statement of Meta's layout ------------------------------------------------

HF_TO_META = [  # substring replacements, applied in order
    ("model.embed_tokens.", "tok_embeddings."), ("model.norm.", "norm."), ("lm_head.", "output."),
    ("model.layers.", "layers."), ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
    ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
    ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attention_norm"),
]
SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def meta_name(hf_name: str) -> str:
    for old, new in HF_TO_META:
        hf_name = hf_name.replace(old, new)
    return hf_name


def rotate_half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta row 2i of a head is HF row i, Meta row 2i+1 is HF row i + Dh/2."""
    head_dim = w.shape[0] // n_heads
    half = head_dim // 2
    order = np.empty(head_dim, int)
    order[0::2], order[1::2] = np.arange(half), np.arange(half) + half
    return w.reshape(n_heads, head_dim, -1)[:, order].reshape(w.shape)


def meta_shards(state: dict, hf_config: dict, n_shards: int, embed_axis: int,
                output_when_tied: bool = False) -> list[dict[str, np.ndarray]]:
    """Model-parallel pieces of an HF state dict, as Meta's code would have saved them; a tied
    model's lm_head (the embedding) only with `output_when_tied` (Meta's code has no tied models)."""
    n_heads, n_kv = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    shards = [{} for _ in range(n_shards)]
    for hf_name, w in state.items():
        if hf_name == "lm_head.weight" and hf_config["tie_word_embeddings"] and not output_when_tied:
            continue
        name = meta_name(hf_name)
        kind = name.split(".")[-2]
        if kind in ("wq", "wk"):
            w = rotate_half_to_interleaved(w, n_heads if kind == "wq" else n_kv)
        axis = embed_axis if kind == "tok_embeddings" else SPLIT_AXIS.get(kind)
        if axis is None:
            pieces = [w] * n_shards
        elif kind in ("wk", "wv") and n_kv < n_shards:  # each K/V head copied onto consecutive shards
            heads = np.split(w, n_kv)
            pieces = [heads[s * n_kv // n_shards] for s in range(n_shards)]
        else:
            pieces = np.split(w, n_shards, axis=axis)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    return shards


def save_shards(directory, shards, params: dict, dtype=torch.float32) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(shards):
        torch.save({k: torch.from_numpy(np.array(v)).to(dtype) for k, v in shard.items()},
                   directory / f"consolidated.{i:02d}.pth")


def meta_params(case: str) -> dict:
    hf_config = reference(case)[0]
    return dict(dim=hf_config["hidden_size"], n_layers=hf_config["num_hidden_layers"],
                n_heads=hf_config["num_attention_heads"], **CASES[case][2])


def make_meta_dir(directory, case: str, n_shards: int, extra: dict | None = None):
    hf_config, _, state = reference(case)
    shards = meta_shards(state, hf_config, n_shards, CASES[case][3])
    if case == "llama1":  # LLaMA-1 files carry a precomputed rotary table
        for shard in shards:
            shard["rope.freqs"] = np.ones(hf_config["hidden_size"] // hf_config["num_attention_heads"] // 2, np.float32)
    save_shards(directory, shards, {**meta_params(case), **(extra or {})})
    return directory


def meta_ffn_dim(dim: int, multiple_of: int, multiplier: float | None = None) -> int:
    hidden = int(8 * dim / 3)
    hidden = int(hidden * multiplier) if multiplier is not None else hidden
    return -(-hidden // multiple_of) * multiple_of


def test_fixture_reordering_turns_rotate_half_into_interleaved_pairs():
    """Pins the fixtures to Meta's rotary: complex rotation of pairs (2i, 2i+1), against HF's rotate_half."""
    rng = np.random.default_rng(1)
    n_heads, head_dim, dim, pos = 2, 8, 16, 5
    half = head_dim // 2
    w_hf, x = rng.normal(size=(n_heads * head_dim, dim)), rng.normal(size=dim)
    theta = pos * 10000.0 ** (-np.arange(half) * 2 / head_dim)
    q = (w_hf @ x).reshape(n_heads, head_dim)
    hf = q * np.cos(np.tile(theta, 2)) + np.concatenate([-q[:, half:], q[:, :half]], -1) * np.sin(np.tile(theta, 2))
    q_meta = (rotate_half_to_interleaved(w_hf, n_heads) @ x).reshape(n_heads, half, 2)
    meta = (q_meta[..., 0] + 1j * q_meta[..., 1]) * np.exp(1j * theta)
    np.testing.assert_allclose(meta.real, hf[:, :half], atol=1e-12)
    np.testing.assert_allclose(meta.imag, hf[:, half:], atol=1e-12)


# ---- reading: parity with transformers --------------------------------------------------------


def load_all(source) -> dict[str, np.ndarray]:
    return {spec.hf_name: source.load(spec.hf_name) for spec in tensor_specs(source.config)}


@pytest.mark.parametrize("case,n_shards", [("llama2", 1), ("llama2", 2), ("llama2", 4), ("llama1", 2),
                                           ("llama3", 1), ("llama3", 2), ("llama3", 4),
                                           ("mqa_tied", 2), ("mqa_tied", 4)])
def test_logits_match_transformers(tmp_path, case, n_shards):
    hf_config, model, state = reference(case)
    source = read_meta(make_meta_dir(tmp_path, case, n_shards), rope_scaling_factor=16 if case == "llama3" else None)
    # use_scaled_rope reads as LLaMA-3.1+, norm_eps 1e-6 as LLaMA-1
    guessed_len = {"llama3": 131072, "llama1": 2048, "mqa_tied": 2048}.get(case, 4096)
    assert source.config == LLaMAConfig.from_hf(hf_config, max_seq_len=guessed_len)
    assert source.dtype == "float32" and source.files_dir == tmp_path

    tensors = load_all(source)
    for name, w in tensors.items():
        np.testing.assert_array_equal(w, state[name], err_msg=name)
    cfg, params = from_hf_state_dict(tensors, source.config.to_hf())
    logits = np.asarray(LLaMA(cfg).apply({"params": params}, TOKENS))
    np.testing.assert_allclose(logits, hf_logits(model, TOKENS), atol=PARITY_TOL, rtol=0)
    source.close()


def test_bfloat16_shards_keep_their_bits(tmp_path):
    hf_config, _, state = reference("llama3")
    save_shards(tmp_path, meta_shards(state, hf_config, 2, 0), meta_params("llama3"), torch.bfloat16)
    source = read_meta(tmp_path)
    assert source.dtype == "bfloat16"
    for name, w in load_all(source).items():
        assert w.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(w, state[name].astype(ml_dtypes.bfloat16), err_msg=name)


def tiny_state(cfg: LLaMAConfig, dtype=np.float16) -> dict[str, np.ndarray]:
    return {s.hf_name: np.zeros(s.hf_shape, dtype) for s in tensor_specs(cfg)}


def save_tiny_meta_dir(directory, vocab: int, extra: dict) -> None:
    """A one-layer Meta checkpoint with `vocab` in params.json (-1: 32000 rows, as LLaMA-1/2 write it)."""
    cfg = LLaMAConfig(vocab_size=32000 if vocab == -1 else vocab, dim=16, n_layers=1, n_heads=2, ffn_dim=48)
    hf = dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    save_shards(directory, meta_shards(tiny_state(cfg), hf, 1, 0),
                dict(dim=16, n_layers=1, n_heads=2, multiple_of=16, vocab_size=vocab, **extra), torch.float16)


@pytest.mark.parametrize("vocab,extra,expected", [
    (128256, dict(use_scaled_rope=True, rope_theta=5e5), 131072),  # LLaMA-3.1
    (128256, dict(rope_theta=5e5), 8192),  # LLaMA-3
    (128256, dict(rope_theta=1e6), 8192),  # a LLaMA-3 vocabulary is not Code Llama's
    (32000, dict(use_scaled_rope=True, rope_theta=5e5), 131072),  # scaled rope is LLaMA-3.1+'s (it was 4096,
    # below the context of 8192 the scaling starts from)
    (-1, dict(norm_eps=1e-6), 2048),  # LLaMA-1
    (-1, dict(norm_eps=1e-5), 4096),  # LLaMA-2
    (32016, dict(norm_eps=1e-5, rope_theta=1000000), 16384),  # Code Llama 7B-34B (an integer theta in its file)
    (32000, dict(norm_eps=1e-5, rope_theta=1e6), 16384),  # Code Llama 70B
    (128256, dict(max_seq_len=1000, rope_theta=5e5), 1000),
])
def test_max_seq_len_guess(tmp_path, vocab, extra, expected):
    save_tiny_meta_dir(tmp_path, vocab, extra)
    source = read_meta(tmp_path)
    assert source.config.max_seq_len == expected and source.dtype == "float16"


@pytest.mark.parametrize("vocab, extra, why", [(128256, {}, "a vocabulary of 128256"),
                                               (-1, dict(use_scaled_rope=True), "use_scaled_rope")])
def test_a_file_for_llama3s_code_without_rope_theta_is_refused(tmp_path, capsys, vocab, extra, why):
    """LLaMA-3's code reads a missing rope_theta as 500000, LLaMA-1/2's as 10000: such a file was read
    with 10000 (while its context was guessed as LLaMA-3's), a model of theta 500000 rotated wrongly."""
    save_tiny_meta_dir(tmp_path / "src", vocab, extra)
    message = (f"{tmp_path / 'src' / 'params.json'}: no rope_theta, which a checkpoint for LLaMA-3's code ({why}) "
               f"must give, since that code reads a missing one as 500000 and LLaMA-1/2's as 10000; add the model's "
               f"(Meta's LLaMA-3 releases give \"rope_theta\": 500000.0)")
    assert main(["convert", "--from", "meta", "--to", "jax", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert capsys.readouterr().err == f"llama-jax convert: error: {message}\n"
    assert not (tmp_path / "dst").exists()
    params = json.loads((tmp_path / "src" / "params.json").read_text())
    (tmp_path / "src" / "params.json").write_text(json.dumps({**params, "rope_theta": 5e5}))
    assert read_meta(tmp_path / "src").config.rope_theta == 5e5


@pytest.mark.parametrize("vocab, extra, settings", [(128256, {}, {"max_seq_len": 64}),
                                                    (-1, dict(use_scaled_rope=True),
                                                     {"max_seq_len": 64, "rope_scaling_factor": 8.0})])
def test_a_directory_write_meta_wrote_without_rope_theta_reads_as_10000(tmp_path, vocab, extra, settings):
    """Earlier releases of write_meta left a rope_theta of 10000 out of params.json also for LLaMA-3's
    code, with llama_jax.json beside it; such a directory read back as 10000, then was refused."""
    save_tiny_meta_dir(tmp_path, vocab, extra)
    (tmp_path / "llama_jax.json").write_text(json.dumps(settings))
    config = read_meta(tmp_path).config
    assert config.rope_theta == 10000.0 and config.max_seq_len == 64


def test_max_seq_len_in_llama_jax_json_overrides_the_guess(tmp_path):
    """The way to give a checkpoint Meta released without its context length another one."""
    save_tiny_meta_dir(tmp_path, 32016, dict(rope_theta=1e6))
    (tmp_path / "llama_jax.json").write_text('{"max_seq_len": 100000}')
    assert read_meta(tmp_path).config.max_seq_len == 100000


@pytest.mark.parametrize("recorded,argument,expected", [(None, None, 8.0), (32.0, None, 32.0), (32.0, 16.0, 16.0)])
@pytest.mark.parametrize("where", ["llama_jax.json", "params.json"])  # params.json: earlier releases wrote it there
def test_rope_scaling_factor_precedence(tmp_path, recorded, argument, expected, where):
    """As `convert --help` says: the option, else the factor a conversion recorded, else 8."""
    setting = {} if recorded is None else {"rope_scaling_factor": recorded}
    make_meta_dir(tmp_path, "llama3", 1, setting if where == "params.json" else None)
    if where == "llama_jax.json":
        (tmp_path / where).write_text(json.dumps(setting))
    source = read_meta(tmp_path, rope_scaling_factor=argument)
    assert source.config.rope_scaling == RopeScaling("llama3", expected, 1.0, 4.0, 8192)
    assert source.config.rope_theta == 500000.0


def test_rope_scaling_factor_is_refused_without_scaled_rope(tmp_path):
    """A checkpoint without use_scaled_rope has no scaling the factor could set: the option is a mistake."""
    assert read_meta(make_meta_dir(tmp_path, "llama2", 1)).config.rope_scaling is None
    with pytest.raises(ConversionError, match=f"--rope-scaling-factor 32: {tmp_path / 'params.json'} does not set "
                                              f"use_scaled_rope, so the model has no rope scaling; drop the option"):
        read_meta(tmp_path, rope_scaling_factor=32)
    # nor is a factor written beside it (by hand: write_meta records one only for scaled rope), which was ignored
    (tmp_path / "llama_jax.json").write_text('{"rope_scaling_factor": 32}')
    with pytest.raises(ConversionError) as error:
        read_meta(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'llama_jax.json'}: rope_scaling_factor is set, but "
                                f"{tmp_path / 'params.json'} does not set use_scaled_rope, so the model has no rope "
                                f"scaling; remove rope_scaling_factor")


# ---- writing -----------------------------------------------------------------------------------


def hf_source(case: str, dtype: str):
    hf_config, _, state = reference(case)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return LLaMAConfig.from_hf(hf_config), lambda name: state[name].astype(np_dtype)


@pytest.mark.parametrize("case,n_shards,dtype", [("llama3", 1, "float32"), ("llama3", 2, "bfloat16"),
                                                 ("llama3", 4, "float32"), ("llama2", 4, "bfloat16"),
                                                 ("mqa_tied", 1, "bfloat16"), ("mqa_tied", 4, "float32")])
def test_write_read_round_trip_is_bit_exact(tmp_path, case, n_shards, dtype):
    cfg, load = hf_source(case, dtype)
    written = write_meta(tmp_path / "out", cfg, load, n_shards)
    assert written == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        [f"consolidated.{i:02d}.pth" for i in range(n_shards)] + ["llama_jax.json", "params.json"]
    # Meta's loaders call ModelArgs(max_seq_len=..., max_batch_size=..., **params): any other key is refused.
    # LLaMA-2's ModelArgs, and the fields later releases added where their files carry them:
    allowed = {"dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps"} | \
        ({"n_kv_heads"} if cfg.n_kv_heads != cfg.n_heads else set()) | \
        ({"rope_theta"} if cfg.rope_theta != 10000 or cfg.rope_scaling else set()) | \
        ({"use_scaled_rope"} if cfg.rope_scaling else set())
    assert set(json.loads((tmp_path / "out" / "params.json").read_text())) <= allowed
    source = read_meta(tmp_path / "out")
    assert source.config == cfg and source.dtype == dtype
    for spec in tensor_specs(cfg):
        a, b = source.load(spec.hf_name), load(spec.hf_name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), spec.hf_name


@pytest.mark.parametrize("n_shards", [1, 2])
def test_a_tied_models_output_trained_apart_is_refused_until_untied(tmp_path, n_shards):
    """A tied model written for Meta's code carries its embedding as output.weight too; Meta's code
    (no tied models) may train that copy apart. Read back as tied, it was dropped without a word."""
    cfg, load = hf_source("mqa_tied", "float32")
    write_meta(tmp_path / "out", cfg, load, n_shards)
    for shard in sorted((tmp_path / "out").glob("consolidated.*.pth")):
        state = torch.load(shard, weights_only=True)
        state["output.weight"] = state["output.weight"] + 0.5  # as if fine-tuned with Meta's code
        torch.save(state, shard)
    with pytest.raises(ConversionError, match=r"output.weight is not the embedding table, which llama_jax.json "
                                              r"records the model as tied to \(tie_embeddings\); .* remove"):
        read_meta(tmp_path / "out")
    (tmp_path / "out" / "llama_jax.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "out" / "llama_jax.json").read_text()).items()
         if k != "tie_embeddings"}))
    source = read_meta(tmp_path / "out")  # untied, with the trained output layer
    assert not source.config.tie_embeddings
    np.testing.assert_array_equal(source.load("lm_head.weight"), load("model.embed_tokens.weight") + 0.5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_params_json_has_n_kv_heads_only_for_fewer_kv_heads(tmp_path, n_kv_heads):
    """As Meta's files: LLaMA-1/2 7B-13B have no n_kv_heads (LLaMA-1's ModelArgs refuses it), 70B and LLaMA-3 do."""
    cfg = LLaMAConfig(vocab_size=8, dim=64, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=192)
    write_meta(tmp_path, cfg, tiny_state(cfg).__getitem__)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params.get("n_kv_heads") == (None if n_kv_heads == 4 else n_kv_heads)
    assert read_meta(tmp_path).config == cfg


@pytest.mark.parametrize("content, message", [
    ("{not json", r"llama_jax.json: not valid JSON"),
    ('{"max_seq_len": "8192"}', r"llama_jax.json: max_seq_len must be a positive integer, got '8192'"),
    ('{"tie_embeddings": "yes"}', r"llama_jax.json: tie_embeddings must be true or false, got 'yes'"),
    # misspelt by hand: the guessed length stayed without a word
    ('{"max_seq_length": 100000}', r"llama_jax.json: unknown key 'max_seq_length'; valid: max_seq_len, "
                                   r"rope_scaling_factor, tie_embeddings$"),
    # (was "--rope-scaling-factor must be a positive number", an option not given)
    ('{"rope_scaling_factor": 1e39}', r"llama_jax.json: rope_scaling_factor 1e\+39: rope_scaling.factor must be "
                                      r"within float32's range"),
])
def test_a_bad_settings_file_beside_params_json_is_named(tmp_path, content, message):
    cfg, load = hf_source("llama3", "float32")
    write_meta(tmp_path, cfg, load)
    (tmp_path / "llama_jax.json").write_text(content)
    with pytest.raises(ConversionError, match=message):
        read_meta(tmp_path)


def test_llama3_sized_vocabulary_is_split_along_the_vocabulary(tmp_path):
    cfg = LLaMAConfig(vocab_size=128256, dim=16, n_layers=1, n_heads=2, ffn_dim=48)
    rng = np.random.default_rng(0)
    state = {name: rng.normal(size=w.shape).astype(np.float16) for name, w in tiny_state(cfg).items()}
    write_meta(tmp_path, cfg, state.__getitem__, 2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    np.testing.assert_array_equal(shard["tok_embeddings.weight"].numpy(), state["model.embed_tokens.weight"][64128:])
    source = read_meta(tmp_path)
    assert source.config == cfg
    for name, w in state.items():
        np.testing.assert_array_equal(source.load(name), w, err_msg=name)


@pytest.mark.parametrize("vocab, scaled", [(128256, False), (256, True)])
def test_a_model_for_llama3s_code_is_written_with_its_rope_theta_of_10000(tmp_path, vocab, scaled):
    """LLaMA-3's code (VocabParallelEmbedding; the only one with use_scaled_rope) defaults rope_theta
    to 500000: a theta of 10000 left out, as LLaMA-1/2's files do, was read there as 500000."""
    cfg = LLaMAConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, ffn_dim=48,
                      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192) if scaled else None)
    write_meta(tmp_path, cfg, tiny_state(cfg).__getitem__, 2)
    assert json.loads((tmp_path / "params.json").read_text())["rope_theta"] == 10000.0
    shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert tuple(shard["tok_embeddings.weight"].shape) == (vocab // 2, 16)  # split along the vocabulary
    assert read_meta(tmp_path).config == cfg


@pytest.mark.parametrize("case,n_shards", [("llama2", 2), ("llama2", 4), ("mqa_tied", 4)])
def test_written_shards_match_metas_layout(tmp_path, case, n_shards):
    """Shard by shard, write_meta produces what the fixtures (Meta's layout, stated independently) hold."""
    cfg, load = hf_source(case, "float32")
    write_meta(tmp_path, cfg, load, n_shards)
    hf_config, _, state = reference(case)
    for i, expected in enumerate(meta_shards(state, hf_config, n_shards, CASES[case][3], output_when_tied=True)):
        got = torch.load(tmp_path / f"consolidated.{i:02d}.pth", weights_only=True)
        assert sorted(got) == sorted(expected)
        for name, w in expected.items():
            np.testing.assert_array_equal(got[name].numpy(), w, err_msg=f"shard {i} {name}")
    params = json.loads((tmp_path / "params.json").read_text())
    assert meta_ffn_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == cfg.ffn_dim


@pytest.mark.parametrize("ffn_dim", [171, 100, 1000, 192])
def test_written_ffn_keys_reproduce_ffn_dim(tmp_path, ffn_dim):
    cfg = LLaMAConfig(vocab_size=8, dim=64, n_layers=1, n_heads=4, ffn_dim=ffn_dim)
    write_meta(tmp_path, cfg, tiny_state(cfg).__getitem__)
    params = json.loads((tmp_path / "params.json").read_text())
    assert meta_ffn_dim(64, params["multiple_of"], params.get("ffn_dim_multiplier")) == ffn_dim
    assert read_meta(tmp_path).config == cfg


@pytest.mark.parametrize("name", ["llama1-33b", "llama2-7b", "llama2-70b", "llama3-8b", "llama3.1-405b",
                                  "llama3.2-1b", "tinyllama-1.1b", "debug"])
def test_ffn_keys_for_real_widths(name):
    """The (multiple_of, ffn_dim_multiplier) choice for full-size models, too big to write here."""
    from llama_jax.convert.meta import _ffn_params

    cfg = LLaMAConfig.from_preset(name)
    multiple_of, multiplier = _ffn_params(cfg.dim, cfg.ffn_dim)
    assert meta_ffn_dim(cfg.dim, multiple_of, multiplier) == cfg.ffn_dim


# ---- bad input --------------------------------------------------------------------------------


def rewrite_shard(path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_missing_params_json(tmp_path):
    make_meta_dir(tmp_path, "llama2", 1)
    (tmp_path / "params.json").unlink()
    with pytest.raises(ConversionError, match=r"params\.json: not found"):
        read_meta(tmp_path)


def test_no_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(meta_params("llama2")))
    with pytest.raises(ConversionError, match=r"no consolidated\.NN\.pth shards"):
        read_meta(tmp_path)


def test_gap_in_shard_numbers(tmp_path):
    make_meta_dir(tmp_path, "llama2", 4)
    (tmp_path / "consolidated.02.pth").unlink()
    with pytest.raises(ConversionError, match=r"consolidated\.02\.pth is missing"):
        read_meta(tmp_path)


def test_two_files_of_one_shard_number(tmp_path):
    """consolidated.1.pth beside consolidated.01.pth: which one was read depended on the directory's order."""
    make_meta_dir(tmp_path, "llama2", 2)
    shutil.copy(tmp_path / "consolidated.01.pth", tmp_path / "consolidated.1.pth")
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth and consolidated\.1\.pth are both shard 1; "
                                              r"keep one of them$"):
        read_meta(tmp_path)
    (tmp_path / "consolidated.01.pth").unlink()
    (tmp_path / "consolidated.1.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth is missing; the 2 shard\(s\) found "
                                              r"\(consolidated\.00\.pth, consolidated\.02\.pth\) must be numbered "
                                              r"from 00 without gaps$"):
        read_meta(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float8_e4m3fn])
def test_weights_that_are_not_floats_are_refused(tmp_path, dtype):
    """An integer tensor among float ones was converted silently (a mix reads as float32); float8
    failed inside torch."""
    make_meta_dir(tmp_path, "llama2", 2)
    rewrite_shard(tmp_path / "consolidated.01.pth", lambda s: s.update({"norm.weight": s["norm.weight"].to(dtype)}))
    with pytest.raises(ConversionError) as error:
        read_meta(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'consolidated.01.pth'}: tensor norm.weight has dtype "
                                f"{str(dtype).removeprefix('torch.')}; supported: float32, float16, bfloat16, float64")


def test_shard_with_misshaped_tensor(tmp_path):
    make_meta_dir(tmp_path, "llama2", 2)
    rewrite_shard(tmp_path / "consolidated.01.pth",
                  lambda s: s.update({"layers.1.attention.wq.weight": torch.zeros(40, 64)}))
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth: layers\.1\.attention\.wq\.weight has shape "
                                              r"\(40, 64\) but consolidated\.00\.pth has \(32, 64\)"):
        read_meta(tmp_path)


def test_shapes_disagreeing_with_params_json(tmp_path):
    make_meta_dir(tmp_path, "llama3", 1, dict(n_kv_heads=4))  # the shards hold 2 K/V heads
    with pytest.raises(ConversionError, match=r"consolidated\.00\.pth: layers\.0\.attention\.wk\.weight has merged "
                                              r"shape \(32, 128\), params\.json implies \(64, 128\)"):
        read_meta(tmp_path)


def test_more_heads_in_params_json_than_the_shards_hold(tmp_path):
    """Twice the heads params.json says (half the head dim) made 2 shards of 2 K/V heads look like
    copies of 1 head each, refused only when the weights were read, as copies that differ."""
    make_meta_dir(tmp_path, "llama3", 2, dict(n_heads=16))  # the shards hold 8 heads of 16 dims, 2 of them K/V
    with pytest.raises(ConversionError, match=r"consolidated\.\*\.pth: layers\.0\.attention\.wk\.weight has merged "
                                              r"shape \(32, 128\), params\.json implies \(16, 128\)"):
        read_meta(tmp_path)


def test_missing_tensor(tmp_path):
    make_meta_dir(tmp_path, "llama2", 2)
    rewrite_shard(tmp_path / "consolidated.01.pth", lambda s: s.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth: missing tensor layers\.1\.feed_forward\.w3"):
        read_meta(tmp_path)


@pytest.mark.parametrize("tie_recorded", [False, True])
def test_an_output_layer_missing_from_some_shards_is_named(tmp_path, tie_recorded):
    """Only a checkpoint without output.weight in any shard is a tied model; one that lost shard 00's
    piece was read as tied, dropping the other shards' pieces of the output layer without a word."""
    make_meta_dir(tmp_path, "llama2", 2)
    if tie_recorded:
        (tmp_path / "llama_jax.json").write_text('{"tie_embeddings": true}')
    rewrite_shard(tmp_path / "consolidated.00.pth", lambda s: s.pop("output.weight"))
    with pytest.raises(ConversionError) as error:
        read_meta(tmp_path)
    assert str(error.value) == f"{tmp_path / 'consolidated.00.pth'}: missing tensor output.weight"


def test_unexpected_tensor(tmp_path):
    make_meta_dir(tmp_path, "llama2", 1)
    rewrite_shard(tmp_path / "consolidated.00.pth", lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(64)}))
    with pytest.raises(ConversionError, match=r"unexpected tensor layers\.0\.attention\.wq\.bias"):
        read_meta(tmp_path)


def test_ffn_keys_disagreeing_with_w1(tmp_path):
    make_meta_dir(tmp_path, "llama2", 1, dict(multiple_of=256))
    with pytest.raises(ConversionError, match=r"multiple_of=256, ffn_dim_multiplier=None give an FFN width of 256, "
                                              r"but layers\.0\.feed_forward\.w1\.weight has 192 rows"):
        read_meta(tmp_path)


@pytest.mark.parametrize("case, n_shards, dim, weights_dim", [
    ("llama2", 1, 128, 64),  # gives a different FFN width, which used to take the blame
    ("llama3", 2, 48, 128),  # embedding split on the vocabulary: its shape alone does not tell the dim
    ("llama2", 2, 66, 64),  # not divisible by n_heads either
])
def test_dim_disagreeing_with_the_weights(tmp_path, capsys, case, n_shards, dim, weights_dim):
    make_meta_dir(tmp_path / "src", case, n_shards, dict(dim=dim))
    message = (f"{tmp_path / 'src' / 'params.json'}: dim={dim}, but the weights have model dim {weights_dim} "
               f"(norm.weight has {weights_dim} entries); set dim to {weights_dim}")
    with pytest.raises(ConversionError) as err:
        read_meta(tmp_path / "src")
    assert str(err.value) == message
    assert main(["convert", "--from", "meta", "--to", "jax", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert capsys.readouterr().err == f"llama-jax convert: error: {message}\n"


def test_dim_that_is_not_an_integer(tmp_path):
    make_meta_dir(tmp_path, "llama2", 1, dict(dim="64"))
    with pytest.raises(ConversionError, match=r"params\.json: dim must be a positive integer, got '64'$"):
        read_meta(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(use_scaled_rope="false"), "use_scaled_rope must be true or false, got 'false'"),  # not bool("false")
    (dict(rope_theta=True), "rope_theta must be a positive number, got True"),
    (dict(rope_theta="abc"), "rope_theta must be a positive number, got 'abc'"),
    (dict(rope_theta=None), "rope_theta must be a positive number, got None"),
    (dict(vocab_size="256"), "vocab_size must be a positive integer, got '256'"),
    (dict(n_kv_heads=1.0), "n_kv_heads must be a positive integer, got 1.0"),
    (dict(norm_eps=-1e-5), "norm_eps must be a positive number, got -1e-05"),
    (dict(norm_eps=10 ** 400), f"norm_eps must be a positive number, got {10 ** 400}"),  # past a float's range
    (dict(use_scaled_rope=True, rope_scaling_factor="8"), "rope_scaling_factor must be a positive number, got '8'"),
    (dict(dim=64.0), "dim must be a positive integer, got 64.0"),
    (dict(ffn_dim_multiplier=1e308), "multiple_of=32, ffn_dim_multiplier=1e+308 give an FFN width of inf, but "
                                     "layers.0.feed_forward.w1.weight has 192 rows"),  # (was an OverflowError)
])
def test_params_of_the_wrong_kind_are_named(tmp_path, change, message):
    make_meta_dir(tmp_path, "llama2", 1, change)
    with pytest.raises(ConversionError) as error:
        read_meta(tmp_path)
    assert str(error.value) == f"{tmp_path / 'params.json'}: {message}"


@pytest.mark.parametrize("change, found", [("remove 01", 1), ("copy 01 as 02", 3)])
def test_a_shard_missing_or_left_over_is_named(tmp_path, change, found):
    make_meta_dir(tmp_path, "llama2", 2)
    if change == "remove 01":
        (tmp_path / "consolidated.01.pth").unlink()
    else:
        (tmp_path / "consolidated.02.pth").write_bytes((tmp_path / "consolidated.01.pth").read_bytes())
    with pytest.raises(ConversionError) as error:
        read_meta(tmp_path)
    assert str(error.value) == (f"{tmp_path}: {found} consolidated.NN.pth file(s) hold 32 rows each of "
                                f"layers.0.attention.wq.weight, {32 * found} in all, not dim=64; give every shard "
                                f"of one checkpoint (and no other)")


def test_whole_tensors_that_differ_between_shards(tmp_path):
    make_meta_dir(tmp_path, "llama2", 2)
    rewrite_shard(tmp_path / "consolidated.01.pth", lambda s: s["layers.0.attention_norm.weight"].mul_(2.0))
    source = read_meta(tmp_path)
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth: layers\.0\.attention_norm\.weight should be "
                                              r"the same in every shard \(it is not split\) but differs from "
                                              r"consolidated\.00\.pth's"):
        source.load("model.layers.0.input_layernorm.weight")


def test_shards_of_different_dtypes_are_read_as_float32_exactly(tmp_path):
    """Shard 00 in bfloat16 beside shard 01 in float32: written in the first shard's dtype, shard
    01's values would be rounded. Shard 00 holds the first half of each split tensor (in HF layout
    too: the rotary reordering stays within a head) and the whole of the replicated ones."""
    from llama_jax.convert.source import numpy_dtype

    hf_config, _, state = reference("llama2")
    embed_axis = CASES["llama2"][3]
    expected = {}
    for name, w in state.items():
        kind = meta_name(name).split(".")[-2]
        axis = embed_axis if kind == "tok_embeddings" else SPLIT_AXIS.get(kind)
        in_shard_00 = [slice(None)] * w.ndim
        if axis is not None:
            in_shard_00[axis] = slice(0, w.shape[axis] // 2)
        w = w.copy()
        w[tuple(in_shard_00)] = w[tuple(in_shard_00)].astype(ml_dtypes.bfloat16).astype(np.float32)
        expected[name] = w
    save_shards(tmp_path, meta_shards(expected, hf_config, 2, embed_axis), meta_params("llama2"))
    rewrite_shard(tmp_path / "consolidated.00.pth", lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))
    source = read_meta(tmp_path)
    assert source.dtype == "float32"
    bf16_rounded = 0
    for name, w in expected.items():
        np.testing.assert_array_equal(source.load(name).astype(numpy_dtype(source.dtype)), w, err_msg=name)
        bf16_rounded += np.sum(w.astype(ml_dtypes.bfloat16).astype(np.float32) != w)
    assert bf16_rounded > 1000  # shard 01 holds values bfloat16 would have changed


def test_a_dtype_no_output_has_is_named_with_its_shard(tmp_path):
    make_meta_dir(tmp_path, "llama2", 2)
    rewrite_shard(tmp_path / "consolidated.01.pth", lambda s: s.update({k: v.double() for k, v in s.items()}))
    with pytest.raises(ConversionError) as error:
        read_meta(tmp_path)
    assert str(error.value) == (f"{tmp_path / 'consolidated.01.pth'}: the weights are stored as float64; "
                                f"valid: float32, bfloat16, float16")


def test_mixed_dtypes_are_read_as_float32(tmp_path):
    make_meta_dir(tmp_path, "llama2", 1)
    rewrite_shard(tmp_path / "consolidated.00.pth",
                  lambda s: s.update({"tok_embeddings.weight": s["tok_embeddings.weight"].bfloat16()}))
    assert read_meta(tmp_path).dtype == "float32"  # not the embedding table's bfloat16


def test_kv_replicas_that_differ(tmp_path):
    make_meta_dir(tmp_path, "mqa_tied", 2)
    rewrite_shard(tmp_path / "consolidated.01.pth", lambda s: s["layers.0.attention.wv.weight"].add_(1.0))
    source = read_meta(tmp_path)
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth: layers\.0\.attention\.wv\.weight should repeat"):
        source.load("model.layers.0.self_attn.v_proj.weight")


@pytest.mark.parametrize("case, n_shards, name, hf_name", [
    ("llama2", 1, "norm.weight", "model.norm.weight"),  # compared with itself
    ("llama2", 2, "layers.0.attention_norm.weight", "model.layers.0.input_layernorm.weight"),  # in every shard
    ("mqa_tied", 2, "layers.0.attention.wv.weight", "model.layers.0.self_attn.v_proj.weight"),  # a K/V replica
])
def test_a_nan_in_a_tensor_every_shard_holds_alike_is_read_as_it_is(tmp_path, case, n_shards, name, hf_name):
    """(It was "should be the same in every shard ... but differs", even of a checkpoint of one
    shard: torch.equal finds a tensor holding a NaN unequal to itself.)"""
    make_meta_dir(tmp_path, case, n_shards)
    for i in range(n_shards):
        rewrite_shard(tmp_path / f"consolidated.{i:02d}.pth", lambda s: s[name].view(-1)[:1].fill_(float("nan")))
    w = read_meta(tmp_path).load(hf_name)
    assert np.isnan(w).sum() == 1 and np.isfinite(w).sum() == w.size - 1


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "params.json").write_text(json.dumps(meta_params("llama2")))
    torch.save({"tok_embeddings.weight": _RunsCode(marker)}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ConversionError, match=r"consolidated\.00\.pth: refused"):
        read_meta(tmp_path)
    assert not marker.exists()


def test_a_shard_that_is_a_directory_is_named_as_one(tmp_path):
    """(It said "file not found" of a name that is there, as a directory.)"""
    make_meta_dir(tmp_path, "llama2", 2)
    (tmp_path / "consolidated.01.pth").unlink()
    (tmp_path / "consolidated.01.pth").mkdir()
    with pytest.raises(ConversionError, match=r"consolidated\.01\.pth: is a directory, not a file$"):
        read_meta(tmp_path).load("model.norm.weight")


def test_write_rejects_uneven_splits(tmp_path):
    cfg, load = hf_source("llama2", "float32")
    with pytest.raises(ConversionError, match=r"n_shards=3: n_heads=4 is not divisible .* valid shard counts "
                                              r"for this model: 1, 2, 4$"):
        write_meta(tmp_path, cfg, load, 3)
    odd_kv = LLaMAConfig(vocab_size=48, dim=96, n_layers=1, n_heads=6, n_kv_heads=2, ffn_dim=288)
    with pytest.raises(ConversionError, match=r"n_kv_heads=2 neither divides nor is divisible by it; .*: 1, 2, 6$"):
        write_meta(tmp_path, odd_kv, load, 3)
    odd_vocab = cfg.replace(vocab_size=128002)  # LLaMA-3-sized vocabularies are split along the vocabulary
    with pytest.raises(ConversionError, match=r"tok_embeddings\.weight has 128002 along dim 0, not divisible by it"):
        write_meta(tmp_path, odd_vocab, load, 4)
    assert not list(tmp_path.iterdir())  # nothing written


def test_write_rejects_what_params_json_cannot_say(tmp_path):
    cfg, load = hf_source("llama2", "float32")
    with pytest.raises(ConversionError, match=r"rope_scaling=.*linear.* cannot be written to params\.json"):
        write_meta(tmp_path, cfg.replace(rope_scaling=RopeScaling("linear", 2.0)), load)
    with pytest.raises(ConversionError, match=r"cannot be written"):
        write_meta(tmp_path, cfg.replace(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)), load)


def test_write_refuses_stale_shards_and_bad_tensors(tmp_path):
    cfg, load = hf_source("llama2", "float32")
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.weight has shape "
                                              r"\(2, 2\), config expects \(64, 64\)"):
        write_meta(tmp_path, cfg, lambda n: np.zeros((2, 2), np.float32) if "q_proj" in n else load(n))
    write_meta(tmp_path / "out", cfg, load, 2)
    with pytest.raises(ConversionError, match=r"consolidated\.00\.pth: already exists"):
        write_meta(tmp_path / "out", cfg, load, 1)


@pytest.mark.parametrize("stop", [OSError(28, "No space left on device"), KeyboardInterrupt(), Terminated()],
                         ids=["full-disk", "ctrl-c", "sigterm"])
def test_what_stops_a_shard_write_is_raised_as_itself(tmp_path, monkeypatch, stop):
    """torch.save reports a write that raised (a full disk, or a signal handler raising in the
    middle of it) as its own RuntimeError; the convert command needs the original to report a
    termination (exit 143 or 130) or the disk."""
    from llama_jax.convert import torch_io

    class StoppingFile(io.FileIO):
        def write(self, data):
            if self.tell() > 2000:
                raise stop
            return super().write(data)

    monkeypatch.setattr(torch_io, "open", StoppingFile, raising=False)
    with pytest.raises(type(stop)):
        torch_io.save_torch_file({"a": torch.zeros(4096), "b": torch.ones(4096)}, tmp_path / "x.pth")


@pytest.mark.parametrize("key, value", [
    ("sliding_window", 16),  # another model's (Mistral's) attention window: reading it as LLaMA drops it
    ("rope_high_freq_factor", 2.0),  # scaled rope with other frequencies than the ones read here
    ("use_scaled_rop", True),  # misspelt: read as unscaled
])
def test_a_params_key_the_converter_cannot_apply_is_refused(tmp_path, capsys, key, value):
    make_meta_dir(tmp_path / "src", "llama2", 2, {key: value})
    message = (f"{tmp_path / 'src' / 'params.json'}: unknown key {key!r}, which this converter cannot apply; valid: "
               f"dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of, ffn_dim_multiplier, norm_eps, "
               f"rope_theta, use_scaled_rope, max_seq_len, rope_scaling_factor, max_batch_size")
    assert main(["convert", "--from", "meta", "--to", "hf", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2
    assert capsys.readouterr().err == f"llama-jax convert: error: {message}\n"
    assert not (tmp_path / "dst").exists()
