"""Sharded decoding on 8 virtual devices: tokens equal single-device tokens, params and the KV
cache are really sharded (the cache's per-device shape in the compiled loop), bad meshes refused."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LLaMAConfig, init_params, save_model
from llama_jax.checkpoint import load_model
from llama_jax.generate import _decode, _prefill, _Sampler, decoding_params, generate
from llama_jax.model import abstract_params
from llama_jax.sharding import make_mesh, tree_shardings
from llama_jax.train import Trainer

# n_kv_heads 4 so that tensor=4 splits the K/V heads (and the cache) one per device.
CFG = LLaMAConfig(vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=128, max_seq_len=128)
# Three prompts of different lengths: left padding, and a batch that 8 does not divide.
PROMPTS = [np.random.default_rng(0).integers(3, 256, n).tolist() for n in (5, 11, 3)]
STEPS = 12
MESHES = {"fsdp8": dict(fsdp=8), "fsdp2_tensor4": dict(fsdp=2, tensor=4)}
SAMPLING = [dict(), dict(temperature=1.0, seed=3), dict(temperature=0.9, top_k=20, top_p=0.9, seed=5)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # x10: sharp logits, so greedy continuations vary and float noise cannot flip an argmax.
    params = jax.tree.map(lambda a: a * 10 if a.ndim > 1 else a, init_params(CFG, 0))
    path = tmp_path_factory.mktemp("sharded") / "model"
    save_model(path, CFG, params)
    expected = [generate(CFG, params, PROMPTS, STEPS, **kw) for kw in SAMPLING]
    assert len(set(map(str, expected))) == len(SAMPLING) and len(set(expected[0][0])) > 4
    return path, expected


@pytest.mark.parametrize("shape", MESHES.values(), ids=MESHES.keys())
def test_sharded_tokens_equal_single_device(model_dir, shape):
    path, expected = model_dir
    mesh = make_mesh(**shape)
    cfg, params = load_model(path, shardings=tree_shardings(mesh, abstract_params(CFG.replace(scan_layers=True))))
    wk = params["layers"]["attn"]["k"]["kernel"]  # [layers, embed, kv_heads, head_dim]
    assert wk.sharding.mesh == mesh and len(wk.addressable_shards) == 8
    assert wk.addressable_shards[0].data.shape == (2, 64 // mesh.shape["fsdp"], 4 // mesh.shape["tensor"], 8)
    assert [generate(cfg, params, PROMPTS, STEPS, mesh=mesh, **kw) for kw in SAMPLING] == expected
    # split once for many calls (as lm-eval's generate_until does): still sharded, same tokens
    unrolled = decoding_params(cfg, params, mesh)
    wk1 = unrolled["layers_1"]["attn"]["k"]["kernel"]
    assert "layers" not in unrolled and wk1.addressable_shards[0].data.shape == wk.addressable_shards[0].data.shape[1:]
    assert [generate(cfg, unrolled, PROMPTS, STEPS, mesh=mesh, **kw) for kw in SAMPLING] == expected
    # q/k/v kernels are joined for a batch of one on one device only: a mesh shards them by heads
    assert "qkv" not in decoding_params(cfg, params, mesh, batch_size=1)["layers_0"]["attn"]
    with pytest.raises(ValueError, match="joined for one device"):
        decoding_params(cfg, decoding_params(cfg, params, batch_size=1), mesh)
    # host arrays in a FrozenDict (as older Flax's init returns them) are placed too (device_put refused them)
    assert generate(cfg, flax.core.freeze(jax.tree.map(np.asarray, params)), PROMPTS, STEPS, mesh=mesh) == expected[0]


@pytest.mark.parametrize("shape", MESHES.values(), ids=MESHES.keys())
def test_kv_cache_is_sharded(shape):
    """The compiled decode loop holds each layer's cache only as per-device blocks [B/batch-ways, K/tensor, T, Dh]."""
    mesh = make_mesh(**shape)
    params, cfg = decoding_params(CFG, init_params(CFG, 0), mesh), CFG.replace(scan_layers=False)
    B, P = 8, 11
    pad = np.zeros(B, np.int32)
    sampler = _Sampler(jax.random.key(0), jnp.float32(0), jnp.int32(256), jnp.float32(1), jnp.int32(-1),
                       jnp.int32(256))
    state = _prefill(params, np.ones((B, P), np.int32), pad, sampler, cfg=cfg, max_len=P + STEPS, mesh=mesh)
    hlo = _decode.lower(params, state, pad, sampler, jnp.int32(STEPS), cfg=cfg, chunk=STEPS,
                        mesh=mesh).compile().as_text()
    cache_shapes = set(re.findall(rf"f32\[\d+,\d+,{P + STEPS},8\]", hlo))
    rows, kv_heads = B // (mesh.shape["data"] * mesh.shape["fsdp"]), 4 // mesh.shape["tensor"]
    assert cache_shapes == {f"f32[{rows},{kv_heads},{P + STEPS},8]"}


