"""Experiment configs: Python files whose `get_config()` returns an `ml_collections.ConfigDict`, or the
resolved `config.json` a run writes in its workdir (to run it again).

Any key can be overridden on the command line as `--config.optimizer.lr=3e-4`; an unknown key, a
value of the wrong type or a NaN or infinite number anywhere is an error naming the key. The `model`
section holds `preset` plus any `LLaMAConfig` field by name (None: take the preset's value).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import json
import math
import numbers
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

import ml_collections

from llama_jax.config import (COMPUTE_FIELDS, FLOAT32_MAX, FLOAT32_TINY, LLaMAConfig, RopeScaling, check_flag,
                              check_seed, field_names, in_float32_range)
from llama_jax.safe_io import describe_value, read_json_object
from llama_jax.tokenizer import unicode_problem


def model_section(preset: str = "tiny", **fields) -> ml_collections.ConfigDict:
    """A `model` config section: the preset and every LLaMAConfig field (None = preset's value)."""
    section = {"preset": preset, **{name: None for name in field_names()}}
    unknown = sorted(set(fields) - set(section))
    if unknown:
        raise ValueError(f"model: unknown field(s) {unknown}; valid: preset, {', '.join(field_names())}")
    section.update(fields)
    return ml_collections.ConfigDict(section)


def base_config(preset: str = "tiny", **model_fields) -> ml_collections.ConfigDict:
    """Every config section with its defaults; experiment configs start here and change what they need."""
    from llama_jax import optim

    return ml_collections.ConfigDict(dict(
        model=model_section(preset, **model_fields),
        mesh=dict(data=1, fsdp=-1, tensor=1),
        optimizer=optim.default_config(),
        train=dict(
            steps=1000, batch_size=8, seq_len=512, grad_accum=1, seed=0, z_loss=0.0,
            log_every=10,
            eval_every=0,  # steps between held-out evaluations (0: only at the end of the run)
            eval_batches=4,  # micro-batches of held-out windows per evaluation (-1: the whole held-out set)
            sample_every=0, sample_prompt="The", sample_tokens=48,  # steps between text samples (0: only at the end)
            on_nonfinite="stop",  # or "skip": a step with a NaN/Inf loss or gradient is not applied either way
            profile_steps=0, profile_start=3,  # trace this many steps from profile_start into WORKDIR/profile
        ),
        data=dict(
            source="synthetic",  # prepared | embedded | stdlib | text | jsonl | tfds | synthetic
            path="",  # prepared: a directory written by llama-jax prepare-data
            mixture={},  # prepared, several: {name: {"path": DIR, "weight": w}}, rows drawn in proportion to w
            files=[], text_key="text",  # text/jsonl: paths or globs
            tfds_name="", tfds_split="train", tfds_eval_split="", data_dir="",  # tfds: gs:// needs gcsfs
            eval_fraction=0.01,  # documents held out for evaluation when the source has no eval split
            tokenizer="",  # tokenizer.model path, or "train": SentencePiece trained on the training documents
            tokenizer_vocab_size=8000,
        ),
        checkpoint=dict(
            every=1000, max_to_keep=3, keep_every=0,  # keep_every k: also keep every k-th step forever
            async_save=True,
            init_from="",  # a model directory (llama-jax convert / save_model) to start from, params only
        ),
    ))


INIT_FROM_PRESET = "init_from"
DEFAULTS = base_config().to_dict()  # every section's keys with their default values

# Keys added to `base_config` since sweeps began recording a hash of their config's settings, with
# their defaults: the hash leaves them out while they hold those (`llama_jax.sweep.settings_sha256`),
# so that a sweep started before a key was added still resumes. A key added later belongs here.
LATER_KEYS = {"train.profile_steps": 0, "train.profile_start": 3}


def model_config(section: ml_collections.ConfigDict, init_from: str = "",
                 run_model: LLaMAConfig | None = None) -> LLaMAConfig:
    """The LLaMAConfig of a `model` section. `preset="init_from"` takes the model of the
    `checkpoint.init_from` directory (`init_from`), e.g. a converted checkpoint to fine-tune: its
    shape, rotary embeddings and norm, while how it is computed (`COMPUTE_FIELDS`: float32 master
    weights...) starts from the defaults, as with a preset, not from the directory's storage dtype.
    The section's other fields override the preset's values either way. `run_model`: the model of
    the run being resumed, which then stands for the directory (a run's architecture never changes,
    so the directory is needed only to start it)."""
    overrides = {k: v for k, v in section.items() if k != "preset" and v is not None}
    if isinstance(overrides.get("rope_scaling"), ml_collections.ConfigDict):
        overrides["rope_scaling"] = overrides["rope_scaling"].to_dict()
    if section.preset != INIT_FROM_PRESET:
        try:
            return LLaMAConfig.from_preset(section.preset, **overrides)
        except ValueError as e:  # "n_heads=3 must divide dim=64": named as the config key
            named = re.match(r"\w*", str(e)).group() in (*field_names(), "preset")
            raise ValueError(f"model.{e}" if named else str(e)) from None
    if not init_from:
        raise ValueError("model.preset=init_from needs checkpoint.init_from (a model directory)")
    from llama_jax.model_dir import load_config

    try:
        defaults = LLaMAConfig()
        base = run_model if run_model is not None else load_config(init_from)
        return base.replace(**{**{f: getattr(defaults, f) for f in COMPUTE_FIELDS}, **overrides})
    except (ValueError, OSError) as e:
        raise ValueError(f"checkpoint.init_from: {e}") from None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of a Python config file's `get_config()` (or of a run's config.json), with `key=value`
    overrides applied and every number checked to be finite (see `apply_overrides`)."""
    return apply_overrides(_read_config_file(Path(path)), overrides)


def _read_config_file(path: Path) -> ml_collections.ConfigDict:
    """A config from a `.py` file defining `get_config()`, or from a `.json` file a run wrote (config.json)."""
    _check_file(path)
    config = _json_config(path) if path.suffix == ".json" else _python_config(path)
    base = base_config()
    missing = [name for name in base.keys() if name not in config]
    if missing:
        raise ValueError(f"{path}: the config has no {', '.join(missing)} section(s); start from "
                         "llama_jax.experiment.base_config() (or pass a run's config.json)")
    name = next((name for name in base.keys() if not isinstance(config[name], (ml_collections.ConfigDict, dict))),
                None)
    if name is not None:
        raise ValueError(f"{path}: config.{name} is {config[name]!r}, not a section of keys; start from "
                         "llama_jax.experiment.base_config() and set its keys")
    _check_known_keys(path, config, base)  # no release has dropped a key, so a run's config.json is checked too
    for section in base.keys():
        missing = sorted(set(base[section].keys()) - set(config[section].keys()))
        if missing and path.suffix != ".json":  # (a section replaced by a dict of some of its keys)
            raise ValueError(f"{path}: config.{section} has no {', '.join(missing)}; start from "
                             f"llama_jax.experiment.base_config() and set the keys to change")
        for key in missing:  # a config.json written by an earlier release: the keys added since take their defaults
            config[section][key] = base[section][key]
    return config


def _check_known_keys(path: Path, config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> None:
    """ValueError naming a section or key of `config` that `base` lacks: a misspelt key set in a
    config file (or edited into a run's config.json) would otherwise be ignored, as it is not
    when given as an override."""
    for section in config.keys():
        if section not in base:
            raise ValueError(f"{path}: unknown config section {section!r}; valid: {', '.join(base.keys())}")
        if not isinstance(config[section], ml_collections.ConfigDict):
            continue
        unknown = sorted(set(config[section].keys()) - set(base[section].keys()))
        if unknown:
            raise ValueError(f"{path}: unknown config key '{section}.{unknown[0]}'; valid keys there: "
                             f"{', '.join(sorted(base[section].keys()))}")


def _check_file(path: Path) -> None:
    """ValueError unless `path` is an existing .py or .json file."""
    if path.is_dir():
        from llama_jax.safe_io import holds_run

        hint = f" (or the run's resolved config: {path / 'config.json'})" if holds_run(path) else ""
        raise ValueError(f"{path}: is a directory; expected a Python config file such as configs/tiny.py{hint}")
    file, colon, argument = str(path).rpartition(":")
    if not path.exists() and colon and Path(file).is_file():  # ml_collections' FILE:ARG
        raise ValueError(f"config file {path} not found; llama-jax calls get_config() without an argument, so give "
                         f"--config {file} and set keys with --config.KEY=VALUE instead of :{argument}")
    if not path.is_file():
        raise ValueError(f"config file {path} " + ("is not a regular file; expected a Python config file such as "
                                                   "configs/tiny.py" if path.exists() else "not found"))
    if path.suffix not in (".py", ".json"):
        raise ValueError(f"{path}: not a config file; expected a .py file defining get_config() "
                         "(or the config.json of a run's workdir)")


@contextlib.contextmanager
def config_module(path: Path, name: str) -> Iterator[Any]:
    """The config file `path` run as module `name`, its folder on sys.path while the block runs (as
    for a script: modules beside the file import, from its functions too) and the module in
    sys.modules (as an import puts it: a dataclass defined in the file looks its module up there);
    ValueError naming the file where running it fails."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.absolute().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # SystemExit: e.g. a script parsing its own flags
            raise ValueError(_failure(path, "running it", e)) from None
        yield module
    finally:
        if sys.modules.get(name) is module:
            del sys.modules[name]
        if folder in sys.path:
            sys.path.remove(folder)


def _python_config(path: Path) -> ml_collections.ConfigDict:
    """Run the file as a module and call its `get_config()`; any failure is one line naming the file."""
    with config_module(path, f"llama_jax_config_{path.stem}") as module:
        if not callable(getattr(module, "get_config", None)):
            raise ValueError(f"{path}: defines no get_config()")
        try:
            config = module.get_config()
        except (Exception, SystemExit) as e:
            raise ValueError(_failure(path, "calling get_config()", e)) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{path}: get_config() returned {describe_value(config)}; expected an "
                         "ml_collections.ConfigDict (start from llama_jax.experiment.base_config())")
    return ml_collections.ConfigDict(config)  # (FrozenConfigDicts in it, at any depth, thawed: overrides set them)


