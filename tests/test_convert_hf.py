"""`llama-jax convert` with Hugging Face directories: every input layout, output loadable by transformers."""

import functools
import io
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from llama_jax import LLaMA, from_hf_state_dict, load_model
from llama_jax.cli import main
from llama_jax.data import EmbeddedCorpus
from tests.reference import hf_config_dict, hf_logits, make_hf_model

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 20)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def tokenizer_bytes() -> bytes:
    """A SentencePiece model of 200 pieces, within the test models' vocabulary of 256 (no byte
    fallback, whose 256 pieces would not fit)."""
    import sentencepiece

    corpus = EmbeddedCorpus()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=(corpus[i] for i in range(len(corpus))),
                                             model_writer=model, vocab_size=200, character_coverage=0.99,
                                             minloglevel=2)
    return model.getvalue()


def write_hf_dir(path: Path, model, config_dict: dict, layout: str, drop_lm_head: bool = False) -> Path:
    """A Hugging Face directory in one of the layouts found in the wild, written without llama_jax."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config_dict))
    (path / "tokenizer.model").write_bytes(tokenizer_bytes())
    (path / "generation_config.json").write_text('{"bos_token_id": 1}')
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if drop_lm_head:
        state.pop("lm_head.weight")
    single, index_name, save = {
        "safetensors": ("model.safetensors", "model.safetensors.index.json", safetensors.torch.save_file),
        "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json", torch.save),
    }[layout.split("-")[0]]
    if layout.endswith("legacy"):  # torch's format before 1.6, not a zip file: older checkpoints on the Hub
        save = functools.partial(torch.save, _use_new_zipfile_serialization=False)
    if not layout.endswith("sharded"):
        save(state, path / single)
        return path
    names = sorted(state)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts):
        file_name = single.replace(".", f"-{i + 1:05d}-of-00002.", 1)
        save({n: state[n].clone() for n in part}, path / file_name)
        weight_map.update({n: file_name for n in part})
    (path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


CASES = [  # (variant, config.json style, weights layout, drop tied lm_head as Hub files do)
    ("mha", "v4", "safetensors", False),
    ("gqa_llama3", "v5", "safetensors-sharded", False),
    ("mqa_tied", "v4", "bin-legacy", True),
    ("gqa_llama3", "v4", "bin-sharded", False),
    ("mqa_tied", "v5", "safetensors", False),
]


@pytest.mark.parametrize("variant, style, layout, drop_lm_head", CASES)
def test_hf_to_jax_matches_transformers(tmp_path, variant, style, layout, drop_lm_head):
    config_dict = hf_config_dict(variant, style)
    model = make_hf_model(config_dict, seed=3)
    src = write_hf_dir(tmp_path / "hf", model, config_dict, layout, drop_lm_head)
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax")]) == 0
    cfg, params = load_model(tmp_path / "jax")
    logits = np.asarray(LLaMA(cfg).apply({"params": params}, TOKENS))
    np.testing.assert_allclose(logits, hf_logits(model, TOKENS), atol=TOL, rtol=0)
    assert (tmp_path / "jax" / "tokenizer.model").read_bytes() == tokenizer_bytes()
    assert (tmp_path / "jax" / "generation_config.json").is_file()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_single_weights_file_is_read_before_an_index_beside_it(tmp_path, fmt):
    """transformers loads `model.safetensors` (`pytorch_model.bin`) when the directory also holds an
    index and its shards, of other weights: the conversion is of the model transformers loads."""
    config_dict = hf_config_dict("mha", "v4")
    single, sharded = make_hf_model(config_dict, seed=1), make_hf_model(config_dict, seed=2)
    src = write_hf_dir(tmp_path / "hf", sharded, config_dict, f"{fmt}-sharded")
    write_hf_dir(tmp_path / "single", single, config_dict, fmt)
    name = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}[fmt]
    (src / name).write_bytes((tmp_path / "single" / name).read_bytes())
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax")]) == 0
    cfg, params = load_model(tmp_path / "jax")
    loaded = transformers.LlamaForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    np.testing.assert_allclose(np.asarray(LLaMA(cfg).apply({"params": params}, TOKENS)), hf_logits(loaded, TOKENS),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("named", ["other.safetensors", "other.safetensors.index.json"])
def test_the_weights_config_json_names_are_read(tmp_path, capsys, named):
    """transformers loads the file config.json's transformers_weights names, not model.safetensors
    beside it; a name of another kind is refused."""
    config_dict = hf_config_dict("mha", "v4")
    default, other = make_hf_model(config_dict, seed=1), make_hf_model(config_dict, seed=2)
    src = write_hf_dir(tmp_path / "hf", default, config_dict, "safetensors")
    layout = "safetensors-sharded" if named.endswith(".index.json") else "safetensors"
    written = write_hf_dir(tmp_path / "other", other, config_dict, layout)
    for path in written.glob("model*.safetensors*"):
        (src / path.name.replace("model", "other", 1)).write_bytes(path.read_bytes())
    if layout == "safetensors-sharded":  # the index names the renamed shards
        (src / named).write_text((src / named).read_text().replace('"model-', '"other-'))
    (src / "config.json").write_text(json.dumps({**config_dict, "transformers_weights": named}))
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax")]) == 0
    cfg, params = load_model(tmp_path / "jax")
    loaded = transformers.LlamaForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    np.testing.assert_allclose(np.asarray(LLaMA(cfg).apply({"params": params}, TOKENS)), hf_logits(loaded, TOKENS),
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(hf_logits(loaded, TOKENS), hf_logits(other, TOKENS), atol=TOL, rtol=0)
    (src / "config.json").write_text(json.dumps({**config_dict, "transformers_weights": "pytorch_model.bin"}))
    capsys.readouterr()
    _fails(tmp_path, capsys, src, "config.json: transformers_weights='pytorch_model.bin' is not supported; valid: the "
                                  "name of a .safetensors file or a .safetensors.index.json in")


def test_a_top_level_original_context_is_read_as_transformers_reads_it(tmp_path, capsys):
    """Some files keep llama3's original_max_position_embeddings beside the scaling object;
    transformers 5 takes it over the object's own, and 4.x reads only the object's: the model is
    the one transformers loads, and a file whose two values differ is refused."""
    config_dict = hf_config_dict("gqa_llama3", "v5")
    del config_dict["rope_parameters"]["original_max_position_embeddings"]
    config_dict["original_max_position_embeddings"] = 16  # not the 64 of the variant: other frequencies
    model = make_hf_model(config_dict, seed=5)
    src = write_hf_dir(tmp_path / "hf", model, config_dict, "safetensors")
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax")]) == 0
    cfg, params = load_model(tmp_path / "jax")
    assert cfg.rope_scaling.original_max_position_embeddings == 16
    logits = np.asarray(LLaMA(cfg).apply({"params": params}, TOKENS))
    np.testing.assert_allclose(logits, hf_logits(model, TOKENS), atol=TOL, rtol=0)
    config_dict["rope_parameters"]["original_max_position_embeddings"] = 64
    (src / "config.json").write_text(json.dumps(config_dict))
    capsys.readouterr()
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax2")]) == 2
    assert ("config.json: original_max_position_embeddings=16 and rope_parameters.original_max_position_embeddings=64 "
            "differ (transformers 5 reads the first, 4.x the second); make them agree") in capsys.readouterr().err
    assert not (tmp_path / "jax2").exists()


@pytest.mark.parametrize("variant", ["gqa_llama3", "mqa_tied"])
def test_jax_to_hf_loads_in_transformers(tmp_path, variant, capsys):
    config_dict = hf_config_dict(variant, "v5")
    model = make_hf_model(config_dict, seed=4)
    src = write_hf_dir(tmp_path / "hf", model, config_dict, "safetensors")
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax")]) == 0
    # A small shard limit forces several safetensors files and an index.
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "out"),
                 "--max-shard-size", "100KB"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    n_layers = config_dict["num_hidden_layers"]
    assert summary.startswith(f"jax -> hf: {n_layers} layers") and "float32" in summary and "MiB written" in summary
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not config_dict["tie_word_embeddings"])
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                 attn_implementation="eager")
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    np.testing.assert_allclose(hf_logits(loaded, TOKENS), hf_logits(model, TOKENS), atol=1e-5, rtol=0)
    assert (out / "tokenizer.model").is_file()


def test_hf_config_names_the_tokenizers_special_ids(tmp_path):
    """A LLaMA-3 tokenizer's ids are not transformers' defaults (1 and 2): config.json carries them."""
    import llama_jax
    from llama_jax import LLaMAConfig
    from llama_jax.tokenizer import load_tokenizer
    from tests.test_tokenizer import _tiktoken_file, _toy_ranks

    (tmp_path / "tokenizer.model").write_bytes(_tiktoken_file(_toy_ranks()))
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    cfg = LLaMAConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    llama_jax.save_model(tmp_path / "jax", cfg, llama_jax.init_params(cfg, rng=0),
                         tokenizer=tmp_path / "tokenizer.model")
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (hf.bos_token_id, hf.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id) != (1, 2)
    # a generation config's ids win (LLaMA-3 instruct models end turns with a second EOS); ids it lacks come from
    # the tokenizer
    for generation, expected in (({"temperature": 0.6}, (tokenizer.bos_id, tokenizer.eos_id)),
                                 ({"eos_token_id": [tokenizer.eos_id, 7]}, (tokenizer.bos_id, [tokenizer.eos_id, 7]))):
        (tmp_path / "jax" / "generation_config.json").write_text(json.dumps(generation))
        assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf"),
                     "--overwrite"]) == 0
        written = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert (written["bos_token_id"], written["eos_token_id"]) == expected
    # an end id the model cannot produce is refused before anything is written (it was copied into config.json)
    (tmp_path / "jax" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, cfg.vocab_size]}))
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf2")]) == 2
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_hf_to_hf_keeps_the_source_configs_special_ids(tmp_path, with_tokenizer):
    """Without a generation_config.json, a Hugging Face source's config.json says which ids begin and
    end text (over its tokenizer.model's); transformers would otherwise take 1 and 2."""
    config_dict = {**hf_config_dict("mha"), "bos_token_id": 5, "eos_token_id": [6, 7]}
    src = write_hf_dir(tmp_path / "hf", make_hf_model(config_dict), config_dict, "safetensors")
    (src / "generation_config.json").unlink()
    if not with_tokenizer:
        (src / "tokenizer.model").unlink()
    assert main(["convert", "--from", "hf", "--to", "hf", str(src), str(tmp_path / "out")]) == 0
    written = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert (written.bos_token_id, written.eos_token_id) == (5, [6, 7])


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken"])
def test_hf_output_tokenizer_encodes_as_the_models_own(tmp_path, kind):
    """A tokenizer.model alone (as Meta ships it, or as training makes it) goes to a Hugging Face
    directory with a tokenizer_config.json: without one, AutoTokenizer adds no BOS. Leading and
    repeated spaces (code's indents) encode as SentencePiece does: transformers 5's LlamaTokenizer did not."""
    import llama_jax
    from llama_jax import LLaMAConfig
    from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
    from tests.test_tokenizer import _tiktoken_file, _toy_ranks

    path = tmp_path / "tokenizer.model"
    if kind == "sentencepiece":  # LLaMA-2's settings: BPE, byte fallback
        corpus = EmbeddedCorpus()
        train_sentencepiece((corpus[i] for i in range(len(corpus))), path, 400)
    else:
        path.write_bytes(_tiktoken_file(_toy_ranks()))
    tokenizer = load_tokenizer(path)
    cfg = LLaMAConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    llama_jax.save_model(tmp_path / "jax", cfg, llama_jax.init_params(cfg, rng=0), tokenizer=path)
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf.bos_token_id, hf.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_id)
    assert hf.padding_side == ("left" if kind == "sentencepiece" else "right")
    for text in ("The cat sits on the mat.", "the thing's 12345\n\nend", "héllo wörld 日本", "",
                 " one leading space", "a  double   gap ", "def f():\n    return 1\n"):
        ids = tokenizer.encode(text)
        assert hf(text).input_ids == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), text
    # a tokenizer_config.json of the source's own is carried as it is
    (tmp_path / "jax" / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf2")]) == 0
    assert (tmp_path / "hf2" / "tokenizer_config.json").read_text() == '{"add_bos_token": false}'


def test_bfloat16_output_and_verify(tmp_path, capsys):
    config_dict = hf_config_dict("gqa_llama3", "v4")
    src = write_hf_dir(tmp_path / "hf", make_hf_model(config_dict), config_dict, "safetensors")
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax"),
                 "--dtype", "bfloat16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify hf (transformers) vs jax (llama_jax)" in out and "(ok;" in out
    cfg, params = load_model(tmp_path / "jax")
    assert cfg.param_dtype == "bfloat16" and str(params["embed"]["embedding"].dtype) == "bfloat16"
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf2"),
                 "--verify"]) == 0
    assert "verify jax (llama_jax) vs hf (transformers)" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_a_checkpoint_of_mixed_dtypes_keeps_every_value(tmp_path):
    """bfloat16 embeddings beside float32 weights: the float32 values must not be cut to bfloat16
    because the embedding table happens to be bfloat16."""
    config_dict = hf_config_dict("mha", "v4")
    model = make_hf_model(config_dict)
    model.model.embed_tokens.to(torch.bfloat16)
    src = write_hf_dir(tmp_path / "hf", model, config_dict, "safetensors")
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax")]) == 0
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf2")]) == 0
    assert load_model(tmp_path / "jax")[0].param_dtype == "float32"
    before = safetensors.torch.load_file(src / "model.safetensors")
    after = safetensors.torch.load_file(tmp_path / "hf2" / "model.safetensors")
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor.float()), name  # bfloat16 values are exact in float32


