"""Generation: greedy against transformers and against a cache-free loop, sampling statistics, EOS,
text in and out with a real SentencePiece model, and input checks."""

import functools
import logging
from io import BytesIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from pydoc_data.topics import topics

from llama_jax import LLaMA, LLaMAConfig, from_hf_state_dict, init_params, save_model
from llama_jax.cli import main
from llama_jax.generate import _filtered, decoding_params, generate, generate_text, sample_logits
from llama_jax.prompts import complete
from llama_jax.model import KVCache, unstack_layers
from llama_jax.tokenizer import SentencePieceTokenizer
from tests.reference import hf_config_dict, make_hf_model, state_dict_numpy

STEPS = 16
EOS = 2  # the reference configs' eos_token_id
# Prompt tokens avoid BOS/EOS; two lengths so the batch needs left padding.
PROMPTS = [np.random.default_rng(0).integers(3, 256, n).tolist() for n in (5, 11)]


@functools.cache
def _hf_pair(variant: str):
    # initializer_range 0.2 (not 0.02) gives logits with real gaps, so greedy continuations vary
    # from step to step instead of repeating one token, and float noise cannot flip an argmax.
    hf_config = dict(hf_config_dict(variant, "v5"), initializer_range=0.2)
    model = make_hf_model(hf_config, seed=0)
    cfg, params = from_hf_state_dict(state_dict_numpy(model), hf_config)
    return model, cfg, params


@pytest.fixture(scope="module")
def gqa():
    _, cfg, params = _hf_pair("gqa_llama3")
    return cfg, params


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (stops at its EOS, like ours)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ["gqa_llama3", "mqa_tied"])
def test_greedy_matches_transformers(variant):
    model, cfg, params = _hf_pair(variant)
    expected = [hf_greedy(model, p, STEPS) for p in PROMPTS]
    assert all(len(set(e)) > 4 for e in expected)  # the comparison is not over a repeated token
    assert generate(cfg, params, PROMPTS[:1], STEPS, eos_id=EOS) == expected[:1]
    assert generate(cfg, params, PROMPTS, STEPS, eos_id=EOS) == expected


@functools.cache
def full_forward(cfg: LLaMAConfig):
    """The jitted model without a cache: (params, tokens) -> logits."""
    return jax.jit(lambda p, t: LLaMA(cfg).apply({"params": p}, t))


