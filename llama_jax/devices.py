"""The accelerators of this host, found without starting a JAX backend, and how to give a child
process a subset of them (sweeps run several trials side by side on one host); and whether an
error is a computation that failed on them."""

from __future__ import annotations

import glob
import os
import re
import sys

XLA_STATUSES = ("UNKNOWN: ", "INTERNAL: ", "UNAVAILABLE: ", "ABORTED: ", "DEADLINE_EXCEEDED: ")

# TPU_CHIPS_PER_PROCESS_BOUNDS for a process holding K chips of one host.
_TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
TPU_CHIPS_PER_PROCESS = tuple(_TPU_CHIP_BOUNDS)  # the ways a TPU host splits into processes


def on_tpu_vm() -> bool:
    """A Cloud TPU VM, told by its TPU device files or the worker list its metadata sets."""
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or _tpu_chip_files())


def _tpu_chip_files() -> list[str]:
    return glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")


def local_accelerators() -> tuple[str, int]:
    """(platform, count) of this host's devices: TPU chips, NVIDIA GPUs, or CPU devices (the
    virtual count XLA_FLAGS asks for, else the number of cores). No JAX backend is started, so a
    child process can still claim the accelerators."""
    if _tpu_chip_files():
        return "tpu", len(_tpu_chip_files())
    gpus = glob.glob("/dev/nvidia[0-9]*")
    if gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "gpu", len([v for v in visible.split(",") if v.strip()]) if visible is not None else len(gpus)
    return "cpu", _virtual_cpu_devices() or os.cpu_count() or 1


def _virtual_cpu_devices() -> int | None:
    """The CPU devices JAX will make as this environment asks (JAX_NUM_CPU_DEVICES, else XLA_FLAGS'
    --xla_force_host_platform_device_count, whose last value counts, as XLA reads it); None where it
    asks for none (JAX's default: one)."""
    number = os.environ.get("JAX_NUM_CPU_DEVICES", "").strip()
    if number.isdigit() and int(number) >= 1:
        return int(number)
    counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(counts[-1]) if counts else None


def devices_per_trial(platform: str, n_devices: int, devices_per_run: int | None) -> int:
    """The devices a trial started on this host (`local_accelerators`: `platform`, `n_devices`)
    sees: `devices_per_run` (`subset_env`) where given; else every accelerator, or on CPU the
    virtual devices the environment asks for (JAX's default: one)."""
    if devices_per_run is not None:
        return devices_per_run
    return n_devices if platform != "cpu" else _virtual_cpu_devices() or 1


def subset_env(platform: str, ids: list[int], slot: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process that sees only devices `ids` of this host.

    `slot` distinguishes processes running at the same time (TPU processes need their own port).
    """
    env = dict(os.environ if env is None else env)
    if platform == "gpu":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        physical = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(max(ids) + 1)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical[i] for i in ids)
    elif platform == "tpu":
        if len(ids) not in _TPU_CHIP_BOUNDS:
            raise ValueError(f"{len(ids)} TPU chips per process is not a layout a TPU host can split into; "
                             f"valid: {', '.join(map(str, _TPU_CHIP_BOUNDS))}")
        env.update(TPU_VISIBLE_CHIPS=",".join(map(str, ids)), TPU_CHIPS_PER_PROCESS_BOUNDS=_TPU_CHIP_BOUNDS[len(ids)],
                   TPU_PROCESS_BOUNDS="1,1,1", TPU_PROCESS_PORT=str(8476 + slot), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    else:
        set_cpu_devices(env, len(ids))
    env["LLAMA_JAX_SINGLE_PROCESS"] = "1"  # a trial on part of one host never joins a multi-host job
    return env


def set_cpu_devices(env, n: int) -> None:
    """Sets the environment `env` (a dict, or os.environ) so that JAX started with it makes `n` CPU
    devices and runs on them."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)  # (it would take precedence over the count above)


def computation_failed(error: BaseException) -> bool:
    """Whether `error` is a computation that failed while running (False before JAX is imported).
    JAX raises most as JaxRuntimeError; a collective that loses a peer process can also come as a
    ValueError carrying XLA's status code."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    return isinstance(error, jax.errors.JaxRuntimeError) or (
        isinstance(error, ValueError) and jax.distributed.is_initialized() and str(error).startswith(XLA_STATUSES))
