"""The Flax model against transformers.LlamaForCausalLM, and its own invariants."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
import pytest

from llama_jax import (KVCache, LLaMA, LLaMAConfig, attention, from_hf_state_dict, init_params, param_count,
                       to_hf_state_dict)
from llama_jax.model import (logical_axes, project, rms_norm, rotary_sin_cos, stack_layers, swiglu,
                             unstack_layers)
from tests.reference import VARIANTS, hf_config_dict, hf_logits, make_hf_model, state_dict_numpy

PARITY_TOL = 1e-4


def _tokens(vocab, batch=2, seq=24, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    v4, v5 = hf_config_dict(variant, "v4"), hf_config_dict(variant, "v5")
    hf_model = make_hf_model(v5)
    tokens = _tokens(256)
    expected = hf_logits(hf_model, tokens)
    state = state_dict_numpy(hf_model)
    for hf_config in (v4, v5):
        cfg, params = from_hf_state_dict(state, hf_config)
        logits = np.asarray(LLaMA(cfg).apply({"params": params}, tokens))
        assert logits.dtype == np.float32
        np.testing.assert_allclose(logits, expected, atol=PARITY_TOL, rtol=0)
    assert LLaMAConfig.from_hf(v4) == LLaMAConfig.from_hf(v5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_match_transformers(variant):
    """Every weight's gradient of a next-token loss against PyTorch's autograd through
    transformers: checks the backward passes this project writes out (projections, attention)."""
    import torch

    hf_config = hf_config_dict(variant)
    hf_model = make_hf_model(hf_config, seed=2)
    tokens = _tokens(256, seed=10)
    targets = np.roll(tokens, -1, axis=1)
    logits_hf = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits
    loss_hf = torch.nn.functional.cross_entropy(logits_hf.reshape(-1, logits_hf.shape[-1]),
                                                torch.as_tensor(targets.reshape(-1), dtype=torch.long))
    loss_hf.backward()
    # The converter is linear in the weights, so it maps gradients as it maps weights.
    cfg, expected = from_hf_state_dict({n: p.grad.numpy() for n, p in hf_model.named_parameters()}, hf_config)
    _, params = from_hf_state_dict(state_dict_numpy(hf_model), hf_config)

    def loss_fn(params):
        logp = jax.nn.log_softmax(LLaMA(cfg).apply({"params": params}, tokens))
        return -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(loss, loss_hf.item(), rtol=1e-6)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=2e-6, rtol=1e-4), grads, expected)


@pytest.mark.parametrize("x_shape, kernel_shape, n_in, kernel_in_last, dtype", [
    ((2, 6, 4), (4, 5), 1, False, jnp.float32),         # a plain projection
    ((2, 6, 4), (4, 3, 2), 1, False, jnp.float32),      # into heads (q, k, v)
    ((2, 6, 3, 4), (3, 4, 5), 2, False, jnp.float32),   # out of heads (o)
    ((2, 6, 4), (5, 4), 1, True, jnp.float32),          # a kernel stored [out, in] (tied embeddings)
    ((2, 6, 4), (4, 5), 1, False, jnp.bfloat16),        # bfloat16 into float32, as logits are
])
def test_project_gradients_equal_differentiating_the_product(x_shape, kernel_shape, n_in, kernel_in_last, dtype):
    """`project`'s written-out backward against JAX's differentiation of the same product (for a
    bfloat16 product widened to float32, of the output's gradient rounded to bfloat16)."""
    rng = np.random.default_rng(3)
    x, kernel = (jnp.asarray(rng.normal(size=shape), dtype) for shape in (x_shape, kernel_shape))
    out_type = jnp.float32 if dtype == jnp.bfloat16 else None
    kernel_in = tuple(range(kernel.ndim - n_in, kernel.ndim)) if kernel_in_last else tuple(range(n_in))
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), kernel_in), ((), ()))

    def plain(x, kernel):
        return jax.lax.dot_general(x, kernel, dims, preferred_element_type=out_type)

    y, vjp = jax.vjp(lambda x, k: project(x, k, n_in, kernel_in_last, None, out_type), x, kernel)
    y_ref, vjp_ref = jax.vjp(plain, x, kernel)
    kernel_out = kernel_shape[:-n_in] if kernel_in_last else kernel_shape[n_in:]
    assert y.shape == x_shape[:-n_in] + kernel_out and y.dtype == (out_type or dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    dy = jnp.asarray(rng.normal(size=y.shape), y.dtype)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    dy_as_used = dy.astype(dtype).astype(dy.dtype)  # a widened output's gradient is taken in the inputs' dtype
    for got, want in zip(vjp(dy), vjp_ref(dy_as_used)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_norm_and_swiglu_gradients_equal_differentiating_their_formulas(dtype):
    """The written-out backwards of `rms_norm` and `swiglu` against JAX's differentiation of the
    plain formulas, taken in float32 on the same values (bfloat16 results are rounded once)."""
    rng = np.random.default_rng(4)
    x, gate, up = (jnp.asarray(3 * rng.normal(size=shape), dtype) for shape in ((2, 6, 8), (2, 6, 10), (2, 6, 10)))
    scale = jnp.asarray(rng.normal(size=8), dtype)

    def plain_norm(x, scale):
        return scale * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)

    cases = [(lambda x, scale: rms_norm(x, scale, 1e-5, dtype), plain_norm, (x, scale)),
             (swiglu, lambda gate, up: jax.nn.silu(gate) * up, (gate, up))]
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-6
    for fn, plain, args in cases:
        y, vjp = jax.vjp(fn, *args)
        y_ref, vjp_ref = jax.vjp(plain, *(a.astype(jnp.float32) for a in args))
        assert y.dtype == dtype
        dy = jnp.asarray(rng.normal(size=y.shape), dtype)
        for got, want, arg in zip((y, *vjp(dy)), (y_ref, *vjp_ref(dy.astype(jnp.float32))), (y, *args)):
            assert got.dtype == arg.dtype and got.shape == want.shape
            error = np.abs(np.asarray(got, np.float32) - np.asarray(want))
            assert error.max() <= tol * np.abs(np.asarray(want)).max(), (fn, error.max())


def _hf_logits_at(hf_model, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of one row as long as `positions` [1, S], and transformers' logits for them there."""
    import torch

    tokens = _tokens(256, batch=1, seq=positions.shape[1])
    with torch.no_grad():
        return tokens, hf_model(torch.as_tensor(tokens, dtype=torch.long),
                                position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_positions_offset_matches_transformers(variant):
    """Explicit rotary positions (as in decoding past position 0) agree with the reference. They
    spread past twice the original context: RoPE sees only the distances between positions, and
    LLaMA-3 scaling changes the slow frequencies, which turn noticeably only over such distances."""
    hf_config = hf_config_dict(variant)
    hf_model = make_hf_model(hf_config, seed=1)
    context = (hf_config["rope_scaling"] or {}).get("original_max_position_embeddings",
                                                    hf_config["max_position_embeddings"])
    positions = np.linspace(100, 100 + 2 * context, 16).astype(np.int32)[None]
    tokens, expected = _hf_logits_at(hf_model, positions)
    cfg, params = from_hf_state_dict(state_dict_numpy(hf_model), hf_config)
    logits = LLaMA(cfg).apply({"params": params}, tokens, positions=positions)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=PARITY_TOL, rtol=0)


def test_linear_rope_scaling_matches_transformers():
    """Linear rotary scaling (every frequency divided by `factor`), read from either config.json
    style, at positions past those the unscaled frequencies were trained for."""
    scaling = dict(rope_type="linear", factor=4.0)
    v4 = dict(hf_config_dict("mha", "v4"), rope_scaling=scaling)
    v5 = dict(hf_config_dict("mha", "v5"), rope_parameters=dict(scaling, rope_theta=10000.0))
    hf_model = make_hf_model(v5, seed=4)
    positions = np.arange(300, 316, dtype=np.int32)[None]
    tokens, expected = _hf_logits_at(hf_model, positions)
    for hf_config in (v4, v5):
        cfg, params = from_hf_state_dict(state_dict_numpy(hf_model), hf_config)
        logits = LLaMA(cfg).apply({"params": params}, tokens, positions=positions)
        np.testing.assert_allclose(np.asarray(logits), expected, atol=PARITY_TOL, rtol=0)


_LLAMA31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)
# The releases' rotary settings (LLaMA 3.2's head dim 64 is its 1B model's), linear scaling, and
# LLaMA-3 scaling of a short original context, which puts fast frequencies in its interpolated band.
_ROTARY = {  # rope_theta, rope_scaling, head dim, context
    "llama2": (10000.0, None, 128, 4096),
    "code_llama": (1e6, None, 128, 16384),
    "llama31": (500000.0, _LLAMA31, 128, 131072),
    "llama32": (500000.0, dict(_LLAMA31, factor=32.0), 64, 131072),
    "linear": (10000.0, dict(rope_type="linear", factor=4.0), 128, 16384),
    "llama3_short_context": (10000.0, dict(_LLAMA31, original_max_position_embeddings=128), 128, 131072),
}


def _rotary_hf_config(theta, scaling, head_dim, context, heads=1):
    return dict(hf_config_dict("mha"), hidden_size=heads * head_dim, num_attention_heads=heads,
                num_key_value_heads=heads, rope_theta=theta, rope_scaling=dict(scaling) if scaling else None,
                max_position_embeddings=context)


@pytest.mark.parametrize("setting", sorted(_ROTARY))
def test_rotary_tables_match_transformers_at_long_positions(setting):
    """The sines and cosines of the last 64 positions of the context against transformers' rotary
    embedding. An inverse frequency one float32 ulp from transformers' turns the angle at position
    100000 by an ulp of the angle (0.008 rad): NumPy's float32 power gave such frequencies, and
    tables 8e-3 apart; LLaMA-3 scaling computed in another order, 4e-3 apart (short context)."""
    import torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = _rotary_hf_config(*_ROTARY[setting])
    context = hf_config["max_position_embeddings"]
    positions = np.arange(context - 64, context, dtype=np.int32)[None]
    reference = LlamaRotaryEmbedding(transformers.LlamaConfig(**hf_config))
    with torch.no_grad():
        cos_hf, sin_hf = reference(torch.zeros(1), torch.as_tensor(positions, dtype=torch.long))
    sin, cos = rotary_sin_cos(jnp.asarray(positions), LLaMAConfig.from_hf(hf_config))
    np.testing.assert_allclose(np.asarray(sin), sin_hf.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(cos), cos_hf.numpy(), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def long_context():
    """A transformers model with LLaMA 3.1's rotary settings, its attention weights scaled up so
    that the rotation matters to the logits, and the same model here (config, params)."""
    import torch

    hf_config = _rotary_hf_config(*_ROTARY["llama31"])
    hf_model = make_hf_model(hf_config, seed=5)
    with torch.no_grad():
        for layer in hf_model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, name).weight.mul_(3.0)
    return (hf_model, *from_hf_state_dict(state_dict_numpy(hf_model), hf_config))


def test_logits_match_transformers_at_long_positions(long_context):
    """32 tokens at positions 100000 on, in one call and through the KV cache (prefilled, then
    decoded a token at a time), against transformers there, as closely as at position 0: with
    frequencies an ulp off transformers' they were 2e-4 apart at 100000, 4e-7 at position 0."""
    hf_model, cfg, params = long_context
    positions = np.arange(100000, 100032, dtype=np.int32)[None]
    tokens, expected = _hf_logits_at(hf_model, positions)
    model = LLaMA(cfg)
    full = jax.jit(lambda p, t, pos: model.apply({"params": p}, t, positions=pos))
    np.testing.assert_allclose(full(params, tokens, positions), expected, atol=1e-5, rtol=0)
    step = jax.jit(lambda p, t, pos, c: model.apply({"params": p}, t, positions=pos, cache=c))
    logits, cache = step(params, tokens[:, :28], positions[:, :28], KVCache.create(cfg, batch=1, max_len=32))
    pieces = [logits]
    for i in range(28, 32):
        logits, cache = step(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), expected, atol=1e-5, rtol=0)


