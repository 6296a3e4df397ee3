#!/usr/bin/env bash
# LLaMA-2 7B pre-training (configs/llama2_7b_v4_32.py) on a Cloud TPU v4-32: 16 chips, 4 workers.
#
#   experiments/llama2_7b_v4_32.sh [launch flags ...] [--config.key=value ...]
#
# `llama-jax launch tpu` creates the queued resource $NAME (or reuses it), ships this checkout to
# every worker, installs it and runs `llama-jax train` on all of them. The workdir and the data
# live on a bucket mounted with gcsfuse at /mnt/gcs on every worker (--setup can mount it).
# After a preemption, run the same command again: the suspended slice is re-created and training
# resumes from the latest checkpoint in $WORKDIR.
#
# --config.* arguments go to `llama-jax train`; the others to `llama-jax launch tpu`, e.g.
# --dry-run (print the gcloud commands), --spot, --project P, --max-restarts N, --zone Z
# (`llama-jax launch tpu --help` lists them). Environment: NAME (default llama2-7b-v4-32), ZONE
# (us-central2-b), WORKDIR (/mnt/gcs/runs/llama2-7b); LLAMA_JAX the llama-jax command.
. "$(dirname "$0")/command.sh"  # (first: it refuses a shell other than bash)
set -euo pipefail

NAME=${NAME:-llama2-7b-v4-32}
ZONE=${ZONE:-us-central2-b}
WORKDIR=${WORKDIR:-/mnt/gcs/runs/llama2-7b}

split_arguments "$@"
usage_if_asked ${launch_args[@]+"${launch_args[@]}"}  # (the launcher's usage asks for flags given here)

exec "$llama_jax" launch tpu --name "$NAME" --zone "$ZONE" --accelerator v4-32 \
    ${launch_args[@]+"${launch_args[@]}"} \
    -- train --config configs/llama2_7b_v4_32.py --workdir "$WORKDIR" ${train_args[@]+"${train_args[@]}"}
