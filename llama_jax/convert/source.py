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


WIDER = {"float16": "float32 or bfloat16", "bfloat16": "float32"}  # what holds a value beyond their range


def narrowed(name: str, w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`w` as `dtype`; ConversionError when a finite value of it is beyond that dtype's range (float16's
    is 65504: the cast made it inf). Checked through the source's maximum and minimum, cast (a cast
    keeps the order), which allocates nothing the size of the tensor."""
    with np.errstate(over="ignore"):  # (numpy's warning would be a second line of the same)
        out = w.astype(dtype, copy=False)
        if out is w or not out.size or np.isfinite(np.array([w.min(), w.max()], w.dtype).astype(dtype)).all():
            return out
        finite = w[np.isfinite(w)]  # (a NaN or inf in the source, or an overflow: only here is a copy made)
        overflows = finite.size and not np.isfinite(finite.astype(dtype)).all()
    if overflows:
        import ml_dtypes

        wider = WIDER.get(dtype_name(dtype))
        raise ConversionError(f"tensor {name} holds {float(np.abs(finite).max()):.6g}, beyond {dtype_name(dtype)}'s "
                              f"range (at most {float(ml_dtypes.finfo(dtype).max):.6g})"
                              + (f"; convert to {wider} instead" if wider else ""))
    return out


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