def test_block_transpose_covers_every_element():
    """The converters transpose weights block by block; the test models are smaller than one block,
    so uneven edges and casts are checked here against numpy's own transpose."""
    from ml_dtypes import bfloat16

    from llama_jax.convert.hf import TILE, copy_transposed

    rng = np.random.default_rng(0)
    for rows, cols in ((TILE * 2 + 3, TILE + 1), (TILE, TILE), (1, TILE * 3 - 1), (5, 2)):
        src = rng.standard_normal((rows, cols), np.float32)
        for dtype in (np.float32, bfloat16):
            out = np.full((cols, rows), np.nan, dtype)
            copy_transposed(src, out)
            np.testing.assert_array_equal(out, src.T.astype(dtype))


def test_failed_verification_exits_nonzero_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from llama_jax.convert import hf

    config_dict = hf_config_dict("mha", "v4")
    src = write_hf_dir(tmp_path / "hf", make_hf_model(config_dict), config_dict, "safetensors")
    original = hf.TensorSpec.to_jax

    def wrong_layout(self, w, out):  # a converter bug: q rows taken in the wrong order
        original(self, w, out)
        if self.hf_name.endswith("q_proj.weight"):
            out[...] = out[..., ::-1].copy()

    monkeypatch.setattr(hf.TensorSpec, "to_jax", wrong_layout)
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "jax"), "--verify"]) == 2
    err = _error_line(capsys)
    assert "verification failed" in err and "FAILED" in err
    assert not (tmp_path / "jax").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


