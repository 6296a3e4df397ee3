"""Greedy decoding speed: llama-jax `generate` against transformers `generate`, side by side.

Both decode the same random model (float32; default dim 512, 8 layers, 8 heads, FFN 1408, vocab
8000) from the same 16-token prompts, greedily, for a fixed number of new tokens (EOS disabled),
at each batch size. The run also measures the machine's weight-streaming rate (an XLA
matrix-vector product over a matrix much larger than the caches), from which each batch's roofline
follows: one decoding step of a batch of B rows reads every weight once (of the input embedding
table, B rows) and each row's whole K/V cache (prompt + new tokens slots: llama-jax attends over
all of them, the empty ones masked), so tokens/s <= B x rate / (weights + B x cache). The run
also says what the target for batches above one, 3 x transformers, would be as a fraction of it.
For a batch above one it also times a product of B rows with that matrix: XLA's products of a
few rows read the weights slower than a matrix-vector product does (`decode_matmul.py`), which
bounds a step more tightly (the weights at the B-row product's rate, the cache at the streaming
rate): "x product bound".

    python benchmarks/decode.py [--batch 1 8] [--new-tokens 128] [--repeats 5] [--scan both]

Reported: tokens/s (batch x new tokens / seconds, median of the repeats after one warm-up call
that includes compilation, whose time is reported apart), and the ratios of those medians to
transformers' median and to the roofline of the median streaming rate (ratios of medians, not, as
`train_step.py` reports, medians of each round's ratios). Each repeat is a round that measures
the streaming rate and calls every implementation in turn (a timed call after an untimed one: the
first call after other work finds the weights out of the caches, and the streaming rate it is
compared with is measured warm too), so that the machine's slow spells (this kind of VM has them)
fall on all of them alike and the ratios stay comparable. The two implementations' greedy tokens
are compared too (the share identical is reported; they match unless a near tie in the logits
rounds differently): where they differ, the script says so on stderr and exits with status 1.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from llama_jax.cli import OneLineParser, positive_int
from timing import median_seconds


def streaming_sampler(rows: int | None = None) -> Callable[[], float]:
    """A function giving the bytes per second of an XLA float32 matrix-vector product over a
    256 MiB matrix of random values (or, given `rows`, of a [rows, 8192] by [8192, 8192] product, as
    a batch of rows meets a weight): the median of 8 products after 2 untimed ones. (On this kind
    of VM the first pass over memory that other work has left untouched is several times slower,
    as is a model's first decoded token; the roofline is about the steady state.)"""
    import jax
    import jax.numpy as jnp

    m = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.float32)
    x = jnp.ones((8192,) if rows is None else (rows, 8192), jnp.float32)
    product = jax.jit(lambda m, x: m @ x if x.ndim == 1 else x @ m)
    return lambda: m.nbytes / median_seconds(lambda: product(m, x).block_until_ready(), 8, warmup=2)


def bytes_per_token(cfg, params, slots: int) -> dict[str, int]:
    """What one decoded token of a batch of one reads, from which each batch's roofline follows:
    "weights", every weight once, except the input embedding table, of which it reads one row
    (unless the table is the tied output projection too), and "kv_cache", the keys and values of
    every layer over all `slots` of the cache (prompt + new tokens), in the compute dtype: llama-jax
    attends over the whole cache each step, its empty slots masked (`llama_jax.attention.cache_block`)."""
    import jax
    import jax.numpy as jnp

    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:
        table = params["embed"]["embedding"]
        weights -= (table.shape[0] - 1) * table.shape[1] * table.dtype.itemsize
    kv_cache = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * slots * jnp.dtype(cfg.dtype).itemsize
    return {"weights": weights, "kv_cache": kv_cache}


def layout_params(base, params, layouts: list[bool]) -> dict[str, tuple]:
    """Row name ("scanned", "unscanned") -> (config, params) for each llama-jax layout. `generate`
    decodes in the layout of the params it is given (stacked under "layers", or one tree per
    layer), not the one the config's `scan_layers` names, so each row gets params in its own layout:
    given the stacked ones, the unscanned row would time the scanned path again."""
    import jax

    from llama_jax.model import params_in_layout

    rows = {}
    for scan in layouts:
        cfg = base.replace(scan_layers=scan)  # on the device, as `load_model` gives them (not NumPy's host arrays)
        rows["scanned" if scan else "unscanned"] = cfg, jax.device_put(params_in_layout(cfg, params))
    return rows


