"""The inference programs and the one place they are lowered.

Each program is a pure function of (graphdef, state, inputs) under one `jax.jit` (static:
the graphdef and the tiling), so it also nests inside a user's own `jax.jit`:

    content      frame (B, H, W, 3)                 -> content features
    encode       video (B, T, H, W, 3)              -> posterior (B, t, h, w, z)
    decode       latent (B, t, h, w, z), frame      -> video (B, T, H, W, 3)
    reconstruct  video, rng (None: posterior mean)  -> video

`lower(op, graphdef, state, inputs, tiles)` lowers one for concrete or abstract inputs;
`window_inputs` gives the abstract inputs of `batch` windows of a frame size (the memory
planner's and the `compile` command's). Lowering for the CPU sets the CPU allocator first
(`allocator.reuse_freed_memory`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.config import Derived
from reducio_jax.models import VideoVAE, latent_layer_norm
from reducio_jax.models.convolution import target_platform
from reducio_jax.models.layers import forward_only
from reducio_jax.models.posterior import DiagonalGaussian
from reducio_jax.models.tiling import TileConfig
from reducio_jax.programs import allocator

OPS = ("encode", "decode", "reconstruct")  # the programs the planner and `compile` size


def _content(model: VideoVAE, frame: jax.Array, tiles: TileConfig | None):
    return model.content_features(frame, tiles=tiles)


def _encode(model: VideoVAE, video: jax.Array, tiles: TileConfig | None) -> DiagonalGaussian:
    return model.encode(video, tiles=tiles)


def _decode(
    model: VideoVAE, latent: jax.Array, frame: jax.Array, tiles: TileConfig | None
) -> jax.Array:
    return model.decode(latent, model.content_features(frame, tiles=tiles), tiles=tiles)


def _reconstruct(
    model: VideoVAE, video: jax.Array, rng: jax.Array | None, tiles: TileConfig | None
) -> jax.Array:
    return model(video, rng, tiles=tiles)[0]


def latent(posterior: DiagonalGaussian, rng: jax.Array | None) -> jax.Array:
    """The decoder's input: the posterior mean (rng None) or a sample, LayerNorm-ed."""
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return latent_layer_norm(z)


_FUNCTIONS = {
    "content": _content,
    "encode": _encode,
    "decode": _decode,
    "reconstruct": _reconstruct,
}


def _jitted(fn):
    """jit over (graphdef, state, *args): a pure function, so it also nests in a user's jax.jit
    (and their `jax.grad`, which keeps the model's remat). `forward: True` traces it without
    remat (`layers.forward_only`): the executables `lower` makes are never differentiated."""

    @functools.partial(jax.jit, static_argnames=("graphdef", "tiles", "forward"))
    def run(
        graphdef: nnx.GraphDef,
        state: nnx.State,
        *args,
        tiles: TileConfig | None,
        forward: bool = False,
    ):
        with forward_only() if forward else contextlib.nullcontext():
            return fn(nnx.merge(graphdef, state), *args, tiles)

    return run


JITS = {op: _jitted(fn) for op, fn in _FUNCTIONS.items()}
latent_jit = jax.jit(latent)


def check_op(op: str) -> None:
    if op not in _FUNCTIONS:
        raise ValueError(f"op must be one of {', '.join(_FUNCTIONS)}, got {op!r}")


def lower(
    op: str,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    inputs: Sequence[Any],
    tiles: TileConfig | None,
    *,
    fresh: bool = False,
) -> jax.stages.Lowered:
    """`op`'s program lowered for `inputs` (arrays or `jax.ShapeDtypeStruct`s, with their
    shardings). `fresh`: through a jit of its own, so that JAX's caches keep nothing of it once
    the result is dropped (a program only measured)."""
    check_op(op)
    if target_platform() == "cpu":
        allocator.reuse_freed_memory()  # once: the CPU programs' buffers (allocator.py)
    jit = _jitted(_FUNCTIONS[op]) if fresh else JITS[op]
    return jit.lower(graphdef, state, *inputs, tiles=tiles, forward=True)


# XLA:CPU's schedulers: "default" runs independent pieces side by side (faster), "memory" orders
# them to keep fewer buffers alive. Since the CPU convolutions run in chunks, "memory" needs
# more than "default" on every program measured (RESULTS "Memory per clip"), so the planner uses
# "default"; "memory" stays for measurements (`ReducioVAE.footprint(..., schedule=...)`).
SCHEDULES = ("default", "memory")
_MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compile_lowered(lowered: jax.stages.Lowered, schedule: str = "default") -> jax.stages.Compiled:
    """`lowered` compiled with `schedule`'s XLA options ("memory": XLA:CPU's memory-minded
    scheduler, for programs traced for the CPU; elsewhere the default)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    memory = schedule == "memory" and target_platform() == "cpu"
    return lowered.compile(compiler_options=_MEMORY_SCHEDULER if memory else None)


def window_inputs(
    op: str,
    sizes: Derived,
    batch: int,
    frame: tuple[int, int],
    *,
    frames: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[Any, ...]:
    """The abstract non-parameter inputs of `op` for `batch` windows of `frames` (default: the
    model's clip length) frames of `frame` (H, W) px, float32, with `sharding` (None: one
    device); the latent's shape follows from the model's `sizes` (no trace of the encoder)."""
    check_op(op)
    frames = sizes.num_frames if frames is None else frames
    video = jax.ShapeDtypeStruct((batch, frames, *frame, 3), jnp.float32, sharding=sharding)
    if op == "encode":
        return (video,)
    if op == "reconstruct":
        return (video, None)  # (no posterior noise)
    content = jax.ShapeDtypeStruct((batch, *frame, 3), jnp.float32, sharding=sharding)
    if op == "content":
        return (content,)
    latent_shape = (batch, *sizes.latent_shape(*frame))  # (B, t, h, w, z)
    return jax.ShapeDtypeStruct(latent_shape, jnp.float32, sharding=sharding), content


def input_bytes(inputs: Sequence[Any]) -> int:
    """Bytes of a program's non-parameter inputs."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(inputs))
