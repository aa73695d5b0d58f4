"""Converted (renamed, transposed) torch arrays placed straight into an abstract model's shards."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reducio_jax.convert.mapping import ConversionError, fill_state
from reducio_jax.sharding import Rules, abstract_model, materialize


def path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def target_shapes(state: nnx.State) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {path_name(p): (tuple(v.shape), np.dtype(v.dtype)) for p, v in nnx.to_flat_state(state)}


def load_converted(
    make: Callable[[], nnx.Module],
    renamed: Mapping[str, np.ndarray],
    *,
    what: str,
    mesh: Mesh | None = None,
    rules: Rules = (),
    source_keys: Mapping[str, str] | None = None,
) -> nnx.Module:
    """A model built by `make`, filled from renamed torch arrays and placed on `mesh` per
    `rules`; fails on any key mismatch."""
    graphdef, abstract = abstract_model(make, mesh, rules)
    filled = fill_state(target_shapes(abstract), renamed, source_keys=source_keys, what=what)
    values = {path: filled[path_name(path)] for path, _ in nnx.to_flat_state(abstract)}
    return nnx.merge(graphdef, materialize(abstract, values))


__all__ = ["ConversionError", "load_converted", "target_shapes"]
