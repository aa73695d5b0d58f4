"""Ahead-of-time compiles for TPU (and other) topologies from any host: per-chip memory, FLOPs.

`compile_program(cfg, "train_step", devices, batch_per_chip=2)` lowers and compiles the same
jitted program that `train` (or `encode`, `decode`, `reconstruct`) runs, with its real
shardings, for `devices` (e.g. the compile-only devices of `tpu_devices("v5e:4x4")`, which
libtpu builds on a host without TPUs), traced with the forms of the target platform, and
returns XLA's per-chip memory analysis and cost analysis as a `CompileRecord`. A program that
does not fit the chip's HBM fails fast in the TPU compiler with RESOURCE_EXHAUSTED; its
figures are read from that message. `find_batch` searches the largest per-chip batch that
fits with a stated headroom. The `compile` command (reducio_jax/cli/compile.py) prints these.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from reducio_jax import losses
from reducio_jax.aot.topologies import chip_hbm
from reducio_jax.config import derived, frame_size
from reducio_jax.errors import InputError
from reducio_jax.models import build_vae
from reducio_jax.models.convolution import traced_for
from reducio_jax.models.tiling import TileConfig
from reducio_jax.programs import lowering, serialized
from reducio_jax.programs.budget import parse_size
from reducio_jax.programs.footprint import Footprint
from reducio_jax.sharding import (
    abstract_model,
    abstract_with_shardings,
    batch_sharding,
    make_mesh,
)
from reducio_jax.train import state as state_lib
from reducio_jax.train.loop import step_identity
from reducio_jax.train.step import batch_spec, jit_train_step

PROGRAMS = ("train_step", *lowering.OPS)
_OOM_PATTERN = re.compile(r"([\d.]+)([KMGT]?)\s*\)?\s*exceeds available HBM \(([\d.]+)([KMGT]?)")


@dataclasses.dataclass(frozen=True)
class CompileRecord:
    """Per-chip figures of one compiled program (bytes; FLOPs from XLA's cost analysis)."""

    program: str
    topology: str
    device_kind: str
    num_chips: int
    mesh: dict[str, int]
    batch_per_chip: int
    resolution: tuple[int, int]
    dtype: str
    remat: bool
    fits: bool
    hbm_bytes: int
    argument_bytes: int = 0  # parameters + optimizer state + batch (this chip's shards)
    state_bytes: int = 0  # train state (train_step) or VAE parameters (inference) alone
    temp_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0  # outputs that reuse donated arguments
    total_bytes: int = 0  # arguments + temporaries + outputs - aliased
    flops_per_chip: float = 0.0
    compile_seconds: float = 0.0
    error: str = ""  # the compiler's message when it did not compile
    tile_batch: int | None = None  # tiles of one shape per step (None: all at once / untiled)

    @property
    def flops_per_clip(self) -> float:
        return self.flops_per_chip / max(self.batch_per_chip, 1)

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flops_per_clip": self.flops_per_clip}


def _flops(compiled: Any) -> float:
    """XLA's FLOP count; the GPU compile-only executable has no cost analysis of its own, so its
    optimised module is analysed through the host's client."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost:
        return float(cost.get("flops", 0.0))
    from jax._src.lib import _jax  # no public spelling of XLA's HLO cost analysis in jax 0.10

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return float(cost.get("flops", 0.0))


def _sized(cfg: ml_collections.ConfigDict, mesh: Mesh, batch_per_chip: int):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.data.batch_size = batch_per_chip * mesh.devices.size
    return cfg


def lower_train_step(cfg: ml_collections.ConfigDict, mesh: Mesh):
    """The train command's jitted step (train/step.py) lowered for abstract, sharded inputs
    (with LPIPS unless `cfg.loss.perceptual_weight` is 0, as `train` does), and what the
    program is made of (`train.loop.step_identity`, for `--serialize`)."""
    perceptual = float(cfg.loss.perceptual_weight)
    lpips_graph = lpips_state = lpips = None
    if perceptual > 0:
        with nnx.use_eager_sharding(False):
            make = lambda: state_lib.make_lpips(cfg)  # noqa: E731
            lpips_graph, lpips_state = nnx.split(nnx.eval_shape(make))
        lpips = abstract_with_shardings(lpips_state, mesh, cfg.mesh.rules)
    weights = losses.LossWeights.from_config(cfg.loss, perceptual_weight=perceptual)
    vae_graph, disc_graph = state_lib.graphdefs(cfg)
    nets = state_lib.Networks(vae_graph, disc_graph, lpips_graph, lpips_state)
    step = jit_train_step(cfg, nets, weights, mesh, state_lib.state_shardings(cfg, mesh))
    state = abstract_with_shardings(state_lib.abstract_state(cfg), mesh, cfg.mesh.rules)
    identity = step_identity(cfg, weights, mesh, lpips is not None)
    return step.lower(state, batch_spec(cfg.data, mesh), lpips), identity


def _state_bytes(cfg: ml_collections.ConfigDict, mesh: Mesh, program: str) -> int:
    """One chip's share of what the program holds between steps: the train state (parameters,
    buffers, optimizer moments) for train_step, the VAE's parameters otherwise."""
    if program == "train_step":
        state = abstract_with_shardings(state_lib.abstract_state(cfg), mesh, cfg.mesh.rules)
    else:
        state = abstract_model(lambda: build_vae(cfg.model), mesh, cfg.mesh.rules)[1]
    return sum(_shard_bytes(x) for x in jax.tree.leaves(state))


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape)
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _lower_inference(
    cfg: ml_collections.ConfigDict, mesh: Mesh, program: str, tile_batch: int | None = None
):
    """The API's encode / decode / reconstruct program (programs/lowering.py) for a sharded
    batch; a tiled config's tiles `tile_batch` of a shape at a time (the planner's
    `max_batch`)."""
    graphdef, state = abstract_model(lambda: build_vae(cfg.model), mesh, cfg.mesh.rules)
    frame = frame_size(cfg.data.resolution)
    b, t = int(cfg.data.batch_size), int(cfg.data.num_frames)
    tiles = TileConfig.from_config(cfg)
    if tile_batch is not None:
        tiles = dataclasses.replace(tiles, max_batch=tile_batch)
    shard = batch_sharding(mesh)
    sizes = derived(cfg)
    inputs = lowering.window_inputs(program, sizes, b, frame, frames=t, sharding=shard)
    return lowering.lower(program, graphdef, state, inputs, tiles)


