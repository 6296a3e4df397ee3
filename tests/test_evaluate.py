"""Evaluation: exact held-out evaluation against a direct sum over documents, the scoring API
against the full forward pass, and lm-eval through llama_jax against the harness's own Hugging
Face backend on the same weights. Everything is built here: a SentencePiece tokenizer trained on
the corpus CPython ships, a tiny random LlamaForCausalLM converted with `llama-jax convert`, and
lm-eval tasks read from local JSON files."""

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import sys

import flax
import jax
import numpy as np
import pytest
import torch

from llama_jax import LLaMA, save_model
from llama_jax.checkpoint import load_model
from llama_jax.cli import main
from llama_jax.data import EmbeddedCorpus, split_indices
from llama_jax.evaluate import (Scorer, document_windows, evaluate_documents, evaluate_tokens, packed_rows,
                                rolling_windows)
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
from tests.reference import hf_config_dict, make_hf_model

CONTEXT = 96  # the model's max_seq_len: small, so that windows and truncation happen
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "add_bos_token": True}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(Hugging Face directory, llama_jax directory) of one random model with its tokenizer."""
    root = tmp_path_factory.mktemp("evaluate")
    hf_dir = root / "hf"
    corpus = EmbeddedCorpus()
    train_sentencepiece((corpus[i] for i in range(len(corpus))), hf_dir / "tokenizer.model", 512)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    # initializer_range 0.2: logits with real gaps, so no argmax is decided by float noise.
    config = dict(hf_config_dict("gqa_llama3", "v5", vocab_size=512), initializer_range=0.2,
                  max_position_embeddings=CONTEXT)
    hf_model = make_hf_model(config, seed=0)
    # A random model emits stray byte-fallback pieces (ids 3-258), and bytes that are not UTF-8 decode
    # differently in SentencePiece and transformers. Zero output rows give those pieces logit 0, below
    # the largest of the other logits, so generated text is made of whole pieces; scoring is unaffected.
    with torch.no_grad():
        hf_model.lm_head.weight[3:259] = 0.0
    hf_model.save_pretrained(hf_dir)
    assert main(["convert", "--from", "hf", "--to", "jax", str(hf_dir), str(root / "jax")]) == 0
    return hf_dir, root / "jax"


@pytest.fixture(scope="module")
def model(model_dirs):
    config, params = load_model(model_dirs[1])
    return config, params, load_tokenizer(model_dirs[1])


@functools.cache
def _forward(cfg):
    return jax.jit(lambda p, t: LLaMA(cfg).apply({"params": p}, t))


def log_softmax(cfg, params, tokens) -> np.ndarray:
    """float64 log-softmax of the unpadded, unpacked forward pass of one sequence [S, V]."""
    logits = np.asarray(_forward(cfg)(params, np.asarray([tokens], np.int32))[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def direct_score(cfg, params, context, continuation) -> tuple[float, bool]:
    whole = list(context) + list(continuation)
    logp = log_softmax(cfg, params, whole[:-1])[-len(continuation):]
    return float(logp[np.arange(len(continuation)), continuation].sum()), bool(
        (logp.argmax(-1) == np.asarray(continuation)).all())


def requests_for(cfg, params, rng):
    """(context, continuation) token pairs of many lengths, one of them the greedy continuation."""
    pairs = [(rng.integers(3, 512, c).tolist(), rng.integers(3, 512, k).tolist())
             for c, k in [(1, 1), (5, 3), (17, 8), (40, 20), (2, 30), (9, 1), (33, 31)]]
    context = rng.integers(3, 512, 6).tolist()
    greedy = []
    for _ in range(5):
        greedy.append(int(log_softmax(cfg, params, context + greedy)[-1].argmax()))
    return pairs + [(context, greedy)]


def test_scoring_equals_full_forward_and_padding_changes_nothing(model):
    cfg, params, _ = model
    requests = requests_for(cfg, params, np.random.default_rng(0))
    batched = Scorer(cfg, params, batch_size=4).loglikelihood(requests)
    alone = Scorer(cfg, params, batch_size=1)
    for (context, continuation), (logprob, greedy) in zip(requests, batched):
        expected, expected_greedy = direct_score(cfg, params, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        single, single_greedy = alone.loglikelihood([(context, continuation)])[0]
        assert logprob == pytest.approx(single, rel=1e-6) and greedy == single_greedy
    assert batched[-1][1] and not any(g for _, g in batched[:-1])  # both answers are exercised
    assert Scorer(cfg, params, batch_size=4).loglikelihood(r for r in requests) == batched  # any iterable
    # a model directory saved by a GPU run names cudnn attention: scored here with a kernel that runs
    assert Scorer(cfg.replace(attention_impl="cudnn"), params, batch_size=4).loglikelihood(requests) == batched


def test_splash_scores_lengths_it_does_not_take_with_the_xla_kernel(model):
    """`auto` is splash on TPU, which takes lengths that are multiples of 128 only, while scoring
    pads requests to 16, 32, ... tokens and held-out windows may be any length (here 32): such
    shapes are scored with `xla`, so the numbers are its own (each was splash's length error; on
    CPU splash runs in Pallas' interpreter, with the check it has on TPU)."""
    cfg, params, tok = model
    splash = cfg.replace(attention_impl="splash")
    requests = [([1, 5, 9], [6, 7]), (list(range(3, 60)), [8])]
    assert Scorer(splash, params, batch_size=2).loglikelihood(requests) == \
        Scorer(cfg, params, batch_size=2).loglikelihood(requests)
    assert Scorer(splash, params).loglikelihood_rolling([[5, 6, 7]], 1) == \
        Scorer(cfg, params).loglikelihood_rolling([[5, 6, 7]], 1)
    docs = documents()[:3]
    assert evaluate_documents(splash, params, docs, tok, 32) == evaluate_documents(cfg, params, docs, tok, 32)


def test_generation_padded_to_a_bucket_is_unchanged(model):
    """generate(pad_to=...), as the lm-eval model batches prompts, gives what unpadded prompts give,
    and prompts of other lengths padded to the same bucket reuse the compiled prefill."""
    from llama_jax.generate import _prefill, generate

    cfg, params, _ = model
    prompts = [[1, 40, 50, 60], [1, 70]]
    assert generate(cfg, params, prompts, 6, pad_to=16) == generate(cfg, params, prompts, 6)
    compiled = _prefill._cache_size()
    generate(cfg, params, [[1, 80, 90], [1, 40, 50, 60, 70, 80]], 6, pad_to=16)
    assert _prefill._cache_size() == compiled  # the same shape: the prompts were padded to 16


def test_calls_with_fewer_requests_than_a_batch_share_compiled_shapes():
    """A call with fewer requests than batch_size gets a batch of the next power of two rows, so
    calls of 5 to 8 requests (of one length bucket) share one compiled shape: each count was a
    shape of its own, compiled anew. Their scores are those of the requests scored alone."""
    from llama_jax import LLaMAConfig, init_params

    cfg = LLaMAConfig(vocab_size=96, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=40)  # its own compiles
    scorer = Scorer(cfg, init_params(cfg, 0), batch_size=64)
    requests = [([1, 5 + i, 9], [6, 7]) for i in range(8)]
    alone = [scorer.loglikelihood([r])[0] for r in requests]
    compiled = scorer.forward.scores._cache_size()
    for n in range(5, 9):
        assert scorer.loglikelihood(requests[:n]) == alone[:n]
    assert scorer.forward.scores._cache_size() == compiled + 1


@pytest.mark.parametrize("n", [0, 1, CONTEXT - 1, CONTEXT, CONTEXT + 1, 3 * CONTEXT + 7])
def test_rolling_windows_are_the_harness_windows(n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(10, 10 + n))
    windows = rolling_windows(tokens, 1, CONTEXT)
    harness = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, CONTEXT, 1)]
    assert windows == [(list(a), list(b)) for a, b in harness]
    assert [t for _, continuation in windows for t in continuation] == tokens  # each token scored once
    assert all(len(c) + len(k) <= CONTEXT + 1 for c, k in windows)


def test_rolling_loglikelihood(model):
    cfg, params, _ = model
    tokens = np.random.default_rng(1).integers(3, 512, 2 * CONTEXT + 11).tolist()
    rolled = Scorer(cfg, params, batch_size=2).loglikelihood_rolling([tokens, tokens[:5], []], prefix_token=1)
    expected = sum(direct_score(cfg, params, c, k)[0] for c, k in rolling_windows(tokens, 1, CONTEXT))
    assert rolled[0] == pytest.approx(expected, abs=1e-3)
    assert rolled[1] == pytest.approx(direct_score(cfg, params, [1], tokens[:5])[0], abs=1e-4)
    assert rolled[2] == 0.0
    rows = np.asarray([tokens[:9], tokens[9:18]])  # a 2-D array of rows, as a batch is
    assert Scorer(cfg, params).loglikelihood_rolling(rows, prefix_token=1) == \
        Scorer(cfg, params).loglikelihood_rolling([tokens[:9], tokens[9:18]], prefix_token=1)


def test_long_context_is_truncated_from_the_left_with_a_warning(model):
    cfg, params, _ = model
    rng = np.random.default_rng(2)
    context, continuation = rng.integers(3, 512, 3 * CONTEXT).tolist(), rng.integers(3, 512, 4).tolist()
    scorer = Scorer(cfg, params, batch_size=2)
    with pytest.warns(UserWarning, match=r"1 of 1 requests are longer than the model's context .* truncated from "
                                         r"the left"):
        (logprob, _), = scorer.loglikelihood([(context, continuation)])
    kept = (context + continuation)[-(CONTEXT + 1):-len(continuation)]
    assert logprob == pytest.approx(direct_score(cfg, params, kept, continuation)[0], abs=1e-4)


