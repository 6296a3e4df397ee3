"""Throughput accounting (model FLOPs, MFU, peak FLOP/s and HBM bandwidth per chip) and a metrics writer.

MFU here is model FLOPs utilisation: the FLOPs the model needs per token (matmuls only, no
rematerialisation) times tokens per second, over the chip's dense bf16 peak. On CPU, and on any
chip not in `PEAK_TFLOPS`, the peak is a float32 matmul measured once on the device, so CPU MFU is
relative to that measurement, not to a datasheet number.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LLaMAConfig

# Dense bf16 peak TFLOP/s per chip (datasheets; "H100" is the SXM part).
PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
    "A100": 312.0,
    "H100": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H200 NVL": 835.0,
    "GH200": 989.0,  # its GPU is an H100 SXM's; HBM3 or HBM3e by model, so no bandwidth below
}

# HBM bandwidth per chip, TB/s (datasheets), for the decoding rooflines; a chip missing here is unknown.
HBM_TBPS: dict[str, float] = {
    "TPU v4": 1.2,
    "TPU v5e": 0.82,
    "TPU v5p": 2.77,
    "TPU v6e": 1.64,
    "A100": 2.0,
    "H100": 3.35,
    "H200": 4.8,
    "H200 NVL": 4.8,
}

# Substrings of `device.device_kind` (lower-cased) -> PEAK_TFLOPS key. Order matters: "TPU v5 lite"
# (v5e) also contains "v5", which alone means v5p; "NVIDIA H200 NVL" and "NVIDIA GH200 ..." contain "h200".
_KIND_PATTERNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("v5 lite", "v5e"), "TPU v5e"),
    (("v5p", "v5"), "TPU v5p"),
    (("v6",), "TPU v6e"),
    (("v4",), "TPU v4"),
    (("a100",), "A100"),
    (("h100 pcie",), "H100 PCIe"),
    (("h100 nvl",), "H100 NVL"),
    (("h100",), "H100"),
    (("h200 nvl",), "H200 NVL"),
    (("gh200",), "GH200"),
    (("h200",), "H200"),
)


def flops_per_token(cfg: LLaMAConfig, seq_len: int, causal: bool = True, training: bool = True) -> float:
    """Model FLOPs per token of a sequence of `seq_len` tokens (forward, or forward + backward).

    Counts matmuls only (2 FLOPs per multiply-add): Q/K/V/O projections, the SwiGLU MLP, the output
    layer and the two attention products QK^T and AV. Training is 3x forward (backward computes
    gradients for both operands of every matmul).
    """
    D, L, H, K, Dh, F, V = (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                            cfg.ffn_dim, cfg.vocab_size)
    projections = 2 * D * (H + 2 * K) * Dh + 2 * H * Dh * D + 3 * 2 * D * F
    attention = attention_flops_per_token(seq_len, H, Dh, causal, training=False)
    forward = L * (projections + attention) + 2 * D * V
    return float(3 * forward if training else forward)


def attention_flops_per_token(seq_len: int, n_heads: int, head_dim: int, causal: bool = True,
                              training: bool = True) -> float:
    """FLOPs per token of one layer's attention products QK^T and AV over `seq_len` positions, as
    `flops_per_token` counts them (forward, or forward + backward = 3x forward)."""
    attention = 2 * 2 * seq_len * n_heads * head_dim
    # Convention (as MaxText, unlike Levanter): with a causal mask each query sees on average half
    # the sequence, so QK^T and AV are counted as half of the full S x S products.
    if causal:
        attention /= 2
    return float(3 * attention if training else attention)


def tflops_per_device(tokens_per_second_per_device: float, cfg: LLaMAConfig, seq_len: int) -> float:
    """Achieved model TFLOP/s per device in training (causal attention convention)."""
    return tokens_per_second_per_device * flops_per_token(cfg, seq_len) / 1e12


def mfu(tokens_per_second_per_device: float, cfg: LLaMAConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s per device over `peak_flops` (FLOP/s)."""
    return tflops_per_device(tokens_per_second_per_device, cfg, seq_len) * 1e12 / peak_flops


def _chip(device_kind: str) -> str | None:
    """The PEAK_TFLOPS key of a `device_kind` string such as "TPU v5 lite", or None if unknown."""
    kind = device_kind.lower()
    return next((name for patterns, name in _KIND_PATTERNS if any(p in kind for p in patterns)), None)


def peak_flops_for_kind(device_kind: str) -> float | None:
    """Datasheet peak FLOP/s for a `device_kind` string such as "TPU v5 lite", or None if unknown."""
    chip = _chip(device_kind)
    return None if chip is None else PEAK_TFLOPS[chip] * 1e12


def hbm_bandwidth_for_kind(device_kind: str) -> float | None:
    """Datasheet HBM bandwidth in bytes/s for a `device_kind` string, or None if unknown."""
    chip = _chip(device_kind)
    return None if chip not in HBM_TBPS else HBM_TBPS[chip] * 1e12


def peak_flops_per_device(device: Any = None) -> float:
    """Peak FLOP/s of `device` (default: this process's first device): datasheet, else measured (see
    module doc)."""
    device = device if device is not None else jax.local_devices()[0]
    known = peak_flops_for_kind(device.device_kind)
    return known if known is not None else measured_matmul_flops(device)