def _oom_figures(message: str) -> tuple[int, int]:
    """(needed, available) bytes from the TPU compiler's RESOURCE_EXHAUSTED message."""
    match = _OOM_PATTERN.search(message)
    if not match:
        return 0, 0
    need, need_unit, have, have_unit = match.groups()
    return parse_size(need + need_unit), parse_size(have + have_unit)


def compile_program(
    cfg: ml_collections.ConfigDict,
    program: str,
    devices: Sequence[jax.Device],
    *,
    batch_per_chip: int = 1,
    topology: str = "",
    headroom: float = 0.0,
    tile_batch: int | None = None,
    serialize: str | None = None,
) -> CompileRecord:
    """Lowers and compiles `program` for `devices` (mesh `cfg.mesh.shape` over them); the
    per-chip figures. `fits`: compiled, and the total is within (1 - headroom) of HBM.
    `serialize`: a file to write the compiled train step to (`programs/serialized.py`)."""
    if serialize and program != "train_step":
        raise InputError(f"--serialize writes the train step, not {program}")
    if program not in PROGRAMS:
        raise InputError(f"program '{program}' is not one of {', '.join(PROGRAMS)}")
    if batch_per_chip < 1:
        raise InputError(f"the per-chip batch must be at least 1, got {batch_per_chip}")
    if tile_batch is not None and (
        tile_batch < 1 or program == "train_step" or not cfg.model.use_tiling
    ):
        raise InputError(
            f"--tile_batch {tile_batch}: give at least 1, for encode, decode or reconstruct "
            "of a config that tiles (model.use_tiling, e.g. configs/reducio_ft4_1024px.py)"
        )
    try:
        mesh = make_mesh(cfg.mesh, devices)
    except ValueError as err:
        raise InputError(f"{err} (the topology has {len(devices)} chips)") from err
    cfg = _sized(cfg, mesh, batch_per_chip)
    device = mesh.devices.flat[0]
    hbm = chip_hbm(device)
    record = functools.partial(
        _record_maker(cfg, program, mesh, topology, batch_per_chip, hbm), tile_batch=tile_batch
    )
    state_bytes = _state_bytes(cfg, mesh, program)
    start = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    try:
        if serialize:  # an XLA:CPU executable serialized for the cache cannot be again
            jax.config.update("jax_enable_compilation_cache", False)
        # the layers' sharding constraints (models/constraints.py) follow the mesh and rules
        with (
            traced_for(device.platform),
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nnx.logical_axis_rules(cfg.mesh.rules),
        ):
            options = identity = None
            if program == "train_step":
                lowered, identity = lower_train_step(cfg, mesh)
                options = state_lib.step_compiler_options(cfg, device.platform) or None
            else:
                lowered = _lower_inference(cfg, mesh, program, tile_batch)
            compiled = lowered.compile(compiler_options=options)
    except Exception as err:  # noqa: BLE001 - XlaRuntimeError; only "does not fit" is expected
        if "Failed to parse" in str(err) or "No such compile option" in str(err):
            first = str(err).strip().splitlines()[0]
            raise InputError(f"train.tpu_compiler_options: {first}") from err
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        need, _ = _oom_figures(str(err))
        first_line = str(err).strip().splitlines()[0][:300]
        return record(
            fits=False,
            temp_bytes=need,
            state_bytes=state_bytes,
            compile_seconds=time.perf_counter() - start,
            error=first_line,
        )
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    seconds = time.perf_counter() - start
    if serialize:
        serialized.write(serialize, compiled, identity, list(mesh.devices.flat))
    memory = Footprint.of(compiled)  # the planner's reading of XLA's memory analysis
    return record(
        fits=memory.total <= (1.0 - headroom) * hbm,
        argument_bytes=memory.argument,
        state_bytes=int(state_bytes),
        temp_bytes=memory.temp,
        output_bytes=memory.output,
        alias_bytes=memory.alias,
        total_bytes=memory.total,
        flops_per_chip=_flops(compiled),
        compile_seconds=seconds,
    )