def _failure(path: Path, stage: str, e: Exception) -> str:
    """One line for an exception raised while loading a config file."""
    if isinstance(e, SyntaxError) and e.filename == os.fspath(path):
        return f"{path}, line {e.lineno}: syntax error: {e.msg}"
    if isinstance(e, SystemExit):
        return (f"{path}: exited (sys.exit({e.code!r})) while {stage}; a config file defines get_config() "
                "and must not exit or parse command-line flags")
    message = " ".join(str(e).split())
    lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(path)]
    where = f"{path}, line {lines[-1]}" if lines else str(path)  # the file's own line that raised, or called what did
    return f"{where}: {type(e).__name__} while {stage}" + (f": {message}" if message else "")


def _json_config(path: Path) -> ml_collections.ConfigDict:
    """A ConfigDict of the JSON object in `path` (a run's config.json); ValueError for a key given twice."""
    config = read_json_object(path, "config sections (a run's config.json)")
    _check_keys_once(json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_Pairs), path)
    return ml_collections.ConfigDict(config)


class _Pairs(list):
    """A JSON object as its (key, value) pairs in order (json's object_pairs_hook), for `_check_keys_once`."""


def _check_keys_once(value, path: Path, where: str = "") -> None:
    """ValueError naming the first key that an object in `value` (JSON read as _Pairs) gives twice: a JSON
    reader takes the last of its values without a word, so an edited config.json would set another value
    than the one its reader sees first."""
    if isinstance(value, _Pairs):
        keys = [key for key, _ in value]
        twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if twice is not None:
            raise ValueError(f"{path}: key '{where}{twice}' is given twice (JSON keeps the last without a word); "
                             f"give each key once")
        for key, item in value:
            _check_keys_once(item, path, f"{where}{key}.")
    elif isinstance(value, list):
        for item in value:
            _check_keys_once(item, path, where)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `key=value` overrides in place, then check that every number in `config` is finite.
    Overrides of keys the file linked (`get_ref`) whose last values cannot all hold: refused."""
    expected = "overrides must be a list of 'key=value' strings (e.g. ['train.steps=5'])"
    if isinstance(overrides, (str, bytes)):
        raise TypeError(f"{expected}, got the string {overrides!r}")
    overrides = list(overrides)
    bad = next((o for o in overrides if not isinstance(o, str)), None)
    if bad is not None:
        raise TypeError(f"{expected}, got {bad!r} among them")
    applied = {}  # key -> (override, value set); a key given again takes its last value
    changed_by = {}  # key -> the later override that last changed its value (through a link)
    for item in overrides:
        value = apply_override(config, item)
        key = item.split("=", 1)[0]
        for superseded in [k for k in applied if k == key or k.startswith(key + ".")]:  # the key, or inside it
            del applied[superseded]
            changed_by.pop(superseded, None)
        for other, (_, earlier_value) in applied.items():
            if not _same_value(value_at(config, other), earlier_value):
                changed_by[other] = item
        applied[key] = (item, value)
    for key, (item, value) in applied.items():
        if not _same_value(value_at(config, key), value):
            raise ValueError(f"--config.{changed_by[key]} also changed {key}, which the config file links to it "
                             f"(get_ref), so --config.{item} cannot hold; give only one of them")
    _check_mapping_names(config)  # (first: a mapping whose names are of several kinds cannot list its keys)
    _check_linked_values(config)
    check_recordable(config)
    check_settings(config)
    check_finite(config)
    return config


def _check_linked_values(section: ml_collections.ConfigDict, prefix: str = "") -> None:
    """ValueError naming the first key whose value, computed from keys the config file links it to
    (`get_ref` arithmetic), cannot be computed with the values given (a division by zero, say)."""
    for name in section.keys():
        value = _linked_value(section, name, f"{prefix}{name}")
        if isinstance(value, ml_collections.ConfigDict):
            _check_linked_values(value, f"{prefix}{name}.")


def _linked_value(section: ml_collections.ConfigDict, name: str, key: str) -> Any:
    """section[name] (`key`, dotted), whose reading evaluates what the config file computed it from."""
    try:
        return section[name]
    except Exception as e:  # the config file's own expression, evaluated now
        raise ValueError(f"config key {key}, which the config file computes from other keys (get_ref), cannot be "
                         f"computed with the values given ({type(e).__name__}: {e}); check the overrides of the keys "
                         f"it is computed from") from None


def _check_mapping_names(config: ml_collections.ConfigDict) -> None:
    """ValueError unless a mapping of the user's (`MAPPING_KEYS`) is a dict (or None) whose names are
    strings: a number would be written to config.json as a string, which orders otherwise."""
    for key in MAPPING_KEYS:
        value = value_at(config, key)
        if value is not None and not isinstance(value, (dict, ml_collections.ConfigDict)):
            raise ValueError(f"{key} is a {type(value).__name__}; give a dict of names, e.g. {MAPPING_KEYS[key]}")
        try:
            names = list(value or {})
        except TypeError:  # names of several kinds, which cannot even be ordered
            raise ValueError(f"{key}: every name must be a string (quote it, e.g. {{'2': ...}})") from None
        _check_names(key, names)


def _check_names(key: str, names) -> None:
    """ValueError unless each of the names of dict key `key` is a string without a dot (which would
    read as a key inside it)."""
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{key}: every name must be a string (quote it, e.g. {{'2': ...}}), got {name!r}")
        if "." in name:
            raise ValueError(f"{key}: a name may not contain a dot (it would read as a key inside it), got {name!r}")


def _same_value(a: Any, b: Any) -> bool:
    return a is b or a == b  # (`is`: a NaN is itself, for check_finite to name)


def value_at(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value of the dotted `key` in `config` (KeyError where it has none)."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check_recordable(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first key (dotted) whose value the run's config.json cannot record as it
    is: a NumPy scalar (np.float32(1e-5)), a set or another object was written there as text
    ("unserializable object: 1e-05"), which `--config DIR/config.json` then refused. A RopeScaling
    (model.rope_scaling) is written as its dict."""
    for key, value in _leaves(config, ""):
        if value is not None and not isinstance(value, (str, int, float, RopeScaling)):  # (bool: an int)
            raise ValueError(f"config key {key} holds {describe_value(value)}, which the run's config.json cannot "
                             f"record; give a Python value (int(x), float(x), bool(x), a string, or a list or dict "
                             f"of them)")


