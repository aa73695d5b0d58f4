"""One device mesh with named axes and the logical-axis rules that place arrays on it.

Parameters carry logical axis names (`nnx.with_partitioning`, metadata key `out_sharding`):
`conv_in`, `conv_out`, `embed`, `heads`, `norm`. `cfg.mesh.rules` maps each to a mesh axis
or None (replicated), like maxtext's `logical_to_mesh`. A dimension that the mesh axis does
not divide stays replicated (e.g. the 3 output channels of the last conv on fsdp=2), and a
mesh axis is used at most once per array. Optimizer moments inherit the metadata of their
parameter, so they are sharded the same way. Everything without axis metadata (BatchNorm
statistics, buffers, step, rng) is replicated. Batches are split over ("data", "fsdp").

`abstract_model` is the one way a model is built without allocating it, with these
shardings attached: the target that checkpoints are restored into and converted weights fill.
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
SPACE_AXIS = "space"  # optional mesh axis that splits the frames' rows (H) of activations
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


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with every entry the array cannot take replaced by None (replicated): a name that
    is not a mesh axis, a mesh axis already used by an earlier dimension, or one whose size
    does not divide the dimension."""
    used: set[str] = set()
    fitted: list[str | None] = []
    for axis, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape, strict=True):
        ok = isinstance(axis, str) and axis in mesh.shape and axis not in used
        ok = ok and size % mesh.shape[axis] == 0
        fitted.append(axis if ok else None)
        used.update([axis] if ok else [])
    return PartitionSpec(*fitted)


def partition_specs(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """`nnx.get_partition_spec` of any pytree (nnx.Variables, arrays or ShapeDtypeStructs) with
    the logical axes mapped by `rules`, each spec fitted to its array and `mesh` (`fit_spec`)."""
    with nnx.logical_axis_rules(tuple(tuple(rule) for rule in rules)):
        specs = nnx.get_partition_spec(tree)
    return jax.tree.map(lambda x, spec: fit_spec(spec, x.shape, mesh), tree, specs)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """The NamedSharding of every array of `tree` (same structure, Variables kept)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, mesh, rules))


def abstract_with_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Abstract pytree (ShapeDtypeStruct leaves, possibly inside nnx.Variables) with each leaf's
    NamedSharding attached: the restore target of a checkpoint."""
    return jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        tree,
        partition_specs(tree, mesh, rules),
    )


def single_device_mesh() -> Mesh:
    """The default placement: a 1-device mesh on the first device."""
    return make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])


def abstract_model(
    make: Callable[[], nnx.Module], mesh: Mesh | None = None, rules: Rules = ()
) -> tuple[nnx.GraphDef, nnx.State]:
    """The module `make()` builds, nothing allocated: its graph definition and its state as
    ShapeDtypeStructs carrying the shardings `rules` give on `mesh` (default: one device).

    Like `nnx.get_abstract_model`, except that an axis the array cannot take (not in the mesh,
    repeated, not dividing the dimension) leaves that dimension replicated."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(make))
    return graphdef, abstract_with_shardings(state, mesh or single_device_mesh(), rules)


def materialize(abstract: nnx.State, values: Mapping[tuple, Any]) -> nnx.State:
    """The state with each variable set from `values` (keyed by state path), placed with the
    sharding of its ShapeDtypeStruct in `abstract` (from `abstract_model`)."""
    flat = [
        (path, var.replace(jax.device_put(values[path], var.get_value().sharding)))
        for path, var in nnx.to_flat_state(abstract)
    ]
    return nnx.from_flat_state(flat)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, extra_dims: int = 0) -> NamedSharding:
    """Batch on dim `extra_dims` split over the mesh's batch axes (data, fsdp); the
    `extra_dims` leading dims and all trailing dims unsplit."""
    return NamedSharding(mesh, PartitionSpec(*([None] * extra_dims), batch_axes(mesh)))


def video_sharding(mesh: Mesh, extra_dims: int = 0) -> NamedSharding:
    """A (..., B, T, H, W, C) video batch: B over the batch axes and, when the mesh has a
    `space` axis, H over it. The compiler carries the row split through the network (halo
    exchanges for convolutions, all-reduced norm statistics), so a chip holds 1/space of each
    clip's activations: how a clip too big for one chip's memory trains (docs/training.md)."""
    space = SPACE_AXIS if SPACE_AXIS in mesh.axis_names else None
    return NamedSharding(mesh, PartitionSpec(*([None] * extra_dims), batch_axes(mesh), None, space))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
