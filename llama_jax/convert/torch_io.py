"""PyTorch `.pth` / `.bin` files, read without executing pickled code.

`torch.load(weights_only=True)` unpickles only tensors, storages and plain containers; a pickle
that references any other global (the classic `os.system` payload) is refused before anything
runs. Files of torch's zip format (the default since 1.6) are memory-mapped, so tensors are read
when touched; those of its legacy format are read whole.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np

from llama_jax.convert.source import ConversionError


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError("reading or writing PyTorch .pth/.bin files needs PyTorch: pip install torch") from None
    return torch


def load_torch_file(path: str | os.PathLike) -> dict:
    """The state dict stored in `path` (tensors memory-mapped), refusing anything but weights."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'file not found'}")
    kind = _format(path)
    if kind is None:
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor its legacy one; "
                              f"truncated or corrupt?)")
    try:  # (the legacy format cannot be memory-mapped: read whole)
        with warnings.catch_warnings():  # (a pickle protocol above 2 is noticed: the error below says what failed)
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        code = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), None)
        if code is not None:
            raise ConversionError(f"{path}: refused to load, the pickle references code, not only weights "
                                  f"({code})") from None
        operand = next((line for line in lines if line.startswith("Unsupported operand")), None)
        if operand is not None:  # an intact file of a newer pickle protocol, or damage
            raise ConversionError(f"{path}: torch's weights-only reader cannot read it ({operand}: saved with "
                                  f"pickle_protocol 4 or 5, or corrupt); load it where you trust it and torch.save "
                                  f"it again with the default protocol") from None
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{lines[0] if lines else 'UnpicklingError'}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError,
            struct.error, AssertionError) as e:  # (what torch's reader raises on damaged bytes)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a dict of tensors (a state dict)")
    return state


_ZIP_START = b"PK\x03\x04"  # torch.save's format since torch 1.6 (torch tells it by these bytes too)
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch's magic number, pickled


def _format(path: Path) -> str | None:
    """"zip" or "legacy": how `path` begins, as torch.save writes it; None: neither."""
    with open(path, "rb") as f:
        start = f.read(2 + 9 + len(_LEGACY_MAGIC))
    if start.startswith(_ZIP_START):
        return "zip"
    # the legacy format: a pickle (PROTO 2 to 5; from 4 on, a FRAME opcode and its length) of the magic number first
    if len(start) < 2 or start[0] != 0x80 or not 2 <= start[1] <= 5:
        return None
    magic = start[11:] if start[1] >= 4 and start[2:3] == b"\x95" else start[2:2 + len(_LEGACY_MAGIC)]
    return "legacy" if magic == _LEGACY_MAGIC else None


WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what a checkpoint's weights may be stored as


def weight_dtype(tensor, path: Path, name: str) -> str:
    """The dtype name of weight `name` of the file `path`; ConversionError unless it is one of
    WEIGHT_DTYPES (integers were converted to floats silently, float8 failed inside torch)."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in WEIGHT_DTYPES:
        raise ConversionError(f"{path}: tensor {name} has dtype {dtype}; supported: {', '.join(WEIGHT_DTYPES)}")
    return dtype


def tensor_to_numpy(t) -> np.ndarray:
    """A CPU copy of a torch tensor as numpy; bfloat16 keeps its bits (via ml_dtypes)."""
    torch = _torch()
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def numpy_to_tensor(a: np.ndarray):
    torch = _torch()
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def save_torch_file(state: dict, path: str | os.PathLike) -> None:
    """`torch.save` to `path`. What stopped the write raises as itself: torch reports a failed
    write (a full disk) or a signal arriving mid-write (the `Terminated` a SIGTERM raises,
    `KeyboardInterrupt`) only as an internal RuntimeError ("unexpected pos ...") of its own."""
    with open(path, "wb") as f:
        try:
            _torch().save(state, f)
        except RuntimeError as e:
            _raise_signal_inside(e)
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def _raise_signal_inside(error: BaseException) -> None:
    """Raise what a signal handler raised inside torch (`KeyboardInterrupt`, the `Terminated` of a
    SIGTERM), which torch reports only as the error of its own that `error` is."""
    cause = error.__context__
    if isinstance(cause, BaseException) and not isinstance(cause, Exception):
        raise cause from None