def check_settings(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first setting that holds a section of keys (a file's section replaced
    by a dict giving `'lr': {'a': 1}`: the messages about it printed the keys over several lines), or
    a checkpoint.init_from that is no path (an int was a traceback)."""
    for section, defaults in DEFAULTS.items():
        node = config.get(section)
        for key, default in defaults.items() if isinstance(node, (dict, ml_collections.ConfigDict)) else ():
            value = node.get(key)
            if (isinstance(value, (dict, ml_collections.ConfigDict)) and not isinstance(default, dict)
                    and f"{section}.{key}" not in DICT_KEYS):
                shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
                raise ValueError(f"config key {section}.{key} is a setting, not a section of keys; got {shown!r}")
    init_from = config.checkpoint.get("init_from") if "checkpoint" in config else None
    if init_from is not None and not isinstance(init_from, str):
        raise ValueError(f"checkpoint.init_from must be a model directory's path (a string; '' for none), got "
                         f"{describe_value(init_from)}")


def check_finite(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first key (dotted) whose value is a NaN or infinite number, a number
    beyond float32's range, or one so near 0 that float32 holds it as 0 (training computes in float32:
    an optimizer.eps of 1e-40 is a division by 0, a clip_norm of 1e-40 clips every update to 0)."""
    for key, value in _leaves(config, ""):
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and not in_float32_range(value):
            raise _huge_whole_number(key, value)  # (math.isfinite cannot take it)
        if isinstance(value, numbers.Real) and not math.isfinite(value):
            raise ValueError(f"config key {key}: {value} is not a finite number")
        if isinstance(value, float) and not in_float32_range(value):
            raise ValueError(f"config key {key}: {value} is beyond float32's range (|x| <= {FLOAT32_MAX:.1e}); give a "
                             "value of a usual size")
        if isinstance(value, float) and 0 < abs(value) < FLOAT32_TINY:
            raise ValueError(f"config key {key}: {value} is below float32's smallest normal number "
                             f"({FLOAT32_TINY:.1e}), so training would compute with 0; give a value of a usual size")


def _huge_whole_number(key: str, value: int) -> ValueError:
    return ValueError(f"config key {key}: a whole number of {len(str(abs(value)))} digits is beyond float32's range "
                      f"(|x| <= {FLOAT32_MAX:.1e}); give a value of a usual size")


MAX_STEPS = 2**31 - 1  # the train state's step counter (and optax's) is int32, as JAX keeps integers without x64
MAX_TOKENS_PER_STEP = 2**31  # tokens per step: far above any real run (LLaMA 3 405B: 16M); catches a typo early
ON_NONFINITE = ("stop", "skip")  # train.on_nonfinite: what a step with a non-finite loss or gradient does
NONFINITE_STOP = "loss or gradient became NaN/Inf"  # how the error of a run it stopped begins (a sweep reads it)


def check_config(config: ml_collections.ConfigDict, read_init_from: bool = True,
                 run_model: LLaMAConfig | None = None) -> LLaMAConfig | None:
    """ValueError for a value no run of `config` could use, on any mesh: every check of a config
    short of the devices it trains on (`train.validate_config` adds those). Imports no JAX.
    `read_init_from=False`: a model taken from `checkpoint.init_from` is not read (nor checked),
    for a config checked away from the machine it will run on, or before a resume that takes it
    from the run (`run_model`, as in `model_config`). Returns the model's config (None when not
    read)."""
    from llama_jax import optim

    check_recordable(config)
    check_settings(config)
    check_finite(config)
    check_train_section(config.train)
    check_data_section(config.data)
    check_run_source(config.data)
    model = None
    if read_init_from or config.model.preset != INIT_FROM_PRESET:
        model = model_config(config.model, config.checkpoint.init_from, run_model)
        if config.train.seq_len > model.max_seq_len:
            raise ValueError(f"train.seq_len={config.train.seq_len} exceeds the model's "
                             f"max_seq_len={model.max_seq_len}; lower train.seq_len or raise model.max_seq_len to "
                             f"at least it")
    optim.validate(config.optimizer, config.train.steps)
    return model


def check_experiment(config: ml_collections.ConfigDict, read_init_from: bool = True) -> LLaMAConfig | None:
    """ValueError for anything `llama-jax train` would refuse in `config` before it needs devices:
    `check_config`, `check_run_settings` and, with `read_init_from` (a new run), a
    `checkpoint.init_from` that is no model directory of the config's model
    (`model_dir.check_init_from`). Imports no JAX. Returns the model's config (None when not read,
    as `check_config`)."""
    from llama_jax.model_dir import check_init_from

    model = check_config(config, read_init_from)
    check_run_settings(config)
    if read_init_from and config.checkpoint.init_from:
        check_init_from(config.checkpoint.init_from, model, config.model)
    return model


def check_run_settings(config: ml_collections.ConfigDict) -> None:
    """ValueError for a run-loop setting (evaluation, sampling, checkpoints, non-finite steps) no run could use."""
    t, c = config.train, config.checkpoint
    if t.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"train.on_nonfinite={t.on_nonfinite!r}; valid: {', '.join(ON_NONFINITE)}")
    if not isinstance(t.sample_prompt, str):
        raise ValueError(_not_a_string("train.sample_prompt", t.sample_prompt))
    if problem := unicode_problem(t.sample_prompt, from_argv=True):  # as an override gives it
        raise ValueError(f"train.sample_prompt is not UTF-8 text ({problem})")
    check_flag(c.async_save, "checkpoint.async_save")
    for key in ("eval_every", "sample_every", "sample_tokens"):
        if not _is_int(t[key]) or t[key] < 0:
            raise ValueError(f"train.{key} must be a non-negative integer, got {t[key]!r}")
    if not _is_int(t.eval_batches) or t.eval_batches < -1:
        raise ValueError(f"train.eval_batches must be a non-negative integer or -1 (the whole held-out set), "
                         f"got {t.eval_batches!r}")
    _check_eval_and_samples(t, config.data.source)
    _check_profile(t)
    if not _is_int(c.every) or c.every < 1:
        raise ValueError(f"checkpoint.every must be a positive integer, got {c.every!r}")
    if c.max_to_keep is not None and (not _is_int(c.max_to_keep) or c.max_to_keep < 1):
        raise ValueError(f"checkpoint.max_to_keep must be a positive integer (the final step is always kept) "
                         f"or None (keep every checkpoint), got {c.max_to_keep!r}")
    if not _is_int(c.keep_every) or c.keep_every < 0:
        raise ValueError(f"checkpoint.keep_every must be a non-negative integer (0: none kept beyond max_to_keep), "
                         f"got {c.keep_every!r}")
    if c.keep_every and c.keep_every % c.every:
        raise ValueError(f"checkpoint.keep_every={c.keep_every} is not a multiple of checkpoint.every={c.every}, "
                         f"so no checkpoint would be kept by it; use a multiple of {c.every}")


