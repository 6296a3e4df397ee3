"""Whole training steps of the sharded Trainer against transformers' LlamaForCausalLM and
torch.optim.AdamW, in float64 on the PyTorch side: the loss as llama-jax defines it, the gradient
norm, the learning rate, and the parameters after the updates."""

import math

import jax
import numpy as np
import pytest
import torch

from llama_jax.config import to_hf_config
from llama_jax.convert.hf import from_hf_state_dict, to_hf_state_dict
from llama_jax.packed import pack_stream_row
from llama_jax.train import build_trainer, global_batch
from tests.reference import make_hf_model
from tests.test_packed import MemorySplit, random_documents
from tests.test_train import tiny_config

STEPS, WARMUP, ROWS, SEQ = 4, 2, 8, 32
LR, WEIGHT_DECAY, CLIP, Z_LOSS, MIN_LR_RATIO = 1e-2, 1.0, 0.5, 1e-3, 0.1


def expected_lr(step: int) -> float:
    """Linear warmup from 0, then cosine decay to LR x MIN_LR_RATIO at STEPS."""
    if step < WARMUP:
        return LR * step / WARMUP
    cosine = 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))
    return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * cosine)


def batches(vocab_size: int):
    """Random rows whose loss masks differ: the first micro-batch (rows 0-3 of 8, grad_accum=2)
    counts few targets, so a per-micro-batch mean weighs its tokens far more than a per-token one."""
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        tokens = rng.integers(0, vocab_size, (ROWS, SEQ + 1)).astype(np.int32)
        mask = (rng.random((ROWS, SEQ)) < 0.7).astype(np.float32)
        mask[:ROWS // 2, 6:] = 0
        yield dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=np.tile(np.arange(SEQ, dtype=np.int32),
                   (ROWS, 1)), segment_ids=np.ones((ROWS, SEQ), np.int32), loss_mask=mask)


def torch_loss(model, rows):
    """Token mean over the whole batch of (logsumexp - target logit), plus Z_LOSS x the token mean of logsumexp^2."""
    logits = model(torch.as_tensor(rows["tokens"], dtype=torch.long)).logits
    lse = torch.logsumexp(logits, -1)
    target = torch.gather(logits, -1, torch.as_tensor(rows["targets"], dtype=torch.long)[..., None])[..., 0]
    mask = torch.as_tensor(rows["loss_mask"], dtype=torch.float64)
    nll = ((lse - target) * mask).sum() / mask.sum()
    z_term = Z_LOSS * (lse**2 * mask).sum() / mask.sum()
    return nll + z_term, nll.detach(), z_term.detach()


@pytest.mark.parametrize("tie, decay_embeddings", [(False, False), (True, True)],
                         ids=["untied", "tied-decay_embeddings"])