@pytest.mark.parametrize("request_, message", [
    (([], [5]), "request 0: the context is empty"),
    (([5], []), "request 0: the continuation is empty"),
    (([5], [6] * (CONTEXT + 1)), rf"continuation has {CONTEXT + 1} tokens, more than the model's context of {CONTEXT}"),
    (([5], [512]), r"request 0: token id 512; valid: integers in \[0, 512\)"),
    (([5, 2.5], [6]), r"request 0: token id 2.5; valid: integers in \[0, 512\)"),  # not scored as 2
])
def test_scoring_bad_requests(model, request_, message):
    cfg, params, _ = model
    with pytest.raises(ValueError, match=message):
        Scorer(cfg, params).loglikelihood([request_])


@pytest.mark.parametrize("call, error, message", [
    # a string was scored as one document per character
    (lambda c, p, t: evaluate_documents(c, p, "hello world", t, 32), TypeError,
     r"documents is an iterable of texts, got one str; pass \[text\]"),
    (lambda c, p, t: evaluate_documents(c, p, [], t, 32), ValueError,  # was loss 0, perplexity 1
     r"nothing to evaluate: 0 documents with no target"),
    (lambda c, p, t: evaluate_tokens(c, p, [([1, 512, 5], 3)], 32), ValueError,  # was a NaN loss
     r"document 0: token id 512 is outside the vocabulary \[0, 512\)"),
    (lambda c, p, t: evaluate_tokens(c, p, [([1, 5], 2), ([1, -3, 5], 3)], 32), ValueError,
     r"document 1: token id -3 is outside the vocabulary"),
    (lambda c, p, t: evaluate_tokens(c, p, [([1, 2.7, 5], 3)], 32), ValueError,  # was scored as 2
     r"document 0: token ids must be a sequence of integers, got float64"),
    (lambda c, p, t: evaluate_documents(c.replace(n_layers=c.n_layers + 1), p, ["hi"], t, 32), ValueError,
     r"parameter \['layers'\].* has shape"),  # was JAX's scan length error
    (lambda c, p, t: evaluate_documents(c, {"params": p}, ["hi"], t, 32), ValueError, r"got Flax's variables"),
    (lambda c, p, t: Scorer(c, p, max_length=0), ValueError,  # was taken as max_seq_len
     r"max_length=0 is out of range; valid: an integer from 1 to the model's max_seq_len \(96\), or None"),
    (lambda c, p, t: Scorer(c, p, max_length=1.5), ValueError, r"max_length=1.5 is out of range"),
    (lambda c, p, t: Scorer(c, p).loglikelihood_rolling([[5, 6]], prefix_token=None), ValueError,
     r"prefix_token must be a token id in \[0, 512\) \(e.g. BOS\), got None"),  # was a TypeError from int()
    # the shape of the input, as a Python caller may get it wrong (each was a bare unpacking error or worse)
    (lambda c, p, t: Scorer(c, p).loglikelihood(([1, 5, 6], [7, 8])), ValueError,
     r"requests must be a list of \(context ids, continuation ids\) pairs \(wrap one: \[\(context, continuation\)\]\)"),
    (lambda c, p, t: Scorer(c, p).loglikelihood([([1, 5], 7)]), ValueError,
     r"requests must be a list of \(context ids"),
    (lambda c, p, t: Scorer(c, p).loglikelihood_rolling([1, 5, 6], prefix_token=1), ValueError,
     r"token_lists must be a list of token-id sequences \(wrap one: \[tokens\]\)"),
    (lambda c, p, t: evaluate_tokens(c, p, [[1, 5], [1, 7]], 32), ValueError,
     r"document 0: documents are \(token ids, bytes of the text\) pairs"),
    (lambda c, p, t: evaluate_tokens(c, p, [([1, 5, 6], -5)], 32), ValueError,  # was a negative bits per byte
     r"document 0: the bytes of its text must be an integer >= 0, got -5"),
    (lambda c, p, t: evaluate_documents(c, p, {"text": "a b c"}, t, 32), TypeError,  # its key was scored
     r"documents is an iterable of texts, got a dict"),
    (lambda c, p, t: evaluate_documents(c, p, ["a b"], "tokenizer.model", 32), TypeError,
     r"tokenizer must be a loaded tokenizer \(llama_jax.tokenizer.load_tokenizer\(path\)\)"),
    (lambda c, p, t: evaluate_documents(c, p, ["a b"], t, 32, mesh="cpu"), TypeError,
     r"mesh must be a jax.sharding.Mesh of axes"),
    (lambda c, p, t: Scorer(c.to_dict(), p), TypeError, r"config must be an LLaMAConfig"),
])
def test_evaluation_api_bad_input(model, call, error, message):
    cfg, params, tok = model
    with pytest.raises(error, match=message):
        call(cfg, params, tok)


def documents() -> list[str]:
    """Texts of many lengths (windows of one, several and part of a row), one of them empty."""
    corpus = EmbeddedCorpus()
    return [corpus[3][:n] for n in (0, 40, 150, 900)] + [corpus[7][:2500], "naïve café ☃"]


def test_exact_evaluation_counts_every_target_once(model):
    cfg, params, tok = model
    docs, seq_len = documents(), 32
    result = evaluate_documents(cfg, params, docs, tok, seq_len, batch_size=3)
    nll = correct = tokens = 0
    for text in docs:  # the direct sum: each document's windows, one unpadded forward pass each
        ids = tok.encode(text, bos=True, eos=True)
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start:start + seq_len + 1]
            logp = log_softmax(cfg, params, window[:-1])
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
            correct += int((logp.argmax(-1) == window[1:]).sum())
            tokens += len(window) - 1
    assert tokens == sum(len(tok.encode(t, bos=True, eos=True)) - 1 for t in docs)
    assert (result.tokens, result.correct, result.documents) == (tokens, correct, len(docs))
    assert result.nll == pytest.approx(nll, rel=1e-5)
    metrics = result.metrics()
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    assert metrics["bytes"] == n_bytes
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert metrics["accuracy"] == correct / tokens

    rows = list(packed_rows((np.asarray(tok.encode(t, bos=True, eos=True)) for t in docs), seq_len))
    assert sum(r["loss_mask"].sum() for r in rows) == tokens  # packing drops nothing
    first = evaluate_documents(cfg, params, docs, tok, seq_len, batch_size=4, max_batches=1)
    assert first.tokens == sum(r["loss_mask"].sum() for r in rows[:4]) and first.bytes is None
    # the documents begun: those whose first window (the one starting with BOS) is in the batch; the one
    # read to find the fourth row full, none of whose windows it holds, was counted too
    begun = sum(int(np.sum((r["positions"] == 0) & (r["tokens"] == tok.bos_id) & (r["loss_mask"] > 0)))
                for r in rows[:4])
    assert 0 < begun < len(docs) and first.documents == begun
    # a batch size far above the data: one batch of the rows it makes (padded to it, hundreds of GB)
    whole = evaluate_documents(cfg, params, docs, tok, seq_len, batch_size=10**9)
    assert (whole.tokens, whole.correct) == (tokens, correct) and whole.nll == pytest.approx(nll, rel=1e-5)


def test_evaluation_on_a_mesh_equals_one_device(model, model_dirs):
    """Sharded parameters (FSDP over the 8 test devices) and a trainer's mesh and axis rules, as
    the run loop passes them: the same numbers as on one device."""
    from llama_jax.experiment import base_config
    from llama_jax.train import build_trainer

    cfg, params, tok = model
    config = base_config("init_from")
    config.checkpoint.init_from = str(model_dirs[1])
    config.train.update(seq_len=32, batch_size=8)
    trainer = build_trainer(config)
    assert trainer.mesh.size == 8
    _, sharded = load_model(model_dirs[1], shardings=trainer.state_shardings.params)
    docs = documents()
    one = evaluate_documents(cfg, params, docs, tok, 32, batch_size=8)
    many = evaluate_documents(cfg, sharded, docs, tok, 32, batch_size=5, mesh=trainer.mesh, context=trainer.context)
    assert (many.tokens, many.correct, many.documents, many.bytes) == (one.tokens, one.correct, one.documents, one.bytes)
    assert many.nll == pytest.approx(one.nll, rel=1e-5)


def _small_model():
    from llama_jax import LLaMAConfig, init_params

    cfg = LLaMAConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    return cfg, init_params(cfg, 0)


