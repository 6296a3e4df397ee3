"""Hugging Face model directories on disk: config.json plus safetensors or PyTorch .bin weights.

Reads `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin` and sharded `.bin` with `pytorch_model.bin.index.json` (the first found, in this
order, as transformers loads them), or the one config.json's `transformers_weights` names; writes
config.json and sharded safetensors with an index, as `transformers.LlamaForCausalLM.from_pretrained`
expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from llama_jax.config import LLaMAConfig
from llama_jax.convert.hf import check_names, check_shape, check_tied_head, tensor_specs
from llama_jax.convert.safetensors_io import SafetensorsFile, write_shards
from llama_jax.convert.source import ConversionError, Source, stored_dtype
from llama_jax.convert.torch_io import load_torch_file, tensor_to_numpy, weight_dtype
from llama_jax.safe_io import read_json_object

WEIGHT_LAYOUTS = (  # (single file, index file), in transformers' order of preference
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def read_json(path: Path, holds: str) -> dict:
    """The JSON object in `path`; ConversionError when it is missing, not JSON or not an object."""
    if not path.is_file():
        raise ConversionError(f"{path}: not found")
    try:
        return read_json_object(path, holds)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _weight_map(src: Path, named: object = None) -> dict[str, str]:
    """Tensor name -> file name, from the single weights file or an index, in transformers' order:
    a single file before an index of the same format (a directory may hold both); or from `named`,
    config.json's `transformers_weights`, the one file (a .safetensors file or index) that
    transformers then loads."""
    layouts = WEIGHT_LAYOUTS if named is None else [_named_layout(src, named)]
    for single, index in layouts:
        if single is not None and (src / single).is_file():
            return {name: single for name in _open(src / single).keys()}
        if index is not None and (src / index).is_file():
            weight_map = read_json(src / index, "tensor names and files").get("weight_map")
            if not isinstance(weight_map, dict):
                found = "no 'weight_map'" if weight_map is None else f"'weight_map' is a {type(weight_map).__name__}"
                raise ConversionError(f"{src / index}: {found}; valid: an object of tensor names and the weights files "
                                      f"that hold them")
            for name, file_name in weight_map.items():
                if not _is_file_name(file_name):
                    raise ConversionError(f"{src / index}: weight_map[{name!r}] is {file_name!r}; valid: the name of "
                                          f"the weights file in {src} that holds the tensor")
            for file_name in sorted(set(weight_map.values())):
                if not (src / file_name).is_file():
                    problem = "is a directory, not a file" if (src / file_name).is_dir() else "is absent"
                    raise ConversionError(f"{src / file_name}: shard named in {index} {problem}")
            return weight_map
    if named is not None:
        raise ConversionError(f"{src / named}: not found; config.json names it as transformers_weights, the weights "
                              f"to load")
    raise ConversionError(f"{src}: no weights found; expected one of "
                          + ", ".join(name for pair in WEIGHT_LAYOUTS for name in pair))


def _named_layout(src: Path, named: object) -> tuple[str | None, str | None]:
    """(single file, index file) for config.json's `transformers_weights`, one of them None."""
    if not (_is_file_name(named) and named.endswith((".safetensors", ".safetensors.index.json"))):
        raise ConversionError(f"{src / 'config.json'}: transformers_weights={named!r} is not supported; valid: the "
                              f"name of a .safetensors file or a .safetensors.index.json in {src}, or null")
    return (None, named) if named.endswith(".index.json") else (named, None)


