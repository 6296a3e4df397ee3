"""What every checkpoint reader produces: a config and tensors by Hugging Face name, loaded lazily.

Hugging Face names and [out, in] layout with rotate-half rotary rows are the interchange format
between readers and writers, so each foreign format needs one reader and one writer, not one
converter per pair.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from llama_jax.config import LLaMAConfig


class ConversionError(ValueError):
    """A problem with a checkpoint on disk: reported to the user as one line."""


@dataclasses.dataclass
class Source:
    config: LLaMAConfig
    load: Callable[[str], np.ndarray]  # HF-layout array for an HF tensor name, read on demand
    dtype: str  # storage dtype of the source weights ("float32", "bfloat16", "float16")
    files_dir: Path | None = None  # directory holding tokenizer/generation files to carry along
    close: Callable[[], None] = lambda: None


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in ("float32", "float16", "float64"):
        raise ConversionError(f"unsupported dtype {name!r}; valid: float32, bfloat16, float16")
    return np.dtype(name)


def dtype_name(dtype) -> str:
    return "bfloat16" if np.dtype(dtype).name == "bfloat16" else np.dtype(dtype).name


def same_values(a: np.ndarray, b: np.ndarray, block_rows: int = 4096) -> bool:
    """Whether two arrays hold the same shape and values (NaNs in the same places), whatever their
    dtypes; compared `block_rows` rows at a time, so that only a block is widened to float32."""
    if a.shape != b.shape:
        return False
    a, b = np.atleast_1d(a), np.atleast_1d(b)
    return all(np.array_equal(np.asarray(a[i:i + block_rows], np.float32), np.asarray(b[i:i + block_rows], np.float32),
                              equal_nan=True) for i in range(0, len(a), block_rows))


def stored_dtype(dtypes) -> str:
    """The dtype a checkpoint's tensors are stored in, for the converted copy: their one dtype, or for
    a mix float32 (which holds float16 and bfloat16 values exactly; float64 if a tensor is float64)."""
    found = set(dtypes)
    if len(found) == 1:
        return found.pop()
    return "float64" if "float64" in found else "float32"
