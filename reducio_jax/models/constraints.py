"""Sharding constraints where the layers use their weights and activations.

Parameters are stored split over the mesh (`fsdp` splits output channels, sharding.py); a layer
uses each weight whole (`gathered`: an all-gather just before use, recomputed under remat, so
only one layer's full weights are alive) and keeps its activations split over the batch axes,
and over `space` along the frames' rows where the mesh has that axis (`video`). Without these,
XLA's partitioner is free to follow the weights' channel split into the activations, which
reshards activations along the channels (the ft4 training step for TPU v5e:2x4 with fsdp=8,
per-chip temporaries from the TPU compiler: 16.41 GiB without these constraints, 8.59 GiB with
them at 1 clip per chip; 28.89 and 14.11 GiB at 2 clips).

The mesh and the rules come from the context the program is traced in
(`jax.sharding.use_abstract_mesh`, `nnx.logical_axis_rules`, set by the training step); outside
a mesh of more than one device every function here returns its input unchanged, so the models
stay free of any placement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec

ACTIVATION_BATCH = "activation_batch"  # logical axis of a batch of clips (or of frames)
ACTIVATION_HEIGHT = "activation_height"  # logical axis of the frames' rows


def _mesh() -> jax.sharding.AbstractMesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def _mesh_axes(logical: str, mesh: jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The mesh axes the context's rules map `logical` to (those the mesh has)."""
    for name, axes in spmd.get_logical_axis_rules():
        if name == logical:
            axes = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
            return tuple(a for a in axes if a is not None and a in mesh.axis_names)
    return ()


def _divides(axes: Sequence[str], size: int, mesh: jax.sharding.AbstractMesh) -> bool:
    return size % math.prod(mesh.shape[a] for a in axes) == 0


def gathered(weight: jax.Array) -> jax.Array:
    """`weight` whole on every device of the mesh, for its use by one layer."""
    if _mesh() is None:
        return weight
    return jax.lax.with_sharding_constraint(weight, PartitionSpec())


def video(x: jax.Array) -> jax.Array:
    """A channels-last activation, (B, T, H, W, C) or (B, H, W, C): B split over the batch
    axes, H over the height axis when it divides, the rest whole on each device. Unchanged
    where the batch does not split evenly (then the compiler's choice stands)."""
    mesh = _mesh()
    if mesh is None or x.ndim not in (4, 5):
        return x
    batch = _mesh_axes(ACTIVATION_BATCH, mesh)
    if not batch or not _divides(batch, x.shape[0], mesh):
        return x
    height = _mesh_axes(ACTIVATION_HEIGHT, mesh)
    height = height if height and _divides(height, x.shape[-3], mesh) else ()
    spec = [None] * x.ndim
    spec[0] = batch
    spec[-3] = height or None
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