def _is_file_name(name: object) -> bool:
    """Whether `name` names a file inside the model directory (not an absolute path, nor one with '..')."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


class _TorchFile:
    """A .bin state dict with the SafetensorsFile reading interface."""

    def __init__(self, path: Path):
        self.path, self._state = path, load_torch_file(path)

    def keys(self):
        return list(self._state)

    def shape(self, name):
        return tuple(self._state[name].shape)

    def dtype(self, name):
        return weight_dtype(self._state[name], self.path, name)

    def read(self, name):
        return tensor_to_numpy(self._state[name])

    def close(self):
        self._state = {}


def _open(path: Path):
    return SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def read_hf_dir(src: str | Path) -> Source:
    src = Path(src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src}: config.json not found; a Hugging Face model directory needs one")
    hf = read_json(config_path, "model settings")
    if {"model", "train", "checkpoint"} <= set(hf):  # a run's resolved config
        raise ConversionError(f"{src} is a llama-jax training run, not a Hugging Face model directory; write its "
                              f"checkpoint as a model directory with llama-jax export, then convert --from jax")
    try:
        config = LLaMAConfig.from_hf(hf)
    except ConversionError:
        raise
    except ValueError as e:  # from_hf's messages start with "config.json: ", which config_path already names
        raise ConversionError(f"{config_path}: {str(e).removeprefix('config.json: ')}") from None
    weight_map = _weight_map(src, hf.get("transformers_weights"))
    try:
        check_names(config, set(weight_map))
    except ValueError as e:
        raise ConversionError(f"{src}: {e}") from None

    files = {}

    def load(name: str) -> np.ndarray:
        return files[weight_map[name]].read(name)

    def close():
        for f in files.values():
            f.close()

    try:  # (the files opened so far are closed on an error)
        for file_name in sorted(set(weight_map.values())):
            files[file_name] = _open(src / file_name)
        specs = _checked_tensors(src, config, weight_map, files)
        if config.tie_embeddings and "lm_head.weight" in weight_map:  # (Hub files of tied models have none)
            try:
                check_tied_head(config, load("model.embed_tokens.weight"), load("lm_head.weight"))
            except ConversionError:  # (it names its file)
                raise
            except ValueError as e:
                raise ConversionError(f"{src}: {e}") from None
        dtype = stored_dtype(files[weight_map[name]].dtype(name) for name in specs)
    except BaseException:
        close()
        raise
    return Source(config, load, dtype, src, close)


def _checked_tensors(src: Path, config: LLaMAConfig, weight_map: dict[str, str], files: dict) -> dict:
    """The config's tensors by name, once every file holds those its index names, in the config's
    shapes, and no other (a tensor a shard holds beyond those its index lists is unexpected, as
    transformers reports it; one that another shard holds as well is refused: transformers loads
    every shard whole, the copy in the shard last by name); ConversionError naming the file otherwise."""
    held = {file_name: set(f.keys()) for file_name, f in files.items()}
    try:
        check_names(config, set(weight_map).union(*held.values()))
    except ValueError as e:
        raise ConversionError(f"{src}: {e}") from None
    specs = {spec.hf_name: spec for spec in tensor_specs(config)}
    for name, spec in specs.items():  # every shape checked before anything is written
        f = files[weight_map[name]]
        if name not in held[weight_map[name]]:
            raise ConversionError(f"{f.path}: tensor {name} named in the index is absent from this file")
        if others := sorted(file_name for file_name, keys in held.items() if name in keys
                            and file_name != weight_map[name]):
            raise ConversionError(f"{src / others[0]}: tensor {name}, which the index places in {weight_map[name]}, is "
                                  f"in this file too; give each tensor one file")
        try:
            check_shape(spec, f.shape(name))
        except ValueError as e:
            raise ConversionError(f"{f.path}: {e}") from None
    return specs


def write_hf_dir(dst: Path, config: LLaMAConfig, load: Callable[[str], np.ndarray],
                 max_shard_bytes: int = 5 * 10**9, token_ids: dict | None = None) -> int:
    """config.json + (sharded) safetensors + index into `dst`; returns bytes of weights written.

    Weights are written in `config.param_dtype`; tied models carry no `lm_head.weight`.
    `token_ids`: `special_token_ids` of the tokenizer files that go with the weights.
    """
    specs = tensor_specs(config)
    index = write_shards(dst, [(s.hf_name, s.hf_shape, config.param_dtype) for s in specs], load, max_shard_bytes)
    (dst / "config.json").write_text(json.dumps({**config.to_hf("v4"), **(token_ids or {})}, indent=2) + "\n")
    return index["metadata"]["total_size"]


def special_token_ids(directory: Path, hf_source: bool = False) -> dict:
    """The beginning- and end-of-text ids for a config.json, from DIRECTORY's generation_config.json
    where it has them, else (`hf_source`: DIRECTORY is a Hugging Face model directory) from its
    config.json, else from its tokenizer.model: without them transformers assumes 1 and 2 (LLaMA-2's
    SentencePiece ids; LLaMA-3's are 128000 and 128001)."""
    from llama_jax.tokenizer import load_tokenizer

    ids = {}
    files = {"generation_config.json": "generation settings"}
    if hf_source:
        files["config.json"] = "model settings"
    for name, holds in files.items():  # the model's own word first (e.g. several EOS ids); an earlier file's wins
        if (directory / name).is_file():
            settings = read_json(directory / name, holds)
            found = {key: settings[key] for key in ("bos_token_id", "eos_token_id") if settings.get(key) is not None}
            ids = {**found, **ids}
    if len(ids) < 2 and (directory / "tokenizer.model").is_file():
        try:
            tokenizer = load_tokenizer(directory / "tokenizer.model")
        except ValueError:  # carried along as it is; the weights do not depend on it
            return ids
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, **ids}
    return ids


def write_tokenizer_config(directory: Path) -> None:
    """A tokenizer_config.json for DIRECTORY's tokenizer.model when it has neither that file nor a
    tokenizer.json: without one, transformers' AutoTokenizer loads the file as a generic tokenizer
    that adds no BOS (and knows no BOS or EOS for a LLaMA-3 file), so its ids are not the model's.
    A SentencePiece file is named a generic fast tokenizer too, not a LlamaTokenizer: transformers 5's
    LlamaTokenizer splits leading and repeated spaces otherwise than SentencePiece (" a", code's indents)."""
    from llama_jax.tokenizer import LLAMA3_SPECIAL_TOKENS, SentencePieceTokenizer, load_tokenizer

    if not (directory / "tokenizer.model").is_file() or any(
            (directory / name).exists() for name in ("tokenizer_config.json", "tokenizer.json")):
        return
    tokenizer = load_tokenizer(directory / "tokenizer.model")  # (checked before anything was written)
    if isinstance(tokenizer, SentencePieceTokenizer):  # (converted by LLaMA's own rules only under this class)
        def piece(i):  # (a model may have no BOS, EOS or unknown piece: id -1)
            return tokenizer.sp.id_to_piece(i) if i >= 0 else None

        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(tokenizer.bos_id),
                    "eos_token": piece(tokenizer.eos_id), "unk_token": piece(tokenizer.sp.unk_id()),
                    "padding_side": "left"}  # (LlamaTokenizer's: batched generation pads on the left)
    else:  # LLaMA 3's tiktoken ranks: the special tokens follow them, as the tokenizer's ids do
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": LLAMA3_SPECIAL_TOKENS,
                    "bos_token": LLAMA3_SPECIAL_TOKENS[0], "eos_token": LLAMA3_SPECIAL_TOKENS[1]}
    settings.update(add_bos_token=tokenizer.bos_id >= 0, add_eos_token=False)
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
