"""`llama-jax plan`: compile the train step ahead of time and report what one device will hold.

Nothing is allocated: the state and batch are abstract arrays carrying their shardings, and the
step is lowered and compiled for the mesh the config asks for (virtual CPU devices will do), so
a config that will not fit is caught before paying for accelerators. The step is compiled as one
program, as GPU and TPU run it; a run on CPU splits it into two (`Trainer.step`), so on CPU
devices the figures describe the accelerator's program rather than the CPU run's.
"""

from __future__ import annotations

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax import metrics as metrics_lib
from llama_jax.attention import resolve, runnable_here
from llama_jax.sharding import batch_sharding
from llama_jax.train import BATCH_KEYS, build_trainer


def _per_device_bytes(abstract_tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def runnable_config(config):
    """`config`, or a copy with the attention kernel `auto` picks here where its own cannot run on
    this backend (`cudnn` without a GPU): the train step that is planned."""
    runnable = runnable_here(config.model.attention_impl)
    if runnable == config.model.attention_impl:
        return config
    config = copy.deepcopy(config)
    config.model.attention_impl = runnable
    return config


def check_new_run(config) -> None:
    """ValueError for what `llama-jax train` refuses in a new run of `config` beyond
    `experiment.check_experiment`, with the checks train runs, short of opening the data (plan
    compiles the step, and the data may be only where the run will run): the entries of a prepared
    `data.mixture`."""
    from llama_jax.run_data import prepared_dirs

    if config.data.source == "prepared":
        prepared_dirs(config.data)


def plan(config, devices=None) -> dict:
    """What one device holds for the config's train step; an attention kernel that cannot run on
    this backend (`cudnn` without a GPU) is planned with the one `auto` picks here, and said so."""
    asked = config.model.attention_impl
    config = runnable_config(config)
    standing_in = config.model.attention_impl != asked
    trainer = build_trainer(config, devices)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         nn.meta.unbox(trainer.abstract_state), trainer.state_shardings)
    B, S = config.train.batch_size, config.train.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, S), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=batch_sharding(trainer.mesh))
             for k in BATCH_KEYS}
    with trainer.context():
        compiled = trainer.jit_train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    cfg = trainer.model_config
    device = trainer.mesh.devices.flat[0]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # a backend without memory statistics (CPU)
        limit = None
    return {
        "mesh": dict(trainer.mesh.shape),
        "devices": trainer.mesh.size,
        "platform": device.platform,
        "device_memory": limit,
        "attention": resolve(cfg.attention_impl),
        "dtype": cfg.dtype,  # the compute dtype; the CPU program keeps bfloat16 and float16 activations as float32
        "attention_stands_in": standing_in,  # for an explicit cudnn on a backend without a GPU
        "attention_configured": asked if standing_in else cfg.attention_impl,  # what runs it on the target
        "params": _per_device_bytes(state.params),
        "opt_state": _per_device_bytes(state.opt_state),
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "flops_per_step": metrics_lib.flops_per_token(cfg, S) * B * S,
        "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        "tokens_per_step": B * S,
    }


def _size(n: int) -> str:
    """Bytes in GiB, or in MiB below one GiB (a small model's state would read as 0.000 GiB)."""
    return f"{n / 2**30:10.3f} GiB" if n >= 2**30 else f"{n / 2**20:10.3f} MiB"


def estimated_peak(p: dict) -> int:
    """Bytes one device holds at the step's peak: what it is given and returns (less what it donates)
    and its temporaries."""
    return p["arguments"] + p["outputs"] - p["aliased"] + p["temporaries"]


def does_not_fit(p: dict) -> bool:
    """Whether the device, where its backend reports its memory, holds less than the estimated peak."""
    return bool(p["device_memory"]) and estimated_peak(p) > p["device_memory"]


def format_plan(p: dict) -> str:
    peak = estimated_peak(p)
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    return "\n".join([
        f"mesh {mesh} ({p['devices']} {p['platform']} devices); {p['param_count']:,} parameters; "
        f"{p['tokens_per_step']:,} tokens per step",
        "per device:",
        f"  parameters        {_size(p['params'])}",
        f"  optimizer state   {_size(p['opt_state'])}",
        f"  activations/temp  {_size(p['temporaries'])}  (compiled temporaries)",
        f"  step arguments    {_size(p['arguments'])}  (state + batch)",
        f"  estimated peak    {_size(peak)}  (arguments + outputs - donated + temporaries)",
        f"model FLOPs per step {p['flops_per_step']:.3e} ({p['flops_per_step'] / p['devices']:.3e} per device; "
        "training = 3x forward, causal attention counted as half)",
        _verdict(p, peak),
    ])


def _verdict(p: dict, peak: int) -> str:
    """Whether the step fits the device's memory, where the backend says how much it has; on CPU,
    what the figures stand for."""
    if p["device_memory"]:
        fits = "does NOT fit" if does_not_fit(p) else "fits"
        return f"{fits}: estimated peak {_size(peak).strip()} of the {_size(p['device_memory']).strip()} a device holds"
    if p["platform"] == "cpu":
        configured, here = p.get("attention_configured"), f"compiled for CPU devices, attention `{p['attention']}`"
        keeps_none = "no [seq, seq] attention probabilities for the backward"
        if configured in ("xla", "dot_product"):
            theirs = ("a TPU's or GPU's too" if p["dtype"] == "float32" else
                      f"an upper bound of a TPU's or GPU's, which keep a {p['dtype']} model's activations in "
                      f"{p['dtype']}, not in float32 as the CPU program does")
            return (f"{here}, the config's kernel on every backend: these temporaries are {theirs} "
                    f"(model.attention_impl=auto runs splash on TPU and cudnn on GPU, which keep {keeps_none})")
        if configured == "splash":
            return (f"{here}, the TPU kernel run by Pallas' interpreter: a TPU's temporaries differ; run plan on the "
                    f"target for its figures and whether they fit")
        standing_in = f" (in place of {configured}, which needs a GPU)" if p.get("attention_stands_in") else ""
        target = ("on TPU `auto` is splash, on GPU cudnn, which keep" if configured == "auto"
                  else f"on a GPU `{configured}` runs, which keeps")
        return (f"{here}{standing_in}: {target} {keeps_none} as `{p['attention']}` does here, so the temporaries "
                "differ there; run plan on the target for its figures and whether they fit")
    return "the device does not report its memory: compare the estimated peak with its capacity"
