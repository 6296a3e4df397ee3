#!/usr/bin/env bash
# Learning rate x warmup sweep of the demo model on CPU (configs/lr_warmup_sweep.py declares the
# axes with get_sweep()), two trials at a time, then its results table and plots.
#
#   experiments/lr_warmup_sweep.sh [WORKDIR] [sweep flags, e.g. --dry-run or --parallel 1]
#
# Rerunning the same command skips finished trials and resumes interrupted ones. LLAMA_JAX names
# the llama-jax command to run (default: llama-jax on PATH).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
workdir=${1:-runs/lr-warmup-sweep}
shift $(( $# > 0 ? 1 : 0 ))
llama_jax=${LLAMA_JAX:-llama-jax}

"$llama_jax" sweep --config "$here/configs/lr_warmup_sweep.py" --workdir "$workdir" --parallel 2 "$@"