def test_evaluation_in_a_trainers_context_without_its_mesh_equals_one_device():
    """Given a trainer's context (or inside one) and no mesh, batch rows are split over that context's
    mesh: they were not rounded up to its data x fsdp, and its per-device attention's shard_map failed."""
    from llama_jax.sharding import make_mesh, mesh_context

    cfg, params = _small_model()
    rng = np.random.default_rng(0)
    documents = [(rng.integers(1, 64, n).astype(np.int32), n) for n in (40, 17, 5, 33, 12)]
    one = evaluate_tokens(cfg, params, documents, 16, 5)
    mesh = make_mesh(2, 4, 1, jax.devices())
    given = evaluate_tokens(cfg, params, documents, 16, 5, context=lambda: mesh_context(mesh))
    with mesh_context(mesh):
        inside = evaluate_tokens(cfg, params, documents, 16, 5)
    for many in (given, inside):
        assert (many.tokens, many.correct, many.documents) == (one.tokens, one.correct, one.documents)
        assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_params_on_one_device_are_evaluated_on_a_mesh():
    """Parameters committed to one device (as `load_model` without shardings gives them) are placed
    on the mesh the batches go to, given as mesh= or enclosing the call: the jitted call refused
    them ("incompatible devices"), inside an enclosing `with mesh:` too, which worked before the
    batches took that mesh. NumPy arrays in a FrozenDict are placed too. The scores equal one device's."""
    from llama_jax.sharding import make_mesh, mesh_context

    cfg, params = _small_model()
    params = jax.device_put(params, jax.devices()[0])
    documents = [(np.arange(1, 30, dtype=np.int32) % 64, 29), (np.arange(3, 12, dtype=np.int32), 9)]
    one = evaluate_tokens(cfg, params, documents, 16, 2)
    mesh = make_mesh(2, 1, 1, jax.devices()[:2])
    given = evaluate_tokens(cfg, params, documents, 16, 2, mesh=mesh)
    with mesh_context(mesh):
        inside = evaluate_tokens(cfg, params, documents, 16, 2)
    frozen = evaluate_tokens(cfg, flax.core.freeze(jax.tree.map(np.asarray, params)), documents, 16, 2, mesh=mesh)
    for many in (given, inside, frozen):
        assert (many.tokens, many.correct, many.documents) == (one.tokens, one.correct, one.documents)
        assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_evaluation_on_a_mesh_that_does_not_divide_the_heads_is_refused():
    """A mesh whose tensor axis does not divide the K/V heads is refused in one line naming both, as
    `generate` and `load_model` refuse it, before the first compile (the per-device attention's
    shard_map raised a many-line error there)."""
    from llama_jax.sharding import make_mesh, mesh_context

    cfg, params = _small_model()
    mesh = make_mesh(1, 2, 4, jax.devices())
    documents = [(np.arange(1, 20, dtype=np.int32), 19)]
    for score in (lambda: evaluate_tokens(cfg, params, documents, 16, 4, mesh=mesh, context=lambda: mesh_context(mesh)),
                  lambda: Scorer(cfg, params, mesh=mesh, context=lambda: mesh_context(mesh))):
        with pytest.raises(ValueError, match=r"^model.n_kv_heads=2 is not divisible by mesh.tensor=4; choose a mesh"):
            score()


def test_document_windows_overlap_by_one():
    tokens = np.arange(10)
    assert [w.tolist() for w in document_windows(tokens, 4)] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    assert [w.tolist() for w in document_windows(tokens[:5], 4)] == [[0, 1, 2, 3, 4]]


def write_text_config(tmp_path, files: list, eval_fraction: float = 0.4, seq_len: int = 32):
    path = tmp_path / "config.py"
    path.write_text(
        "from llama_jax.experiment import base_config\n\n"
        "def get_config():\n"
        "    config = base_config('debug', vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,\n"
        f"                         ffn_dim=64, max_seq_len={CONTEXT})\n"
        f"    config.data.update(source='text', files={[str(f) for f in files]!r}, eval_fraction={eval_fraction})\n"
        f"    config.train.update(seq_len={seq_len}, batch_size=8, steps=1)\n"
        "    config.optimizer.update(warmup_steps=0)\n"
        "    return config\n")
    return path


