"""Abstract model state first, then converted weights placed straight into (sharded) arrays."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from reducio_jax.convert.mapping import ConversionError, fill_state

Shardings = Callable[[tuple, nnx.Variable], jax.sharding.Sharding | None]


def path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(make: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes and dtypes of a model's variables, without allocating them."""
    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(make))


def target_shapes(state: nnx.State) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {path_name(p): (tuple(v.shape), np.dtype(v.dtype)) for p, v in nnx.to_flat_state(state)}


def materialize(
    graphdef: nnx.GraphDef,
    abstract_state: nnx.State,
    values: Mapping[str, np.ndarray],
    sharding_for: Shardings | None = None,
) -> nnx.Module:
    """Builds the module with each variable set from `values`, placed with `sharding_for`."""
    flat = []
    for path, variable in nnx.to_flat_state(abstract_state):
        sharding = sharding_for(path, variable) if sharding_for else None
        array = jax.device_put(values[path_name(path)], sharding)
        flat.append((path, variable.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_converted(
    make: Callable[[], nnx.Module],
    renamed: Mapping[str, np.ndarray],
    *,
    what: str,
    sharding_for: Shardings | None = None,
    source_keys: Mapping[str, str] | None = None,
) -> nnx.Module:
    """A model built by `make`, filled from renamed torch arrays; fails on any key mismatch."""
    graphdef, abstract_state = abstract_model(make)
    filled = fill_state(target_shapes(abstract_state), renamed, source_keys=source_keys, what=what)
    return materialize(graphdef, abstract_state, filled, sharding_for)


__all__ = ["ConversionError", "abstract_model", "load_converted", "materialize", "target_shapes"]
