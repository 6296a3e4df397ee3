"""Model directories: `save_model` writes one, `load_model` restores its parameters (Orbax), and
`RunCheckpoints` keeps a run's checkpoints. What needs no JAX (the layout, the config, the
tokenizer and generation files) is in `llama_jax.model_dir`.

The directory is written beside its destination and renamed into place when complete, so a
failed save never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llama_jax.checkpoint_steps import COMMIT_MARKER, check_step_names, on_object_store_mount
from llama_jax.config import DTYPES, LLaMAConfig, check_flag, check_model_config
from llama_jax.model import abstract_params, check_params_as_laid_out, stack_layers, unstack_layers
from llama_jax.model_dir import (CONFIG_FILE, MODEL_DIR, PARAMS_DIR, TOKENIZER_FILES, check_tokenizer_file,
                                 check_tokenizer_files, copy_tokenizer_files, load_config)
from llama_jax.safe_io import (atomic_directory, damage_reason, non_utf8_path, quiet_abandoned_reads,
                               raise_noted_signal, unreadable_path)


def save_model(path: str | os.PathLike, config: LLaMAConfig, params, tokenizer: str | os.PathLike | None = None,
               overwrite: bool = False) -> Path:
    """Write config, parameters and tokenizer to `path`.

    tokenizer: a directory (its tokenizer and generation files are copied) or one tokenizer file
    (copied as tokenizer.model). `overwrite` replaces only an existing model directory. The
    parameters must all be of `config.param_dtype`, the dtype `load_model` restores them in.
    """
    check_model_config(config)
    check_flag(overwrite, "overwrite")
    params = nn.meta.unbox(params)
    stacked = check_params_as_laid_out(config, params)  # all of them, whatever config.scan_layers says
    check_param_dtype(config, params)
    if not stacked:
        params = stack_layers(dict(params), config.n_layers)
    if tokenizer is not None:  # (a directory, or one file)
        if not isinstance(tokenizer, (str, os.PathLike)):
            raise TypeError(f"tokenizer must be the path of a tokenizer file or of a directory holding one (or None), "
                            f"got {type(tokenizer).__name__}")
        if Path(tokenizer).is_dir() and not any((Path(tokenizer) / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"tokenizer={str(tokenizer)!r}: the directory holds none of {', '.join(TOKENIZER_FILES)}")
        (check_tokenizer_files if Path(tokenizer).is_dir() else check_tokenizer_file)(tokenizer, config)
    inputs = [] if tokenizer is None else [tokenizer]
    with atomic_directory(path, MODEL_DIR, overwrite, inputs) as tmp:
        write_model_dir(tmp, config, params)
        if tokenizer is not None and Path(tokenizer).is_dir():
            copy_tokenizer_files(tokenizer, tmp)
        elif tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    return Path(path)


def check_param_dtype(config: LLaMAConfig, params) -> None:
    """ValueError unless every parameter is stored in `config.param_dtype`: `load_model` restores
    them in it, so a model directory's config must say what its files hold."""
    found = sorted({np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)})
    if found != [config.param_dtype]:
        raise ValueError(f"the parameters are {' and '.join(found)} but config.param_dtype is {config.param_dtype!r}; "
                         f"save them in one dtype ({', '.join(DTYPES)}) and give it as the config's param_dtype "
                         f"(config.replace(param_dtype=...), or jax.tree.map(lambda a: a.astype(...), params))")


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


