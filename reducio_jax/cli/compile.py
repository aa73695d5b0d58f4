"""Compile a program for a TPU topology on this host (no TPU needed) and print its per-chip
memory against the chip's HBM, its FLOPs and the compile time: does it fit, at which batch?

    python -m reducio_jax compile --topology v5e:4x4 --config configs/reducio_ft4.py \\
        --batch_per_chip 2 [--fsdp 4] [--dtype bfloat16] [--remat] [--program train_step]
    ... --find_batch        # the largest per-chip batch that fits with --headroom to spare
    ... --serialize FILE    # also write the compiled step: train.compiled_step loads it

It compiles the same jitted program that `train` (or `encode`, `decode`, `reconstruct`) runs,
with its shardings, traced for the TPU (never this host's CPU forms), through libtpu's
compile-only client (`pip install -e ".[tpu]"`). Exit status: 0 fits, 1 does not fit, 2 bad
input (one `error:` line). `--json FILE` writes the records.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError
from reducio_jax.programs import budget

USAGE = "--topology GEN:AxB[xC] --config FILE [--program P] [--batch_per_chip N | --find_batch]"
DTYPES = ("bfloat16", "float32")


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    from reducio_jax.aot.sizing import PROGRAMS

    flags.DEFINE_string(
        "topology",
        None,
        "TPU topology, e.g. v5e:2x4, v5e:16x16, v6e:4x4, v5p:2x2x1, v4:2x2x1; or h100:N "
        "(N H100s, needs jax[cuda12]; run with JAX_PLATFORMS=cpu on a host without a GPU); or "
        "cpu:N (this host's first N CPU devices).",
        flag_values=fv,
    )
    shared.define_config(fv, argv)
    flags.DEFINE_enum(
        "program", "train_step", PROGRAMS, "Which program to compile.", flag_values=fv
    )
    flags.DEFINE_integer("batch_per_chip", 1, "Clips per chip (one micro-batch).", flag_values=fv)
    flags.DEFINE_integer(
        "fsdp",
        None,
        "Mesh fsdp axis size (parameters and optimizer state split over it; "
        "default: the config's mesh.shape).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "space",
        None,
        "Mesh space axis size: each clip's rows split over this many chips (activations "
        "1/space per chip; default: none).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "dtype", None, DTYPES, "Compute dtype (default: the config's).", flag_values=fv
    )
    flags.DEFINE_integer(
        "tile_batch",
        None,
        "Tiled encode/decode/reconstruct (model.use_tiling): tiles of one shape per step, as "
        "the memory planner bounds them on a device (default: all tiles at once).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "remat",
        None,
        "Recompute blocks in the backward pass (default: the config's model.remat).",
        flag_values=fv,
    )
    shared.define_resolution(fv, "Frame size N or HxW (default: the config's data.resolution).")
    flags.DEFINE_bool(
        "find_batch", False, "Search the largest per-chip batch that fits.", flag_values=fv
    )
    flags.DEFINE_float(
        "headroom",
        0.05,
        "Fraction of HBM to leave free for --find_batch and the fits verdict.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "json", None, "Write the records (a JSON list) to this file.", flag_values=fv
    )
    flags.DEFINE_string(
        "serialize",
        None,
        "Also write the compiled train step to this file (local or gs://), for "
        "train's --config.train.compiled_step: compiled once, loaded at every start.",
        flag_values=fv,
    )


def _configured(fv: flags.FlagValues):
    cfg = fv["config"].value
    cfg.unlock()
    if fv["dtype"].value is not None:
        cfg.model.dtype = fv["dtype"].value
    if fv["remat"].value is not None:
        cfg.model.remat = fv["remat"].value
        cfg.loss.perceptual_chunk = 1 if cfg.model.remat else 0  # remat covers LPIPS too
    if fv["resolution"].value is not None:
        cfg.data.resolution = fv["resolution"].value
    axes = {axis: fv[axis].value for axis in ("fsdp", "space") if fv[axis].value is not None}
    for axis, size in axes.items():
        if size < 1:
            raise InputError(f"--{axis} must be at least 1, got {size}")
    shape = dict(cfg.mesh.shape)
    if axes:  # the data axis takes the remaining chips
        shape = {"data": -1, **{k: v for k, v in shape.items() if k != "data"}, **axes}
    cfg.mesh.shape = shape
    return cfg


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if positional:
        raise InputError(f"unexpected arguments: {' '.join(positional)}")
    shared.require(fv, "topology", "config")
    from reducio_jax.aot import sizing, topologies

    devices = topologies.target_devices(fv["topology"].value)
    cfg = _configured(fv)
    headroom = float(fv["headroom"].value)
    if not 0.0 <= headroom < 1.0:
        raise InputError(f"--headroom must be in [0, 1), got {headroom}")

    def compile_at(batch: int) -> sizing.CompileRecord:
        record = sizing.compile_program(
            cfg,
            fv["program"].value,
            devices,
            batch_per_chip=batch,
            topology=fv["topology"].value,
            headroom=headroom,
            tile_batch=fv["tile_batch"].value,
            serialize=fv["serialize"].value,
        )
        print(format_record(record), flush=True)
        return record

    if fv["serialize"].value and fv["find_batch"].value:
        raise InputError("--serialize writes one program: give --batch_per_chip, not --find_batch")
    if fv["find_batch"].value:
        best, records = sizing.find_batch(compile_at)
        print(f"largest batch per chip that fits with {headroom:.0%} headroom: {best}")
        status = 0 if best >= 1 else 1
    else:
        records = [compile_at(fv["batch_per_chip"].value)]
        status = 0 if records[0].fits else 1
        if fv["serialize"].value and not records[0].error:
            path = fv["serialize"].value
            print(f"wrote the compiled step to {path} (train loads it with "
                  f"--config.train.compiled_step={path})")  # fmt: skip
    if fv["json"].value:
        from reducio_jax.storage.paths import write_text

        write_text(fv["json"].value, json.dumps([r.as_json() for r in records], indent=1))
    sys.stdout.flush()
    return status


def format_record(r) -> str:
    """One line per compile: mesh, batch, per-chip memory against HBM, FLOPs, compile time."""
    gib = functools.partial(budget.gib, unit="")
    mesh = "x".join(f"{k}={v}" for k, v in r.mesh.items())
    head = (
        f"{r.program} {r.topology or r.device_kind} ({r.num_chips} chips, {mesh}) "
        f"batch/chip {r.batch_per_chip} {r.resolution[0]}x{r.resolution[1]} {r.dtype}"
        f"{' remat' if r.remat else ''}{f' tiles {r.tile_batch} a step' if r.tile_batch else ''}:"
    )
    if r.error:
        return (
            f"{head} DOES NOT FIT: temporaries {gib(r.temp_bytes)} GiB alone exceed the chip "
            f"({gib(r.hbm_bytes)} GiB HBM); compile {r.compile_seconds:.0f} s"
        )
    verdict = "fits" if r.fits else "DOES NOT FIT"
    return (
        f"{head} {verdict}: total {gib(r.total_bytes)} of {gib(r.hbm_bytes)} GiB per chip "
        f"(arguments {gib(r.argument_bytes)}, of which state {gib(r.state_bytes)}; temporaries "
        f"{gib(r.temp_bytes)}; outputs {gib(r.output_bytes)}; aliased {gib(r.alias_bytes)}); "
        f"{r.flops_per_chip / 1e12:.2f} TFLOP per chip, {r.flops_per_clip / 1e12:.2f} per clip; "
        f"compile {r.compile_seconds:.0f} s"
    )
