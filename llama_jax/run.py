"""An experiment run end to end: data, training, checkpoints with exact resume, logs, eval, samples.

`train_and_evaluate(config, workdir)` is what `llama-jax train` calls. Re-running it with the
same workdir resumes from the latest committed checkpoint; since the batch of step s is a pure
function of (data, seed, s) and the step is deterministic, every loss after a resume is the one
the uninterrupted run would have logged. SIGTERM (a TPU preemption notice) saves the current
step and returns cleanly.

Workdir layout: config.json (resolved config), checkpoints/<step>/{state,run}, progress.json (the
newest committed step, so a lost checkpoint is noticed), metrics.jsonl, TensorBoard event files,
tokenizer.model (the run's own copy of its tokenizer), loss.png; data/ (a raw text source
prepared for the run), tokenizer_files/ (a fine-tune's copy of its model's tokenizer and
generation files), checkpoints-set-aside/ (what a resume no longer continues from) and profile/
(train.profile_steps' traces) where they apply. Everything that bad input can make fail is
decided before the first write; a damaged latest checkpoint stops the run with the newest intact
step named, and `resume_from` continues from it (later steps are moved aside).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import data as data_lib
from llama_jax import metrics as metrics_lib
from llama_jax.checkpoint import (RUN_INFO_FILE, CheckpointDamaged, RunCheckpoints, holds_run_info, load_model,
                                  retention_deletes, save_model, tree_paths)
from llama_jax.checkpoint_steps import check_step_names, committed_steps
from llama_jax.config import LLaMAConfig
from llama_jax.devices import computation_failed
from llama_jax.distributed import refuse_together
from llama_jax.eval_files import RUN_EVAL_FILE
from llama_jax.experiment import INIT_FROM_PRESET, NONFINITE_STOP, check_run_settings
from llama_jax.model import abstract_params, params_in_layout
from llama_jax.model_dir import check_init_from, check_same_architecture
from llama_jax.profiling import PROFILE_DIR, StepTrace
from llama_jax.run_data import RunData, build_data, evaluate, prepared_dirs
from llama_jax.run_files import (LOSS_PLOT, METRICS_FILE, MODEL_TOKENIZER_DIR, PROGRESS_FILE, REMOVAL_WAIT_S,
                                 RUN_TOKENIZER, RunError, check_export, check_train_workdir, checkpoint_step,
                                 latest_missing, recorded_step)
from llama_jax.safe_io import (PARTIAL_SUFFIX, RUN_DATA_DIR, SET_ASIDE_DIR, DirectoryBusy, DirectoryLock, atomic_file,
                               holds_lock, holds_run, sha256_file, write_text_atomic)
from llama_jax.sharding import process_rows, tree_shardings
from llama_jax.train import Trainer, TrainState, build_trainer, global_batch, per_source_nll

# Steps the loop may dispatch ahead of the computation. JAX's asynchronous dispatch would otherwise
# let it run tens of steps ahead between logged steps, and a SIGTERM (a preemption notice) would
# then save only once all of those were computed.
STEPS_AHEAD = 2

# ---- state -----------------------------------------------------------------------------------


def abstract_state(trainer: Trainer) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: restores land directly on this mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.meta.unbox(trainer.abstract_state), trainer.state_shardings)


def initial_state(config, trainer: Trainer, workdir: Path, resume_from: int | None = None,
                  stream: list | None = None) -> tuple[TrainState, int, dict | None]:
    """Resume from the latest committed checkpoint (or `resume_from`), else start from
    `checkpoint.init_from`, else fresh. Reads only: a damaged or missing checkpoint is an error
    naming the newest intact one, never a silent fresh start. `stream`: what the run trains on
    (`RunData.stream`), which a resume must not change. Returns (state, step, the run information
    saved with the checkpoint resumed from, or None)."""
    steps = committed_steps(workdir)
    recorded = recorded_step(workdir)
    if resume_from is not None:
        if resume_from not in steps:
            valid = ", ".join(map(str, steps)) or "none"
            raise RunError(f"--resume-from {resume_from}: {workdir} has no committed checkpoint of that step; "
                           f"valid: {valid}")
        state, info = _restore(config, trainer, workdir, resume_from, stream)
        return state, resume_from, info
    if recorded is not None and (not steps or steps[-1] < recorded):
        raise RunError(latest_missing(workdir, recorded) + _intact_hint(config, trainer, workdir, steps, stream))
    if steps:
        try:
            state, info = _restore(config, trainer, workdir, steps[-1], stream)
            return state, steps[-1], info
        except CheckpointDamaged as e:
            raise RunError(f"{e}; " + _intact_hint(config, trainer, workdir, steps[:-1], stream)) from None
    if config.checkpoint.init_from:
        return state_from_model(config.checkpoint.init_from, trainer), 0, None
    return trainer.init_state(config.train.seed), 0, None


def run_model(config, workdir: Path, resume_from: int | None = None) -> LLaMAConfig | None:
    """With `model.preset=init_from`, the model a resume of `workdir` continues (that of its newest
    readable checkpoint, or of `resume_from`'s), which stands for the `checkpoint.init_from`
    directory: a run's architecture never changes, so the directory is needed only to start it.
    None for other presets and for a run with no readable checkpoint (which starts from the
    directory; `initial_state` says what is damaged)."""
    steps = committed_steps(workdir) if config.model.preset == INIT_FROM_PRESET else []
    if not steps:
        return None
    with _reader(workdir) as checkpoints:
        for step in [resume_from] if resume_from in steps else reversed(steps):
            try:
                return LLaMAConfig.from_dict(checkpoints.run_info(step)["model"])
            except CheckpointDamaged:
                continue
    return None


def _restore(config, trainer: Trainer, workdir: Path, step: int, stream: list | None = None
             ) -> tuple[TrainState, dict]:
    """The state of checkpoint `step`, checked to be of this config's model and optimizer first,
    and the run information saved with it."""
    with _reader(workdir) as checkpoints:
        info = checkpoints.run_info(step)
        check_same_architecture(info["model"], trainer.model_config, f"{workdir} (checkpoint {step})")
        held = sorted(s for s in checkpoints.all_steps() if s <= step)  # later ones are moved aside
        _check_nothing_lost(info, config, trainer.model_config, f"{workdir} (checkpoint {step})", held)
        _check_same_trajectory(info, config, stream, f"{workdir} (checkpoint {step})")
        target = abstract_state(trainer)
        if checkpoints.state_paths(step) != tree_paths(target):
            scanned = info["model"].get("scan_layers", trainer.model_config.scan_layers)
            if scanned != trainer.model_config.scan_layers:
                raise RunError(f"{workdir} (checkpoint {step}) holds parameters with model.scan_layers={scanned}, not "
                               f"{trainer.model_config.scan_layers}; resume with it (export the run and init_from "
                               f"the export to change the layout) or use another --workdir")
            saved = info["config"].get("optimizer", {})
            changed = [f"optimizer.{k}={v!r} (the run's: {saved[k]!r})" if k in saved else f"optimizer.{k}"
                       for k, v in config.optimizer.items() if saved.get(k) != v]
            raise RunError(f"{workdir} (checkpoint {step}) holds an optimizer state that does not fit this "
                           f"config's optimizer" + (f" (changed: {', '.join(changed)})" if changed else "") +
                           "; resume with the run's optimizer settings or use another --workdir")
        return checkpoints.restore_state(step, target), info


def _check_nothing_lost(info: dict, config, model: LLaMAConfig, where: str, held: list[int]) -> None:
    """RunError when a resume would cast the run's master weights, or let the checkpoint retention
    delete checkpoints the run kept for good: steps `checkpoint.keep_every` kept, or, where the run
    kept every checkpoint (`max_to_keep=None`), the ones it `held` that a limit deletes by the end
    of this resume's saves."""
    was_dtype = info["model"].get("param_dtype")
    if was_dtype and was_dtype != model.param_dtype:
        raise RunError(f"{where} holds {was_dtype} parameters, but the config asks for model.param_dtype="
                       f"{model.param_dtype}: the run's master weights would be cast; resume with "
                       f"model.param_dtype={was_dtype} or use another --workdir")
    saved, c = info["config"].get("checkpoint", {}), config.checkpoint
    start, steps = held[-1], config.train.steps
    if c.max_to_keep is None or start >= steps:  # no retention, or no step left to save
        return
    kept, keep = saved.get("keep_every") or 0, c.keep_every or 0
    if kept and (not keep or kept % keep):  # a divisor of the old period keeps every step it kept
        raise RunError(f"{where} was saved with checkpoint.keep_every={kept}, which keeps the steps that are "
                       f"multiples of {kept} for good; resuming with keep_every={keep} would let the retention delete "
                       f"them. Resume with keep_every={kept} (or a divisor of it), or move the checkpoints to keep "
                       f"out of checkpoints/ first")
    saves = steps // c.every - start // c.every + (steps % c.every != 0)  # the due steps and the last one
    lost = retention_deletes(held, c.max_to_keep, keep, saves)
    if "max_to_keep" in saved and saved["max_to_keep"] is None and lost:
        raise RunError(f"{where}: the run kept every checkpoint (checkpoint.max_to_keep=None); resuming with "
                       f"max_to_keep={c.max_to_keep} would let the retention delete checkpoint(s) "
                       f"{', '.join(map(str, lost))} by train.steps={steps}. Resume with max_to_keep=None, or move "
                       f"the checkpoints to keep out of checkpoints/ (or delete those not needed) first")


def _check_same_trajectory(info: dict, config, stream: list | None, where: str) -> None:
    """RunError when a resume would change what the run trains on: random tokens for documents or
    the other way round, the seed that orders its batches, the rows a step takes (batch size and
    length: each source's place in its epoch is counted in them), or the sources, their documents
    and their proportions (`stream`, recorded in checkpoints from this version on)."""
    saved = info["config"]
    was = saved.get("data", {}).get("source")
    if (was == "synthetic") != (config.data.source == "synthetic"):
        raise RunError(f"{where} trained on data.source={was}, not {config.data.source}; resume with the run's data "
                       f"settings or use another --workdir")
    if saved.get("train", {}).get("seed", config.train.seed) != config.train.seed:
        raise RunError(f"{where} trained with train.seed={saved['train']['seed']}, not {config.train.seed}: the seed "
                       f"orders the batches; resume with it or use another --workdir")
    if config.data.source == "synthetic":
        return
    for key in ("batch_size", "seq_len"):
        if saved.get("train", {}).get(key, config.train[key]) != config.train[key]:
            raise RunError(f"{where} trained with train.{key}={saved['train'][key]}, not {config.train[key]}: the "
                           f"run's place in each epoch is counted in its rows; resume with it or use another --workdir")
    recorded = info.get("data_stream")
    if recorded and stream and recorded[0].get("order") != stream[0].get("order"):  # (each process decides)
        raise RunError(f"{where} was saved with rows in {_order_name(recorded)}, and this process would read them "
                       f"in {_order_name(stream)}; resume it as it started (its checkpoints were read otherwise "
                       f"here: a damaged or changing checkpoints directory?)")
    if recorded is not None and stream is not None and not _same_stream(recorded, stream):
        raise RunError(f"{where} trained on {_describe_stream(recorded)}, not {_describe_stream(stream)}: a resume "
                       f"continues the same documents in the same proportions; resume with the run's data settings "
                       f"or use another --workdir")
    slots = [streams[0].get("slots_sha256") for streams in (recorded, stream) if streams]
    if len(slots) == 2 and None not in slots and slots[0] != slots[1]:  # (recorded from this version on)
        raise RunError(f"{where} trained on data.mixture weights whose shares these weights give too, but rounded "
                       f"otherwise: some slots of its batches would read another source; resume with the run's own "
                       f"weights (its config.json) or use another --workdir")


def changed_settings(saved: dict, config, was_model: dict | None = None, model: dict | None = None) -> list[str]:
    """`section.key old -> new` for every config value that differs from a checkpoint's saved
    config, a dict value (model.rope_scaling, data.mixture) as a whole; a key of one side only (a
    setting another release has or lacks) is not compared. A model field left to the preset (None)
    counts as the value the model had: `was_model` (the checkpoint's model) and `model` (this run's)."""
    current = json.loads(config.to_json_best_effort())

    def effective(section: str, key: str, value, resolved: dict | None):
        if section == "model" and value is None and resolved and key in resolved:
            return resolved[key]
        return value

    changed = []
    for section, values in current.items():
        if not isinstance(saved.get(section), dict):
            continue
        for key, value in values.items():
            if key not in saved[section]:
                continue
            was, now = effective(section, key, saved[section][key], was_model), effective(section, key, value, model)
            if was != now:
                changed.append(f"{section}.{key} {was!r} -> {now!r}")
    return changed


def _keep_weights_source(config, saved: dict, start: int) -> None:
    """A resumed run's weights come from its checkpoint, not from checkpoint.init_from, which a run
    reads only at its start: another one given now is said to go unread, and the config keeps the
    one the run started from (config.json named the new one as if it had been taken)."""
    was = (saved.get("checkpoint") or {}).get("init_from")
    if was is None or config.checkpoint.init_from == was:
        return
    began = f"checkpoint.init_from={was}" if was else "random weights (no checkpoint.init_from)"
    print(f"checkpoint.init_from={config.checkpoint.init_from or repr('')} is not read: the run continues from its "
          f"checkpoint {start}, which began from {began}; config.json keeps that")
    config.checkpoint.init_from = was


def _order_name(stream: list) -> str:
    return f"the order {stream[0]['order']!r}" if stream[0].get("order") else "an earlier release's order"


def check_named_data(workdir: Path, recorded: list | None, stream: list | None, data_config) -> None:
    """RunError unless `stream` (`run_data.stream_of` the prepared data `data_config`, a run's own
    config.json, names now) is `recorded`, the data_stream of the run's checkpoint being read: a
    relative data.path in config.json is read from the current directory, which may hold other
    data of that name, and data prepared again in place holds other documents."""
    if recorded is None or stream is None or _same_stream(recorded, stream):
        return
    if data_config.get("source") == "prepared":
        paths = [path for _, path, _ in prepared_dirs(data_config)]
    else:  # a raw source, read from the run's own prepared copy of it
        paths = [workdir / RUN_DATA_DIR]
    if any(not path.is_absolute() for path in paths):
        where = (f"as read from {Path.cwd()}; run the command from the directory the run was started in, or give "
                 f"the data to score with --config FILE")
    else:
        where = f"({', '.join(map(str, paths))}): changed since; give the data to score with --config FILE"
    raise RunError(f"{workdir} trained on {_describe_stream(recorded)}, not on {_describe_stream(stream)}, the "
                   f"data its config.json names {where}")


def latest_data_stream(workdir: Path) -> list | None:
    """The data_stream of the latest checkpoint of the run in `workdir`, or None: none committed
    yet, recorded by a release before data streams, or unreadable now (a run training there may
    be removing old checkpoints)."""
    return readable_run_info(workdir, newest_only=True).get("data_stream")


def latest_run_config(workdir: Path) -> dict | None:
    """The config the latest checkpoint of the run in `workdir` was saved with, or None (as
    `latest_data_stream`)."""
    return readable_run_info(workdir, newest_only=True).get("config")


def readable_run_info(workdir: Path, newest_only: bool = False) -> dict:
    """What the newest checkpoint of the run in `workdir` that can be read records of the run, {}
    when there is none (a damaged latest one is passed over, as a resume may be from an earlier one;
    `newest_only`: {} then)."""
    try:
        steps = committed_steps(workdir)
        if not steps:
            return {}
        with _reader(workdir) as checkpoints:
            for step in reversed(steps[-1:] if newest_only else steps):
                with contextlib.suppress(CheckpointDamaged, OSError):
                    return checkpoints.run_info(step)
    except (CheckpointDamaged, OSError):
        pass
    return {}


def run_info_file(workdir: Path) -> dict:
    """What the newest committed checkpoint of the run in `workdir` whose run info reads as JSON
    records of the run, {} when there is none: read from the file itself, not through Orbax, which
    starts JAX's backend (a sweep's driver would then fork its trials from a multithreaded process)."""
    for step in reversed(committed_steps(workdir)):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((workdir / "checkpoints" / str(step) / RUN_INFO_FILE).read_bytes())
            if holds_run_info(info):
                return info
    return {}


def _same_stream(recorded: list, stream: list) -> bool:
    """The same training sources, of the same documents and tokens (however sharded, wherever they
    are: by their counts, and by their corpus fingerprint where both streams have one), in the same
    proportions (weights 1:2 and 2:4 alike)."""
    before, now = ({s["name"]: s for s in streams} for streams in (recorded, stream))

    def same_corpus(a: dict, b: dict) -> bool:
        return "corpus_sha256" not in a or "corpus_sha256" not in b or a["corpus_sha256"] == b["corpus_sha256"]

    return before.keys() == now.keys() and all(
        (before[n]["documents"], before[n]["tokens"]) == (now[n]["documents"], now[n]["tokens"])
        and same_corpus(before[n], now[n]) and math.isclose(before[n]["share"], now[n]["share"], rel_tol=1e-9)
        for n in now)


def _describe_stream(stream: list) -> str:
    return ", ".join(f"{s['name']} ({s['share']:.3g} of the rows, {s['documents']:,} training documents, "
                     f"{s['tokens']:,} tokens" + (f", corpus sha256 {s['corpus_sha256'][:12]}" if "corpus_sha256" in s
                                                  else "") + ")" for s in stream)


def _intact_hint(config, trainer: Trainer, workdir: Path, candidates: list[int], stream: list | None) -> str:
    """Which earlier checkpoint restores, and how to continue from it."""
    for step in reversed(candidates):
        try:
            _restore(config, trainer, workdir, step, stream)
        except CheckpointDamaged:
            continue
        return (f"checkpoint {step} is intact: rerun with --resume-from {step} to continue from it (later "
                f"checkpoints are moved to {workdir / SET_ASIDE_DIR})")
    left = "no earlier checkpoint is intact" if candidates else "no other checkpoint is left"
    return f"{left}; to start over, use a new --workdir"


@contextlib.contextmanager
def _reader(workdir: Path):
    checkpoints = RunCheckpoints(workdir / "checkpoints", every=1, async_save=False, read_only=True)
    try:
        yield checkpoints
    finally:
        checkpoints.close()


def record_progress(workdir: Path, last_recorded: int | None, held_back: int | None = None) -> int | None:
    """Write the newest committed step to WORKDIR/progress.json when it changed; return it.
    `held_back`: a committed step left unrecorded (unless recorded already): the last step until the
    log holds its closing evaluation, as progress.json's last step tells a sweep the run is finished."""
    steps = [s for s in committed_steps(workdir) if s != held_back or s == last_recorded]
    if jax.process_index() == 0 and steps and steps[-1] != last_recorded:
        _write_progress(workdir, steps[-1])
        return steps[-1]
    return last_recorded


def _write_progress(workdir: Path, step: int) -> None:
    write_text_atomic(workdir / PROGRESS_FILE, json.dumps({"committed_step": step}) + "\n")


def set_aside_metrics_after(workdir: Path, step: int) -> list[int]:
    """Move the records of steps after `step` from WORKDIR/metrics.jsonl to the end of
    WORKDIR/checkpoints-set-aside/metrics.jsonl, so that the log holds one record per step of the
    run as it continues (a resume repeats the steps after its checkpoint); the steps moved."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return []
    metrics_lib.end_cut_line(path)
    kept, later, steps = [], [], []
    for line in path.read_bytes().splitlines(keepends=True):  # bytes: a damaged line is kept byte for byte
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # not JSON (or not UTF-8), or not a record of a step
            record_step = None  # kept as it is
        if isinstance(record_step, int) and record_step > step:
            later.append(line)
            steps.append(record_step)
        else:
            kept.append(line)
    if later:
        (workdir / SET_ASIDE_DIR).mkdir(exist_ok=True)
        aside = workdir / SET_ASIDE_DIR / METRICS_FILE
        metrics_lib.end_cut_line(aside)  # an append a full disk cut short (its records are still in the log)
        with open(aside, "ab") as f:
            f.writelines(later)
        with atomic_file(path) as new:
            new.write_bytes(b"".join(kept))
    return steps


def set_aside_results_after(workdir: Path, step: int) -> list[str]:
    """Move the `eval` results of steps after `step` (WORKDIR/eval-STEP[-TAG].json) into
    WORKDIR/checkpoints-set-aside/: they score checkpoints the run no longer continues from, and
    would be read as the scores of its new checkpoints of those steps (a name taken there gets a
    `+`); the names moved."""
    later = sorted(p for p in workdir.glob("eval-*.json")
                   if (match := RUN_EVAL_FILE.fullmatch(p.name)) and int(match.group(1)) > step)
    for path in later:
        _move_aside(workdir, path)
    return [p.name for p in later]


def _move_aside(workdir: Path, path: Path) -> Path:
    """Move `path` into WORKDIR/checkpoints-set-aside/ under its name (nothing there is replaced: a
    name taken gets a `+`); where it went."""
    (workdir / SET_ASIDE_DIR).mkdir(exist_ok=True)
    target = workdir / SET_ASIDE_DIR / path.name
    while target.exists():
        target = target.with_name(target.name + "+")
    os.replace(path, target)
    return target


def set_aside_after(workdir: Path, step: int) -> list[Path]:
    """Move the checkpoints after `step` into WORKDIR/checkpoints-set-aside/ (nothing is deleted:
    a step already set aside once gets a `+`); where they went. progress.json names `step` first: a
    run stopped before its next save then resumes from it, not refused for a latest step gone."""
    later = [s for s in committed_steps(workdir) if s > step]
    if not later or jax.process_index() != 0:
        return []
    _write_progress(workdir, step)
    return [_move_aside(workdir, workdir / "checkpoints" / str(s)) for s in later]


def _check_run_writable(workdir: Path, checkpoint, resume_from: int | None = None) -> None:
    """RunError naming what of a run a resume must write but may not: its checkpoints/ directory,
    its metrics log (appended to), a step directory the next save's retention deletes
    (`retention_deletes`; of the steps up to `resume_from`, the later ones being moved aside), or
    the place of a step's save taken by a file (`check_step_names`), before a step is trained
    rather than when its checkpoint is saved."""
    checkpoints = workdir / "checkpoints"
    check_step_names(checkpoints, saves=True)
    steps = sorted((int(d.name) for d in checkpoints.iterdir() if d.name.isdigit() and d.is_dir())
                   if checkpoints.is_dir() else [])
    steps = [s for s in steps if resume_from is None or s <= resume_from]
    deleted = retention_deletes(steps, checkpoint.max_to_keep, checkpoint.keep_every)
    inside = (p for s in deleted for p in [checkpoints / str(s), *(checkpoints / str(s)).rglob("*")] if p.is_dir())
    try:
        blocked = next((p for p in [checkpoints, workdir / METRICS_FILE, *inside]
                        if p.exists() and not os.access(p, os.W_OK)), None)
    except FileNotFoundError:  # a step directory removed while it was walked: nothing to delete there
        blocked = None
    if blocked is not None:
        raise RunError(f"--workdir {workdir}: no permission to write {blocked}, which the run writes or deletes "
                       f"when it continues; fix its permissions (e.g. chmod -R u+w {workdir}) or use another --workdir")


def _other_tokenizer(model_dir: str, tokenizer_file: Path | None) -> bool:
    """Whether the model directory carries a tokenizer.model that is not the run's."""
    own = Path(model_dir) / "tokenizer.model"
    return tokenizer_file is not None and own.is_file() and sha256_file(own) != sha256_file(tokenizer_file)


def state_from_model(path: str, trainer: Trainer) -> TrainState:
    """A fresh state whose parameters come from a model directory (e.g. converted weights)."""
    cfg = trainer.model_config
    check_init_from(path, cfg)
    stacked = cfg.replace(scan_layers=True)  # a model directory holds its layers stacked, whatever it was saved from
    _, params = load_model(path, shardings=tree_shardings(trainer.mesh, abstract_params(stacked), trainer.rules),
                           scan_layers=True)
    abstract = nn.meta.unbox(trainer.abstract_state.params)
    in_run_layout = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), params_in_layout(cfg, p), abstract),
                            out_shardings=trainer.state_shardings.params,
                            donate_argnums=0 if cfg.scan_layers else ())  # unstacked layers cannot reuse them
    init_opt = jax.jit(trainer.optimizer.init, out_shardings=trainer.state_shardings.opt_state)
    with trainer.context():
        params = in_run_layout(params)
        opt_state = init_opt(params)

    def zero():  # step and skipped need buffers of their own: the train step donates both
        return jax.device_put(np.zeros((), np.int32), trainer.state_shardings.step)

    return TrainState(zero(), params, opt_state, zero())


