"""The names of `llama-jax eval`'s result files, made and recognised in one place.

Beside a model: MODEL/eval.json, or MODEL/eval-TAG.json when eval.json holds a score of other data
settings or windows. In a run: WORKDIR/eval-STEP.json for the run's own held-out documents in
windows of its own train.seq_len, WORKDIR/eval-STEP-TAG.json otherwise. TAG is 8 hex digits of a
hash of the data settings (and of seq_len where the windows differ), so that a score of other data
never replaces the model's or the run's own, nor one of a third.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from llama_jax.safe_io import read_results

EVAL_FILE = "eval.json"  # a model directory's own score
_TAG = "[0-9a-f]" * 8
TAGGED_MODEL_EVAL_FILES = f"eval-{_TAG}.json"  # a glob: a user's eval-notes.json is not one
RUN_EVAL_FILE = re.compile(rf"eval-(\d+)(-{_TAG})?\.json")  # group 1: the step


def settings_tag(record: dict, with_seq_len: bool) -> str:
    """8 hex digits of a hash of a result's data settings (and seq_len)."""
    what = {"data": record["data"], "seq_len": record["seq_len"]} if with_seq_len else record["data"]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_eval_file_name(record: dict, own_data: bool, run_seq_len: int | None) -> str:
    """A run's default result file for `record`; `own_data`: it scores the run's own held-out
    documents, `run_seq_len`: the run's train.seq_len."""
    own_windows = record["seq_len"] == run_seq_len
    if own_data and own_windows:
        return f"eval-{record['step']}.json"
    return f"eval-{record['step']}-{settings_tag(record, with_seq_len=not own_windows)}.json"


def model_eval_file(model: Path, record: dict) -> Path:
    """A model directory's default result file for `record`: MODEL/eval.json, unless that holds a
    score of other data settings or windows, which is kept (then MODEL/eval-TAG.json)."""
    held = read_results(model / EVAL_FILE)  # (None: none, or one check_results_file refuses)
    mine = json.loads(json.dumps({"data": record["data"], "seq_len": record["seq_len"]}, default=str))
    if not isinstance(held, dict) or {"data": held.get("data"), "seq_len": held.get("seq_len")} == mine:
        return model / EVAL_FILE
    return model / f"eval-{settings_tag(record, with_seq_len=True)}.json"
