"""The `llama-jax` command: parse, call the package, report. User errors exit with one line."""

from __future__ import annotations

import argparse
import sys
import time


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
    import jax
    import numpy as np

    from llama_jax import LLaMA, LLaMAConfig, init_params, param_count

    cfg = LLaMAConfig.from_preset(args.preset)
    print(f"preset {args.preset}: {param_count(cfg):,} parameters "
          f"(dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads)")
    t0 = time.perf_counter()
    params = init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64)).astype(np.int32)
    logits = jax.jit(LLaMA(cfg).apply)({"params": params}, tokens)
    logits.block_until_ready()
    print(f"forward pass on {tokens.shape} tokens -> logits {tuple(logits.shape)} {logits.dtype} "
          f"in {time.perf_counter() - t0:.1f}s on {jax.devices()[0].platform}; "
          f"mean log-prob of a random token {float(jax.nn.log_softmax(logits).mean()):.3f} "
          f"(uniform: {-np.log(cfg.vocab_size):.3f})")


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
    p.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="LLaMA-3 rope scaling factor for Meta checkpoints with use_scaled_rope "
                        "(default: params.json's rope_scaling_factor, else 8; LLaMA-3.2 1B/3B use 32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-jax", description="LLaMA models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list model presets with their parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("convert", help="convert weights between hf, meta and jax checkpoints")
    add_convert_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="the project's main job on a small model")
    p.add_argument("--preset", default="tiny")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
