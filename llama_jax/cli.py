"""The `llama-jax` command: parse, call the package, report. User errors exit with one line."""

from __future__ import annotations

import argparse
import logging
import math
import sys


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def cmd_presets(args) -> None:
    from llama_jax import PRESETS, param_count

    print(f"{'preset':<16} {'params':>17} {'dim':>6} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>6} "
          f"{'vocab':>7} {'ctx':>7}  rope")
    for name, c in PRESETS.items():
        rope = f"theta={c.rope_theta:g}" + (f", {c.rope_scaling.rope_type} x{c.rope_scaling.factor:g}"
                                              if c.rope_scaling else "")
        print(f"{name:<16} {param_count(c):>17,} {c.dim:>6} {c.n_layers:>6} {c.n_heads:>5} {c.n_kv_heads:>3} "
              f"{c.ffn_dim:>6} {c.vocab_size:>7} {c.max_seq_len:>7}  {rope}{', tied' if c.tie_embeddings else ''}")


def cmd_demo(args) -> None:
    from llama_jax.demo import run_demo

    run_demo(args.workdir, args.overrides)


def cmd_generate(args) -> None:
    from pathlib import Path

    from llama_jax.checkpoint import load_config, load_model
    from llama_jax.generate import generate_text
    from llama_jax.safe_io import sha256_file
    from llama_jax.tokenizer import check_fits, load_tokenizer

    config = load_config(args.model)  # fails fast on a directory that is not a model
    own = Path(args.model) / "tokenizer.model"
    tokenizer_path = Path(args.tokenizer or own)
    if not args.tokenizer and not own.is_file():
        raise UserError(f"{args.model} has no tokenizer.model; pass --tokenizer PATH")
    if args.tokenizer and own.is_file() and tokenizer_path.is_file() and sha256_file(tokenizer_path) != sha256_file(own):
        raise UserError(f"--tokenizer {args.tokenizer} differs from the model's own {own}; omit --tokenizer to "
                        f"use the tokenizer the model was trained with")
    tokenizer = load_tokenizer(tokenizer_path)
    check_fits(tokenizer, config.vocab_size)
    config, params = load_model(args.model)
    texts = generate_text(config, params, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print("\n\n-----\n\n".join(prompt + text for prompt, text in zip(args.prompt, texts)))


def finite_float(text: str) -> float:
    """argparse type: a number that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a plain byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("IB").rstrip("KMG")
    unit = text.strip().upper()[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def cmd_convert(args) -> None:
    from llama_jax.convert.pipeline import convert

    summary = convert(args.src_format, args.src, args.dst_format, args.dst, dtype=args.dtype,
                      overwrite=args.overwrite, shards=args.shards, max_shard_bytes=args.max_shard_size,
                      rope_scaling_factor=args.rope_scaling_factor, verify=args.verify)
    if summary.verify is not None:
        print(summary.verify.line())
    print(summary.line(args.src_format, args.dst_format, args.dst))


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    from llama_jax.convert.pipeline import FORMATS

    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS,
                   help="hf: config.json + safetensors/.bin; meta: params.json + consolidated.NN.pth; "
                        "jax: a llama_jax model directory")
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
    p.add_argument("src", help="source directory")
    p.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--verify", action="store_true",
                   help="compare source and converted logits on a probe batch; fail beyond tolerance")
    p.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files for --to meta")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="largest safetensors file for --to hf (default 5GB)")
    p.add_argument("--rope-scaling-factor", type=finite_float, default=None,
                   help="LLaMA-3 rope scaling factor for Meta checkpoints with use_scaled_rope "
                        "(default: params.json's rope_scaling_factor, else 8; LLaMA-3.2 1B/3B use 32)")


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.a.b=v` (or `--config.a.b v`) overrides from the other arguments."""
    rest, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            item = arg[len("--config."):]
            if "=" not in item:
                value = next(it, None)
                if value is None:
                    raise UserError(f"{arg}: missing value")
                item = f"{item}={value}"
            overrides.append(item)
        else:
            rest.append(arg)
    return rest, overrides


def _init_distributed(args) -> None:
    """Join a multi-process run: explicitly from flags, or automatically on TPU VMs and SLURM."""
    import os

    import jax

    if args.num_processes and args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only; harmless elsewhere
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif _on_tpu_vm() or os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # JAX reads the topology from the TPU metadata server or SLURM


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM, told by its TPU device files (checked without starting a JAX backend)."""
    import glob
    import os

    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or glob.glob("/dev/accel[0-9]*")
                or glob.glob("/dev/vfio/[0-9]*"))


def cmd_train(args) -> None:
    from llama_jax.experiment import load_config
    from llama_jax.run import train_and_evaluate

    config = load_config(args.config, args.overrides)
    _init_distributed(args)
    result = train_and_evaluate(config, args.workdir, resume_from=args.resume_from)
    last = next((r for r in reversed(result.logged) if "loss" in r), None)
    if last:
        print(f"step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_second']:,.0f} tokens/s, "
              f"MFU {last['mfu']:.1%}; metrics in {args.workdir}/metrics.jsonl")


def cmd_export(args) -> None:
    from llama_jax import param_count
    from llama_jax.run import export_model

    path, step, model = export_model(args.workdir, args.dst, args.step, args.overwrite)
    print(f"exported step {step} of {args.workdir} ({param_count(model):,} parameters) to {path}; "
          f"llama-jax convert --from jax --to hf {path} DST makes a Hugging Face checkpoint of it")


def cmd_plan(args) -> None:
    import os

    if args.devices:  # virtual CPU devices; must be set before JAX initialises its backends
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    from llama_jax.experiment import load_config
    from llama_jax.plan import plan, format_plan

    config = load_config(args.config, args.overrides)
    print(format_plan(plan(config)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-jax", description="LLaMA models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list model presets with their parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("convert", help="convert weights between hf, meta and jax checkpoints")
    add_convert_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train a model from an experiment config")
    p.add_argument("--config", required=True, help="Python config file with get_config(), or a run's "
                   "config.json; override any key as --config.section.key=value")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, logs; "
                   "rerunning with the same one resumes from its latest checkpoint")
    p.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="continue from this committed checkpoint instead of the latest (e.g. the intact one "
                        "before a damaged step); later checkpoints are moved to WORKDIR/checkpoints-set-aside/")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue prompts with a model directory (KV-cache decoding)")
    p.add_argument("model", help="a llama_jax model directory (convert --to jax, or export)")
    p.add_argument("--prompt", action="append", required=True,
                   help="text to continue; repeat for a batch of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=finite_float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=finite_float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in the model directory)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a training run's checkpoint as a model directory (--from jax)")
    p.add_argument("--workdir", required=True, help="the run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("dst", help="model directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="compile the train step ahead of time; report per-device memory and FLOPs")
    p.add_argument("--config", required=True)
    p.add_argument("--devices", type=int, default=None, help="plan for N virtual CPU devices")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="train, checkpoint, evaluate and sample a small LLaMA on a built-in corpus")
    p.add_argument("--workdir", default="runs/demo", help="run directory (resumes if it holds checkpoints)")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_library_noise() -> None:
    """Keep stderr to the command's own lines.

    Orbax's notices (absl logging) are not for the command line. When a damaged checkpoint fails
    one read, Orbax gives up while TensorStore still completes the others on background threads,
    which then hit a closed event loop and print tracebacks of their own; the failure itself is
    reported once, as the command's error line.
    """
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Future exception was never retrieved"

    def orphaned(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda kind, error, tb: None if orphaned(error) else excepthook(kind, error, tb)
    sys.unraisablehook = lambda u: None if orphaned(u.exc_value) or type(u.object).__name__ == "coroutine" \
        else unraisablehook(u)


def main(argv: list[str] | None = None) -> int:
    _quiet_library_noise()
    try:
        rest, overrides = _split_config_overrides(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"llama-jax: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    try:
        args.func(args)
    except (UserError, ValueError, OSError) as e:  # OSError: paths that cannot be read or written
        print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