def export_model(workdir: str | Path, dst: str | Path, step: int | None = None, overwrite: bool = False) -> tuple:
    """Write the parameters of a run's checkpoint (default: the latest) as a model directory
    (`save_model`), with the tokenizer the run used; `llama-jax convert --from jax` takes it on
    to Hugging Face or Meta format. Returns (path, step, the model's LLaMAConfig)."""
    workdir = Path(workdir).absolute()
    check_export(workdir, dst, overwrite, step)  # before reading gigabytes
    step, info, model, params = read_checkpoint_params(workdir, step)
    tokenizer = model_tokenizer(workdir, run_tokenizer(workdir, info))
    return save_model(dst, model, params, tokenizer=tokenizer, overwrite=overwrite), step, model


def model_tokenizer(workdir: Path, tokenizer: Path | None) -> Path | None:
    """What a model of the run gets as its tokenizer (`tokenizer`, the one it trained with):
    WORKDIR/tokenizer_files when that holds it, with the generation and tokenizer settings of the
    model the run was fine-tuned from (its end-of-text ids, say); else `tokenizer` itself."""
    kept = Path(workdir) / MODEL_TOKENIZER_DIR
    if tokenizer is not None and (kept / "tokenizer.model").is_file() and (
            sha256_file(kept / "tokenizer.model") == sha256_file(tokenizer)):
        return kept
    return tokenizer