def naive_greedy(cfg: LLaMAConfig, params, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy decoding by re-running the whole forward pass (no cache) for every new token.

    Rows are right-padded into one buffer; causal attention keeps the padding after a row's last
    token from touching the logits read there.
    """
    forward = full_forward(cfg)
    lengths = [len(p) for p in prompts]
    buf = np.zeros((len(prompts), max(lengths) + steps), np.int32)
    for row, p in enumerate(prompts):
        buf[row, :len(p)] = p
    for step in range(steps):
        logits = np.asarray(forward(params, buf))
        for row, n in enumerate(lengths):
            buf[row, n + step] = logits[row, n + step - 1].argmax()
    return [buf[row, n:n + steps].tolist() for row, n in enumerate(lengths)]


@pytest.mark.parametrize("layout", ["scanned", "unscanned", "bf16"])
def test_greedy_matches_cache_free_loop(gqa, layout):
    cfg, params = gqa
    if layout == "unscanned":
        cfg = cfg.replace(scan_layers=False)
        params = unstack_layers(params, cfg.n_layers)
    elif layout == "bf16":
        cfg = cfg.replace(dtype="bfloat16")
    expected = naive_greedy(cfg, params, PROMPTS, STEPS)
    assert all(len(set(e)) > 4 for e in expected)
    assert generate(cfg, params, PROMPTS, STEPS) == expected


def test_prompt_and_new_tokens_may_fill_max_seq_len_exactly(gqa):
    """The longest prompt and its continuation filling max_seq_len to the last position decode as
    the cache-free loop does (the shorter prompt left-padded); one token more is refused."""
    cfg, params = gqa
    expected = naive_greedy(cfg, params, PROMPTS, STEPS)
    full = cfg.replace(max_seq_len=len(PROMPTS[1]) + STEPS)
    assert generate(full, params, PROMPTS, STEPS) == expected
    n = full.max_seq_len
    with pytest.raises(ValueError, match=rf"^longest prompt \(11\) \+ max_new_tokens \({STEPS + 1}\) = {n + 1} "
                                         rf"exceeds the model's max_seq_len \({n}\)$"):
        generate(full, params, PROMPTS, STEPS + 1)


def test_decoding_params_put_host_arrays_on_the_device_once(gqa):
    """NumPy params (as the converters give them) are copied to the device by `decoding_params`,
    not again by each compiled call of `generate`; params already there are not copied."""
    cfg, params = gqa
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    unrolled = cfg.replace(scan_layers=False)
    for config, host in ((cfg, params), (unrolled, unstack_layers(params, cfg.n_layers))):
        placed = decoding_params(config, host, batch_size=2)
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(placed))
        again = decoding_params(unrolled, placed, batch_size=2)
        assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(placed), strict=True))


def test_batch_of_one_decodes_with_joined_qkv(gqa):
    """For a batch of one, `decoding_params` joins each layer's q, k and v kernels into one (one
    matrix-vector product instead of three); logits and tokens are those of the separate kernels."""
    cfg, params = gqa
    separate, joined = decoding_params(cfg, params), decoding_params(cfg, params, batch_size=1)
    attn = joined["layers_0"]["attn"]
    assert "qkv" in attn and not {"q", "k", "v"} & attn.keys()
    assert attn["qkv"]["kernel"].shape == (cfg.dim, cfg.n_heads + 2 * cfg.n_kv_heads, cfg.head_dim)
    assert {"q", "k", "v"} <= separate["layers_0"]["attn"].keys()
    assert "qkv" not in decoding_params(cfg, params, batch_size=2)["layers_0"]["attn"]
    again = decoding_params(cfg, joined, batch_size=2)  # joined stays joined, nothing copied
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(joined), strict=True))

    unrolled = cfg.replace(scan_layers=False)
    prefill = np.asarray(PROMPTS[1:], np.int32)
    logits = [LLaMA(unrolled).apply({"params": p}, prefill, cache=KVCache.create(unrolled, 1, 16))[0]
              for p in (separate, joined)]
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)

    expected = naive_greedy(cfg, params, PROMPTS, STEPS)
    assert generate(cfg, params, PROMPTS[1:], STEPS) == expected[1:]  # joined inside generate
    assert generate(unrolled, joined, PROMPTS, STEPS) == expected  # joined params at a batch of two

    # params straight from `init`, still boxed with their logical axis names, join as well
    boxed = LLaMA(unrolled).init(jax.random.key(1), prefill)["params"]
    assert generate(unrolled, boxed, PROMPTS[1:], STEPS) == generate(unrolled, nn.meta.unbox(boxed), PROMPTS[1:],
                                                                     STEPS)


def test_params_are_relaid_out_to_match_scan_layers(gqa):
    cfg, params = gqa
    unscanned = cfg.replace(scan_layers=False)
    expected = naive_greedy(cfg, params, PROMPTS, STEPS)  # the scanned params as they are
    assert generate(unscanned, params, PROMPTS, STEPS) == expected
    assert generate(cfg, unstack_layers(params, cfg.n_layers), PROMPTS, STEPS) == expected


def test_sampling_is_reproducible_and_top_k_1_is_greedy(gqa):
    cfg, params = gqa
    a = generate(cfg, params, PROMPTS, STEPS, temperature=1.0, seed=3)
    assert a == generate(cfg, params, PROMPTS, STEPS, temperature=1.0, seed=3)
    assert a != generate(cfg, params, PROMPTS, STEPS, temperature=1.0, seed=4)
    greedy = generate(cfg, params, PROMPTS, STEPS)
    assert a != greedy
    assert generate(cfg, params, PROMPTS, STEPS, temperature=1.0, top_k=1, seed=3) == greedy



def test_a_sampled_row_depends_on_its_place_in_the_batch_not_on_the_other_prompts(gqa):
    """As the README says: row 0 samples what its prompt alone does, row 1 the same tokens beside
    another prompt (a longer one: more left padding), and the same prompt in the other place
    draws other tokens. (With JAX's threefry bits not partitionable, row 0 of a batch of two drew
    other tokens than its prompt alone.)"""
    cfg, params = gqa
    a, b = PROMPTS
    longer = np.random.default_rng(1).integers(3, 256, 14).tolist()
    sample = functools.partial(generate, cfg, params, max_new_tokens=8, temperature=1.0, seed=5)
    pair = sample([a, b])
    assert pair[0] == sample([a])[0]
    assert pair[1] == sample([longer, b])[1]
    assert sample([b, a])[0] != pair[1]

def filtered_probs(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """softmax(logits / T), cut to the top k, then to the nucleus of mass top_p, renormalised."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    keep[order[:top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / p[keep].sum()
    if top_p is not None:
        sorted_p = p[order]
        n_keep = int(np.searchsorted(np.cumsum(sorted_p), top_p) + 1)
        keep = np.zeros_like(p, bool)
        keep[order[:n_keep]] = True
        p = np.where(keep, p, 0.0) / p[keep].sum()
    return p


