"""Meta's original LLaMA checkpoint layout: `params.json` + `consolidated.NN.pth` + `tokenizer.model`.

This is the layout of Meta's own releases (LLaMA 1, 2, 3, 3.1, 3.2). Each `consolidated.NN.pth`
holds one model-parallel shard: column-parallel weights (wq, wk, wv, w1, w3, output) are split
along their output rows, row-parallel ones (wo, w2) along their input columns, norms are copied
to every shard. The embedding is split along the model dim in LLaMA-1/2 and along the vocabulary
in LLaMA-3. When there are fewer K/V heads than shards, consecutive shards carry copies of the
same K/V heads.

Meta rotates interleaved pairs (dims 2i, 2i+1 of a head); Hugging Face rotates halves (dims i,
i + Dh/2). Converting reorders the rows of wq and wk within each head; nothing else changes.

`params.json` does not store everything a LLaMAConfig holds, so reading fills gaps (a key it
does not know is refused: another model's setting or a misspelt one, ignored, would misread it):
- `vocab_size: -1` (LLaMA-1/2): taken from the embedding's shape.
- the FFN width is computed with Meta's formula from `multiple_of` / `ffn_dim_multiplier`.
- `rope_theta`, absent from LLaMA-1/2's files (their code has 10000 built in), is 10000; a
  checkpoint for LLaMA-3's code (a 128K vocabulary or use_scaled_rope) without it is refused:
  that code reads a missing one as 500000, so the file means 10000 or 500000 by the code reading it.
  Not so beside a `llama_jax.json` giving max_seq_len, as `write_meta` writes it: its earlier
  releases left a theta of 10000 out of params.json for LLaMA-3's code too, so there it is 10000.
- `use_scaled_rope: true` means LLaMA-3.1 scaling with low/high frequency factors 1/4 and an
  original context of 8192; the factor (8 for 3.1, 32 for 3.2) is not in Meta's files, so it
  comes from the caller, else a `rope_scaling_factor` setting (written by `write_meta`), else 8.
  A factor, given or set, for a checkpoint without `use_scaled_rope` is refused.
- `max_seq_len`, unless `llama_jax.json` records it (or a params.json written by an earlier
  release of `write_meta`), is guessed from the release's fingerprint: use_scaled_rope means
  LLaMA-3.1+ (131072), whatever the vocabulary; else a 128K vocabulary means LLaMA-3 (8192); a
  smaller one with rope_theta 1e6 means Code Llama (16384, as transformers' converter takes it);
  norm_eps 1e-6 means LLaMA-1 (2048); anything else is taken as LLaMA-2 (4096). To set another
  length, write `{"max_seq_len": N}` to `llama_jax.json` beside params.json (a key that file
  does not know is refused, as in params.json).
- tied embeddings: recorded by `write_meta` (below); otherwise a checkpoint without
  `output.weight` is read as tied.

`write_meta` writes params.json with the keys Meta's releases use, each only where Meta's files
have it (`n_kv_heads` when not n_heads, `rope_theta` when not 10000 or when written for LLaMA-3's
code, whose default is 500000, `use_scaled_rope` when true), since Meta's loaders take its keys
as `ModelArgs` fields and refuse any other; the rope scaling factor and `max_seq_len`, which those
loaders take from elsewhere, go to `llama_jax.json` beside it, so that reading back gives an equal
config (params.json files of earlier releases, which held them, still read). A model with a 128K
vocabulary or scaled rope is written for LLaMA-3's code (embedding split along the vocabulary),
any other for LLaMA-1/2's. Meta's files always have an `output.weight`: a tied model is
written with its embedding there as well and `tie_embeddings` in `llama_jax.json`; a checkpoint
without `output.weight` (as earlier releases wrote tied models) is read as tied too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from llama_jax.config import LLaMAConfig, RopeScaling, file_setting
from llama_jax.convert.hf import TensorSpec, tensor_specs
from llama_jax.convert.source import ConversionError, Source, same_values, stored_dtype
from llama_jax.convert.torch_io import (load_torch_file, numpy_to_tensor, save_torch_file, tensor_to_numpy,
                                        weight_dtype)
from llama_jax.safe_io import read_json_object

PARAMS_FILE = "params.json"
EXTRA_FILE = "llama_jax.json"  # what params.json has no key for: max_seq_len, rope scaling factor, tie
_EXTRA_KEYS = ("max_seq_len", "rope_scaling_factor", "tie_embeddings")
_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
_EMBED = "tok_embeddings.weight"
_OUTPUT = "output.weight"
_EMBED_HF, _OUTPUT_HF = "model.embed_tokens.weight", "lm_head.weight"
_NORM = "norm.weight"  # [dim], whole on every shard: the model dim the weights have
_WQ = "layers.0.attention.wq.weight"  # [dim, dim], split by rows: how many shards the weights were cut into
_IGNORED = ("rope.freqs",)  # precomputed rotary table old checkpoints carry; derived, not learned
_META_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_DEFAULT_ROPE_FACTOR = 8.0
_DTYPES = ("float32", "bfloat16", "float16")
_VOCAB_SPLIT_FROM = 128000  # LLaMA-3's 128K vocabulary: embedding split on the vocab, not the model dim
_CODE_LLAMA_THETA = 1e6  # with a LLaMA-2-sized vocabulary: Code Llama, trained to a 16384 context
_PARAMS_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope",
                "max_seq_len", "rope_scaling_factor",  # written here by earlier releases of write_meta
                "max_batch_size")  # how Meta's code batches, not what the model is

# (Hugging Face name, or suffix after "model.layers.N."; Meta name or suffix after "layers.N.";
#  model-parallel split axis of the [out, in] weight, None: replicated on every shard)
_NAMES = (
    ("model.embed_tokens.weight", _EMBED, None),  # axis depends on the release, see _tensors
    ("input_layernorm.weight", "attention_norm.weight", None),
    ("self_attn.q_proj.weight", "attention.wq.weight", 0),
    ("self_attn.k_proj.weight", "attention.wk.weight", 0),
    ("self_attn.v_proj.weight", "attention.wv.weight", 0),
    ("self_attn.o_proj.weight", "attention.wo.weight", 1),
    ("post_attention_layernorm.weight", "ffn_norm.weight", None),
    ("mlp.gate_proj.weight", "feed_forward.w1.weight", 0),
    ("mlp.up_proj.weight", "feed_forward.w3.weight", 0),
    ("mlp.down_proj.weight", "feed_forward.w2.weight", 1),
    ("model.norm.weight", "norm.weight", None),
    ("lm_head.weight", "output.weight", 0),
)
_BY_HF = {hf: (meta, axis) for hf, meta, axis in _NAMES}
_KV = ("attention.wk.weight", "attention.wv.weight")


class _MetaTensor(NamedTuple):
    spec: TensorSpec
    name: str  # Meta name
    axis: int | None  # model-parallel split axis; None: replicated on every shard
    rotary_heads: int | None  # wq / wk: heads whose rows are reordered between rotary layouts
    kv: bool  # wk / wv: copied across shards when n_kv_heads < shards


def _tensors(cfg: LLaMAConfig, embed_axis: int) -> dict[str, _MetaTensor]:
    """Every tensor of the model by Hugging Face name, with its Meta name and shard layout."""
    out = {}
    for spec in tensor_specs(cfg):
        if spec.layer is None:
            suffix, axis = _BY_HF[spec.hf_name]
            name = suffix
        else:
            suffix, axis = _BY_HF[spec.hf_name.split(".", 3)[3]]
            name = f"layers.{spec.layer}.{suffix}"
        if name == _EMBED:
            axis = embed_axis
        heads = {"attention.wq.weight": cfg.n_heads, "attention.wk.weight": cfg.n_kv_heads}.get(suffix)
        out[spec.hf_name] = _MetaTensor(spec, name, axis, heads, suffix in _KV)
    return out


# ---- rotary row order ------------------------------------------------------------------------


def _meta_to_hf_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from interleaved pairs (0,1,2,3,...) to halves (0,2,4,...,1,3,5,...)."""
    rows, cols = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def _hf_to_meta_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `_meta_to_hf_rotary`."""
    rows, cols = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols))


# ---- FFN width -------------------------------------------------------------------------------


def _meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int | float:
    """FFN width exactly as Meta's FeedForward computes it (inf: a multiplier beyond a float's range)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        if not math.isfinite(ffn_dim_multiplier * hidden):
            return math.inf
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params(dim: int, ffn_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's formula gives `ffn_dim`, preferring round numbers."""
    multiple_of = ffn_dim & -ffn_dim  # largest power of two dividing ffn_dim
    ratio = ffn_dim / _meta_ffn_dim(dim, 1, None)
    for multiplier in (None, round(ratio, 1), round(ratio, 2), round(ratio, 3), ratio, math.nextafter(ratio, math.inf)):
        if (multiplier is None or multiplier > 0) and _meta_ffn_dim(dim, multiple_of, multiplier) == ffn_dim:
            return multiple_of, multiplier
    raise ConversionError(f"ffn_dim={ffn_dim}: no multiple_of / ffn_dim_multiplier reproduces it for dim={dim}")


# ---- reading ---------------------------------------------------------------------------------


def read_meta(src_dir: Path, rope_scaling_factor: float | None = None, hf_rotary: bool = True) -> Source:
    """A lazy Source over a Meta checkpoint directory; `load` merges shards into HF layout.

    `hf_rotary=False` leaves wq/wk rows in Meta's interleaved order (see `read_meta_layout`).

    `rope_scaling_factor`: the LLaMA-3.1-style scaling factor when params.json says
    `use_scaled_rope` (8 for LLaMA-3.1, 32 for LLaMA-3.2); Meta's files do not record it.
    Refused for checkpoints without scaled rope.
    """
    src_dir = Path(src_dir)
    params_path = src_dir / PARAMS_FILE
    params = _read_params(params_path)
    settings = _read_extra(src_dir / EXTRA_FILE)
    paths = _shard_paths(src_dir)
    shards = [load_torch_file(p) for p in paths]

    def pieces(name: str) -> list:
        for path, shard in zip(paths, shards):
            if name not in shard:
                raise ConversionError(f"{path}: missing tensor {name}")
        return [shard[name] for shard in shards]

    def same_shape(name: str, ndim: int) -> tuple[int, ...]:
        """The shape every shard's piece of `name` has."""
        ps = pieces(name)
        first = tuple(ps[0].shape)
        for path, p in zip(paths, ps):
            if tuple(p.shape) != first:
                raise ConversionError(f"{path}: {name} has shape {tuple(p.shape)} but {paths[0].name} has {first}; "
                                      "model-parallel shards must hold equal pieces")
        if len(first) != ndim:
            raise ConversionError(f"{paths[0]}: {name} has shape {first}, expected a {ndim}-D tensor")
        return first

    _check_dim(params, params_path, same_shape(_NORM, 1)[0])
    _check_shard_count(src_dir, len(shards), same_shape(_WQ, 2)[0], params["dim"])
    # LLaMA-1/2 split the embedding along the model dim, LLaMA-3 along the vocabulary.
    emb_shape = same_shape(_EMBED, 2)
    embed_axis = 0 if len(shards) == 1 or emb_shape[1] == params["dim"] else 1
    vocab = emb_shape[0] * (len(shards) if embed_axis == 0 else 1)
    ffn_rows = same_shape("layers.0.feed_forward.w1.weight", 2)[0] * len(shards)
    outputs = [_OUTPUT in shard for shard in shards]
    if any(outputs) and not all(outputs):  # a piece lost, not the absent output layer of a tied model
        raise ConversionError(f"{paths[outputs.index(False)]}: missing tensor {_OUTPUT}")
    tied = _tied(settings, src_dir / EXTRA_FILE) or not any(outputs)
    cfg = _config(params, params_path, settings, vocab, ffn_rows, tied, rope_scaling_factor)
    tensors = _tensors(cfg, embed_axis)

    expected = {t.name for t in tensors.values()}
    ignored = set(_IGNORED) | ({_OUTPUT} if tied else set())  # a tied model's copy of the embedding, for Meta's code
    for path, shard in zip(paths, shards):
        missing = sorted(expected - set(shard))
        if missing:
            raise ConversionError(f"{path}: missing tensor {missing[0]}")
        extra = sorted(set(shard) - expected - ignored)
        if extra:
            raise ConversionError(f"{path}: unexpected tensor {extra[0]}; expected only the {len(expected)} tensors "
                                  f"of a {cfg.n_layers}-layer LLaMA as described by {PARAMS_FILE}")
    where = paths[0] if len(paths) == 1 else src_dir / "consolidated.*.pth"
    for t in tensors.values():
        _, shape = _merge_plan(t, same_shape(t.name, len(t.spec.hf_shape)), len(shards), cfg)
        if shape != t.spec.hf_shape:
            raise ConversionError(f"{where}: {t.name} has merged shape {shape}, "
                                  f"{PARAMS_FILE} implies {t.spec.hf_shape}")

    def load(hf_name: str) -> np.ndarray:
        t = tensors.get(hf_name)
        if t is None:
            raise ConversionError(f"{src_dir}: this model has no tensor {hf_name}")
        ps = pieces(t.name)
        keep, _ = _merge_plan(t, tuple(ps[0].shape), len(ps), cfg)
        replicas = len(ps) // len(keep)
        if t.axis is None:  # not split: every shard holds the whole tensor
            for i, p in enumerate(ps):
                if not _same_tensor(p, ps[0]):
                    raise ConversionError(f"{paths[i]}: {t.name} should be the same in every shard (it is not "
                                          f"split) but differs from {paths[0].name}'s")
        if t.axis is not None and replicas > 1:  # K/V heads copied onto consecutive shards
            for i, p in enumerate(ps):
                first = i - i % replicas
                if not _same_tensor(p, ps[first]):
                    raise ConversionError(f"{paths[i]}: {t.name} should repeat the K/V heads of {paths[first].name} "
                                          f"(n_kv_heads={cfg.n_kv_heads} < {len(ps)} shards) but differs")
        if len(keep) == 1:
            w = tensor_to_numpy(ps[keep[0]])
        else:
            w = np.concatenate([tensor_to_numpy(ps[i]) for i in keep], axis=t.axis)
        return _meta_to_hf_rotary(w, t.rotary_heads) if t.rotary_heads and hf_rotary else w

    if tied and _OUTPUT in shards[0]:  # the embedding's copy `write_meta` writes, unless Meta's code trained it since
        try:
            output = np.concatenate([tensor_to_numpy(shard[_OUTPUT]) for shard in shards], axis=0)
        except (KeyError, ValueError):
            output = None
        if output is None or not same_values(output, load(_EMBED_HF)):
            raise ConversionError(f"{where}: {_OUTPUT} is not the embedding table, which {EXTRA_FILE} records the "
                                  f"model as tied to (tie_embeddings); Meta's code uses {_OUTPUT} as it is: remove "
                                  f"tie_embeddings from {src_dir / EXTRA_FILE} to convert it untied")

    # Every shard's dtypes: shards that differ (one bfloat16, one float32) are a mix, kept exactly as float32.
    found = [{weight_dtype(shard[t.name], path, t.name) for t in tensors.values()}
             for path, shard in zip(paths, shards)]
    dtype = stored_dtype(set().union(*found))
    if dtype not in _DTYPES:
        path = next(p for p, dtypes in zip(paths, found) if dtype in dtypes)
        raise ConversionError(f"{path}: the weights are stored as {dtype}; valid: {', '.join(_DTYPES)}")
    return Source(config=cfg, load=load, dtype=dtype, files_dir=src_dir, close=shards.clear)


def _same_tensor(a, b) -> bool:
    """Whether two torch tensors hold the same values, NaNs in the same places (torch.equal finds a
    tensor holding a NaN unequal even to itself)."""
    return a.equal(b) or same_values(tensor_to_numpy(a), tensor_to_numpy(b))


def read_meta_layout(src_dir: Path, rope_scaling_factor: float | None = None) -> tuple[LLaMAConfig, dict]:
    """Config and every tensor of a Meta checkpoint by Meta name, merged across shards, with wq/wk
    rows left in Meta's interleaved order: the input for checks that run Meta's own layout."""
    source = read_meta(src_dir, rope_scaling_factor, hf_rotary=False)
    try:
        return source.config, {t.name: source.load(hf_name) for hf_name, t in _tensors(source.config, 0).items()}
    finally:
        source.close()


def _merge_plan(t: _MetaTensor, piece_shape: tuple[int, ...], n_shards: int,
                cfg: LLaMAConfig) -> tuple[list[int], tuple[int, ...]]:
    """Which shards' pieces make up the full tensor (in order) and the full tensor's shape."""
    if t.axis is None:
        return [0], piece_shape
    keep = list(range(n_shards))
    kv_rows = cfg.n_kv_heads * cfg.head_dim
    rows = piece_shape[0] * n_shards
    replicated = t.kv and cfg.n_kv_heads < n_shards  # (params.json's heads, else the shapes decide, below)
    if replicated and rows > kv_rows and rows % kv_rows == 0 and n_shards % (rows // kv_rows) == 0:
        keep = keep[:: rows // kv_rows]  # one copy of each K/V head
    shape = list(piece_shape)
    shape[t.axis] *= len(keep)
    return keep, tuple(shape)


def _read_params(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: not found; a Meta checkpoint directory holds {PARAMS_FILE} "
                              "and consolidated.NN.pth shards")
    try:
        params = read_json_object(path, "model parameters")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ConversionError(f"{path}: missing required key {key!r}")
    unknown = sorted(set(params) - set(_PARAMS_KEYS))
    if unknown:  # (another model's setting, e.g. Mistral's sliding_window, or a misspelt one: ignoring it misreads)
        raise ConversionError(f"{path}: unknown key {unknown[0]!r}, which this converter cannot apply; valid: "
                              f"{', '.join(_PARAMS_KEYS)}")
    return params


def _read_extra(path: Path) -> dict:
    """The settings `write_meta` keeps beside params.json ({} when there is no such file)."""
    if not path.exists():
        return {}
    try:
        settings = read_json_object(path, "settings params.json has no key for")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    unknown = sorted(set(settings) - set(_EXTRA_KEYS))
    if unknown:  # (a misspelt one, e.g. max_seq_length written by hand, would leave the guess in place unsaid)
        raise ConversionError(f"{path}: unknown key {unknown[0]!r}; valid: {', '.join(_EXTRA_KEYS)}")
    return settings


def _tied(settings: dict, path: Path) -> bool:
    """Whether `write_meta` recorded the model as tied (it writes the embedding as output.weight too)."""
    try:
        return bool(file_setting(settings, str(path), "tie_embeddings", "flag", False))
    except ValueError as e:
        raise ConversionError(str(e)) from None


def _check_dim(params: dict, path: Path, weights_dim: int) -> None:
    """ConversionError unless params.json's `dim` is the model dim of the weights."""
    try:
        dim = file_setting(params, str(path), "dim", "count")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if dim != weights_dim:
        raise ConversionError(f"{path}: dim={dim}, but the weights have model dim {weights_dim} "
                              f"({_NORM} has {weights_dim} entries); set dim to {weights_dim}")


def _check_shard_count(src_dir: Path, n_shards: int, wq_rows: int, dim: int) -> None:
    """ConversionError unless the shards' pieces of wq (split by rows) make up its dim rows: a shard
    missing or left over from another checkpoint."""
    if wq_rows * n_shards != dim:
        raise ConversionError(f"{src_dir}: {n_shards} consolidated.NN.pth file(s) hold {wq_rows} rows each of {_WQ}, "
                              f"{wq_rows * n_shards} in all, not dim={dim}; give every shard of one checkpoint "
                              f"(and no other)")


def _shard_paths(src_dir: Path) -> list[Path]:
    found = {}
    for path in src_dir.glob("consolidated.*.pth"):
        match = _SHARD_NAME.fullmatch(path.name)
        if match is None:
            raise ConversionError(f"{path}: unexpected shard file name; valid: consolidated.NN.pth")
        number = int(match.group(1))
        if number in found:
            first, second = sorted((found[number].name, path.name))
            raise ConversionError(f"{src_dir}: {first} and {second} are both shard {number}; keep one of them")
        found[number] = path
    if not found:
        raise ConversionError(f"{src_dir}: no consolidated.NN.pth shards found")
    for i in range(len(found)):
        if i not in found:
            raise ConversionError(f"{src_dir}: consolidated.{i:02d}.pth is missing; the {len(found)} shard(s) found "
                                  f"({', '.join(found[n].name for n in sorted(found))}) must be numbered from 00 "
                                  f"without gaps")
    return [found[i] for i in range(len(found))]


def _config(params: dict, path: Path, settings: dict, vocab: int, ffn_rows: int, tied: bool,
            rope_scaling_factor: float | None) -> LLaMAConfig:
    """LLaMAConfig from params.json and `settings` (`EXTRA_FILE`'s), with the embedding / w1
    shapes to fill and check what they omit."""

    def source_of(key: str) -> tuple[dict, Path]:  # params.json's keys first, then those of the file beside it
        return (params, path) if key in params or key not in settings else (settings, path.parent / EXTRA_FILE)

    def setting(key, *args, **kwargs):
        found, where = source_of(key)
        try:
            return file_setting(found, str(where), key, *args, **kwargs)
        except ValueError as e:
            raise ConversionError(str(e)) from None

    multiple_of = setting("multiple_of", "count", 256)  # Meta's ModelArgs default
    multiplier = setting("ffn_dim_multiplier", "number", nullable=True)
    dim = params["dim"]
    ffn_dim = _meta_ffn_dim(dim, multiple_of, multiplier)
    if ffn_dim != ffn_rows:
        raise ConversionError(f"{path}: multiple_of={multiple_of}, ffn_dim_multiplier={multiplier} give an FFN width "
                              f"of {ffn_dim}, but layers.0.feed_forward.w1.weight has {ffn_rows} rows")
    if params.get("vocab_size", -1) not in (-1, None) and setting("vocab_size", "count") != vocab:
        raise ConversionError(f"{path}: vocab_size={params['vocab_size']}, but {_EMBED} has {vocab} rows")

    scaled = setting("use_scaled_rope", "flag", False)
    if rope_scaling_factor is not None and not scaled:
        raise ConversionError(f"--rope-scaling-factor {rope_scaling_factor:g}: {path} does not set use_scaled_rope, so "
                              f"the model has no rope scaling; drop the option")
    if not scaled and ("rope_scaling_factor" in params or "rope_scaling_factor" in settings):
        raise ConversionError(f"{source_of('rope_scaling_factor')[1]}: rope_scaling_factor is set, but {path} does not "
                              f"set use_scaled_rope, so the model has no rope scaling; remove rope_scaling_factor")
    rope_scaling = None
    if scaled:
        factor, given = rope_scaling_factor, "--rope-scaling-factor"
        if factor is None:
            key = "rope_scaling_factor"
            factor = setting(key, "number", _DEFAULT_ROPE_FACTOR)
            given = f"{source_of(key)[1]}: {key}"
        try:
            rope_scaling = RopeScaling("llama3", float(factor), **_META_ROPE)
        except (ValueError, TypeError) as e:
            raise ConversionError(f"{given} {factor!r}: {e}") from None
    norm_eps = setting("norm_eps", "number", 1e-5)
    # no default is safe where the codes differ, but in a directory `write_meta` wrote (its llama_jax.json
    # records max_seq_len), whose earlier releases left a theta of 10000 out also for LLaMA-3's code
    if "rope_theta" not in params and _for_llama3_code(vocab, scaled) and "max_seq_len" not in settings:
        why = "use_scaled_rope" if scaled else f"a vocabulary of {vocab}"
        raise ConversionError(f"{path}: no rope_theta, which a checkpoint for LLaMA-3's code ({why}) must give, "
                              f"since that code reads a missing one as 500000 and LLaMA-1/2's as 10000; add the "
                              f"model's (Meta's LLaMA-3 releases give \"rope_theta\": 500000.0)")
    rope_theta = float(setting("rope_theta", "number", 10000.0))
    if "max_seq_len" in params or "max_seq_len" in settings:
        max_seq_len = setting("max_seq_len", "count")
    elif scaled:  # only LLaMA-3.1+ code has it, whatever the vocabulary; it scales an original context of 8192
        max_seq_len = 131072
    elif vocab >= _VOCAB_SPLIT_FROM:
        max_seq_len = 8192  # LLaMA-3
    elif rope_theta == _CODE_LLAMA_THETA:
        max_seq_len = 16384  # Code Llama: LLaMA-2's vocabulary (32016; 34B: 32000) with theta 1e6
    else:
        max_seq_len = 2048 if norm_eps == 1e-6 else 4096  # LLaMA-1 / LLaMA-2
    n_heads, n_layers = setting("n_heads", "count"), setting("n_layers", "count")
    n_kv_heads = setting("n_kv_heads", "count", nullable=True) or n_heads
    try:
        return LLaMAConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                           ffn_dim=ffn_dim, norm_eps=norm_eps, rope_theta=rope_theta, rope_scaling=rope_scaling,
                           max_seq_len=max_seq_len, tie_embeddings=tied)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None


# ---- writing ---------------------------------------------------------------------------------


def write_meta(dst_dir: Path, config: LLaMAConfig, load: Callable[[str], np.ndarray], n_shards: int = 1) -> int:
    """Write `params.json`, `llama_jax.json` and `n_shards` consolidated.NN.pth files; returns the
    bytes written.

    `load(hf_name)` gives HF-layout arrays in the output dtype. Shards are written one at a time
    (each tensor is loaded once per shard), so only one shard's pieces are held at once.
    Tokenizer files are the caller's business.
    """
    dst_dir = Path(dst_dir)
    params, tensors = check_writable(config, n_shards)

    def read(hf_name: str) -> np.ndarray:  # Meta's code has no tied models: a tied one's output layer is its embedding
        return load(_EMBED_HF if config.tie_embeddings and hf_name == _OUTPUT_HF else hf_name)

    stale = sorted(dst_dir.glob("consolidated.*.pth"))
    if stale:
        raise ConversionError(f"{stale[0]}: already exists; write a Meta checkpoint into a directory without shards")

    dst_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, content in ((PARAMS_FILE, params), (EXTRA_FILE, _extra_json(config))):
        (dst_dir / name).write_text(json.dumps(content, indent=2) + "\n")
        total += (dst_dir / name).stat().st_size
    for shard in range(n_shards):
        state = {}
        for t in tensors.values():
            w = np.asarray(read(t.spec.hf_name))
            if w.shape != t.spec.hf_shape:
                raise ConversionError(f"tensor {t.spec.hf_name} has shape {w.shape}, config expects {t.spec.hf_shape}")
            if t.rotary_heads:
                w = _hf_to_meta_rotary(w, t.rotary_heads)
            state[t.name] = numpy_to_tensor(_shard_piece(t, w, shard, n_shards, config.n_kv_heads))
        path = dst_dir / f"consolidated.{shard:02d}.pth"
        save_torch_file(state, path)
        del state
        total += path.stat().st_size
    return total


def check_writable(config: LLaMAConfig, n_shards: int) -> tuple[dict, dict[str, _MetaTensor]]:
    """ConversionError unless `config` can be written as `n_shards` Meta shards (checked before the
    destination is created); returns its params.json and tensors."""
    params = _params_json(config)
    embed_axis = 0 if _for_llama3_code(config.vocab_size, config.rope_scaling is not None) else 1
    tensors = _tensors(config.replace(tie_embeddings=False), embed_axis)
    problem = _split_problem(config, tensors, n_shards)
    if problem:
        valid = [n for n in range(1, config.n_heads + 1) if _split_problem(config, tensors, n) is None]
        raise ConversionError(f"n_shards={n_shards!r}: {problem}; valid shard counts for this model: "
                              + ", ".join(map(str, valid)))
    return params, tensors


def _shard_piece(t: _MetaTensor, w: np.ndarray, shard: int, n_shards: int, n_kv_heads: int) -> np.ndarray:
    """Shard `shard`'s own copy of its piece of `w` (a copy, so the full tensor can be freed)."""
    if t.axis is None:
        return w.copy()
    if t.kv and n_kv_heads < n_shards:  # each K/V head goes to n_shards / n_kv_heads consecutive shards
        return np.split(w, n_kv_heads, axis=t.axis)[shard * n_kv_heads // n_shards].copy()
    return np.split(w, n_shards, axis=t.axis)[shard].copy()


def _split_problem(cfg: LLaMAConfig, tensors: dict[str, _MetaTensor], n_shards: int) -> str | None:
    """Why the model cannot be cut into `n_shards` model-parallel shards, or None."""
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        return "the shard count must be a positive integer"
    if cfg.n_heads % n_shards:
        return f"n_heads={cfg.n_heads} is not divisible by it (each shard holds whole query heads)"
    if cfg.n_kv_heads % n_shards and n_shards % cfg.n_kv_heads:
        return f"n_kv_heads={cfg.n_kv_heads} neither divides nor is divisible by it"
    for t in tensors.values():
        if t.axis is not None and not t.kv and t.spec.hf_shape[t.axis] % n_shards:
            return f"{t.name} has {t.spec.hf_shape[t.axis]} along dim {t.axis}, not divisible by it"
    return None


def _params_json(cfg: LLaMAConfig) -> dict:
    """Meta's params.json for `cfg`: the keys of Meta's releases, each where Meta writes it."""
    scaling = cfg.rope_scaling
    if scaling is not None and scaling != RopeScaling("llama3", scaling.factor, **_META_ROPE):
        raise ConversionError(f"rope_scaling={scaling.to_dict()} cannot be written to {PARAMS_FILE}; Meta's format "
                              "only has llama3 scaling with low_freq_factor=1, high_freq_factor=4, "
                              "original_max_position_embeddings=8192")
    multiple_of, multiplier = _ffn_params(cfg.dim, cfg.ffn_dim)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads}
    if cfg.n_kv_heads != cfg.n_heads:  # LLaMA-2 70B and later; LLaMA-1's ModelArgs has no such field
        params["n_kv_heads"] = cfg.n_kv_heads
    params.update(vocab_size=cfg.vocab_size, multiple_of=multiple_of)
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["norm_eps"] = cfg.norm_eps
    # LLaMA-1/2's ModelArgs has no such field (their code has 10000 built in); LLaMA-3's defaults it to 500000
    if cfg.rope_theta != 10000.0 or _for_llama3_code(cfg.vocab_size, scaling is not None):
        params["rope_theta"] = cfg.rope_theta
    if scaling is not None:
        params["use_scaled_rope"] = True
    return params


def _for_llama3_code(vocab_size: int, scaled_rope: bool) -> bool:
    """Whether a checkpoint is for LLaMA-3's code (a 128K vocabulary, or use_scaled_rope, which only
    that code reads): its embedding is split along the vocabulary and its rope_theta defaults to 500000."""
    return vocab_size >= _VOCAB_SPLIT_FROM or scaled_rope


def _extra_json(cfg: LLaMAConfig) -> dict:
    """What params.json has no key for (Meta's loaders take max_seq_len as an argument)."""
    extra = {"max_seq_len": cfg.max_seq_len}
    if cfg.rope_scaling is not None:
        extra["rope_scaling_factor"] = cfg.rope_scaling.factor
    if cfg.tie_embeddings:
        extra["tie_embeddings"] = True
    return extra