def test_bf16_compute_at_long_positions_agrees_with_fp32(long_context):
    """bfloat16 compute keeps the rotary angles in float32: at positions 100000 on its logits are
    within 2e-2 of float32's (7e-3, as at position 0). Angles in bfloat16 (8 significant bits: steps
    of 512 positions there) put them 0.14 apart."""
    _, cfg, params = long_context
    tokens = _tokens(cfg.vocab_size, batch=1, seq=32, seed=7)
    positions = np.arange(100000, 100032, dtype=np.int32)[None]
    f32, bf16 = (jax.jit(lambda p, t, pos, c=c: LLaMA(c).apply({"params": p}, t, positions=pos))
                 for c in (cfg, cfg.replace(dtype="bfloat16")))
    error = np.abs(np.asarray(bf16(params, tokens, positions)) - np.asarray(f32(params, tokens, positions))).max()
    assert error < 2e-2, error


@pytest.fixture(scope="module")
def gqa():
    cfg = LLaMAConfig.from_hf(hf_config_dict("gqa_llama3"))
    return cfg, init_params(cfg, 0)


def test_bf16_compute_agrees_with_fp32(gqa):
    cfg, params = gqa
    tokens = _tokens(cfg.vocab_size, batch=4, seq=64, seed=3)
    ref = np.asarray(LLaMA(cfg).apply({"params": params}, tokens))
    bf16 = LLaMA(cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens)
    assert bf16.dtype == jnp.float32  # logits stay float32 for the loss
    agreement = np.mean(np.argmax(np.asarray(bf16), -1) == np.argmax(ref, -1))
    assert agreement >= 0.99, agreement
    # Same for bf16 parameters: the model runs on them directly.
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    logits = LLaMA(cfg.replace(dtype="bfloat16", param_dtype="bfloat16")).apply({"params": bf16_params}, tokens)
    assert np.mean(np.argmax(np.asarray(logits), -1) == np.argmax(ref, -1)) >= 0.99