def _check_profile(t: ml_collections.ConfigDict) -> None:
    """ValueError for traced steps (`train.profile_steps` from `train.profile_start`) outside the run."""
    if not _is_int(t.profile_steps) or t.profile_steps < 0:
        raise ValueError(f"train.profile_steps must be a non-negative integer (0: no trace), got {t.profile_steps!r}")
    if not _is_int(t.profile_start) or t.profile_start < 2:
        raise ValueError(f"train.profile_start must be a step number of at least 2 (step 1 compiles the train step), "
                         f"got {t.profile_start!r}")
    last = t.profile_start + t.profile_steps - 1
    if t.profile_steps and _is_int(t.steps) and last > t.steps:
        raise ValueError(f"train.profile_start={t.profile_start} + train.profile_steps={t.profile_steps} traces up "
                         f"to step {last}, past train.steps={t.steps}; trace steps within the run")


def _check_eval_and_samples(t: ml_collections.ConfigDict, source: str) -> None:
    """ValueError for periodic evaluations or samples that the rest of the config would make empty."""
    if t.eval_every and not t.eval_batches:
        raise ValueError(f"train.eval_every={t.eval_every} but train.eval_batches=0 evaluates nothing; set "
                         f"eval_batches > 0 (-1: the whole held-out set) or train.eval_every=0")
    if t.sample_every and not t.sample_tokens:
        raise ValueError(f"train.sample_every={t.sample_every} but train.sample_tokens=0 samples nothing; set "
                         f"sample_tokens > 0 or train.sample_every=0")
    if source == "synthetic":
        for key, what in (("eval_every", "held-out set to evaluate"), ("sample_every", "tokenizer to sample with")):
            if t[key]:
                raise ValueError(f"train.{key}={t[key]} but data.source=synthetic has no {what}; "
                                 f"set train.{key}=0 or train on real data")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