def test_eval_command(model, model_dirs, tmp_path, capsys):
    """`llama-jax eval` shards the model over the 8 test devices (FSDP, the config's mesh) and
    gives the numbers of one device."""
    cfg, params, tok = model
    files = []
    for i, text in enumerate(documents()):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    config = write_text_config(tmp_path, files)
    out = tmp_path / "eval.json"
    assert main(["eval", str(model_dirs[1]), "--config", str(config), "--config.train.seq_len=16",
                 "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    held_out = [files[i].read_text(encoding="utf-8") for i in split_indices(len(files), 0.4)[1]]
    expected = evaluate_documents(cfg, params, held_out, tok, 16, batch_size=8).metrics()
    assert {k: written[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert written["documents"] == len(held_out) == 3 and written["seq_len"] == 16
    assert written["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # a rerun replaces its own earlier result (and nothing else: test_results_replace_only_an_earlier_result)
    out.write_text(json.dumps({**written, "tokens": -1}))
    assert main(["eval", str(model_dirs[1]), "--config", str(config), "--config.train.seq_len=16",
                 "--output", str(out)]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text()) == written


def test_eval_of_a_run_equals_eval_of_its_export(model_dirs, tmp_path, capsys):
    files = []
    for i, text in enumerate(documents()):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    config = write_text_config(tmp_path, files)
    run = tmp_path / "run"
    tokenizer = ["--config.data.tokenizer", str(model_dirs[1] / "tokenizer.model")]
    assert main(["train", "--config", str(config), "--workdir", str(run), *tokenizer,
                 "--config.checkpoint.async_save=False", "--config.train.eval_every=1",
                 "--config.train.eval_batches=-1"]) == 0
    assert main(["export", "--workdir", str(run), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    # A run's parameters are restored straight onto a mesh, each array with the shardings the
    # trainer gives it, and hold what restoring onto one device gives.
    from llama_jax.evaluate import load_run
    from llama_jax.model import abstract_params
    from llama_jax.sharding import make_mesh, tree_shardings

    mesh = make_mesh(2, 4, 1, jax.devices())
    cfg, on_mesh, *_ = load_run(run, mesh=mesh)
    _, on_one, *_ = load_run(run)
    expected = tree_shardings(mesh, abstract_params(cfg))
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s, on_mesh, expected))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), on_mesh, on_one))
    with pytest.raises(ValueError, match="n_kv_heads=1 is not divisible by mesh.tensor=2"):
        load_run(run, mesh=make_mesh(1, 4, 2, jax.devices()))
    assert main(["eval", "--workdir", str(run)]) == 0
    of_run = json.loads((run / "eval-1.json").read_text())
    assert json.loads(capsys.readouterr().out) == of_run and of_run["step"] == 1
    assert main(["eval", str(tmp_path / "exported"), "--config", str(config), *tokenizer]) == 0
    of_export = json.loads((tmp_path / "exported" / "eval.json").read_text())
    for key in ("loss", "perplexity", "bits_per_byte", "accuracy", "tokens", "documents", "bytes"):
        assert of_run[key] == of_export[key]
    # A score of other windows beside a model is eval-TAG.json, and its eval.json is kept (it was replaced)
    exported = tmp_path / "exported"
    kept = (exported / "eval.json").read_text()
    capsys.readouterr()
    assert main(["eval", str(exported), "--config", str(config), *tokenizer, "--seq-len", "8"]) == 0
    [other] = exported.glob("eval-*.json")
    assert json.loads(other.read_text())["seq_len"] == 8 and (exported / "eval.json").read_text() == kept
    assert capsys.readouterr().err.strip().endswith(f"written to {other}")
    # The run loop's own evaluation (train.eval_batches=-1: the whole held-out set) is the same code
    # on the trainer's mesh: the same counts, the same loss up to float rounding.
    logged = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert len(logged) == 1 and logged[0]["step"] == 1 and logged[0]["eval_tokens"] == of_run["tokens"]
    assert [logged[0][f"eval_{k}"] for k in ("loss", "accuracy", "bits_per_byte")] == pytest.approx(
        [of_run[k] for k in ("loss", "accuracy", "bits_per_byte")], rel=1e-5)
    # A run on a raw source is evaluated on its own prepared copy of it: the files edited, removed
    # or moved since change nothing (reading them again would hold out other documents).
    assert of_run["data"]["source"] == "prepared" and of_run["data"]["path"] == str(run / "data")
    files[0].unlink()
    for file in files[1:]:
        file.write_text(file.read_text() + " and more", encoding="utf-8")
    assert main(["eval", "--workdir", str(run), "--output", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [again[k] for k in ("loss", "tokens", "documents")] == [of_run[k] for k in ("loss", "tokens", "documents")]
    # Windows of another length are a score of their own (they replaced eval-1.json)
    own = (run / "eval-1.json").read_text()
    assert main(["eval", "--workdir", str(run), "--seq-len", "8"]) == 0
    [shorter] = run.glob("eval-1-*.json")
    assert json.loads(shorter.read_text())["seq_len"] == 8 and (run / "eval-1.json").read_text() == own
    # Prepared data damaged in place (ids beyond the vocabulary: a NaN loss, written as JSON's NaN)
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    [shard] = (damaged / "data").glob("held_out-*.tokens.bin")
    with open(shard, "r+b") as f:
        f.seek(2)
        f.write(b"\xff\xff")
    capsys.readouterr()
    assert main(["eval", "--workdir", str(damaged)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(r"damaged/data/held_out-00000.tokens.bin is damaged: it holds the token id "
                                          r"65535, outside the tokenizer's 512 ids; remove \S+/damaged/data and "
                                          r"prepare it again", err), err
    assert (damaged / "eval-1.json").read_text() == own
    # the export's eval.json is a result of the model it scored: exporting again over it replaces both, but
    # not a file of the user's that only looks like one
    (tmp_path / "exported" / "eval-notes.json").write_text("{}\n")
    capsys.readouterr()
    assert main(["export", "--workdir", str(run), str(tmp_path / "exported"), "--overwrite"]) == 2
    assert "holds 'eval-notes.json', which is not part of a llama_jax model directory" in capsys.readouterr().err
    (tmp_path / "exported" / "eval-notes.json").unlink()
    assert main(["export", "--workdir", str(run), str(tmp_path / "exported"), "--overwrite"]) == 0
    assert not any((tmp_path / "exported").glob("eval*.json"))


def test_eval_of_a_run_trained_on_another_device_count(model_dirs, tmp_path, capsys):
    """A run whose config.json sets a mesh of 4 devices, evaluated on 8: the refusal said only that the
    mesh did not fit the device count, not that it was the run's or how to evaluate here."""
    from llama_jax.experiment import load_config
    from llama_jax.run import train_and_evaluate

    files = []
    for i, text in enumerate(documents()):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    config = load_config(write_text_config(tmp_path, files),
                         [f"data.tokenizer={model_dirs[1] / 'tokenizer.model'}", "mesh.fsdp=4"])
    run = tmp_path / "run"
    train_and_evaluate(config, run, progress=False, devices=jax.devices()[:4])
    capsys.readouterr()
    assert main(["eval", "--workdir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llama-jax eval: error: mesh: data x fsdp x tensor = 1 x 4 x 1 = 4, but the device count is 8; "
                   f"the product must equal it (use -1 for one axis to take the rest); that is the mesh "
                   f"{run / 'config.json'} sets: --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 "
                   f"shards the model over the 8 devices here"), err
    assert not list(run.glob("eval-*.json"))
    assert main(["eval", "--workdir", str(run), "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                 "--config.mesh.tensor=1"]) == 0
    assert json.loads((run / "eval-1.json").read_text())["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}


# ---- lm-eval ---------------------------------------------------------------------------------


def write_tasks(directory, long_context: str):
    """Three tasks of local JSON files: multiple choice (loglikelihood), perplexity
    (loglikelihood_rolling) and generation (generate_until)."""
    directory.mkdir()
    corpus = EmbeddedCorpus()
    questions = [
        ("The for statement is used to", ["iterate over a sequence", "define a class", "raise an error"], 0),
        ("A class definition creates", ["a new module", "a class object", "a float"], 1),
        ("The with statement is used to", ["wrap a block with methods of a context manager", "add numbers"], 0),
        (long_context + "\nWhich keyword ends a loop early?", ["break", "continue", "pass", "return"], 0),
        ("Strings are", ["immutable sequences of Unicode code points", "mutable lists"], 0),
    ]
    with open(directory / "mc.jsonl", "w") as f:
        for q, choices, answer in questions:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    with open(directory / "ppl.jsonl", "w") as f:
        for text in (corpus[5][:300], corpus[11][:1200], "Short text."):
            f.write(json.dumps({"text": text.lstrip()}) + "\n")
    with open(directory / "gen.jsonl", "w") as f:
        for prompt in ("The try statement", "Name the operator for integer division:", long_context):
            f.write(json.dumps({"prompt": prompt, "target": "x"}) + "\n")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(directory / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common.format(directory / "ppl.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (directory / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(directory / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and a Hugging Face cache of the test's own."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf-home")),
                        ("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))):
        monkeypatch.setenv(name, value)


def test_harness_matches_its_hugging_face_backend(model_dirs, tmp_path, offline):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llama_jax.lm_eval_model  # noqa: F401  (registers "llama_jax")

    hf_dir, jax_dir = model_dirs
    write_tasks(tmp_path / "tasks", long_context=EmbeddedCorpus()[2][:600])
    tasks = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    runs = {}
    for name, args in (("hf", f"pretrained={hf_dir},dtype=float32"),
                       ("llama_jax", f"pretrained={jax_dir},data=2,fsdp=2,tensor=2")):  # over the 8 test devices
        manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
        with pytest.warns(UserWarning, match="truncated from the left") if name == "llama_jax" else contextlib.nullcontext():
            runs[name] = lm_eval.simple_evaluate(model=name, model_args=args, tasks=tasks, batch_size=3,
                                                 device="cpu", task_manager=manager, log_samples=True)
    hf, ours = runs["hf"], runs["llama_jax"]
    for task in tasks:
        hf_samples, our_samples = hf["samples"][task], ours["samples"][task]
        assert len(hf_samples) == len(our_samples) > 0
        for a, b in zip(hf_samples, our_samples):
            if task == "tiny_gen":
                assert a["resps"] == b["resps"]
                assert all(r[0] for r in b["resps"])  # something was generated
            else:
                assert len(a["resps"]) == len(b["resps"]) > 0
                for x, y in zip(a["resps"], b["resps"]):
                    if task == "tiny_mc":
                        assert y[0][0] == pytest.approx(x[0][0], abs=1e-4) and y[0][1] == x[0][1]
                    else:  # sums over hundreds of tokens, which hf adds up in float32: 1e-4 or 1e-6 relative
                        assert y[0] == pytest.approx(x[0], abs=1e-4, rel=1e-6)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == hf["results"]["tiny_mc"][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_ppl"][metric] == pytest.approx(hf["results"]["tiny_ppl"][metric], rel=1e-5)


def test_generation_ends_at_every_end_id_of_the_generation_config(model_dirs, tmp_path):
    """A model directory whose generation_config.json lists several end-of-text ids (as LLaMA 3
    instruct models list <|eot_id|> besides <|end_of_text|>): generate_until ends each row where
    transformers' generate, given the same ids, stops. The text is what the harness's `hf` backend
    decodes (skip_special_tokens): an end id that is an ordinary piece, as here, keeps its text."""
    import shutil

    import transformers
    from lm_eval.api.instance import Instance

    from llama_jax.lm_eval_model import LlamaJaxLM

    hf_dir, jax_dir = model_dirs
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(jax_dir)
    prompts = ["The try statement", "Name the operator for integer division:"]

    def hf_generate(prompt: str, eos: list[int]) -> list[int]:
        ids = tokenizer.encode(prompt, bos=True)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                    pad_token_id=0)
        return out[0, len(ids):].tolist()

    free = hf_generate(prompts[0], [tokenizer.eos_id])
    end = next(t for k, t in enumerate(free) if k >= 2 and t not in free[:k] and t != tokenizer.eos_id)
    model_dir = tmp_path / "model"
    shutil.copytree(jax_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_id, end]}))
    lm = LlamaJaxLM(str(model_dir), batch_size=2)
    ours = lm.generate_until(
        [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 12}), i) for i, p in enumerate(prompts)])
    for prompt, text in zip(prompts, ours):
        new = hf_generate(prompt, [tokenizer.eos_id, end])
        stop = next((k + 1 for k, t in enumerate(new) if t in (tokenizer.eos_id, end)), len(new))
        assert text == tokenizer.decode([t for t in new[:stop] if t not in tokenizer.special_ids])
    assert len(ours[0]) < len(tokenizer.decode(free))  # the first row did end early

    # Generated text leaves special pieces out, <unk> included (SentencePiece itself writes " ⁇ "), as `hf` does.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer.encode("The try statement", bos=True) + [0, 0] + tokenizer.encode("ends", bos=False) + [2]
    assert lm.tok_decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) != tokenizer.decode(ids)

    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match="eos_token_id='</s>'; expected a token id or a list of token ids"):
        LlamaJaxLM(str(model_dir))


def test_generation_ends_where_the_model_writes_the_eos_text_as_the_hugging_face_backend_ends(model_dirs, tmp_path):
    """The `hf` backend adds the EOS token's text to every request's stop sequences: a model that
    writes "</s>" as ordinary pieces ("<", "/", "s", ">") ends there. A model that, whatever its
    context, follows each piece of "▁The</s>x" with the next (blocks that add nothing, and output
    rows that are the previous piece's embedding) writes it over and over."""
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llama_jax.lm_eval_model import LlamaJaxLM

    hf_dir, jax_dir = model_dirs
    tokenizer = load_tokenizer(jax_dir)
    chain = [tokenizer.sp.piece_to_id(piece) for piece in ["▁The", "<", "/", "s", ">", "x"]]
    assert 0 not in chain  # (no piece is unknown)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        embedding = model.model.embed_tokens.weight
        for piece, following in zip(chain, chain[1:] + chain[:1]):
            model.lm_head.weight[following] = 50 * embedding[piece] / embedding[piece].norm()
    model.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, tmp_path / "hf")
    assert main(["convert", "--from", "hf", "--to", "jax", str(tmp_path / "hf"), str(tmp_path / "jax")]) == 0
    requests = [Instance("generate_until", {}, (prompt, {"until": ["\n\n"], "max_gen_toks": 12}), i)
                for i, prompt in enumerate(["The", "x"])]
    hf = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", batch_size=3, device="cpu").generate_until(requests)
    assert hf == ["", "The"]
    assert LlamaJaxLM(str(tmp_path / "jax"), batch_size=3).generate_until(requests) == hf


def test_a_stop_sequence_that_is_a_special_token_s_text_ends_the_row_at_that_token(tmp_path):
    """A LLaMA-3 task's `until: ["<|eot_id|>"]`: special tokens are no text, so the row ends where
    the model emits that token, as under the `hf` backend for a row alone in its batch (its stop
    check reads the tokens' text with the special ones written out). The model is a random one
    whose embedding and output rows of <|eot_id|> and of the first special token it emits are
    swapped: it emits <|eot_id|> there and goes on as before."""
    import llama_jax
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llama_jax.generate import generate
    from llama_jax.lm_eval_model import LlamaJaxLM
    from tests.test_tokenizer import _tiktoken_file, _toy_ranks

    (tmp_path / "tokenizer.model").write_bytes(_tiktoken_file(_toy_ranks()))
    tokenizer = load_tokenizer(tmp_path / "tokenizer.model")
    cfg = llama_jax.LLaMAConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=128,
                                max_seq_len=64)
    params = jax.tree_util.tree_map(np.array, llama_jax.init_params(cfg, rng=0))
    prompt, eot = "the thing", tokenizer.special_tokens["<|eot_id|>"]
    free = generate(cfg, params, [tokenizer.encode(prompt)], 10)[0]
    special = next(t for t in free if t in tokenizer.special_ids and t != tokenizer.eos_id)
    for rows in (params["embed"]["embedding"], params["lm_head"].T):
        rows[[special, eot]] = rows[[eot, special]]
    save_model(tmp_path / "jax", cfg, params, tokenizer=tmp_path / "tokenizer.model")
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "jax"), str(tmp_path / "hf")]) == 0
    requests = [Instance("generate_until", {}, (prompt, {"until": until, "max_gen_toks": 10}), i)
                for i, until in enumerate([["\x00"], ["<|eot_id|>"]])]
    hf = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", batch_size=2, device="cpu").generate_until(requests)
    assert hf[0].startswith(hf[1]) and len(hf[1]) < len(hf[0])  # the stop ended the second row early
    assert LlamaJaxLM(str(tmp_path / "jax"), batch_size=2).generate_until(requests) == hf


