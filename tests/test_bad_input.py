"""Bad input to every command: exit status 2, no traceback, one stderr line naming the problem,
and every input and destination left exactly as it was.

Each row of CASES is a mistake a user can make, run as a real `llama-jax` process (two at a time)
against shared inputs: a tiny trained run (checkpoints 2 and 4), its exported model directory, a
tiny Hugging Face and Meta checkpoint, two SentencePiece tokenizers, a text corpus and damaged
copies of these. `{name}` in a command line is the path of input `name`. A case runs in a
directory of its own, with TMPDIR inside it; the snapshot (path -> size, mtime) covers that
directory (what is left in TMPDIR included) and all the inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import safetensors.numpy

from llama_jax.convert.pipeline import convert
from llama_jax.data import EmbeddedCorpus
from llama_jax.tokenizer import train_sentencepiece
from tests.reference import hf_config_dict, make_hf_model

ROOT = Path(__file__).parents[1]
NEW_RUN = "train --config {tiny} --workdir new --config.train.steps=4 --config.optimizer.warmup_steps=1"
TEXT = ("--config.data.source=text \"--config.data.files=['{corpus}/*.txt']\" --config.data.tokenizer={tokenizer} "
        "--config.model.vocab_size=512")
RUN = "train --config {tiny} --workdir {run} --config.train.steps=4 --config.optimizer.warmup_steps=1 " + TEXT


class Case(NamedTuple):
    id: str
    command: str  # a llama-jax command line; {name} is the path of input `name`
    error: str  # regex the stderr line must match


CASES = [
    # ---- train: the config file and its overrides ----
    Case("train-config-missing", "train --config {inputs}/nope.py --workdir new", r"config file \S+/nope.py not found"),
    Case("train-config-is-a-directory", "train --config {corpus} --workdir new",
         r"corpus: is a directory; expected a Python config file such as configs/tiny.py$"),
    Case("plan-config-is-a-run", "plan --config {run}",
         r"run: is a directory; expected a Python config file such as configs/tiny.py \(or the run's resolved "
         r"config: \S+/run/config.json\)$"),
    Case("plan-config-is-a-hf-directory", "plan --config {hf}",  # its config.json is no experiment config
         r"hf: is a directory; expected a Python config file such as configs/tiny.py$"),
    Case("train-config-syntax-error", "train --config {syntax_py} --workdir new", r"syntax.py, line 1: syntax error"),
    Case("train-config-file-sets-unknown-key", "train --config {typo_py} --workdir new",
         r"typo.py: unknown config key 'train.stpes'; valid keys there: .*steps"),
    Case("train-run-config-json-sets-unknown-key", "train --config {typo_json} --workdir new",
         r"typo.json: unknown config key 'train.stpes'; valid keys there: .*steps"),  # no release wrote it
    Case("train-run-config-json-sets-a-key-twice", "train --config {twice_json} --workdir new",  # (the last was read)
         r"twice.json: key 'train.steps' is given twice \(JSON keeps the last without a word\); give each key once$"),
    Case("train-get_config-returns-none", "train --config {none_py} --workdir new",
         r"none.py: get_config\(\) returned None; expected an ml_collections.ConfigDict"),
    Case("train-config-json-garbage", "train --config {garbage_json} --workdir new", r"garbage.json: not valid JSON"),
    Case("train-unknown-key", NEW_RUN + " --config.train.stepz=5",
         r"unknown config key 'train.stepz'; valid keys there: .*steps"),
    Case("train-wrong-type", NEW_RUN + " --config.train.batch_size=sixteen",
         r"config key 'train.batch_size' is int, got 'sixteen' \(str\)"),
    Case("train-files-not-a-list", NEW_RUN + " --config.data.source=text --config.data.files={corpus}/doc0.txt",
         r"config key 'data.files' is list, got '(\S+doc0.txt)' \(str\); give a list, even of one: "
         r"\"--config.data.files=\['\1'\]\"$"),
    Case("train-files-list-unquoted", NEW_RUN + " --config.data.source=text \"--config.data.files=[{corpus}/*.txt]\"",
         r"config key 'data.files' is list, got '\[\S+/\*.txt\]' \(str\); quote the strings in a list"),
    Case("plan-override-a-set-of-a-list", "plan --config {tiny} --config.train.steps={[]}",
         r"config key 'train.steps' is int, got '\{\[\]\}' \(str\)"),
    Case("plan-override-mapping-in-double-braces", "plan --config {tiny} \"--config.data.mixture={{'path': 'x'}}\"",
         r"config key 'data.mixture' is ConfigDict, got \"\{\{'path': 'x'\}\}\" \(str\)"),
    Case("plan-override-mapping-syntax-error", "plan --config {tiny} \"--config.data.mixture={'a': }\"",
         r"config key 'data.mixture' is ConfigDict, got \"\{'a': \}\" \(str\); give a Python dict: "
         r"\"--config.data.mixture=\{'web': \{'path': '/data/web', 'weight': 0.8\}, .*\}\"$"),
    Case("plan-override-of-a-key-inside-a-setting", "plan --config {tiny} --config.train.steps.x=5",
         r"unknown config key 'train.steps.x': train.steps is a setting holding an int \(\d+\), not a section of keys; "
         r"set it whole: --config.train.steps=VALUE$"),
    Case("train-override-without-value", NEW_RUN + " --config.train.seq_len", r"--config.train.seq_len: missing value"),
    Case("train-override-value-forgotten", NEW_RUN + " --config.train.sample_prompt --config.train.steps=2",
         r"--config.train.sample_prompt: missing value"),  # not the next override taken as its text
    Case("train-nan", NEW_RUN + " --config.optimizer.lr=nan", r"config key optimizer.lr: nan is not a finite number"),
    Case("train-steps-beyond-a-float", NEW_RUN + " --config.train.steps=1" + "0" * 309,
         r"config key train.steps: a whole number of 310 digits is beyond float32's range"),
    Case("train-lr-a-whole-number-beyond-a-float", NEW_RUN + " --config.optimizer.lr=1" + "0" * 309,
         r"config key optimizer.lr: a whole number of 310 digits is beyond float32's range"),
    Case("train-lr-beyond-float32", NEW_RUN + " --config.optimizer.lr=1e39",
         r"config key optimizer.lr: 1e\+39 is beyond float32's range"),
    Case("train-rope-theta-beyond-float32", NEW_RUN + " --config.model.rope_theta=1e39",
         r"config key model.rope_theta: 1e\+39 is beyond float32's range"),
    Case("train-vocab-beyond-int32", NEW_RUN + " --config.model.vocab_size=3200000000",
         r"model.vocab_size must be a positive integer up to 2\*\*31 - 1, got 3200000000"),
    Case("train-state-beyond-memory", NEW_RUN + " --config.model.ffn_dim=1000000000",
         r"the train state \(4,291.5 GiB of parameters and optimizer state\) does not fit in the memory of 1 CPU "
         r"device\(s\) \(RESOURCE_EXHAUSTED: .*\); train a smaller model"),
    Case("train-steps-beyond-int32", NEW_RUN + " --config.train.steps=3000000000",
         r"train.steps=3,000,000,000 is more than the step counter holds \(int32 on the devices\); valid: at most "
         r"2\*\*31 - 1 = 2,147,483,647$"),
    Case("train-negative-steps", NEW_RUN + " --config.train.steps=-3",
         r"train.steps must be a positive integer, got -3"),
    Case("train-batch-not-divisible", NEW_RUN + " --config.train.grad_accum=3",
         r"train.batch_size=16 is not divisible by train.grad_accum=3"),
    Case("train-seq-len-over-max", NEW_RUN + " --config.train.seq_len=256",
         r"train.seq_len=256 exceeds the model's max_seq_len=128"),
    Case("train-max-to-keep-0", NEW_RUN + " --config.checkpoint.max_to_keep=0",
         r"checkpoint.max_to_keep must be a positive integer .*got 0"),
    Case("train-keep-every-negative", NEW_RUN + " --config.checkpoint.keep_every=-2",
         r"checkpoint.keep_every must be a non-negative integer .*got -2"),
    Case("train-eval-every-without-eval-batches",
         NEW_RUN + " --config.train.eval_every=2 --config.train.eval_batches=0",
         r"train.eval_every=2 but train.eval_batches=0 evaluates nothing; set eval_batches > 0"),
    Case("train-sample-every-without-sample-tokens",
         NEW_RUN + " --config.train.sample_every=2 --config.train.sample_tokens=0",
         r"train.sample_every=2 but train.sample_tokens=0 samples nothing"),
    Case("train-eval-on-synthetic-data", NEW_RUN + " --config.train.eval_every=2",
         r"train.eval_every=2 but data.source=synthetic has no held-out set to evaluate; set train.eval_every=0"),
    Case("train-sample-on-synthetic-data", NEW_RUN + " --config.train.sample_every=2",
         r"train.sample_every=2 but data.source=synthetic has no tokenizer to sample with"),
    Case("train-sample-prompt-not-utf8", NEW_RUN + " --config.train.sample_prompt=ab\udcffcd",  # the byte 0xff
         r"train.sample_prompt is not UTF-8 text \(byte 0xff at character 2\)"),
    Case("train-seed-of-33-bits", NEW_RUN + " --config.train.seed=4294967301",  # would train as seed 5
         r"train.seed must be an integer in \[0, 2\*\*32\), got 4294967301"),
    Case("train-negative-seed", NEW_RUN + " --config.train.seed=-1",
         r"train.seed must be an integer in \[0, 2\*\*32\), got -1"),
    Case("train-scan-layers-not-bool", NEW_RUN + " --config.model.scan_layers=maybe",
         r"model.scan_layers must be True or False, got 'maybe'"),
    Case("train-cudnn-without-gpu", NEW_RUN + " --config.model.attention_impl=cudnn",
         r"model.attention_impl='cudnn' needs a GPU with cuDNN, and this backend is cpu; use 'auto'"),
    Case("train-cudnn-packed-without-gpu", NEW_RUN + " --config.model.attention_impl=cudnn_packed",
         r"model.attention_impl='cudnn_packed' needs a GPU with cuDNN, and this backend is cpu; use 'auto'"),
    Case("train-splash-seq-len", NEW_RUN + " --config.model.attention_impl=splash",
         r"splash attention needs the sequence length to be a multiple of 128 \(of 512 above 512\), got 64"),
    Case("train-profile-steps-negative", NEW_RUN + " --config.train.profile_steps=-1",
         r"train.profile_steps must be a non-negative integer \(0: no trace\), got -1"),
    Case("train-profile-steps-not-integer", NEW_RUN + " --config.train.profile_steps=2.5",
         r"config key 'train.profile_steps' is int, got '2.5' \(float\)"),
    Case("train-profile-start-one", NEW_RUN + " --config.train.profile_steps=2 --config.train.profile_start=1",
         r"train.profile_start must be a step number of at least 2 \(step 1 compiles the train step\), got 1"),
    Case("train-profile-past-the-run", NEW_RUN + " --config.train.profile_steps=3 --config.train.profile_start=3",
         r"train.profile_start=3 \+ train.profile_steps=3 traces up to step 5, past train.steps=\d+; trace steps "
         r"within the run"),
    Case("train-on-nonfinite-unknown", NEW_RUN + " --config.train.on_nonfinite=ignore",
         r"train.on_nonfinite='ignore'; valid: stop, skip"),
    Case("train-processes-without-coordinator", NEW_RUN + " --num-processes 2",
         r"--num-processes 2 needs --coordinator HOST:PORT and --process-id"),
    Case("train-processes-not-positive", NEW_RUN + " --num-processes 0 --coordinator 127.0.0.1:1234 --process-id 0",
         r"--num-processes must be a positive integer up to 2\*\*20 \(1,048,576\), got 0"),
    Case("train-processes-beyond-2**20",  # JAX's coordination service failed with a TypeError, or filled the memory
         NEW_RUN + " --num-processes 99999999999999999999 --coordinator 127.0.0.1:1234 --process-id 0",
         r"--num-processes must be a positive integer up to 2\*\*20 \(1,048,576\), got 99999999999999999999$"),
    Case("train-process-id-without-processes", NEW_RUN + " --coordinator 127.0.0.1:1234 --process-id 1",
         r"--coordinator and --process-id join a multi-process run, and are given without --num-processes; give "
         r"--num-processes N > 1"),
    Case("train-coordinator-with-one-process", NEW_RUN + " --num-processes 1 --coordinator 127.0.0.1:1234",
         r"--coordinator joins a multi-process run, and is given with --num-processes 1; give --num-processes N > 1 "
         r"with --coordinator and --process-id \(or drop --coordinator for a single process\)$"),
    Case("train-coordinator-without-port", NEW_RUN + " --num-processes 2 --coordinator 127.0.0.1 --process-id 0",
         r"--coordinator 127.0.0.1: expected HOST:PORT with a port in 1..65535"),
    Case("train-coordinator-port-too-large", NEW_RUN + " --num-processes 2 --coordinator h:99999 --process-id 0",
         r"--coordinator h:99999: expected HOST:PORT"),
    Case("train-join-timeout-zero", NEW_RUN + " --join-timeout 0",
         r"argument --join-timeout: must be at least 1, got 0"),
    Case("train-join-timeout-not-a-number", NEW_RUN + " --join-timeout soon",
         r"argument --join-timeout: invalid integer 'soon'"),
    Case("train-join-timeout-too-long", NEW_RUN + " --join-timeout 99999999999",
         r"argument --join-timeout: must be at most 86400 \(a day\), got 99999999999"),
    # ---- train: data and tokenizer ----
    Case("train-unknown-data-source", NEW_RUN + " --config.data.source=web",
         r"data.source='web' is not supported; valid: prepared, embedded, stdlib, text, jsonl, tfds, synthetic"),
    Case("train-data-files-missing", NEW_RUN + " " + TEXT.replace("{corpus}/*.txt", "{inputs}/nowhere/*.txt"),
         r"no file matches '\S+/nowhere/\*.txt'"),
    Case("train-data-files-a-directory", NEW_RUN + " " + TEXT.replace("{corpus}/*.txt", "{corpus}"),
         r"corpus: is a directory; give the files in it, e.g. \S+/corpus/\*.txt"),
    Case("train-tfds-dataset-missing", NEW_RUN + " --config.data.source=tfds --config.data.tfds_name=my_corpus "
         "--config.data.data_dir={inputs}", r"TFDS dataset 'my_corpus' not found in data_dir='\S+'"),
    Case("train-tfds-catalogue-dataset-not-built", NEW_RUN + " --config.data.source=tfds --config.data.tfds_name=mnist "
         "--config.data.data_dir={inputs}", r"TFDS dataset 'mnist' not found in data_dir='\S+'"),
    Case("train-tfds-data-dir-missing", NEW_RUN + " --config.data.source=tfds --config.data.tfds_name=my_corpus "
         "--config.data.data_dir={inputs}/tfds", r"data.data_dir='\S+/tfds' does not exist; give the directory the "
                                                 r"TFDS dataset 'my_corpus' was built in"),
    Case("train-eval-fraction-1", NEW_RUN + " " + TEXT + " --config.data.eval_fraction=1.0",
         r"eval_fraction=1.0 is out of range; valid: 0 <= eval_fraction < 1"),
    Case("train-data-not-utf8", NEW_RUN + " " + TEXT.replace("{corpus}", "{latin1_corpus}"),
         r"latin1/a.txt: not UTF-8 text \(byte 0xe9 at offset 3: invalid continuation byte\); the file must be "
         r"UTF-8$"),
    Case("train-empty-corpus", NEW_RUN + " " + TEXT.replace("{corpus}", "{empty_corpus}"),
         r"holds no non-empty document"),
    Case("train-jsonl-line-not-json", NEW_RUN + " " + TEXT.replace("{corpus}/*.txt", "{bad_jsonl}"),
         r"bad.jsonl:2: not valid JSON"),
    Case("train-jsonl-lone-surrogate", NEW_RUN + " " + TEXT.replace("{corpus}/*.txt", "{surrogate_jsonl}"),
         r"surrogate.jsonl:2: field 'text' is not valid Unicode \(a lone surrogate \\ud800 at character 4\)"),
    Case("train-data-path-a-file", NEW_RUN + " --config.data.source=prepared --config.data.path={notes}",
         r"\S+notes.txt is not a directory; give a directory written by llama-jax prepare-data"),
    Case("train-tokenizer-unset", NEW_RUN + " --config.data.source=embedded",
         r"data.tokenizer is empty; give a tokenizer.model path"),
    Case("train-tokenizer-missing", NEW_RUN + " " + TEXT.replace("{tokenizer}", "{inputs}/nope.model"),
         r"nope.model: no such file"),
    Case("train-tokenizer-corrupt", NEW_RUN + " " + TEXT.replace("{tokenizer}", "{corrupt_model}"),
         r"corrupt.model: neither a SentencePiece model nor a tiktoken rank file"),
    Case("train-model-vocab-below-tokenizer", NEW_RUN + " " + TEXT.replace("512", "256"),
         r"the tokenizer has 512 tokens but the model's vocab_size is 256"),
    Case("train-tokenizer-vocab-too-small", NEW_RUN + " " + TEXT.replace("{tokenizer}", "train")
         + " --config.data.tokenizer_vocab_size=10",
         r"sentencepiece training failed: a vocabulary of 10 pieces cannot hold the \d+ that training needs"),
    Case("train-eval-without-held-out-documents",
         NEW_RUN + " " + TEXT + " --config.train.eval_every=2 --config.data.eval_fraction=0.0",
         r"train.eval_every=2 but no document is held out for evaluation \(data.eval_fraction=0.0\)"),
    Case("train-eval-batches-below-minus-one", NEW_RUN + " --config.train.eval_batches=-2",
         r"train.eval_batches must be a non-negative integer or -1 \(the whole held-out set\), got -2"),
    # ---- train: init_from and the workdir ----
    Case("train-init-from-missing", NEW_RUN + " --config.checkpoint.init_from={inputs}/nope",
         r"checkpoint.init_from: \S+/nope is not a llama_jax model directory"),
    Case("train-init-from-missing-before-the-data-is-read", NEW_RUN + " " + TEXT.replace("{corpus}", "{latin1_corpus}")
         + " --config.checkpoint.init_from={inputs}/nope", r"checkpoint.init_from: \S+/nope is not a llama_jax model "
         r"directory"),
    Case("train-init-from-other-shape", NEW_RUN + " --config.checkpoint.init_from={model}",
         r"checkpoint.init_from=\S+ holds a model with vocab_size=512, but the config asks for vocab_size=256"),
    Case("train-init-from-a-run", NEW_RUN + " --config.checkpoint.init_from={run}",
         r"checkpoint.init_from: \S+/run is not a llama_jax model directory: model_config.json not found"),
    Case("train-workdir-is-a-file", NEW_RUN.replace("new", "{notes}"),
         r"--workdir \S+notes.txt: \S+notes.txt is a file"),
    Case("train-workdir-under-a-file", NEW_RUN.replace("new", "{notes}/run"),
         r"--workdir \S+notes.txt/run: \S+notes.txt is a file, not a directory"),
    Case("train-workdir-is-hf-model", NEW_RUN.replace("new", "{hf}"), r"holds 'config.json' but no llama-jax run"),
    Case("train-workdir-is-model-dir", NEW_RUN.replace("new", "{model}"),
         r"holds 'model_config.json' but no llama-jax run"),
    Case("train-workdir-is-meta-checkpoint", NEW_RUN.replace("new", "{meta}"),
         r"--workdir \S+/meta holds 'consolidated.00.pth' but no llama-jax run"),
    Case("train-resume-from-missing-step", RUN + " --resume-from 3",
         r"--resume-from 3: \S+ has no committed checkpoint of that step; valid: 2, 4"),
    Case("train-resume-past-steps", RUN.replace("steps=4", "steps=3"),
         r"holds checkpoint 4, past train.steps=3; raise train.steps"),
    Case("train-resume-other-shape", RUN + " --config.model.dim=96 --config.model.ffn_dim=256",
         r"\(checkpoint 4\) holds a model with dim=64, but the config asks for dim=96"),
    Case("train-resume-other-tokenizer", RUN.replace("{tokenizer}", "{other_tokenizer}"),
         r"data.tokenizer=\S+ differs from the tokenizer this run started with"),
    Case("train-resume-as-synthetic", RUN + " --config.data.source=synthetic --config.data.files=[]",
         r"run \(checkpoint 4\) trained on data.source=text, not synthetic; resume with the run's data settings"),
    Case("train-resume-other-seed", RUN + " --config.train.seed=5",
         r"run \(checkpoint 4\) trained with train.seed=0, not 5: the seed orders the batches"),
    Case("train-resume-damaged-progress", RUN.replace("{run}", "{damaged_progress_run}"),
         r"progress.json is damaged \(expected \{\"committed_step\": N\}, the run's latest checkpoint\); write "
         r"\{\"committed_step\": 4\} into it if checkpoint 4 is the run's latest, or use a new --workdir"),
    Case("train-resume-step-copied-by-hand", RUN.replace("{run}", "{padded_step_run}"),  # (Orbax read it as step 8)
         r"padded_step_run/checkpoints/08 is no checkpoint of this run \(a step's folder is named by its number alone, "
         r"as 8\) but would be read as step 8; move it out of \S+/padded_step_run/checkpoints$"),
    Case("export-step-copied-by-hand", "export --workdir {padded_step_run} out", r"checkpoints/08 is no checkpoint"),
    # the save of step 6 replaced the file without a word; on the link it failed with a raw errno once 6 was trained
    Case("train-a-file-named-as-the-next-step", RUN.replace("{run}", "{step_file_run}") + " --config.train.steps=6",
         r"step_file_run/checkpoints/6 is a file, not a checkpoint, where the run saves step 6; move it out of "
         r"\S+/step_file_run/checkpoints$"),
    Case("train-a-link-to-nothing-named-as-the-next-step",
         RUN.replace("{run}", "{step_link_run}") + " --config.train.steps=6",
         r"step_link_run/checkpoints/6 is a link to nothing, not a checkpoint, where the run saves step 6"),
    # (each failed with a raw errno line, the second once it had moved checkpoint 4 aside)
    Case("train-resume-from-with-a-file-where-it-sets-aside", RUN.replace("{run}", "{aside_file_run}") +
         " --resume-from 2", r"aside_file_run/checkpoints-set-aside is not a directory; a resume moves there what the "
         r"run no longer continues from \(the checkpoints after a --resume-from step, the metrics and eval results "
         r"after the checkpoint\), so move it away or use another --workdir$"),
    Case("train-resume-from-with-a-folder-where-it-sets-aside-metrics",
         RUN.replace("{run}", "{aside_metrics_folder_run}") + " --resume-from 2",
         r"aside_metrics_folder_run/checkpoints-set-aside/metrics.jsonl is not a file; a resume moves there"),
    Case("train-checkpoints-is-a-file", RUN.replace("{run}", "{checkpoints_file_run}"),
         r"checkpoints_file_run/checkpoints is a file; a run keeps its checkpoints in that directory"),
    # a run made there was lost without a word: to the other run's retention, or to an --overwrite of the model
    Case("train-workdir-inside-a-runs-checkpoints", NEW_RUN.replace("--workdir new", "--workdir {run}/checkpoints/4"),
         r"--workdir \S+/run/checkpoints/4 is inside \S+/run/checkpoints, the checkpoints of a run; choose a --workdir "
         r"outside it$"),
    Case("train-workdir-a-models-params", NEW_RUN.replace("--workdir new", "--workdir {model}/params"),
         r"--workdir \S+/model/params is \S+/model/params, the parameters of the model directory \S+/model"),
    Case("train-workdir-inside-a-models-params", NEW_RUN.replace("--workdir new", "--workdir {model}/params/ft"),
         r"--workdir \S+/model/params/ft is inside \S+/model/params, the parameters of the model directory "
         r"\S+/model; choose a --workdir outside it$"),
    Case("sweep-workdir-inside-a-runs-checkpoints", "sweep --config {tiny} --workdir {run}/checkpoints/s "
         "--sweep optimizer.lr=[1e-3,2e-3] --dry-run",
         r"--workdir \S+/run/checkpoints/s is inside \S+/run/checkpoints"),
    Case("train-batch-too-large", NEW_RUN + " --config.train.batch_size=1000000000000",
         r"train.batch_size x train.seq_len = 64,000,000,000,000 tokens per step; at most 2\*\*31"),
    # ---- convert ----
    Case("convert-src-missing", "convert --from hf --to jax {inputs}/nope out", r"nope: no such directory"),
    Case("convert-src-is-a-file", "convert --from hf --to jax {notes} out", r"notes.txt: not a directory"),
    Case("convert-meta-format-of-hf-dir", "convert --from meta --to jax {hf} out", r"hf/params.json: not found"),
    Case("convert-jax-format-of-hf-dir", "convert --from jax --to hf {hf} out",
         r"hf is not a llama_jax model directory: model_config.json not found"),
    Case("convert-tokenizer-model-a-directory", "convert --from jax --to hf {dir_tokenizer_model} out",
         r"dir_tokenizer_model/tokenizer.model is a directory, where a model keeps its tokenizer.model file; put the "
         r"file there, or remove it$"),  # (the conversion left it behind, unsaid)
    Case("convert-hf-format-of-a-run", "convert --from hf --to jax {run} out",
         r"run is a llama-jax training run, not a Hugging Face model directory; .*llama-jax export"),
    Case("convert-dst-exists", "convert --from hf --to jax {hf} {model}",
         r"model already exists; pass --overwrite"),
    Case("convert-dst-is-src", "convert --from hf --to hf {hf} {hf} --overwrite",
         r"destination \S+/hf is the input \S+/hf"),
    Case("convert-dst-contains-src", "convert --from hf --to jax {hf} {inputs} --overwrite",
         r"destination \S+/inputs contains the input \S+/hf"),
    Case("convert-dst-is-a-file", "convert --from hf --to jax {hf} {notes} --overwrite",
         r"notes.txt exists and is not a directory; --overwrite replaces only a llama_jax model directory"),
    Case("convert-dst-under-a-file", "convert --from hf --to jax {hf} {notes}/out",
         r"cannot create \S+/notes.txt/out: \S+/notes.txt is a file, not a directory"),
    Case("convert-overwrite-a-run", "convert --from hf --to jax {hf} {run} --overwrite",
         r"run holds 'checkpoints' \(and \d more\), which is not part of a llama_jax model directory"),
    Case("convert-overwrite-a-readme", "convert --from hf --to hf {hf} {readme_dir} --overwrite",
         r"holds 'README.md', which is not part of a Hugging Face model directory"),
    Case("convert-bad-dtype", "convert --from hf --to jax {hf} out --dtype int8",
         r"argument --dtype: invalid choice: 'int8'"),
    Case("convert-shards-0", "convert --from hf --to meta {hf} out --shards 0",
         r"n_shards=0: the shard count must be a positive integer; valid shard counts for this model: 1, 2, 4"),
    Case("convert-shards-not-dividing", "convert --from hf --to meta {hf} out --shards 3",
         r"n_shards=3: n_heads=4 is not divisible by it"),
    Case("convert-linear-rope-to-meta", "convert --from hf --to meta {linear_rope_hf} out",
         r"rope_scaling=\{'rope_type': 'linear'.* cannot be written to params.json"),
    Case("convert-max-shard-size-garbage", "convert --from hf --to hf {hf} out --max-shard-size lots",
         r"argument --max-shard-size: invalid size 'lots'"),
    Case("convert-max-shard-size-inf", "convert --from hf --to hf {hf} out --max-shard-size infGB",
         r"argument --max-shard-size: invalid size 'infGB'"),
    Case("convert-max-shard-size-below-a-byte", "convert --from hf --to hf {hf} out --max-shard-size 0.5",
         r"argument --max-shard-size: size must be at least 1 byte, got '0.5'"),  # (not "must be positive")
    Case("convert-rope-scaling-factor-nan", "convert --from meta --to jax {meta} out --rope-scaling-factor nan",
         r"argument --rope-scaling-factor: 'nan' is not a finite number"),
    Case("convert-rope-scaling-factor-negative",
         "convert --from meta --to jax {scaled_meta} out --rope-scaling-factor -3",
         r"error: --rope-scaling-factor -3.0: rope_scaling.factor must be positive, got -3.0$"),
    Case("convert-rope-scaling-factor-near-0", "convert --from meta --to jax {scaled_meta} out "
         "--rope-scaling-factor 1e-320",  # 0 in float32: the model's rotary frequencies were inf, its text empty
         r"--rope-scaling-factor 1e-320: rope_scaling.factor must be at least 1 \(the rotary frequencies are divided "
         r"by it\), got 1e-320$"),
    Case("plan-rope-theta-near-0", "plan --config {tiny} --config.model.rope_theta=1e-30",
         r"model.rope_theta must be at least 1 \(the rotary frequencies are divided by it\), got 1e-30$"),
    Case("plan-rope-theta-float32-0", "plan --config {tiny} --config.model.rope_theta=1e-320",  # (any key alike)
         r"config key model.rope_theta: 1e-320 is below float32's smallest normal number \(1.2e-38\), so training "
         r"would compute with 0; give a value of a usual size$"),
    Case("convert-rope-scaling-factor-unscaled", "convert --from meta --to jax {meta} out --rope-scaling-factor 32",
         r"--rope-scaling-factor 32: .*params.json does not set use_scaled_rope, so the model has no rope scaling"),
    Case("convert-shards-to-hf", "convert --from hf --to hf {hf} out --shards 2",
         r"--shards applies to --to meta only; drop it for --to hf"),
    Case("convert-max-shard-size-to-jax", "convert --from hf --to jax {hf} out --max-shard-size 1GB",
         r"--max-shard-size applies to --to hf only; drop it for --to jax"),
    Case("convert-rope-scaling-factor-from-hf", "convert --from hf --to jax {hf} out --rope-scaling-factor 4",
         r"--rope-scaling-factor applies to --from meta only; drop it for --from hf"),
    Case("convert-config-json-garbage", "convert --from hf --to jax {garbage_config_hf} out",
         r"config.json: not valid JSON"),
    Case("convert-config-json-a-list", "convert --from hf --to jax {list_config_hf} out",
         r"config.json: holds a list \(\[1, 2\]\), not a JSON object of model settings"),
    Case("convert-config-json-missing-key", "convert --from hf --to jax {no_vocab_hf} out",
         r"/config.json: missing required key 'vocab_size'"),
    Case("convert-config-json-not-llama", "convert --from hf --to jax {mistral_hf} out",
         r"config.json: model_type 'mistral' is not supported; valid: 'llama'"),
    Case("convert-config-json-bad-rope", "convert --from hf --to jax {bad_rope_hf} out",
         r"config.json: rope_parameters must be an object or null, got 'yarn'"),
    Case("convert-bad-generation-config", "convert --from hf --to jax {bad_generation_hf} out",
         r"bad_generation_hf/generation_config.json: not valid JSON .*; expected a JSON object of generation settings"),
    Case("convert-garbage-tokenizer", "convert --from hf --to meta {garbage_tokenizer_hf} out",
         r"garbage_tokenizer_hf/tokenizer.model: neither a SentencePiece model nor a tiktoken rank file"),
    Case("convert-hf-without-weights", "convert --from hf --to jax {weightless_hf} out",
         r"no weights found; expected one of model.safetensors"),
    Case("convert-truncated-safetensors", "convert --from hf --to jax {truncated_hf} out",
         r"model.safetensors: truncated, tensor \S+ ends past the end of the file"),
    Case("convert-float64-weights", "convert --from hf --to jax {float64_hf} out",
         r"float64_hf: the weights are float64; pass --dtype \(float32, bfloat16, float16\)"),
    Case("convert-garbage-pth", "convert --from meta --to hf {garbage_meta} out",
         r"consolidated.00.pth: not a PyTorch checkpoint \(neither torch.save's zip format nor its legacy one"),
    Case("convert-params-json-wrong-dim", "convert --from meta --to hf {wrong_dim_meta} out",
         r"params.json: dim=96, but the weights have model dim 64"),
    Case("convert-jax-without-params", "convert --from jax --to hf {paramless_model} out",
         r"parameter checkpoint params/ not found"),
    # ---- generate ----
    Case("generate-not-a-model-dir", "generate {hf} --prompt Hi",
         r"hf is not a llama_jax model directory: model_config.json not found; it holds a Hugging Face checkpoint: "
         r"llama-jax convert --from hf --to jax \S+/hf DST writes a model directory of it"),
    Case("generate-a-run", "generate {run} --prompt Hi", r"run is not a llama_jax model directory"),
    Case("generate-damaged-model-config", "generate {bad_config_model} --prompt Hi",
         r"model_config.json: not valid JSON \(Expecting property name.*\); expected a JSON object of LLaMAConfig"),
    Case("generate-generation-config-a-list", "generate {bad_generation_model} --prompt Hi",
         r"generation_config.json: holds a list \(\[2\]\), not a JSON object of generation settings"),
    Case("generate-eos-id-beyond-the-vocab", "generate {eos_beyond_model} --prompt Hi",
         r"eos_beyond_model/generation_config.json: eos_token_id 600 is not a token id of this model \(vocab_size "
         r"512\)$"),
    Case("generate-missing-params", "generate {paramless_model} --prompt Hi",
         r"parameter checkpoint params/ not found"),
    Case("generate-damaged-params-metadata", "generate {bad_metadata_model} --prompt Hi",
         r"bad_metadata_model is damaged or incomplete: ValueError: \S+/bad_metadata_model/params/_METADATA is not "
         r"valid JSON"),
    Case("generate-config-override", "generate {model} --prompt Hi --config.model.max_seq_len=4096",
         r"--config.model.max_seq_len=4096: llama-jax generate reads no experiment config, so the override would be "
         r"ignored; drop it \(--config.\* overrides are for train, eval, sweep, data inspect, prepare-data, plan, "
         r"demo\)$"),
    Case("convert-config-override", "convert --from hf --to jax {hf} out --config.model.dtype=bfloat16",
         r"--config.model.dtype=bfloat16: llama-jax convert reads no experiment config"),  # (it wrote `out` before)
    Case("presets-config-override", "presets --config.model.preset=tiny",
         r"--config.model.preset=tiny: llama-jax presets reads no experiment config"),
    Case("generate-no-tokenizer", "generate {model256} --prompt Hi", r"has no tokenizer.model; pass --tokenizer PATH"),
    Case("generate-max-new-tokens-0", "generate {model} --prompt Hi --max-new-tokens 0",
         r"max_new_tokens must be an integer of at least 1, got 0"),
    Case("generate-negative-temperature", "generate {model} --prompt Hi --temperature -1",
         r"temperature must be a finite number >= 0 \(0 is greedy\), got -1.0"),
    Case("generate-nan-temperature", "generate {model} --prompt Hi --temperature nan",
         r"argument --temperature: 'nan' is not a finite number"),
    Case("generate-prompt-not-utf8", "generate {model} --prompt caf\udce9",  # the byte 0xe9 (Latin-1)
         r"--prompt: not UTF-8 text \(byte 0xe9 at character 3\)"),
    Case("generate-prompts-file-lone-surrogate", "generate {model} --prompts-file {surrogate_prompts}",
         r"surrogate_prompts.jsonl, line 2: the prompt is not valid Unicode \(a lone surrogate \\ud800 at "
         r"character 4\)"),
    Case("generate-prompts-file-not-utf8", "generate {model} --prompts-file {latin1_corpus}/a.txt",
         r"latin1/a.txt: not UTF-8 text \(byte 0xe9 at offset 3: invalid continuation byte\); the file must be "
         r"UTF-8$"),
    Case("generate-top-p-0", "generate {model} --prompt Hi --top-p 0", r"top_p must be in \(0, 1\] or None, got 0.0"),
    Case("generate-top-p-above-1", "generate {model} --prompt Hi --top-p 1.5",
         r"top_p must be in \(0, 1\] or None, got 1.5"),
    Case("generate-top-k-0", "generate {model} --prompt Hi --top-k 0",
         r"top_k must be a positive integer or None, got 0"),
    # checked before any model is read: here there is none, and the option is what is reported
    Case("generate-top-k-0-before-the-model", "generate {inputs}/nope --prompt Hi --top-k 0",
         r"top_k must be a positive integer or None, got 0"),
    Case("generate-seed-too-large", "generate {model} --prompt Hi --seed 4294967296",  # 2**32: a key keeps 32 bits
         r"seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
    Case("generate-tokenizer-missing", "generate {model256} --prompt Hi --tokenizer {inputs}/nope.model",
         r"nope.model: no such file"),
    Case("generate-tokenizer-corrupt", "generate {model256} --prompt Hi --tokenizer {corrupt_model}",
         r"corrupt.model: neither a SentencePiece model nor a tiktoken rank file"),
    Case("generate-tokenizer-not-the-models", "generate {model} --prompt Hi --tokenizer {other_tokenizer}",
         r"--tokenizer \S+ differs from the model's own \S+/tokenizer.model; omit --tokenizer"),
    Case("generate-tokenizer-above-model-vocab", "generate {model256} --prompt Hi --tokenizer {tokenizer}",
         r"the tokenizer has 512 tokens but the model's vocab_size is 256; use the model's own tokenizer$"),
    Case("generate-model-tokenizer-swapped", "generate {swapped_tokenizer_model} --prompt Hi",
         r"swapped_tokenizer_model/tokenizer.model: the tokenizer has 512 tokens but the model's vocab_size is 256; it "
         r"cannot be this model's tokenizer \(was it replaced\?\): put the model's own tokenizer.model back$"),
    Case("generate-prompt-too-long", "generate {model} --prompt '" + "many words " * 80 + "' --max-new-tokens 8",
         r"longest prompt \(\d+\) \+ max_new_tokens \(8\) = \d+ exceeds the model's max_seq_len \(128\)"),
    Case("generate-mesh-not-three-integers", "generate {model} --prompt Hi --mesh 1,x",
         r"argument --mesh: expected three integers DATA,FSDP,TENSOR such as 1,-1,1, got '1,x'"),
    Case("generate-mesh-zero", "generate {model} --prompt Hi --mesh 0,-1,1",
         r"mesh.data=0: must be a positive integer or -1 \(all remaining devices\)"),
    Case("generate-mesh-two-free-axes", "generate {model} --prompt Hi --mesh -1,-1,1",
         r"mesh: only one of data, fsdp, tensor may be -1, got data, fsdp"),
    Case("generate-second-prompts-file-missing",
         "generate {model} --prompts-file {corpus}/doc0.txt --prompts-file {inputs}/nope.txt",
         r"\S+/nope.txt: no such file"),
    Case("generate-prompts-file-a-directory", "generate {model} --prompts-file {corpus}",
         r"\S+/corpus: is a directory; give a text file \(one prompt per line\) or a .jsonl file"),
    Case("generate-infill-with-chat", "generate {model} --prompt 'a<FILL_ME>b' --infill --chat",
         r"--infill and --chat exclude each other"),
    Case("generate-infill-prompt-without-fill-me", "generate {model} --prompt Hi --infill",
         r"an infilling prompt holds <FILL_ME> once, where the filling goes \(the text before it is the prefix, after "
         r"it the suffix\); this one holds none: 'Hi'$"),
    Case("generate-infill-prompt-with-two", "generate {model} --prompt 'a<FILL_ME>b<FILL_ME>' --infill",
         r"this one holds it 2 times: 'a<FILL_ME>b<FILL_ME>'$"),
    Case("generate-infill-prompts-file-without-fill-me", "generate {model} --prompts-file {corpus}/doc0.txt --infill",
         r"an infilling prompt holds <FILL_ME> once, .*; this one holds none: "),
    Case("generate-infill-tokenizer-without-the-pieces", "generate {model} --prompt 'a<FILL_ME>b' --infill",
         r"this tokenizer cannot infill: it lacks .<PRE>, .<SUF>, .<MID>, .<EOT>; infilling needs a Code Llama "
         r"tokenizer.model, which holds .<PRE>, .<SUF>, .<MID>, .<EOT>$"),
    Case("generate-stop-starting-with-a-dash", "generate {model} --prompt Hi --stop -x",  # argparse: an option
         r"argument --stop: expected one argument; give a value that starts with '-' as --stop=VALUE"),
    Case("generate-model-link-to-nothing", "generate {dangling_link} --prompt Hi",
         r"\S+/dangling_link is a symbolic link to \S+/gone, which does not exist; give a llama_jax model directory$"),
    Case("generate-workdir-link-loop", "generate --workdir {loop_link} --prompt Hi",
         r"--workdir \S+/loop_link is a symbolic link to loop_link, which loops back to itself; give a run's "
         r"directory"),
    Case("eval-model-link-loop", "eval {loop_link} --config {tiny} --config.data.source=embedded",
         r"\S+/loop_link is a symbolic link to loop_link, which loops back to itself; give a llama_jax model "
         r"directory$"),
    Case("convert-jax-src-link-to-nothing", "convert --from jax --to hf {dangling_link} out",
         r"\S+/dangling_link is a symbolic link to \S+/gone, which does not exist; give a llama_jax model directory$"),
    Case("convert-hf-src-link-loop", "convert --from hf --to jax {loop_link} out",
         r"\S+/loop_link is a symbolic link to loop_link, which loops back to itself; give a Hugging Face model "
         r"directory$"),
    # ---- lm-eval (its other cases are in tests/test_evaluate.py) ----
    Case("lm-eval-max-gen-toks-zero", "lm-eval {model} --tasks tiny_mc --max-gen-toks 0",
         r"argument --max-gen-toks: must be at least 1, got 0"),
    Case("lm-eval-max-gen-toks-not-a-number", "lm-eval {model} --tasks tiny_mc --max-gen-toks many",
         r"argument --max-gen-toks: invalid integer 'many'"),
    Case("lm-eval-limit-not-whole", "lm-eval {model} --tasks tiny_mc --limit 2.5",
         r"argument --limit: expected a whole number of examples or a fraction below 1, got '2.5'"),
    Case("lm-eval-limit-beyond-2**40", "lm-eval {model} --tasks tiny_mc --limit 1e30",  # failed in islice()
         r"argument --limit: must be at most 2\*\*40 examples, got '1e30'; leave --limit out to run every example"),
    Case("lm-eval-empty-task-name", "lm-eval {model} --tasks tiny_mc,,tiny_gen",  # (it was dropped without a word)
         r"--tasks: empty task name in 'tiny_mc,,tiny_gen'; give names separated by single commas$"),
    Case("lm-eval-task-given-twice", "lm-eval {model} --tasks tiny_mc,tiny_gen,tiny_mc",
         r"--tasks: 'tiny_mc' given twice in 'tiny_mc,tiny_gen,tiny_mc'; name each task once$"),
    # ---- export ----
    Case("export-not-a-run", "export --workdir {readme_dir} out",
         r"readme holds no committed checkpoint \(checkpoints/<step>/\)"),
    Case("export-workdir-is-a-hf-model", "export --workdir {hf} out",
         r"--workdir \S+/hf holds 'config.json' but no llama-jax run \(a run writes config.json, checkpoints/, "
         r"metrics.jsonl there\); give a run's directory \(the --workdir of llama-jax train\)$"),
    Case("export-workdir-a-checkpoint-of-a-run", "export --workdir {run}/checkpoints/4 out",
         r"--workdir \S+/run/checkpoints/4 is inside \S+/run/checkpoints, the checkpoints of the run \S+/run; give the "
         r"run's directory: --workdir \S+/run$"),
    Case("export-workdir-missing", "export --workdir nowhere out",
         r"--workdir \S+/nowhere does not exist; give a run's directory \(the --workdir of llama-jax train\)$"),
    Case("export-workdir-is-a-model", "export --workdir {model} out",
         r"--workdir \S+/model is a model directory, not a run \(the --workdir of llama-jax train\)$"),
    Case("export-step-missing", "export --workdir {run} --step 3 out", r"run has no checkpoint of step 3; valid: 2, 4"),
    Case("export-dst-is-workdir", "export --workdir {run} {run} --overwrite",
         r"destination \S+/run is the input \S+/run"),
    Case("export-dst-contains-workdir", "export --workdir {run} {inputs} --overwrite",
         r"destination \S+/inputs contains the input \S+/run"),
    Case("export-overwrite-a-run", "export --workdir {run} {damaged_progress_run} --overwrite",
         r"holds 'checkpoints' \(and \d more\), which is not part of a llama_jax model directory"),
    Case("export-dst-ends-in-dotdot", "export --workdir {run} new/dir/..",  # the rename failed after all the work
         r"destination new/dir/.. ends in '.' or '..', which cannot be replaced; give the directory by its own name "
         r"\(\S+/new\)"),
    Case("export-overwrite-its-checkpoints", "export --workdir {run} {run}/checkpoints --overwrite",
         r"destination \S+/run/checkpoints is inside \S+/run/checkpoints, the checkpoints of a run"),
    Case("export-into-its-checkpoints", "export --workdir {run} {run}/checkpoints/10",
         r"destination \S+/run/checkpoints/10 is inside \S+/run/checkpoints, the checkpoints of a run"),
    Case("eval-output-into-its-checkpoints", "eval --workdir {run} --output {run}/checkpoints/30/eval.json",
         r"--output \S+/run/checkpoints/30/eval.json is inside \S+/run/checkpoints, the checkpoints of a run"),
    Case("export-latest-missing", "export --workdir {missing_latest_run} out",
         r"checkpoint 4 of \S+ is missing \(recorded in progress.json as the latest committed step\); --step 2 "
         r"reads the latest one present"),
    Case("export-dst-is-a-file", "export --workdir {run} {notes}",  # (not "pass --overwrite": that would not help)
         r"notes.txt exists and is not a directory; --overwrite replaces only a llama_jax model directory, so choose "
         r"another destination"),
    Case("export-into-a-models-params", "export --workdir {run} {model}/params/x",
         r"destination \S+/model/params/x is inside \S+/model/params, the parameters of the model directory "
         r"\S+/model; choose a destination outside it"),
    Case("convert-into-a-models-params", "convert --from jax --to hf {model} {model}/params/hf",
         r"destination \S+/model/params/hf is inside \S+/model/params, the parameters of the model directory"),
    Case("eval-output-into-a-models-params", "eval --workdir {run} --output {model}/params/eval.json",
         r"--output \S+/model/params/eval.json is inside \S+/model/params, the parameters of the model directory"),
    Case("export-overwrite-a-link-to-a-model", "export --workdir {run} {model_link} --overwrite",
         r"model_link is a symbolic link \(to \S+/model\); --overwrite replaces only a llama_jax model directory "
         r"itself"),
    Case("export-dst-under-a-file", "export --workdir {run} {notes}/model",
         r"cannot create \S+/notes.txt/model: \S+/notes.txt is a file, not a directory"),
    Case("export-dst-link-loop", "export --workdir {run} {loop_link}",
         r"destination \S+/loop_link is a symbolic link to loop_link, which loops back to itself; remove the link or "
         r"choose another destination"),
    Case("eval-output-ends-in-a-slash", "eval --workdir {run} --output results/",  # wrote a file named results
         r"--output results/ ends in '/', which names a directory; give the path of a JSON file to write$"),
    Case("eval-output-link-loop", "eval --workdir {run} --output {loop_link}",
         r"--output \S+/loop_link is a symbolic link to loop_link, which loops back to itself"),
    Case("train-workdir-link-to-nothing", "train --config {tiny} --workdir {dangling_link}",
         r"--workdir \S+/dangling_link is a symbolic link to \S+/gone, which does not exist; remove the link or "
         r"choose another --workdir"),
    Case("train-workdir-under-a-link-loop", "train --config {tiny} --workdir {loop_link}/run",
         r"--workdir \S+/loop_link/run: \S+/loop_link is a symbolic link to loop_link, which loops back to itself"),
    Case("demo-workdir-link-to-nothing", "demo --workdir {dangling_link}",
         r"--workdir \S+/dangling_link is a symbolic link to \S+/gone, which does not exist"),
    Case("sweep-workdir-link-loop", "sweep --config {tiny} --workdir {loop_link} --sweep train.seed=[0,1]",
         r"--workdir \S+/loop_link is a symbolic link to loop_link, which loops back to itself"),
    Case("prepare-data-output-link-to-nothing", "prepare-data --config {tiny} --output {dangling_link}",
         r"--output \S+/dangling_link is a symbolic link to \S+/gone, which does not exist"),
    # ---- plan ----
    Case("plan-config-missing", "plan --config {inputs}/nope.py", r"config file \S+/nope.py not found"),
    Case("plan-unknown-key", "plan --config {tiny} --config.mesh.pipeline=2", r"unknown config key 'mesh.pipeline'"),
    Case("plan-devices-0", "plan --config {tiny} --devices 0", r"--devices must be a positive number .*got 0"),
    Case("plan-devices-negative", "plan --config {tiny} --devices -2", r"--devices must be a positive number .*got -2"),
    Case("plan-devices-too-many", "plan --config {tiny} --devices 100000",
         r"--devices must be a positive number of virtual CPU devices, at most 4096 .*got 100000"),
    Case("plan-mesh-does-not-fit", "plan --config {tiny} --devices 2 --config.mesh.tensor=3",
         r"mesh: the device count, 2, is not divisible by the fixed mesh sizes"),
    Case("plan-batch-not-divisible-by-devices", "plan --config {tiny} --devices 3",
         r"micro-batch .* = 16 is not divisible by mesh.data x mesh.fsdp = 3"),
    Case("plan-kv-heads-not-divisible", "plan --config {tiny} --devices 2 --config.mesh.fsdp=1 --config.mesh.tensor=2 "
         "--config.model.n_kv_heads=1", r"model.n_kv_heads=1 is not divisible by mesh.tensor=2"),
    # what train refuses of the config, short of opening the data
    Case("plan-override-unknown-section", "plan --config {tiny} --config.trian.steps=3",
         r"unknown config key 'trian' \(in override 'trian.steps=3'\); valid sections: checkpoint, data, mesh, model, "
         r"optimizer, train$"),
    Case("plan-init-from-a-file", "plan --config {tiny} --config.checkpoint.init_from={notes}",
         r"checkpoint.init_from: \S+/notes.txt is not a llama_jax model directory: model_config.json not found$"),
    Case("plan-init-from-other-shape", "plan --config {tiny} --config.checkpoint.init_from={model}",
         r"checkpoint.init_from=\S+ holds a model with vocab_size=512, but the config asks for vocab_size=256"),
    Case("plan-mixture-entry-misspelt", "plan --config {tiny} --config.data.source=prepared "
         "\"--config.data.mixture={'a': {'path': '{run}/data', 'wieght': 1}}\"",
         r"data.mixture.a has no setting 'wieght'; valid: path, weight$"),
    Case("plan-weight-decay-times-lr-above-1", "plan --config {tiny} --config.optimizer.weight_decay=400",
         r"optimizer.weight_decay: 400 with optimizer.lr=0.003: the decoupled decay multiplies the decayed parameters "
         r"by 1 - lr x weight_decay = -0.2 at the peak learning rate, which zeroes them or flips their sign; valid: "
         r"lr x weight_decay below 1 \(with this lr: weight_decay below 333.333\)$"),
    Case("plan-config-not-a-file", "plan --config /dev/null", r"config file /dev/null is not a regular file"),
    Case("plan-ffn-beyond-int32", "plan --config {tiny} --config.model.ffn_dim=9223372036854775808",
         r"model.ffn_dim must be a positive integer up to 2\*\*31 - 1"),
    # ---- data inspect ----
    Case("inspect-step-beyond-any-run", "data inspect --config {tiny} --step 100000000000000000000000",
         r"argument --step: must be at most 2\*\*40, got 100000000000000000000000"),
    Case("inspect-neither-step-nor-epoch", "data inspect --config {tiny}",
         r"give --step S \(the rows of one step\) or --epoch \(coverage of one epoch\), one of them"),
    Case("inspect-both-step-and-epoch", "data inspect --config {tiny} --step 1 --epoch",
         r"give --step S \(the rows of one step\) or --epoch \(coverage of one epoch\), one of them"),
    Case("inspect-rows-with-epoch", "data inspect --config {tiny} --epoch --rows 2",
         r"--rows picks rows of one --step's batch; --epoch reports every row of the epoch"),
    Case("inspect-step-0", "data inspect --config {tiny} --step 0",  # steps count from 1, as the run's logs do
         r"argument --step: must be at least 1, got 0"),
    Case("inspect-zero-rows", "data inspect --config {tiny} --step 1 --rows 0",
         r"argument --rows: must be at least 1, got 0"),
    Case("inspect-batch-size-0", "data inspect --config {tiny} --step 1 --config.train.batch_size=0",
         r"train.batch_size must be a positive integer, got 0"),
    Case("inspect-seq-len-negative", "data inspect --config {tiny} --step 1 --config.train.seq_len=-1",
         r"train.seq_len must be a positive integer, got -1"),
    Case("inspect-negative-seed", "data inspect --config {tiny} --step 1 --config.train.seed=-1",
         r"train.seed must be an integer in \[0, 2\*\*32\), got -1"),
    Case("inspect-override-of-a-section-it-does-not-read", "data inspect --workdir {run} --step 1 "
         "--config.model.dtype=banana", r"--config.model.dtype=banana: llama-jax data inspect reads only the data, "
                                       r"train section\(s\) of the config"),
    Case("inspect-workdir-is-a-model", "data inspect --workdir {model} --step 1",
         r"--workdir \S+/model is a model directory, not a run \(the --workdir of llama-jax train\)"),
    Case("inspect-workdir-is-a-hf-model", "data inspect --workdir {hf} --step 1",
         r"--workdir \S+/hf holds 'config.json' but no llama-jax run \(a run writes config.json, checkpoints/, "
         r"metrics.jsonl there\); give a run's directory \(the --workdir of llama-jax train\)$"),
    Case("inspect-workdir-is-a-runs-checkpoints", "data inspect --workdir {run}/checkpoints --step 1",
         r"--workdir \S+/run/checkpoints is \S+/run/checkpoints, the checkpoints of the run \S+/run; give the run's "
         r"directory: --workdir \S+/run$"),
    Case("inspect-run-config-json-without-sections", "data inspect --workdir {sectionless_config_run} --step 1",
         r"--workdir \S+ holds a run's checkpoints, but its config.json is damaged \(not a run's resolved config\)"),
    Case("inspect-workdir-missing", "data inspect --workdir {inputs}/nowhere --step 1",
         r"--workdir \S+/nowhere does not exist; give a run's directory \(the --workdir of llama-jax train\)"),
    Case("inspect-workdir-is-a-file", "data inspect --workdir {tiny} --step 1",
         r"--workdir \S+/tiny.py: is a file; expected a run's directory \(the --workdir of llama-jax train\)"),
    # ---- prepare-data (its data and output cases are in tests/test_prepare.py) ----
    Case("prepare-data-workers-beyond-1024", "prepare-data --config {tiny} --output new --workers 99999999999999999999",
         r"argument --workers: must be at most 1024, got 99999999999999999999"),
    Case("prepare-data-shard-tokens-beyond-2**40", "prepare-data --config {tiny} --output new --shard-tokens "
         "9223372036854775808", r"argument --shard-tokens: must be at most 2\*\*40, got 9223372036854775808"),
    Case("prepare-data-tokenizer-vocab-beyond-int32", "prepare-data --config {tiny} --output new "
         "--config.data.source=embedded --config.data.tokenizer=train --config.data.tokenizer_vocab_size=3000000000",
         r"data.tokenizer_vocab_size must be a positive integer below 2\*\*31, got 3000000000$"),
    Case("prepare-data-tokenizer-vocab-below-the-special-pieces", "prepare-data --config {tiny} --output new "
         "--config.data.source=embedded --config.data.tokenizer=train --config.data.tokenizer_vocab_size=2",
         r"a vocabulary of 2 pieces cannot hold the 3 special pieces \(unk, bos, eos\) and the 256 byte pieces, let "
         r"alone the corpus's characters; give a vocabulary size of at least 260$"),  # (was once the corpus was read)
    Case("prepare-data-zero-workers", "prepare-data --config {tiny} --output new --workers 0",
         r"argument --workers: must be at least 1, got 0"),
    Case("prepare-data-shard-tokens-not-an-integer", "prepare-data --config {tiny} --output new --shard-tokens lots",
         r"argument --shard-tokens: invalid integer 'lots'"),
    Case("prepare-data-verify-missing", "prepare-data --verify --output {inputs}/nowhere",
         r"\S+/nowhere does not exist; give a directory written by llama-jax prepare-data"),
    # ---- sweep (its other cases are in tests/test_sweep.py, which runs main() in process) ----
    Case("sweep-negative-seed", "sweep --config {tiny} --workdir new --search random --trials 2 --seed -1 "
         "--sweep optimizer.lr=loguniform(1e-4,1e-2)", r"argument --seed: must be at least 0, got -1"),
    Case("sweep-seed-beyond-32-bits", "sweep --config {tiny} --workdir new --search optuna --trials 1 "
         "--seed 4294967296 --sweep optimizer.lr=loguniform(1e-4,1e-2)",
         r"--seed 4294967296: Optuna's sampler takes seeds below 2\*\*32 \(4294967296\)"),
    Case("sweep-weight-decay-times-lr-of-a-trial-1", "sweep --config {tiny} --workdir new --dry-run "
         "--config.optimizer.lr=0.01 --sweep optimizer.weight_decay=[0.1,100]",
         r"trial weight_decay=100: optimizer.weight_decay: 100 with optimizer.lr=0.01: .*= 0 at the peak learning "
         r"rate"),
    Case("sweep-slurm-save-time-not-an-integer", "sweep --config {tiny} --workdir new --on slurm --dry-run "
         "--save-time-s nan --sweep train.seed=[0,1]", r"argument --save-time-s: invalid int value: 'nan'"),
    # ---- launch (its other cases are in tests/test_launch.py, which runs main() in process) ----
    Case("launch-slurm-mem-gb-not-an-integer", "launch slurm --mem-gb lots --dry-run -- train --config {tiny} "
         "--workdir new", r"argument --mem-gb: invalid int value: 'lots'"),
    Case("launch-slurm-save-time-not-an-integer", "launch slurm --save-time-s 1.5 --dry-run -- train --config {tiny} "
         "--workdir new", r"argument --save-time-s: invalid int value: '1.5'"),
    # ---- demo ----
    Case("demo-unknown-key", "demo --workdir new --config.train.stepz=5", r"unknown config key 'train.stepz'"),
    Case("demo-nan", "demo --workdir new --config.optimizer.lr=nan",
         r"config key optimizer.lr: nan is not a finite number"),
    Case("demo-workdir-is-a-file", "demo --workdir {notes}", r"--workdir \S+notes.txt: \S+notes.txt is a file"),
    Case("demo-workdir-is-hf-model", "demo --workdir {hf}", r"holds 'config.json' but no llama-jax run"),
    Case("demo-workdir-is-model-dir", "demo --workdir {model}", r"holds 'model_config.json' but no llama-jax run"),
    Case("demo-workdir-is-another-run", "demo --workdir {run}",
         r"run/data \(the data this run started with\) was prepared with data.eval_fraction=0.01, not 0.05; "
         r"use the run's data settings \(its config.json\) or another --workdir"),
    Case("demo-tokenizer-above-model-vocab",  # (the embedded corpus: the tokenizer trains in seconds, not the stdlib's)
         "demo --workdir new --config.data.source=embedded --config.data.tokenizer_vocab_size=8192",
         r"the tokenizer has \d+ tokens but the model's vocab_size is 4096; use the model's tokenizer or a "
         r"model.vocab_size of at least the tokenizer's$"),
]


def cli(args: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    """`llama-jax ARGS` as a new process on one CPU device, its temporary files in `cwd`/tmp."""
    (cwd / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TMPDIR": str(cwd / "tmp"), "PYTHONPATH": str(ROOT),
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("XLA_FLAGS", None)  # conftest's 8 virtual devices are for the in-process tests
    # Two cases run at once; JAX warns on stderr if one reads a cache entry the other is writing.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", "llama_jax.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(*directories: Path) -> dict[str, tuple[int, int]]:
    """Every path under `directories` (themselves included) -> (size, mtime_ns)."""
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for d in directories for p in [d, *sorted(d.rglob("*"))]}


def make_inputs(root: Path) -> dict[str, Path]:
    """Every input the cases name (by key), under root/inputs."""
    inputs = root / "inputs"
    corpus = EmbeddedCorpus()
    p = {"inputs": inputs, "tiny": ROOT / "configs" / "tiny.py", "corpus": inputs / "corpus"}
    p["corpus"].mkdir(parents=True)
    for i in range(6):
        (p["corpus"] / f"doc{i}.txt").write_text(corpus[7 * i][:3000])
    p["tokenizer"] = train_sentencepiece((corpus[i] for i in range(len(corpus))), inputs / "tokenizer.model", 512)
    p["other_tokenizer"] = train_sentencepiece(
        (f.read_text() for f in sorted(p["corpus"].iterdir())), inputs / "other" / "tokenizer.model", 400)
    p["run"], p["model"] = inputs / "run", inputs / "model"
    with ThreadPoolExecutor(1) as background:
        training = background.submit(cli, argv(RUN + " --config.checkpoint.every=2", p), root, 300)
        p.update(make_checkpoints_and_damaged_inputs(inputs))  # while the run trains
    assert training.result().returncode == 0, training.result().stderr
    assert cli(["export", "--workdir", p["run"], p["model"]], root).returncode == 0
    p["model_link"] = inputs / "model_link"
    p["model_link"].symlink_to(p["model"])
    p["dangling_link"], p["loop_link"] = inputs / "dangling_link", inputs / "loop_link"
    p["dangling_link"].symlink_to(inputs / "gone")
    p["loop_link"].symlink_to("loop_link")  # `ln -s out out` by mistake
    saved = json.loads((p["run"] / "config.json").read_text())
    p["typo_json"] = inputs / "configs" / "typo.json"
    p["typo_json"].write_text(json.dumps({**saved, "train": {**saved["train"], "stpes": 5}}))
    p["twice_json"] = inputs / "configs" / "twice.json"  # edited by hand: a key added where it was already
    p["twice_json"].write_text(json.dumps(saved).replace('"train": {', '"train": {"steps": 2, ', 1))
    p["bad_config_model"], p["paramless_model"] = inputs / "bad_config_model", inputs / "paramless_model"
    shutil.copytree(p["model"], p["bad_config_model"])
    (p["bad_config_model"] / "model_config.json").write_text("{oops")
    p["swapped_tokenizer_model"] = inputs / "swapped_tokenizer_model"  # vocab 256, with a 512-token tokenizer.model
    shutil.copytree(p["model256"], p["swapped_tokenizer_model"])
    shutil.copyfile(p["tokenizer"], p["swapped_tokenizer_model"] / "tokenizer.model")
    p["dir_tokenizer_model"] = inputs / "dir_tokenizer_model"  # a directory where its tokenizer.model goes
    shutil.copytree(p["model"], p["dir_tokenizer_model"])
    (p["dir_tokenizer_model"] / "tokenizer.model").unlink()
    (p["dir_tokenizer_model"] / "tokenizer.model").mkdir()
    p["bad_generation_model"] = inputs / "bad_generation_model"
    shutil.copytree(p["model"], p["bad_generation_model"])
    (p["bad_generation_model"] / "generation_config.json").write_text("[2]")
    p["eos_beyond_model"] = inputs / "eos_beyond_model"
    shutil.copytree(p["model"], p["eos_beyond_model"])
    (p["eos_beyond_model"] / "generation_config.json").write_text('{"eos_token_id": [2, 600]}')
    shutil.copytree(p["model"], p["paramless_model"], ignore=shutil.ignore_patterns("params"))
    p["bad_metadata_model"] = inputs / "bad_metadata_model"
    shutil.copytree(p["model"], p["bad_metadata_model"])
    (p["bad_metadata_model"] / "params" / "_METADATA").write_text("{")
    p["damaged_progress_run"] = inputs / "damaged_progress_run"
    shutil.copytree(p["run"], p["damaged_progress_run"])
    (p["damaged_progress_run"] / "progress.json").write_text("{")
    p["sectionless_config_run"] = inputs / "sectionless_config_run"  # config.json a JSON object, but no run's
    shutil.copytree(p["run"], p["sectionless_config_run"])
    (p["sectionless_config_run"] / "config.json").write_text('{"model": {}}')
    p["checkpoints_file_run"], p["missing_latest_run"] = inputs / "checkpoints_file_run", inputs / "missing_latest_run"
    shutil.copytree(p["run"], p["checkpoints_file_run"], ignore=shutil.ignore_patterns("checkpoints", "progress.json"))
    (p["checkpoints_file_run"] / "checkpoints").write_text("not a directory\n")
    shutil.copytree(p["run"], p["missing_latest_run"])
    shutil.rmtree(p["missing_latest_run"] / "checkpoints" / "4")
    p["padded_step_run"] = inputs / "padded_step_run"
    shutil.copytree(p["run"], p["padded_step_run"])
    shutil.copytree(p["run"] / "checkpoints" / "4", p["padded_step_run"] / "checkpoints" / "08")
    p["aside_file_run"], p["aside_metrics_folder_run"] = inputs / "aside_file_run", inputs / "aside_metrics_folder_run"
    shutil.copytree(p["run"], p["aside_file_run"])
    (p["aside_file_run"] / "checkpoints-set-aside").write_text("notes\n")
    shutil.copytree(p["run"], p["aside_metrics_folder_run"])
    (p["aside_metrics_folder_run"] / "checkpoints-set-aside" / "metrics.jsonl").mkdir(parents=True)
    p["step_file_run"], p["step_link_run"] = inputs / "step_file_run", inputs / "step_link_run"
    shutil.copytree(p["run"], p["step_file_run"])
    (p["step_file_run"] / "checkpoints" / "6").write_text("notes\n")
    shutil.copytree(p["run"], p["step_link_run"])
    (p["step_link_run"] / "checkpoints" / "6").symlink_to(inputs / "gone")  # a step moved to a disk not mounted
    return p


def make_checkpoints_and_damaged_inputs(inputs: Path) -> dict[str, Path]:
    """Tiny Hugging Face and Meta checkpoints, broken copies of them, and other foreign or damaged files."""
    p = {}
    hf_config = hf_config_dict("mha")
    p["hf"] = inputs / "hf"
    make_hf_model(hf_config).save_pretrained(p["hf"])
    for name, change in {"linear_rope_hf": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                         "no_vocab_hf": {"vocab_size": None}, "mistral_hf": {"model_type": "mistral"},
                         "bad_rope_hf": {"rope_scaling": None, "rope_parameters": "yarn"}}.items():
        p[name] = inputs / name
        shutil.copytree(p["hf"], p[name])
        config = {k: v for k, v in {**hf_config, **change}.items() if v is not None}
        (p[name] / "config.json").write_text(json.dumps(config))
    for name, config_text in {"garbage_config_hf": "{model_type: llama", "list_config_hf": "[1, 2]"}.items():
        p[name] = inputs / name
        shutil.copytree(p["hf"], p[name])
        (p[name] / "config.json").write_text(config_text)
    p["float64_hf"] = inputs / "float64_hf"
    shutil.copytree(p["hf"], p["float64_hf"])
    weights = safetensors.numpy.load_file(p["hf"] / "model.safetensors")
    safetensors.numpy.save_file({k: v.astype("float64") for k, v in weights.items()},
                                p["float64_hf"] / "model.safetensors")
    for name, (file, text) in {"bad_generation_hf": ("generation_config.json", '{"eos_token_id": [2, 13]'),
                               "garbage_tokenizer_hf": ("tokenizer.model", "garbage\n")}.items():
        p[name] = inputs / name  # files that travel with the weights, which a model directory could not use
        shutil.copytree(p["hf"], p[name])
        (p[name] / file).write_text(text)
    p["weightless_hf"], p["truncated_hf"] = inputs / "weightless_hf", inputs / "truncated_hf"
    shutil.copytree(p["hf"], p["weightless_hf"], ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(p["hf"], p["truncated_hf"])
    weights = p["truncated_hf"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    p["meta"], p["model256"] = inputs / "meta", inputs / "model256"
    convert("hf", p["hf"], "meta", p["meta"], progress=False)
    convert("hf", p["hf"], "jax", p["model256"], progress=False)  # vocab 256, no tokenizer
    params = json.loads((p["meta"] / "params.json").read_text())
    for name, change in {"wrong_dim_meta": {"dim": 96}, "scaled_meta": {"use_scaled_rope": True}}.items():
        p[name] = inputs / name
        shutil.copytree(p["meta"], p[name])
        (p[name] / "params.json").write_text(json.dumps({**params, **change}))
    p["garbage_meta"] = inputs / "garbage_meta"
    shutil.copytree(p["meta"], p["garbage_meta"])
    (p["garbage_meta"] / "consolidated.00.pth").write_text("weights, or so the name says\n")
    configs = inputs / "configs"
    configs.mkdir()
    typo = ("from llama_jax.experiment import base_config\n\ndef get_config():\n    config = base_config()\n"
            "    config.train.stpes = 5\n    return config\n")
    for name, text in {"syntax.py": "def get_config(:\n", "none.py": "def get_config():\n    return None\n",
                       "garbage.json": '{"model": ', "typo.py": typo}.items():
        p[name.replace(".", "_")] = configs / name
        (configs / name).write_text(text)
    p["latin1_corpus"], p["empty_corpus"] = inputs / "latin1", inputs / "empty"
    p["latin1_corpus"].mkdir()
    (p["latin1_corpus"] / "a.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    p["empty_corpus"].mkdir()
    (p["empty_corpus"] / "a.txt").write_text("")
    p["bad_jsonl"] = inputs / "bad.jsonl"
    p["bad_jsonl"].write_text('{"text": "fine"}\n{"text": unquoted}\n')
    p["surrogate_jsonl"] = inputs / "surrogate.jsonl"  # valid JSON and UTF-8, but no Unicode text
    p["surrogate_jsonl"].write_text('{"text": "fine"}\n{"text": "bad \\ud800 surrogate"}\n')
    p["surrogate_prompts"] = inputs / "surrogate_prompts.jsonl"
    p["surrogate_prompts"].write_text('{"prompt": "fine"}\n{"prompt": "bad \\ud800 surrogate"}\n')
    p["corrupt_model"] = inputs / "corrupt.model"
    p["corrupt_model"].write_bytes(bytes(range(256)) * 8)
    p["notes"] = inputs / "notes.txt"
    p["notes"].write_text("a regular file\n")
    p["readme_dir"] = inputs / "readme"
    p["readme_dir"].mkdir()
    (p["readme_dir"] / "README.md").write_text("# not a model\n")
    return p


def argv(command: str, paths: dict[str, Path]) -> list[str]:
    """The command line's words, `{name}` replaced by the path of input `name`."""
    return [re.sub(r"\{(\w+)\}", lambda m: str(paths[m[1]]) if m[1] in paths else m[0], word)
            for word in shlex.split(command)]


