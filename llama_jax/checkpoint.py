"""Self-describing model directories: `save_model` / `load_model`.

Layout of a model directory:
    model_config.json   the LLaMAConfig (architecture and numerics)
    params/             an Orbax checkpoint of the parameters (scanned layout)
    tokenizer.model ... tokenizer and generation files, when the model has them
The directory is written beside its destination and renamed into place when complete, so a
failed save never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.config import LLaMAConfig
from llama_jax.model import abstract_params, check_params, stack_layers, unstack_layers

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dst`; on success it replaces `dst`, on error it is removed."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_model(path: str | os.PathLike, config: LLaMAConfig, params, tokenizer_dir: str | os.PathLike | None = None,
               overwrite: bool = False) -> Path:
    """Write config, parameters and (from `tokenizer_dir`, if given) tokenizer files to `path`."""
    if "layers" not in params:
        params = stack_layers(dict(params), config.n_layers)
    params = nn.meta.unbox(params)
    check_params(config.replace(scan_layers=True), params)
    with atomic_directory(path, overwrite) as tmp:
        write_model_dir(tmp, config, params)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(path)


def write_model_dir(directory: Path, config: LLaMAConfig, params) -> None:
    """Config and (scanned, unboxed) parameters into an existing empty directory.

    The save is synchronous, so host arrays are written in place rather than first copied (Orbax's
    default for numpy leaves), and uncompressed: compression buffers cost about the model's size
    again in memory and gain little on float weights. Converting a checkpoint therefore needs
    one copy of the model in memory, not three.
    """
    (directory / CONFIG_FILE).write_text(config.to_json())
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(directory / PARAMS_DIR, args=ocp.args.PyTreeSave(params))


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation files present in `src_dir`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    return copied


def load_config(path: str | os.PathLike) -> LLaMAConfig:
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{path} is not a llama_jax model directory: {CONFIG_FILE} not found")
    try:
        return LLaMAConfig.from_dict(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None


def load_model(path: str | os.PathLike, shardings=None, as_numpy: bool = False,
               **config_overrides) -> tuple[LLaMAConfig, dict]:
    """(config, params) from a model directory.

    shardings: optional tree of `jax.sharding.Sharding` (scanned layout) to restore directly onto
    a mesh; by default parameters land on the first local device. as_numpy: restore host numpy
    arrays instead (for conversion and inspection; no device involved). `config_overrides` change
    numerics fields such as `dtype` or `scan_layers` (not the architecture).
    """
    config = load_config(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise ValueError(f"{path}: parameter checkpoint {PARAMS_DIR}/ not found")
    abstract = nn.meta.unbox(abstract_params(config.replace(scan_layers=True)))
    if as_numpy:
        restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), abstract)
    else:
        restore_args = array_restore_args(abstract, shardings)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
    if not config.scan_layers:
        params = unstack_layers(params, config.n_layers)
    return config, params


def array_restore_args(abstract, shardings=None):
    """Orbax restore args placing each array of `abstract` on its sharding in `shardings`
    (a matching tree; default: the first local device)."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    return jax.tree.map(lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype),
                        abstract, shardings)


# ---- training-run checkpoints ----------------------------------------------------------------

ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


class RunCheckpoints:
    """Checkpoints of a training run: Orbax `CheckpointManager` with async saves and retention.

    Each step directory holds `state` (params, optimizer state, step) and `run` (JSON: the
    resolved config, the model config and the data position). Saves are written to a temporary
    directory and committed by rename, so a run killed mid-save leaves the previous checkpoint
    as the latest one; only committed steps are ever listed or restored.
    """

    def __init__(self, directory: str | os.PathLike, every: int, max_to_keep: int | None = 3,
                 keep_every: int | None = None, async_save: bool = True, read_only: bool = False):
        """read_only: for reading a run's checkpoints while it may still be writing them (export):
        nothing is created, cleaned up or deleted."""
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None,
            enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "run"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `step` is one of the run's regular checkpoint steps (multiples of `every`)."""
        return step % self.every == 0

    def save(self, step: int, state, run_info: dict, force: bool = False) -> bool:
        """Start saving `state` at `step` if it is due (or `force`); True if a save started."""
        if not (force or self.due(step)):
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run_info)), force=True)

    def run_info(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]

    def restore_state(self, step: int, abstract_state):
        """The state of `step` laid out as `abstract_state` (ShapeDtypeStructs with shardings):
        restoring onto another mesh or device count is a matter of passing its shardings."""
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def restore_params(self, step: int, config: LLaMAConfig):
        """Only the parameters of `step` (in the layer layout of the run's `config`), on the first
        local device: what a model export needs, without reading the optimizer state."""
        abstract = {"params": nn.meta.unbox(abstract_params(config))}
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=array_restore_args(abstract), partial_restore=True)))["state"]["params"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_same_architecture(saved: dict, config: LLaMAConfig, where: str) -> None:
    """ValueError naming the first architecture field where a saved model differs from `config`."""
    for field in ARCHITECTURE_FIELDS:
        if saved.get(field) != getattr(config, field):
            raise ValueError(f"{where} holds a model with {field}={saved.get(field)}, but the config asks for "
                             f"{field}={getattr(config, field)}; use another --workdir or the matching config")