@pytest.mark.parametrize("top_k, top_p", [(None, None), (4, None), (None, 0.7)])
def test_first_token_distribution(gqa, top_k, top_p):
    """N identical prompts in one batch are N independent draws of the first token.

    Tolerance: every token's frequency is within 5 binomial standard deviations (+1/N) of its
    probability, and tokens the filters remove never appear.
    """
    cfg, params = gqa
    n, temperature = 4000, 2.0
    prompt = PROMPTS[1]
    logits = np.asarray(full_forward(cfg)(params, np.array([prompt])))[0, -1]
    p = filtered_probs(logits, temperature, top_k, top_p)
    assert p.max() < 0.6 and (p > 0.01).sum() >= 3  # the test has a real distribution to check
    draws = np.array(generate(cfg, params, [prompt] * n, 1, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=11))[:, 0]
    freq = np.bincount(draws, minlength=cfg.vocab_size) / n
    assert np.all(freq[p == 0] == 0)
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1 / n)


def test_stops_after_eos(gqa):
    cfg, params = gqa
    greedy = generate(cfg, params, PROMPTS, STEPS)
    eos = greedy[0][3]
    assert eos not in greedy[0][:3]
    out = generate(cfg, params, PROMPTS, STEPS, eos_id=eos)
    assert out[0] == greedy[0][:4]
    other = greedy[1]  # the other row is not cut short by the first row's EOS
    assert out[1] == (other[:other.index(eos) + 1] if eos in other else other)


def test_watched_decoding_is_one_call_and_stops_when_told(gqa):
    """on_tokens sees the rows after token 1 and every `chunk` more; the tokens are those of one
    call (sampled too); rows it marks finished end with EOS and decoding stops once all are."""
    cfg, params = gqa
    one_call = generate(cfg, params, PROMPTS, STEPS, temperature=1.0, seed=3)
    seen = []

    def record(rows):
        seen.append([len(r) for r in rows])
        return [False] * len(rows)

    assert generate(cfg, params, PROMPTS, STEPS, temperature=1.0, seed=3, on_tokens=record, chunk=6) == one_call
    assert seen == [[1, 1], [7, 7], [13, 13], [16, 16]]
    greedy = generate(cfg, params, PROMPTS, STEPS)
    assert EOS not in greedy[0] + greedy[1]
    seen.clear()
    out = generate(cfg, params, PROMPTS, STEPS, eos_id=EOS, chunk=5,
                   on_tokens=lambda rows: record(rows) and [len(rows[0]) >= 6, len(rows[1]) >= 11])
    assert seen == [[1, 1], [6, 6], [11, 11]]  # no chunk after both rows are finished
    assert out == [greedy[0][:6] + [EOS], greedy[1][:11]]
    # without an EOS to emit, a finished row ends where it finished (it held -1 ids after it)
    for eos_id in (None, -1):  # (-1: a SentencePiece model's "no EOS")
        out = generate(cfg, params, PROMPTS, STEPS, chunk=5, eos_id=eos_id,
                       on_tokens=lambda rows: [len(rows[0]) >= 6, False])
        assert out == [greedy[0][:6], greedy[1]]


