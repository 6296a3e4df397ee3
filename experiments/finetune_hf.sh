#!/usr/bin/env bash
# Fine-tune a Hugging Face LLaMA checkpoint on local .jsonl/.txt files and export the result
# back to Hugging Face format.
#
#   experiments/finetune_hf.sh HF_DIR 'data/*.jsonl' RUN_DIR [--config.key=value ...]
#
#   1. HF_DIR  -> RUN_DIR/init   llama-jax convert --from hf --to jax --verify
#   2. RUN_DIR                   llama-jax train --config configs/finetune.py, starting from RUN_DIR/init
#   3. RUN_DIR -> RUN_DIR/hf     llama-jax export (latest checkpoint), then convert --to hf --verify
#
# Rerunning the same command after a preemption skips the conversion if RUN_DIR/init exists and
# resumes training from the latest checkpoint. The --config.* arguments go to `llama-jax train`.
# LLAMA_JAX names the llama-jax command to run (default: llama-jax on PATH, else this checkout's .venv).
. "$(dirname "$0")/command.sh"  # (first: it refuses a shell other than bash)
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    script_usage
    exit 0
fi
if [ $# -lt 3 ]; then
    script_usage >&2
    echo "$(basename "$0"): error: expected HF_DIR DATA RUN_DIR [--config.key=value ...], got $# argument(s)" >&2
    exit 2
fi
hf_dir=$1 data=$2 run=$3
shift 3
split_arguments "$@"
if [[ ${#launch_args[@]} -gt 0 ]]; then  # (--workdir elsewhere, say, trained a run the export then missed)
    echo "$(basename "$0"): error: ${launch_args[0]}: after HF_DIR DATA RUN_DIR come only --config.key=value" \
         "overrides" >&2
    exit 2
fi
data=${data//\\/\\\\}  # the pattern inside a quoted Python string: backslashes and quotes escaped
data=${data//\'/\\\'}
here=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -d "$run/init" ]; then
    if [[ -d $hf_dir && $run -ef $hf_dir ]]; then  # (the conversion went into the model, then training refused)
        echo "$(basename "$0"): error: RUN_DIR $run is HF_DIR, the Hugging Face model; give a new directory" \
             "for the run" >&2
        exit 2
    fi
    if [[ -d $hf_dir && ! -f $hf_dir/tokenizer.model ]]; then  # (the run reads it from RUN_DIR/init, made once)
        echo "$(basename "$0"): error: $hf_dir/tokenizer.model: no such file; the run reads its tokenizer from" \
             "the converted model: copy the model's tokenizer.model into $hf_dir (LLaMA 3 repositories keep it" \
             "under original/)" >&2
        exit 2
    fi
    "$llama_jax" convert --from hf --to jax --verify "$hf_dir" "$run/init"
fi
"$llama_jax" train --config "$here/configs/finetune.py" --workdir "$run" \
    --config.checkpoint.init_from="$run/init" \
    --config.data.files="['$data']" \
    --config.data.tokenizer="$run/init/tokenizer.model" ${train_args[@]+"${train_args[@]}"}
"$llama_jax" export --workdir "$run" --overwrite "$run/final"
"$llama_jax" convert --from jax --to hf --verify --overwrite "$run/final" "$run/hf"
