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
the executables this model made (compiled, or loaded), `loaded` those of them that came from
the program store.

With the persistent compilation cache on, every executable compiled here is also kept on disk
under a key made without tracing (`store.py`): a later process loads it (or, for a program it
only measures, reads its memory analysis) instead of tracing and lowering it again.
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
from reducio_jax.programs import allocator, lowering, store
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


def _devices_of(sharding: jax.sharding.Sharding) -> list[jax.Device]:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return list(sharding.mesh.devices.flat)
    return sorted(sharding.device_set, key=lambda d: d.id)


def key_devices(key: Key) -> list[jax.Device]:
    """The devices of the program under `key`: those of its first placed input or state, else
    the first device (where an unplaced program runs)."""
    placements = [p for (_, _, p) in key[3]] + [key[4]]
    placed = next((p for p in placements if p is not None), None)
    return [jax.devices()[0]] if placed is None else _devices_of(placed)


def _describe_placement(sharding: jax.sharding.Sharding | None) -> str:
    if sharding is None:
        return "first device"
    return f"{store.describe(sharding)} on {[d.id for d in _devices_of(sharding)]}"


class Programs:
    """One model's compiled inference programs (see the module docstring)."""

    def __init__(self, model: VideoVAE, *, tiles: TileConfig | None, fallback: TileConfig):
        self.model = model
        self.tiles = tiles  # the config's tiling (None: never tiled)
        self.fallback = fallback  # the tile size used when memory calls for tiling
        self.spatial_factor = model.sizes.spatial_factor
        self.compiles = 0
        self.compile_seconds = 0.0
        self.loaded = 0  # executables of `compiles` loaded from the program store
        self._executables: dict[Key, jax.stages.Compiled] = {}
        self._footprints: dict[tuple, Footprint] = {}
        self._new: list[Key] | None = None  # compiled inside `candidates()`
        self._graph_text: tuple[nnx.GraphDef, str] | None = None  # the last graph described
        self._from_store: set[Key] = set()  # loaded from the store, not called yet

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
            executable = self._make(op, graphdef, state, inputs, tiles, key, kept=True)
        if key not in self._from_store:
            return executable(state, *inputs)
        self._from_store.discard(key)  # its first call here: waited for, errors seen here
        try:
            return jax.block_until_ready(executable(state, *inputs))
        except jax.errors.JaxRuntimeError as err:
            if "not found" not in str(err):
                raise
        # An incomplete stored executable (store.py): forget it, make the program here.
        programs, name = self._store_entry(graphdef, state, key)
        if programs is not None:
            programs.drop(name)
        executable = self._make(op, graphdef, state, inputs, tiles, key, kept=True, load=False)
        return executable(state, *inputs)

    def _make(
        self,
        op: str,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        inputs: tuple,
        tiles: TileConfig | None,
        key: Key,
        *,
        kept: bool,
        schedule: str = "default",
        load: bool = True,
    ) -> jax.stages.Compiled:
        """The executable under `key`: loaded from the program store (unless `load` is
        False), or lowered, compiled in XLA's `schedule` and stored; kept in memory if `kept`
        (else a probe)."""
        start = time.perf_counter()
        programs, name = self._store_entry(graphdef, state, key, schedule)
        executable = None
        if programs is not None and load:
            executable = programs.load(name, key_devices(key))
        if executable is None:
            lowered = lowering.lower(op, graphdef, state, inputs, tiles, fresh=not kept)
            executable = lowering.compile_lowered(lowered, schedule)
            # What the compile freed goes back to the kernel now: kept in the heap
            # (allocator.py), it would sit beside the run's buffers, not under them (tiny
            # 256 px: 0.5 GiB).
            allocator.release_freed_memory()
            if programs is not None:
                programs.put(name, executable)
        else:
            self.loaded += 1
            self._from_store.add(key)
        self.compiles += 1
        self.compile_seconds += time.perf_counter() - start
        if kept:
            self._executables[key] = executable
            if self._new is not None:
                self._new.append(key)
        return executable

    def _store_entry(
        self, graphdef: nnx.GraphDef, state: nnx.State, key: Key, schedule: str = "default"
    ) -> tuple[store.Store | None, str]:
        """The program store (None: off, or a schedule other than the default) and the name
        of the program under `key` in it."""
        programs = store.Store.current() if schedule == "default" else None
        if programs is None:
            return None, ""
        if self._graph_text is None or self._graph_text[0] != graphdef:
            self._graph_text = (graphdef, store.describe((graphdef.nodes, graphdef.attributes)))
        op, tiles, tree, avals, state_placement = key
        leaves = [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(state)]
        identity = store.describe({
            "op": op,
            "tiles": tiles,
            "inputs": (tree, [(s, d, _describe_placement(p)) for s, d, p in avals]),
            "state": (leaves, _describe_placement(state_placement)),
        }) + "\n" + self._graph_text[1]  # fmt: skip
        return programs, store.key(identity, key_devices(key))

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
        shared = devices if _on_cpu(mesh) else 1  # devices whose buffers share one memory
        per_device = lowering.input_bytes(inputs) // devices
        executable = self._executables.get(key) if schedule == "default" else None
        if executable is None and not keep:  # a probe: the stored figures, if any, suffice
            programs, name = self._store_entry(graphdef, state, key, schedule)
            entry = None if programs is None else programs.get(name)
            if entry is not None:
                footprint = Footprint.from_memory(entry.memory, per_device, shared)
                self._footprints[measured] = footprint
                return footprint
        if executable is None:
            executable = self._make(op, graphdef, state, inputs, tiles, key, kept=keep,
                                    schedule=schedule)  # fmt: skip
        footprint = Footprint.of(executable, per_device, shared)
        self._footprints[measured] = footprint
        return footprint

    def window_inputs(
        self, op: str, batch: int, frame: tuple[int, int], mesh: Mesh | None = None
    ) -> tuple:
        """The abstract inputs of `op` for `batch` windows of `frame` px on one device, or
        split over the devices of `mesh` as the commands split them (`batch_sharding`)."""
        sharding = None if mesh_devices(mesh) == 1 else batch_sharding(mesh)
        return lowering.window_inputs(op, self.model.sizes, batch, frame, sharding=sharding)

    def stored_name(
        self, op: str, batch: int, frame: tuple[int, int], tiles: Any, mesh: Mesh | None = None
    ) -> str | None:
        """The name of `op`'s program for `batch` windows of `frame` in the program store (None
        when the store is off): what a later process looks it up by."""
        graphdef, state = nnx.split(self.model)
        inputs = self.window_inputs(op, batch, frame, mesh)
        programs, name = self._store_entry(graphdef, state, input_key(op, tiles, inputs, state))
        return None if programs is None else name

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