@pytest.fixture(scope="module")
def sp_tokenizer() -> SentencePieceTokenizer:
    model = BytesIO()
    lines = (line for key in sorted(topics) for line in topics[key].split("\n") if line.strip())
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, vocab_size=512, model_type="bpe",
                                   byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    return SentencePieceTokenizer(model.getvalue())


def test_generate_text(sp_tokenizer):
    tok = sp_tokenizer
    cfg = LLaMAConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=128)
    params = init_params(cfg, 0)
    params = jax.tree.map(lambda a: a * 10 if a.ndim > 1 else a, params)  # sharper, less repetitive output
    prompts = ["The for statement", "Class definitions"]
    texts = generate_text(cfg, params, tok, prompts, max_new_tokens=12, temperature=0.8, seed=1)
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    ids = generate(cfg, params, [tok.encode(p) for p in prompts], 12, temperature=0.8, seed=1, eos_id=tok.eos_id)
    # prompt + continuation reads as the whole sequence decoded (a leading space is kept)
    assert [p + t for p, t in zip(prompts, texts)] == [tok.decode(tok.encode(p) + i) for p, i in zip(prompts, ids)]
    single = generate_text(cfg, params, tok, prompts[0], max_new_tokens=12, temperature=0.0)
    assert isinstance(single, str) and single
    with pytest.raises(ValueError, match=r"^prompts is empty; give at least one prompt$"):  # no command-line flags
        generate_text(cfg, params, tok, [])
    with pytest.raises(ValueError, match=r"^prompts must be a list of strings, got None$"):  # was "'NoneType' object
        generate_text(cfg, params, tok, None)  # is not iterable"
    with pytest.raises(ValueError, match=r"prompts is a list of strings, got the string 'The for statement'"):
        complete(cfg, params, tok, prompts[0])  # not one prompt per character
    one_stop = complete(cfg, params, tok, prompts[:1], 12, temperature=0.0, stop=["ion"])
    assert complete(cfg, params, tok, prompts[:1], 12, temperature=0.0, stop=("ion",),
                    end_tokens=np.array([tok.eos_id])) == one_stop  # a tuple, an array of ids
    assert complete(cfg, params, tok, prompts[:1], 12, temperature=0.0, stop="ion") == one_stop  # a lone string
    assert complete(cfg, params, tok, prompts[:1], 12, temperature=0.0, stop=list("ion")) != one_stop  # not its letters