EMPTY_MEANS_NONE = ("train.sample_prompt", "data.path", "data.tfds_name", "data.tfds_eval_split", "data.data_dir",
                    "data.tokenizer")  # string keys whose '' leaves them unset
DATA_STRING_KEYS = ("source", "path", "text_key", "tfds_name", "tfds_split", "tfds_eval_split", "data_dir", "tokenizer")


def _not_a_string(key: str, value) -> str:
    """The message for a string key holding `value`; None (an override's `None` or `null`) says how
    to give that text."""
    unset = "'' for none; " if key in EMPTY_MEANS_NONE else ""
    quoted = f" ({unset}for the text None, quote it: \"--config.{key}='None'\")" if value is None else ""
    return f"{key} must be a string, got {value!r}{quoted}"


def check_data_section(d: ml_collections.ConfigDict) -> None:
    """ValueError for a `data` value of the wrong kind; what each source needs is checked when it is opened."""
    for key in DATA_STRING_KEYS:
        if not isinstance(d[key], str):
            raise ValueError(_not_a_string(f"data.{key}", d[key]))
    if not isinstance(d.files, (list, tuple)) or not all(isinstance(f, str) for f in d.files):
        raise ValueError(f"data.files must be a list of paths or glob patterns (strings), got {d.files!r}")
    fraction = d.eval_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"data.eval_fraction must be a number with 0 <= eval_fraction < 1, got {fraction!r}")
    if not 0 <= fraction < 1:
        raise ValueError(f"data.eval_fraction={fraction} is out of range; valid: 0 <= eval_fraction < 1")


