"""The executables of one model: compiled once per shape, kept, and measured.

`Programs(model, tiles=..., fallback=...)` runs an op (`programs("reconstruct", video, None,
tiles=...)`) through the executable compiled for its inputs' shapes, dtypes and shardings,
compiling it (`lowering.lower(...).compile()`) the first time; inside a user's `jax.jit` (any
input a tracer) it calls the op's jit instead, so the methods nest. `footprint(...)` is XLA's
memory analysis of the program for a number of windows of a frame size: the planner's only
question (XLA's memory-minded schedule can be measured too, `schedule="memory"`; such a
program is never run, so never kept). A measured program is kept unless `keep=False` (a
probe), and `candidates()` drops the ones the planner measured and did not choose: the
executable the planner measured is the one that runs. `compiles` and `compile_seconds` count
this model's compiles.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from reducio_jax.models import VideoVAE
from reducio_jax.models.tiling import TileConfig
from reducio_jax.programs import allocator, lowering
from reducio_jax.programs.footprint import Footprint
from reducio_jax.sharding import batch_sharding

Key = tuple  # (op, tiles, input tree, ((shape, dtype, placement), ...), state placement)


def _is_tracer(tree: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _placement(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
    """None for one device, the first (what an unsharded program is compiled for)."""
    if sharding is None:
        return None
    devices = sharding.device_set
    if len(devices) == 1 and next(iter(devices)) == jax.devices()[0]:
        return None
    return sharding


def mesh_devices(mesh: Mesh | None) -> int:
    """The devices a program is split over (None: one)."""
    return 1 if mesh is None else mesh.devices.size


def _on_cpu(mesh: Mesh | None) -> bool:
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    return device.platform == "cpu"


def input_key(op: str, tiles: TileConfig | None, inputs: Any, state: Any = None) -> Key:
    """What an executable is specific to: the op, the tiling, each input's shape, dtype and
    placement (arrays and `jax.ShapeDtypeStruct`s of the same inputs give one key), and where
    the model's state is (the placement of its first array)."""
    leaves, tree = jax.tree.flatten(inputs)
    avals = tuple(
        (tuple(x.shape), str(x.dtype), _placement(getattr(x, "sharding", None))) for x in leaves
    )
    first = next(iter(jax.tree.leaves(state)), None)
    return (op, tiles, tree, avals, _placement(getattr(first, "sharding", None)))


