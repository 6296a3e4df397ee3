"""The mesh's axes and the one table that maps logical axis names to them, with the checks of a
mesh's sizes against a device count, a batch and a model: what needs no JAX of
`llama_jax.sharding`, so that a command can refuse a mesh before it imports JAX.

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
"""

from __future__ import annotations

import math

from llama_jax.config import LLaMAConfig, is_int

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


def check_mesh_sizes(data: int, fsdp: int, tensor: int) -> None:
    """ValueError unless each mesh size is a positive integer or -1, and at most one is -1 (what
    holds whatever the device count)."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not is_int(size) or size == 0 or size < -1:  # (a NumPy integer too; not True, which is an int)
            raise ValueError(f"mesh.{name}={size!r}: must be a positive integer or -1 (all remaining devices)")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one of data, fsdp, tensor may be -1, got {', '.join(free)}")


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int) -> tuple[int, int, int]:
    """Mesh sizes with a single -1 replaced by the remaining devices; ValueError if they don't fit."""
    check_mesh_sizes(data, fsdp, tensor)
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    free = [name for name, size in sizes.items() if size == -1]
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
        check_divisible_sizes(model, dict(zip(MESH_AXES, (data, fsdp, tensor))), LOGICAL_AXIS_RULES)


def check_divisible_sizes(config: LLaMAConfig, mesh_sizes: dict[str, int], rules=LOGICAL_AXIS_RULES) -> None:
    """ValueError naming the config field and mesh axis when a dimension that `rules` shard over a
    mesh of `mesh_sizes` (axis -> size) does not divide."""
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