SOURCE_KEYS = {"path": ("prepared",), "mixture": ("prepared",), "files": ("text", "jsonl"), "tfds_name": ("tfds",)}


def _unset(key: str) -> str:
    """How to unset data key `key` on the command line."""
    return {"mixture": "data.mixture={}", "files": "data.files=[]"}.get(key, f"data.{key}=''")


def check_run_source(d: ml_collections.ConfigDict) -> None:
    """ValueError unless `data.source` is one a run can train on."""
    from llama_jax.data import SOURCES

    if d.source not in ("prepared", *SOURCES):
        raise ValueError(f"data.source={d.source!r} is not supported; valid: prepared, {', '.join(SOURCES)}")
    for key, readers in SOURCE_KEYS.items():  # a source's key set for another: the run would not train on it
        if d.source not in ("prepared", *readers) and d[key]:  # (prepared data may keep the keys it came from)
            raise ValueError(f"data.{key} is set, but data.source={d.source} does not read it; set data.source="
                             f"{' or '.join(readers)} to train on it, or {_unset(key)}")


def check_train_section(t: ml_collections.ConfigDict) -> None:
    """ValueError for a `train` value no run could use: sizes and counts, the seed, the z-loss weight."""
    for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
        if not _is_int(t[key]) or t[key] < 1:
            raise ValueError(f"train.{key} must be a positive integer, got {t[key]!r}")
    if t.steps > MAX_STEPS:
        raise ValueError(f"train.steps={t.steps:,} is more than the step counter holds (int32 on the devices); "
                         f"valid: at most 2**31 - 1 = {MAX_STEPS:,}")
    check_seed(t.seed, "train.seed")
    if isinstance(t.z_loss, bool) or not isinstance(t.z_loss, (int, float)) or t.z_loss < 0:
        raise ValueError(f"train.z_loss must be a number >= 0 (0: no z-loss), got {t.z_loss!r}")
    if t.batch_size * t.seq_len > MAX_TOKENS_PER_STEP:
        raise ValueError(f"train.batch_size x train.seq_len = {t.batch_size * t.seq_len:,} tokens per step; at most "
                         f"2**31 = {MAX_TOKENS_PER_STEP:,} (LLaMA 3 405B trained on 16M)")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")