def keep_model_tokenizer_files(model_dir: str, workdir: Path, tokenizer_file: Path | None) -> None:
    """At a run's start, copy into WORKDIR/tokenizer_files the tokenizer and generation files of the
    model it starts from (`model_dir`; "" for none), when the run trains with that model's
    tokenizer.model and the model has more of them (generation_config.json, tokenizer.json, ...):
    `export` writes them with the run's parameters, so a fine-tune exported and converted keeps,
    e.g., the end-of-sequence ids of an instruct model. What an earlier start, stopped before its
    first checkpoint, kept there is removed first (it may be another model's)."""
    from llama_jax.model_dir import TOKENIZER_FILES, copy_tokenizer_files

    kept = workdir / MODEL_TOKENIZER_DIR
    shutil.rmtree(kept, ignore_errors=True)
    if not model_dir:
        return
    source = Path(model_dir)
    more = [n for n in TOKENIZER_FILES if n != RUN_TOKENIZER and (source / n).is_file()]
    if tokenizer_file is None or not more or not (source / RUN_TOKENIZER).is_file():
        return
    partial = kept.with_name(kept.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        copy_tokenizer_files(source, partial)
        os.replace(partial, kept)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def read_checkpoint_params(workdir: Path, step: int | None = None,
                           mesh=None) -> tuple[int, dict, LLaMAConfig, dict]:
    """(step, run info, model config, params) of checkpoint `step` (default: the latest), reading
    only the parameters (export, evaluation and generation from a run); `mesh`: restored sharded
    over it (a mesh that does not divide the model is a ValueError), else on the first local device.
    A run still training in `workdir` may remove the step while it is read (`max_to_keep`): the
    latest is then read again, a step asked for is a RunError saying so."""
    attempts = READ_ATTEMPTS
    while True:
        chosen = checkpoint_step(workdir, step)
        try:
            with _reader(workdir) as checkpoints:
                info = checkpoints.run_info(chosen)
                model = LLaMAConfig.from_dict(info["model"])
                return chosen, info, model, checkpoints.restore_params(chosen, model, mesh)
        except (CheckpointDamaged, FileNotFoundError) as e:  # FileNotFoundError: a step gone while listed
            # another step than the one read (opening the checkpoints looks at every step, and a run
            # training there deletes old ones), or the step read itself
            other_step = isinstance(e, FileNotFoundError) and holds_lock(workdir) and chosen in committed_steps(workdir)
            if not (other_step or _being_removed(workdir, chosen)):
                raise
            attempts -= 1
            if not attempts and step is None:  # every read lost: it would lose again at once
                raise RunError(f"the latest checkpoint of {workdir} was removed while it was read, {READ_ATTEMPTS} "
                               f"times in a row (the run training there saves a newer one before it can be read, "
                               f"keeping only the latest checkpoint.max_to_keep); read it once the run has "
                               f"finished (its last step is kept), or train with a larger checkpoint.every or "
                               f"max_to_keep") from None
            if step is not None and (not other_step or not attempts):
                kept = ", ".join(map(str, committed_steps(workdir)))
                raise RunError(f"checkpoint {chosen} of {workdir} was removed while it was read (the run training "
                               f"there keeps the latest checkpoint.max_to_keep); kept now: {kept}") from None


READ_ATTEMPTS = 10  # reads of a live run's latest checkpoint before giving up (each lost to a removal)


def _being_removed(workdir: Path, step: int) -> bool:
    """Whether `step`, which failed to read, is gone or going: a run training in `workdir` (it holds
    the lock) deletes old steps as it saves new ones, and a step is still listed while its files are
    being deleted."""
    deadline = time.monotonic() + REMOVAL_WAIT_S
    while step in (steps := committed_steps(workdir)):
        if not (holds_lock(workdir) and steps[-1] > step) or time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_tokenizer(workdir: Path, info: dict) -> Path | None:
    """The tokenizer file a run used: its kept copy, checked against the hash in the checkpoint.
    Runs from before copies were kept fall back to the file `data.tokenizer` names."""
    from llama_jax.tokenizer import tokenizer_file  # (a directory setting names its tokenizer.model)

    expected = info.get("tokenizer_sha256")
    data = info["config"].get("data", {})
    setting = data.get("tokenizer") if data.get("source") != "synthetic" else None
    candidates = [workdir / RUN_TOKENIZER] + ([tokenizer_file(setting)] if setting and setting != "train" else [])
    for path in candidates:
        if path.is_file() and (expected is None or sha256_file(path) == expected):
            return path
    if expected is not None:
        raise RunError(f"{workdir / RUN_TOKENIZER} is missing or is not the tokenizer this run trained with "
                       f"(SHA-256 {expected[:12]}...); put that tokenizer back before exporting")
    return None


# ---- evaluation and samples ------------------------------------------------------------------


def sample(config, trainer: Trainer, params, tokenizer, step: int, write) -> str:
    """The continuation of train.sample_prompt at `step` (seeded by it), also shown through `write`
    (None: not shown, as on processes other than the first)."""
    from llama_jax.generate import generate_text

    with trainer.context(per_device_attention=False):
        text = generate_text(trainer.model_config, params, tokenizer, config.train.sample_prompt,
                             max_new_tokens=config.train.sample_tokens, temperature=0.8, top_k=40, seed=step)
    if write is not None:  # (tqdm's write prints whether or not its bar is shown)
        write(f"step {step} sample: {config.train.sample_prompt}{text}")
    return text


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training (and eval) cross-entropy against step, from the whole metrics.jsonl (resumed runs
    included): the training curve is `nll`, as the held-out loss is, not `loss`, which adds the
    z-loss term of train.z_loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = metrics_lib.read_metrics(metrics_path)
    train, evals = metrics_lib.last_per_step(records, "nll"), metrics_lib.last_per_step(records, "eval_loss")
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step.

    Single-process runs only: in a multi-process run the processes must agree on the step to
    save, which JAX's preemption sync manager (started by `jax.distributed.initialize`, which
    handles SIGTERM itself) does through `CheckpointManager.reached_preemption`.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class RunResult:
    logged: list[dict]  # the records of the last step this run logged (`keep_last_step`); metrics.jsonl holds all
    final_step: int
    preempted: bool
    eval: dict[str, float] | None
    sample: str | None
    data: RunData