class Outcome(NamedTuple):
    returncode: int | None
    stderr: str
    changed: list[str]  # paths created, removed or modified


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, request) -> dict[str, Outcome]:
    """Every selected case run once, two at a time."""
    root = tmp_path_factory.mktemp("bad_input")
    paths = make_inputs(root)
    chosen = {item.callspec.id for item in request.session.items
              if getattr(item, "module", None) is request.module and hasattr(item, "callspec")}
    selected = [c for c in CASES if c.id in chosen]  # those pytest runs (-k, ids)
    for case in selected:
        (root / "cases" / case.id / "tmp").mkdir(parents=True)

    shared_run = threading.Lock()  # a train or demo in the shared run holds that workdir's lock while it checks

    def run(case: Case) -> Outcome:
        cwd = root / "cases" / case.id
        before = snapshot(paths["inputs"], cwd)
        trains_in_run = case.command.split()[0] in ("train", "demo") and "--workdir {run} " in case.command + " "
        try:
            with shared_run if trains_in_run else contextlib.nullcontext():
                result = cli(argv(case.command, paths), cwd)
            returncode, stderr = result.returncode, result.stderr
        except subprocess.TimeoutExpired:
            returncode, stderr = None, "timed out"
        after = snapshot(paths["inputs"], cwd)
        changed = sorted(k for k in before.keys() | after.keys()
                         if before.get(k) != after.get(k) and k != str(cwd / "tmp"))  # in TMPDIR: what is left
        return Outcome(returncode, stderr, [str(Path(c).relative_to(root)) for c in changed])

    with ThreadPoolExecutor(2) as pool:
        return dict(zip((c.id for c in selected), pool.map(run, selected)))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, outcomes):
    out = outcomes[case.id]
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 2, f"exit status {out.returncode}; stderr:\n{out.stderr}"
    lines = out.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{out.stderr}"
    command = case.command.split()[0]
    assert re.match(rf"llama-jax( {command}( [a-z-]+)?)?: error: ", lines[0]), lines[0]  # "data inspect"
    assert re.search(case.error, lines[0]), lines[0]
    assert not out.changed, f"changed by the command: {out.changed}"


