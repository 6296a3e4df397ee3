"""Batches for training and evaluation.

A batch is a dict of [batch, seq_len] arrays: `tokens` (inputs), `targets` (next tokens),
`positions` (rotary positions, restarting at each document), `segment_ids` (document ids within
a packed row; tokens attend only within their document) and `loss_mask` (1 where the target
counts). The global batch of step s is a pure function of (source, seed, s), and each process
builds only its own rows of it.
"""

from __future__ import annotations

import numpy as np


def rows_for_process(global_batch: int, process_index: int, process_count: int) -> range:
    """The contiguous rows of the global batch this process feeds."""
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    per = global_batch // process_count
    return range(process_index * per, (process_index + 1) * per)


def pack_row(documents: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Pack documents (token arrays) into one row of seq_len inputs with next-token targets.

    A document of n tokens gives n - 1 (input, target) pairs; documents never see each other.
    Pairs that do not fit are dropped; unused slots are padding (segment 0, masked out).
    """
    row = {k: np.zeros(seq_len, np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    start = 0
    for doc_id, doc in enumerate(documents, start=1):
        n = min(len(doc) - 1, seq_len - start)
        if n <= 0:
            break
        span = slice(start, start + n)
        row["tokens"][span] = doc[:n]
        row["targets"][span] = doc[1:n + 1]
        row["positions"][span] = np.arange(n)
        row["segment_ids"][span] = doc_id
        row["loss_mask"][span] = 1.0
        start += n
    return row


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def synthetic_batch(seed: int, step: int, rows: range, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Rows of a learnable synthetic batch: packed documents that are arithmetic progressions
    modulo the vocabulary (random start and stride per document), so the next token is
    predictable from the two before it. For exercising training without a dataset."""
    out = []
    for row in rows:
        rng = np.random.default_rng([seed, step, row])
        docs, length = [], 0
        while length < seq_len + 1:
            n = int(rng.integers(seq_len // 4 + 2, seq_len + 2))
            start, stride = rng.integers(0, vocab_size), rng.integers(1, max(2, min(vocab_size, 17)))
            docs.append(((start + stride * np.arange(n)) % vocab_size).astype(np.int32))
            length += n - 1
        out.append(pack_row(docs, seq_len))
    return stack_rows(out)