def check_processes_agree(config, workdir: Path, resume_from: int | None) -> None:
    """RunError, in every process of a multi-process run, unless all hold as many devices and were
    started with the same resolved config, --workdir and --resume-from: otherwise each would train
    with its own settings the shards it holds, or write its shards of a checkpoint where the others
    never commit them."""
    if jax.process_count() == 1:
        return
    held = collections.Counter(d.process_index for d in jax.devices())  # (every process sees every device)
    if len(set(held.values())) > 1:
        counts = ", ".join(f"process {p}: {n}" for p, n in sorted(held.items()))
        refuse_together(RunError(f"the {jax.process_count()} processes hold different numbers of devices ({counts}); "
                                 f"every process must hold as many (check each one's device visibility, e.g. "
                                 f"CUDA_VISIBLE_DEVICES or XLA_FLAGS)"))
    import hashlib

    given = {"config": config.to_json_best_effort(), "--workdir": str(workdir), "--resume-from": repr(resume_from)}
    digests = np.stack([np.frombuffer(hashlib.sha256(v.encode()).digest(), np.uint8) for v in given.values()])
    every = np.asarray(multihost_utils.process_allgather(digests))  # [processes, len(given), 32]
    for i, name in enumerate(given):
        differing = [p for p in range(len(every)) if not np.array_equal(every[p, i], every[0, i])]
        if differing:
            refuse_together(RunError(f"the {len(every)} processes were started with different {name} (process "
                                     f"{differing[0]}'s differs from process 0's); start every process with the same "
                                     "command and config, only --process-id differing"))


