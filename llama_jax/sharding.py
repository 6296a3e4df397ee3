"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel: replicas of the parameters), `fsdp` (data parallel with
parameters, gradients and optimizer state sharded over it, ZeRO-3 style) and `tensor`
(Megatron-style tensor parallel over heads, FFN width and vocabulary). The batch is split over
data x fsdp. Strategies are mesh shapes, not separate rule sets:
    pure data parallel    data=-1, fsdp=1,  tensor=1
    FSDP                  data=1,  fsdp=-1, tensor=1
    FSDP + tensor         data=1,  fsdp=-1, tensor=T
A rule whose mesh axis has size 1 costs nothing, and a mesh axis already used by an earlier
dimension of the same array is skipped (so activations [batch, length, embed] shard only the
batch, while an `embed` weight dimension shards over fsdp).

Meshes use Auto axes (`jax.sharding.Mesh`), where jit shardings propagate as in classic pjit and
`shard_map` reshards its inputs as needed; Flax's logical partitioning helpers expect them.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.attention import sharded_attention
from llama_jax.config import LLaMAConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)

# Which config field a logical axis measures, for error messages.
_AXIS_FIELDS = {"embed": "dim", "vocab": "vocab_size", "heads": "n_heads", "kv_heads": "n_kv_heads",
                "mlp": "ffn_dim", "head_dim": "head_dim", "layers": "n_layers"}


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Mesh sizes with a single -1 replaced by the remaining devices; ValueError if they don't fit."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:  # (True is an int)
            raise ValueError(f"mesh.{name}={size!r}: must be a positive integer or -1 (all remaining devices)")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one of data, fsdp, tensor may be -1, got {', '.join(free)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh: the device count, {n_devices}, is not divisible by the fixed mesh sizes "
                             f"({' x '.join(f'{k}={v}' for k, v in sizes.items() if v != -1)} = {fixed})")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(f"mesh: data x fsdp x tensor = {data} x {fsdp} x {tensor} = {fixed}, "
                         f"but the device count is {n_devices}; the product must equal it "
                         "(use -1 for one axis to take the rest)")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def check_mesh_and_batch(config, n_devices: int, model: LLaMAConfig | None = None) -> None:
    """ValueError unless an experiment config's mesh fits `n_devices`, each data-parallel shard
    of a micro-batch gets whole rows and, given the `model`, the mesh divides its sharded dimensions."""
    data, fsdp, tensor = resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, n_devices)
    batch, shards = config.train.batch_size, data * fsdp
    micro = batch // config.train.grad_accum
    if micro % shards:
        if batch % shards:
            valid = f"a train.batch_size that is a multiple of {shards}"
        elif batch == shards:
            valid = "train.grad_accum=1"
        else:  # grad_accum g fits where batch / g is a multiple of shards: g divides batch / shards
            valid = f"a train.grad_accum that divides {batch // shards}"
        raise ValueError(f"micro-batch train.batch_size / train.grad_accum = {micro} is not divisible by "
                         f"mesh.data x mesh.fsdp = {shards} (each data-parallel shard needs whole rows); valid: "
                         f"{valid}, or a mesh whose data x fsdp divides {micro}")
    if model is not None:
        _check_divisible_sizes(model, dict(zip(MESH_AXES, (data, fsdp, tensor))), LOGICAL_AXIS_RULES)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all).

    On multi-slice TPU the data axis spans slices (DCN) and fsdp x tensor stay within a slice (ICI).
    A TPU mesh axis is laid along whole axes of the chips' torus where their sizes allow, else
    along part of one (tensor=2 on a 4x4 v5e-16 or a 4x4x4 v5p-128, which have no axis of 2).
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    from jax.experimental import mesh_utils

    if n_slices > 1:
        if shape[0] % n_slices:
            raise ValueError(f"mesh.data={shape[0]} must be a multiple of the {n_slices} TPU slices")
        device_array = mesh_utils.create_hybrid_device_mesh(
            (shape[0] // n_slices, shape[1], shape[2]), (n_slices, 1, 1), devices, allow_split_physical_axes=True)
    elif devices[0].platform == "cpu":
        device_array = np.array(devices).reshape(shape)
    else:
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES)


def logical_sharding(mesh: Mesh, logical_axes: tuple[str | None, ...], rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [batch, ...] inputs: rows split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def process_rows(mesh: Mesh, global_batch: int) -> list[int]:
    """The rows of a [global_batch, ...] batch that this process's devices hold, in order: its
    share where data x fsdp spans the processes, and every row where the processes hold replicas
    of the batch (data x fsdp within each process, e.g. tensor parallelism across processes)."""
    held = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values():
        held.update(range(*index[0].indices(global_batch)))
    return sorted(held)


def tree_shardings(mesh: Mesh, boxed_tree, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a tree of logically partitioned values (e.g. `jax.eval_shape(init)`),
    with the structure of the unboxed tree.

    Optimizer states built by mapping over boxed parameters inherit the boxes; a box whose value
    no longer has one dimension per name (Adafactor's factored moments, step counters) is
    replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(x):
        if not isinstance(x, nn.LogicallyPartitioned):
            return replicated
        if getattr(x.value, "ndim", None) == len(x.names):
            return logical_sharding(mesh, x.names, rules)
        return jax.tree.map(lambda _: replicated, x.value)

    return jax.tree.map(sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def ambient_mesh() -> Mesh | None:
    """The mesh of an enclosing classic `with mesh:` (as `Trainer.context` enters), else None.

    Flax 0.12 looks for a mesh only through `jax.sharding.get_abstract_mesh()`, which a classic
    `with mesh:` leaves empty, so its `nn.with_logical_constraint` is a no-op there; code that
    needs a constraint to hold (the KV cache) passes this mesh explicitly.
    """
    from jax._src import mesh as mesh_lib

    mesh = mesh_lib.thread_resources.env.physical_mesh
    return None if mesh.empty else mesh


def check_mesh(mesh: object) -> None:
    """TypeError unless `mesh` is a jax.sharding.Mesh with the project's axes (data, fsdp, tensor)."""
    if not isinstance(mesh, Mesh) or set(mesh.axis_names) != set(MESH_AXES):
        got = f"a mesh of axes {mesh.axis_names}" if isinstance(mesh, Mesh) else repr(mesh)
        raise TypeError(f"mesh must be a jax.sharding.Mesh of axes {MESH_AXES} (llama_jax.sharding.make_mesh), "
                        f"got {got}")


def check_divisible(config: LLaMAConfig, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> None:
    """ValueError naming the config field and mesh axis when a sharded dimension does not divide;
    TypeError for what is not a mesh of the project's axes (`make_mesh`)."""
    check_mesh(mesh)
    _check_divisible_sizes(config, dict(mesh.shape), rules)


def _check_divisible_sizes(config: LLaMAConfig, mesh_sizes: dict[str, int], rules) -> None:
    rule_map = dict(rules)
    for logical, field in _AXIS_FIELDS.items():
        axes = rule_map.get(logical)
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else axes
        ways = math.prod(mesh_sizes[a] for a in axes)
        size = getattr(config, field)
        if size % ways:
            raise ValueError(f"model.{field}={size} is not divisible by mesh.{'x'.join(axes)}={ways}; "
                             f"choose a mesh whose {'x'.join(axes)} size divides it")


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_AXIS_RULES, per_device_attention: bool = True):
    """The mesh and logical-axis rules that tracing the model needs (activation constraints),
    and, with `per_device_attention`, attention kernels run per device under shard_map.

    The classic `with mesh:` rather than `jax.set_mesh`: under the latter, Flax 0.12's
    DenseGeneral re-applies its kernel's 3-name constraint to the flattened 2-D kernel.
    """
    with warnings.catch_warnings():  # entering a Mesh warns that it is deprecated
        warnings.filterwarnings("ignore", "`with mesh:`", DeprecationWarning)
        mesh.__enter__()
    try:
        with nn.logical_axis_rules(rules):
            if per_device_attention:
                with sharded_attention(mesh):
                    yield
            else:
                yield
    finally:
        mesh.__exit__(None, None, None)
