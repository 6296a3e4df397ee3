"""A model directory's layout and the parts of it that need no JAX: its config, and its
tokenizer and generation files (`llama_jax.checkpoint` reads and writes the parameters).

Layout of a model directory:
    model_config.json   the LLaMAConfig (architecture and numerics)
    params/             an Orbax checkpoint of the parameters (scanned layout)
    tokenizer.model ... tokenizer and generation files, when the model has them
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llama_jax.config import LLaMAConfig
from llama_jax.eval_files import EVAL_FILE, TAGGED_MODEL_EVAL_FILES
from llama_jax.safe_io import OutputKind, broken_link, holds_run, read_json_object

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
LM_EVAL_FILE = "lm_eval.json"  # lm-eval's results beside the model
# llama-jax eval's results are the model's too: an overwrite replaces them with it
MODEL_DIR = OutputKind("llama_jax model directory", (CONFIG_FILE, PARAMS_DIR, *TOKENIZER_FILES, EVAL_FILE,
                                                      TAGGED_MODEL_EVAL_FILES, LM_EVAL_FILE), utf8_path=True)
# how an error about the tokenizer.model beside a model's weights ends: its own cannot be too large
NOT_ITS_OWN = "it cannot be this model's tokenizer (was it replaced?): put the model's own tokenizer.model back"


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation files present in `src_dir`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    return copied


def check_tokenizer_files(directory: str | os.PathLike, config: LLaMAConfig,
                          remedy: str = "use the model's own tokenizer") -> None:
    """ValueError naming the first tokenizer or generation file of `directory` (those that travel
    with a model: `TOKENIZER_FILES`) that a model of `config` could not use: a JSON file that is not
    a JSON object, end ids that are not token ids, a tokenizer.model that does not load or has
    more tokens than the model's vocabulary (the error ends with `remedy`), or a directory (or other
    non-file) under one of their names, which copying them would leave behind unsaid."""
    for name in TOKENIZER_FILES:
        file = Path(directory) / name
        if file.exists() and not file.is_file():
            raise ValueError(f"{file} is {'a directory' if file.is_dir() else 'not a regular file'}, where a model "
                             f"keeps its {name} file; put the file there, or remove it")
        if file.is_file() and file.suffix == ".json":
            read_json_object(file, "generation settings" if name == "generation_config.json" else "tokenizer settings")
    generation_end_ids(directory, config.vocab_size)
    file = Path(directory) / "tokenizer.model"
    if file.is_file():
        check_tokenizer_file(file, config, remedy)


def check_tokenizer_file(file: str | os.PathLike, config: LLaMAConfig, remedy: str = "use the model's own tokenizer"):
    """The tokenizer of `file`; ValueError naming `file` unless it is one whose ids fit a model of
    `config` (ending with `remedy` when it has more)."""
    from llama_jax.tokenizer import check_fits, load_tokenizer

    tokenizer = load_tokenizer(file)  # (its errors name the file)
    try:
        check_fits(tokenizer, config.vocab_size, remedy)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return tokenizer


RECORDED_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta",
                   "rope_scaling", "max_seq_len", "tie_embeddings", "param_dtype")  # in every release's model_config

ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")
# what a model's weights were trained with beyond their shapes; a fine-tune may choose them anew
# (a larger rope_theta or a rope_scaling to extend the context), so they are reported, not required
TRAINED_WITH_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")


def broken_model_link(path: str | os.PathLike) -> str | None:
    """The error for a model directory's `path` through a symbolic link that leads nowhere (to
    nothing, or back to itself: `safe_io.broken_link`), or None. Needs no JAX, so `eval` asks first."""
    leads_nowhere = broken_link(path)
    return f"{leads_nowhere}; give a llama_jax model directory" if leads_nowhere else None


def load_config(path: str | os.PathLike) -> LLaMAConfig:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        problem = broken_model_link(path)
        if problem:
            raise ValueError(problem)
        hint = ""
        if (Path(path) / "checkpoints").is_dir() or holds_run(path):
            hint = f"; it holds a training run: llama-jax export --workdir {path} DST writes a model directory of it"
        elif (Path(path) / "config.json").is_file() or (Path(path) / "params.json").is_file():
            fmt = "hf" if (Path(path) / "config.json").is_file() else "meta"
            hint = (f"; it holds a {'Hugging Face' if fmt == 'hf' else 'Meta'} checkpoint: "
                    f"llama-jax convert --from {fmt} --to jax {path} DST writes a model directory of it")
        raise ValueError(f"{path} is not a llama_jax model directory: {CONFIG_FILE} not found{hint}")
    saved = read_json_object(config_file, "LLaMAConfig fields")
    missing = [name for name in RECORDED_FIELDS if name not in saved]
    if missing:  # (a default would stand in for it: a LLaMA-3 model read at rope_theta 10000, say)
        raise ValueError(f"{config_file} does not record {', '.join(missing)}; every model directory's config records "
                         f"all of {', '.join(RECORDED_FIELDS)} (none is taken from a default): write it back")
    try:
        return LLaMAConfig.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from None


def generation_end_ids(path: str | os.PathLike, vocab_size: int) -> list[int]:
    """The end-of-text ids a model directory's generation_config.json lists (`eos_token_id`: one id
    or several, e.g. LLaMA 3 instruct models' <|end_of_text|>, <|eom_id|> and <|eot_id|>); [] when it
    has none. transformers' `generate` stops a row at any of them, and so does llama-jax. Each must
    be a token id of a model of `vocab_size` tokens."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return []
    ids = read_json_object(file, "generation settings").get("eos_token_id", [])
    ids = [] if ids is None else [ids] if isinstance(ids, int) else ids
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise ValueError(f"{file}: eos_token_id={ids!r}; expected a token id or a list of token ids")
    beyond = [i for i in ids if i >= vocab_size]
    if beyond:
        raise ValueError(f"{file}: eos_token_id {beyond[0]} is not a token id of this model (vocab_size {vocab_size})")
    return ids