@pytest.mark.parametrize("call, error, message", [
    # each was taken as truthy (a chat template applied for "no"), or failed deep inside
    (lambda c, p, t: complete(c, p, t, ["hi"], 2, chat="no"), ValueError, r"^chat must be True or False, got 'no'$"),
    (lambda c, p, t: complete(c, p, t, ["hi"], 2, stream=True), TypeError,  # was raised after decoding
     r"^stream must be a function called with each new piece of text, or None; got True$"),
    (lambda c, p, t: generate_text(c, p, "tok/tokenizer.model", "hi"), TypeError,
     r"^tokenizer must be a loaded tokenizer \(llama_jax.tokenizer.load_tokenizer\(path\)\), "
     r"got 'tok/tokenizer.model'$"),
    (lambda c, p, t: generate_text(c, p, t, [1, 5]), ValueError,
     r"^prompts must be strings \(for token ids, use llama_jax.generate.generate\), got 1$"),
    (lambda c, p, t: generate_text(c, p, t, "hi", stop=None), ValueError,
     r"^stop must be a list of strings, got None$"),
    (lambda c, p, t: generate_text(c.replace(vocab_size=100), p, t, "hi"), ValueError,  # named an id of a prompt
     r"^the tokenizer has \d+ tokens but the model's vocab_size is 100; use the model's own tokenizer$"),
    (lambda c, p, t: complete(c, p, t, ["hi"], 2, end_tokens=2), ValueError,
     r"^end_tokens must be a list of token ids in \[0, \d+\), got 2$"),
    (lambda c, p, t: complete(c, p, t, ["hi"], 2, end_tokens=[10**6]), ValueError,  # was never matched
     r"^end_tokens must be a list of token ids in \[0, \d+\), got \[1000000\]$"),
    (lambda c, p, t: complete(c.to_dict(), p, t, ["hi"], 2), TypeError,
     r"^config must be an LLaMAConfig \(LLaMAConfig.from_preset\(name\) or LLaMAConfig.from_dict\(d\)\), "
     r"got a dict of its fields$"),
    (lambda c, p, t: generate(c, p, [[1, 5]], 2, mesh="cpu"), TypeError,
     r"^mesh must be a jax.sharding.Mesh of axes \('data', 'fsdp', 'tensor'\) \(llama_jax.sharding.make_mesh\), "
     r"got 'cpu'$"),
    (lambda c, p, t: generate(c, p, [[1, 5]], 2, on_tokens=True), TypeError, r"^on_tokens must be a function"),
    (lambda c, p, t: t.encode("hi", bos="no"), ValueError, r"^bos must be True or False, got 'no'$"),
    (lambda c, p, t: complete(c, p, t, ["hi"], 2, end_tokens=np.array([[2]])), ValueError,  # 2-D: not a list of ids
     r"^end_tokens must be a list of token ids"),
])
def test_text_generation_api_bad_input(sp_tokenizer, call, error, message):
    tok = sp_tokenizer
    cfg = LLaMAConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, ffn_dim=128, max_seq_len=64)
    with pytest.raises(error, match=message):
        call(cfg, init_params(cfg, 0), tok)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), r"^top_k must be a positive integer or None, got 0$"),  # always drew token 0
    (dict(top_k=-1), r"^top_k must be a positive integer or None, got -1$"),
    (dict(temperature=-1.0), r"^temperature must be a finite number >= 0 \(0 is greedy\), got -1.0$"),  # was greedy
    (dict(top_p=2.0), r"^top_p must be in \(0, 1\] or None, got 2.0$"),
    (dict(top_k=2.5), r"^top_k must be a positive integer or None, got 2.5$"),  # failed inside JAX's indexing
    (dict(temperature=jnp.float32(-1)), r"^temperature must be a finite number >= 0 \(0 is greedy\), got Array"),
    (dict(logits_BxV=jnp.zeros(5)), r"^logits must be an array \[batch, vocab\], got shape \(5,\)$"),
])
def test_sample_logits_refuses_settings_out_of_range(kwargs, message):
    args = dict(logits_BxV=jnp.zeros((2, 5)), key=jax.random.key(0), temperature=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        sample_logits(**args)


def test_sample_logits_takes_none_for_no_filter():
    logits, key = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)), jnp.float32), jax.random.key(1)
    np.testing.assert_array_equal(sample_logits(logits, key, 0.9, None, None), sample_logits(logits, key, 0.9, 50, 1.0))