def test_training_steps_match_pytorch(tie, decay_embeddings):
    """fsdp=4 x tensor=2, grad_accum=2 with uneven masks, z-loss, clipping that clips (the raw norms
    are above CLIP), decoupled weight decay on kernels (and embeddings with decay_embeddings, never
    on norms), warmup then cosine. The reference model's norms are random, not 1, so decaying them
    shows."""
    config = tiny_config(
        "mesh.fsdp=4", "mesh.tensor=2", "train.grad_accum=2", f"train.batch_size={ROWS}", f"train.seq_len={SEQ}",
        f"train.steps={STEPS}", f"train.z_loss={Z_LOSS}", f"model.tie_embeddings={tie}", f"optimizer.lr={LR}",
        f"optimizer.warmup_steps={WARMUP}", f"optimizer.min_lr_ratio={MIN_LR_RATIO}", f"optimizer.clip_norm={CLIP}",
        f"optimizer.weight_decay={WEIGHT_DECAY}", f"optimizer.decay_embeddings={decay_embeddings}",
        "optimizer.schedule=cosine", "optimizer.name=adamw")
    trainer = build_trainer(config)
    cfg = trainer.model_config
    hf_config = to_hf_config(cfg)
    model = make_hf_model(hf_config).double().train()
    _, params = from_hf_state_dict(model.state_dict(), hf_config, scan_layers=cfg.scan_layers)
    state = trainer.init_state(0)
    state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
    before = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def decays(name):
        if "norm" in name:
            return False
        return decay_embeddings if ("embed_tokens" in name or "lm_head" in name) else True

    named = list(model.named_parameters())  # (a tied head is the embedding's own tensor, listed once)
    assert ("lm_head.weight" in dict(named)) != tie
    o = config.optimizer
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if decays(n)], "weight_decay": WEIGHT_DECAY},
         {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}],
        lr=LR, betas=(o.b1, o.b2), eps=o.eps)

    clipped = 0
    for step, rows in enumerate(batches(cfg.vocab_size)):
        state, metrics = trainer.step(state, global_batch(trainer.mesh, rows))
        for group in optimizer.param_groups:
            group["lr"] = expected_lr(step)
        optimizer.zero_grad()
        loss, nll, z_term = torch_loss(model, rows)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))  # (the norm before clipping)
        optimizer.step()
        clipped += norm > CLIP
        metrics = jax.device_get(metrics)
        assert float(metrics["tokens"]) == rows["loss_mask"].sum()
        for key, want in (("loss", loss.detach()), ("nll", nll), ("z_loss", z_term), ("grad_norm", norm),
                          ("learning_rate", expected_lr(step))):
            np.testing.assert_allclose(float(metrics[key]), float(want), rtol=1e-5, err_msg=f"step {step}: {key}")
    assert clipped == STEPS

    # float32 against float64 after the updates: at most 4.3e-7 apart (measured), while every tensor
    # moved by about 2e-2 (Adam's steps are about the learning rate each)
    atol = 3e-6
    ours = to_hf_state_dict(cfg, jax.device_get(state.params))
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert ours.keys() <= theirs.keys() and len(ours) == len(named)
    for name, value in ours.items():
        np.testing.assert_allclose(value, theirs[name], rtol=0, atol=atol, err_msg=name)
        assert np.max(np.abs(theirs[name] - before[name])) > 1000 * atol, name


def test_packed_rows_gradients_match_pytorch_per_document():
    """Rows packed from a prepared split (documents of 2 to 13 tokens, two or three a row, some running
    on into the next row): the Trainer's loss and gradients equal transformers' run on each document piece alone,
    positions from 0, with the loss the token mean over the batch and the pair from one document's
    EOS to the next one's BOS unscored; GQA on fsdp=4 x tensor=2."""
    seq = 16
    split = MemorySplit(random_documents(40, seed=7, low=0, high=12, vocab=200))
    packed_rows = [pack_stream_row(split, k, seq) for k in range(4)]
    rows = {k: np.stack([r[k] for r in packed_rows]) for k in packed_rows[0]}
    assert all(len(np.unique(s)) > 1 for s in rows["segment_ids"]) and (rows["loss_mask"] == 0).any()
    trainer = build_trainer(tiny_config("mesh.fsdp=4", "mesh.tensor=2", "train.batch_size=4", f"train.seq_len={seq}"))
    cfg = trainer.model_config
    assert cfg.n_kv_heads < cfg.n_heads
    hf_config = to_hf_config(cfg)
    model = make_hf_model(hf_config).double()
    _, params = from_hf_state_dict(model.state_dict(), hf_config, scan_layers=cfg.scan_layers)
    with trainer.context():  # (the state's shardings first asked for inside it)
        loss, _, grads = trainer.jit_gradients(jax.device_put(params, trainer.state_shardings.params),
                                               global_batch(trainer.mesh, rows))

    total = 0
    for b in range(len(packed_rows)):
        for segment in np.unique(rows["segment_ids"][b]):
            piece = rows["segment_ids"][b] == segment
            assert (rows["positions"][b][piece] == np.arange(piece.sum())).all()
            logits = model(torch.as_tensor(rows["tokens"][b][piece], dtype=torch.long)[None]).logits[0]
            target = torch.as_tensor(rows["targets"][b][piece], dtype=torch.long)
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None])[:, 0]
            total = total + (nll * torch.as_tensor(rows["loss_mask"][b][piece], dtype=torch.float64)).sum()
    reference = total / float(rows["loss_mask"].sum())
    reference.backward()
    np.testing.assert_allclose(float(loss), reference.item(), rtol=1e-6)
    ours = to_hf_state_dict(cfg, jax.device_get(grads))
    for name, parameter in model.named_parameters():
        want = parameter.grad.numpy()  # float32 against float64: 5e-7 of each tensor's largest (measured)
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=5e-6 * np.abs(want).max(), err_msg=name)
