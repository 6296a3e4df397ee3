#!/usr/bin/env bash
# LLaMA-3 8B continued pre-training (configs/llama3_8b_v5p.py) on a Cloud TPU v5p-64: 32 chips,
# 8 workers, FSDP x tensor parallel 2.
#
#   experiments/llama3_8b_v5p.sh [launch flags ...] [--config.key=value ...]
#
# Before the first launch, convert the Hugging Face weights to the path the config starts from
# (checkpoint.init_from), on the bucket every worker mounts at /mnt/gcs:
#   llama-jax convert --from hf --to jax --verify Meta-Llama-3-8B /mnt/gcs/llama3-8b-jax
# Then this script creates (or reuses) the queued resource $NAME and runs `llama-jax train` on
# every worker. After a preemption, run it again: training resumes from $WORKDIR's checkpoints
# (init_from only seeds a new run). With --spot and --max-restarts N it re-launches by itself.
#
# --config.* arguments go to `llama-jax train`; the others to `llama-jax launch tpu` (--dry-run
# prints the gcloud commands; `llama-jax launch tpu --help` lists them). Environment: NAME
# (default llama3-8b-v5p), ZONE (us-east5-a), WORKDIR (/mnt/gcs/runs/llama3-8b-cpt), LLAMA_JAX.
. "$(dirname "$0")/command.sh"  # (first: it refuses a shell other than bash)
set -euo pipefail

NAME=${NAME:-llama3-8b-v5p}
ZONE=${ZONE:-us-east5-a}
WORKDIR=${WORKDIR:-/mnt/gcs/runs/llama3-8b-cpt}

split_arguments "$@"
usage_if_asked ${launch_args[@]+"${launch_args[@]}"}  # (the launcher's usage asks for flags given here)

exec "$llama_jax" launch tpu --name "$NAME" --zone "$ZONE" --accelerator v5p-64 \
    ${launch_args[@]+"${launch_args[@]}"} \
    -- train --config configs/llama3_8b_v5p.py --workdir "$WORKDIR" ${train_args[@]+"${train_args[@]}"}