def test_sample_logits_compiles_once_for_other_settings(caplog):
    """Called outside jit with other keys, temperatures, top-k and top-p (greedy too), sample_logits
    reuses its compiled code: its lax.cond branches, made anew on every call, were compiled again
    each time (two compiles a call, 1.5 s on CPU)."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 97)), jnp.float32)  # a shape of its own
    settings = [(0.7, None, None), (0.9, 5, None), (1.3, 500, 0.8), (0.5, 40, 0.95), (0.0, None, None)]
    first = [sample_logits(logits, jax.random.key(0), *s) for s in settings]  # compiled here
    with caplog.at_level(logging.WARNING, logger="jax"), jax.log_compiles(True):
        again = [sample_logits(logits, jax.random.key(0), *s) for s in settings]
        for seed, s in enumerate(settings):
            sample_logits(logits, jax.random.key(seed), *s)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")] == []
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(first[1], sample_logits(logits, jax.random.key(0), 0.9, jnp.int32(5)))
    # a top_k beyond int32's range is the whole vocabulary, as in generate (it was an OverflowError)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0), 1.3, 10**12, 0.8), first[2])


def test_top_p_after_top_k_weighs_every_token_tied_with_the_k_th():
    """top_k=2 over [3, 2, 2, 2, 0, -1] keeps the three tied 2s, as transformers' top-k does; top-p
    then takes its mass over all four (0.475 before the first 2, so 0.6 cuts among the ties, and the
    tied ones stay). It took the mass over the first k sorted alone: token 0 came to 0.73 of it, and
    every draw was token 0."""
    n = 20000
    logits = jnp.tile(jnp.asarray([[3.0, 2.0, 2.0, 2.0, 0.0, -1.0]], jnp.float32), (n, 1))
    draws = np.asarray(sample_logits(logits, jax.random.key(0), 1.0, 2, 0.6))
    p = np.exp([3.0, 2.0, 2.0, 2.0])
    p = np.r_[p / p.sum(), 0.0, 0.0]
    freq = np.bincount(draws, minlength=6) / n
    assert np.all(freq[p == 0] == 0)
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1 / n)



def test_top_p_keeps_the_tokens_transformers_keeps_over_a_large_vocabulary():
    """32,000 tokens: token 0 holds 0.9 of the mass, the others fall off smoothly. top_p 0.99 keeps
    26,927 of them, in float64 and in transformers' TopPLogitsWarper (which sums the mass from the
    least likely token up); summed from the most likely down in float32, the mass before token
    26,926 reached 0.99 and it was cut."""
    from transformers.generation.logits_process import TopPLogitsWarper

    tail = np.linspace(0.0, -1.0, 31999)
    logits = np.r_[np.log(9 * np.exp(tail).sum()), tail].astype(np.float32)[None]
    p = np.exp(logits[0].astype(np.float64))
    p /= p.sum()
    kept = int((np.cumsum(p) - p < 0.99).sum())
    assert kept == 26927
    assert int(torch.isfinite(TopPLogitsWarper(0.99)(None, torch.tensor(logits))).sum()) == kept
    filtered = np.asarray(_filtered(jnp.asarray(logits), 32000, jnp.float32(0.99)))
    np.testing.assert_array_equal(np.isfinite(filtered[0]), np.arange(32000) < kept)

def test_a_top_p_below_float32s_smallest_keeps_the_most_likely_token():
    """top_p = 1e-300 is 0 in float32, where no token's preceding mass is below it: the most
    likely token stays all the same (the nucleus was empty, and every draw picked token 0). (Traced,
    as `generate` passes it: a float32 0 given as it is is refused.)"""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    for seed in range(3):
        picked = jax.jit(sample_logits)(logits, jax.random.key(seed), 0.9, None, jnp.float32(1e-300))
        np.testing.assert_array_equal(picked, np.argmax(np.asarray(logits), axis=-1))


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-38])
def test_a_tiny_temperature_draws_the_most_likely_token(temperature):
    """(Dividing the logits by it made every positive one +inf, and the first of them was drawn.)"""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) + 3.0, jnp.float32)
    for seed in range(3):
        picked = sample_logits(logits, jax.random.key(seed), temperature)
        np.testing.assert_array_equal(picked, np.argmax(np.asarray(logits), axis=-1))


def test_greedy_picks_as_argmax_does():
    """Temperature 0 picks what `argmax` picks: the first of tied maxima, the first NaN of a row
    holding one, index 0 of a row that is all -inf or all +inf."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 40)).astype(np.float32)
    logits[0, [3, 17, 30]] = 9.0  # ties
    logits[1, [5, 25]] = np.nan
    logits[2] = -np.inf
    logits[3] = np.inf
    logits[4, [7, 8]] = np.inf
    logits[5, 11] = np.nan
    logits[5, [2, 20]] = np.inf
    picked = np.asarray(sample_logits(jnp.asarray(logits), jax.random.key(0), 0.0))
    np.testing.assert_array_equal(picked, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    np.testing.assert_array_equal(picked, [3, 5, 0, 0, 7, 11])
    wide = rng.normal(size=(3, 32001)).astype(np.float32)  # (XLA's CPU max of this many values may drop a NaN)
    wide[0, -1], wide[1, 20000], wide[2, [9, 31000]] = np.nan, np.nan, np.nan
    picked = np.asarray(sample_logits(jnp.asarray(wide), jax.random.key(0), 0.0))
    np.testing.assert_array_equal(picked, [32000, 20000, 9])


def test_numpy_and_jax_scalars_are_accepted(gqa):
    """Options given as NumPy or JAX scalars (as a sweep over jnp values passes them) decode as the
    same Python numbers do."""
    cfg, params = gqa
    args = dict(temperature=0.7, top_k=5, top_p=0.9, seed=3, eos_id=EOS, n_tokens=200)
    as_python = generate(cfg, params, PROMPTS, 6, **args)
    as_jax = {k: (jnp.float32 if isinstance(v, float) else jnp.int32)(v) for k, v in args.items()}
    assert generate(cfg, params, PROMPTS, np.int64(6), **as_jax) == as_python
    assert generate(cfg, params, PROMPTS, 6, **{k: np.asarray(v) for k, v in args.items()}) == as_python
    assert generate(cfg, params, np.asarray(PROMPTS[:1]), 6, **args) == as_python[:1]  # an array of prompts too


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), r"prompts must be a non-empty list of token-id lists \(e.g. \[\[1, 415, 2936\]\]\), got \[\]"),
    (dict(prompts=[[5, 6], []]), "prompt 1 is empty"),
    (dict(prompts=[[5, 300]]), r"prompt 0 has token id 300; valid: integers in \[0, 256\)"),
    (dict(prompts=[[5, 6.9]]), r"prompt 0 has token id 6.9; valid: integers"),  # not truncated to 6
    (dict(prompts=[5, 6]), r"prompt 0 is 5, not a list of token ids; prompts is a list of them, one per row"),
    (dict(prompts=[{5: 6}]), r"prompt 0 is \{5: 6\}, not a list of token ids"),  # its keys were the prompt
    (dict(prompts=np.arange(3)), r"prompts: an array must be \[batch, length\] token ids, got shape \(3,\)"),
    (dict(on_tokens=lambda rows: [False], chunk=0), r"chunk must be a positive integer .* got 0"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0 \(0 is greedy\), got nan"),
    (dict(temperature=float("inf")), r"temperature must be a finite number >= 0 \(0 is greedy\), got inf"),
    (dict(temperature=1e308), r"temperature must be at most 3.4e\+38 \(float32's range\), got 1e\+308"),
    (dict(temperature=10**400), r"temperature must be at most 3.4e\+38 \(float32's range\), got 1000"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\] or None, got nan"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    # wrong kinds of value, as a Python caller may pass them
    (dict(temperature=None), r"temperature must be a finite number >= 0 \(0 is greedy\), got None"),
    (dict(top_k=2.5), r"top_k must be a positive integer or None, got 2.5"),
    (dict(top_k=True), r"top_k must be a positive integer or None, got True"),
    (dict(max_new_tokens=4.0), r"max_new_tokens must be an integer of at least 1, got 4.0"),
    (dict(eos_id=256), r"eos_id must be a token id below the vocabulary size 256 or None, got 256"),
    (dict(n_tokens=0), r"n_tokens must be a positive integer \(only ids below it are produced\) or None, got 0"),
    (dict(max_new_tokens=251), r"\(6\) \+ max_new_tokens \(251\).*max_seq_len \(256\)"),
    (dict(pad_to=2.5), r"pad_to must be a non-negative integer \(a prompt length\) or None, got 2.5"),
    (dict(pad_to=-1), r"pad_to must be a non-negative integer"),
    (dict(pad_to=250, max_new_tokens=10), r"pad_to \(250\) \+ max_new_tokens \(10\) = 260 exceeds"),  # not "prompt"
    # too few flags dropped rows from the result; too many were ignored
    (dict(prompts=[[5], [5, 6]], on_tokens=lambda rows: [False]), r"one flag per row \(2\), got 1$"),
    (dict(prompts=[[5], [5, 6]], on_tokens=lambda rows: [False] * 3), r"one flag per row \(2\), got 3$"),
])
def test_bad_input(gqa, kwargs, message):
    cfg, params = gqa
    args = dict(prompts=[[5, 6, 7, 8, 9, 10]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message) as err:
        generate(cfg, params, **args)
    assert "\n" not in str(err.value)


def test_params_of_another_model_are_refused(gqa):
    """The model reads only the layers its config lists, so deeper params would decode silently
    with their first layers (and shallower ones failed with a bare KeyError)."""
    cfg, params = gqa
    for other, message in ((cfg.replace(n_layers=cfg.n_layers + 1), r"\['layers.*is not part of this model|has shape"),
                           (cfg.replace(n_layers=cfg.n_layers - 1), r"has shape|is missing")):
        for layout in (True, False):
            theirs = init_params(other.replace(scan_layers=layout), 0)
            with pytest.raises(ValueError, match=message):
                generate(cfg.replace(scan_layers=layout), theirs, [[5, 6, 7]], 2)
    # params prepared for decoding (q/k/v joined, `decoding_params(batch_size=1)`) are checked too:
    # a shallower config decoded with their first layers, a deeper or wider one failed inside Flax
    joined = decoding_params(cfg, params, batch_size=1)
    n = cfg.n_layers
    for other, message in ((cfg.replace(n_layers=n - 1), rf"\['layers_{n - 1}'\].*is not part of this model"),
                           (cfg.replace(n_layers=n + 1), rf"\['layers_{n}'\].*is missing"),
                           (cfg.replace(dim=2 * cfg.dim), r"\['embed'\]\['embedding'\] has shape")):
        with pytest.raises(ValueError, match=message):
            generate(other, joined, [[5, 6, 7]], 2)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer .* got 0"):
        decoding_params(cfg, params, batch_size=0)


def test_generate_command(sp_tokenizer, tmp_path, capsys):
    tok = sp_tokenizer
    cfg = LLaMAConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=128)
    params = jax.tree.map(lambda a: a * 10 if a.ndim > 1 else a, init_params(cfg, 0))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(tok.sp.serialized_model_proto())
    save_model(tmp_path / "model", cfg, params, tokenizer=tmp_path / "tok")
    prompts = ["The for statement", "Class definitions"]
    args = ["generate", str(tmp_path / "model"), "--prompt", prompts[0], "--prompt", prompts[1],
            "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "50", "--seed", "1"]
    assert main(args) == 0
    expected = generate_text(cfg, params, tok, prompts, max_new_tokens=12, temperature=0.8, top_k=50, seed=1)
    assert capsys.readouterr().out == "\n\n-----\n\n".join(p + t for p, t in zip(prompts, expected)) + "\n"

    save_model(tmp_path / "bare", cfg, params)
    assert main(["generate", str(tmp_path / "bare"), "--prompt", "x"]) == 2
    assert "has no tokenizer.model; pass --tokenizer PATH" in capsys.readouterr().err


@pytest.mark.parametrize("args, flag, value", [
    (["generate", "model", "--prompt", "x", "--temperature", "nan"], "--temperature", "nan"),
    (["generate", "model", "--prompt", "x", "--top-p", "inf"], "--top-p", "inf"),
    (["convert", "--from", "meta", "--to", "jax", "a", "b", "--rope-scaling-factor=-inf"],
     "--rope-scaling-factor", "-inf"),
])
def test_float_flags_reject_nonfinite_numbers(args, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"llama-jax {args[0]}: error: argument {flag}: '{value}' is not a finite "
                                       f"number (see llama-jax {args[0]} --help)\n")  # one line, no usage block


@pytest.mark.parametrize("args, prog", [
    (["generate", "model", "--prompt", "x", "--temprature", "0"], "llama-jax generate"),
    (["data", "inspect", "--workdir", "run", "--steps", "3"], "llama-jax data inspect"),
])
def test_unknown_arguments_are_reported_by_the_subcommand(args, prog, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    unknown = " ".join(args[-2:])
    assert capsys.readouterr().err == f"{prog}: error: unrecognized arguments: {unknown} (see {prog} --help)\n"


@pytest.mark.parametrize("layout", ["scanned", "unscanned"])
def test_decoding_under_64_bit_jax_gives_the_same_tokens(gqa, layout):
    """JAX_ENABLE_X64=1 (a common global setting) makes Python's integers int64 in JAX: the cache's
    writes once mixed them with its int32 index and failed (a TypeError from dynamic_update_slice)."""
    cfg, params = gqa
    if layout == "unscanned":
        cfg, params = cfg.replace(scan_layers=False), unstack_layers(params, cfg.n_layers)
    expected = [generate(cfg, params, prompts, STEPS, temperature=1.0, seed=3) for prompts in (PROMPTS, PROMPTS[:1])]
    with jax.enable_x64(True):
        assert [generate(cfg, params, prompts, STEPS, temperature=1.0, seed=3)
                for prompts in (PROMPTS, PROMPTS[:1])] == expected
