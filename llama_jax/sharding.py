"""Device meshes and the shardings of the project's logical axes over them.

The axes, the logical-axis table and the checks of a mesh's sizes, which need no JAX, are in
`llama_jax.mesh_axes`.

Meshes use Auto axes (`jax.sharding.Mesh`), where jit shardings propagate as in classic pjit and
`shard_map` reshards its inputs as needed; Flax's logical partitioning helpers expect them.
"""

from __future__ import annotations

import contextlib
import warnings

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.attention import sharded_attention
from llama_jax.config import LLaMAConfig
from llama_jax.mesh_axes import BATCH_AXES, LOGICAL_AXIS_RULES, MESH_AXES, check_divisible_sizes, resolve_mesh_shape


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
    check_divisible_sizes(config, dict(mesh.shape), rules)


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
        with nn.logical_axis_rules(rules), sharded_attention(mesh if per_device_attention else None):
            yield
    finally:
        mesh.__exit__(None, None, None)
