"""One device mesh with named axes and the logical-axis rules that place arrays on it.

Parameters carry logical axis names (`nnx.with_partitioning`, metadata key `out_sharding`):
`conv_in`, `conv_out`, `embed`, `heads`, `norm`. `cfg.mesh.rules` maps each to a mesh axis
or None (replicated), like maxtext's `logical_to_mesh`. A dimension that the mesh axis does
not divide stays replicated (e.g. the 3 output channels of the last conv on fsdp=2), and a
mesh axis is used at most once per array. Optimizer moments inherit the metadata of their
parameter, so they are sharded the same way. Everything without axis metadata (BatchNorm
statistics, buffers, step, rng) is replicated. Batches are split over ("data", "fsdp").

Used by the API (`ReducioVAE.from_pretrained(mesh=...)`), the latent store and training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, str | None]]


def mesh_shape(shape_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one -1 entry to the remaining devices; checks the product."""
    shape = {str(k): int(v) for k, v in dict(shape_cfg).items()}
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh shape {shape} has more than one -1 entry")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if fixed <= 0 or num_devices % fixed:
            raise ValueError(f"mesh shape {shape} does not fit {num_devices} devices")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(shape.values())} devices, have {num_devices}"
        )
    return shape


def make_mesh(spec: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all global devices) with auto axis types.

    `spec` is a config's `mesh` block (its `shape` is used) or a `{axis: size}` mapping in
    axis order; one size may be -1 (the remaining devices). Missing batch axes (data, fsdp)
    are added with size 1, so every mesh has them.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape_cfg = spec["shape"] if "shape" in spec else spec
    shape = mesh_shape(shape_cfg, len(devices))
    for axis in BATCH_AXES:
        shape.setdefault(axis, 1)
    names = tuple(shape)
    return jax.make_mesh(
        tuple(shape.values()), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )


def logical_to_spec(
    logical: Sequence[str | None] | None, shape: Sequence[int], rules: Rules, mesh: Mesh
) -> PartitionSpec:
    """Logical axis names of one array -> its PartitionSpec under `rules`."""
    if not logical:
        return PartitionSpec()
    table = {name: axis for name, axis in rules}
    used: set[str] = set()
    spec: list[str | None] = []
    for name, size in zip(logical, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in mesh.rules {dict(table)}")
        axis = table[name]
        ok = (
            axis is not None
            and axis in mesh.shape
            and axis not in used
            and size % mesh.shape[axis] == 0
        )
        spec.append(axis if ok else None)
        used.update([axis] if ok else [])
    return PartitionSpec(*spec)


def variable_sharding(variable: Any, mesh: Mesh, rules: Rules) -> NamedSharding:
    """The NamedSharding of one (abstract) nnx.Variable or array."""
    if isinstance(variable, nnx.Variable):
        meta = variable.get_metadata()
        logical = meta.get("out_sharding") or meta.get("sharding")
        return NamedSharding(mesh, logical_to_spec(logical, variable.shape, rules, mesh))
    return NamedSharding(mesh, PartitionSpec())


def is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A prefix tree of NamedShardings for any pytree holding nnx.Variables and arrays."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), tree, is_leaf=is_variable)


def sharding_fn(mesh: Mesh, rules: Rules) -> Callable[[tuple, nnx.Variable], NamedSharding]:
    """`sharding_for(path, variable)` as the converters and loaders take it."""
    return lambda path, variable: variable_sharding(variable, mesh, rules)


def abstract_with_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Abstract pytree (ShapeDtypeStruct leaves, possibly inside nnx.Variables) with each leaf's
    NamedSharding attached: the restore target of a checkpoint."""

    def attach(v: Any) -> Any:
        sharding = variable_sharding(v, mesh, rules)
        if isinstance(v, nnx.Variable):
            return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)

    return jax.tree.map(attach, tree, is_leaf=is_variable)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, extra_dims: int = 0) -> NamedSharding:
    """Batch on dim `extra_dims` split over the mesh's batch axes (data, fsdp); the
    `extra_dims` leading dims and all trailing dims unsplit."""
    return NamedSharding(mesh, PartitionSpec(*([None] * extra_dims), batch_axes(mesh)))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
