"""The matrix products of one training step on their own, XLA against PyTorch.

Every projection of `train_step.py`'s model makes three products per step: the forward one
(x @ w), the input gradient (dy @ w.T) and the weight gradient (x.T @ dy, contracting the token
axis). This times each distinct product alone, at the step's shapes (8 x 256 tokens; q, k, v and
o are [512, 512], gate and up [512, 1408], down [1408, 512], the output projection [512, 8000]):
jitted in XLA with the options `llama-jax` compiles its train step with
(`llama_jax.backend_tuning`), and in PyTorch as autograd runs them for `nn.Linear`
(`torch.matmul` on transposed views, no copies). Both run in one process, product by product: for
each product one library, then the other (the order alternating by round), each an untimed call
and then the median of `--repeats` calls. (Run as one process per library instead, the ratio
depended on which library's process ran first in a round, 0.75-0.80 one way and 0.95-1.08 the
other, on this VM.) Like `llama-jax`, the script first restarts itself with glibc's huge-page
tunable where it applies.

It bounds what the train step can reach against PyTorch on this machine: summed over one step
(each product times how often the step makes it), the products alone take the reported time in
each library, and for the step to match PyTorch's, the rest of it (attention, norms, the loss,
the optimizer) would have to take that much less time than the rest of PyTorch's step.
Attention's batched products are left out (`train_step.py`'s README section compares attention
with PyTorch's `scaled_dot_product_attention`).

    python benchmarks/train_matmul.py [--rounds 5] [--repeats 10]

Reported: GFLOP/s of each product in each library and XLA's rate over PyTorch's (medians over the
rounds of each round's figures), then milliseconds per step of all the products together and
the ratio of the two, by round.
"""

from __future__ import annotations

import statistics
import sys

import numpy as np

from llama_jax.cli import OneLineParser, positive_int
from timing import median_seconds

FORMS = ("x @ w", "dy @ w.T", "x.T @ dy")  # forward, input gradient, weight gradient


def products(tokens: int, dim: int, ffn: int, vocab: int) -> list[tuple[str, str, int, int, int]]:
    """(name, form, tokens, in, out) of each distinct product; `counts` says how many of each a
    step makes."""
    kernels = [("q, k, v, o", dim, dim), ("gate, up", dim, ffn), ("down", ffn, dim), ("output", dim, vocab)]
    return [(name, form, tokens, n_in, n_out) for name, n_in, n_out in kernels for form in FORMS]


def counts(layers: int) -> dict[str, int]:
    return {"q, k, v, o": 4 * layers, "gate, up": 2 * layers, "down": layers, "output": 1}


def operands(form: str, tokens: int, n_in: int, n_out: int, rng) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((tokens, n_in), np.float32)
    w = rng.standard_normal((n_in, n_out), np.float32) * 0.03
    dy = rng.standard_normal((tokens, n_out), np.float32)
    return {"x @ w": (x, w), "dy @ w.T": (dy, w), "x.T @ dy": (x, dy)}[form]


def apply(form: str, a, b):
    return {"x @ w": lambda: a @ b, "dy @ w.T": lambda: a @ b.T, "x.T @ dy": lambda: a.T @ b}[form]()


def product_calls(shapes) -> dict[str, list]:
    """For each library, a call per product in `shapes` that runs it once and waits for it."""
    import jax
    import jax.numpy as jnp
    import torch

    from llama_jax import backend_tuning

    options = backend_tuning.compiler_options("cpu")
    rng = np.random.default_rng(0)
    calls = {"xla": [], "torch": []}
    for _, form, *sizes in shapes:
        a, b = operands(form, *sizes, rng)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        product = jax.jit(lambda a, b, form=form: apply(form, a, b), compiler_options=options)
        calls["xla"].append(lambda product=product, a=ja, b=jb: product(a, b).block_until_ready())
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        calls["torch"].append(lambda form=form, a=ta, b=tb: apply(form, a, b))
    return calls


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=8 * 256)
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--ffn", type=positive_int, default=1408)
    parser.add_argument("--vocab", type=positive_int, default=8000)
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--repeats", type=positive_int, default=10)
    args = parser.parse_args(argv)
    shapes = products(args.tokens, args.dim, args.ffn, args.vocab)

    import torch

    calls = product_calls(shapes)
    libraries = ("xla", "torch")
    seconds = {lib: [] for lib in libraries}  # per round: seconds of each product
    with torch.no_grad():
        for r in range(args.rounds):
            for lib in libraries:
                seconds[lib].append([])
            for i in range(len(shapes)):
                for lib in libraries if r % 2 == 0 else libraries[::-1]:  # the first call compiles / warms up
                    seconds[lib][-1].append(median_seconds(calls[lib][i], args.repeats))
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr, flush=True)

    import jax

    n = counts(args.layers)
    flops = [2 * tokens * n_in * n_out for _, _, tokens, n_in, n_out in shapes]
    print(f"{args.tokens} tokens, dim {args.dim}, FFN {args.ffn}, vocab {args.vocab}, {args.layers} layers; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{args.rounds} rounds, median of {args.repeats} calls each")
    print("| kernel | product | per step | XLA GFLOP/s | PyTorch GFLOP/s | XLA ÷ PyTorch |")
    print("|---|---|---|---|---|---|")
    for i, (name, form, *_) in enumerate(shapes):
        rate = {lib: [flops[i] / s[i] / 1e9 for s in seconds[lib]] for lib in libraries}
        ratio = statistics.median(a / b for a, b in zip(rate["xla"], rate["torch"]))
        print(f"| {name} | `{form}` | {n[name]} | {statistics.median(rate['xla']):.0f} | "
              f"{statistics.median(rate['torch']):.0f} | {ratio:.2f} |")
    step = {lib: [sum(n[name] * t for (name, *_), t in zip(shapes, s)) for s in seconds[lib]] for lib in libraries}
    step_flops = sum(n[name] * f for (name, *_), f in zip(shapes, flops))
    ratios = [b / a for a, b in zip(step["xla"], step["torch"])]
    print(f"\nAll {sum(n.values()) * 3} products of a step, {step_flops / 1e9:.0f} GFLOP: XLA "
          f"{statistics.median(step['xla']) * 1e3:.0f} ms, PyTorch {statistics.median(step['torch']) * 1e3:.0f} ms; "
          f"XLA's speed ÷ PyTorch's {statistics.median(ratios):.2f} (median of the rounds' ratios: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    from llama_jax.backend_tuning import restart_with_huge_pages

    restart_with_huge_pages()  # as `llama-jax` does
    sys.exit(main())