def test_causality(gqa):
    cfg, params = gqa
    tokens = _tokens(cfg.vocab_size, batch=1, seq=20, seed=4)
    changed = tokens.copy()
    changed[0, 12:] = (changed[0, 12:] + 7) % cfg.vocab_size
    a = np.asarray(LLaMA(cfg).apply({"params": params}, tokens))
    b = np.asarray(LLaMA(cfg).apply({"params": params}, changed))
    np.testing.assert_array_equal(a[:, :12], b[:, :12])
    assert np.abs(a[:, 12:] - b[:, 12:]).max() > 1e-3


def test_packed_documents_do_not_attend_across(gqa):
    cfg, params = gqa
    model = LLaMA(cfg)
    doc_a, doc_b = _tokens(cfg.vocab_size, 1, 9, seed=5), _tokens(cfg.vocab_size, 1, 15, seed=6)
    packed = np.concatenate([doc_a, doc_b], axis=1)
    segment_ids = np.array([[1] * 9 + [2] * 15], np.int32)
    positions = np.array([list(range(9)) + list(range(15))], np.int32)
    out = np.asarray(model.apply({"params": params}, packed, positions=positions, segment_ids=segment_ids))
    alone_a = np.asarray(model.apply({"params": params}, doc_a))
    alone_b = np.asarray(model.apply({"params": params}, doc_b))
    np.testing.assert_allclose(out[:, :9], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 9:], alone_b, atol=1e-5, rtol=0)