def _leaves(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf under `node`, descending into sections, dicts and sequences."""
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        for name, value in node.items():
            yield from _leaves(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{key}[{i}]")
    else:
        yield key, node


def _sections(node: ml_collections.ConfigDict) -> list[str]:
    """The keys of `node` that hold sections (a value linked to others that fails to compute now is none)."""
    def is_section(key: str) -> bool:
        try:
            return isinstance(node[key], ml_collections.ConfigDict)
        except Exception:  # (computed by `get_ref` from values that fail now)
            return False
    return sorted(filter(is_section, node.keys()))


def apply_override(config: ml_collections.ConfigDict, item: str) -> Any:
    """Apply one `a.b.c=value` override in place, checking the key exists and the type fits; the
    value set. A key the file linked to others (`get_ref`) sets them too, as ml_collections does."""
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value, e.g. optimizer.lr=3e-4")
    key, text = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            where = f"sections of {'.'.join(parents[:i])}" if i else "sections"
            raise ValueError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in override {item!r}); valid "
                             f"{where}: {', '.join(_sections(node)) or 'none'}")
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):  # train.steps.x: a key inside a value
            setting = ".".join(parents[:i + 1])
            raise ValueError(f"unknown config key {key!r}: {setting} is a setting holding {describe_value(node)}, "
                             f"not a section of keys; set it whole: --config.{setting}=VALUE")
    if leaf not in node:
        raise ValueError(f"unknown config key {key!r}; valid keys there: {', '.join(sorted(node.keys()))}")
    try:
        current = node[leaf]
    except Exception:  # computed (get_ref) from values that fail now: this override may replace it; if
        current = None  # it still fails once all are applied, `_check_linked_values` names it
    if isinstance(current, int) and not isinstance(current, bool) and _decimal_field(key):
        current = float(current)  # a decimal field holding a whole number (rope_theta=500000) takes 1e6 too
    value = _parse(text)
    if not parents and value is None:
        raise ValueError(f"config key {key!r} is a section and cannot be None; set its keys "
                         f"(--config.{key}.KEY=VALUE)")
    if isinstance(current, str) and value is not None and not isinstance(value, str):
        value = text  # a string key takes the text as given (a prompt "1984", a path "2024")
    if isinstance(value, float) and value == 0 and any(d in "123456789" for d in text.lower().split("e")[0]):
        raise ValueError(f"config key {key!r}: {text} is too small for a float (it would be 0.0); give 0 if that is "
                         f"meant")
    if key in DICT_KEYS and isinstance(value, dict):
        _check_names(key, value)
        current = value = ml_collections.ConfigDict(value)  # the whole dict, replaced
    elif key in DICT_KEYS and current is None and value is not None:  # (model.rope_scaling's default)
        raise ValueError(f"config key {key!r} takes a Python dict or None, got {text!r} ({type(value).__name__}); "
                         f"give a Python dict: \"--config.{key}={DICT_KEYS[key]}\"")
    if current is not None and value is not None:
        if isinstance(current, ml_collections.ConfigDict) and key not in DICT_KEYS:  # (optimizer=adamw)
            raise ValueError(f"config key {key!r} is a section of keys ({', '.join(sorted(current.keys()))}), not a "
                             f"setting; set one of them: --config.{key}.KEY=VALUE")
        if isinstance(current, bool) != isinstance(value, bool) or not isinstance(value, _compatible(current)):
            hint = ""
            if isinstance(current, (list, tuple)) and isinstance(value, str):
                hint = (f"; quote the strings in a list: \"--config.{key}=['a', 'b']\"" if text.strip().startswith("[")
                        else f"; give a list, even of one: \"--config.{key}=[{text!r}]\"")
            if _is_int(current) and isinstance(value, float) and value.is_integer() and in_float32_range(value):  # 1e3
                hint = f"; give a whole number: --config.{key}={int(value)}"
            if key in DICT_KEYS:  # (a dict with a syntax error reads as text)
                hint = f"; give a Python dict: \"--config.{key}={DICT_KEYS[key]}\""
            raise ValueError(f"config key {key!r} is {type(current).__name__}, got {text!r} "
                             f"({type(value).__name__}){hint}")
        if isinstance(current, float):
            try:
                value = float(value)
            except OverflowError:  # a whole number too large for a float
                raise _huge_whole_number(key, value) from None
        if isinstance(current, tuple):
            value = tuple(value)
    with node.ignore_type():
        node[leaf] = value
    return node[leaf]


# keys whose value is a mapping of the user's names, given whole as a dict -> an example of one
MAPPING_KEYS = {"data.mixture": "{'web': {'path': '/data/web', 'weight': 0.8}, 'code': {'path': '/data/code', "
                                "'weight': 0.2}}"}
# every key given whole as a dict (which replaces the dict it held) -> an example of one
DICT_KEYS = {**MAPPING_KEYS, "model.rope_scaling": "{'rope_type': 'linear', 'factor': 2.0}"}


def _decimal_field(key: str) -> bool:
    """Whether `key` holds a real number even when a whole one was given: a key whose default is a
    float (a run's config.json edited to `"weight_decay": 0`), the fields `LLaMAConfig` and
    `RopeScaling` type float, and mixture weights."""
    parts = key.split(".")
    if parts[:2] == ["model", "rope_scaling"] and len(parts) == 3:
        return parts[2] in _float_fields(RopeScaling)
    if parts[0] == "model" and len(parts) == 2:
        return parts[1] in _float_fields(LLaMAConfig)
    if len(parts) == 2 and parts[0] in DEFAULTS:
        return isinstance(DEFAULTS[parts[0]].get(parts[1]), float)
    return parts[:2] == ["data", "mixture"] and len(parts) == 4 and parts[3] == "weight"


def _float_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.type in (float, "float")}


# what ast.literal_eval raises for text that is no literal; TypeError: a list or dict as a set member or
# dict key ({[1]}); MemoryError: nesting past the parser's stack (---...1)
NOT_A_LITERAL = (ValueError, SyntaxError, TypeError, MemoryError)


def _parse(text: str):
    """Python literal if it parses as one (numbers, nan/inf, True/False/None, tuples, lists), else the string."""
    lowered = {"true": True, "false": False, "none": None, "null": None}.get(text.strip().lower(), text)
    if lowered is not text:
        return lowered
    if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)  # not literals, but meant as numbers: reported as non-finite, not as strings
    try:
        return ast.literal_eval(text)
    except NOT_A_LITERAL:
        return text


def _compatible(current) -> tuple[type, ...]:
    if isinstance(current, bool):
        return (bool,)
    if isinstance(current, float):
        return (float, int)
    if isinstance(current, (tuple, list)):
        return (tuple, list)
    return (type(current),)
