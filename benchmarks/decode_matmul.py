"""The matrix products of one decoded token on their own: what any CPU decoder of this model pays.

One decode step multiplies a [batch, in] activation by every projection of every layer in turn
(q, k, v, o, gate, up, down; the layer shapes of `decode.py`'s model), each product feeding the
next. This times that chain, nothing else, for each batch size: in XLA with its default CPU
library (YNNPACK, or Eigen for a single row), in XLA with the other libraries its CPU backend can
hand products to, in XLA with the process held to one core, and in PyTorch, side by side in one
run. Each also times one product of each batch size with a 256 MiB matrix of random values
(batch 1: the matrix-vector product whose weight-streaming rate `decode.py`'s roofline is built
on). It shows how far a decoder can go on this machine: whether the layers' small products
stream their weights as fast as one large product of the same batch does (on a multi-core
machine a large product is split over the cores; a 1-3 MiB one may not be), and what a batch of
rows costs per weight byte even on a large matrix: batch 8 costs 1.3-2 x batch 1 in every
library on the machines measured so far, because general matrix products re-pack the weights on
each call. One more XLA row
keeps the activations feature-major ([in, batch], each product `w @ x` with the weight stored
[out, in], as PyTorch's `nn.Linear` stores it): the same products with the weight as the left
operand and no transposes between them.

    python benchmarks/decode_matmul.py [--batch 1 8] [--repeats 7]

Reported: milliseconds per step (median over repeats of 50 steps) and the weight bytes read per
second, and the large products' GB/s; a library whose XLA option this jaxlib does not know is
reported as failed, with XLA's error, and one whose option it accepts without using it (the
chain's values bit for bit those of the Eigen row, which runs without the option) is marked so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

import numpy as np

from llama_jax.cli import OneLineParser, positive_int
from timing import median_seconds

EIGEN = "xla, Eigen"  # XLA's own products: the YNNPACK fusion off, no other library asked for
# XLA_FLAGS for each CPU matrix-product library (the products of a single row go to Eigen in
# all), whether the process is held to one core, and whether activations are feature-major
LIBRARIES = {
    "xla (default: YNNPACK)": ("", False, False),
    EIGEN: ("--xla_cpu_experimental_ynn_fusion_type=", False, False),
    "xla, XNNPACK": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=true", False, False),
    "xla, oneDNN": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true", False, False),
    "xla (default), one core": ("", True, False),
    "xla (default), feature-major: w [out, in] @ x [in, batch]": ("", False, True),
}
STREAM_SHAPE = (8192, 8192)  # float32: 256 MiB, far larger than the caches


def shapes(dim: int, ffn: int) -> list[tuple[int, int]]:
    return [(dim, dim)] * 4 + [(dim, ffn)] * 2 + [(ffn, dim)]  # q, k, v, o, gate, up, down


def time_xla(batches, layers, dim, ffn, repeats, feature_major: bool = False) -> dict:
    """Seconds per step of the chain at each batch size; under "stream<batch>", seconds per
    product of that batch with a STREAM_SHAPE matrix; under "values<batch>", a hash of the
    chain's output, by which two processes that ran the same library are told apart from two that
    did not. feature_major: activations [features, batch], weights [out, in]."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    weights = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.03) for s in shapes(dim, ffn)]
               for _ in range(layers)]
    if feature_major:
        weights = [[w.T.copy() for w in layer] for layer in weights]

    @jax.jit
    def step_batch_major(x, weights):
        for layer in weights:
            for w in layer:
                n_in = w.shape[0]
                xi = x if n_in == dim else jnp.tile(x, (1, -(-n_in // dim)))[:, :n_in]
                x = jnp.tanh((xi @ w)[:, :dim]) * 0.5 + x
        return x

    @jax.jit
    def step_feature_major(x, weights):
        for layer in weights:
            for w in layer:
                n_in = w.shape[1]
                xi = x if n_in == dim else jnp.tile(x, (-(-n_in // dim), 1))[:n_in]
                x = jnp.tanh((w @ xi)[:dim]) * 0.5 + x
        return x

    step = step_feature_major if feature_major else step_batch_major
    result = {}
    for batch in batches:
        x = jnp.asarray(rng.standard_normal((batch, dim), np.float32))
        x = x.T.copy() if feature_major else x
        result[f"values{batch}"] = hashlib.sha256(np.asarray(step(x, weights)).tobytes()).hexdigest()[:16]
        result[batch] = median_seconds(lambda: [step(x, weights) for _ in range(50)][-1].block_until_ready(),
                                       repeats) / 50
    big = jax.random.normal(jax.random.key(0), STREAM_SHAPE, jnp.float32)
    product = jax.jit(lambda m, x: x @ m if x.ndim == 2 and not feature_major else m @ x)
    for batch in batches:  # batch 1: a vector, the matrix-vector product of `decode.py`'s streaming rate
        shape = (STREAM_SHAPE[1],) if batch == 1 else (STREAM_SHAPE[1], batch) if feature_major else \
            (batch, STREAM_SHAPE[0])
        x = jnp.ones(shape, jnp.float32)
        result[f"stream{batch}"] = median_seconds(lambda: product(big, x).block_until_ready(), repeats * 4, warmup=2)
    return result


def time_torch(batches, layers, dim, ffn, repeats) -> dict[int, float]:
    import torch

    rng = np.random.default_rng(0)
    weights = [[torch.from_numpy(np.ascontiguousarray((rng.standard_normal(s, np.float32) * 0.03).T))
                for s in shapes(dim, ffn)] for _ in range(layers)]  # nn.Linear's [out, in]

    def step(x):
        for layer in weights:
            for w in layer:
                n_in = w.shape[1]
                xi = x if n_in == dim else x.repeat(1, -(-n_in // dim))[:, :n_in]
                x = torch.tanh(torch.nn.functional.linear(xi, w)[:, :dim]) * 0.5 + x
        return x

    result = {}
    with torch.no_grad():
        for batch in batches:
            x = torch.from_numpy(rng.standard_normal((batch, dim), np.float32))
            result[batch] = median_seconds(lambda: [step(x) for _ in range(50)], repeats) / 50
        big = torch.randn(*STREAM_SHAPE)  # [out, in], as the chain's weights
        for batch in batches:  # batch 1: a vector, as in the XLA rows
            x = torch.ones(STREAM_SHAPE[1]) if batch == 1 else torch.ones(batch, STREAM_SHAPE[1])
            result[f"stream{batch}"] = median_seconds(lambda: torch.nn.functional.linear(x, big), repeats * 4,
                                                      warmup=2)
    return result


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--ffn", type=positive_int, default=1408)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one library (XLA_FLAGS), timed
    parser.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)  # the child, on one core
    parser.add_argument("--feature-major", action="store_true", help=argparse.SUPPRESS)  # the child's layout
    args = parser.parse_args(argv)
    sizes = (args.batch, args.layers, args.dim, args.ffn, args.repeats)
    if args.child:
        if args.one_core:  # before JAX starts its threads, which inherit it
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(" ".join(f"{b}:{s!r}" for b, s in time_xla(*sizes, feature_major=args.feature_major).items()))
        return 0

    weight_bytes = 4 * args.layers * sum(a * b for a, b in shapes(args.dim, args.ffn))
    rows = {}
    for name, (flags, one_core, feature_major) in LIBRARIES.items():  # XLA_FLAGS apply per process
        env = {**os.environ, "XLA_FLAGS": flags}
        child = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--child",
                                *(["--one-core"] if one_core else []),
                                *(["--feature-major"] if feature_major else [])],
                               env=env, capture_output=True, text=True)
        if child.returncode:  # e.g. a jaxlib that does not know the option
            rows[name] = (child.stderr.strip().splitlines() or ["no output"])[-1]
            continue
        rows[name] = {(int(b) if b.isdigit() else b): (s if b.startswith("values") else float(s))
                      for b, s in (pair.split(":") for pair in child.stdout.split())}
    import torch

    rows[f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"] = time_torch(*sizes)
    print(f"{args.layers} layers x 7 projections, dim {args.dim}, FFN {args.ffn}: "
          f"{weight_bytes / 2**20:.0f} MiB of float32 weights per step")
    stream_bytes = 4 * STREAM_SHAPE[0] * STREAM_SHAPE[1]
    print("| library | " + " | ".join(f"batch {b}: ms per step (GB/s)" for b in args.batch)
          + " | " + " | ".join(f"one 256 MiB weight, batch {b}: GB/s" for b in args.batch) + " |")
    print("|---|" + "---|" * (2 * len(args.batch)))
    for name, times in rows.items():
        if isinstance(times, str):
            print(f"| {name} | failed: {times} |")
            continue
        cells = [f"{times[b] * 1e3:.2f} ({weight_bytes / times[b] / 1e9:.1f})" for b in args.batch]
        cells += [f"{stream_bytes / times[f'stream{b}'] / 1e9:.1f}" for b in args.batch]
        print(f"| {name}{_same_values_note(name, rows, args.batch)} | " + " | ".join(cells) + " |")
    return 0


def _same_values_note(name: str, rows: dict, batches) -> str:
    """For a row whose option comes on top of the Eigen row's flags (XNNPACK, oneDNN) and whose
    chain gave bit for bit the Eigen row's values at every batch size: the option was not used."""
    eigen_flags, (flags, *_) = LIBRARIES[EIGEN][0], LIBRARIES.get(name, ("",))
    eigen = rows.get(EIGEN)
    if name == EIGEN or not flags.startswith(eigen_flags) or not isinstance(eigen, dict):
        return ""
    if all(eigen[f"values{b}"] == rows[name][f"values{b}"] for b in batches):
        return f" (the same values as {EIGEN}, bit for bit: the option has no effect in this jaxlib)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