def test_sampled_repeats_are_independent_samples(model_dirs):
    """The harness asks for a task's repeats as copies of one request: each copy, in one batch or in
    several, is a sample of its own (one key per row and per batch), and the run is reproducible."""
    from lm_eval.api.instance import Instance

    from llama_jax.lm_eval_model import LlamaJaxLM

    request = ("The try statement", {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})
    requests = [Instance("generate_until", {}, request, i) for i in range(12)]  # batches of 8 (the devices' rows)
    texts = LlamaJaxLM(str(model_dirs[1])).generate_until(requests)
    assert len(set(texts)) == 12, texts
    assert LlamaJaxLM(str(model_dirs[1])).generate_until(requests) == texts
    bad = Instance("generate_until", {}, (request[0], {**request[1], "temperature": -1.0}), 0,
                   metadata=("tiny_gen", 0, 1))
    with pytest.raises(ValueError, match=r"^tiny_gen's generation_kwargs \{.*'temperature': -1.0\}: temperature "
                                         r"must be a finite number >= 0 \(0 is greedy\), got -1.0$"):  # (unnamed)
        LlamaJaxLM(str(model_dirs[1])).generate_until([bad])


def test_new_tokens_that_leave_no_room_name_the_task_s_setting(model_dirs):
    """A task may give its number of new tokens under any name the harness takes (max_new_tokens,
    max_tokens, ...): too many for the context is refused naming that setting of the task's, not
    llama-jax's --max-gen-toks, which the task's setting overrides."""
    from lm_eval.api.instance import Instance

    from llama_jax.lm_eval_model import LlamaJaxLM

    request = Instance("generate_until", {}, ("The try statement", {"until": [], "max_new_tokens": 100}), 0)
    with pytest.raises(ValueError, match=rf"^max_new_tokens=100 leaves no room for a prompt in the model's context of "
                                         rf"{CONTEXT} tokens; valid: below {CONTEXT} \(the task's generation_kwargs "
                                         rf"set it\)$"):
        LlamaJaxLM(str(model_dirs[1])).generate_until([request])