def test_scan_equals_unscanned(gqa):
    cfg, params = gqa
    tokens = _tokens(cfg.vocab_size, seed=7)
    unscanned = unstack_layers(params, cfg.n_layers)
    assert "layers" not in unscanned and "layers_1" in unscanned
    a = LLaMA(cfg).apply({"params": params}, tokens)
    b = LLaMA(cfg.replace(scan_layers=False)).apply({"params": unscanned}, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    restacked = stack_layers(unscanned, cfg.n_layers)
    jax.tree.map(np.testing.assert_array_equal, restacked, params)
    # Initialising unscanned gives the per-layer tree directly, with the same values for the same
    # seed, and each layer's logical axes without the layer axis.
    init_unscanned = init_params(cfg.replace(scan_layers=False), 0)
    jax.tree.map(np.testing.assert_array_equal, init_unscanned, unstack_layers(init_params(cfg, 0), cfg.n_layers))
    axes = logical_axes(cfg.replace(scan_layers=False))
    assert axes["layers_1"]["attn"]["q"]["kernel"] == P("embed", "heads", "head_dim")
    assert logical_axes(cfg)["layers"]["attn"]["q"]["kernel"] == P("layers", "embed", "heads", "head_dim")


def _loss_and_grads(cfg, params, tokens):
    def loss_fn(p):
        logits = LLaMA(cfg).apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "qkv_proj"])
def test_remat_leaves_outputs_and_gradients_unchanged(gqa, policy):
    cfg, params = gqa
    tokens = jnp.asarray(_tokens(cfg.vocab_size, seed=8))
    loss, grads = _loss_and_grads(cfg, params, tokens)
    loss_r, grads_r = _loss_and_grads(cfg.replace(remat_policy=policy), params, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r, grads)
    # The unscanned stack with remat too.
    unscanned_cfg = cfg.replace(remat_policy=policy, scan_layers=False)
    loss_u, _ = _loss_and_grads(unscanned_cfg, unstack_layers(params, cfg.n_layers), tokens)
    np.testing.assert_allclose(loss_u, loss, rtol=1e-6)


