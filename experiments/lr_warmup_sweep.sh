#!/usr/bin/env bash
# Learning rate x warmup sweep of the demo model on CPU (configs/lr_warmup_sweep.py declares the
# axes with get_sweep()), two trials at a time, then its results table and plots.
#
#   experiments/lr_warmup_sweep.sh [WORKDIR] [sweep flags, e.g. --dry-run or --parallel 1]
#   experiments/lr_warmup_sweep.sh [WORKDIR] --report    (the results of the trials run so far)
#
# WORKDIR defaults to runs/lr-warmup-sweep; a first argument starting with - is a sweep flag.
#
# Rerunning the same command skips finished trials and resumes interrupted ones. LLAMA_JAX names
# the llama-jax command to run (default: llama-jax on PATH, else this checkout's .venv).
. "$(dirname "$0")/command.sh"  # (first: it refuses a shell other than bash)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
workdir=runs/lr-warmup-sweep
if [[ $# -gt 0 && $1 != -* ]]; then
    workdir=$1
    shift
fi
if [[ " $* " == *" --report "* ]]; then  # the results of what has run so far: the sweep's own flags only
    exec "$llama_jax" sweep --workdir "$workdir" "$@"
fi
# exec: a signal to this script (Ctrl-C, a job's SIGTERM) reaches the sweep, which stops its trials
exec "$llama_jax" sweep --config "$here/configs/lr_warmup_sweep.py" --workdir "$workdir" --parallel 2 "$@"
