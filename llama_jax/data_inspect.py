"""`llama-jax data inspect`: what the model sees at a step, and whether an epoch covers the data.

`describe_step` lists each row of a step's global batch: the source, epoch and packed row it
reads, the documents in it (index in the split and in the source, token span within the
document), the loss-mask count and the decoded text with document boundaries marked.
`epoch_coverage` walks the steps of one epoch of every source without the model, counting how
often each token of the source's stream is an input, from the batches the run would build.
"""

from __future__ import annotations

import numpy as np

from llama_jax.packed import TrainRows, pack_stream_row

BOUNDARY = " ‖ "  # printed between documents of a row


def row_documents(split, k: int, seq_len: int) -> list[tuple[int, int, int, int]]:
    """(document in the split, index in its source, first and end token offset within the
    document) of every piece of a document in row k."""
    start, stop = k * seq_len, (k + 1) * seq_len
    starts = list(split.document_starts_in(start + 1, stop))
    pieces, at = [], start
    for edge in starts + [stop]:
        d = split.document_at(at)
        first, source_index, _ = split.document_info(d)
        pieces.append((d, source_index, at - first, edge - first))
        at = edge
    return pieces


def describe_step(train: TrainRows, step: int, tokenizer, rows: int | None = None) -> list[str]:
    """Lines describing the rows of the global batch of `step` (the first `rows` of them)."""
    lines = []
    chosen = range(train.batch_size if rows is None else min(rows, train.batch_size))
    for slot, (i, n) in zip(chosen, train.visits(step, chosen)):
        source = train.sources[i]
        k = train.row_of(i, n)
        row = pack_stream_row(source.split, k, train.seq_len)
        pieces = row_documents(source.split, k, train.seq_len)
        lines.append(f"row {slot}: source {source.name!r}, epoch {n // source.rows}, packed row {k} of "
                     f"{source.rows}; {int(row['loss_mask'].sum())} of {train.seq_len} targets counted")
        for d, source_index, a, b in pieces:
            lines.append(f"  document {d} (source index {source_index}), tokens [{a}, {b})")
        texts, at = [], k * train.seq_len
        for d, _, a, b in pieces:
            texts.append(tokenizer.decode(source.split.token_range(at, at + b - a).tolist()))
            at += b - a
        lines.append("  text: " + BOUNDARY.join(repr(t) for t in texts))
    return lines


def epoch_coverage(train: TrainRows, source: int) -> np.ndarray:
    """How often each token of source `source`'s stream is an input in its first epoch, counted
    from the visits of the steps the run takes until that epoch ends."""
    src = train.sources[source]
    seen = np.zeros(src.split.tokens, np.uint16)
    step, all_rows = 0, range(train.batch_size)
    while train.mixture.rows_before(step)[source] < src.rows:
        for i, n in train.visits(step, all_rows):
            if i == source and n < src.rows:
                k = train.row_of(i, n)
                seen[k * train.seq_len:(k + 1) * train.seq_len] += 1
        step += 1
    return seen


def coverage_lines(train: TrainRows) -> list[str]:
    """One line per source: how many of its whole-row tokens are seen once, more than once, never
    (counts with their shares: a share alone rounds a few tokens to 0.00%)."""
    lines = []
    for i, source in enumerate(train.sources):
        seen = epoch_coverage(train, i)
        covered = source.rows * train.seq_len
        counts = (int(np.count_nonzero(c)) for c in (seen[:covered] == 1, seen[:covered] > 1, seen[:covered] == 0))
        once, more, never = (f"{n:,} ({n / covered:.2%})" for n in counts)
        lines.append(f"source {source.name!r}: one epoch = {source.rows} rows of {train.seq_len}; of its "
                     f"{covered:,} tokens in whole rows {once} seen once, {more} more than once, {never} never; "
                     f"the {source.split.tokens - covered} tokens after the last whole row are left out")
    return lines