@pytest.mark.parametrize("case_id", ["train-workdir-is-a-file", "demo-workdir-is-a-file", "export-workdir-missing",
                                     "export-dst-link-loop", "sweep-workdir-link-loop", "eval-output-link-loop",
                                     "eval-model-link-loop", "generate-workdir-link-loop", "generate-mesh-zero",
                                     "generate-infill-with-chat", "generate-infill-prompt-without-fill-me",
                                     "generate-mesh-two-free-axes", "export-step-missing", "plan-mesh-does-not-fit",
                                     "plan-batch-not-divisible-by-devices", "plan-kv-heads-not-divisible",
                                     "train-init-from-missing", "train-init-from-a-run", "train-init-from-other-shape",
                                     "plan-init-from-other-shape"])
def test_refused_before_jax_is_imported(case_id, tmp_path, monkeypatch):
    """Importing JAX, Flax and Orbax takes seconds: a --workdir that train, demo, export, sweep or
    generate cannot use, an export's destination and step, eval's --output, a model path that leads
    nowhere, generate's --mesh sizes, a plan's mesh that does not fit its --devices, batch or model
    and a new run's checkpoint.init_from that is no model directory of the config's model are
    refused before (the modules the process imported, as Python's -X importtime lists them)."""
    from llama_jax.experiment import load_config, model_config

    case = next(c for c in CASES if c.id == case_id)
    paths = {"tiny": ROOT / "configs" / "tiny.py", "notes": tmp_path / "notes.txt", "loop_link": tmp_path / "loop_link",
             "run": tmp_path / "run", "model": tmp_path / "model", "inputs": tmp_path}
    paths["notes"].write_text("a regular file\n")
    paths["model"].mkdir()  # (a model directory as far as these checks go: its parameters are read after them)
    tiny = model_config(load_config(paths["tiny"]).model)
    (paths["model"] / "model_config.json").write_text(tiny.replace(vocab_size=512).to_json())
    paths["loop_link"].symlink_to("loop_link")
    for step in (2, 4):  # (a run's directory as far as these checks go: its checkpoints are read after them)
        (paths["run"] / "checkpoints" / str(step)).mkdir(parents=True)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # (-X importtime, to the process `cli` starts)
    result = cli(argv(case.command, paths), tmp_path)
    lines = result.stderr.splitlines()
    imported = [line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")]
    errors = [line for line in lines if not line.startswith("import time:")]
    assert result.returncode == 2 and len(errors) == 1 and re.search(case.error, errors[0]), result.stderr[-2000:]
    assert "llama_jax.safe_io" in imported  # (the listing is the command's)
    assert not [m for m in imported if m.split(".")[0] in ("jax", "flax", "orbax")], errors[0]


def _closed_pipe():
    """The write end of a pipe whose reader has gone, line-buffered: writing a line raises BrokenPipeError."""
    read, write = os.pipe()
    os.close(read)
    return os.fdopen(write, "w", buffering=1)


def test_a_broken_pipe_is_success_only_for_a_command_that_only_prints(monkeypatch, tmp_path, capsys):
    from llama_jax import cli

    # `llama-jax presets | head -1`: the reader stopped early, which is not an error
    with _closed_pipe() as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert cli.main(["presets"]) == 0
    monkeypatch.undo()

    # `llama-jax train ... | head -2`: the run stops unfinished, which a script must see
    with _closed_pipe() as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        run = NEW_RUN.format(tiny=ROOT / "configs" / "tiny.py").replace("new", str(tmp_path / "run"))
        assert cli.main([*run.split(), "--config.train.log_every=1"]) == 128 + signal.SIGPIPE
    monkeypatch.undo()
    assert capsys.readouterr().err == ("llama-jax train: error: its standard output was closed (the program reading "
                                       "it exited), so it stopped there; redirect the output to a file to let it "
                                       "finish\n")

    # a pipe of the command's own breaking (a helper process that could not start), while stdout
    # is a pipe still read, is an error
    def helper_gone(args):
        print("working")
        with _closed_pipe() as helper:
            print("work", file=helper)

    monkeypatch.setattr(cli, "cmd_presets", helper_gone)
    read, write = os.pipe()
    with os.fdopen(read) as reader, os.fdopen(write, "w", buffering=1) as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert cli.main(["presets"]) == 2
        monkeypatch.undo()
        stdout.close()
        assert reader.read() == "working\n"
    assert capsys.readouterr().err == "llama-jax presets: error: [Errno 32] Broken pipe\n"