def check_heads(parser, dim: int, heads: int) -> None:
    """One line, before any work, for a head count the model cannot have."""
    if dim % heads:
        parser.error(f"--heads {heads} does not divide --dim {dim}; give a head count that divides it")
    if dim // heads % 2:
        parser.error(f"--dim {dim} / --heads {heads} = head dim {dim // heads} is odd; rotary embeddings need "
                     f"an even head dim")


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--ffn", type=positive_int, default=1408)
    parser.add_argument("--vocab", type=positive_int, default=8000)
    parser.add_argument("--prompt-len", type=positive_int, default=16)
    parser.add_argument("--new-tokens", type=positive_int, default=128)
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--scan", choices=["yes", "no", "both"], default="both",
                        help="llama-jax layer layout: scanned, unscanned or both")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    check_heads(parser, args.dim, args.heads)

    import jax
    import torch
    import transformers

    from llama_jax.config import LLaMAConfig, to_hf_config
    from llama_jax.convert.hf import from_hf_state_dict
    from llama_jax.generate import generate

    torch.manual_seed(0)
    shape = LLaMAConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                        n_kv_heads=args.heads, ffn_dim=args.ffn, max_seq_len=args.prompt_len + args.new_tokens)
    hf_config = to_hf_config(shape)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    base, params = from_hf_state_dict(hf.state_dict(), hf_config)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    read = bytes_per_token(base, params, args.prompt_len + args.new_tokens)
    streamed_bytes = read["weights"] + read["kv_cache"]
    streaming = streaming_sampler()
    print(f"machine: {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} torch threads")
    print(f"model: {weight_bytes / 2**20:.0f} MiB of float32 weights; read per decoded token at batch 1: "
          f"{read['weights'] / 2**20:.0f} MiB of weights + {read['kv_cache'] / 2**20:.1f} MiB of K/V cache")

    layouts = {"yes": [True], "no": [False], "both": [True, False]}[args.scan]
    llama_jax_rows = layout_params(base, params, layouts)
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        prompts = rng.integers(3, args.vocab, (batch, args.prompt_len))
        n = batch * args.new_tokens
        ids = torch.from_numpy(prompts)

        def hf_call():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

        calls, first, tokens = {"transformers": hf_call}, {}, {}
        for name, (cfg, layout) in llama_jax_rows.items():
            calls[name] = lambda cfg=cfg, layout=layout: generate(cfg, layout, prompts.tolist(), args.new_tokens)
        for name, call in calls.items():  # first calls: compilation, and the tokens to compare
            start = time.perf_counter()
            out = call()
            first[name] = time.perf_counter() - start
            tokens[name] = out[:, args.prompt_len:].numpy() if name == "transformers" else np.asarray(out)
        batch_product = streaming_sampler(batch) if batch > 1 else None  # batch 1: the streaming rate
        times, rates, product_rates = {name: [] for name in calls}, [], []
        for _ in range(args.repeats):  # rounds: each implementation and the streaming rates in turn
            rates.append(streaming())
            product_rates.append(batch_product() if batch_product else rates[-1])
            for name, call in calls.items():  # a call after an untimed one, as the streaming rate is warm
                times[name].append(median_seconds(call, 1, warmup=1))
        seconds = {name: statistics.median(t) for name, t in times.items()}
        rate, product_rate = statistics.median(rates), statistics.median(product_rates)
        roofline = batch * rate / (read["weights"] + batch * read["kv_cache"])  # embedding rows: noise
        bound = batch / (read["weights"] / product_rate + batch * read["kv_cache"] / rate)
        row = {"batch": batch, "streaming_bytes_per_s": rate, "roofline_tok_s": roofline,
               "product_bytes_per_s": product_rate, "product_bound_tok_s": bound,
               "transformers_tok_s": n / seconds["transformers"], "transformers_first_call_s": first["transformers"]}
        for key in [k for k in calls if k != "transformers"]:
            row[f"{key}_tok_s"] = n / seconds[key]
            row[f"{key}_compile_and_first_call_s"] = first[key]
            row[f"{key}_vs_transformers"] = seconds["transformers"] / seconds[key]
            row[f"{key}_same_tokens"] = float((tokens[key] == tokens["transformers"]).mean())
            row[f"{key}_vs_roofline"] = (n / seconds[key]) / roofline
            row[f"{key}_vs_product_bound"] = (n / seconds[key]) / bound
        rows.append(row)
        print(json.dumps(row))
        target = (f"; 3 x transformers would be {3 * row['transformers_tok_s'] / roofline:.2f} x the roofline and "
                  f"{3 * row['transformers_tok_s'] / bound:.2f} x the bound of {batch}-row products "
                  f"({product_rate / 1e9:.1f} GB/s: {bound:.0f} tokens/s)" if batch > 1 else "")
        print(f"weight streaming {rate / 1e9:.1f} GB/s in the same rounds -> batch-{batch} roofline {roofline:.0f} "
              f"tokens/s ({batch * rate / read['weights']:.0f} counting the weights only){target}")

    print("\n| batch | layout | llama-jax tok/s | transformers tok/s | × transformers | × roofline "
          "| × product bound | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for scan in layouts:
            key = "scanned" if scan else "unscanned"
            print(f"| {row['batch']} | {key} | {row[f'{key}_tok_s']:.0f} | {row['transformers_tok_s']:.0f} | "
                  f"{row[f'{key}_vs_transformers']:.2f} | {row[f'{key}_vs_roofline']:.2f} | "
                  f"{row[f'{key}_vs_product_bound']:.2f} | {row[f'{key}_same_tokens']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"weight_bytes": weight_bytes, "streamed_bytes": streamed_bytes, "streamed_weight_bytes":
                       read["weights"], "kv_cache_bytes": read["kv_cache"], "rows": rows}, f, indent=1)
    differ = [f"batch {row['batch']} {key} {row[f'{key}_same_tokens']:.0%}" for row in rows
              for key in llama_jax_rows if row[f"{key}_same_tokens"] < 1]
    if differ:  # the figures stand, but they time two different decodings
        print(f"decode.py: greedy tokens differ from transformers' (share the same: {', '.join(differ)}): a near "
              f"tie in the logits, or a decoding bug", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