SHARED_PROBE = ".llama-jax-shared-"  # (+ a number) the file process 0 writes for `check_workdir_shared`


def check_workdir_shared(workdir: Path) -> None:
    """RunError, in every process of a multi-process run, unless each one sees a file process 0
    writes where the run lives (`workdir`, or its nearest existing ancestor for a new run): every
    process writes its part of each checkpoint there, and on disks of their own (a node-local path)
    the first save waited for good, without a word. The file's name is new to every process, so
    no file system (gcsfuse) has it cached as missing; it is removed once all have looked."""
    if jax.process_count() == 1:
        return
    number = int(multihost_utils.broadcast_one_to_all(np.int32(int.from_bytes(os.urandom(4), "little") >> 1)))
    where = next(p for p in (workdir, *workdir.parents) if p.is_dir())
    probe = where / f"{SHARED_PROBE}{number}"
    written = True
    if jax.process_index() == 0:
        try:
            probe.write_bytes(b"")
        except OSError:  # (not writable: the run's own first write says so)
            written = False
    written = bool(multihost_utils.broadcast_one_to_all(np.int32(written)))  # (also: the file is in place)
    seen = np.asarray(multihost_utils.process_allgather(np.int32(probe.exists()))) if written else []
    if jax.process_index() == 0 and written:
        probe.unlink(missing_ok=True)
    missing = [p for p, here in enumerate(seen) if not here]
    if missing:
        refuse_together(RunError(f"--workdir {workdir} is not one directory every process shares: process "
                                 f"{missing[0]} does not see the file process 0 wrote in {where}; a multi-process run "
                                 f"needs its workdir on storage all its hosts mount (each writes its part of every "
                                 f"checkpoint there), not a path on each host's own disk"))


