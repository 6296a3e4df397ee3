"""Rows of prepared data: exact epochs, per-epoch orders, processes, mixtures.

The splits here hold their documents in memory behind the reader's interface, so the packing and
ordering are checked against the documents directly; tests/test_prepare.py checks the files."""

from collections import Counter

import numpy as np
import pytest

from llama_jax.data_inspect import coverage_lines
from llama_jax.packed import Mixture, Source, TrainRows, order_seed, pack_stream_row, row_count

BOS, EOS = 1, 2


class MemorySplit:
    """A prepared split's reader interface over documents held in memory."""

    def __init__(self, documents):
        self.docs = [np.asarray(d, np.int32) for d in documents]
        self.stream = np.concatenate(self.docs)
        self.starts = np.cumsum([0] + [len(d) for d in self.docs])[:-1]
        self.tokens, self.documents = len(self.stream), len(self.docs)

    def token_range(self, start, stop):
        return self.stream[start:stop]

    def document_starts_in(self, start, stop):
        return self.starts[(self.starts >= start) & (self.starts < stop)].astype(np.int64)


def random_documents(n, seed, low=2, high=40, vocab=50):
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(3, vocab, rng.integers(low, high)), EOS] for _ in range(n)]


def epoch_rows(train: TrainRows, source: int, epoch: int):
    """Every (step, slot, row) whose visit of `source` falls in `epoch`, walking the steps."""
    found, step = [], 0
    rows = train.sources[source].rows
    while train.mixture.rows_before(step)[source] < (epoch + 1) * rows:
        for slot, (i, n) in enumerate(train.visits(step, range(train.batch_size))):
            if i == source and n // rows == epoch:
                found.append((step, slot, train.row_of(i, n)))
        step += 1
    return found


def test_rows_partition_the_stream_and_never_cross_documents():
    docs = random_documents(60, seed=0)
    split, L = MemorySplit(docs), 16
    R = row_count(split.tokens, L)
    rows = [pack_stream_row(split, k, L) for k in range(R)]
    inputs = np.concatenate([r["tokens"] for r in rows])
    assert R == (split.tokens - 1) // L and np.array_equal(inputs, split.stream[:R * L])
    # the counted pairs are exactly the within-document pairs of the covered stream
    covered = split.stream[:R * L + 1]
    doc_of = np.searchsorted(split.starts, np.arange(len(covered)), side="right")
    expected = Counter((int(covered[o]), int(covered[o + 1])) for o in range(R * L) if doc_of[o] == doc_of[o + 1])
    got = Counter((int(a), int(b)) for r in rows for a, b, m in zip(r["tokens"], r["targets"], r["loss_mask"]) if m)
    assert got == expected
    assert len(split.stream) - R * L <= L  # only the tail after the last whole row is left out
    for r in rows:  # each segment is a contiguous piece of one document, positions counting from 0
        for seg in np.unique(r["segment_ids"]):
            where = r["segment_ids"] == seg
            assert np.array_equal(r["positions"][where], np.arange(where.sum()))
            piece = r["tokens"][where]
            assert any(np.array_equal(d[i:i + len(piece)], piece) for d in split.docs for i in range(len(d)))
        masked = r["loss_mask"] == 0
        assert np.all(r["tokens"][masked] == EOS) and np.all(r["targets"][masked] == BOS)


def test_one_epoch_visits_every_row_once_and_the_next_epoch_reorders():
    docs = random_documents(80, seed=1)
    split, L, B = MemorySplit(docs), 8, 4
    train = TrainRows([Source.create("data", split, 1.0, L, seed=3)], L, B)
    R = train.sources[0].rows
    first, second = epoch_rows(train, 0, 0), epoch_rows(train, 0, 1)
    assert sorted(row for *_, row in first) == list(range(R)) == sorted(row for *_, row in second)
    assert [row for *_, row in first] != [row for *_, row in second]
    # every covered token is an input exactly once in epoch 0, counted from the batches themselves
    seen = Counter()
    for step, slot, _ in first:
        seen.update(train.batch(step, [slot])["tokens"][0].tolist())
    assert seen == Counter(split.stream[:R * L].tolist())
    assert train.progress(len({s for s, _, _ in first}))["epoch"] >= 1.0
    assert train.progress(0) == {"tokens_seen": 0.0, "epoch": 0.0}


def test_every_row_once_where_grains_cipher_is_one_row_short():
    """Grain's cipher permutes [0, 2**b), b = ceil(log2(rows - 1)) rounded up to even, at least 16:
    with 65,537 rows (rows - 1 = 2**16), the last place of each epoch read the first place's row
    again, and row 65,536 was never read."""
    rows = 2**16 + 1
    train = TrainRows([Source.create("data", MemorySplit([[BOS, *[5] * (rows - 1), EOS]]), 1.0, 1, 7)], 1, 8)
    assert train.sources[0].rows == rows
    for epoch in (0, 1):
        order = [train.row_of(0, n) for n in range(epoch * rows, (epoch + 1) * rows)]
        assert sorted(order) == list(range(rows))


