# Sourced by the experiment scripts: sets $llama_jax, the llama-jax command they run. LLAMA_JAX
# names it; else llama-jax on PATH; else this checkout's .venv/bin/llama-jax (what `make install`
# makes); else one line saying what to do, exit 2.
if [ -z "${BASH_VERSION:-}" ]; then  # (with sh, the bash below failed on its first line, saying nothing of why)
    echo "$(basename "$0"): error: this is a bash script; run it as $0, or with bash $0, not sh" >&2
    exit 2
fi
llama_jax_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${LLAMA_JAX:-} ]]; then
    if ! command -v "$LLAMA_JAX" > /dev/null; then
        echo "$(basename "$0"): error: LLAMA_JAX=$LLAMA_JAX is not a command; give the path of llama-jax, or unset it" >&2
        exit 2
    fi
    llama_jax=$LLAMA_JAX
elif command -v llama-jax > /dev/null; then
    llama_jax=llama-jax
elif [[ -x $llama_jax_root/.venv/bin/llama-jax ]]; then
    llama_jax=$llama_jax_root/.venv/bin/llama-jax
else
    echo "$(basename "$0"): error: no llama-jax command: run make install (or pip install -e .) and activate" \
         "that environment, or set LLAMA_JAX to the command" >&2
    exit 2
fi
case $llama_jax in
    */*) llama_jax=$(cd "$(dirname "$llama_jax")" && pwd)/$(basename "$llama_jax") ;;  # (scripts may cd)
esac

script_file=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")  # (scripts may cd)

# script_usage: the script's header comment (its usage), without the comment signs.
script_usage() {
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$script_file"
}

# usage_if_asked ARG...: the script's usage, and exit 0, when an argument is -h or --help.
usage_if_asked() {
    local arg
    for arg in "$@"; do
        if [[ $arg == -h || $arg == --help ]]; then
            script_usage
            exit 0
        fi
    done
}

# split_arguments ARG...: the --config.* overrides among them (--config.key=value, or --config.key value as
# llama-jax takes it) into the array train_args, the others into launch_args.
split_arguments() {
    launch_args=() train_args=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --config.*=*) train_args+=("$1") ;;
            --config.*) train_args+=("${@:1:2}")  # the key and its value, the next argument
                        [[ $# -lt 2 ]] || shift ;;
            *) launch_args+=("$1") ;;
        esac
        shift
    done
}