def load_model(path: str | os.PathLike, shardings=None, as_numpy: bool = False, mesh=None,
               **config_overrides) -> tuple[LLaMAConfig, dict]:
    """(config, params) from a model directory.

    shardings: optional tree of `jax.sharding.Sharding` (scanned layout), or one for every
    parameter, to restore directly onto a mesh; `mesh`: restore onto it as the project's
    logical-axis rules shard parameters (a mesh that does not divide the model is a ValueError;
    give one of the two). By default parameters land on the first local device. as_numpy:
    restore host numpy arrays instead (for conversion and inspection; no device involved).
    `config_overrides` change how the model computes (`dtype`, `scan_layers`, ...) or, taken as
    given, the settings it was trained with (`rope_theta`, `rope_scaling`, `norm_eps`,
    `max_seq_len`); one that changes a parameter's shape is a ValueError.
    """
    check_flag(as_numpy, "as_numpy")
    if mesh is not None and shardings is not None:
        raise ValueError("give shardings or mesh, not both")
    saved = config = load_config(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    if mesh is not None:
        shardings = mesh_shardings(config.replace(scan_layers=True), mesh)
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise ValueError(f"{path}: parameter checkpoint {PARAMS_DIR}/ not found")
    if problem := non_utf8_path(path, "model directory"):
        raise ValueError(problem)
    abstract = nn.meta.unbox(abstract_params(config.replace(scan_layers=True)))
    if config_overrides:  # (the directory's own config is checked against its params below)
        saved_abstract = nn.meta.unbox(abstract_params(saved.replace(scan_layers=True)))
        if change := _config_mismatch(abstract, saved_abstract, f"the directory's {CONFIG_FILE}"):
            given = ", ".join(f"{key}={value!r}" for key, value in config_overrides.items())
            raise ValueError(f"{path}: load_model({given}) {change}; an override may change how the model "
                             "computes, not the shapes of its parameters")
    if as_numpy:
        restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), abstract)
    else:
        if not (shardings is None or isinstance(shardings, jax.sharding.Sharding)
                or jax.tree.structure(shardings) == jax.tree.structure(abstract)):
            raise ValueError("shardings must be one jax.sharding.Sharding, or a tree of them shaped as the parameters "
                             "in the scanned layout (abstract_params(config.replace(scan_layers=True))); or give mesh=")
        restore_args = array_restore_args(abstract, shardings)
    quiet_abandoned_reads()
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            mismatch = _config_mismatch(abstract, tree_metadata(params_dir))
            if mismatch is None:
                params = ckptr.restore(params_dir,
                                       args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
    except Exception as e:  # TensorStore, JSON and OS errors of a damaged or incomplete params/
        raise_noted_signal()  # or a read that Ctrl-C or SIGTERM interrupted
        raise ValueError(f"model directory {path} is damaged or incomplete: {damage_reason(e, params_dir)}") from None
    if mismatch is not None:
        raise ValueError(f"{path}: {CONFIG_FILE} {mismatch}; the config does not describe these parameters")
    if config.param_dtype == "float16" != saved.param_dtype:  # the one narrower range: values beyond it became inf
        beyond = next((name for name, a in flax.traverse_util.flatten_dict(params, sep=".").items()
                       if not bool(jnp.isfinite(a).all())), None)
        if beyond is not None:
            raise ValueError(f"{path}: parameter {beyond} holds values beyond float16's range (at most 65504) or not "
                             f"finite; load it as {saved.param_dtype} or bfloat16")
    if not config.scan_layers:
        params = unstack_layers(params, config.n_layers)
    return config, params


def _config_mismatch(abstract, stored, holder: str = f"{PARAMS_DIR}/") -> str | None:
    """How the parameters a config makes (`abstract`) differ from those stored (in `holder`), if
    they do: the first parameter only one side has, or whose shapes differ."""
    wanted, stored = flax.traverse_util.flatten_dict(abstract), flax.traverse_util.flatten_dict(stored)
    for key in sorted(wanted.keys() | stored.keys()):
        name = ".".join(key)
        if key not in stored:
            return f"makes {name}, but {holder} does not hold it"
        if key not in wanted:
            return f"has no place for {name}, which {holder} holds"
        shape = tuple(getattr(stored[key], "shape", ()) or ())
        if shape != tuple(wanted[key].shape):
            return f"makes {name} of shape {tuple(wanted[key].shape)}, but {holder} holds it as {shape}"
    return None


@functools.cache
def mesh_shardings(config: LLaMAConfig, mesh):
    """The shardings of `config`'s parameters (in its layer layout) over `mesh` under the project's
    logical-axis rules; a ValueError naming the field when the mesh does not divide the model. Found
    once per config and mesh: tracing the model's initialiser for them took about 0.6 s for 32
    unrolled layers, which `generate` on a mesh paid on every call (lm-eval's generate_until, every batch)."""
    from llama_jax.sharding import check_divisible, tree_shardings

    check_divisible(config, mesh)
    return tree_shardings(mesh, abstract_params(config))


def array_restore_args(abstract, shardings=None):
    """Orbax restore args placing each array of `abstract` on its sharding in `shardings` (a
    matching tree, or one Sharding for all; default: the first local device)."""
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _, one=shardings: one, abstract)
    return jax.tree.map(lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype),
                        abstract, shardings)


# ---- training-run checkpoints ----------------------------------------------------------------

def tree_metadata(directory: Path):
    """The metadata of the tree an Orbax PyTree checkpoint `directory` holds (read from its
    _METADATA file, which is checked first: Orbax reports a damaged one without naming it)."""
    metadata_file = directory / "_METADATA"
    try:
        json.loads(metadata_file.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{metadata_file} is missing") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{metadata_file} is not valid JSON ({e})") from None
    return ocp.PyTreeCheckpointHandler().metadata(directory).tree


RUN_INFO_FILE = Path("run") / "metadata"  # a step's run info, as Orbax's JSON handler writes it


