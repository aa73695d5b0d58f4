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
import importlib.util
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from reducio_jax import api, losses
from reducio_jax.config import derived
from reducio_jax.data.config import frame_size
from reducio_jax.errors import InputError
from reducio_jax.models import build_vae
from reducio_jax.models.convolution import traced_for
from reducio_jax.models.tiling import TileConfig
from reducio_jax.sharding import (
    abstract_model,
    abstract_with_shardings,
    batch_sharding,
    make_mesh,
)
from reducio_jax.train import state as state_lib
from reducio_jax.train.step import batch_spec, jit_train_step

GIB = 1 << 30
PROGRAMS = ("train_step", "encode", "decode", "reconstruct")
# HBM per chip, by `device_kind`, from the chips' spec pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e "system architecture"; nvidia.com H100/H200 datasheets). The TPU compiler
# itself checks against slightly less (v5e: 15.75 GiB available of 16), so "fits" here means
# the compile succeeded and the program's total is within the chip's HBM less the headroom.
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v5p": 95 * GIB,
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 84_978_434_048,  # XLA's H100 description (H100_TARGET below)
    "NVIDIA H200": 141 * 10**9,
}
TOPOLOGY_PATTERN = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")
GPU_PATTERN = re.compile(r"^h100:(\d+)$")  # H100 SXM, N GPUs on one host
TPU_INSTALL_HINT = 'pip install -e ".[tpu]"  (libtpu for the installed jax)'
GPU_INSTALL_HINT = 'pip install "jax[cuda12]==<the installed jax>"  (about 5.5 GB)'
# The H100 SXM as XLA's GPU compiler sees it (the fields of XLA's GpuTargetConfigProto, values
# from XLA's xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb): with it the CUDA plugin builds a
# compile-only topology on a host without a GPU.
H100_TARGET = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
_OOM_PATTERN = re.compile(r"([\d.]+)([KMGT]?)\s*\)?\s*exceeds available HBM \(([\d.]+)([KMGT]?)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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


def tpu_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of a TPU topology such as "v5e:4x4" or "v5p:2x2x1" (libtpu)."""
    if not TOPOLOGY_PATTERN.match(topology):
        raise InputError(
            f"topology '{topology}' is not GEN:AxB or GEN:AxBxC with GEN v4, v5e, v5p or v6e "
            "(e.g. v5e:4x4, v5p:2x2x1), nor h100:N"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise InputError(f"compiling for a TPU topology needs libtpu: {TPU_INSTALL_HINT}")
    from jax.experimental import topologies

    # compile-only: no chip is opened, so several such processes (and a TPU job) may coexist
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as err:  # libtpu refuses sizes it does not know
        raise InputError(f"libtpu cannot build topology '{topology}': {err}") from err


def gpu_devices(topology: str) -> list[jax.Device]:
    """The compile-only devices of "h100:N" (N H100s on one host), from the CUDA plugin with
    XLA's H100 target description; no GPU needed (autotuning is off without one, so kernel
    choices and temporaries may differ somewhat from a compile on the GPU itself)."""
    count = int(GPU_PATTERN.match(topology).group(1))
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        raise InputError(f"compiling for {topology} needs the CUDA plugin: {GPU_INSTALL_HINT}")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{count}", target_config=H100_TARGET
        )
    except Exception as err:  # noqa: BLE001 - the plugin's own error, one line
        raise InputError(
            f"the CUDA plugin cannot build {topology} (run with JAX_PLATFORMS=cpu on a host "
            f"without a GPU): {str(err).splitlines()[0]}"
        ) from err
    return list(desc.devices)


def target_devices(topology: str) -> list[jax.Device]:
    """`tpu_devices` or `gpu_devices`, by the topology's name."""
    return gpu_devices(topology) if GPU_PATTERN.match(topology) else tpu_devices(topology)


def _flops(compiled: Any) -> float:
    """XLA's FLOP count; the GPU compile-only executable has no cost analysis of its own, so its
    optimised module is analysed through the host's client."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    if cost:
        return float(cost.get("flops", 0.0))
    from jax._src.lib import _jax

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return float(cost.get("flops", 0.0))


def chip_hbm(device: jax.Device) -> int:
    kind = device.device_kind
    if kind not in HBM_BYTES:
        raise InputError(f"no HBM size known for device kind '{kind}' (aot.HBM_BYTES)")
    return HBM_BYTES[kind]


def _sized(cfg: ml_collections.ConfigDict, mesh: Mesh, batch_per_chip: int):
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.data.batch_size = batch_per_chip * mesh.devices.size
    return cfg


def lower_train_step(cfg: ml_collections.ConfigDict, mesh: Mesh):
    """The train command's jitted step (train/step.py) lowered for abstract, sharded inputs
    (with LPIPS unless `cfg.loss.perceptual_weight` is 0, as `train` does)."""
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
    return step.lower(state, batch_spec(cfg.data, mesh), lpips)


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
    """The API's compiled encode / decode / reconstruct (api.py) for a sharded batch; a tiled
    config's tiles `tile_batch` of a shape at a time (the memory planner's `max_batch`)."""
    graphdef, state = abstract_model(lambda: build_vae(cfg.model), mesh, cfg.mesh.rules)
    h, w = frame_size(cfg.data.resolution)
    b, t = int(cfg.data.batch_size), int(cfg.data.num_frames)
    shard = batch_sharding(mesh)
    video = jax.ShapeDtypeStruct((b, t, h, w, 3), jnp.float32, sharding=shard)
    tiles = TileConfig.from_config(cfg)
    if tile_batch is not None:
        tiles = dataclasses.replace(tiles, max_batch=tile_batch)
    if program == "encode":
        return api._encode_jit.lower(graphdef, state, video, tiles=tiles)
    if program == "reconstruct":
        return api._reconstruct_jit.lower(graphdef, state, video, None, tiles=tiles)
    latent_shape = derived(cfg).latent_shape(h, w)  # (t, h / 32, w / 32, z)
    latent = jax.ShapeDtypeStruct((b, *latent_shape), jnp.float32, sharding=shard)
    frame = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=shard)
    return api._decode_jit.lower(graphdef, state, latent, frame, tiles=tiles)


def _oom_figures(message: str) -> tuple[int, int]:
    """(needed, available) bytes from the TPU compiler's RESOURCE_EXHAUSTED message."""
    match = _OOM_PATTERN.search(message)
    if not match:
        return 0, 0
    need, need_unit, have, have_unit = match.groups()
    return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])


def compile_program(
    cfg: ml_collections.ConfigDict,
    program: str,
    devices: Sequence[jax.Device],
    *,
    batch_per_chip: int = 1,
    topology: str = "",
    headroom: float = 0.0,
    tile_batch: int | None = None,
) -> CompileRecord:
    """Lowers and compiles `program` for `devices` (mesh `cfg.mesh.shape` over them); the
    per-chip figures. `fits`: compiled, and the total is within (1 - headroom) of HBM."""
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
    try:
        # the layers' sharding constraints (models/constraints.py) follow the mesh and rules
        with (
            traced_for(device.platform),
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nnx.logical_axis_rules(cfg.mesh.rules),
        ):
            options = None
            if program == "train_step":
                lowered = lower_train_step(cfg, mesh)
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
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return record(
        fits=total <= (1.0 - headroom) * hbm,
        argument_bytes=int(memory.argument_size_in_bytes),
        state_bytes=int(state_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        total_bytes=int(total),
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