def test_a_chat_template_is_refused_in_one_line(model_dirs, tmp_path, offline):
    """lm-eval's apply_chat_template asks the model to format each prompt as a chat: refused with
    what would be valid, not the harness's NotImplementedError asking to implement it."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llama_jax.lm_eval_model import LlamaJaxLM

    write_tasks(tmp_path / "tasks", long_context="Loops")
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    with pytest.raises(ValueError, match=r"^llama_jax does not apply chat templates \(lm-eval's apply_chat_template, "
                                         r"with or without fewshot_as_multiturn\): .*; valid: evaluate without"):
        lm_eval.simple_evaluate(model=LlamaJaxLM(str(model_dirs[1])), tasks=["tiny_mc"], limit=1,
                                task_manager=manager, apply_chat_template=True)


def test_lm_eval_command(model_dirs, tmp_path, capsys, offline):
    write_tasks(tmp_path / "tasks", long_context="Loops")
    out = tmp_path / "results.json"
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "tiny_mc", "--include-path", str(tmp_path / "tasks"),
                 "--limit", "3", "--batch-size", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "acc" in printed
    results = json.loads(out.read_text())["results"]["tiny_mc"]
    assert 0 <= results["acc,none"] <= 1
    config = json.loads(out.read_text())["config"]  # what was scored, and how
    assert (config["model"], config["batch_size"]) == ("llama_jax", 8)  # 2 rounded up to the 8 devices' rows
    assert config["model_args"].startswith(f"pretrained={model_dirs[1]},batch_size=8,max_length={CONTEXT},")
    # the default is FSDP over the 8 test devices; data x FSDP x tensor parallel gives the same scores
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "tiny_mc", "--include-path", str(tmp_path / "tasks"),
                 "--limit", "3", "--batch-size", "2", "--output", str(out), "--mesh", "2,2,2"]) == 0
    capsys.readouterr()
    assert json.loads(out.read_text())["results"]["tiny_mc"] == results

    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "tiny_mc", "--include-path", str(tmp_path / "tasks"),
                 "--mesh", "3,-1,1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "llama-jax lm-eval: error: mesh: the device count, 8, is not divisible by the fixed mesh sizes "
        "(data=3 x tensor=1 = 3)")
    with pytest.raises(SystemExit) as exited:
        main(["lm-eval", str(model_dirs[1]), "--tasks", "tiny_mc", "--mesh", "1,8"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("llama-jax lm-eval: error: argument --mesh: expected three integers "
                                       "DATA,FSDP,TENSOR such as 1,-1,1, got '1,8' (see llama-jax lm-eval --help)\n")

    # a generation task that leaves max_gen_toks to the model: its default, 256, does not fit this model's context
    (tmp_path / "tasks" / "tiny_gen_default.yaml").write_text(
        (tmp_path / "tasks" / "tiny_gen.yaml").read_text().replace("task: tiny_gen", "task: tiny_gen_default")
        .replace("  max_gen_toks: 12\n", ""))
    gen = ["lm-eval", str(model_dirs[1]), "--tasks", "tiny_gen_default", "--include-path", str(tmp_path / "tasks"),
           "--limit", "1", "--output", str(tmp_path / "gen.json")]
    assert main(gen) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"llama-jax lm-eval: error: max_gen_toks=256 leaves no room for a prompt in the model's context of {CONTEXT} "
        f"tokens; valid: below {CONTEXT} (llama-jax lm-eval --max-gen-toks N, or model arg max_gen_toks=N, sets it)")
    assert main([*gen, "--max-gen-toks", "4"]) == 0
    capsys.readouterr()
    assert "exact_match,none" in json.loads((tmp_path / "gen.json").read_text())["results"]["tiny_gen_default"]

    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "tiny_mc,no_such_task",
                 "--include-path", str(tmp_path / "tasks")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("llama-jax lm-eval: error: lm-eval has no task 'no_such_task'; `lm-eval ls tasks` lists the "
                       "tasks it knows (tasks of your own: --include-path DIR of task YAML files)")


def test_an_lm_eval_batch_size_far_above_the_requests_costs_no_memory(model_dirs, tmp_path, capsys, offline):
    """Batches hold as many rows as there are requests when that is fewer than --batch-size (as eval's
    do): a batch size of 10**11 stopped lm-eval with a traceback, NumPy unable to allocate 23 TiB."""
    write_tasks(tmp_path / "tasks", long_context="Loops")
    out = tmp_path / "results.json"
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "tiny_mc,tiny_gen", "--include-path", str(tmp_path / "tasks"),
                 "--limit", "2", "--batch-size", str(10**11), "--output", str(out)]) == 0
    capsys.readouterr()
    results = json.loads(out.read_text())["results"]
    assert 0 <= results["tiny_mc"]["acc,none"] <= 1 and "exact_match,none" in results["tiny_gen"]


def test_the_harness_s_tasks_are_indexed_only_when_a_name_may_need_them(tmp_path):
    """Tasks of one's own alone are looked up in their own directory; a group of one's own, which
    may list the harness's tasks, is looked up with the harness's tasks beside them."""
    from llama_jax.lm_eval_model import _task_manager

    tasks = tmp_path / "tasks"
    write_tasks(tasks, long_context="Loops")
    (tasks / "mix.yaml").write_text("group: mix\ntask:\n  - tiny_mc\n  - arc_easy\n")
    own = _task_manager(["tiny_mc", "tiny_gen"], str(tasks), include_defaults=True)
    assert {"tiny_mc", "tiny_gen", "mix"} <= set(own.all_tasks) and "arc_easy" not in own.all_tasks
    with_harness = _task_manager(["mix"], str(tasks), include_defaults=True)
    assert {"tiny_mc", "arc_easy"} <= set(with_harness.all_subtasks)
    assert with_harness.match_tasks(["mix"]) == ["mix"]


def test_a_task_of_ones_own_that_the_harness_cannot_read_is_named_in_one_line(model_dirs, tmp_path, capsys, offline):
    """A task file that is not YAML or includes a file that is not there, a data file that is not
    JSON Lines, a template naming a field the documents lack, a generation setting of the wrong
    type: each stops lm-eval with one line naming it (no traceback), and no results file is written."""
    tasks = tmp_path / "tasks"
    write_tasks(tasks, long_context="Loops")
    (tasks / "broken.yaml").write_text("task: broken\n  : [\n")
    (tasks / "included.yaml").write_text("task: included\ninclude: base.yaml\n")  # (base.yaml is not there)
    (tasks / "bad_mc.jsonl").write_text((tasks / "mc.jsonl").read_text().replace('"answer"', 'oops', 1))
    mc = (tasks / "tiny_mc.yaml").read_text()
    (tasks / "bad_data.yaml").write_text(mc.replace("tiny_mc", "bad_data").replace("mc.jsonl", "bad_mc.jsonl"))
    (tasks / "bad_field.yaml").write_text(mc.replace("tiny_mc", "bad_field").replace("{{question}}", "{{qqq}}"))
    (tasks / "empty.jsonl").write_text("")
    (tasks / "empty_data.yaml").write_text(mc.replace("tiny_mc", "empty_data").replace("mc.jsonl", "empty.jsonl"))
    (tasks / "bad_setting.yaml").write_text((tasks / "tiny_gen.yaml").read_text().replace("tiny_gen", "bad_setting")
                                            .replace("max_gen_toks: 12", "max_gen_toks: [12]"))
    out = tmp_path / "results.json"
    for handler in logging.getLogger("datasets").handlers:  # bound to the stderr of the test that first used it
        if isinstance(handler, logging.StreamHandler):
            handler.stream = sys.stderr  # (setStream would flush the old one, closed)
    expected = {
        "broken": f"lm-eval has no task 'broken'; --include-path {tasks} holds a task file the harness left out: "
                  f"{tasks / 'broken.yaml'}: expected <block end>, but found '<block mapping start>' (line 2)",
        "included": f"lm-eval has no task 'included'; --include-path {tasks} holds a task file the harness left "
                    f"out: {tasks / 'included.yaml'}: its include 'base.yaml' is not there (read from {tasks})",
        "bad_data": "lm-eval failed on the task(s) bad_data: DatasetGenerationError: An error occurred while "
                    "generating the dataset (ArrowInvalid: JSON parse error: ",
        "bad_field": "lm-eval failed on the task(s) bad_field: UndefinedError: 'qqq' is undefined (tasks of your "
                     f"own: check their files under --include-path {tasks})",
        # the harness reads the setting while the model's generate_until asks for it: still the task's error
        "bad_setting": "lm-eval failed on the task(s) bad_setting: TypeError: int() argument must be ",
        # an error without a message says where it was raised (it ended at "StopIteration: ")
        "empty_data": "lm-eval failed on the task(s) empty_data: StopIteration without a message (raised in ",
    }
    for task, message in expected.items():
        assert main(["lm-eval", str(model_dirs[1]), "--tasks", task, "--include-path", str(tasks), "--limit", "2",
                     "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith(f"llama-jax lm-eval: error: {message}"), err
        assert not out.exists()
    # more few-shot examples than a task's few-shot documents (Python's random.sample said only "Sample larger than
    # population or is negative", once the model was read): named before the model is read (it has no
    # parameters here); where the few-shot documents are the test documents, a question is not its own example
    no_params = tmp_path / "model"
    shutil.copytree(model_dirs[1], no_params, ignore=shutil.ignore_patterns("params"))
    (tasks / "own_split.yaml").write_text(mc.replace("tiny_mc", "own_split") + "fewshot_split: test\n")
    for task, shots, message in (
            ("tiny_mc", ["--num-fewshot", "9"], "has 5 few-shot document(s), fewer than --num-fewshot 9 asks for; "
                                                "valid: at most 5"),
            ("own_split", ["--num-fewshot", "5"], "has 5 few-shot document(s) (its test documents, each question "
                                                  "left out of its own examples), fewer than --num-fewshot 5 asks "
                                                  "for; valid: at most 4"),
            ("own_split", [], "has 5 few-shot document(s) (its test documents, each question left out of its own "
                              "examples), fewer than its config's num_fewshot: 5 asks for; valid: at most 4")):
        if not shots:
            (tasks / "own_split.yaml").write_text((tasks / "own_split.yaml").read_text() + "num_fewshot: 5\n")
        assert main(["lm-eval", str(no_params), "--tasks", task, "--include-path", str(tasks), "--limit", "1",
                     *shots, "--output", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"llama-jax lm-eval: error: lm-eval task {task!r} {message}")
        assert not out.exists()
    # the most each allows, the harness takes
    for task, shots in (("tiny_mc", "5"), ("own_split", "4")):
        assert main(["lm-eval", str(model_dirs[1]), "--tasks", task, "--include-path", str(tasks), "--limit", "1",
                     "--num-fewshot", shots, "--output", str(out)]) == 0
        capsys.readouterr()
        assert json.loads(out.read_text())["n-shot"][task] == int(shots)
        out.unlink()


def test_a_metric_the_harness_does_not_register_is_named_in_one_line(model_dirs, tmp_path, capsys, offline):
    """A metric_list naming a metric the harness does not register, without an aggregation (a
    typo; a `!function` metric), stopped lm-eval with "KeyError: None"; with one, a generation task
    failed once generated ("'NoneType' object is not callable") and a multiple-choice task ran and
    left the metric out. Each is one line naming the task and the metric, and what is valid, before
    the model is read (here it has no parameters, which reading would find). So is a generation
    task's metric marked `hf_evaluate: true` that Hugging Face Evaluate cannot load; a
    multiple-choice task's runs (it scores lm-eval's own), as does a `!function` metric with its
    aggregation."""
    from lm_eval.api.registry import METRIC_AGGREGATION_REGISTRY

    tasks = tmp_path / "tasks"
    write_tasks(tasks, long_context="Loops")
    (tasks / "metrics.py").write_text("def match(references, predictions):\n"
                                      "    return float(references[0] == predictions[0])\n")
    mc, gen = (tasks / "tiny_mc.yaml").read_text(), (tasks / "tiny_gen.yaml").read_text()
    (tasks / "typo.yaml").write_text(mc.replace("tiny_mc", "typo").replace("metric: acc_norm", "metric: acc_nrom"))
    (tasks / "typo_mean.yaml").write_text(mc.replace("tiny_mc", "typo_mean").replace(
        "metric: acc_norm", "metric: acc_nrom\n    aggregation: mean"))
    (tasks / "gen_typo_mean.yaml").write_text(gen.replace("tiny_gen", "gen_typo_mean").replace(
        "metric: exact_match", "metric: exact_mtch\n    aggregation: mean"))
    (tasks / "own.yaml").write_text(gen.replace("tiny_gen", "own")
                                    .replace("metric: exact_match", "metric: !function metrics.match"))
    (tasks / "own_mean.yaml").write_text(gen.replace("tiny_gen", "own_mean").replace(
        "metric: exact_match", "metric: !function metrics.match\n    aggregation: mean"))
    no_params = tmp_path / "model"
    shutil.copytree(model_dirs[1], no_params, ignore=shutil.ignore_patterns("params"))
    out = tmp_path / "results.json"
    for task, metric, problem in (("typo", "acc_nrom", ", without an aggregation"),
                                  ("own", "match", ", without an aggregation"),
                                  ("typo_mean", "acc_nrom", " and Hugging Face Evaluate does not load"),
                                  ("gen_typo_mean", "exact_mtch", " and Hugging Face Evaluate does not load")):
        assert main(["lm-eval", str(no_params), "--tasks", f"tiny_mc,{task}", "--include-path", str(tasks),
                     "--limit", "1", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        valid = (f"valid: a metric it registers ({', '.join(sorted(METRIC_AGGREGATION_REGISTRY))}), or another (a "
                 f"`!function` metric, a Hugging Face Evaluate metric) with its aggregation beside it (such as "
                 f"`aggregation: mean`)")  # (the registry, filled by the harness as it ran)
        assert "acc_norm" in valid
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (f"llama-jax lm-eval: error: task {task!r}: its metric_list names "
                                                f"{metric!r}, a metric lm-eval does not register{problem}; {valid}")
        assert not out.exists()
    # `hf_evaluate: true` where Hugging Face Evaluate cannot load the metric (offline here): a generation
    # task would stop on it once generated; a multiple-choice task scores lm-eval's own metric, and runs
    (tasks / "gen_hf.yaml").write_text(gen.replace("tiny_gen", "gen_hf").replace(
        "metric: exact_match", "metric: exact_match\n    hf_evaluate: true"))
    assert main(["lm-eval", str(no_params), "--tasks", "gen_hf", "--include-path", str(tasks), "--limit", "1",
                 "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "llama-jax lm-eval: error: task 'gen_hf': its metric_list names 'exact_match' with `hf_evaluate: true`, which "
        "Hugging Face Evaluate does not load here (offline, or not one of its metrics), and the task would stop on "
        "it once generated; drop `hf_evaluate` to score lm-eval's own 'exact_match'")
    (tasks / "mc_hf.yaml").write_text(mc.replace("tiny_mc", "mc_hf").replace(
        "metric: acc_norm", "metric: acc_norm\n    hf_evaluate: true"))
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "mc_hf", "--include-path", str(tasks), "--limit", "2",
                 "--output", str(out)]) == 0
    capsys.readouterr()
    assert "acc_norm,none" in json.loads(out.read_text())["results"]["mc_hf"]
    out.unlink()
    # a task the harness cannot prepare, too, is named before the model is read; a good one reads it
    (tasks / "bad_field.yaml").write_text(mc.replace("tiny_mc", "bad_field").replace("{{question}}", "{{qqq}}"))
    for task, message in (("bad_field", "lm-eval failed on the task(s) bad_field: UndefinedError: 'qqq' is undefined"),
                          ("tiny_mc", f"{no_params}: parameter checkpoint params/ not found")):
        assert main(["lm-eval", str(no_params), "--tasks", task, "--include-path", str(tasks), "--limit", "1",
                     "--output", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"llama-jax lm-eval: error: {message}")
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "own_mean", "--include-path", str(tasks), "--limit", "1",
                 "--output", str(out)]) == 0
    capsys.readouterr()
    assert "match,none" in json.loads(out.read_text())["results"]["own_mean"]


def test_tasks_built_before_the_model_score_as_the_harness_alone_scores_them(model_dirs, tmp_path, offline):
    """The tasks are built before the model is read, and the harness runs them: a task that shuffles
    its choices with Python's generator as it is built (as GPQA does) gets the choices, and the
    scores, that `simple_evaluate` alone gives it, both where the datasets' cache keeps the shuffled
    documents and where they are shuffled again as the harness runs the task (documents in memory,
    drawn from where the build left the generator)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llama_jax.lm_eval_model import evaluate_tasks

    tasks = tmp_path / "tasks"
    write_tasks(tasks, long_context="Loops")
    (tasks / "shuffle.py").write_text(
        "import random\n\nimport datasets\n\n\n"
        "def shuffled(doc):\n"
        "    choices = list(doc['choices'])\n"
        "    random.shuffle(choices)\n"
        "    return {**doc, 'choices': choices, 'answer': choices.index(doc['choices'][doc['answer']])}\n\n\n"
        "def process_docs(dataset):\n"
        "    return dataset.map(shuffled)\n\n\n"
        "def in_memory(dataset):  # shuffled again at each read: the harness reads the documents several times\n"
        "    return datasets.Dataset.from_list([shuffled(doc) for doc in dataset])\n")
    functions = {"shuffled": "process_docs", "in_memory": "in_memory"}
    for task, function in functions.items():
        for name in (task, f"{task}_alone"):  # each with a datasets cache of its own
            (tasks / f"{name}.yaml").write_text(
                (tasks / "tiny_mc.yaml").read_text().replace("tiny_mc", name)
                .replace("dataset_kwargs:\n", f"dataset_kwargs:\n  cache_dir: {tmp_path / name}\n")
                + f"process_docs: !function shuffle.{function}\n")
    ours = evaluate_tasks(str(model_dirs[1]), list(functions), include_path=str(tasks), log_samples=True)
    alone = lm_eval.simple_evaluate(model="llama_jax", model_args=f"pretrained={model_dirs[1]}",
                                    tasks=[f"{task}_alone" for task in functions], log_samples=True,
                                    task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    for task in functions:
        runs = ((ours, task), (alone, f"{task}_alone"))
        choices = [[sample["doc"]["choices"] for sample in run["samples"][name]] for run, name in runs]
        scores = [{k: v for k, v in run["results"][name].items() if "," in k} for run, name in runs]  # "acc,none"
        assert choices[0] == choices[1] and scores[0] == scores[1] and "acc_norm,none" in scores[0], task
    seeds = ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")
    assert [ours["config"][k] for k in seeds] == [alone["config"][k] for k in seeds] == [0, 1234, 1234, 1234]


def test_tasks_are_built_once_and_run_as_the_harness_runs_them_by_name(model_dirs, tmp_path, capsys, caplog,
                                                                       offline):
    """The tasks built before the model is read are the ones the harness runs: a task of one's own
    reads its documents (`process_docs`) as often as in the harness's own run, not once more for a
    second build, and the harness's notes on building it come once; a group of one's own
    (aggregated), a task and a tag, with few-shot examples, a limit and a model's max_gen_toks, give
    the results, groups and table of `simple_evaluate` given their names."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    tasks = tmp_path / "tasks"
    write_tasks(tasks, long_context="Loops")
    (tasks / "counted.py").write_text("def process_docs(dataset):\n"
                                      f"    with open({str(tmp_path / 'read')!r}, 'a') as f:\n"
                                      "        f.write('read\\n')\n"
                                      "    return dataset\n")
    (tasks / "counted.yaml").write_text((tasks / "tiny_mc.yaml").read_text().replace("tiny_mc", "counted")
                                        + "process_docs: !function counted.process_docs\n")
    (tasks / "own_group.yaml").write_text(
        "group: own_group\ntask:\n  - counted\n  - tiny_mc\n"
        "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n")
    (tasks / "tagged.yaml").write_text((tasks / "tiny_gen.yaml").read_text().replace("task: tiny_gen", "task: tagged")
                                       .replace("  max_gen_toks: 12\n", "") + "tag: own_tag\n")
    names, out = ["own_group", "tiny_ppl", "own_tag"], tmp_path / "results.json"
    reads = tmp_path / "read"
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", ",".join(names), "--include-path", str(tasks),
                 "--num-fewshot", "1", "--limit", "2", "--max-gen-toks", "4", "--output", str(out)]) == 0
    printed, ours = capsys.readouterr().out, json.loads(out.read_text())
    assert sum("[Task: counted] metric acc is defined, but aggregation is not" in r.getMessage()
               for r in caplog.records) == 1
    read_by_ours = reads.read_text()
    reads.unlink()
    alone = lm_eval.simple_evaluate(model="llama_jax", model_args=f"pretrained={model_dirs[1]},max_gen_toks=4",
                                    tasks=names, num_fewshot=1, limit=2,
                                    task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert read_by_ours == reads.read_text()
    for key in ("results", "groups", "group_subtasks", "n-shot", "n-samples", "higher_is_better"):
        assert ours[key] == alone[key], key
    assert set(ours["results"]) == {"own_group", "counted", "tiny_mc", "tiny_ppl", "tagged"}
    assert ours["n-shot"]["counted"] == 1 and ours["n-samples"]["counted"] == {"original": 5, "effective": 2}
    assert "acc,none" in ours["groups"]["own_group"]
    assert printed.count(make_table(alone)) == 1 and printed.count(make_table(alone, "groups")) == 1


def test_a_continuation_merged_into_the_context_is_scored_as_the_pieces_it_changed(model_dirs):
    """"The T" + "he" tokenizes as [BOS, ▁The, ▁The] against [BOS, ▁The, ▁T, he] for the context,
    which leaves the harness's split no continuation tokens (its `hf` backend fails on an assert):
    the continuation is scored as ▁The after [BOS, ▁The], checked against transformers. An empty
    continuation scores (0.0, True), the empty sum; an ordinary pair is the harness's split."""
    import transformers
    from lm_eval.api.instance import Instance

    from llama_jax.lm_eval_model import LlamaJaxLM

    hf_dir, jax_dir = model_dirs
    tokenizer = load_tokenizer(jax_dir)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)

    def reference(context: list[int], continuation: list[int]) -> tuple[float, bool]:
        with torch.no_grad():
            logits = hf_model(torch.tensor([context + continuation])).logits[0, len(context) - 1:-1]
        logprobs = torch.log_softmax(logits, -1)
        return (float(logprobs[range(len(continuation)), continuation].sum()),
                logits.argmax(-1).tolist() == continuation)

    whole, context = (tokenizer.encode(text, bos=True) for text in ("The The", "The T"))
    assert len(whole) == 3 and len(context) == 4 and whole[:2] == context[:2]  # the merge this test is about
    full, short = (tokenizer.encode(text, bos=True) for text in ("The try statement", "The try"))
    lm = LlamaJaxLM(str(jax_dir), batch_size=2)
    ours = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in
                             enumerate([("The T", "he"), ("The try statement", ""), ("The try", " statement")])])
    for (score, greedy), (expected, expected_greedy) in zip(
            [ours[0], ours[2]], [reference(whole[:2], whole[2:]), reference(short, full[len(short):])]):
        assert score == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    assert ours[1] == (0.0, True)


