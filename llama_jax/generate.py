"""Autoregressive text generation with a KV cache: greedy, temperature, top-k and nucleus sampling.

Prompts of different lengths are left-padded to a common length P: pad slots get segment id 0,
so no real token attends to them, and rotary positions count from 0 at each prompt's first real
token. Two compiled functions do the work: `_prefill` runs all P slots into a fresh cache and
picks each row's first token; `_decode` continues for up to `chunk` tokens in a `lax.while_loop`
(one token per row per iteration, no per-step dispatch or host sync, early exit once every row
has emitted EOS) and hands back its state, cache included, so decoding resumes where it stopped.
`generate` makes one `_decode` call, or one per chunk when a caller watches the tokens as they
come (streaming, stop strings). Sampling settings are traced values, so changing temperature,
top-k, top-p, seed or EOS reuses the compiled code; a new batch size, prompt length,
`max_new_tokens` or chunk compiles again.

Decoding is memory-bound, so the loop is arranged to read each weight and the K/V cache about
once per token:
- the layers are unrolled: scanned (stacked) params are split into per-layer arrays once per
  call (`decoding_params`), because a scan over stacked weights slices (copies) every
  layer's weights on every step; this holds a second copy of the weights while decoding, as
  decoding from an unscanned checkpoint would. Callers that generate many times from the same
  weights split them once with `decoding_params` and pass the result;
- a batch of one on one device reads each layer's q, k and v weights with one matrix-vector
  product: `decoding_params` joins the three kernels into one;
- every layer writes its new keys and values into its own cache arrays in place (`KVCache`;
  slicing a layer out of one stacked cache copied it on every token), and attends over the whole
  of them at once (`llama_jax.attention.cache_block`: a block of the filled part would be a
  slice, which XLA's CPU backend copies first);
- greedy decoding draws no random numbers (and picks with plain reductions, not argmax's
  paired one), and nothing sorts the vocabulary unless top-k or top-p filters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import backend_tuning
from llama_jax.config import LLaMAConfig, check_model_config, check_sample_filters, check_sampling, is_int, is_traced
from llama_jax.model import KVCache, LLaMA, check_params_as_laid_out, join_qkv, unstack_layers
from llama_jax.sharding import ambient_mesh, check_divisible, mesh_context
from llama_jax.tokenizer import Tokenizer

Array = jax.Array


def sample_logits(logits_BxV: Array, key: Array, temperature: Array | float = 1.0,
                  top_k: Array | int | None = None, top_p: Array | float | None = 1.0) -> Array:
    """One token id per row [B]: argmax when temperature is 0, else a draw from the filtered softmax.

    Filters apply in Hugging Face's order: temperature, then top-k (the k most likely tokens and
    any tied with the k-th, as transformers keeps), then top-p over what top-k kept (the smallest
    set of most likely tokens whose probability reaches `top_p`; the most likely token always
    stays; tokens tied with the last one kept stay too).
    Only the work the settings need is done: greedy decoding draws no random numbers, and the
    vocabulary is sorted only when top-k or top-p filters.
    Settings out of range are refused (`config.check_sample_filters`), except traced ones, taken as
    they are: a top_p that float32 rounds to 0 (`generate` checked it as given) keeps the most
    likely token. The settings are traced values (float32 and int32), so calling it again with
    others reuses the compiled code (once per shape of the logits).
    """
    if getattr(logits_BxV, "ndim", None) != 2:
        raise ValueError(f"logits must be an array [batch, vocab], got shape {getattr(logits_BxV, 'shape', None)}")
    check_sample_filters(temperature, top_k, top_p)
    V = logits_BxV.shape[-1]
    top_k = V if top_k is None else top_k if is_traced(top_k) else min(int(top_k), V)  # (int32)
    top_p = 1.0 if top_p is None else top_p  # None: no filter, as in `generate`
    return _sample(logits_BxV, key, jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                   jnp.asarray(top_p, jnp.float32))


@jax.jit
def _sample(logits_BxV: Array, key: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """`sample_logits` of checked settings, compiled: its branches, traced anew on every call outside
    jit, compiled again each time (1.5 s a call for 256 logits on CPU)."""
    logits = logits_BxV.astype(jnp.float32)
    V = logits.shape[-1]

    def draw(logits):  # (the best logit at 0 first: a tiny temperature then sends the others to -inf, where
        # dividing the logits themselves made every positive one +inf, and the first of them was drawn)
        scaled = (logits - logits.max(axis=-1, keepdims=True)) / temperature
        scaled = jax.lax.cond((top_k < V) | (top_p < 1.0), lambda x: _filtered(x, top_k, top_p), lambda x: x,
                              scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def greedy(logits):  # argmax's first index of the maximum (of a NaN, if any), as plain reductions:
        # XLA's CPU backend runs argmax's paired (value, index) reduction unvectorized (157 us per
        # batch-8 step over 8,000 logits; these: 59 us). (Its max of 4,096 or more values may drop
        # a NaN, so NaNs are looked for apart.)
        nan = jnp.isnan(logits)
        at_best = jnp.where(nan.any(axis=-1, keepdims=True), nan, logits == logits.max(axis=-1, keepdims=True))
        return jnp.min(jnp.where(at_best, jnp.arange(V, dtype=jnp.int32), V), axis=-1)

    return jax.lax.cond(temperature > 0, draw, greedy, logits)


def _filtered(scaled_BxV: Array, top_k: Array | int, top_p: Array | float) -> Array:
    """`scaled_BxV` with -inf for the tokens top-k and then top-p remove (`sample_logits`)."""
    V = scaled_BxV.shape[-1]
    sorted_desc = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    kth = jax.lax.dynamic_index_in_dim(sorted_desc, jnp.minimum(top_k, V) - 1, axis=1)  # [B, 1]
    in_top_k = sorted_desc >= kth  # the k most likely and those tied with the k-th, as transformers keeps
    sorted_desc = jnp.where(in_top_k, sorted_desc, -jnp.inf)  # top-p's mass is over all of them
    probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
    # each token's mass with that of every less likely one, summed from the least likely up, as transformers
    # sums it: summed from the most likely down, float32 lost 1e-5 of the mass over 32,000 tokens
    mass_from = jax.lax.cumsum(probs_sorted, axis=1, reverse=True)
    most_likely = jnp.arange(V) == 0  # kept even where top_p is 0 in float32 (1e-300)
    keep = in_top_k & ((mass_from > 1.0 - top_p) | (top_p >= 1.0) | most_likely)
    smallest_kept = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled_BxV < smallest_kept, -jnp.inf, scaled_BxV)


class _Sampler(NamedTuple):
    """Sampling settings as traced values: changing them reuses the compiled functions."""

    key: Array
    temperature: Array
    top_k: Array
    top_p: Array
    eos_id: Array
    n_tokens: Array

    def pick(self, logits_BxV: Array, step: Array, done_B: Array) -> Array:
        """Token `step` of each row (ids below n_tokens); EOS for rows already done."""
        logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < self.n_tokens, logits_BxV, -jnp.inf)
        tok = sample_logits(logits_BxV, jax.random.fold_in(self.key, step), self.temperature, self.top_k, self.top_p)
        return jnp.where(done_B, self.eos_id, tok)


class _Decoding(NamedTuple):
    """Where decoding stands between calls: the cache, each row's latest token and whether it is
    done, and how many tokens each row has produced."""

    cache: KVCache
    last_B: Array
    done_B: Array
    step: Array


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "mesh"))
def _prefill(params, tokens_BxP: Array, pad_B: Array, sampler: _Sampler, *, cfg: LLaMAConfig, max_len: int,
             mesh=None) -> _Decoding:
    """Run the prompts through the model into a fresh cache of `max_len` slots; pick token 0."""
    B, P = tokens_BxP.shape
    slots_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segment_ids = (slots_BxP >= pad_B[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots_BxP - pad_B[:, None], 0)
    cache = KVCache.create(cfg, B, max_len).constrained(mesh)
    logits, cache = LLaMA(cfg).apply({"params": params}, tokens_BxP, positions=positions, segment_ids=segment_ids,
                                     cache=cache)
    first = sampler.pick(logits[:, -1], jnp.int32(0), jnp.zeros((B,), bool))
    return _Decoding(cache.constrained(mesh), first, first == sampler.eos_id, jnp.int32(1))


def _decode_steps(params, state: _Decoding, pad_B: Array, sampler: _Sampler, limit: Array, *, cfg: LLaMAConfig,
                  chunk: int, mesh=None) -> tuple[_Decoding, Array, Array]:
    """Up to `chunk` more tokens per row [B, chunk], stopping early once every row is done or
    `limit` tokens are produced; also returns how many steps ran. The cache is updated in place."""
    B = pad_B.shape[0]
    model = LLaMA(cfg)

    def cond(carry):
        i, state, _ = carry
        return (i < chunk) & (state.step < limit) & ~jnp.all(state.done_B)

    def body(carry):
        i, state, out = carry
        positions = (state.cache.index - pad_B)[:, None]
        logits, cache = model.apply({"params": params}, state.last_B[:, None], positions=positions,
                                    segment_ids=jnp.ones((B, 1), jnp.int32), cache=state.cache)
        tok = sampler.pick(logits[:, -1], state.step, state.done_B)
        state = _Decoding(cache.constrained(mesh), tok, state.done_B | (tok == sampler.eos_id), state.step + 1)
        return i + 1, state, out.at[:, i].set(tok)

    out = jnp.full((B, chunk), sampler.eos_id, jnp.int32)
    steps, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return state, out, steps


_DECODE_JIT = {"static_argnames": ("cfg", "chunk", "mesh"), "donate_argnums": (1,)}
_decode = jax.jit(_decode_steps, **_DECODE_JIT)


@functools.cache
def _decode_for(platform: str):
    """`_decode` compiled with this project's decoding options for `platform`
    (`llama_jax.backend_tuning`: command buffers on GPU), or as it is where there are none."""
    options = backend_tuning.compiler_options(platform, "decode")
    return jax.jit(_decode_steps, **_DECODE_JIT, compiler_options=options) if options else _decode


def _check_ids(config: LLaMAConfig, eos_id: int | None, n_tokens: int | None) -> None:
    """ValueError unless `eos_id` is an integer below the vocabulary size (a negative one, such as a
    SentencePiece model's -1 for "no EOS", never matches) and `n_tokens` a positive count (or None)."""
    if eos_id is not None and not (is_int(eos_id) and int(eos_id) < config.vocab_size):
        raise ValueError(f"eos_id must be a token id below the vocabulary size {config.vocab_size} or None, "
                         f"got {eos_id!r}")
    if n_tokens is not None and not (is_int(n_tokens) and int(n_tokens) >= 1):
        raise ValueError(f"n_tokens must be a positive integer (only ids below it are produced) or None, "
                         f"got {n_tokens!r}")


def _checked_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """`generate`'s prompts as lists of ints: a list of token-id sequences, or a [batch, length]
    integer array; ValueError for anything else, or ids outside the vocabulary."""
    if hasattr(prompts, "ndim"):  # a numpy or JAX array
        if prompts.ndim != 2:
            raise ValueError(f"prompts: an array must be [batch, length] token ids, got shape {prompts.shape}")
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token-id lists (e.g. [[1, 415, 2936]]), got {prompts!r}")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes, Mapping)) or not hasattr(prompt, "__len__"):
            raise ValueError(f"prompt {i} is {prompt!r}, not a list of token ids; prompts is a list of them, one per "
                             f"row (e.g. [[1, 415, 2936]])")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = next((t for t in prompt if not (is_int(t) and 0 <= int(t) < vocab_size)), None)
        if bad is not None:
            raise ValueError(f"prompt {i} has token id {bad!r}; valid: integers in [0, {vocab_size})")
        checked.append([int(t) for t in prompt])
    return checked


def generate(config: LLaMAConfig, params: Mapping, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None, n_tokens: int | None = None,
             pad_to: int | None = None, mesh: jax.sharding.Mesh | None = None,
             on_tokens: Callable[[list[list[int]]], Sequence[bool]] | None = None,
             chunk: int = 16) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself is not returned).

    Temperature 0 is greedy. `n_tokens`: only ids below it are produced (a tokenizer smaller than
    the model's padded vocabulary; default: the whole vocabulary). A row stops after emitting
    `eos_id`; its result ends with that EOS, as in transformers' `generate`.
    Sampled, a row's tokens depend on `seed` and on the row's place in the batch, not on the other
    prompts: each step draws the whole batch's noise from one key, and row i's comes from the same
    random bits whatever the batch holds (JAX's default, partitionable, threefry bits).
    Params may be scanned or unscanned, whatever `config.scan_layers` says.
    `pad_to`: left-pad the prompts to at least this length, so that batches of prompts of nearby
    lengths share one compiled shape (the results do not depend on it).
    `mesh`: decode sharded over a (data, fsdp, tensor) mesh (`llama_jax.sharding.make_mesh`) with
    the project's logical-axis rules: params are placed as in training (a no-op for params already
    loaded with those shardings, e.g. `load_model(path, shardings=...)` or a trainer's state), the
    activations as in training (in the mesh's `sharding.mesh_context`, unless it is the enclosing
    one), the KV cache split over data x fsdp (batch) and tensor (K/V heads). Default: the mesh of
    an enclosing `with mesh:` such as `trainer.context(...)`, if any.
    `on_tokens`: called with every row's new ids so far, after the first token and then after
    each `chunk` more; it returns one flag per row, true for rows that are finished (e.g. a stop
    string appeared). Finished rows emit EOS from then on (without `eos_id`, they end where they
    finished), and decoding ends once every row is finished or done. Without it, decoding runs in
    one call. The tokens do not depend on `chunk`: every step draws from the same per-step key
    either way.
    """
    check_model_config(config)
    prompts = _checked_prompts(prompts, config.vocab_size)
    if on_tokens is not None and not callable(on_tokens):
        raise TypeError(f"on_tokens must be a function of the rows' new ids (or None), got {on_tokens!r}")
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    _check_ids(config, eos_id, n_tokens)
    if on_tokens is not None and not (is_int(chunk) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer (new tokens between on_tokens calls), got {chunk!r}")
    if pad_to is not None and not (is_int(pad_to) and pad_to >= 0):
        raise ValueError(f"pad_to must be a non-negative integer (a prompt length) or None, got {pad_to!r}")
    max_new_tokens, temperature, seed = int(max_new_tokens), float(temperature), int(seed)
    top_k, top_p, eos_id, n_tokens = (None if v is None else kind(v) for v, kind in
                                      ((top_k, int), (top_p, float), (eos_id, int), (n_tokens, int)))
    eos_id = None if eos_id is not None and eos_id < 0 else eos_id  # (a SentencePiece model's -1: no EOS)
    P = max(max(len(p) for p in prompts), pad_to or 0)
    if P + max_new_tokens > config.max_seq_len:
        what = "longest prompt" if P == max(len(p) for p in prompts) else "pad_to"
        raise ValueError(f"{what} ({P}) + max_new_tokens ({max_new_tokens}) = {P + max_new_tokens} "
                         f"exceeds the model's max_seq_len ({config.max_seq_len})")

    mesh = ambient_mesh() if mesh is None else mesh
    if mesh is not None:
        check_divisible(config, mesh)

    tokens = np.zeros((len(prompts), P), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt):] = prompt
    pad = np.array([P - len(p) for p in prompts], np.int32)
    params = decoding_params(config, params, mesh, batch_size=len(prompts))
    config = config.replace(scan_layers=False)
    sampler = _Sampler(jax.random.key(seed), jnp.float32(temperature),
                       jnp.int32(min(top_k or config.vocab_size, config.vocab_size)), jnp.float32(top_p or 1.0),
                       jnp.int32(-1 if eos_id is None else eos_id),
                       jnp.int32(min(n_tokens or config.vocab_size, config.vocab_size)))

    with _on_mesh(mesh):
        state = _prefill(params, tokens, pad, sampler, cfg=config, max_len=P + max_new_tokens, mesh=mesh)
    decode = _decode_for(jax.default_backend() if mesh is None else mesh.devices.flat[0].platform)
    rows = [[t] for t in np.asarray(state.last_B).tolist()]
    chunk = max_new_tokens - 1 if on_tokens is None else min(chunk, max_new_tokens - 1)
    finished_at: list[int | None] = [None] * len(rows)  # each row's length when on_tokens finished it
    finished = np.zeros(len(rows), bool)
    while True:
        if on_tokens is not None:
            finished_at = [len(row) if n is None and bool(flag) else n for row, flag, n in
                           zip(rows, _row_flags(on_tokens(rows), len(rows)), finished_at)]
            finished = np.array([n is not None for n in finished_at])
            state = state._replace(done_B=state.done_B | finished)
        if len(rows[0]) == max_new_tokens or finished.all() or bool(jnp.all(state.done_B)):
            break
        with _on_mesh(mesh):
            state, out, steps = decode(params, state, pad, sampler, jnp.int32(max_new_tokens), cfg=config,
                                       chunk=chunk, mesh=mesh)
        for row, new in zip(rows, np.asarray(out)[:, :int(steps)].tolist()):
            row += new
    if eos_id is not None:
        rows = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    else:  # no EOS to emit: a finished row ends where it finished
        rows = [row[:n] for row, n in zip(rows, finished_at)]  # (row[:None]: the whole row)
    return rows


def _on_mesh(mesh):
    """The context of `mesh` (`sharding.mesh_context`) unless it is the enclosing one already, so that
    the model's activations are sharded by the logical-axis rules as in training: without it, a mesh
    passed as an argument placed the parameters and the KV cache alone, and XLA laid out the rest
    (e.g. logged "Involuntary full rematerialization" for 5 prompts on data 2 x fsdp 4)."""
    if mesh is None or mesh == ambient_mesh():
        return contextlib.nullcontext()
    return mesh_context(mesh, per_device_attention=False)


def _row_flags(flags, n_rows: int) -> list:
    """What `on_tokens` returned, checked to be one flag per row."""
    try:
        flags = list(flags)
    except TypeError:
        raise TypeError(f"on_tokens must return one flag per row ({n_rows}), got a {type(flags).__name__}") from None
    if len(flags) != n_rows:
        raise ValueError(f"on_tokens must return one flag per row ({n_rows}), got {len(flags)}")
    return flags


def decoding_params(config: LLaMAConfig, params: Mapping, mesh: jax.sharding.Mesh | None = None,
                    batch_size: int | None = None) -> Mapping:
    """`params` (scanned or unscanned) as `generate` decodes with them: on the device (host arrays
    such as NumPy's are copied there once), layers unrolled, placed on `mesh` as in training and,
    for a batch of one on one device (`batch_size=1`, and no mesh or a one-device one), each
    layer's q, k and v kernels joined into one (`llama_jax.model.join_qkv`).

    A batch of one then reads those weights with one matrix-vector product instead of three
    (about 15% more tokens/s on the CPU benchmark); at larger batches XLA runs the three products
    side by side and they are faster apart, and a mesh shards q, k and v by heads. `generate` does
    this on every call, which copies the layers' weights (all of them for scanned params, the
    q/k/v kernels for a batch of one); a caller that generates many times from the same weights
    does it once and passes the result. Params already joined stay joined (any batch size)."""
    if batch_size is not None and not (is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer (the rows decoded together) or None, "
                         f"got {batch_size!r}")
    params = flax.core.unfreeze(nn.meta.unbox(params))  # from `LLaMA(cfg).init`: axis names; a FrozenDict: dicts,
    # which the shardings below are (device_put refused a FrozenDict on a mesh)
    joined = isinstance(params, Mapping) and "qkv" in params.get("layers_0", {}).get("attn", {})
    if joined and mesh is not None and mesh.size > 1:
        raise ValueError(f"these params have their q/k/v kernels joined for one device (decoding_params with "
                         f"batch_size=1); a mesh of {mesh.size} devices needs the unjoined params")
    stacked = check_params_as_laid_out(config, params, joined_qkv=joined)
    if mesh is None:  # host arrays (NumPy's, from a converter) go to the device once, not on every compiled call
        params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)
    if mesh is not None and not joined:
        from llama_jax.checkpoint import mesh_shardings

        params = jax.device_put(params, mesh_shardings(config.replace(scan_layers=stacked), mesh))
    join = batch_size == 1 and (mesh is None or mesh.size == 1) and not joined
    if stacked:
        layers = _split_layers(params["layers"], config.n_layers, join)
    elif join:
        layers = [join_qkv(params[f"layers_{i}"]) for i in range(config.n_layers)]
    else:
        return params
    rest = {name: sub for name, sub in params.items() if name != "layers" and not name.startswith("layers_")}
    return {**rest, **{f"layers_{i}": layer for i, layer in enumerate(layers)}}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split_layers(stacked, n_layers: int, join: bool) -> list:
    """Scanned layer params (leading layer axis) -> one tree per layer, q/k/v joined if asked.
    Only the layers go through here: a jitted function copies every array it returns, even one
    it returns unchanged."""
    unstacked = unstack_layers({"layers": stacked}, n_layers)
    return [join_qkv(unstacked[f"layers_{i}"]) if join else unstacked[f"layers_{i}"] for i in range(n_layers)]


def generate_text(config: LLaMAConfig, params: Mapping, tokenizer: Tokenizer, prompt: str | list[str],
                  max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, stop: Sequence[str] = ()) -> list[str] | str:
    """Continuations of `prompt` (a string, or a list of them), stopping at the tokenizer's EOS.

    `stop`: each row's text ends before the first occurrence of any of these strings.
    (`llama_jax.prompts.complete`, which this calls, also does chat templates and streaming.)
    """
    from llama_jax.prompts import complete

    texts = [prompt] if isinstance(prompt, str) else prompt  # (checked by `complete`)
    decoded = complete(config, params, tokenizer, texts, max_new_tokens, temperature, top_k, top_p, seed, stop)
    return decoded[0] if isinstance(prompt, str) else decoded


__all__ = ["generate", "generate_text", "sample_logits"]
