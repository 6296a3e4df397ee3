"""The data side of a run: prepared token shards, packed into rows, in per-epoch orders.

There is one training data path. `data.source=prepared` reads directories written by `llama-jax
prepare-data` (`data.path`, or several with weights in `data.mixture`). Any other text source
(embedded, stdlib, text, jsonl, tfds) is prepared on the run's first start: into a temporary directory
while the run's inputs are checked, then moved to WORKDIR/data when the run starts, where a
resumed run finds it. `data.source=synthetic` needs no data at all.

Each prepared directory's tokenizer must be the run's: the one it started with (WORKDIR/
tokenizer.model), and `data.tokenizer` when given. Held-out documents are evaluated whole per
source (`evaluate`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import data as data_lib
from llama_jax.config import LLaMAConfig
from llama_jax.packed import ORDER, Source, TrainRows, order_seed
from llama_jax.prepare import MANIFEST, open_prepared, read_from
from llama_jax.run_files import RUN_TOKENIZER, RunError
from llama_jax.safe_io import (PARTIAL_SUFFIX, RUN_DATA_DIR, copy_file_atomic, owned_temp_directory, saved_run_setting,
                               sha256_file, signals_held)
from llama_jax.tokenizer import check_fits, load_tokenizer, tokenizer_file

STAGING_PREFIX = "llama-jax-data-"  # temporary directory of data prepared for a run that has not started


@dataclasses.dataclass
class RunData:
    train_rows: Callable[[int], dict]  # step -> this process's rows of the global batch
    eval_sets: Mapping[str, object]  # source name -> its held-out split (documents evaluated whole)
    tokenizer: object | None
    train: TrainRows | None
    tokenizer_file: Path | None = None  # the tokenizer's bytes on disk, kept in the workdir once the run starts
    staged: Path | None = None  # data prepared for this run, in a temporary directory until it starts
    corpus_sha256: str | None = None  # the prepared manifest's fingerprint of a corpus that depends on the
    # interpreter (stdlib)
    stream: list | None = None  # each training source: name, share of the rows, documents and tokens

    def adopt(self, workdir: Path) -> str | None:
        """Move data prepared for the run to WORKDIR/data and keep its tokenizer as
        WORKDIR/tokenizer.model (process 0; the others wait, and move their own copy there when they
        do not see the workdir's); the data is read from there from now on. Returns the tokenizer's
        SHA-256, or None (doing nothing) where the run has no tokenizer (synthetic data)."""
        if self.tokenizer_file is None:
            return None
        digest = sha256_file(self.tokenizer_file)
        if self.staged is not None:
            final = workdir / RUN_DATA_DIR
            if jax.process_index() == 0:
                _move_into_place(self.staged, final)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("llama_jax: run data in place")
                if jax.process_index() and not (final / MANIFEST).is_file():
                    _move_into_place(self.staged, final)  # this host does not see process 0's disk
            discard_staged(self.staged)
            self.staged = None
            # Nothing has been read from the files yet (only the manifest): point the splits there.
            for split in [s.split for s in self.train.sources] + list(self.eval_sets.values()):
                split.directory = final
            self.tokenizer_file = final / self.tokenizer_file.name
        kept = workdir / RUN_TOKENIZER
        if jax.process_index() == 0 and not kept.exists():
            copy_file_atomic(self.tokenizer_file, kept)  # whole or absent: a later run checks it by its hash
        return digest

    def discard(self) -> None:
        discard_staged(self.staged)


def _move_into_place(staged: Path, final: Path) -> None:
    """Move staged data to `final` whole or not at all: across file systems a move is a copy, so it
    goes to a sibling first and is renamed into place when complete."""
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        shutil.move(str(staged), partial)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
            source, _, why = e.args[0][0]  # a copy that failed file by file (a full disk): the first failure
            raise OSError(f"{why} (moving {source} into {partial})") from None
        raise
    partial.rename(final)


def staging_directory() -> Path:
    """A new temporary directory to prepare a run's data in, recording which process owns it
    (those that killed processes left behind are removed first)."""
    return owned_temp_directory(STAGING_PREFIX)


def discard_staged(path: Path | None) -> None:
    """Remove data prepared for a run that did not start (it lives in a temporary directory)."""
    if path is not None and path.parent.name.startswith(STAGING_PREFIX):
        shutil.rmtree(path.parent, ignore_errors=True)


MIXTURE_ENTRY_KEYS = ("path", "weight")  # the settings of one data.mixture entry


def prepared_dirs(d) -> list[tuple[str, Path, float]]:
    """(name, directory, weight) of each prepared dataset a `data.source=prepared` config names."""
    mixture = d.get("mixture") or {}
    if mixture and d.get("path"):
        raise RunError("give either data.path (one prepared directory) or data.mixture (several), not both")
    if not mixture:
        if not d.get("path"):
            raise RunError("data.source=prepared needs data.path (a directory written by llama-jax prepare-data) "
                           "or data.mixture ({name: {path, weight}})")
        return [("data", Path(d.path), 1.0)]
    out = []
    for name, entry in mixture.items():
        if not name.strip():  # (its metrics would be eval_loss/, its messages would name source '')
            raise RunError(f"data.mixture has a source named {name!r}; give each source a name for its metrics "
                           f"and messages, e.g. 'web' (eval_loss/web)")
        if not hasattr(entry, "get") or not entry.get("path"):
            raise RunError(f"data.mixture.{name} needs a path (a directory written by llama-jax prepare-data) "
                           f"and a weight, e.g. {{'path': '/data/c4', 'weight': 0.8}}")
        unknown = sorted(str(key) for key in entry.keys() if key not in MIXTURE_ENTRY_KEYS)
        if unknown:
            raise RunError(f"data.mixture.{name} has no setting {unknown[0]!r}; valid: {', '.join(MIXTURE_ENTRY_KEYS)}")
        if not isinstance(entry["path"], str):
            raise RunError(f"data.mixture.{name}.path={entry['path']!r} must be a directory path (a string), e.g. "
                           f"'/data/c4'")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            raise RunError(f"data.mixture.{name}.weight={weight!r} must be a positive number")
        out.append((name, Path(entry["path"]), float(weight)))
    if not math.isfinite(sum(weight for _, _, weight in out)):
        raise RunError("data.mixture weights add up to more than a float can hold; give shares of a usual size, "
                       "e.g. weights that sum to 1")
    return out


def runs_own_settings(data, workdir: Path) -> bool:
    """Whether the `data` section is the run's own in `workdir`: its config.json's, as its latest
    checkpoint was saved with (a config.json edited by hand since is not). Then it names the run's
    data (for a raw source, its prepared copy WORKDIR/data), and its relative paths are the ones
    the run read from the directory it was started in, whatever the current one."""
    from llama_jax.prepare import _jsonable
    from llama_jax.run import latest_run_config

    saved = saved_run_setting(workdir, "data")
    if saved is None or _jsonable(data) != saved:
        return False
    checkpointed = latest_run_config(workdir)
    return checkpointed is None or checkpointed.get("data") == saved


def prepared_copy_missing(directory: Path) -> str:
    """What is wrong with a run's prepared copy of its documents (WORKDIR/data) that has no manifest."""
    directory = Path(os.path.abspath(directory))
    if directory.is_dir():
        return f"{directory}, the run's prepared copy of its documents, has no {MANIFEST} (incomplete or damaged)"
    return f"{directory}, the run's prepared copy of its documents, is missing"


def own_copy_advice(workdir: str | os.PathLike) -> str:
    """How the prepared copy of a run's documents (WORKDIR/data), missing or damaged, is made again
    (the run's own settings prepared into its place, which the commands reading it check)."""
    workdir = Path(os.path.abspath(workdir))
    final = workdir / RUN_DATA_DIR
    remove = f"remove {final} and " if final.exists() else ""
    return (f"{remove}prepare it again in its place: llama-jax prepare-data --config {workdir / 'config.json'} "
            f"--output {final}, from the directory the run was started in (its documents and tokens are checked "
            f"against those its checkpoints trained on)")


def _stage_raw(d, workdir: Path, kept: Path, runs_own: bool) -> tuple[Path, Path | None]:
    """(directory to read, staged temporary copy or None) of a raw text source, prepared now unless
    WORKDIR/data holds it already (`runs_own`: `d` is the run's own settings, `runs_own_settings`)."""
    from llama_jax.prepare import check_prepared, prepare

    final = workdir / RUN_DATA_DIR
    if d.tokenizer and d.tokenizer != "train":
        given = tokenizer_file(d.tokenizer)
        if kept.is_file() and given.is_file() and sha256_file(given) != sha256_file(kept):
            where = read_from(d.tokenizer)
            if not (runs_own and where):
                raise RunError(f"data.tokenizer={d.tokenizer}{where} differs from the tokenizer this run started "
                               f"with ({kept}); resume with that tokenizer or use another --workdir")
            # the run's own relative setting, which it read from where it started: its copy stands for it
            if jax.process_index() == 0:
                print(f"data.tokenizer={d.tokenizer}{where} differs from the tokenizer this run started with; using "
                      f"the run's copy of that ({kept}), as the run's own settings name it")
            use_copy = True
        else:
            use_copy = (final / MANIFEST).is_file() and _copy_stands_in(d.tokenizer, kept)
        if use_copy:
            d = copy.deepcopy(d)
            d.tokenizer = str(kept)
    if runs_own and not (final / MANIFEST).is_file() and any((workdir / "checkpoints").glob("*")):
        raise RunError(f"{prepared_copy_missing(final)}; its checkpoints trained on it: put it back, or "
                       f"{own_copy_advice(workdir)}; or start a new run with another --workdir")
    if final.exists() and not (final / MANIFEST).is_file():  # (made by hand: a run moves its copy there whole)
        raise RunError(f"{prepared_copy_missing(final)}; finish it (llama-jax prepare-data --output "
                       f"{os.path.abspath(final)} with the run's data settings), or remove it and the run prepares its "
                       f"documents as it starts")
    if (final / MANIFEST).is_file():
        check_prepared(final, d, f"{final} (the data this run started with) was prepared",
                       "use the run's data settings (its config.json) or another --workdir", runs_own=runs_own,
                       again=f"{own_copy_advice(workdir)}; or start a new run with another --workdir")
        return final, None
    if d.tokenizer == "train" and jax.process_count() > 1:
        raise RunError("data.tokenizer=train needs a single process; train it once with "
                       "tools/train_tokenizer.py and pass its path")
    staged = None
    try:
        with signals_held():  # a signal between making the directory and knowing it here left it behind
            staged = staging_directory() / RUN_DATA_DIR
        prepare(d, staged, progress=jax.process_index() == 0)
    except BaseException:
        discard_staged(staged)
        raise
    return staged, staged


def _copy_stands_in(tokenizer: str, kept: Path) -> bool:
    """Whether the run's copy `kept` of its tokenizer stands in for data.tokenizer=`tokenizer`: the
    file it names is gone since the run started with it (say, with the model directory a fine-tune
    started from). Says so when it does."""
    if not kept.is_file() or tokenizer_file(tokenizer).exists() or not _started_with_tokenizer(kept.parent, tokenizer):
        return False
    if jax.process_index() == 0:
        print(f"data.tokenizer={tokenizer}{read_from(tokenizer)} no longer exists; using the run's copy of it "
              f"({kept})")
    return True


def _started_with_tokenizer(workdir: Path, tokenizer: str) -> bool:
    """Whether the run in `workdir` was started with data.tokenizer=`tokenizer` (its config.json)."""
    return saved_run_setting(workdir, "data", "tokenizer") == tokenizer


def build_data(config, model: LLaMAConfig | None, workdir: Path, rows: Sequence[int] | None = None,
               runs_own: bool | None = None) -> RunData:
    """The run's batches, held-out sets and tokenizer, all read-only: data of a raw source is
    prepared into a temporary directory until `RunData.adopt` (the run's first write).
    `model`: checked to hold the tokenizer's vocabulary (None: already checked). `rows`: the rows
    of each global batch this process feeds (`sharding.process_rows`; None: all of them).
    `runs_own`: the data section is the run's own (default: equal to its config.json's)."""
    from llama_jax.experiment import check_run_source
    from llama_jax.run import readable_run_info

    d, t = config.data, config.train
    rows = range(t.batch_size) if rows is None else rows
    if d.source == "synthetic":
        return RunData(lambda s: data_lib.synthetic_batch(t.seed, s, rows, t.seq_len, model.vocab_size),
                       {}, None, None)
    kept, info = workdir / RUN_TOKENIZER, readable_run_info(workdir)
    kept_sha256 = sha256_file(kept) if kept.is_file() else None
    _check_kept_tokenizer(kept, kept_sha256, info)
    staged = None
    if d.source == "prepared":
        named = prepared_dirs(d)
    else:
        check_run_source(d)
        own = runs_own_settings(d, workdir) if runs_own is None else runs_own
        path, staged = _stage_raw(d, workdir, kept, own)
        named = [("data", path, 1.0)]
    own_copy = d.source != "prepared" and staged is None  # (its damage found on opening, or on reading an index)
    again = f"{own_copy_advice(workdir)}; or start a new run with another --workdir" if own_copy else None
    try:
        return _open(d, t, model, named, kept, kept_sha256, rows, staged, again, _legacy_order(info),
                     _vocab_remedy(config))
    except BaseException:
        discard_staged(staged)
        raise


def _legacy_order(info: dict) -> bool:
    """Whether the run whose newest readable checkpoint records `info` has checkpoints whose data
    stream records no row-order scheme (`packed.ORDER`): saved by a release that seeded each epoch's
    order with the run's seed itself, which its resumes keep (every checkpoint of a run records the
    scheme it started with)."""
    return bool(info) and not any("order" in entry for entry in info.get("data_stream") or [])


def reads_earlier_order(info: dict) -> bool:
    """Whether the run whose newest readable checkpoint records `info` draws its rows in the order of
    a release before `packed.ORDER` (`_legacy_order`); synthetic data has no order to keep."""
    return _legacy_order(info) and info.get("config", {}).get("data", {}).get("source") != "synthetic"


def _check_kept_tokenizer(kept: Path, kept_sha256: str | None, info: dict) -> None:
    """RunError when the run's copy of its tokenizer (`kept`, of SHA-256 `kept_sha256`; None: none
    kept) is not the one its checkpoints record (`info`): changed or damaged since, it would be
    taken for the run's, and its data named as prepared with another tokenizer."""
    expected = info.get("tokenizer_sha256")
    if expected and kept_sha256 is not None and kept_sha256 != expected:
        raise RunError(f"{kept} is not the tokenizer this run trained with (its checkpoints record SHA-256 "
                       f"{expected[:12]}...): it was changed or damaged; put that tokenizer back, or delete the file "
                       f"and the run copies it again from its data")


def _vocab_remedy(config) -> str:
    """How the error for a tokenizer with more tokens than the run's model ends: a fine-tune's
    vocabulary is that of the model it starts from (a model.vocab_size of its own is refused)."""
    init_from = config.checkpoint.get("init_from")
    if not init_from:
        return "use the model's tokenizer or a model.vocab_size of at least the tokenizer's"
    own = Path(init_from) / "tokenizer.model"
    return (f"a fine-tune keeps the vocabulary of checkpoint.init_from={init_from}, so give data.tokenizer"
            + (f"={own}" if own.is_file() else " the tokenizer that model was trained with"))


def _open(d, t, model, named, kept: Path, kept_sha256: str | None, rows, staged, again: str | None,
          legacy_order: bool, vocab_remedy: str) -> RunData:
    required = kept_sha256
    opened = []
    for name, path, weight in named:
        prepared = open_prepared(path, required, again=again)
        required = required or prepared.tokenizer_sha256
        opened.append((name, prepared, weight))
    tokenizer_path = opened[0][1].tokenizer_path
    if d.source == "prepared" and d.get("tokenizer") and d.tokenizer != "train":
        given = tokenizer_file(d.tokenizer)
        stands_in = _copy_stands_in(d.tokenizer, kept)  # the prepared data's tokenizer: `required` is its hash
        if not stands_in and not given.is_file():
            raise RunError(f"data.tokenizer={d.tokenizer}: no such file; leave data.tokenizer empty (the prepared "
                           f"data brings its own) or give the tokenizer {named[0][1]} was prepared with")
        if not stands_in and sha256_file(given) != required:
            raise RunError(f"data.tokenizer={d.tokenizer} is not the tokenizer {named[0][1]} was prepared with; "
                           f"leave data.tokenizer empty (the prepared data brings its own) or prepare the data with it")
    tokenizer = load_tokenizer(tokenizer_path)
    if model is not None:
        check_fits(tokenizer, model.vocab_size, vocab_remedy)
    sources = [Source.create(name, prepared.splits["train"], weight, t.seq_len, order_seed(t.seed, i, legacy_order))
               for i, (name, prepared, weight) in enumerate(opened)]
    train = TrainRows(sources, t.seq_len, t.batch_size)
    eval_sets = {name: prepared.splits["held_out"] for name, prepared, _ in opened
                 if prepared.splits["held_out"].documents}
    if not eval_sets and t.eval_every:
        if d.source == "prepared":  # data.eval_fraction was applied when the data was prepared
            raise RunError(f"train.eval_every={t.eval_every} but {', '.join(str(p) for _, p, _ in named)} holds no "
                           f"held-out documents (data.eval_fraction takes effect when data is prepared); prepare "
                           f"it again with data.eval_fraction > 0, or set train.eval_every=0")
        raise RunError(f"train.eval_every={t.eval_every} but no document is held out for evaluation "
                       f"(data.eval_fraction={d.get('eval_fraction')}); use eval_fraction > 0 or train.eval_every=0")
    slots = {"slots_sha256": train.mixture.fingerprint()} if len(opened) > 1 else {}  # which source each slot reads
    order = {} if legacy_order else {"order": ORDER}
    stream = [{**entry, **slots, **order} for entry in stream_of(opened)]
    return RunData(lambda s: train.batch(s, rows), eval_sets, tokenizer, train, tokenizer_path, staged,
                   opened[0][1].manifest.get("corpus_sha256") if len(opened) == 1 else None, stream)


def stream_of(opened: list[tuple[str, object, float]]) -> list[dict]:
    """What a run records of the sources it trains on (`opened`: name, opened prepared directory,
    weight): each one's name, share of the rows, training documents and tokens, and corpus
    fingerprint where its manifest has one."""
    total = sum(weight for _, _, weight in opened)
    return [{"name": name, "share": weight / total, "documents": prepared.splits["train"].documents,
             "tokens": prepared.splits["train"].tokens,
             **({"corpus_sha256": sha} if (sha := prepared.manifest.get("corpus_sha256")) else {})}
            for name, prepared, weight in opened]


def split_documents(split):
    """(token ids, UTF-8 bytes) of every document of a prepared split, in order."""
    for i in range(split.documents):
        yield split.document_tokens(i), split.document_info(i)[2]


def target_counts(split, tokenizer, chunk: int = 2**24) -> np.ndarray:
    """How often each token id occurs as a target in a prepared split: every token but the BOS
    each document starts with (the training data of a unigram baseline)."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    for start in range(0, split.tokens, chunk):
        counts += np.bincount(split.token_range(start, min(start + chunk, split.tokens)), minlength=len(counts))
    counts[tokenizer.bos_id] -= split.documents
    return counts


def evaluate(config, trainer, params, data: RunData) -> dict[str, float]:
    """Held-out loss, perplexity and next-token accuracy of `params`, by the code of `llama-jax eval`
    (`evaluate_splits`): each source's held-out documents in consecutive windows, each target
    counted once, over the first train.eval_batches micro-batches of them (a fixed subset) or all of
    them (-1, which also gives bits per byte). With several sources: per source that holds out
    documents (`eval_loss/NAME`, ...) and over all of them together."""
    from llama_jax.evaluate import EvalResult, evaluate_splits

    t = config.train
    results = evaluate_splits(trainer.model_config, params, data.eval_sets, t.seq_len, t.batch_size // t.grad_accum,
                              eval_max_batches(t), mesh=trainer.mesh, context=trainer.context)
    out = _eval_metrics(sum(results.values(), EvalResult()))
    if len(data.train.sources) > 1:  # a mixture: each source with held-out documents by name, even if only one has
        out.update({f"{k}/{name}": v for name, r in results.items() for k, v in _eval_metrics(r).items()})
    return out


def _eval_metrics(result) -> dict[str, float]:
    m = result.metrics()
    out = {"eval_loss": m["loss"], "eval_perplexity": m["perplexity"], "eval_accuracy": m["accuracy"],
           "eval_tokens": m["tokens"]}
    if m["bits_per_byte"] is not None:
        out["eval_bits_per_byte"] = m["bits_per_byte"]
    return out


def eval_max_batches(train_config) -> int | None:
    """How many held-out batches an evaluation covers: train.eval_batches, or None (all) for -1."""
    return None if train_config.eval_batches == -1 else train_config.eval_batches