def test_dot_product_attention_impl_matches_xla(gqa):
    cfg, params = gqa
    tokens = _tokens(cfg.vocab_size, seed=9)
    segment_ids = np.repeat(np.array([[1] * 10 + [2] * 14]), 2, axis=0)
    a = LLaMA(cfg).apply({"params": params}, tokens, segment_ids=segment_ids)
    b = LLaMA(cfg.replace(attention_impl="dot_product")).apply({"params": params}, tokens, segment_ids=segment_ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan,block,batch,packed", [(True, None, 2, False), (False, None, 2, False),
                                                     (False, 12, 2, False), (False, 12, 1, False),
                                                     (True, None, 2, True), (False, 12, 2, True)])
def test_kv_cache_decoding_matches_full_forward(gqa, scan, block, batch, packed, monkeypatch):
    """block None: prefill and decoding each attend over the whole cache in one block. block 12:
    the cache (20 slots) is read in blocks of 12, the second overlapping the first. batch 1:
    unrolled layers keep a batch of one without its batch dimension. packed: row 0 holds three
    documents (the third begun while decoding), row 1 starts with three padding slots; their
    positions and segment ids go into the prefill and each decoding step."""
    if block:
        monkeypatch.setattr(attention, "cache_block", lambda queries, slots: block)
    cfg, params = gqa
    cfg = cfg.replace(scan_layers=scan)
    params = params if scan else unstack_layers(params, cfg.n_layers)
    model = LLaMA(cfg)
    tokens = _tokens(cfg.vocab_size, batch=batch, seq=16, seed=10)
    rows = dict(positions=np.array([[*range(6), *range(6), *range(4)], [0] * 3 + list(range(13))], np.int32),
                segment_ids=np.array([[1] * 6 + [2] * 6 + [3] * 4, [0] * 3 + [1] * 13], np.int32)) if packed else {}
    full = np.asarray(model.apply({"params": params}, tokens, **rows))
    cache = KVCache.create(cfg, batch=batch, max_len=20 if block else 32)
    step = jax.jit(lambda p, t, c, kw: model.apply({"params": p}, t, cache=c, **kw))
    logits, cache = step(params, tokens[:, :10], cache, {k: v[:, :10] for k, v in rows.items()})  # prefill
    pieces = [logits]
    for i in range(10, 16):
        logits, cache = step(params, tokens[:, i:i + 1], cache, {k: v[:, i:i + 1] for k, v in rows.items()})
        pieces.append(logits)
    assert int(cache.index) == 16
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_bad_tokens_and_a_full_cache_are_refused_when_called_eagerly(gqa):
    """Under jit an id outside the vocabulary reads a NaN or wrong embedding row and a write past a
    full cache lands on its last slot, without error; called eagerly, both are refused."""
    cfg, params = gqa
    model = LLaMA(cfg)
    for tokens, message in (([[1, cfg.vocab_size]], rf"token id {cfg.vocab_size} is outside the vocabulary"),
                            ([[-1]], r"token id -1 is outside the vocabulary; valid: 0 <= id < vocab_size="),
                            (np.arange(3), r"tokens must be an integer array of shape \[batch, seq\], got int64 of "
                                           r"shape \(3,\)"),
                            (np.ones((1, 2)), r"integer array .* got float64 of shape \(1, 2\)")):
        with pytest.raises(ValueError, match=message):
            model.apply({"params": params}, tokens)
    tokens = _tokens(cfg.vocab_size, batch=1, seq=5)
    np.testing.assert_array_equal(model.apply({"params": params}, tokens.tolist()),  # a list is an array
                                  model.apply({"params": params}, tokens))
    _, cache = model.apply({"params": params}, tokens[:, :4], cache=KVCache.create(cfg, batch=1, max_len=4))
    with pytest.raises(ValueError, match=r"the KV cache has 4 slots, 4 filled: no room for 1 more tokens; create it "
                                         r"with max_len >= 5"):
        model.apply({"params": params}, tokens[:, 4:], cache=cache)