def load_tokenizer_for(path: str | os.PathLike, missing: str, tokenizer: str | os.PathLike | None = None):
    """(config, tokenizer) of a model directory: its own tokenizer.model, or `tokenizer` (refused when
    it differs from the directory's own), checked to fit the model's vocabulary. `missing`: how the
    error for a directory without a tokenizer ends (what the caller needs it for)."""
    from llama_jax.safe_io import sha256_file
    from llama_jax.tokenizer import check_fits, load_tokenizer, tokenizer_file

    config = load_config(path)  # fails fast on a directory that is not a model
    own = Path(path) / "tokenizer.model"
    if tokenizer is None and not own.is_file():
        if own.exists() or own.is_symlink():  # (said to be missing, it was there)
            raise ValueError(f"{own} is not a file (a directory, or a link to nothing); {missing}")
        raise ValueError(f"{path} has no tokenizer.model; {missing}")
    given = None if tokenizer is None else tokenizer_file(tokenizer)  # a file, or a directory holding one
    if given is not None and own.is_file() and given.is_file() and sha256_file(given) != sha256_file(own):
        raise ValueError(f"--tokenizer {tokenizer} differs from the model's own {own}; omit --tokenizer to "
                         f"use the tokenizer the model was trained with")
    if tokenizer is None:
        return config, check_tokenizer_file(own, config, NOT_ITS_OWN)
    loaded = load_tokenizer(tokenizer)
    check_fits(loaded, config.vocab_size)
    return config, loaded


def check_same_architecture(saved: dict, config: LLaMAConfig, where: str,
                            advice: str = "use another --workdir or the matching config") -> None:
    """ValueError naming the first architecture field where a saved model differs from `config`."""
    current = config.to_dict()  # rope_scaling as a dict, as saved
    for field in ARCHITECTURE_FIELDS:
        if saved.get(field) != current[field]:
            raise ValueError(f"{where} holds a model with {field}={saved.get(field)}, but the config asks for "
                             f"{field}={current[field]}; {advice}")


def check_init_from(path: str, model: LLaMAConfig, section=None) -> dict[str, str]:
    """ValueError unless `path` is a model directory with the architecture of `model` (made from the
    config's `model` section, whose fields override even the init_from preset) whose tokenizer and
    generation files such a model can use (`check_tokenizer_files`). Returns, by field,
    `field=saved (this run: value)` for the rotary and norm settings the model was trained with
    where this run's differ (a fine-tune extending the context chooses them anew)."""
    from llama_jax.experiment import INIT_FROM_PRESET

    try:
        saved = load_config(path)
        check_tokenizer_files(path, saved, NOT_ITS_OWN)  # the run keeps them for export, which would refuse them
    except (ValueError, OSError) as e:
        raise ValueError(f"checkpoint.init_from: {e}") from None
    advice = "set model.preset=init_from to take its architecture, or give a model of this one"
    set_here = [f for f in ARCHITECTURE_FIELDS if section is not None and section.get(f) is not None]
    if section is not None and section.get("preset") == INIT_FROM_PRESET and set_here:
        advice = (f"model.preset=init_from is set, but the config also sets {', '.join(f'model.{f}' for f in set_here)}"
                  f", which override the model's; set them to None (e.g. --config.model.{set_here[0]}=None)")
    check_same_architecture(saved.to_dict(), model, f"checkpoint.init_from={path}", advice)
    before, now = saved.to_dict(), model.to_dict()
    return {field: f"{field}={before[field]} (this run: {now[field]})" for field in TRAINED_WITH_FIELDS
            if before.get(field) != now[field]}