def test_a_continuation_longer_than_max_length_is_named_in_the_harness_s_order(model_dirs):
    """A continuation no window of max_length scores: the error names its request as the harness
    numbers them (an empty continuation before it counts) and the max_length that would score it."""
    from lm_eval.api.instance import Instance

    from llama_jax.lm_eval_model import LlamaJaxLM

    lm = LlamaJaxLM(str(model_dirs[1]), batch_size=2, max_length=6)
    pairs = [("The for", ""), ("The for", " statement"), ("The for", " statement is used to iterate over a sequence")]
    n = len(lm.tok_encode("The for" + pairs[2][1])) - len(lm.tok_encode("The for"))
    with pytest.raises(ValueError, match=rf"^loglikelihood request 2: its continuation ' statement is used to "
                                         rf"iterate over a seq'\.\.\. has {n} tokens, more than max_length=6 scores "
                                         rf"in one window; valid: max_length \(--max-length\) of at least {n}, up to "
                                         rf"the model's max_seq_len \({CONTEXT}\)$"):
        lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])


def test_lm_eval_not_installed(model_dirs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "llama_jax.lm_eval_model", raising=False)
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err.strip() == ("llama-jax lm-eval: error: lm-eval is not installed; "
                                               "pip install -e '.[eval]' (or 'lm-eval>=0.4.12')")