@functools.cache
def measured_matmul_flops(device: Any, size: int = 1024, repeats: int = 10) -> float:
    """Best achieved FLOP/s of a jitted float32 [size, size] matmul on `device`; measured once."""
    a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), jnp.float32), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (size, size), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _plain(value: Any) -> Any:
    """A metric value as a JSON-ready Python scalar (jax/numpy scalars are pulled to the host)."""
    if isinstance(value, (str, bool, int, float)):
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric values must be scalars, got an array of shape {array.shape}")
    return array.item()


def _finite_or_none(value: Any) -> Any:
    """`value`, or None (JSON null) when it is a NaN or infinite float."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def nonfinite_as_null(value: Any) -> Any:
    """`value` with every NaN or infinite float in it, through dicts and lists, as None (JSON null:
    `json.dumps` would write NaN, which is not JSON)."""
    if isinstance(value, dict):
        return {k: nonfinite_as_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nonfinite_as_null(v) for v in value]
    return _finite_or_none(value)


def _import_tensorboardx():
    """The tensorboardX module, or None when it is not installed.

    tensorboardX imports torch whenever torch is installed, only to recognise torch tensors
    (about 2 s of every process start on a 2-core machine); scalars do not need it. So unless
    the process has loaded torch already, torch is hidden while tensorboardX is imported and
    importable again afterwards.
    """
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        module = importlib.import_module("tensorboardX")
        # it warns of every NaN scalar it writes; the run's own line says when a step was not finite
        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
        return module
    except ImportError:
        return None
    finally:
        if hide_torch and sys.modules.get("torch", False) is None:
            del sys.modules["torch"]


TENSORBOARD_CLOSE_S = 10.0  # longest a run waits for TensorBoard's writer thread to finish
_WRITERS_MADE = itertools.count(1)  # (numbers each TensorBoard event file a process makes)


class MetricsWriter:
    """Appends one JSON object per step to `<logdir>/metrics.jsonl` and, when tensorboardX is
    installed, the numeric values as TensorBoard scalars in `logdir`. Only process 0 writes.

    The file is strict JSON: `null` marks a non-finite value (NaN or infinity); TensorBoard gets
    the float itself. `first_step`: the step a resumed run logs first; TensorBoard hides what
    earlier event files hold from that step on (steps trained again after the checkpoint).
    """

    def __init__(self, logdir: str | os.PathLike, first_step: int = 1):
        self.active = jax.process_index() == 0
        self._file = None
        self._tb = self._tensorboardx = None
        if not self.active:
            return
        os.makedirs(logdir, exist_ok=True)
        path = os.path.join(logdir, "metrics.jsonl")
        end_cut_line(path)
        self._file = open(path, "a")
        self._tensorboardx = _import_tensorboardx()
        self._tb_settings = dict(logdir=os.fspath(logdir), purge_step=first_step)

    def _tensorboard(self):
        """The TensorBoard writer, made at the first record (a run that logs nothing, such as one
        given again once finished, leaves no empty event file), or None without tensorboardX."""
        if self._tb is None and self._tensorboardx is not None:
            # tensorboardX names the file by the second it is made in: without a suffix of its own, a
            # writer made in the same second (a run resumed at once in one process) writes over the
            # other's events; TensorBoard reads a directory's files in name order, as they were made
            suffix = f".{os.getpid()}.{next(_WRITERS_MADE):06d}"
            self._tb = self._tensorboardx.SummaryWriter(**self._tb_settings, filename_suffix=suffix)
        return self._tb

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Record `metrics` for `step` (one line, flushed at once)."""
        if self._file is None:
            return
        values = {k: _plain(v) for k, v in metrics.items()}
        record = {"step": int(step), **{k: _finite_or_none(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        tb = self._tensorboard()
        if tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tb.add_scalar(key, value, int(step))
            tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            # tensorboardX closes by joining its writer thread, which waits forever on its queue if
            # a Ctrl-C landed inside add_scalar/flush; the event file may then miss its last scalars
            closing = threading.Thread(target=_close_quietly, args=(tb,), daemon=True)
            closing.start()
            closing.join(TENSORBOARD_CLOSE_S)

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_quietly(tb) -> None:
    """Close a tensorboardX writer; a write it cannot finish (a full disk) is left to the run's own
    error line, not printed as a traceback from this thread (metrics.jsonl holds the same values)."""
    try:
        tb.close()
    except OSError:
        pass


def end_cut_line(path: str | os.PathLike) -> None:
    """Mend a last line left without its end by a process killed mid-write (or a full disk), which
    the next record would be glued to: a whole record gets its newline, half a record (of no use to
    any reader) is removed."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            chunk = b""
            while size > len(chunk) and b"\n" not in chunk:  # enough of the end to hold the last line end
                f.seek(max(0, size - len(chunk) - 4096))
                chunk = f.read(size - f.tell())
            cut = chunk[chunk.rfind(b"\n") + 1:]  # after the last line end
            if not cut:
                return
            try:
                json.loads(cut)
                f.write(b"\n")
            except ValueError:
                f.truncate(size - len(cut))
    except FileNotFoundError:
        pass


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (empty if it does not exist, or is a directory). A line cut
    short by a process killed mid-write is skipped; a resumed run logs the steps after its
    checkpoint again, so readers that want one value per step keep the last. A non-finite value
    reads as None, as `MetricsWriter` writes it (earlier releases wrote NaN and Infinity)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:  # a damaged line is skipped, not fatal
            lines = f.read().splitlines()
    except (FileNotFoundError, IsADirectoryError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line, parse_constant=lambda _: None, parse_float=lambda s: _finite_or_none(float(s)))
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def last_per_step(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """[(step, value)] of `key`, the latest record per step, sorted by step; nulls (NaN/Inf) left out."""
    values = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    return sorted(values.items())