class Programs:
    """One model's compiled inference programs (see the module docstring)."""

    def __init__(self, model: VideoVAE, *, tiles: TileConfig | None, fallback: TileConfig):
        self.model = model
        self.tiles = tiles  # the config's tiling (None: never tiled)
        self.fallback = fallback  # the tile size used when memory calls for tiling
        self.spatial_factor = model.sizes.spatial_factor
        self.compiles = 0
        self.compile_seconds = 0.0
        self._executables: dict[Key, jax.stages.Compiled] = {}
        self._footprints: dict[tuple, Footprint] = {}
        self._new: list[Key] | None = None  # compiled inside `candidates()`

    @property
    def resident(self) -> int:
        """Bytes of the model's state (parameters and fixed tables) already held."""
        return sum(x.nbytes for x in jax.tree.leaves(nnx.state(self.model)))

    # -- running ------------------------------------------------------------------------------
    def __call__(self, op: str, *inputs: Any, tiles: TileConfig | None) -> Any:
        graphdef, state = nnx.split(self.model)
        if _is_tracer(inputs) or _is_tracer(state):
            return lowering.JITS[op](graphdef, state, *inputs, tiles=tiles)
        key = input_key(op, tiles, inputs, state)
        executable = self._executables.get(key)
        if executable is None:
            lowered = lowering.lower(op, graphdef, state, inputs, tiles)
            executable = self._compile(lowered, key)
        return executable(state, *inputs)

    def _compile(
        self, lowered: jax.stages.Lowered, kept: Key | None, schedule: str = "default"
    ) -> jax.stages.Compiled:
        """`lowered` compiled in XLA's `schedule`, kept under `kept` (None: a probe)."""
        start = time.perf_counter()
        executable = lowering.compile_lowered(lowered, schedule)
        # What the compile freed goes back to the kernel now: kept in the heap (allocator.py),
        # it would sit beside the run's buffers, not under them (tiny 256 px: 0.5 GiB).
        allocator.release_freed_memory()
        self.compiles += 1
        self.compile_seconds += time.perf_counter() - start
        if kept is not None:
            self._executables[kept] = executable
            if self._new is not None:
                self._new.append(kept)
        return executable

    def executables(self) -> list[Key]:
        """The keys of the executables kept."""
        return list(self._executables)

    # -- measuring ----------------------------------------------------------------------------
    def footprint(
        self,
        op: str,
        batch: int,
        frame: tuple[int, int],
        tiles: TileConfig | None,
        *,
        mesh: Mesh | None = None,
        keep: bool = True,
        schedule: str = "default",
    ) -> Footprint:
        """XLA's memory analysis of `op`'s program for `batch` windows of `frame` (multiples
        of 32) px in `schedule`, compiled once per shape: on one device, or split over the
        devices of `mesh` (the batch a multiple of them; the figures are a device's). The
        model's state must be where the run has it (on the mesh). `keep=False` (and any
        schedule but the default, which is the one that runs): a probe, compiled through a
        jit of its own and dropped (nothing of it stays in memory)."""
        devices = mesh_devices(mesh)
        mesh = mesh if devices > 1 else None
        measured = (op, batch, frame, tiles) + (() if mesh is None else (mesh,))
        measured += () if schedule == "default" else (schedule,)
        if measured in self._footprints:
            return self._footprints[measured]
        graphdef, state = nnx.split(self.model)
        inputs = self.window_inputs(op, batch, frame, mesh)
        keep = keep and schedule == "default"
        key = input_key(op, tiles, inputs, state)
        executable = self._executables.get(key) if schedule == "default" else None
        if executable is None:
            lowered = lowering.lower(op, graphdef, state, inputs, tiles, fresh=not keep)
            executable = self._compile(lowered, key if keep else None, schedule)
        shared = devices if _on_cpu(mesh) else 1  # devices whose buffers share one memory
        footprint = Footprint.of(executable, lowering.input_bytes(inputs) // devices, shared)
        self._footprints[measured] = footprint
        return footprint

    def window_inputs(
        self, op: str, batch: int, frame: tuple[int, int], mesh: Mesh | None = None
    ) -> tuple:
        """The abstract inputs of `op` for `batch` windows of `frame` px on one device, or
        split over the devices of `mesh` as the commands split them (`batch_sharding`)."""
        sharding = None if mesh_devices(mesh) == 1 else batch_sharding(mesh)
        return lowering.window_inputs(op, self.model.sizes, batch, frame, sharding=sharding)

    def measured(self) -> list[tuple]:
        """(op, batch, frame, tiles) of every program measured so far (and the mesh and
        the schedule where they are not the defaults)."""
        return list(self._footprints)

    @contextlib.contextmanager
    def candidates(self) -> Iterator[Callable[[str, int, tuple[int, int], Any], None]]:
        """Executables compiled inside are candidates: at the end only those passed to the
        yielded `keep(op, batch, frame, tiles, mesh=None)` stay."""
        outer, self._new = self._new, []
        kept: set[Key] = set()

        def keep(op: str, batch: int, frame: tuple[int, int], tiles: Any, mesh=None) -> None:
            inputs = self.window_inputs(op, batch, frame, mesh)
            kept.add(input_key(op, tiles, inputs, nnx.state(self.model)))

        try:
            yield keep
        finally:
            new, self._new = self._new, outer
            for key in new:
                if key not in kept:
                    self._executables.pop(key, None)
                elif outer is not None:
                    outer.append(key)