def test_an_lm_eval_older_than_the_one_required_is_named(model_dirs, monkeypatch, capsys):
    """An older harness fails on import (0.4.8, 0.4.9) or halfway through a run (0.4.10, 0.4.11):
    its version is refused first, in one line."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.11" if name == "lm-eval" else real(name))
    assert main(["lm-eval", str(model_dirs[1]), "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err.strip() == ("llama-jax lm-eval: error: lm-eval 0.4.11 is installed; llama-jax "
                                               "lm-eval needs lm-eval>=0.4.12: pip install -U 'lm-eval>=0.4.12'")


def test_a_model_whose_outputs_are_not_finite_scores_null(model, model_dirs, tmp_path, capsys):
    """Its loss is NaN: the JSON says null (json.dumps wrote NaN, which JSON parsers refuse), the
    summary line n/a."""
    cfg, params, _ = model
    save_model(tmp_path / "nan", cfg, jax.tree.map(lambda a: np.full_like(a, np.nan) if a.ndim == 1 else a, params),
               tokenizer=model_dirs[1])
    config = write_text_config(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], eval_fraction=0.5)
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("Some text.")
    assert main(["eval", str(tmp_path / "nan"), "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    written = json.loads((tmp_path / "nan" / "eval.json").read_text(), parse_constant=pytest.fail)
    assert json.loads(out, parse_constant=pytest.fail) == written
    assert written["loss"] is written["perplexity"] is written["bits_per_byte"] is None and written["tokens"] > 0
    assert "held-out: loss n/a nats/token, perplexity n/a, n/a bits/byte" in err


def test_model_without_tokenizer(model, tmp_path, capsys):
    cfg, params, _ = model
    save_model(tmp_path / "bare", cfg, params)
    config = write_text_config(tmp_path, [tmp_path / "a.txt", tmp_path / "b.txt"], eval_fraction=0.5)
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("Some text.")
    assert main(["eval", str(tmp_path / "bare"), "--config", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"llama-jax eval: error: {tmp_path / 'bare'} has no tokenizer.model; evaluating text needs the model's "
        f"tokenizer (llama-jax export and convert --to jax copy it into the model directory)")
    from llama_jax.lm_eval_model import LlamaJaxLM

    with pytest.raises(ValueError, match="has no tokenizer.model; lm-eval requests are text"):
        LlamaJaxLM(str(tmp_path / "bare"))
    (tmp_path / "bare" / "tokenizer.model").mkdir()  # (it was said to have none)
    with pytest.raises(ValueError, match=r"bare/tokenizer.model is not a file \(a directory, or a link to nothing\); "
                                         r"lm-eval requests are text"):
        LlamaJaxLM(str(tmp_path / "bare"))


@pytest.mark.parametrize("mesh, message", [
    ({"fsdp": "many"}, r"fsdp='many': must be a positive integer or -1"),
    ({"tensor": 0}, r"mesh.tensor=0: must be a positive integer or -1"),
    ({"data": -2}, r"mesh.data=-2: must be a positive integer or -1"),
    ({"fsdp": 1, "tensor": 3}, r"mesh: data x fsdp x tensor = 1 x 1 x 3 = 3, but the device count is 8"),
])
def test_lm_eval_model_bad_mesh(model_dirs, mesh, message):
    from llama_jax.lm_eval_model import LlamaJaxLM

    with pytest.raises(ValueError, match=message):
        LlamaJaxLM(str(model_dirs[1]), **mesh)


@pytest.mark.parametrize("model_args, message", [
    ({"max_gen_toks": "abc"}, r"^max_gen_toks='abc' is not a positive integer$"),  # was int()'s own message
    ({"max_gen_toks": 0}, r"^max_gen_toks=0 is not a positive integer$"),  # was accepted
    ({"max_length": "2.5"}, r"^max_length='2.5' is not a positive integer$"),
    ({"seed": -1}, r"^seed=-1 is not a non-negative integer$"),  # was accepted
    ({"seed": 2**32}, r"^seed must be an integer in \[0, 2\*\*32\), got 4294967296$"),
    ({"batch_size": "0"}, r"^batch_size='0' is not a positive integer$"),
])
def test_lm_eval_model_bad_arguments_fail_before_the_model_is_read(tmp_path, model_args, message):
    """The harness passes `--model_args` as strings: each is refused by name, before the model
    directory (absent here) is read."""
    from llama_jax.lm_eval_model import LlamaJaxLM

    with pytest.raises(ValueError, match=message):
        LlamaJaxLM(str(tmp_path / "absent"), **model_args)


@pytest.mark.parametrize("args, message", [
    (["eval", "MODEL"], "--config is required with a model directory"),
    (["eval"], "give a model directory or --workdir RUN"),
    (["eval", "MODEL", "--step", "3", "--config", "CONFIG"], "--step needs --workdir"),
    (["eval", "MODEL", "--config", "CONFIG", "--config.data.source=synthetic"],
     "data.source=synthetic has no documents to evaluate on"),
    (["eval", "MODEL", "--config", "CONFIG", "--config.data.source=web"],
     r"data.source='web' is not supported; valid: prepared, embedded, stdlib, text, jsonl, tfds$"),
    (["eval", "MODEL", "--config", "CONFIG", "--config.data.eval_fraction=0.0"],
     "data.eval_fraction=0.0 holds out no document"),
    (["eval", "MODEL", "--config", "CONFIG", "--seq-len", str(CONTEXT + 1)], rf"seq_len={CONTEXT + 1} is out of range"),
    (["eval", "MODEL", "--config", "CONFIG", "--config.mesh.data=3"],
     r"mesh: the device count, 8, is not divisible by the fixed mesh sizes \(data=3 x tensor=1 = 3\)"),
    (["eval", "MODEL", "--config", "CONFIG", "--config.train.grad_accum=0"],  # the default batch divides by it
     r"train.grad_accum must be a positive integer, got 0$"),
    (["eval", "MODEL", "--config", "CONFIG", "--config.model.dtype=float16"],  # was ignored
     r"--config.model.dtype=float16: llama-jax eval reads only the data, train, mesh section\(s\) of the config "
     r"\(the model is the directory's or the checkpoint's own\); drop the override$"),
])
def test_eval_bad_input(model_dirs, tmp_path, capsys, args, message):
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"Some text {name}.")
    config = write_text_config(tmp_path, [tmp_path / f"{name}.txt" for name in "abc"], eval_fraction=0.5)
    args = [str(model_dirs[1]) if a == "MODEL" else str(config) if a == "CONFIG" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llama-jax eval: error: ")
    assert re.search(message, err), err


def test_a_models_eval_json_that_is_no_file_is_not_read(tmp_path):
    """MODEL/eval.json as a FIFO: deciding where the result goes waited for a writer forever."""
    from llama_jax.eval_files import model_eval_file

    os.mkfifo(tmp_path / "eval.json")
    assert model_eval_file(tmp_path, {"data": {}, "seq_len": 8}) == tmp_path / "eval.json"  # (refused when written)


@pytest.mark.parametrize("command", ["eval", "lm-eval"])
def test_results_replace_only_an_earlier_result(model_dirs, tmp_path, capsys, command):
    """--output is checked before evaluating: never a model's or a run's own file, a directory, or a
    path under a file. (That an earlier result is replaced: test_eval_command.)"""
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"Some text {name}.")
    config = write_text_config(tmp_path, [tmp_path / f"{name}.txt" for name in "abc"], eval_fraction=0.5)
    model = model_dirs[1]
    before = {p: p.read_bytes() for p in (model / "model_config.json", config)}
    os.mkfifo(tmp_path / "fifo")  # reading it to check it would wait for a writer forever
    base = (["eval", str(model), "--config", str(config)] if command == "eval"
            else ["lm-eval", str(model), "--tasks", "tiny_mc"])
    for output, message in [
        (model / "model_config.json", rf"--output \S+/model_config.json exists and is not a results file of "
                                      rf"`llama-jax {command}`; choose another --output"),
        (config, r"exists and is not a results file"),
        (tmp_path, r"--output \S+ is a directory; give the path of a JSON file to write"),
        (tmp_path / "fifo", r"--output \S+/fifo is not a regular file; give the path of a JSON file to write"),
        (tmp_path / "a.txt" / "out.json", r"\S+/a.txt is a file, not a directory"),
        ("", r"--output is empty; give a value"),
    ]:
        assert main([*base, "--output", str(output)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"llama-jax {command}: error: ")
        assert re.search(message, err), err
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    if command == "lm-eval":
        assert main([*base, "--num-fewshot", "-1"]) == 2
        assert capsys.readouterr().err.strip().endswith("--num-fewshot -1: valid: 0 or more examples per question")


def test_eval_refuses_an_unwritable_result_before_reading_the_model(model_dirs, tmp_path, capsys):
    """Where the result goes is checked before the model is read (here it has no parameters, which
    reading would find): MODEL/eval-TAG.json as a directory (eval.json holds a score of other
    settings), /proc (which takes no files, not even root's; lm-eval too), and, where permissions bind
    (not as root), a read-only model or run directory."""
    from llama_jax.eval_files import settings_tag
    from llama_jax.experiment import load_config

    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"Some text {name}.")
    config = write_text_config(tmp_path, [tmp_path / f"{name}.txt" for name in "abc"], eval_fraction=0.5)
    model, run = tmp_path / "model", tmp_path / "run"
    shutil.copytree(model_dirs[1], model, ignore=shutil.ignore_patterns("params"))
    run.mkdir()
    other = {"loss": 1.0, "perplexity": 2.7, "tokens": 5, "data": {"source": "embedded"}, "seq_len": 8}
    (model / "eval.json").write_text(json.dumps(other))  # kept: the result goes to eval-TAG.json
    tag = settings_tag({"data": load_config(config).data.to_dict(), "seq_len": 32}, with_seq_len=True)
    (model / f"eval-{tag}.json").mkdir()
    cases = [(["eval", str(model), "--config", str(config)],
              rf"--output \S+/model/eval-{tag}.json is a directory; give the path of a JSON file to write$")]
    # a folder that takes no files, even from root (whom os.access lets write anywhere): found by trying
    cases += [(command, rf"--output {output}: cannot write a file into /proc \([^)]+\); choose another --output, "
                        rf"in a folder this user may write$")
              for output in ("/proc/x.json", "/proc/sub/x.json")
              for command in (["eval", str(model), "--config", str(config), "--output", output],
                              ["lm-eval", str(model), "--tasks", "tiny_mc", "--output", output])]
    if os.geteuid() != 0:  # (root writes a read-only directory)
        cases += [(["eval", str(model), "--config", str(config), "--seq-len", "16"],
                   r"--output \S+/model/eval-[0-9a-f]{8}.json: cannot write a file into \S+/model \(Permission denied"),
                  (["eval", "--workdir", str(run), "--config", str(config)],
                   r"--output \S+/run/eval-STEP.json: cannot write a file into \S+/run \(Permission denied")]
    model.chmod(0o555), run.chmod(0o555)
    try:
        for args, message in cases:
            assert main(args) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and re.search(message, err), err
    finally:
        model.chmod(0o755), run.chmod(0o755)
