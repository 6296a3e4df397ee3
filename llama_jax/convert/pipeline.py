"""`convert`: any supported checkpoint format to any other, one tensor at a time.

A reader turns SRC into a `Source` (config + lazily loaded tensors in Hugging Face layout); a
writer streams those tensors into a temporary directory beside DST, which is renamed into place
only when the conversion (and, if asked, its verification) has succeeded.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from llama_jax.config import DTYPES, LLaMAConfig, check_flag, is_int
from llama_jax.convert import FORMATS, hf_dir, meta
from llama_jax.convert.hf import empty_params, hf_tensor, put_tensor, tensor_specs
from llama_jax.convert.source import ConversionError, Source, dtype_name, narrowed, numpy_dtype
from llama_jax.model_dir import (MODEL_DIR, NOT_ITS_OWN, TOKENIZER_FILES, check_tokenizer_files, copy_tokenizer_files,
                                 load_config)
from llama_jax.safe_io import OutputKind, atomic_directory, broken_link, check_destination

OUTPUT_KINDS = {  # what each writer puts in its directory: all that --overwrite may replace
    "hf": OutputKind("Hugging Face model directory",
                     ("config.json", "model*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES)),
    "meta": OutputKind("Meta checkpoint directory",
                       ("params.json", "consolidated.*.pth", meta.EXTRA_FILE, *TOKENIZER_FILES)),
    "jax": MODEL_DIR,
}


def read_jax_dir(src: Path) -> Source:
    from llama_jax.checkpoint import load_model  # JAX and Orbax: only for the jax format

    try:
        config = load_config(src)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    _, params = load_model(src, as_numpy=True, scan_layers=True)
    specs = {spec.hf_name: spec for spec in tensor_specs(config)}
    return Source(config, lambda name: hf_tensor(params, specs[name]), config.param_dtype, src)


def write_jax_dir(dst: Path, config: LLaMAConfig, load: Callable[[str], np.ndarray]) -> int:
    from llama_jax.checkpoint import write_model_dir  # JAX and Orbax: only for the jax format

    params = empty_params(config, numpy_dtype(config.param_dtype))
    for spec in tensor_specs(config):
        put_tensor(params, spec, load(spec.hf_name))
    write_model_dir(dst, config.replace(scan_layers=True), params)
    return sum(a.nbytes for a in _leaves(params))


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def read_checkpoint(fmt: str, src: str | Path, rope_scaling_factor: float | None = None) -> Source:
    src = Path(src)
    if not src.is_dir():
        leads_nowhere = broken_link(src)
        if leads_nowhere and fmt in OUTPUT_KINDS:
            raise ConversionError(f"{leads_nowhere}; give a {OUTPUT_KINDS[fmt].name}")
        raise ConversionError(f"{src}: {'not a directory' if src.exists() else 'no such directory'}")
    if fmt == "hf":
        return hf_dir.read_hf_dir(src)
    if fmt == "meta":
        return meta.read_meta(src, rope_scaling_factor)
    if fmt == "jax":
        return read_jax_dir(src)
    raise ConversionError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


@dataclasses.dataclass
class Summary:
    config: LLaMAConfig
    n_params: int
    dtype: str
    bytes_written: int
    seconds: float
    verify: "object | None" = None

    def line(self, src_fmt: str, dst_fmt: str, dst: Path) -> str:
        c = self.config
        return (f"{src_fmt} -> {dst_fmt}: {c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads, "
                f"ffn {c.ffn_dim}, vocab {c.vocab_size}{', tied' if c.tie_embeddings else ''} | "
                f"{self.n_params:,} params | {self.dtype} | {self.bytes_written / 2**20:,.1f} MiB written | "
                f"{self.seconds:.1f}s -> {dst}")


DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", as transformers' default max_shard_size means it
FORMAT_OPTIONS = {"shards": ("to", "meta", 1), "max_shard_bytes": ("to", "hf", DEFAULT_MAX_SHARD_BYTES),
                  "rope_scaling_factor": ("from", "meta", None)}
# the options of `convert` that apply to one side's format only: (side, format, default)


def inapplicable_option(src_fmt: str, dst_fmt: str, given: dict) -> tuple[str, str, str] | None:
    """(option, side, its format) of the first option in `given` (name: value, None for not given)
    that the conversion `src_fmt` -> `dst_fmt` would ignore (its default value aside), or None."""
    for name, (side, fmt, default) in FORMAT_OPTIONS.items():
        value = given.get(name)
        if value is not None and value != default and (dst_fmt if side == "to" else src_fmt) != fmt:
            return name, side, fmt
    return None


def convert(src_fmt: str, src: str | Path, dst_fmt: str, dst: str | Path, dtype: str | None = None,
            overwrite: bool = False, shards: int | None = None, max_shard_bytes: int | None = None,
            rope_scaling_factor: float | None = None, verify: bool = False, progress: bool = True) -> Summary:
    """Convert SRC (format `src_fmt`) to DST (format `dst_fmt`); see `llama-jax convert --help`.
    `shards` (default 1) applies to meta output only, `max_shard_bytes` (default
    `DEFAULT_MAX_SHARD_BYTES`) to hf output, `rope_scaling_factor` to meta input."""
    from tqdm import tqdm

    if dst_fmt not in FORMATS:
        raise ConversionError(f"unknown output format {dst_fmt!r}; valid: {', '.join(FORMATS)}")
    for name, value in (("overwrite", overwrite), ("verify", verify), ("progress", progress)):
        check_flag(value, name)
    inapplicable = inapplicable_option(src_fmt, dst_fmt, dict(
        shards=shards, max_shard_bytes=max_shard_bytes, rope_scaling_factor=rope_scaling_factor))
    if inapplicable is not None:
        name, side, fmt = inapplicable
        raise ConversionError(f"{name} applies to {'output' if side == 'to' else 'input'} in {fmt} format only")
    shards = FORMAT_OPTIONS["shards"][2] if shards is None else shards
    max_shard_bytes = FORMAT_OPTIONS["max_shard_bytes"][2] if max_shard_bytes is None else max_shard_bytes
    if not (is_int(max_shard_bytes) and max_shard_bytes > 0):
        raise ConversionError(f"max_shard_bytes must be a positive integer (bytes per file), got {max_shard_bytes!r}")
    check_destination(dst, OUTPUT_KINDS[dst_fmt], overwrite, [src])  # before reading the source
    t0 = time.perf_counter()
    source = read_checkpoint(src_fmt, src, rope_scaling_factor)
    try:
        if dtype is None and source.dtype not in DTYPES:
            raise ConversionError(f"{src}: the weights are {source.dtype}; pass --dtype ({', '.join(DTYPES)}) to "
                                  f"convert them")
        dtype = dtype or source.dtype
        out_dtype = numpy_dtype(dtype)
        config = source.config.replace(param_dtype=dtype_name(out_dtype))
        if source.files_dir is not None:  # checked as they will be used, before anything is written
            check_tokenizer_files(source.files_dir, config, NOT_ITS_OWN)
        specs = tensor_specs(config)
        passes = shards if dst_fmt == "meta" else 1  # the Meta writer reads every tensor once per shard
        if dst_fmt == "meta":
            meta.check_writable(config, shards)  # before the destination's temporary directory is made
        with atomic_directory(dst, OUTPUT_KINDS[dst_fmt], overwrite, [src]) as tmp, \
                tqdm(total=len(specs) * passes, unit="tensor", desc=f"{src_fmt} -> {dst_fmt}",
                     disable=None if progress else True, leave=False) as bar:

            def load(name: str) -> np.ndarray:
                bar.update(1)
                return narrowed(name, source.load(name), out_dtype)

            if dst_fmt == "hf":
                token_ids = ({} if source.files_dir is None
                             else hf_dir.special_token_ids(source.files_dir, hf_source=src_fmt == "hf"))
                written = hf_dir.write_hf_dir(tmp, config, load, max_shard_bytes, token_ids)
            elif dst_fmt == "meta":
                written = meta.write_meta(tmp, config, load, shards)
            else:
                written = write_jax_dir(tmp, config, load)
            if source.files_dir is not None:
                copy_tokenizer_files(source.files_dir, tmp)
            if dst_fmt == "hf":
                hf_dir.write_tokenizer_config(tmp)
            report = None
            if verify:
                from llama_jax.convert.verify import verify_conversion

                bar.close()
                lossless = out_dtype in (numpy_dtype(source.dtype), np.dtype(np.float32))
                report = verify_conversion(src_fmt, Path(src), dst_fmt, tmp, lossless, rope_scaling_factor)
                if not report.ok:
                    raise ConversionError(f"verification failed, nothing written: {report.line()}")
    finally:
        source.close()
    n_params = sum(int(np.prod(s.hf_shape)) for s in specs)
    return Summary(config, n_params, dtype_name(out_dtype), written, time.perf_counter() - t0, report)
