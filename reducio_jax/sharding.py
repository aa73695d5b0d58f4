"""Meshes with named axes and the logical-axis rules that place parameters on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | None]]


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes in `shape` order; one -1 takes the rest."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = dict(shape)
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    free = [name for name, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh shape {sizes}: at most one axis may be -1")
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh shape {sizes} does not divide {len(devices)} devices")
        sizes[free[0]] = len(devices) // known
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(
            f"mesh shape {sizes} needs {int(np.prod(list(sizes.values())))} devices, have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(AxisType.Auto,) * len(sizes),
        devices=devices,
    )


def logical_to_spec(
    logical: Sequence[str | None] | None, rules: Rules, mesh: Mesh, shape: Sequence[int]
) -> PartitionSpec:
    """Maps logical axis names to mesh axes; an axis whose size the mesh axis does not divide
    (or a mesh axis already used) stays replicated."""
    if not logical:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape, strict=False):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


def param_sharding_fn(mesh: Mesh, rules: Rules):
    """`sharding_for(path, variable)` for the converter/restore helpers: NamedSharding per rule."""

    def sharding_for(path: tuple, variable: nnx.Variable) -> NamedSharding:
        logical = variable.get_metadata().get("out_sharding")
        return NamedSharding(mesh, logical_to_spec(logical, rules, mesh, variable.shape))

    return sharding_for


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A State of NamedShardings mirroring `state` (abstract or concrete)."""
    sharding_for = param_sharding_fn(mesh, rules)
    flat = [
        (path, variable.replace(sharding_for(path, variable)))
        for path, variable in nnx.to_flat_state(state)
    ]
    return nnx.from_flat_state(flat)


def batch_sharding(mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Leading (batch) axis split over the given mesh axes, the rest replicated."""
    present = tuple(a for a in axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(present))