# ---- bad input: one line, exit 2, nothing at DST ---------------------------------------------


@pytest.fixture
def good_src(tmp_path):
    config_dict = hf_config_dict("mha", "v4")
    return write_hf_dir(tmp_path / "src", make_hf_model(config_dict), config_dict, "safetensors-sharded")


def _error_line(capsys) -> str:
    """The one error line of a failed command (progress bars aside), checked to be the only one."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("llama-jax")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


def _fails(tmp_path, capsys, src, expected, fmt="hf"):
    dst = tmp_path / "dst"
    assert main(["convert", "--from", fmt, "--to", "jax", str(src), str(dst)]) == 2
    err = _error_line(capsys)
    assert expected in err, err
    assert not dst.exists() and not any(p.name.startswith(".dst") for p in tmp_path.iterdir())


def test_missing_config_json(tmp_path, capsys, good_src):
    (good_src / "config.json").unlink()
    _fails(tmp_path, capsys, good_src, "config.json not found")


def test_shard_named_in_index_but_absent(tmp_path, capsys, good_src):
    (good_src / "model-00002-of-00002.safetensors").unlink()
    _fails(tmp_path, capsys, good_src, "model-00002-of-00002.safetensors: shard named in "
                                       "model.safetensors.index.json is absent")


@pytest.mark.parametrize("value", [3, None, ["a"], "", "../elsewhere/model.safetensors", "/abs/model.safetensors"])
def test_an_index_entry_that_is_not_a_file_name(tmp_path, capsys, good_src, value):
    """(A number, null or list was a TypeError traceback; an empty name was "shard ... is absent"; a
    name outside the directory was read from there.)"""
    index = good_src / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    content["weight_map"]["model.norm.weight"] = value
    index.write_text(json.dumps(content))
    _fails(tmp_path, capsys, good_src, f"model.safetensors.index.json: weight_map['model.norm.weight'] is {value!r}; "
                                       f"valid: the name of the weights file in {good_src} that holds the tensor")


@pytest.mark.parametrize("weight_map", [[], "model.safetensors"])
def test_an_index_whose_weight_map_is_no_object(tmp_path, capsys, good_src, weight_map):
    """(It said "no 'weight_map'" of an index that has one, of another type.)"""
    index = good_src / "model.safetensors.index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "weight_map": weight_map}))
    _fails(tmp_path, capsys, good_src, f"model.safetensors.index.json: 'weight_map' is a {type(weight_map).__name__}; "
                                       f"valid: an object of tensor names and the weights files that hold them")


def test_a_shard_that_is_a_directory(tmp_path, capsys, good_src):
    """(It said "file not found" of a name that is there, as a directory.)"""
    shard = good_src / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.mkdir()
    _fails(tmp_path, capsys, good_src, "model-00002-of-00002.safetensors: shard named in model.safetensors.index.json "
                                       "is a directory, not a file")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_weights_that_are_not_floats_are_refused(tmp_path, capsys, dtype):
    """In a .bin, an integer tensor was converted to floats silently, float8 failed inside torch
    (safetensors files named their dtype already)."""
    config_dict = hf_config_dict("mha", "v4")
    src = write_hf_dir(tmp_path / "src", make_hf_model(config_dict), config_dict, "bin")
    state = torch.load(src / "pytorch_model.bin")
    state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
    torch.save(state, src / "pytorch_model.bin")
    _fails(tmp_path, capsys, src, f"pytorch_model.bin: tensor model.norm.weight has dtype "
                                  f"{str(dtype).removeprefix('torch.')}; supported: float32, float16, bfloat16, "
                                  f"float64")


def test_values_beyond_the_output_dtypes_range_are_refused(tmp_path, capsys, good_src):
    """--dtype float16 made 1e5 inf, silently (only --verify noticed)."""
    state = safetensors.torch.load_file(good_src / "model-00002-of-00002.safetensors")
    name = next(k for k in state if k.endswith("norm.weight"))
    state[name][3] = -1e5
    safetensors.torch.save_file(state, good_src / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "dst"
    assert main(["convert", "--from", "hf", "--to", "hf", str(good_src), str(dst), "--dtype", "float16"]) == 2
    assert _error_line(capsys) == (f"llama-jax convert: error: tensor {name} holds 100000, beyond float16's range "
                                   f"(at most 65504); convert to float32 or bfloat16 instead")
    assert not dst.exists() and not any(p.name.startswith(".dst") for p in tmp_path.iterdir())
    assert main(["convert", "--from", "hf", "--to", "hf", str(good_src), str(dst), "--dtype", "bfloat16"]) == 0


def test_the_default_shard_size_is_what_5GB_means():
    """(It was 5 GiB, where --max-shard-size 5GB, the documented default, gives 5 * 10**9, as transformers does.)"""
    from llama_jax.cli import parse_size
    from llama_jax.convert.pipeline import DEFAULT_MAX_SHARD_BYTES

    assert DEFAULT_MAX_SHARD_BYTES == parse_size("5GB") == 5 * 10**9


@pytest.mark.parametrize("kwargs, message", [
    # options of another format were ignored (the command line refuses them), the rest failed deep inside
    (dict(shards=4), r"^shards applies to output in meta format only$"),  # (its default, 1, is fine)
    (dict(rope_scaling_factor=8.0), r"^rope_scaling_factor applies to input in meta format only$"),
    (dict(max_shard_bytes="5GB"), r"^max_shard_bytes must be a positive integer \(bytes per file\), got '5GB'$"),
    (dict(max_shard_bytes=-1), r"^max_shard_bytes must be a positive integer"),  # was one file per tensor
    (dict(overwrite="no"), r"^overwrite must be True or False, got 'no'$"),  # replaced the destination
    (dict(verify="no"), r"^verify must be True or False, got 'no'$"),
])
def test_convert_api_options_of_the_wrong_kind_are_refused(tmp_path, good_src, kwargs, message):
    from llama_jax.convert.pipeline import convert

    (tmp_path / "dst").mkdir()
    with pytest.raises(ValueError, match=message):
        convert("hf", good_src, "hf", tmp_path / "dst", progress=False, **kwargs)
    assert not any((tmp_path / "dst").iterdir())


def test_convert_api_takes_an_options_default_for_any_format(tmp_path, good_src):
    from llama_jax.convert.pipeline import DEFAULT_MAX_SHARD_BYTES, convert

    convert("hf", good_src, "jax", tmp_path / "jax", shards=1, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, progress=False)
    assert (tmp_path / "jax" / "model_config.json").is_file()


def test_truncated_shard(tmp_path, capsys, good_src):
    shard = good_src / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(tmp_path, capsys, good_src, "model-00001-of-00002.safetensors: truncated")


def test_corrupt_shard(tmp_path, capsys, good_src):
    (good_src / "model-00001-of-00002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _fails(tmp_path, capsys, good_src, "corrupt safetensors header")


@pytest.mark.parametrize("damage, problem", [
    (lambda entry: entry.pop("data_offsets"), "has no data_offsets [begin, end]"),
    (lambda entry: entry.update(data_offsets=[8, 4]), "has no data_offsets [begin, end]"),
    (lambda entry: entry.update(shape="64"), "has no shape of non-negative integers"),
    (lambda entry: entry.pop("dtype"), "has no dtype"),
])
def test_a_damaged_header_entry_is_named(tmp_path, capsys, good_src, damage, problem):
    """A header that is valid JSON but not a safetensors header (each key its writer must give)."""
    import json
    import struct

    shard = good_src / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    damage(header[name])
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    _fails(tmp_path, capsys, good_src, f"corrupt safetensors header (tensor {name} {problem})")


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
    (lambda s: s.update({"model.norm.weight": torch.ones(32)}),
     "model.norm.weight has shape (32,), config expects (64,)"),
])
def test_tensor_problems_are_named(tmp_path, capsys, edit, expected):
    config_dict = hf_config_dict("mha", "v4")
    src = write_hf_dir(tmp_path / "src", make_hf_model(config_dict), config_dict, "safetensors")
    state = safetensors.torch.load_file(src / "model.safetensors")
    edit(state)
    safetensors.torch.save_file(state, src / "model.safetensors")
    _fails(tmp_path, capsys, src, expected)


@pytest.mark.parametrize("name, shape, expected", [
    ("model.layers.1.mlp.stray", (3,), "unexpected tensor model.layers.1.mlp.stray"),
    # another copy of a tensor the index places in the second shard: transformers would load either
    ("model.norm.weight", (64,), "model-00001-of-00002.safetensors: tensor model.norm.weight, which the index places "
                                 "in model-00002-of-00002.safetensors, is in this file too; give each tensor one file"),
])
def test_a_tensor_a_shard_holds_beyond_its_index_is_named(tmp_path, capsys, good_src, name, shape, expected):
    shard = good_src / "model-00001-of-00002.safetensors"
    state = safetensors.torch.load_file(shard)
    assert name not in state
    state[name] = torch.zeros(shape)  # in the file, not in the index
    safetensors.torch.save_file(state, shard)
    _fails(tmp_path, capsys, good_src, expected)


def test_same_values_compares_block_by_block_across_dtypes():
    from llama_jax.convert.source import same_values

    a = np.arange(20, dtype=np.float32).reshape(10, 2)
    a[4, 1] = np.nan
    assert same_values(a, a.astype(ml_dtypes.bfloat16).astype(np.float32), block_rows=3)  # (small integers: exact)
    assert same_values(a, a.astype(ml_dtypes.bfloat16), block_rows=3)
    for row in (0, 9):  # the first block, the last (a partial one)
        b = a.copy()
        b[row, 0] += 1
        assert not same_values(a, b, block_rows=3)
    assert not same_values(a, a[:9], block_rows=3) and not same_values(a, a.reshape(5, 4))


class ReadCount(dict):
    """A state dict that counts the reads of each of its tensors."""

    def __init__(self, state):
        super().__init__(state)
        self.counts = dict.fromkeys(state, 0)

    def __getitem__(self, name):
        self.counts[name] += 1
        return super().__getitem__(name)


def test_a_tied_configs_head_that_is_not_its_embedding_is_refused(tmp_path, capsys):
    """transformers loads such a checkpoint untied, with the file's head; a tied conversion would drop
    it and give other logits. The head a tied model's state_dict carries (the table itself) passes."""
    config_dict = hf_config_dict("mqa_tied", "v4")
    model = make_hf_model(config_dict)
    src = write_hf_dir(tmp_path / "src", model, config_dict, "safetensors")  # lm_head.weight is the table
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "same")]) == 0
    capsys.readouterr()
    state = safetensors.torch.load_file(src / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    safetensors.torch.save_file(state, src / "model.safetensors")
    _fails(tmp_path, capsys, src, "lm_head.weight differs from model.embed_tokens.weight, which config.json ties it "
                                  "to (tie_word_embeddings: true); transformers loads such a checkpoint untied")
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        from_hf_state_dict(state, config_dict)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # as model.state_dict() holds it: passes
    reads = ReadCount(state)
    from_hf_state_dict(reads, config_dict)
    assert reads.counts == {name: 1 for name in state}  # the table, checked and converted, is read once
    config_dict["tie_word_embeddings"] = False  # as the message says: then it converts, with that head
    (src / "config.json").write_text(json.dumps(config_dict))
    assert main(["convert", "--from", "hf", "--to", "jax", str(src), str(tmp_path / "untied")]) == 0
    cfg, params = load_model(tmp_path / "untied")
    reference = transformers.LlamaForCausalLM.from_pretrained(src).eval()  # the file's head, untied
    np.testing.assert_allclose(np.asarray(LLaMA(cfg).apply({"params": params}, TOKENS)), hf_logits(reference, TOKENS),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("change, expected", [
    (dict(model_type="mistral"), "model_type 'mistral' is not supported"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
])
def test_unsupported_architecture(tmp_path, capsys, good_src, change, expected):
    config = json.loads((good_src / "config.json").read_text())
    (good_src / "config.json").write_text(json.dumps({**config, **change}))
    _fails(tmp_path, capsys, good_src, expected)


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    config_dict = hf_config_dict("mha", "v4")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_dict))
    torch.save({"model.embed_tokens.weight": Payload()}, src / "pytorch_model.bin")
    assert not marker.exists()
    _fails(tmp_path, capsys, src, "refused to load")
    assert not marker.exists()


def test_torch_files_of_each_format_and_protocol(tmp_path):
    """torch.save's legacy format is read under the pickle protocols torch's weights-only reader
    reads (2, 3; only 2 was recognised); a file of protocol 4 or 5, zip or legacy, which that reader
    cannot read, says so rather than calling it code or damage."""
    from llama_jax.convert.source import ConversionError
    from llama_jax.convert.torch_io import load_torch_file

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for protocol in (2, 3, 4, 5):
        torch.save(state, tmp_path / f"legacy{protocol}.bin", _use_new_zipfile_serialization=False,
                   pickle_protocol=protocol)
    torch.save(state, tmp_path / "zip4.bin", pickle_protocol=4)
    for protocol in (2, 3):
        assert torch.equal(load_torch_file(tmp_path / f"legacy{protocol}.bin")["w"], state["w"]), protocol
    for name in ("legacy4.bin", "legacy5.bin", "zip4.bin"):
        with pytest.raises(ConversionError, match=rf"{name}: torch's weights-only reader cannot read it \(Unsupported "
                                                  rf"operand \d+: saved with pickle_protocol 4 or 5, or corrupt\)"):
            load_torch_file(tmp_path / name)


def test_existing_destination_needs_overwrite(tmp_path, capsys, good_src):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", "--from", "hf", "--to", "jax", str(good_src), str(dst)]) == 2
    assert "holds 'keep.txt', which is not part of a llama_jax model directory" in _error_line(capsys)
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", "--from", "hf", "--to", "jax", str(good_src), str(dst), "--overwrite"]) == 2
    assert "holds 'keep.txt', which is not part of a llama_jax model directory" in _error_line(capsys)
    assert (dst / "keep.txt").read_text() == "mine"  # --overwrite replaces only what convert writes
    (dst / "keep.txt").unlink()
    assert main(["convert", "--from", "hf", "--to", "jax", str(good_src), str(dst)]) == 2
    assert main(["convert", "--from", "hf", "--to", "jax", str(good_src), str(dst), "--overwrite"]) == 0
    assert main(["convert", "--from", "hf", "--to", "jax", str(good_src), str(dst), "--overwrite"]) == 0
    assert (dst / "model_config.json").is_file()


def test_tools_script_is_the_same_command(tmp_path, good_src):
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "tools" / "convert_weights.py"
    run = subprocess.run([sys.executable, str(script), "--from", "hf", "--to", "jax", str(good_src),
                          str(tmp_path / "j")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "hf -> jax: 2 layers" in run.stdout
    bad = subprocess.run([sys.executable, str(script), "--from", "hf", "--to", "jax", str(tmp_path / "nope"),
                          str(tmp_path / "k")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no such directory")
    assert "Traceback" not in bad.stderr


SIGNAL_WHILE_WRITING = """
import atexit, os, runpy, signal, sys
import orbax.checkpoint as ocp

atexit.register(print, "interpreter teardown", file=sys.stderr)  # as Orbax's and TensorStore's threads print there
original = ocp.Checkpointer.save
def save(self, *args, **kwargs):  # Ctrl-C while the parameters are written
    os.kill(os.getpid(), signal.SIGINT)
    return original(self, *args, **kwargs)
ocp.Checkpointer.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_tools_script_stopped_by_a_signal_ends_as_the_command_does(tmp_path, good_src):
    """tools/convert_weights.py called main() as a library would, so a signal was followed by the
    interpreter's teardown, racing the writes that threads still finished: tracebacks after the
    "interrupted" line, and a temporary directory written into again after its removal. It ends as
    `llama-jax` does: the one line, and no teardown."""
    import subprocess
    import sys

    wrapper = tmp_path / "signal_while_writing.py"
    wrapper.write_text(SIGNAL_WHILE_WRITING)
    script = Path(__file__).parents[1] / "tools" / "convert_weights.py"
    run = subprocess.run([sys.executable, str(wrapper), str(script), "--from", "hf", "--to", "jax", str(good_src),
                          str(tmp_path / "out" / "j")], capture_output=True, text=True)
    assert (run.returncode, run.stderr) == (130, "llama-jax convert: interrupted\n")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