def _record_maker(
    cfg: ml_collections.ConfigDict,
    program: str,
    mesh: Mesh,
    topology: str,
    batch_per_chip: int,
    hbm: int,
) -> Callable[..., CompileRecord]:
    """A CompileRecord maker with the run's description filled in."""

    def make(**figures: Any) -> CompileRecord:
        return CompileRecord(
            program=program,
            topology=topology,
            device_kind=mesh.devices.flat[0].device_kind,
            num_chips=int(mesh.devices.size),
            mesh={str(k): int(v) for k, v in mesh.shape.items()},
            batch_per_chip=batch_per_chip,
            resolution=frame_size(cfg.data.resolution),
            dtype=str(cfg.model.dtype),
            remat=bool(cfg.model.remat),
            hbm_bytes=hbm,
            **figures,
        )

    return make


def planned_record(
    cfg: ml_collections.ConfigDict,
    program: str,
    devices: Sequence[jax.Device],
    *,
    batch_per_chip: int,
    topology: str,
    temp_bytes: int,
    seconds: float,
) -> CompileRecord:
    """A record from the temporaries of XLA's buffer assignment of a compile stopped there (the
    TPU compiler had accepted them), with the arguments computed from the shardings: the
    parameters (and for train_step the optimizer state) and the batch shard of one chip."""
    mesh = make_mesh(cfg.mesh, devices)
    cfg = _sized(cfg, mesh, batch_per_chip)
    state_bytes = _state_bytes(cfg, mesh, program)
    h, w = frame_size(cfg.data.resolution)
    batch_bytes = batch_per_chip * int(cfg.data.num_frames) * h * w * 3 * 4
    total = state_bytes + batch_bytes + temp_bytes
    hbm = chip_hbm(mesh.devices.flat[0])
    make = _record_maker(cfg, program, mesh, topology, batch_per_chip, hbm)
    return make(
        fits=total <= hbm,
        argument_bytes=state_bytes + batch_bytes,
        state_bytes=state_bytes,
        temp_bytes=temp_bytes,
        total_bytes=total,
        compile_seconds=seconds,
        error="",
    )


def with_limit(record: CompileRecord, limit: int, headroom: float = 0.0) -> CompileRecord:
    """The record judged against `limit` bytes instead of the chip's HBM (e.g. to leave room
    for something else on the chip)."""
    fits = not record.error and record.total_bytes <= (1.0 - headroom) * limit
    return dataclasses.replace(record, fits=fits, hbm_bytes=limit)


def find_batch(
    compile_at: Callable[[int], CompileRecord], *, limit: int = 1024
) -> tuple[int, list[CompileRecord]]:
    """The largest per-chip batch b for which `compile_at(b).fits` (0: not even 1), by doubling
    from 1 and then bisecting; returns it with every record compiled on the way."""
    records: dict[int, CompileRecord] = {}

    def fits(b: int) -> bool:
        if b not in records:
            records[b] = compile_at(b)
        return records[b].fits

    if not fits(1):
        return 0, list(records.values())
    good, bad = 1, 2
    while bad <= limit and fits(bad):
        good, bad = bad, bad * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    if bad not in records and bad <= limit:
        fits(bad)  # the next size, compiled, so the answer shows what did not fit
    return good, [records[b] for b in sorted(records)]