def holds_run_info(info: object) -> bool:
    """Whether `info`, read from a checkpoint's run item, is the run info a run saves."""
    return isinstance(info, dict) and {"config", "model"} <= set(info)


class CheckpointDamaged(ValueError):
    """A committed checkpoint step whose files cannot be read back."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def _first_failure(step: int, failure: CheckpointDamaged | PermissionError | None
                   ) -> CheckpointDamaged | PermissionError | None:
    """The failure to read checkpoint `step` of the first process of the run that met one (None:
    every process read it), the same in every process: where one process alone found its files
    damaged, it stopped while the others went on to train, waiting for it until JAX aborted them."""
    from llama_jax.distributed import exchange

    sent = json.dumps(failure and [isinstance(failure, CheckpointDamaged), str(failure)])
    for damaged, message in filter(None, map(json.loads, exchange(sent))):
        return CheckpointDamaged(step, message) if damaged else PermissionError(message)
    return None


def tree_paths(tree) -> set[tuple[str, ...]]:
    """Leaf paths of a pytree as tuples of plain names, so dicts, dataclasses and namedtuples compare."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]  # empty nodes (Optax's EmptyState) have none
    return {tuple(name(k) for k in path) for path, leaf in leaves if not _empty(leaf)}


def _empty(leaf) -> bool:
    """Orbax's metadata stands for an empty node with an empty container or None."""
    return leaf is None or (isinstance(leaf, (dict, list, tuple)) and not leaf)


def retention_deletes(steps: Sequence[int], max_to_keep: int | None, keep_every: int | None,
                      saves: int = 1) -> list[int]:
    """Which of a run's checkpoint `steps` (ascending) Orbax's retention has deleted once `saves`
    more steps are saved: those outside the newest `max_to_keep` of all, except the multiples of
    `keep_every`, which it keeps for good. None: no retention."""
    if max_to_keep is None:
        return []
    return [s for s in steps[:max(0, len(steps) + saves - max_to_keep)] if not (keep_every and s % keep_every == 0)]