def test_a_seed_sweeps_runs_do_not_share_their_epochs_orders():
    """Grain seeds epoch e with base + e: with the run's seed as the base, seed 1's first epoch was
    seed 0's second, and so on (`order_seed` hashes it; the legacy base is kept for old runs)."""
    split = MemorySplit(random_documents(80, seed=1))

    def orders(seed: int, legacy: bool) -> list[list[int]]:
        train = TrainRows([Source.create("data", split, 1.0, 8, order_seed(seed, 0, legacy))], 8, 4)
        return [[row for *_, row in epoch_rows(train, 0, e)] for e in range(3)]

    legacy = {seed: orders(seed, True) for seed in (0, 1)}
    assert legacy[1][:2] == legacy[0][1:]  # what the hash is for
    hashed = [order for seed in (0, 1, 2) for order in orders(seed, False)]
    assert len({tuple(order) for order in hashed}) == len(hashed) == 9
    assert order_seed(0, 1) != order_seed(1, 0) and order_seed(5, 0, legacy=True) == 5


def test_processes_build_disjoint_parts_of_one_batch():
    split = MemorySplit(random_documents(50, seed=2))
    train = TrainRows([Source.create("data", split, 1.0, 8, seed=0)], 8, 8)
    whole = train.batch(5, range(8))
    parts = [train.batch(5, range(0, 4)), train.batch(5, range(4, 8))]
    for key, value in whole.items():
        assert np.array_equal(np.concatenate([p[key] for p in parts]), value)
    again = TrainRows([Source.create("data", split, 1.0, 8, seed=0)], 8, 8).batch(5, range(8))
    other_seed = TrainRows([Source.create("data", split, 1.0, 8, seed=1)], 8, 8).batch(5, range(8))
    assert all(np.array_equal(again[k], v) for k, v in whole.items())
    assert not np.array_equal(other_seed["tokens"], whole["tokens"])


@pytest.mark.parametrize("weights, batch", [([0.7, 0.3], 8), ([1, 2, 5], 16), ([0.05, 0.95], 8)])
def test_mixture_proportions_hold_within_a_row_per_batch(weights, batch):
    mixture = Mixture(weights, batch)
    p = np.asarray(weights) / sum(weights)
    steps = 3000
    counts = np.stack([mixture.counts(s) for s in range(steps)])
    assert np.all(counts.sum(axis=1) == batch)
    assert np.all(np.abs(counts - batch * p) < 1)  # every batch: within one row of B p_i
    assert np.array_equal(counts.cumsum(axis=0)[-1], mixture.rows_before(steps))
    for s in (1, 17, 1023, 1024, 2500):
        assert np.array_equal(mixture.rows_before(s), counts[:s].sum(axis=0))
    assert np.all(np.abs(mixture.rows_before(steps) - steps * batch * p) <= len(weights) * (1 + steps // 1024))


def test_mixture_sources_keep_their_own_epochs():
    a, b = MemorySplit(random_documents(30, seed=4)), MemorySplit(random_documents(90, seed=5))
    L, B = 8, 8
    train = TrainRows([Source.create("a", a, 1.0, L, 0), Source.create("b", b, 1.0, L, 1)], L, B)
    for source in (0, 1):  # each source's first epoch covers its rows exactly once, whatever the other does
        rows = [row for *_, row in epoch_rows(train, source, 0)]
        assert sorted(rows) == list(range(train.sources[source].rows))
    batch = train.batch(3, range(B))
    assert sorted(Counter(batch["source"].tolist()).values()) == [4, 4]
    progress = train.progress(10)
    assert progress["tokens_seen"] == 10 * B * L
    assert progress["epoch/a"] == pytest.approx(40 / train.sources[0].rows)
    assert progress["tokens_seen/b"] == 40 * L


def test_a_source_shorter_than_one_row_is_refused():
    with pytest.raises(ValueError, match=r"data source 'tiny' has 5 training tokens, fewer than one row of "
                                         r"train.seq_len=8 needs \(9\)"):
        Source.create("tiny", MemorySplit([[BOS, 5, 6, 7, EOS]]), 1.0, 8, 0)


def test_a_source_whose_share_gets_no_row_is_refused():
    """A share below one row in PERIOD batches is never read, and its epoch never ends (data inspect
    --epoch looped for ever); as the first source, it was read once per PERIOD batches, far above its
    share."""
    a, b = MemorySplit(random_documents(30, seed=4)), MemorySplit(random_documents(30, seed=5))
    L, B = 8, 8
    assert TrainRows([Source.create("a", a, 1.0, L, 0), Source.create("b", b, 2e-4, L, 1)], L, B).mixture.rows_before(
        1024)[1] == 1  # 1 / (1024 * 8) = 1.2e-4: one row
    for weights, name in (((1.0, 1e-6), "b"), ((1e-6, 1.0), "a")):  # the first source holds the first slot
        with pytest.raises(ValueError, match=rf"data.mixture.{name}: a share of 1e-06 is less than one row in 1024 "
                                             r"batches of 8 \(0.000122\); raise its weight or leave it out"):
            TrainRows([Source.create("a", a, weights[0], L, 0), Source.create("b", b, weights[1], L, 1)], L, B)


def test_epoch_coverage_counts_a_token_seen_twice_or_never():
    """Shares alone rounded one row read twice and one never, of 50,000, to "100.00% seen once, 0.00%
    more than once, 0.00% never": the counts go with them."""
    split = MemorySplit([[BOS, *[5] * 49_999, EOS]])
    order = list(range(50_000))
    order[1] = 0  # row 0 twice, row 1 never
    train = TrainRows([Source("data", split, 1.0, 50_000, order)], 1, 1000)
    assert ("of its 50,000 tokens in whole rows 49,998 (100.00%) seen once, 1 (0.00%) more than once, 1 (0.00%) "
            "never;") in coverage_lines(train)[0]
