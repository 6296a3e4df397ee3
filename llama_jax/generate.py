"""Autoregressive text generation with a KV cache: greedy, temperature, top-k and nucleus sampling.

Prompts of different lengths are left-padded to a common length P: pad slots get segment id 0,
so no real token attends to them, and rotary positions count from 0 at each prompt's first real
token. One compiled function runs the prefill over all P slots and then a `lax.while_loop`
whose body feeds one token per row. The body is traced and compiled once, as a separately
jitted decode step would be, but runs with no per-step dispatch or device-to-host sync and
stops early once every row has emitted EOS. (A Python loop *inside* jit would instead unroll
`max_new_tokens` copies of the model.) Sampling settings are traced values, so changing
temperature, top-k, top-p, seed or EOS reuses the compiled code; a new batch size, prompt
length or `max_new_tokens` compiles again.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LLaMAConfig
from llama_jax.model import KVCache, LLaMA, abstract_params, stack_layers, unstack_layers
from llama_jax.sharding import ambient_mesh, check_divisible, tree_shardings
from llama_jax.tokenizer import Tokenizer

Array = jax.Array


def sample_logits(logits_BxV: Array, key: Array, temperature: Array | float = 1.0,
                  top_k: Array | int | None = None, top_p: Array | float = 1.0) -> Array:
    """One token id per row [B]: argmax when temperature is 0, else a draw from the filtered softmax.

    Filters apply in Hugging Face's order: temperature, then top-k, then top-p (the smallest set of
    most likely tokens whose probability reaches `top_p`; the most likely token always stays).
    """
    logits = logits_BxV.astype(jnp.float32)
    V = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    rank = jnp.arange(V)
    in_top_k = rank < (V if top_k is None else top_k)
    sorted_desc = jnp.where(in_top_k, jnp.sort(scaled, axis=-1)[:, ::-1], -jnp.inf)
    probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))
    smallest_kept = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.random.categorical(key, jnp.where(scaled < smallest_kept, -jnp.inf, scaled), axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "mesh"))
def _generate_ids(params, tokens_BxP: Array, pad_B: Array, key: Array, temperature: Array, top_k: Array,
                  top_p: Array, eos_id: Array, n_tokens: Array, *, cfg: LLaMAConfig, max_new_tokens: int,
                  mesh=None) -> Array:
    """New tokens [B, max_new_tokens], drawn from ids below `n_tokens`; after a row's EOS its
    entries repeat EOS. `mesh`: keep the KV cache sharded on it (batch and K/V heads)."""
    B, P = tokens_BxP.shape
    model = LLaMA(cfg)
    slots_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    segment_ids = (slots_BxP >= pad_B[:, None]).astype(jnp.int32)
    positions = jnp.maximum(slots_BxP - pad_B[:, None], 0)
    cache = KVCache.create(cfg, B, P + max_new_tokens).constrained(mesh)
    logits, cache = model.apply({"params": params}, tokens_BxP, positions=positions, segment_ids=segment_ids,
                                cache=cache)
    cache = cache.constrained(mesh)

    def pick(logits_BxV, step, done_B):
        logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < n_tokens, logits_BxV, -jnp.inf)
        tok = sample_logits(logits_BxV, jax.random.fold_in(key, step), temperature, top_k, top_p)
        return jnp.where(done_B, eos_id, tok)

    first = pick(logits[:, -1], 0, jnp.zeros((B,), bool))
    out = jnp.full((B, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, prev_B, cache, out, done = state
        positions = (cache.index - pad_B)[:, None]
        logits, cache = model.apply({"params": params}, prev_B[:, None], positions=positions,
                                    segment_ids=jnp.ones((B, 1), jnp.int32), cache=cache)
        cache = cache.constrained(mesh)
        tok = pick(logits[:, -1], step, done)
        return step + 1, tok, cache, out.at[:, step].set(tok), done | (tok == eos_id)

    state = (jnp.int32(1), first, cache, out, first == eos_id)
    return jax.lax.while_loop(cond, body, state)[3]


def _params_for(config: LLaMAConfig, params):
    """Params in the layer layout `config.scan_layers` asks for."""
    if config.scan_layers and "layers" not in params:
        return stack_layers(dict(params), config.n_layers)
    if not config.scan_layers and "layers" in params:
        return unstack_layers(dict(params), config.n_layers)
    return params


def generate(config: LLaMAConfig, params: Mapping, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None, n_tokens: int | None = None,
             pad_to: int | None = None, mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself is not returned).

    Temperature 0 is greedy. `n_tokens`: only ids below it are produced (a tokenizer smaller than
    the model's padded vocabulary; default: the whole vocabulary). A row stops after emitting `eos_id`; its result ends with that EOS,
    as in transformers' `generate`.
    Params may be scanned or unscanned; they are re-laid out to match `config.scan_layers`.
    `pad_to`: left-pad the prompts to at least this length, so that batches of prompts of nearby
    lengths share one compiled shape (the results do not depend on it).
    `mesh`: decode sharded over a (data, fsdp, tensor) mesh (`llama_jax.sharding.make_mesh`) with
    the project's logical-axis rules: params are placed as in training (a no-op for params already
    loaded with those shardings, e.g. `load_model(path, shardings=...)` or a trainer's state), the
    KV cache split over data x fsdp (batch) and tensor (K/V heads). Default: the mesh of an
    enclosing `with mesh:` such as `trainer.context(...)`, if any.
    """
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # also false for NaN
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
    P = max(max(len(p) for p in prompts), pad_to or 0)
    if P + max_new_tokens > config.max_seq_len:
        raise ValueError(f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) = {P + max_new_tokens} "
                         f"exceeds the model's max_seq_len ({config.max_seq_len})")

    mesh = ambient_mesh() if mesh is None else mesh
    if mesh is not None:
        check_divisible(config, mesh)

    tokens = np.zeros((len(prompts), P), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, P - len(prompt):] = prompt
    pad = np.array([P - len(p) for p in prompts], np.int32)
    params = _params_for(config, params)
    if mesh is not None:
        params = jax.device_put(params, tree_shardings(mesh, abstract_params(config)))
    out = _generate_ids(params, tokens, pad, jax.random.key(seed),
                        jnp.float32(temperature), jnp.int32(min(top_k or config.vocab_size, config.vocab_size)),
                        jnp.float32(top_p or 1.0), jnp.int32(-1 if eos_id is None else eos_id),
                        jnp.int32(min(n_tokens or config.vocab_size, config.vocab_size)), cfg=config,
                        max_new_tokens=max_new_tokens, mesh=mesh)
    results = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        results.append(row)
    return results


def generate_text(config: LLaMAConfig, params: Mapping, tokenizer: Tokenizer, prompt: str | list[str],
                  max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, stop: Sequence[str] = ()) -> list[str] | str:
    """Continuations of `prompt` (a string, or a list of them), stopping at the tokenizer's EOS.

    `stop`: each row's text ends before the first occurrence of any of these strings (rows
    independently; decoding still runs to EOS or `max_new_tokens`, the text is cut afterwards).
    """
    from llama_jax.prompts import cut_at_stop

    if any(s == "" for s in stop):
        raise ValueError("a stop string must not be empty")
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [tokenizer.encode(t, bos=True, eos=False) for t in texts]
    new = generate(config, params, prompts, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id,
                   n_tokens=tokenizer.vocab_size)
    decoded = [cut_at_stop(tokenizer.decode(ids), stop) for ids in new]
    return decoded[0] if isinstance(prompt, str) else decoded


__all__ = ["generate", "generate_text", "sample_logits"]