@contextlib.contextmanager
def _without_orbax_notice(start: str) -> Iterator[None]:
    """Orbax's absl log records that begin with `start` dropped inside the block."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith(start)

    absl, drop = logging.getLogger("absl"), Drop()
    absl.addFilter(drop)
    try:
        yield
    finally:
        absl.removeFilter(drop)


def atomicity_options(directory: str | os.PathLike) -> ocp.options.AtomicityOptions | None:
    """How Orbax commits the steps of a checkpoints `directory`. On local and network disks (None:
    Orbax's default) a step is written under a temporary name and renamed into place. On an object
    store's FUSE mount (where Orbax's default is still the rename) renaming a directory copies each
    object and then deletes it (gcsfuse, on a bucket without hierarchical namespace), so a process
    killed meanwhile left a step under its final name holding part of its files, which was then
    listed and resumed as committed. There a step is written in place and committed by its
    COMMIT_MARKER, written last; a step without one is not a checkpoint. Steps committed by rename
    hold the marker too (Orbax writes it before the rename), so a run saved before reads on."""
    if not on_object_store_mount(directory):
        return None
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


def remove_unfinished_steps(directory: Path) -> None:
    """Remove what saves committed by marker left unfinished in a checkpoints `directory`: a step's
    folder without its marker (the step's next save is written there) and Orbax's temporary
    folders. (Orbax's own clean-up in that mode removes every folder without the marker, folders of
    your own too.)"""
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        step_named = re.fullmatch("[0-9]+", path.name) and not (path / COMMIT_MARKER).exists()
        if (step_named or ocp.path.atomicity.TMP_DIR_SUFFIX in path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


class RunCheckpoints:
    """Checkpoints of a training run: Orbax `CheckpointManager` with async saves and retention.

    Each step directory holds `state` (params, optimizer state, step, skipped steps) and `run` (JSON: the
    resolved config, the model config and the data position). Saves are written to a temporary
    directory and committed by rename, or, on an object store's FUSE mount, written in place and
    committed by a marker file written last (`atomicity_options`), so a run killed mid-save leaves
    the previous checkpoint as the latest one; only committed steps are ever listed or restored.
    """

    def __init__(self, directory: str | os.PathLike, every: int, max_to_keep: int | None = 3,
                 keep_every: int | None = None, async_save: bool = True, read_only: bool = False):
        """read_only: for reading a run's checkpoints while it may still be writing them (export):
        nothing is created, cleaned up or deleted."""
        self.every = every
        self.directory = Path(directory).absolute()
        check_step_names(self.directory, saves=not read_only)
        # a reader sets none of the saving options: Orbax would turn each off with a warning of its own
        saving = {} if read_only else dict(max_to_keep=max_to_keep, keep_period=keep_every or None)
        self.atomicity = atomicity_options(self.directory)
        by_marker = self.atomicity is not None
        if by_marker and not read_only and jax.process_index() == 0:  # (before any save: each waits for process 0)
            remove_unfinished_steps(self.directory)
        options = ocp.CheckpointManagerOptions(
            **saving, save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save,
            create=not read_only, cleanup_tmp_directories=not (read_only or by_marker), read_only=read_only,
            atomicity_options=self.atomicity)
        # uncompressed: zstd took three quarters of a save's CPU time for 8% less disk, and an
        # async save competes with the train step for the host's cores (benchmarks/README.md)
        with _without_orbax_notice("Given directory is read only"):  # (a reader's, every time)
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
                "state": ocp.PyTreeCheckpointHandler(use_compression=False), "run": ocp.JsonCheckpointHandler()})

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
            state=ocp.args.PyTreeSave(state), run=ocp.args.JsonSave(run_info)), force=True)

    def in_place(self, step: int) -> bool:
        """Whether `step` is committed: its directory in place, as an async save's commit renames it,
        or, committed by marker, holding its marker. (Not Orbax's is_saving_in_progress: its lock is
        held while the saving thread waits for the other processes, so a process would hang there
        once a peer died.)"""
        return ocp.step.is_path_finalized(self.step_dir(step), atomicity_options=self.atomicity)

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _read(self, step: int, what: str, read: Callable[[], Any]) -> Any:
        quiet_abandoned_reads()
        try:
            return read()
        except Exception as e:  # TensorStore, JSON and OS errors of damaged or missing files
            raise_noted_signal()  # or a read that Ctrl-C or SIGTERM interrupted
            unreadable = unreadable_path(self.step_dir(step))
            if unreadable is not None:
                raise PermissionError(f"checkpoint {step} ({self.step_dir(step)}) cannot be read: no permission to "
                                      f"read {unreadable}; fix its permissions (e.g. chmod -R u+rX "
                                      f"{self.step_dir(step)})") from None
            raise CheckpointDamaged(step, f"checkpoint {step} ({self.step_dir(step)}) is damaged: cannot read "
                                          f"its {what}: {damage_reason(e, self.step_dir(step))}") from None

    def run_info(self, step: int) -> dict:
        info = self._read(step, "run info", lambda: self.manager.restore(
            step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"])
        if not holds_run_info(info):
            raise CheckpointDamaged(step, f"checkpoint {step} ({self.step_dir(step)}) is damaged: its run info "
                                          f"lacks the config and model")
        return info

    def state_paths(self, step: int) -> set[tuple[str, ...]]:
        """The leaf paths of the saved state, from its metadata alone (nothing is restored)."""
        tree = self._read(step, "state metadata",
                          lambda: tree_metadata(self.step_dir(step) / "state"))
        return tree_paths(tree)

    def restore_state(self, step: int, abstract_state):
        """The state of `step` laid out as `abstract_state` (ShapeDtypeStructs with shardings):
        restoring onto another mesh or device count is a matter of passing its shardings."""
        shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
        state, failure = None, None
        try:
            state = self._read(step, "state", lambda: self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract_state,
                                             restore_args=array_restore_args(abstract_state, shardings))))["state"])
        except (CheckpointDamaged, PermissionError) as e:
            failure = e
        if jax.process_count() > 1:  # each process reads the files of its own shards: all stop where one cannot
            if failure is not None:  # the others wait for this one at the end of Orbax's restore (the
                # barrier's key as Orbax's Checkpointer forms it, from its private fields; the test of a
                # shard damaged in one process's files fails where another Orbax forms it otherwise)
                checkpointer = self.manager._checkpointer
                ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key(
                    "Checkpointer:restore", prefix=checkpointer._barrier_sync_key_prefix),
                    processes=checkpointer._active_processes)
            failure = _first_failure(step, failure)
        if failure is not None:
            raise failure
        return state

    def restore_params(self, step: int, config: LLaMAConfig, mesh=None):
        """Only the parameters of `step` (in the layer layout of the run's `config`), without reading
        the optimizer state: on the first local device (what a model export needs), or sharded over
        `mesh` as the project's logical-axis rules shard them (`mesh_shardings`; each device reads
        its own shards)."""
        shardings = None if mesh is None else {"params": mesh_shardings(config, mesh)}
        abstract = {"params": nn.meta.unbox(abstract_params(config))}
        return self._read(step, "parameters", lambda: self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract, restore_args=array_restore_args(abstract, shardings),
                                         partial_restore=True)))["state"]["params"])

    def reload(self) -> None:
        """Re-read the list of steps on disk (after step directories were moved)."""
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
