"""Streaming safetensors: read one tensor at a time, write shards tensor by tensor.

Format: 8-byte little-endian header length, a JSON header mapping each name to dtype, shape and
[begin, end) byte offsets into the data section, then the data. Tensors are read with plain file
reads rather than mmap, so a converted tensor's source bytes do not stay resident.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import numpy as np

from llama_jax.convert.source import ConversionError, numpy_dtype

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_CODES = {v: k for k, v in _DTYPES.items()}
ALIGN = 8


def _entry_problem(entry) -> str | None:
    """What is wrong with one tensor's header entry, if anything."""
    def counts(value, length=None) -> bool:
        return isinstance(value, list) and (length is None or len(value) == length) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)

    if not isinstance(entry, dict):
        return "is not an object"
    if not isinstance(entry.get("dtype"), str):
        return "has no dtype"
    if not counts(entry.get("shape")):
        return "has no shape of non-negative integers"
    if not counts(entry.get("data_offsets"), 2) or entry["data_offsets"][0] > entry["data_offsets"][1]:
        return "has no data_offsets [begin, end]"
    return None


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0] if size >= 8 else size
            if header_len > size - 8:
                raise ConversionError(f"{self.path}: not a safetensors file or truncated (header past end of file)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConversionError(f"{self.path}: corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._data_start = 8 + header_len
        for name, entry in header.items():
            problem = _entry_problem(entry)
            if problem:
                raise ConversionError(f"{self.path}: corrupt safetensors header (tensor {name} {problem})")
            if self._data_start + entry["data_offsets"][1] > size:
                raise ConversionError(f"{self.path}: truncated, tensor {name} ends past the end of the file")
        self._file = open(self.path, "rb")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        code = self.entries[name]["dtype"]
        if code not in _DTYPES:
            raise ConversionError(f"{self.path}: tensor {name} has dtype {code}; supported: {', '.join(_DTYPES)}")
        return _DTYPES[code]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        dtype = numpy_dtype(self.dtype(name))
        begin, end = self.entries[name]["data_offsets"]
        shape = self.shape(name)
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ConversionError(f"{self.path}: tensor {name} byte size does not match shape {shape}")
        out = np.empty(shape, dtype)
        self._file.seek(self._data_start + begin)
        if self._file.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
            raise ConversionError(f"{self.path}: truncated while reading tensor {name}")
        return out

    def close(self) -> None:
        self._file.close()


def write_shards(dst_dir: Path, tensors: Iterable[tuple[str, tuple[int, ...], str]], load,
                 max_shard_bytes: int) -> dict:
    """Write `model-0000k-of-0000n.safetensors` shards plus their index; return the index dict.

    tensors: (name, shape, dtype name) in file order, known up front so headers can be written
    before data; `load(name)` returns the array when its turn comes (one tensor in memory at a time).
    """
    tensors = list(tensors)
    shards: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
    shard_bytes = 0
    for name, shape, dtype in tensors:
        nbytes = int(np.prod(shape)) * numpy_dtype(dtype).itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape, dtype, nbytes))
        shard_bytes += nbytes

    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in shard:
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % ALIGN)
        with open(dst_dir / file_name, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for name, shape, dtype, nbytes in shard:
                a = np.ascontiguousarray(load(name), dtype=numpy_dtype(dtype))
                if a.shape != tuple(shape):
                    raise ValueError(f"tensor {name}: shape {a.shape}, header says {shape}")
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if n > 1:
        (dst_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