def train_and_evaluate(config, workdir: str | Path, progress: bool = True, devices=None,
                       resume_from: int | None = None) -> RunResult:
    """Train `config.train.steps` steps in `workdir`, resuming if it holds checkpoints.

    Ends with an evaluation of the final parameters (when the data has a held-out split) and a
    text sample (when it has a tokenizer), also when the workdir already holds the final step.
    Everything that can fail on bad input is decided before the first write to the workdir. One
    run at a time: the main process holds a lock on the workdir (`safe_io.DirectoryLock`), and a
    train started where another runs raises DirectoryBusy (a ValueError).
    `devices`: the devices of the mesh (default: all). `resume_from`: continue from this
    committed step instead of the latest; the later checkpoints are moved aside, not deleted.
    """
    check_run_settings(config)
    workdir = Path(workdir).absolute()
    check_processes_agree(config, workdir, resume_from)
    check_workdir_shared(workdir)
    check_train_workdir(workdir, config)
    lock = DirectoryLock(workdir, f"--workdir {workdir} is in use: another llama-jax train is running there (it "
                                  "holds the directory's lock); wait for it to end, stop it, or use another --workdir")
    try:  # one run at a time in a workdir: two would write over each other's checkpoints and logs
        _lock_together(lock, workdir)
        if holds_run(workdir):  # (once locked: a run training there would be changing it)
            _check_run_writable(workdir, config.checkpoint, resume_from)
        return _train_and_evaluate(config, workdir, lock, progress, devices, resume_from)
    finally:
        lock.release()


def _lock_together(lock: DirectoryLock, workdir: Path) -> None:
    """Process 0 takes the lock of an existing `workdir`; where another run holds it, every process
    of a multi-process run refuses with its DirectoryBusy (the others went on alone into the first
    computation, and failed there on a peer gone without a word of why)."""
    busy = None
    if workdir.exists() and jax.process_index() == 0:
        try:
            lock.acquire()
        except DirectoryBusy as e:
            busy = e
    if jax.process_count() == 1:
        if busy is not None:
            raise busy
    elif multihost_utils.broadcast_one_to_all(np.int32(busy is not None)):
        refuse_together(busy or DirectoryBusy(lock.busy_message))