def test_positions_segments_and_a_cache_that_do_not_fit_the_tokens_are_refused(gqa):
    cfg, params = gqa
    model = LLaMA(cfg)
    tokens = _tokens(cfg.vocab_size, batch=2, seq=5)
    for kwargs, message in ((dict(positions=np.arange(5)), r"positions must be an integer array of the tokens' shape "
                                                           r"\[batch, seq\] = \[2, 5\], got int64 of shape \(5,\)"),
                            (dict(positions=np.zeros((2, 4), np.int32)), r"positions .* got int32 of shape \(2, 4\)"),
                            (dict(segment_ids=np.ones(5, np.int32)), r"segment_ids must be an integer array of the "
                                                                    r"tokens' shape"),
                            (dict(segment_ids=np.ones((2, 5))), r"segment_ids .* got float64 of shape \(2, 5\)"),
                            # ids past int32 wrapped: documents 1 and 2**32 + 1 attended to each other
                            (dict(segment_ids=np.array([[1] * 5, [1, 1, 2**32 + 1, 2**32 + 1, 2**32 + 1]])),
                             r"segment_ids must fit in int32, got values from 1 to 4294967297"),
                            (dict(cache=KVCache.create(cfg, batch=3, max_len=8)),
                             r"the KV cache holds a batch of 3 rows, the tokens 2; create it with batch=2"),
                            (dict(cache=KVCache.create(cfg.replace(scan_layers=not cfg.scan_layers), 2, 8)),
                             r"the KV cache is laid out for \w+ layers but the model has scan_layers="),
                            # another model's cache of the same size: was read as this one's (other logits)
                            (dict(cache=KVCache.create(cfg.replace(n_kv_heads=cfg.n_kv_heads * 2,
                                                                   dim=cfg.dim * 2, n_heads=cfg.n_heads * 2), 2, 8)),
                             rf"the KV cache holds {cfg.n_layers} layers of {cfg.n_kv_heads * 2} K/V heads of "
                             rf"{cfg.head_dim} dims, the model {cfg.n_layers} of {cfg.n_kv_heads} of {cfg.head_dim}"),
                            (dict(cache=KVCache.create(cfg.replace(n_layers=cfg.n_layers + 1), 2, 8)),
                             rf"the KV cache holds {cfg.n_layers + 1} layers")):
        with pytest.raises(ValueError, match=message):
            model.apply({"params": params}, tokens, **kwargs)
    positions = np.broadcast_to(np.arange(5), (2, 5))
    np.testing.assert_array_equal(model.apply({"params": params}, tokens, positions=positions.tolist()),  # lists too
                                  model.apply({"params": params}, tokens))


def test_cache_blocks_bound_the_scores_and_cover_the_cache_when_decoding():
    assert attention.cache_block(1, 272) == 272  # decoding: the whole cache
    assert attention.cache_block(1, 65_536) == 65_536
    assert attention.cache_block(1, 131_072) == 65_536  # up to 256 x 256 scores per row and head
    assert attention.cache_block(16, 2_064) == 2_064  # a short prompt: 16 x 2,064 scores
    assert attention.cache_block(512, 2_064) == 256  # a long prompt's prefill: 512 x 256
    assert attention.cache_block(100_000, 131_072) == 256  # never narrower than 256 slots


