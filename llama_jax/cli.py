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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-jax", description="LLaMA models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list model presets with their parameter counts")
    p.set_defaults(func=cmd_presets)

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