def _train_and_evaluate(config, workdir: Path, lock: DirectoryLock, progress: bool, devices,
                        resume_from: int | None) -> RunResult:
    from tqdm import tqdm

    trainer = build_trainer(config, devices, run_model(config, workdir, resume_from))
    cfg, t = trainer.model_config, config.train
    from_model = config.checkpoint.init_from if config.checkpoint.init_from and not committed_steps(workdir) else ""
    # before the data is read (a raw corpus is prepared first, minutes for a large one)
    differences = check_init_from(from_model, cfg, config.model) if from_model else {}
    data = build_data(config, cfg, workdir, process_rows(trainer.mesh, t.batch_size))
    if data.train is not None and len(data.train.sources) > 1:  # a mixture: each source's training loss too
        trainer = dataclasses.replace(trainer, sources=tuple(source.name for source in data.train.sources))
    try:  # until the data is adopted, whatever stops the run removes what was staged for it
        other_tokenizer = bool(from_model) and _other_tokenizer(from_model, data.tokenizer_file)
        if data.tokenizer and t.sample_tokens:  # samples are drawn during and after the run: check them now
            prompt = len(data.tokenizer.encode(t.sample_prompt, bos=True, eos=False))
            if prompt + t.sample_tokens > cfg.max_seq_len:
                raise RunError(f"train.sample_prompt ({prompt} tokens with BOS) + train.sample_tokens "
                               f"({t.sample_tokens}) = {prompt + t.sample_tokens} exceeds the model's max_seq_len "
                               f"({cfg.max_seq_len}); shorten them")
        state, start, resumed = initial_state(config, trainer, workdir, resume_from, data.stream)
        if start > t.steps:
            raise RunError(f"{workdir} holds checkpoint {start}, past train.steps={t.steps}; raise train.steps to "
                           f"at least {start} or use --resume-from an earlier step")
        if t.profile_steps and t.profile_start > start + 1 and (workdir / PROFILE_DIR).exists() \
                and not (workdir / PROFILE_DIR).is_dir():  # (a window after this process's first step: traced)
            raise RunError(f"--workdir {workdir}: {workdir / PROFILE_DIR} is a file; train.profile_steps writes its "
                           f"traces into that directory, so move the file away or set train.profile_steps=0")
        # ---- the first write: everything above only read ----
        main_process = jax.process_index() == 0
        if main_process:
            workdir.mkdir(parents=True, exist_ok=True)
            lock.acquire()  # a workdir that did not exist before is locked once created
            _set_aside_later_steps(workdir, start, resume_from)
            _say_init_from_differs(config, differences, other_tokenizer)
            _write_run_config(config, cfg, workdir, start, resumed, bool(data.eval_sets and t.eval_batches))
        tokenizer_sha256 = data.adopt(workdir)
        if main_process and start == 0:
            keep_model_tokenizer_files("" if other_tokenizer else config.checkpoint.init_from, workdir,
                                       data.tokenizer_file)
    except BaseException:
        data.discard()
        raise
    if resumed and start == t.steps:  # nothing left to train: its closing evaluation is made as the run's own
        config = _run_evaluation_settings(config, resumed["config"])
        t = config.train
    if jax.process_count() > 1:  # the others start saving only once process 0 has set the workdir up
        multihost_utils.sync_global_devices("llama_jax: workdir ready")
    checkpoints = RunCheckpoints(workdir / "checkpoints", config.checkpoint.every, config.checkpoint.max_to_keep,
                                 config.checkpoint.keep_every, config.checkpoint.async_save)
    evaluates, samples = bool(data.eval_sets and t.eval_batches), bool(data.tokenizer and t.sample_tokens)
    unlogged = t.steps if evaluates else None  # the last step, until the log holds its closing evaluation
    recorded = record_progress(workdir, recorded_step(workdir), unlogged)
    run_info = {"config": json.loads(config.to_json_best_effort()), "model": cfg.to_dict(),
                "tokenizer_sha256": tokenizer_sha256, "mesh": dict(trainer.mesh.shape)}
    if data.corpus_sha256:
        run_info["corpus_sha256"] = data.corpus_sha256
    if data.stream is not None:
        run_info["data_stream"] = data.stream
    writer = metrics_lib.MetricsWriter(workdir, first_step=start + 1)
    peak = metrics_lib.peak_flops_per_device()
    preemption = _Preemption()
    prefetch = data_lib.Prefetcher(data.train_rows, start)
    bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=None if progress and main_process else True)
    show = bar.write if main_process else None  # the samples' lines
    logged, eval_metrics, text, skipped_seen = [], None, None, int(state.skipped)
    evaluated_at = sampled_at = None
    window_start, window_tokens, step, saved_step = time.perf_counter(), 0, start, start
    in_flight = collections.deque()  # metrics of the steps dispatched and perhaps not yet computed
    trace = StepTrace(workdir / PROFILE_DIR, t.profile_start, t.profile_steps, bar.write, first=start + 1) \
        if t.profile_steps and main_process and start < t.steps else None
    abandon_save = False
    try:
        for step in range(start + 1, t.steps + 1):
            batch = global_batch(trainer.mesh, prefetch.next(step - 1), t.batch_size)
            if trace and trace.before(step, state):  # started: the steps it traces get no speed figure
                window_start, window_tokens = time.perf_counter(), 0
            state, step_metrics = trainer.step(state, batch)
            in_flight.append(step_metrics)
            if len(in_flight) > STEPS_AHEAD:  # a SIGTERM then saves a step computed moments later
                jax.block_until_ready(in_flight.popleft())
            window_tokens += t.batch_size * t.seq_len
            bar.update(1)
            record = {}
            if step % t.log_every == 0 or step == t.steps:
                fetched = jax.device_get(step_metrics)
                values = {k: float(v) for k, v in fetched.items() if not k.startswith("source_")}
                values.update(per_source_nll(trainer.sources, fetched))
                # no speed figure for the process's first step (it includes compiling) nor for traced steps
                if step > start + 1 and window_tokens and not (trace and trace.active):
                    per_device = window_tokens / (time.perf_counter() - window_start) / trainer.mesh.size
                    values.update(tokens_per_second=per_device * trainer.mesh.size,
                                  tflops_per_device=metrics_lib.tflops_per_device(per_device, cfg, t.seq_len),
                                  mfu=metrics_lib.mfu(per_device, cfg, t.seq_len, peak))
                if data.train is not None:  # epochs and tokens of the data consumed so far
                    values.update(data.train.progress(step))
                record.update(values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", **_speed_postfix(values))
                window_start, window_tokens = time.perf_counter(), 0
            evaluating = evaluates and t.eval_every and step % t.eval_every == 0
            sampling = samples and t.sample_every and step % t.sample_every == 0
            if evaluating or sampling:  # held-out work: its time is left out of the training throughput
                jax.block_until_ready(state.params)  # (the steps dispatched so far are training's)
                paused = time.perf_counter()
                if evaluating:
                    eval_metrics, evaluated_at = evaluate(config, trainer, state.params, data), step
                    record.update(eval_metrics)
                if sampling:
                    text, sampled_at = sample(config, trainer, state.params, data.tokenizer, step, show), step
                window_start += time.perf_counter() - paused
            if record:
                writer.write(step, record)
                keep_last_step(logged, step, record)
                if evaluated_at == t.steps:
                    unlogged = None
                if progress and main_process and bar.disable and step != t.steps:  # no terminal: a log line
                    print(log_line(step, record), flush=True)  # (the command's closing line tells the last)
            if step == start + 1:  # leave compilation out of the throughput figures
                jax.block_until_ready(state.step)
                window_start, window_tokens = time.perf_counter(), 0
            if record or checkpoints.due(step):
                skipped_seen = _check_finite(state, skipped_seen, step, t.on_nonfinite, checkpoints, bar)
            if checkpoints.save(step, state, {**run_info, "step": step}):
                saved_step = step
                recorded = record_progress(workdir, recorded, unlogged)  # the previous save, committed by now
            elif main_process and saved_step > (recorded or 0) and checkpoints.in_place(saved_step):  # committed
                recorded = record_progress(workdir, recorded, unlogged)
            # ended once the step's evaluation, sample and checkpoint save (due in the window: traced) are done
            if trace and trace.after(step, state):  # the next figure starts from here
                window_start, window_tokens = time.perf_counter(), 0
            # after the last step, a SIGTERM lets the run end as usual (evaluation, plot, closing line)
            if (preemption.requested or checkpoints.reached_preemption(step)) and step < t.steps:
                if saved_step != step:  # (checked first: a save between checks must not pass a skipped step)
                    skipped_seen = _check_finite(state, skipped_seen, step, t.on_nonfinite, checkpoints, bar)
                    checkpoints.save(step, state, {**run_info, "step": step}, force=True)
                checkpoints.wait()
                recorded = record_progress(workdir, recorded, unlogged)
                bar.write(f"preempted: checkpoint saved at step {step}; run the same command again to resume")
                return RunResult(logged, step, True, eval_metrics, text, data)
        if saved_step != step:
            skipped_seen = _check_finite(state, skipped_seen, step, t.on_nonfinite, checkpoints, bar)
            checkpoints.save(step, state, {**run_info, "step": step}, force=True)
        if preemption.requested:  # during the last step: the checkpoint committed before the closing work
            checkpoints.wait()
            recorded = record_progress(workdir, recorded, unlogged)
        # the final parameters, unless just evaluated: after the final save, so that an evaluation that
        # fails loses no step; a record of its own for the last step
        if evaluates and evaluated_at != step:
            # a rerun with nothing left to train reports the logged evaluation (made with the run's
            # settings); one stopped between its last checkpoint and that record makes it
            eval_metrics = None if step > start else _logged_evaluation(workdir, step)
            if eval_metrics is None:
                eval_metrics = evaluate(config, trainer, state.params, data)
                writer.write(step, eval_metrics)
                keep_last_step(logged, step, eval_metrics)
        unlogged = None
        if samples and sampled_at != step:
            text = sample(config, trainer, state.params, data.tokenizer, step, show)  # (before the closing line)
        checkpoints.wait()
        recorded = record_progress(workdir, recorded)
        writer.close()  # the log complete, for the plot
        if main_process and (workdir / METRICS_FILE).exists():
            plot_losses(workdir / METRICS_FILE, workdir / LOSS_PLOT)
    except BaseException as error:
        # a computation that failed in a multi-process run may have lost a process: then an async
        # save in flight cannot pass Orbax's barrier, and waiting for it would hang (the previous
        # checkpoint stays the latest; the next run removes the unfinished one)
        abandon_save = jax.process_count() > 1 and computation_failed(error) and not _every_process_here()
        raise
    finally:  # SIGTERM stays a flag through here: once the steps are done, the run ends as it would have
        try:
            if trace:
                trace.close(cut_short=True)  # (only a trace still running: the run ended inside its window)
            bar.close()
            prefetch.close()
            writer.close()
            if not abandon_save:
                checkpoints.wait()
                checkpoints.close()
            with contextlib.suppress(OSError):  # also when an error ends the run (which this must not hide)
                record_progress(workdir, recorded, unlogged)
        finally:  # (a save that failed in the wait above still leaves the command's own handlers in place)
            preemption.restore()
    return RunResult(logged, step, False, eval_metrics, text, data)


def keep_last_step(logged: list[dict], step: int, record: dict) -> None:
    """Add the `record` logged for `step` to `logged`, which keeps the records of the latest logged
    step only (its training metrics and a closing evaluation's): a list of every record grew by
    about 1.5 KB per logged step for the whole run, a gigabyte over a long run logging every step."""
    if logged and logged[-1]["step"] != step:
        logged.clear()
    logged.append({"step": step, **record})


def _records_of_steps(steps: list[int]) -> str:
    return (f"the metrics record of step {steps[0]}" if len(steps) == 1
            else f"the {len(steps)} metrics records of steps {steps[0]}-{steps[-1]}")


def _set_aside_later_steps(workdir: Path, start: int, resume_from: int | None) -> None:
    """Move into WORKDIR/checkpoints-set-aside/ what comes after `start`, the step the run continues
    from: the checkpoints after a --resume-from step, and the metrics records and eval results of
    later steps; each said in a line."""
    set_aside = set_aside_after(workdir, start) if resume_from is not None else []
    if set_aside:
        print(f"resuming from checkpoint {start}; checkpoints moved to {workdir / SET_ASIDE_DIR}: "
              f"{', '.join(p.name for p in set_aside)}")
    moved = set_aside_metrics_after(workdir, start)
    if moved:
        print(f"{'no checkpoint: starting from step 0' if start == 0 else f'resuming from step {start}'}; "
              f"{_records_of_steps(moved)} logged after it moved to "
              f"{workdir / SET_ASIDE_DIR / METRICS_FILE}")
    results = set_aside_results_after(workdir, start)
    if results:
        print(f"eval results of steps after {start} moved to {workdir / SET_ASIDE_DIR}: {', '.join(results)}")


def _say_init_from_differs(config, differences: dict[str, str], other_tokenizer: bool) -> None:
    """Say how the model of checkpoint.init_from differs from this run's: the rotary and norm settings
    it was trained with (`check_init_from`'s `differences`), and a tokenizer other than the run's."""
    if differences:  # chosen anew on purpose (a longer context), or a preset's value by mistake
        # with the init_from preset, only the config's own fields differ from the model's
        own = "model.preset=init_from" if config.model.preset != INIT_FROM_PRESET else \
            " and ".join(f"model.{field}=None" for field in differences)
        print(f"checkpoint.init_from={config.checkpoint.init_from} was trained with "
              f"{', '.join(differences.values())}; {own} takes the model's own")
    if other_tokenizer:  # a new vocabulary on purpose, or the wrong tokenizer by mistake
        own = Path(config.checkpoint.init_from) / "tokenizer.model"
        print(f"checkpoint.init_from={config.checkpoint.init_from} comes with a tokenizer other than this "
              f"run's (data.tokenizer={config.data.tokenizer}): its token ids stand for other text here; "
              f"to fine-tune it on its own vocabulary, give data.tokenizer={own}")


def _write_run_config(config, model: LLaMAConfig, workdir: Path, start: int, resumed: dict | None,
                      evaluates: bool = False) -> None:
    """Write the config the run continues with as WORKDIR/config.json, unless nothing is left to
    train, after saying which settings changed since checkpoint `start` (`resumed`: the run
    information saved with it; None for a new run) and keeping the run's checkpoint.init_from.
    `evaluates`: the run logs held-out evaluations (whose subset a change may have changed)."""
    if resumed:
        _keep_weights_source(config, resumed["config"], start)
    changed = changed_settings(resumed["config"], config, resumed.get("model"),
                               json.loads(json.dumps(model.to_dict()))) if resumed else []
    if changed and start < config.train.steps:  # config.json will hold the new values: say what earlier steps ran with
        print(f"resuming from checkpoint {start} with settings changed since it was saved: "
              f"{', '.join(changed)}" + ("; the learning-rate schedule is recomputed over the new "
                                          "train.steps" if any(c.startswith("train.steps") for c in changed)
                                         else "") + (_held_out_change(resumed["config"], config) if evaluates else ""))
    elif changed:  # nothing left to train: the run's config stays the one it ran with
        print(f"nothing is left to train, so config.json keeps the settings the run ran with, not these "
              f"changed since checkpoint {start}: {', '.join(changed)}")
    if start < config.train.steps:
        write_text_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")


def _run_evaluation_settings(config, saved: dict):
    """`config` with the settings that decide a held-out evaluation (train.eval_batches, and the
    micro-batch rows of train.grad_accum) taken from `saved`, the config of the checkpoint a rerun
    with nothing left to train ends at: the closing evaluation it logs (one that was not logged yet,
    or none for a run that did not evaluate) is then the run's, as config.json keeps the run's
    settings; with the rerun's, the log held an evaluation of another subset than config.json says."""
    config = config.copy_and_resolve_references()
    for key in ("eval_batches", "grad_accum"):
        if key in saved.get("train", {}):
            config.train[key] = saved["train"][key]
    return config


def _held_out_change(saved: dict, config) -> str:
    """The end of the resume line when the held-out evaluations cover another number of rows than
    the run's earlier ones (`saved`: the checkpoint's config): train.eval_batches counts
    micro-batches, so another train.grad_accum (to fit another slice's memory, say) changes the
    subset, and the losses evaluated before and after are not of the same windows. (Rows, not
    windows: a row holds as many whole windows as fit, several of short documents.)"""
    def rows(t) -> int | None:  # at most this many (None: all of them)
        return None if t["eval_batches"] == -1 else t["eval_batches"] * (t["batch_size"] // t["grad_accum"])

    def cover(n: int | None) -> str:
        return "all" if n is None else f"up to {n}"

    was, now = saved.get("train", {}), config.train
    if not {"eval_batches", "batch_size", "grad_accum"} <= set(was) or not was["eval_batches"] \
            or rows(was) == rows(now):
        return ""
    micro, before = now.batch_size // now.grad_accum, rows(was)
    keep = f"; train.eval_batches={before // micro} keeps the run's {before}" \
        if before is not None and before % micro == 0 else ""
    return (f"; held-out evaluations now cover {cover(rows(now))} rows of held-out windows, not {cover(before)} "
            f"(train.eval_batches micro-batches of train.batch_size / train.grad_accum rows), so their losses are "
            f"of another subset than the earlier ones{keep}")


FAILED_RUN_BARRIER_S = 10  # how long a failed process of a multi-process run waits for the others


def _every_process_here() -> bool:
    """Whether every process of a multi-process run whose computation failed gets here within
    FAILED_RUN_BARRIER_S: a barrier of JAX's distributed client, which a lost process never
    reaches. When all failed together (an out-of-memory error, say), their async save in flight
    still commits; waiting for it is safe."""
    from jax._src import distributed

    try:
        distributed.global_state.client.wait_at_barrier("llama_jax_failed_run", FAILED_RUN_BARRIER_S * 1000)
    except Exception:  # timed out, or the coordination service went with its process
        return False
    return True


def _logged_evaluation(workdir: Path, step: int) -> dict[str, float] | None:
    """The held-out metrics logged for `step` in the run's metrics.jsonl, or None."""
    record = next((r for r in metrics_lib.read_metrics(workdir / METRICS_FILE)
                   if r.get("step") == step and "eval_loss" in r), None)
    return None if record is None else {k: v for k, v in record.items() if k.startswith("eval_")}


def log_line(step: int, record: dict) -> str:
    """What a logged step says where no progress bar is shown (output to a file: a cluster job's
    log, a sweep trial's train.log)."""
    parts = []
    if "loss" in record:
        speed = (f", {record['tokens_per_second']:,.0f} tokens/s, MFU {record['mfu']:.1%}"
                 if "tokens_per_second" in record else "")
        parts.append(f"loss {record['loss']:.4f}{speed}")
    if "eval_loss" in record:
        parts.append(f"held-out loss {record['eval_loss']:.4f}")
    return f"step {step}: {'; '.join(parts)}"


def _speed_postfix(values: dict) -> dict[str, str]:
    """The progress bar's throughput fields, for a logged step that has them."""
    if "tokens_per_second" not in values:
        return {}
    return {"tok_s": f"{values['tokens_per_second']:,.0f}", "mfu": f"{values['mfu']:.1%}"}


def _check_finite(state: TrainState, skipped_seen: int, step: int, on_nonfinite: str, checkpoints, bar) -> int:
    """The state's count of skipped (non-finite) steps; with on_nonfinite=stop, a RunError if it grew.
    Run at logged steps and before every save, so no checkpoint holds a skip unnoticed."""
    skipped = int(state.skipped)
    if skipped > skipped_seen:
        if on_nonfinite == "stop":
            latest = checkpoints.latest_step()
            raise RunError(f"{NONFINITE_STOP} in {skipped - skipped_seen} step(s) up to step {step}; "
                           f"stopped (train.on_nonfinite=stop). No such step was applied to the state; latest "
                           f"checkpoint: {latest if latest is not None else 'none'}")
        bar.write(f"step {step}: skipped {skipped - skipped_seen} step(s) with a non-finite loss or gradient")
    return skipped