def test_trainer_context_shards_without_mesh_argument(model_dir):
    """run.py's samples call generate under `trainer.context(per_device_attention=False)`."""
    path, expected = model_dir
    mesh = make_mesh(fsdp=2, tensor=4)
    trainer = Trainer(CFG, optimizer=None, schedule=None, mesh=mesh)
    _, params = load_model(path, shardings=tree_shardings(mesh, abstract_params(CFG)))
    with trainer.context(per_device_attention=False):
        assert generate(CFG, params, PROMPTS, STEPS, **SAMPLING[1]) == expected[1]


def test_repeated_generation_on_a_mesh_traces_the_initialiser_once(model_dir, monkeypatch):
    """Params are placed on the mesh with shardings found by tracing the model's initialiser
    (`abstract_params`): once per config and mesh, not on every call, as lm-eval's generate_until
    calls generate once per batch (it took 0.6 s a call for 32 unrolled layers). Same tokens."""
    import llama_jax.checkpoint as checkpoint_lib

    path, expected = model_dir
    traced = []
    monkeypatch.setattr(checkpoint_lib, "abstract_params", lambda cfg: traced.append(cfg) or abstract_params(cfg))
    mesh = make_mesh(fsdp=4, tensor=2)
    cfg, params = load_model(path, mesh=mesh)
    unrolled = decoding_params(cfg, params, mesh)
    assert generate(cfg, unrolled, PROMPTS, STEPS, mesh=mesh) == expected[0]
    once = len(traced)
    assert [generate(cfg, unrolled, PROMPTS, STEPS, mesh=mesh, **kw) for kw in SAMPLING] == expected
    assert generate(cfg, params, PROMPTS, STEPS, mesh=mesh) == expected[0]  # scanned, as decoding_params had them
    assert len(traced) == once


def test_mesh_argument_shards_activations_as_the_trainer_context_does(capfd):
    """A mesh passed as the argument shards the model's activations by the rules, as inside a
    trainer's context: without them, 5 prompts on data 2 x fsdp 4 had XLA log "Involuntary full
    rematerialization" for the embedding lookup. Compiled here, not read from the compilation cache,
    so that XLA's log shows."""
    params = init_params(CFG, 0)
    prompts = [np.random.default_rng(1).integers(3, 256, n).tolist() for n in (7, 2, 13, 4, 9)]
    expected = generate(CFG, params, prompts, 4)
    cached = jax.config.jax_enable_compilation_cache
    capfd.readouterr()
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        assert generate(CFG, params, prompts, 4, mesh=make_mesh(data=2, fsdp=4)) == expected
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_mesh_that_does_not_divide_the_heads():
    params = init_params(CFG, 0)
    with pytest.raises(ValueError, match=r"model.n_kv_heads=4 is not divisible by mesh.tensor=8") as err:
        generate(CFG, params, PROMPTS, STEPS, mesh=make_mesh(fsdp=1, tensor=8))
    assert "\n" not in str(err.value)
