#!/usr/bin/env bash
# TinyLlama-1.1B pre-training (configs/tinyllama_1b_8gpu.py) on SLURM: 2 nodes x 8 GPUs.
#
#   experiments/tinyllama_slurm.sh [launch flags ...] [--config.key=value ...]
#
# Submits one job with one task per node through `llama-jax launch slurm` (submitit); the two
# processes join one JAX program (16 GPUs: the config's 2 data-parallel replicas become 8-way FSDP
# each). At the time limit, and on preemption where the cluster requeues preempted jobs, the job
# is requeued and resumes from the latest checkpoint in $WORKDIR (see README's Launching). Run it
# from a login node, in an environment where llama-jax is installed with its launch extra
# (pip install -e '.[launch]') on storage the nodes share.
#
# --config.* arguments go to `llama-jax train`; the others to `llama-jax launch slurm`, e.g.
# --dry-run (write and print the sbatch script), --partition P, --account A, --time-min M,
# --exclusive, --gpus-by-gres (the GPUs as --gres=gpu:8, for a cluster without select/cons_tres)
# (`llama-jax launch slurm --help` lists them). This script asks for all of each
# node's memory (--mem-gb 0) and 32 CPUs (--cpus-per-node 32: without it the task, all 8 GPUs of
# a node, gets the cluster's default, often one CPU); a later --mem-gb or --cpus-per-node replaces
# them. At each time limit the run saves its state (1.1B parameters and Adam's two moments, in
# float32: about 13 GB) before the requeue, within --save-time-s S (default 80 s: about 170 MB/s
# to the shared storage); on slower storage give more, e.g. --save-time-s 300, or the save is
# killed and the steps since the previous checkpoint are lost.
# Environment: WORKDIR (default: runs/tinyllama in this checkout; a relative one is read from
# where the script starts), LLAMA_JAX.
. "$(dirname "$0")/command.sh"  # (first: it refuses a shell other than bash)
set -euo pipefail
if [[ -n ${WORKDIR:-} && $WORKDIR != /* ]]; then
    WORKDIR=$PWD/$WORKDIR  # a WORKDIR given relative: to the directory the script was started in
fi
cd "$(dirname "$0")/.."  # the job runs where it was submitted: configs/ and relative paths resolve here

WORKDIR=${WORKDIR:-runs/tinyllama}  # (the default: in this checkout)

split_arguments "$@"
usage_if_asked ${launch_args[@]+"${launch_args[@]}"}  # (the launcher's usage asks for flags given here)

exec "$llama_jax" launch slurm --nodes 2 --gpus-per-node 8 --mem-gb 0 --cpus-per-node 32 --time-min 1440 \
    ${launch_args[@]+"${launch_args[@]}"} \
    -- train --config configs/tinyllama_1b_8gpu.py --workdir "$WORKDIR" ${train_args[@]+"${train_args[@]}"}
