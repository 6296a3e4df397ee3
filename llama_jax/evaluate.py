"""Evaluation: exact held-out loss, and scoring of continuations and texts.

Exact held-out evaluation (`evaluate_documents`): each document is tokenized with BOS and EOS and
cut into consecutive windows of seq_len + 1 tokens that overlap by one token, so each of its
n - 1 targets (every token after BOS) is predicted exactly once, never sampled. Windows are
packed whole into rows of seq_len slots (`data.pack_row`: each window its own segment, rotary
positions from 0, as in training) and rows into batches of a fixed shape, so one compiled forward
serves the whole set. Sums are float64 on the host. `max_batches` limits it to the first batches
(a fixed subset).

Scoring (`Scorer`): the log-likelihood of a continuation given a context (sum of log-probabilities,
and whether greedy decoding would produce it), and the rolling log-likelihood of a whole text in
windows of the model's context, as the lm-evaluation-harness defines them. Requests are sorted by
length and right-padded to a length bucket (powers of two up to max_seq_len) in batches of a fixed
size (for fewer requests, the next power of two rows): one compiled shape per bucket and batch
size. A context too long for the model is truncated from the left with a warning, as the harness
does.

Everything here takes a model config and parameters (on one device, or sharded with `mesh`) and
nothing from the training loop.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LLaMAConfig, check_model_config, is_int
from llama_jax.data import pack_row, stack_rows
from llama_jax.model import check_params_as_laid_out, params_in_layout
from llama_jax.sharding import ambient_mesh, check_divisible, make_mesh, mesh_context
from llama_jax.tokenizer import check_tokenizer

MIN_BUCKET = 16  # shortest padded length of a scoring batch


# ---- the forward pass ------------------------------------------------------------------------


def _token_scores(params, tokens_BxS, targets_BxS, positions_BxS, segment_ids_BxS, cfg: LLaMAConfig):
    """(log p(target) [B, S] float32, argmax == target [B, S] bool) of every slot."""
    from llama_jax.attention import runnable_at_length
    from llama_jax.model import LLaMA

    cfg = cfg.replace(attention_impl=runnable_at_length(cfg.attention_impl, tokens_BxS.shape[1]))
    logits = LLaMA(cfg).apply({"params": params}, tokens_BxS, positions=positions_BxS,
                              segment_ids=segment_ids_BxS).astype(jnp.float32)
    lse_BxS = jax.nn.logsumexp(logits, axis=-1)
    target_BxS = jnp.take_along_axis(logits, targets_BxS[..., None], axis=-1)[..., 0]
    return target_BxS - lse_BxS, jnp.argmax(logits, axis=-1) == targets_BxS


@functools.cache
def _jitted_scores(cfg: LLaMAConfig, mesh):
    """`_token_scores` compiled for one config; on a mesh its results are replicated, so every
    process can read all of them."""
    if mesh is None:
        return jax.jit(functools.partial(_token_scores, cfg=cfg))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(functools.partial(_token_scores, cfg=cfg), out_shardings=(replicated, replicated))


def _placed(config: LLaMAConfig, params, mesh):
    """`params` on `mesh`'s devices, where the batches go: as they are where every array is there
    already (a trainer's state, `load_model(path, shardings=...)`), else placed as training shards
    them, as `generate` places them (a jitted call refused params on one device, as `load_model`
    without shardings gives them, with "incompatible devices", also inside an enclosing mesh)."""
    from llama_jax.checkpoint import mesh_shardings

    devices = set() if mesh is None else set(mesh.devices.flat)
    if mesh is None or all(isinstance(x, jax.Array) and x.sharding.device_set == devices
                           for x in jax.tree.leaves(params)):
        return params
    return jax.device_put(flax.core.unfreeze(params), mesh_shardings(config, mesh))  # (a FrozenDict: dicts)


class _Forward:
    """Runs `_token_scores` on numpy batches: placed on `mesh` (rows split over data x fsdp; default:
    the mesh `context()` enters, or that of an enclosing `with mesh:`, if any), inside `context()`
    (e.g. a trainer's mesh and logical-axis rules), one batch in flight while the next is prepared; the
    params are placed on that mesh (`_placed`)."""

    def __init__(self, config: LLaMAConfig, params, mesh=None, context: Callable | None = None):
        from llama_jax.attention import runnable_here

        check_model_config(config)
        self.context = context or contextlib.nullcontext
        if mesh is None:  # (a trainer's context alone gave rows that its batch axes do not divide)
            with self.context():
                mesh = ambient_mesh()
        if mesh is not None:  # (refused here, not as a shard_map error in the first compile)
            check_divisible(config, mesh)
        config = config.replace(attention_impl=runnable_here(config.attention_impl))  # a GPU run's model, here
        check_params_as_laid_out(config, params)
        self.config, self.params, self.mesh = config, _placed(config, params_in_layout(config, params), mesh), mesh
        self.scores = _jitted_scores(config, mesh)

    def row_multiple(self) -> int:
        """Batch rows must be a multiple of this (the data-parallel size of the mesh)."""
        if self.mesh is None:
            return 1
        from llama_jax.sharding import BATCH_AXES

        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def rows(self, n: int) -> int:
        """`n` rows rounded up to a multiple of `row_multiple`."""
        return -(-n // self.row_multiple()) * self.row_multiple()

    def _place(self, batch: dict[str, np.ndarray]):
        """Every process holds the whole batch; each puts its devices' rows in place."""
        if self.mesh is None:
            return batch
        from llama_jax.sharding import batch_sharding

        sharding = batch_sharding(self.mesh)
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                for k, v in batch.items()}

    def dispatch(self, batch: dict[str, np.ndarray]):
        b = self._place(batch)
        with self.context():
            return self.scores(self.params, b["tokens"], b["targets"], b["positions"], b["segment_ids"])

    def run(self, batches: Iterable[tuple[dict[str, np.ndarray], object]]
            ) -> Iterator[tuple[np.ndarray, np.ndarray, object]]:
        """(log-probs, hits, tag) per (batch, tag), in order; the next batch is dispatched before
        the previous one's results are fetched."""
        pending = None
        for batch, tag in batches:
            scores = self.dispatch(batch)
            if pending is not None:
                yield self._fetch(*pending)
            pending = scores, tag
        if pending is not None:
            yield self._fetch(*pending)

    @staticmethod
    def _fetch(scores, tag):
        logp, hit = jax.device_get(scores)
        return np.asarray(logp, np.float64), np.asarray(hit), tag


# ---- exact held-out evaluation ---------------------------------------------------------------


def document_windows(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Consecutive windows of at most seq_len + 1 tokens overlapping by one: window k holds
    tokens[k*seq_len : (k+1)*seq_len + 1], so each of the n - 1 targets is in exactly one."""
    return [tokens[s:s + seq_len + 1] for s in range(0, len(tokens) - 1, seq_len)]


def packed_rows(token_documents: Iterable[np.ndarray], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of seq_len slots holding the windows of the documents, in order, each window whole."""
    row, room = [], seq_len
    for tokens in token_documents:
        for window in document_windows(tokens, seq_len):
            if len(window) - 1 > room:
                yield pack_row(row, seq_len)
                row, room = [], seq_len
            row.append(window)
            room -= len(window) - 1
    if row:
        yield pack_row(row, seq_len)


@dataclasses.dataclass
class EvalResult:
    """Sums over the evaluated targets; `bytes` is None when only part of a set was evaluated."""

    nll: float = 0.0  # nats, summed over targets
    correct: int = 0  # targets that are the argmax of the model's distribution
    tokens: int = 0  # targets evaluated (every token of a document but its BOS; EOS included)
    documents: int = 0
    bytes: int | None = 0  # UTF-8 bytes of the evaluated documents' text

    def __add__(self, other: "EvalResult") -> "EvalResult":
        n_bytes = None if self.bytes is None or other.bytes is None else self.bytes + other.bytes
        return EvalResult(self.nll + other.nll, self.correct + other.correct, self.tokens + other.tokens,
                          self.documents + other.documents, n_bytes)

    def metrics(self) -> dict[str, float | int | None]:
        n = max(self.tokens, 1)
        loss = self.nll / n
        bpb = self.nll / math.log(2) / self.bytes if self.bytes else None
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bpb,
                "accuracy": self.correct / n, "tokens": self.tokens, "documents": self.documents,
                "bytes": self.bytes}


def evaluate_documents(config: LLaMAConfig, params, documents: Iterable[str], tokenizer, seq_len: int,
                       batch_size: int = 8, max_batches: int | None = None, mesh=None,
                       context: Callable | None = None, progress: bool = False) -> EvalResult:
    """Loss, accuracy and counts over every target of `documents` (texts, each encoded with BOS and
    EOS), or over the first `max_batches` batches of them; see `evaluate_tokens`."""
    if isinstance(documents, (str, bytes)):
        raise TypeError(f"documents is an iterable of texts, got one {type(documents).__name__}; pass [text] to "
                        f"score a single document")
    if isinstance(documents, Mapping):  # (its keys would be scored)
        raise TypeError("documents is an iterable of texts, got a dict; pass its texts, e.g. [d['text'] for d in rows]")
    check_tokenizer(tokenizer)
    total = len(documents) if hasattr(documents, "__len__") else None
    encoded = ((tokenizer.encode(text, bos=True, eos=True), len(text.encode("utf-8"))) for text in documents)
    return evaluate_tokens(config, params, encoded, seq_len, batch_size, max_batches, mesh, context, progress, total)


def evaluate_tokens(config: LLaMAConfig, params, documents: Iterable[tuple[Sequence[int], int]], seq_len: int,
                    batch_size: int = 8, max_batches: int | None = None, mesh=None, context: Callable | None = None,
                    progress: bool = False, total: int | None = None) -> EvalResult:
    """Loss, accuracy and counts over every target of `documents` ((token ids, UTF-8 bytes of the
    text) pairs), or over the first `max_batches` batches of them (a fixed subset; `documents`
    then counts the documents begun, and `bytes` is None, as the last of them may be cut).

    Batches are [batch_size, seq_len] (batch_size rounded up to a multiple of the mesh's
    data-parallel size); the last is filled with empty rows. `mesh`/`context`: run on sharded
    params (see `_Forward`). `progress`: a progress bar over the `total` documents. ValueError for
    token ids outside the vocabulary, and for documents with no target at all (none given).
    """
    _check_seq_len(seq_len, config)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (not is_int(max_batches) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None (all), got {max_batches!r}")
    forward = _Forward(config, params, mesh, context)
    rows_per_batch = forward.rows(batch_size)
    result = EvalResult()
    bar = _progress(progress, total, "documents")
    first_targets: list[int] = []  # each document's first target, counted over all of the documents' targets

    def counted() -> Iterator[np.ndarray]:
        targets = 0
        for document in documents:
            tokens, n_bytes = _document_pair(document, result.documents)
            ids = _checked_ids(tokens, config.vocab_size, f"document {result.documents}")
            first_targets.append(targets)
            targets += max(len(ids) - 1, 0)
            result.documents += 1
            result.bytes += n_bytes
            bar.update(1)
            yield ids

    batches = held_out_batches(counted(), seq_len, rows_per_batch, max_batches, forward.row_multiple())
    try:
        for logp, hit, mask in forward.run(_inputs(b) for b in batches):
            result.nll -= float(np.sum(logp * mask))
            result.correct += int(np.sum(hit & (mask > 0)))
            result.tokens += int(np.sum(mask))
    finally:
        bar.close()
    if not result.tokens:
        raise ValueError(f"nothing to evaluate: {result.documents} documents with no target (a document "
                         f"of n >= 2 tokens has n - 1 targets)")
    if max_batches is not None:
        # The batches hold the first result.tokens targets, in order; a row is known to be full only once
        # the next window is read, so the last document read may be one none of whose targets they hold.
        result.documents = bisect.bisect_left(first_targets, result.tokens)
        result.bytes = None
    return result


def _document_pair(document, i: int) -> tuple[object, int]:
    """`evaluate_tokens`' document `i`: (its token ids, the UTF-8 bytes of its text), checked to be a pair."""
    if not (isinstance(document, (tuple, list)) and len(document) == 2 and not is_int(document[0])):
        raise ValueError(f"document {i}: documents are (token ids, bytes of the text) pairs, e.g. [(ids, "
                         f"len(text.encode()))], got {document!r}"[:240])
    n_bytes = document[1]
    if not (is_int(n_bytes) and n_bytes >= 0):
        raise ValueError(f"document {i}: the bytes of its text must be an integer >= 0, got {n_bytes!r}")
    return document[0], int(n_bytes)


def _checked_ids(tokens, vocab_size: int, what: str) -> np.ndarray:
    """`tokens` as an int32 array; ValueError naming `what` unless they are integers in the
    vocabulary (a bad id would read a NaN or clipped embedding row under jit)."""
    ids = np.asarray(tokens)
    if ids.ndim != 1 or ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"{what}: token ids must be a sequence of integers, got {ids.dtype} of shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int32, copy=False)


def evaluate_splits(config: LLaMAConfig, params, splits: Mapping[str, object], seq_len: int, batch_size: int = 8,
                    max_batches: int | None = None, mesh=None, context: Callable | None = None,
                    progress: bool = False) -> dict[str, EvalResult]:
    """`evaluate_tokens` over each prepared split of `splits` (name -> split, e.g. the held-out
    split of each source of a mixture); sum the results for all of them together."""
    from llama_jax.run_data import split_documents

    results = {}
    for name, split in splits.items():
        # (token ids beyond the tokenizer's are damage the split reports as it reads them)
        results[name] = evaluate_tokens(config, params, split_documents(split), seq_len, batch_size,
                                        max_batches, mesh, context, progress, split.documents)
    return results


def held_out_batches(documents: Iterable[Sequence[int]], seq_len: int, rows: int,
                     max_batches: int | None = None, multiple: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Packed [rows, seq_len] batches of the documents' (token ids) consecutive windows
    (`packed_rows`), in order, the last filled with empty rows; only the first `max_batches` when given.
    Documents that fill less than one batch make one of as many rows as they need, rounded up to
    a `multiple` (a batch size far above the data costs no memory)."""
    made, batch = 0, []
    for row in packed_rows((np.asarray(tokens, np.int32) for tokens in documents), seq_len):
        batch.append(row)
        if len(batch) == rows:
            yield stack_rows(batch)
            batch, made = [], made + 1
            if made == max_batches:
                return
    if batch:
        size = rows if made else -(-len(batch) // multiple) * multiple
        yield stack_rows(batch + [pack_row([], seq_len)] * (size - len(batch)))


def _check_seq_len(seq_len, config: LLaMAConfig) -> None:
    if not is_int(seq_len) or not 2 <= seq_len <= config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is out of range; valid: 2 <= seq_len <= the model's max_seq_len "
                         f"({config.max_seq_len})")


def _inputs(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the model's inputs, the loss mask) of a packed batch."""
    return {k: batch[k] for k in ("tokens", "targets", "positions", "segment_ids")}, batch["loss_mask"]


def _progress(enabled: bool, total: int | None, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", dynamic_ncols=True, disable=None if enabled else True)


# ---- scoring ---------------------------------------------------------------------------------


def length_bucket(n: int, max_len: int) -> int:
    """The padded length of a row of n tokens: the next power of two (at least MIN_BUCKET),
    at most max_len."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_len)


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `tokens` exactly once, each with as
    much context as fits in max_len: the first window is conditioned on `prefix_token` alone,
    each later one predicts up to max_len tokens after a context that fills the window. Equal to
    lm-eval's `get_rolling_token_windows(context_len=1)` followed by `make_disjoint_window`."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        width = min(len(tokens) - predicted, max_len)
        end = predicted + width
        windows.append((tokens[end - max_len - 1:end - width], tokens[end - width:end]))
        predicted = end
    return windows


class Scorer:
    """Log-likelihoods of token sequences under a model, batched.

    `loglikelihood([(context, continuation), ...])` -> [(sum of log p(continuation token), whether
    greedy decoding produces the continuation), ...]; `loglikelihood_rolling([tokens, ...],
    prefix_token)` -> [sum of log p(token) over the whole sequence, ...] in windows of max_seq_len
    (`rolling_windows`). Results come back in request order, as Python floats computed in float64
    from float32 log-probabilities over the model's whole vocabulary.
    """

    def __init__(self, config: LLaMAConfig, params, batch_size: int = 8, mesh=None,
                 context: Callable | None = None, max_length: int | None = None):
        check_model_config(config)
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_length is not None and not (is_int(max_length) and 1 <= max_length <= config.max_seq_len):
            raise ValueError(f"max_length={max_length!r} is out of range; valid: an integer from 1 to the model's "
                             f"max_seq_len ({config.max_seq_len}), or None for max_seq_len")
        self.config = config
        self.max_length = config.max_seq_len if max_length is None else int(max_length)
        self.forward = _Forward(config, params, mesh, context)
        self.batch_size = self.forward.rows(batch_size)

    def rows_for(self, n: int) -> int:
        """The rows of each batch of `n` requests: batch_size, or for fewer requests the next power of
        two (rounded up to the mesh's multiple), so that a batch size far above the requests costs
        no memory and calls of other small numbers of requests share a few compiled shapes."""
        return min(self.batch_size, self.forward.rows(1 << (max(n, 1) - 1).bit_length()))

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      progress: bool = False) -> list[tuple[float, bool]]:
        rows, truncated, requests = [], 0, _request_pairs(requests)
        for i, (context, continuation) in enumerate(requests):
            row, cut = self._row(i, list(context), list(continuation))
            rows.append(row)
            truncated += cut
        if truncated:
            warnings.warn(f"{truncated} of {len(requests)} requests are longer than the model's context "
                          f"({self.max_length} tokens + the last continuation token); their contexts were "
                          f"truncated from the left", stacklevel=2)
        return self._score(rows, progress)

    def loglikelihood_rolling(self, token_lists: Sequence[Sequence[int]], prefix_token: int,
                              progress: bool = False) -> list[float]:
        if not (is_int(prefix_token) and 0 <= prefix_token < self.config.vocab_size):
            raise ValueError(f"prefix_token must be a token id in [0, {self.config.vocab_size}) (e.g. BOS), got "
                             f"{prefix_token!r}")
        given, token_lists = token_lists, _id_sequences(token_lists)
        if token_lists is None:
            raise ValueError(f"token_lists must be a list of token-id sequences (wrap one: [tokens]), got "
                             f"{given!r}"[:200])
        windows, owner = [], []
        for i, tokens in enumerate(token_lists):
            for context, continuation in rolling_windows(tokens, prefix_token, self.max_length):
                windows.append(self._row(i, context, continuation)[0])
                owner.append(i)
        totals = [0.0] * len(token_lists)
        for i, (logprob, _) in zip(owner, self._score(windows, progress)):
            totals[i] += logprob
        return totals

    def _row(self, i: int, context: list[int], continuation: list[int]) -> tuple[tuple[list[int], int], bool]:
        """((input + last target tokens, number of scored targets), whether the context was cut)."""
        L, V = self.max_length, self.config.vocab_size
        if not continuation:
            raise ValueError(f"request {i}: the continuation is empty; there is nothing to score")
        if not context:
            raise ValueError(f"request {i}: the context is empty; give at least one token (e.g. BOS) for the "
                             f"first continuation token to be conditioned on")
        if len(continuation) > L:
            raise ValueError(f"request {i}: the continuation has {len(continuation)} tokens, more than the "
                             f"model's context of {L}; it cannot be scored in one window")
        whole = list(context) + list(continuation)
        bad = [t for t in whole if not (is_int(t) and 0 <= t < V)]
        if bad:  # (a list: None is a bad id too)
            raise ValueError(f"request {i}: token id {bad[0]!r}; valid: integers in [0, {V})")
        whole = [int(t) for t in whole]
        return (whole[-(L + 1):], len(continuation)), len(whole) > L + 1

    def _score(self, rows: list[tuple[list[int], int]], progress: bool) -> list[tuple[float, bool]]:
        """Longest first, in batches of batch_size rows right-padded to their length bucket."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        B = self.rows_for(len(rows))

        def batches():
            for start in range(0, len(order), B):
                chosen = order[start:start + B]
                S = length_bucket(len(rows[chosen[0]][0]) - 1, self.max_length)
                arrays = {k: np.zeros((B, S), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
                for r, i in enumerate(chosen):
                    seq = np.asarray(rows[i][0], np.int32)
                    n = len(seq) - 1
                    arrays["tokens"][r, :n] = seq[:-1]
                    arrays["targets"][r, :n] = seq[1:]
                    arrays["positions"][r, :n] = np.arange(n)
                    arrays["segment_ids"][r, :n] = 1
                yield arrays, chosen

        results: list = [None] * len(rows)
        bar = _progress(progress, len(rows), "requests")
        try:
            for logp, hit, chosen in self.forward.run(batches()):
                for r, i in enumerate(chosen):
                    n, m = len(rows[i][0]) - 1, rows[i][1]
                    results[i] = (float(logp[r, n - m:n].sum()), bool(hit[r, n - m:n].all()))
                bar.update(len(chosen))
        finally:
            bar.close()
        return results


def _id_sequences(value) -> list | None:
    """`value` (any iterable: a list, a generator, a 2-D array) as a list of token-id sequences,
    or None when its items are not sequences (the ids themselves are checked where they are read)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return None
    items = list(value)
    return items if all(hasattr(x, "__len__") and not isinstance(x, (str, bytes)) for x in items) else None


def _request_pairs(requests) -> list:
    """`Scorer.loglikelihood`'s requests as a list, checked to be (context ids, continuation ids) pairs."""
    pairs = _id_sequences(requests)
    if pairs is None or not all(len(r) == 2 and _id_sequences(r) is not None for r in pairs):
        raise ValueError(f"requests must be a list of (context ids, continuation ids) pairs (wrap one: "
                         f"[(context, continuation)]), got {requests!r}"[:240])
    return pairs


# ---- what `llama-jax eval` evaluates ---------------------------------------------------------


def held_out_documents(data_config) -> Sequence[str]:
    """The documents a run with this `data` config section holds out for evaluation: its eval
    source (e.g. data.tfds_eval_split) when it has one, else `split_indices(n, eval_fraction)[1]`
    of its documents, exactly those `llama-jax prepare-data` holds out."""
    from llama_jax import data as data_lib

    source = data_config.get("source")
    if source == "synthetic":
        raise ValueError("data.source=synthetic has no documents to evaluate on; give the config of a run on text "
                         f"(data.source: prepared, {', '.join(data_lib.DOCUMENT_SOURCES)})")
    if source not in data_lib.SOURCES:
        raise ValueError(f"data.source={source!r} is not supported; valid: prepared, "
                         f"{', '.join(data_lib.DOCUMENT_SOURCES)}")
    documents, eval_source = data_lib.make_source(data_config)
    if eval_source is not None:
        return eval_source
    fraction = data_config.get("eval_fraction", 0.01)
    held_out = data_lib.split_indices(len(documents), fraction)[1]
    if not len(held_out):
        raise ValueError(f"data.eval_fraction={fraction} holds out no document; use the training config's "
                         f"eval_fraction (> 0)")
    return data_lib.Subset(documents, held_out)


def load_run(workdir, step: int | None = None, mesh=None) -> tuple[LLaMAConfig, dict, str, int, dict]:
    """(model config, params, tokenizer path, step, run info) of a run's checkpoint (default:
    the latest), reading only its parameters: sharded over `mesh` when given (as `load_model`),
    else on the first local device."""
    from llama_jax.run import read_checkpoint_params, run_tokenizer

    workdir = Path(workdir).absolute()
    step, info, config, params = read_checkpoint_params(workdir, step, mesh)
    tokenizer = run_tokenizer(workdir, info)
    if tokenizer is None:
        raise ValueError(f"{workdir} has no tokenizer.model (a run on synthetic data); generating or evaluating "
                         "text needs one: export the run (llama-jax export) and give the model directory a "
                         "tokenizer.model of its vocabulary (or generate --tokenizer FILE)")
    return config, params, str(tokenizer), step, info


def held_out_seq_len(config, seq_len: int | None = None) -> int:
    """The seq_len `evaluate_held_out` scores with (and its result records): the given one, else
    the config's train.seq_len."""
    return seq_len or config.train.seq_len


def evaluate_held_out(config, model_dir=None, workdir=None, step: int | None = None, seq_len: int | None = None,
                      batch_size: int | None = None, progress: bool = False, devices=None,
                      run_config: bool = False) -> dict:
    """`llama-jax eval`: every held-out document of an experiment config's `data` section, scored by
    a model directory or a run's checkpoint (for a run on a raw source, read from the run's own
    prepared copy: `run_data_config`). Returns the metrics with what was evaluated.
    seq_len and batch_size default to the config's train.seq_len and micro-batch. The parameters are
    sharded over `devices` (default: all) as the config's `mesh` section lays out training, and
    batch rows are split over its data x fsdp axes. `run_config`: `config` is the run's own
    config.json, data settings unchanged, so its prepared data must be what the checkpoint
    trained on (`run.check_named_data`)."""
    from llama_jax.tokenizer import check_fits, load_tokenizer

    if (model_dir is None) == (workdir is None):
        raise ValueError("give either a model directory or a run's workdir")
    # bad data settings fail before the model is read
    data_config = run_data_config(config.data, workdir, run_config) if workdir is not None else config.data
    prepared = _held_out_splits(data_config, workdir) if data_config.get("source") == "prepared" else None
    documents = held_out_documents(data_config) if prepared is None else None
    seq_len = held_out_seq_len(config, seq_len)
    batch_size = batch_size or max(1, config.train.batch_size // config.train.grad_accum)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,  # a bad mesh also fails first
                     jax.devices() if devices is None else devices)
    if workdir is not None:
        model, params, tokenizer_file, step, info = load_run(workdir, step, mesh)  # straight onto the mesh
        if run_config and prepared is not None:
            from llama_jax.prepare import open_prepared
            from llama_jax.run import check_named_data
            from llama_jax.run_data import prepared_dirs, stream_of

            opened = [(name, open_prepared(path), weight) for name, path, weight in prepared_dirs(data_config)]
            check_named_data(Path(os.path.abspath(workdir)), info.get("data_stream"), stream_of(opened), data_config)
        origin = {"workdir": os.path.abspath(workdir), "step": step}
        tokenizer_file = Path(tokenizer_file)
    else:
        from llama_jax.checkpoint import load_model
        from llama_jax.model_dir import load_tokenizer_for

        model, tokenizer = load_tokenizer_for(model_dir, "evaluating text needs the model's tokenizer (llama-jax "
                                              "export and convert --to jax copy it into the model directory)")
        origin = {"model": str(Path(model_dir).absolute())}
        tokenizer_file = Path(model_dir) / "tokenizer.model"
        _check_seq_len(seq_len, model)  # before reading the parameters
        model, params = load_model(model_dir, mesh=mesh)  # straight onto the mesh
    if workdir is not None:
        tokenizer = load_tokenizer(tokenizer_file)
        check_fits(tokenizer, model.vocab_size)
    about = {"seq_len": seq_len, **origin, "data": data_config.to_dict(), "mesh": dict(mesh.shape)}
    on_mesh = {"mesh": mesh, "context": lambda: mesh_context(mesh)}
    if prepared is None:
        result = evaluate_documents(model, params, documents, tokenizer, seq_len, batch_size, progress=progress,
                                    **on_mesh)
        return {**result.metrics(), **about}
    from llama_jax.safe_io import sha256_file

    digest = sha256_file(tokenizer_file)
    for name, (_, prepared_with) in prepared.items():
        if prepared_with != digest:
            raise ValueError(f"the data of {name!r} was prepared with another tokenizer (sha256 {prepared_with[:12]}) "
                             f"than the model's {tokenizer_file} ({digest[:12]}); prepare it again with the model's")
    results = evaluate_splits(model, params, {name: split for name, (split, _) in prepared.items()}, seq_len,
                              batch_size, progress=progress, **on_mesh)
    if len(results) == 1:
        return {**next(iter(results.values())).metrics(), **about}
    total = sum(results.values(), EvalResult())
    return {**total.metrics(), "sources": {name: r.metrics() for name, r in results.items()}, **about}


def run_data_config(data_config, workdir, run_config: bool = False):
    """The `data` section reading WORKDIR/data, a run's own prepared copy of its raw source, when
    `data_config` asks for the documents it was prepared from: the run's own settings
    (`run_config`, see `run_data.runs_own_settings`), or ones naming the same files from here (the
    files may have changed, moved or grown since, and held out others); else `data_config` itself,
    other documents to score. RunError for the run's own settings without WORKDIR/data, and for
    relative paths of the run's config.json that name other files from here than the run's."""
    import copy
    import json

    from llama_jax.prepare import DOCUMENT_SOURCES, MANIFEST, document_settings, recorded_documents
    from llama_jax.run_data import RunError, own_copy_advice, prepared_copy_missing
    from llama_jax.safe_io import RUN_DATA_DIR

    directory = Path(os.path.abspath(workdir)) / RUN_DATA_DIR
    if data_config.get("source") not in DOCUMENT_SOURCES:
        return data_config
    if not (directory / MANIFEST).is_file():
        if run_config:
            raise RunError(f"{prepared_copy_missing(directory)}; {own_copy_advice(workdir)}; or give the data to "
                           f"score with --config FILE")
        return data_config
    if not run_config:
        try:
            recorded = document_settings(recorded_documents(json.loads((directory / MANIFEST).read_text())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            recorded = None  # a damaged manifest: the data asked for is read as it is
        if recorded != document_settings(data_config):
            if recorded is not None:
                _check_run_paths_read_here(data_config, workdir, recorded)
            return data_config
    run_data = copy.deepcopy(data_config)
    run_data.update(source="prepared", path=str(directory), tokenizer="")
    return run_data


def _check_run_paths_read_here(data_config, workdir, recorded: dict) -> None:
    """RunError when a path setting of `data_config` is the one the run's config.json gives, as
    written, relative, and names other files from the current directory than the run was
    prepared from (`recorded`): it came from the run, which read it from where it started."""
    from llama_jax.prepare import PATH_KEYS, document_settings, is_relative
    from llama_jax.run_data import RunError
    from llama_jax.safe_io import saved_run_setting

    try:
        saved = document_settings(saved_run_setting(workdir, "data"), absolute=False)
    except (TypeError, AttributeError):  # no data section, or a damaged one
        return
    given, here = document_settings(data_config, absolute=False), document_settings(data_config)
    for key in PATH_KEYS:
        if given.get(key) == saved.get(key) and is_relative(given.get(key)) and here.get(key) != recorded.get(key):
            raise RunError(f"data.{key}={given[key]!r} is {Path(workdir) / 'config.json'}'s, relative to the "
                           f"directory the run started in; read from {Path.cwd()} it names other files than the run "
                           f"was prepared from ({recorded.get(key)!r}); run the command from there, or give "
                           f"data.{key} as absolute paths")


def _held_out_splits(data_config, workdir) -> dict[str, tuple[object, str]]:
    """`held_out_splits`; where it reads the run's own copy of its documents (`workdir`'s data), an
    error for damage there says how to prepare that again."""
    from llama_jax.run_data import own_copy_advice
    from llama_jax.safe_io import RUN_DATA_DIR

    own = workdir is not None and data_config.get("path") == str(Path(os.path.abspath(workdir)) / RUN_DATA_DIR)
    return held_out_splits(data_config, f"{own_copy_advice(workdir)}; or give the data to score with --config FILE"
                           if own else None)


def held_out_splits(data_config, again: str | None = None) -> dict[str, tuple[object, str]]:
    """{source name: (its prepared held-out split, the SHA-256 of the tokenizer it was prepared
    with)} of a `data.source=prepared` config; ValueError when one holds out nothing. (`again`: as
    `prepare.open_prepared` takes it.)"""
    from llama_jax.prepare import open_prepared
    from llama_jax.run_data import prepared_dirs

    out = {}
    for name, path, _ in prepared_dirs(data_config):
        prepared = open_prepared(path, again=again)
        split = prepared.splits["held_out"]
        if not split.documents:
            raise ValueError(f"{path} holds out no document (prepared with eval_fraction 0 and no eval split); "
                             f"prepare it with data.eval_fraction > 0 to evaluate on it")
        out[name] = (split, prepared.tokenizer_sha256)
    return out