def test_parameters_carry_logical_axis_names():
    from llama_jax.model import logical_axes

    cfg = LLaMAConfig.from_preset("debug")
    specs = logical_axes(cfg)
    assert tuple(specs["layers"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["layers"]["attn"]["k"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(specs["layers"]["mlp"]["down"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]) == ("embed", "vocab")
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        assert all(name is not None for name in spec)


def test_apply_refuses_params_of_another_model():
    """Flax reads the params a module asks for and ignores the rest: an untied model's params in a
    tied model (its head unused, every argmax other) gave logits without a word."""
    cfg = LLaMAConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=128, max_seq_len=64)
    params = init_params(cfg, rng=jax.random.key(0))  # a typed key, as JAX recommends (it was a TypeError)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, params, init_params(cfg, rng=0)))
    tokens = np.array([[1, 5, 9, 20]])
    assert LLaMA(cfg).apply({"params": params}, tokens).shape == (1, 4, 128)
    with pytest.raises(ValueError, match=r"parameter \['lm_head'\] is not part of this model"):
        LLaMA(cfg.replace(tie_embeddings=True)).apply({"params": params}, tokens)
    with pytest.raises(ValueError, match=r"parameter \['layers_0'\].* is not part of this model"):
        LLaMA(cfg).apply({"params": {**params, "layers_0": {"x": jnp.zeros(1)}}}, tokens)
    integers = jax.tree.map(lambda a: np.asarray(a, np.int32), params)  # (garbage logits, without a word)
    with pytest.raises(ValueError, match=r"^parameter \['embed'\]\['embedding'\] has dtype int32; parameters are "
                                         r"floating point \(float32, bfloat16, float16\)"):
        LLaMA(cfg).apply({"params": integers}, tokens)
    with pytest.raises(ValueError, match=r"^LLaMA.apply takes Flax's variables: pass \{'params': params\}, not"):
        LLaMA(cfg).apply(params, tokens)  # (Flax: "should be a dictionary of collections")
    with pytest.raises(TypeError, match=r"rng must be an integer seed or a JAX random key \(jax.random.key\(0\)\)"):
        init_params(cfg, rng=0.5)
    with pytest.raises(ValueError, match=r"dtype: dtype\('float32'\) is a .*; give one of the names float32"):
        cfg.replace(dtype=np.dtype("float32"))  # (equal to its name, it was accepted; saving it failed)


@pytest.mark.parametrize("call, error, message", [
    (lambda c: init_params(c.to_dict(), 0), TypeError,
     r"^cfg must be an LLaMAConfig \(LLaMAConfig.from_preset\(name\) or LLaMAConfig.from_dict\(d\)\), "
     r"got a dict of its fields$"),
    (lambda c: param_count("llama3.2-1b"), TypeError, r"^cfg must be an LLaMAConfig .*, got a str$"),
    (lambda c: LLaMA(c.to_dict()).apply({"params": init_params(c, 0)}, jnp.ones((1, 4), jnp.int32)), TypeError,
     r"^LLaMA's config must be an LLaMAConfig .*, got a dict of its fields"),
    (lambda c: init_params(c, 2**32 + 5), ValueError,  # was seed 5's params
     r"^rng must be an integer in \[0, 2\*\*32\), got 4294967301$"),
    (lambda c: init_params(c, -1), ValueError, r"^rng must be an integer in \[0, 2\*\*32\), got -1$"),
    (lambda c: KVCache.create(c, 1, "16"), ValueError, r"^max_len must be a positive integer, got '16'$"),
    (lambda c: KVCache.create(c, -1, 16), ValueError, r"^batch must be a positive integer, got -1$"),
    (lambda c: KVCache.create(c, 1, 16, "bf16"), ValueError, r"^dtype must be a floating-point dtype .* got 'bf16'$"),
    (lambda c: KVCache.create(c, 1, 16, jnp.int8), ValueError, r"^dtype must be a floating-point dtype"),
    (lambda c: LLaMAConfig.from_dict(c.to_json()), TypeError,  # was its characters as unknown fields
     r"^LLaMAConfig.from_dict takes a dict of fields, got str; for a JSON text, from_dict\(json.loads\(text\)\)$"),
    (lambda c: LLaMAConfig.from_dict(None), TypeError, r"^LLaMAConfig.from_dict takes a dict of fields, got NoneType"),
    (lambda c: LLaMAConfig.from_preset(["debug"]), ValueError, r"^preset: unknown value \['debug'\]; valid: "),
    (lambda c: to_hf_state_dict(c.to_dict(), init_params(c, 0)), TypeError, r"^cfg must be an LLaMAConfig"),
])
def test_model_api_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(LLaMAConfig.from_preset("debug", vocab_size=64, max_seq_len=32))


def test_activations_are_laid_out_as_the_model_declares_under_a_mesh():
    """Under a mesh, the logits come out as the model's constraint lays them: rows over the batch
    axes, the vocabulary over tensor. (Flax 0.12's `nn.with_logical_constraint` finds no mesh under
    the classic `with mesh:` the project enters, so every constraint did nothing and each device
    held whole-vocabulary logits.)"""
    from llama_jax.sharding import make_mesh, mesh_context

    cfg = LLaMAConfig.from_preset("debug")
    mesh = make_mesh(1, 4, 2)
    tokens = jnp.asarray(_tokens(cfg.vocab_size, batch=8, seq=16))
    with mesh_context(mesh):
        params = LLaMA(cfg).init(jax.random.key(0), tokens)
        logits = jax.jit(LLaMA(cfg).apply)(params, tokens)
    assert logits.sharding.spec == P("fsdp", None, "tensor")
