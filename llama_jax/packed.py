"""Training rows from prepared data: every token once per epoch, a new order each epoch, mixtures.

Packing. A prepared split (`llama_jax.prepare`) is one stream of tokens: its documents
concatenated, each BOS ... EOS. Row k of a split holds the (input, target) pairs at stream offsets
[k*L, (k+1)*L), L = seq_len: input stream[o], target stream[o + 1]. The rows partition the
stream, so every token is the input of exactly one row and the target of at most one; only the
tokens after the last whole row are left out. Segment ids count the documents within the row from
1 and positions restart at 0 at each document's start and at the row's start. The pair whose input
is a document's EOS and whose target is the next document's BOS is masked out (loss_mask 0): no
target crosses a document boundary.

Order. The rows of a split are visited in a fresh permutation every epoch:
`grain.MapDataset.range(rows).shuffle(base).repeat()`, whose element n is row pi_e(n mod rows)
of epoch e = n // rows, with pi_e a permutation computed per index, with no state, that Grain
seeds with (base + e) mod 2**32; base is a hash of the run's train.seed and the source's place in
the mixture (`order_seed`). Grain's cipher permutes [0, 2**b), b = ceil(log2(rows - 1)) rounded
up to even and at least 16, so where rows - 1 is 2**b itself (65,537 rows, 262,145, ...) its last
place in an epoch repeats the first place's row and row rows - 1 is never read: that place reads
row rows - 1 instead. So the rows of step s are a pure function of (data, seed, s): each process
builds only its own rows, and a resumed run needs nothing but the step. Grain's worker
processes are not used: building a row is a memory-mapped slice and a few searches, far cheaper
than a train step (`benchmarks/data_loading.py`).

Mixtures. With several sources of weights w_i (p_i = w_i / sum w), slot j of global batch s
(B rows) belongs to the source i whose interval [P_i, P_i+1) of the cumulative weights holds
frac(j / B + u_s), u_s = ((s * 389) mod 1024) / (1024 B). Each batch then has, for every source,
ceil(B (P_i+1 - u_s)) - ceil(B (P_i - u_s)) rows: within one row of B p_i. Any 1024 consecutive
batches cover the regular grid of 1024 offsets u_s of [0, 1/B) once, so they hold each source's
share of their rows to within one row; the first s batches of a run stray from theirs by up to a
few rows, plus less than one per 1024 batches. Every source walks its own rows in its own epochs;
a source's rows before batch s are known in closed form (the counts repeat every 1024 batches), so
random access stays O(1).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from llama_jax.data import stack_rows

PERIOD, STRIDE = 1024, 389  # mixture offsets: u_s = ((s * STRIDE) % PERIOD) / (PERIOD * B); STRIDE coprime to PERIOD
ORDER = "sha256-seed"  # how `order_seed` derives the orders; recorded in a run's data stream


def order_seed(seed: int, source: int, legacy: bool = False) -> int:
    """The base of the row orders of source number `source` in a run of train.seed `seed`. Grain
    seeds epoch e's permutation with (base + e) mod 2**32, so with the run's seed itself as the base
    (`legacy`: runs whose data stream records no ORDER, which keep their orders) runs of seeds s and
    s + 1 visit the same orders an epoch apart; a hash of (seed, source) keeps a seed sweep's
    runs apart."""
    if legacy:
        return (seed + 7919 * source) % 2**32
    return int.from_bytes(hashlib.sha256(f"{seed}/{source}".encode()).digest()[:4], "little")


def row_count(tokens: int, seq_len: int) -> int:
    """Whole rows of seq_len pairs in a stream of `tokens` tokens (the last one needs a target)."""
    return max(tokens - 1, 0) // seq_len


def pack_stream_row(split, k: int, seq_len: int) -> dict[str, np.ndarray]:
    """Row k of a prepared split: tokens, targets, positions, segment_ids (int32), loss_mask (float32)."""
    start = k * seq_len
    window = split.token_range(start, start + seq_len + 1)
    # documents beginning inside the row (after its first slot) or at its last target
    starts = split.document_starts_in(start + 1, start + seq_len + 1) - start
    offsets = np.arange(seq_len)
    begun = np.searchsorted(starts, offsets, side="right")  # documents begun in (0, o]
    last_start = np.concatenate([[0], starts])[begun]
    loss_mask = np.ones(seq_len, np.float32)
    loss_mask[starts[starts <= seq_len] - 1] = 0.0  # the target is the next document's BOS
    return {"tokens": window[:-1].astype(np.int32), "targets": window[1:].astype(np.int32),
            "positions": (offsets - last_start).astype(np.int32), "segment_ids": (begun + 1).astype(np.int32),
            "loss_mask": loss_mask}


@dataclasses.dataclass
class Source:
    """One prepared split as a stream of rows in per-epoch orders."""

    name: str
    split: object  # llama_jax.prepare.PreparedSplit
    weight: float
    rows: int
    order: object  # grain MapDataset: n -> row of the n-th visit

    @classmethod
    def create(cls, name: str, split, weight: float, seq_len: int, seed: int) -> "Source":
        import grain

        rows = row_count(split.tokens, seq_len)
        if rows < 1:
            raise ValueError(f"data source {name!r} has {split.tokens} training tokens, fewer than one row of "
                             f"train.seq_len={seq_len} needs ({seq_len + 1}); lower seq_len or add documents")
        order = grain.MapDataset.range(rows).shuffle(seed=seed).repeat()
        if rows > 1 and order[rows - 1] == order[0]:  # Grain misses the last row (module docstring)
            order = order.map_with_index(lambda n, row: rows - 1 if n % rows == rows - 1 else row)
        return cls(name, split, weight, rows, order)


class Mixture:
    """Which source each slot of a global batch reads, and how many rows of each came before."""

    def __init__(self, weights: Sequence[float], batch_size: int):
        total = float(sum(weights))
        self.bounds = np.concatenate([[0.0], np.cumsum(weights) / total])
        self.bounds[-1] = 1.0
        self.batch_size = batch_size
        counts, slots_digest = np.zeros((PERIOD, len(weights)), np.int64), hashlib.sha256()
        for step in range(PERIOD):  # the cycle repeats
            slots = self.slot_sources(step)
            counts[step] = np.bincount(slots, minlength=len(weights))
            slots_digest.update(slots.astype(np.int64).tobytes())
        self._before = np.concatenate([np.zeros((1, len(weights)), np.int64), np.cumsum(counts, axis=0)])
        self._fingerprint = slots_digest.hexdigest()

    def _offset(self, step: int) -> float:
        return ((step * STRIDE) % PERIOD) / (PERIOD * self.batch_size)

    def slot_sources(self, step: int) -> np.ndarray:
        """Source of each slot of the batch of `step` [B]."""
        points = (np.arange(self.batch_size) / self.batch_size + self._offset(step)) % 1.0
        return np.searchsorted(self.bounds, points, side="right") - 1

    def counts(self, step: int) -> np.ndarray:
        """Rows of each source in the batch of `step`."""
        return np.bincount(self.slot_sources(step), minlength=len(self.bounds) - 1)

    def fingerprint(self) -> str:
        """sha256 of which source every slot of every batch reads. Weights scaled alike give the same
        shares up to float rounding, and a share that ends exactly on a slot's point can move that
        slot: a resume compares this, not only the shares."""
        return self._fingerprint

    def rows_before(self, step: int) -> np.ndarray:
        """Rows of each source in the batches before `step`."""
        periods, rest = divmod(step, PERIOD)
        return periods * self._before[PERIOD] + self._before[rest]


class TrainRows:
    """The training batches of a run on prepared data: step -> this process's rows."""

    def __init__(self, sources: Sequence[Source], seq_len: int, batch_size: int):
        self.sources, self.seq_len, self.batch_size = list(sources), seq_len, batch_size
        self.mixture = Mixture([s.weight for s in self.sources], batch_size)
        period, smallest = self.mixture.rows_before(PERIOD), 1 / (PERIOD * batch_size)
        total = sum(s.weight for s in self.sources)
        # A share below one row in PERIOD batches is never read, and its epoch never ends; or, where
        # its interval holds one of the grid's points (the first source's always does), it is read
        # once in PERIOD batches, far above its share.
        starved = [s for s, n in zip(self.sources, period) if n == 0 or s.weight / total < smallest]
        if starved:
            share = starved[0].weight / total
            raise ValueError(f"data.mixture.{starved[0].name}: a share of {share:.3g} is less than one row in "
                             f"{PERIOD} batches of {batch_size} ({smallest:.3g}); raise its weight or leave it out")

    def visits(self, step: int, rows: Sequence[int]) -> list[tuple[int, int]]:
        """(source, n) of the given global rows of the batch of `step`: n counts that source's rows
        from the start of training (epoch n // rows, row order[n])."""
        slots = self.mixture.slot_sources(step)
        before = self.mixture.rows_before(step)
        rank = np.empty(len(slots), np.int64)  # each slot's place among the batch's slots of its source
        for i in np.unique(slots):
            of_i = slots == i
            rank[of_i] = np.arange(np.count_nonzero(of_i))
        return [(int(slots[r]), int(before[slots[r]] + rank[r])) for r in rows]

    def row_of(self, source: int, n: int) -> int:
        return int(self.sources[source].order[n])

    def batch(self, step: int, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """Those global rows of the batch of `step`, with `source` [rows] naming each row's source."""
        packed = []
        for i, n in self.visits(step, rows):
            row = pack_stream_row(self.sources[i].split, self.row_of(i, n), self.seq_len)
            row["source"] = np.int32(i)
            packed.append(row)
        return stack_rows(packed)

    def progress(self, steps_done: int) -> dict[str, float]:
        """Epochs (fractional) and tokens of each source consumed by the first `steps_done` steps."""
        before = self.mixture.rows_before(steps_done)
        out = {"tokens_seen": float(before.sum() * self.seq_len)}
        for source, n in zip(self.sources, before):
            key = "epoch" if len(self.sources) == 1 else f"epoch/{source.name}"
            out[key] = float(n / source.rows)
            if len(self.sources) > 1:
                out[f"tokens_seen/{source.name}"] = float(n * self.seq_len)
        return out


__all__ = ["Mixture", "Source", "TrainRows", "pack_stream_row", "row_count"]

