"""The convolution every layer runs: plain XLA on GPU/TPU, 2D forms of 3D convolutions on CPU.

XLA:CPU runs 3D convolutions at a fraction of its 2D-convolution and matmul rates (measured in
`benchmarks/RESULTS.md`: 3-15x slower for this model's shapes). On the CPU backend, chosen at
trace time, a channels-last 3D convolution is therefore computed as the same sum in a form
XLA:CPU runs well:

- `temporal_taps`: one 2D convolution per temporal tap over frames folded into the batch,
  summed (all general shapes);
- `taps_as_channels`: the temporal taps stacked into channels, one 2D convolution (few input
  channels, e.g. RGB in, and up to 32 on frames of at least 128x128);
- `output_taps`: one matmul into every tap's output channels, then shifted sums (few output
  channels, e.g. RGB out);
- `patches_matmul`: every tap's input positions gathered into channels, one matmul (frames of at
  most 16 output positions with large kernels, e.g. the 2x2 and 4x4 latent levels of the
  released models, where XLA:CPU's convolution runs at ~1 GFLOP/s: 300 ms against 5 ms for
  4x2x2x512 -> 512; smaller kernels keep `temporal_taps`, whose graph compiles faster).

- `winograd_conv`: (kt, 3, 3) stride-1 float32 convolutions of at least 64 input channels on
  frames of at least `WINOGRAD_MIN_FRAME_SIZE` input elements, forward by Winograd F(4x4, 3x3)
  (a quarter of the multiplies; float32 error below 2e-5 of the output's largest value),
  backward by `temporal_taps`.

Where a form's temporaries for the whole clip would be large (the stacked input of
`taps_as_channels`, the per-tap outputs of `temporal_taps` and `output_taps`, Winograd's band
product), it computes a chunk of output frames (rows, for `output_taps` and `winograd_conv`) at
a time in one loop (`chunked`): its temporaries, and the program, stay one chunk's size
whatever the clip's. Kernels are transformed once the input is there (`after`), not all at the
program's start.

A 2D channels-last convolution on the CPU takes `patches_matmul` on small frames with big
kernels (LPIPS' VGG at 2x2 on 32 px clips, 270 ms a 512->512 convolution in XLA), otherwise
XLA's own. A 1x1x1 convolution is the matmul it is. On the CPU, `upsampled_conv` also computes
the decoder's "nearest upsampling by 2, then a 3x3(x3) convolution" on the low-resolution grid,
one 2-tap-per-doubled-axis convolution per output phase (2.25x fewer FLOPs for (1, 2, 2), 3.4x
for (2, 2, 2)), and interleaves the phases. The arithmetic is the convolution's; only the
summation order differs (float32 rounding, ~1e-6 relative). GPU and TPU, dilated, grouped or
string-padded convolutions, and anything not channels-last take `lax.conv_general_dilated`
unchanged. `REDUCIO_JAX_CPU_CONV=0` in the environment turns the CPU forms off (read at trace
time).

The forms follow the platform a program is traced *for*: `jax.default_backend()`, unless a
`traced_for(platform)` block names another (the training step names its mesh's platform; the
ahead-of-time `compile` command names the TPU or GPU it compiles for on a CPU host).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
import operator
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from reducio_jax.models import constraints

FEW_CHANNELS = 8  # at most this many input (output) channels: taps_as_channels (output_taps)
# ... and at most this many input channels on frames of at least this many positions (H * W):
# taps_as_channels too. XLA:CPU's 2D convolution runs 32 input channels at 19-45 GFLOP/s and
# 96 at 70-85 (16x256x256 32->32: 1.29 s -> 0.83 s; 16x128x128 32->64: 0.72 s -> 0.35 s); on
# 64x64 frames and below the stacking copy costs more than it gains.
NARROW_CHANNELS = 32
NARROW_MIN_POSITIONS = 128 * 128
SMALL_FRAME = 16  # at most this many output positions per frame (H_out * W_out) ...
BIG_KERNEL = 256 * 256  # ... and at least this many C_in * C_out: patches_matmul
# upsampled frames of at least this many positions (H * W): upsampled_conv. Smaller ones keep
# upsample-then-convolve, whose graph compiles faster where the FLOPs saved are few.
PHASES_MIN_POSITIONS = 64 * 64
# Winograd F(4x4, 3x3) for (kt, 3, 3) stride-1 float32 convolutions of at least 64 channels in
# and 32 out on frames of at least this many input elements (H * W * C_in; 32x32x256, 64x64x64):
# 1.2-2x faster forward there (16x64x64 64->64 148 -> 70 ms, 16x128x128 64->64 369 -> 304 ms,
# 16x32x32 256->256 350 -> 194 ms). The 32-channel levels and smaller frames keep the direct
# forms (no gain there, and the graph compiles ~3x longer).
WINOGRAD_MIN_FRAME_SIZE = 32 * 32 * 256
WINOGRAD_MIN_CHANNELS_IN = 64
WINOGRAD_MIN_CHANNELS_OUT = 32
WINOGRAD_TILE = 4
# a few output frames at a time where all of them would need more than this: the stacked input
# of taps_as_channels (the tiny model's encoder at 256 px: 384 MiB in one piece, its peak), the
# per-tap outputs of temporal_taps (at 288x640, 3 x 182 MiB beside the padded input)
CHUNK_BYTES = 64 << 20
# the matmul product of one band of tile rows (winograd): 256 MiB cut the tiny model's
# 16x256x256 reconstruction from 1.71 to 1.16 GiB of temporaries at the same speed (1 GiB); with
# every band in one loop (`chunked`), 64 MiB: tiny 256 px 0.90 -> 0.63 GiB, ft4 64 px 0.44 ->
# 0.24, tiny 288x640 1.91 -> 1.76, a little faster (8.38 -> 8.22 s, 27.0 -> 26.0 s)
WINOGRAD_BAND_BYTES = 64 << 20
# the per-tap outputs of output_taps (its matmul's product), a band of rows at a time where all
# rows' would exceed this (a 16x256x256 clip to RGB: 340 MB in one piece, and as much again
# padded; its 128->3 convolution 1.75 s -> 0.59 s against temporal_taps)
OUTPUT_TAPS_BAND_BYTES = 64 << 20
DN_2D = ("NHWC", "HWIO", "NHWC")


_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "reducio_jax_target_platform", default=None
)


@contextlib.contextmanager
def traced_for(platform: str | None):
    """Programs traced inside take the forms of `platform` ("cpu", "tpu", "gpu"/"cuda"; None:
    the default backend's)."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def target_platform() -> str:
    """The platform the program being traced is for (see `traced_for`)."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def cpu_forms_enabled() -> bool:
    if target_platform() != "cpu":
        return False
    return os.environ.get("REDUCIO_JAX_CPU_CONV", "1") != "0"


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated`, with the CPU forms for channels-last 3D convolutions; under a
    mesh, a channels-last convolution takes its kernel whole and keeps its input and output
    split over the batch (and space) axes (constraints.py)."""
    dimension_numbers = kwargs.get("dimension_numbers")
    if lhs.ndim not in (4, 5) or not _is_channels_last(lhs, rhs, dimension_numbers):
        return _conv_forms(lhs, rhs, *args, **kwargs)
    lhs, rhs = constraints.video(lhs), constraints.gathered(rhs)
    return constraints.video(_conv_forms(lhs, rhs, *args, **kwargs))


def _conv_forms(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> jax.Array:
    plain = lambda: lax.conv_general_dilated(  # noqa: E731
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
    if not (
        lhs.ndim in (4, 5)
        and cpu_forms_enabled()
        and not kwargs.get("out_sharding")
        and feature_group_count == 1
        and batch_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1,)))
        and all(d == 1 for d in (rhs_dilation or (1,)))
        and not isinstance(padding, str)
        and _is_channels_last(lhs, rhs, dimension_numbers)
    ):
        return plain()
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    strides, pads = tuple(window_strides), [tuple(p) for p in padding]
    c_in, c_out = rhs.shape[-2], rhs.shape[-1]
    if lhs.ndim == 4:  # 2D: only a small frame with a big kernel leaves XLA's convolution
        x, w, strides_3d, pads_3d = lhs[:, None], rhs[None], (1, *strides), [(0, 0), *pads]
        small_frame = _frame_positions(x.shape, w.shape, strides_3d, pads_3d) <= SMALL_FRAME
        if small_frame and c_in * c_out >= BIG_KERNEL:
            return patches_matmul(x, w, strides_3d, pads_3d, **kw)[:, 0]
        return plain()
    if rhs.shape[:3] == (1, 1, 1) and all(s == 1 for s in strides) and not any(map(any, pads)):
        return lax.dot_general(lhs, rhs[0, 0, 0], (((4,), (0,)), ((), ())), **kw)
    small_frame = _frame_positions(lhs.shape, rhs.shape, strides, pads) <= SMALL_FRAME
    if small_frame and c_in * c_out >= BIG_KERNEL:
        return patches_matmul(lhs, rhs, strides, pads, **kw)
    if winograd_applies(lhs, rhs, strides, pads):
        return winograd_conv(lhs, rhs, pads[0], WINOGRAD_TILE, **kw)
    if c_out <= FEW_CHANNELS and all(s == 1 for s in strides):
        return output_taps(lhs, rhs, pads, **kw)
    narrow = c_in <= NARROW_CHANNELS and lhs.shape[2] * lhs.shape[3] >= NARROW_MIN_POSITIONS
    if c_in <= FEW_CHANNELS or narrow:
        return taps_as_channels(lhs, rhs, strides, pads, **kw)
    return temporal_taps(lhs, rhs, strides, pads, **kw)


def _is_channels_last(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    specs = ("NDHWC", "DHWIO", "NDHWC") if lhs.ndim == 5 else DN_2D
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, specs)
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


def winograd_applies(x: jax.Array, w: jax.Array, strides, pads) -> bool:
    """(kt, 3, 3) kernels, stride 1, spatial padding 1, float32, and a frame big enough."""
    kt, kh, kw_, c_in, c_out = w.shape
    return (
        (kh, kw_) == (3, 3)
        and all(s == 1 for s in strides)
        and [tuple(p) for p in pads[1:]] == [(1, 1), (1, 1)]
        and x.dtype == w.dtype == jnp.float32
        and c_in >= WINOGRAD_MIN_CHANNELS_IN
        and c_out >= WINOGRAD_MIN_CHANNELS_OUT
        and x.shape[2] * x.shape[3] * c_in >= WINOGRAD_MIN_FRAME_SIZE
    )


def _frame_positions(x_shape, w_shape, strides, pads) -> int:
    """Output positions per frame (H_out * W_out) of a 3D convolution."""
    _, _, h_out, w_out, _ = _output_shape(x_shape, w_shape, strides, pads)
    return h_out * w_out


def _output_shape(x_shape, w_shape, strides, pads) -> tuple[int, ...]:
    """(B, T_out, H_out, W_out, Co) of a channels-last 3D convolution."""
    sizes = [
        (x_shape[d] + lo + hi - w_shape[d - 1]) // s + 1
        for d, s, (lo, hi) in zip((1, 2, 3), strides, pads, strict=True)
    ]
    return (x_shape[0], *sizes, w_shape[-1])


def _output(x: jax.Array, w: jax.Array, strides, pads, kw: dict) -> jax.ShapeDtypeStruct:
    """The output of a channels-last 3D convolution (`kw`: its precision and type options)."""
    dtype = kw.get("preferred_element_type") or jnp.result_type(x, w)
    return jax.ShapeDtypeStruct(_output_shape(x.shape, w.shape, strides, pads), dtype)


def _frames_per_tap(x: jax.Array, kt: int, stride: int, pad: tuple[int, int]) -> list[jax.Array]:
    """For each temporal tap i, the input frames it meets: kt arrays (B, T_out, H, W, C)."""
    x = jnp.pad(x, ((0, 0), pad, (0, 0), (0, 0), (0, 0)))
    t_out = (x.shape[1] - kt) // stride + 1
    return [x[:, i : i + stride * (t_out - 1) + 1 : stride] for i in range(kt)]


def _conv2d(x: jax.Array, w: jax.Array, strides, pads, **kw) -> jax.Array:
    """A 2D convolution over (B, T, H, W, C) with the frames folded into the batch."""
    b, t = x.shape[:2]
    y = lax.conv_general_dilated(
        x.reshape(b * t, *x.shape[2:]), w, strides, pads, dimension_numbers=DN_2D, **kw
    )
    return y.reshape(b, t, *y.shape[1:])


def temporal_taps(x: jax.Array, w: jax.Array, strides, pads, **kw) -> jax.Array:
    """sum_i conv2d(frames meeting tap i, w[i]), a few output frames at a time (`chunked`)
    where all frames' per-tap outputs would exceed CHUNK_BYTES (at temporal stride 1).
    x: (B, T, H, W, Ci), w: (kt, kh, kw, Ci, Co)."""
    kt = w.shape[0]
    w = after(w, x)  # each tap's kernel sliced once x is there (see `after`)

    def tap_sum(x: jax.Array, t_pad: tuple[int, int]) -> jax.Array:
        out = None
        for tap, x_tap in enumerate(_frames_per_tap(x, kt, strides[0], t_pad)):
            y = _conv2d(x_tap, w[tap], strides[1:], pads[1:], **kw)
            out = y if out is None else out + y
        return out

    out = _output(x, w, strides, pads, kw)
    per_frame = math.prod(out.shape) // out.shape[1] * kt * jnp.dtype(x.dtype).itemsize
    return _by_frames(tap_sum, x, out, kt, strides[0], tuple(pads[0]), per_frame)


def taps_as_channels(x: jax.Array, w: jax.Array, strides, pads, **kw) -> jax.Array:
    """The temporal taps stacked into channels: one 2D conv with kt * Ci input channels; a few
    output frames at a time (`chunked`) where the stacked input of all would exceed
    CHUNK_BYTES (at temporal stride 1)."""
    kt, stride = w.shape[0], strides[0]
    w2d = jnp.concatenate(list(after(w, x)), axis=2)  # (kh, kw, kt*Ci, Co)

    def stacked_conv(x: jax.Array, t_pad: tuple[int, int]) -> jax.Array:
        frames = _frames_per_tap(x, kt, stride, t_pad)
        stacked = jnp.concatenate(frames, axis=-1)  # (B, T_out, H, W, kt*Ci)
        return _conv2d(stacked, w2d, strides[1:], pads[1:], **kw)

    out = _output(x, w, strides, pads, kw)
    per_frame = math.prod((x.shape[0], *x.shape[2:])) * kt * jnp.dtype(x.dtype).itemsize
    return _by_frames(stacked_conv, x, out, kt, stride, tuple(pads[0]), per_frame)


def _by_frames(conv, x, out, kt: int, stride: int, t_pad: tuple[int, int], per_frame: int):
    """`conv(x, t_pad)` whole, or (temporal stride 1, and all frames' `per_frame` temporary
    bytes over CHUNK_BYTES) a few output frames at a time through `chunked`."""
    chunk = max(1, CHUNK_BYTES // per_frame)
    if stride != 1 or chunk >= x.shape[1]:
        return conv(x, t_pad)
    return chunked(lambda x: conv(x, (0, 0)), x, out, 1, kt, t_pad, chunk)


def chunked(
    conv,
    x: jax.Array,
    out: jax.ShapeDtypeStruct,
    axis: int,
    taps: int,
    pad: tuple[int, int],
    chunk: int,
) -> jax.Array:
    """A stride-1 convolution `conv` with `taps` taps along `axis` of x, unpadded on that axis
    (n -> n - taps + 1), computed for x padded by `pad` there, `chunk` outputs at a time in one
    loop: each step takes the chunk + taps - 1 input positions it meets (zeros outside x) and
    writes its outputs in place. The program holds one chunk's convolution, and its
    temporaries one chunk's, whatever the size; the last chunk overlaps the one before rather
    than being shorter. x: (B, T, H, W, C); axis 1 (frames) or 2 (rows); `out`: the whole
    output (its shape and dtype: a chunk's are the same but on `axis`)."""
    n_in = x.shape[axis]
    n_out = n_in + pad[0] + pad[1] - taps + 1
    chunk = min(chunk, n_out)
    inside_shape = [chunk + taps - 1 if d == axis else 1 for d in range(x.ndim)]

    def inputs(first: jax.Array) -> jax.Array:
        """x's positions first - pad[0] + [0, chunk + taps - 1) on `axis`, zeros outside x."""
        source = first - pad[0] + jnp.arange(chunk + taps - 1)
        inside = ((source >= 0) & (source < n_in)).reshape(inside_shape)
        return jnp.where(inside, jnp.take(x, jnp.clip(source, 0, n_in - 1), axis=axis), 0)

    y = after(jnp.zeros(out.shape, out.dtype), x)

    def one_chunk(k: jax.Array, y: jax.Array) -> jax.Array:
        first = jnp.minimum(k * chunk, n_out - chunk)
        return lax.dynamic_update_slice_in_dim(
            y, conv(inputs(first)).astype(out.dtype), first, axis=axis
        )

    return lax.fori_loop(0, -(-n_out // chunk), one_chunk, y)


def output_taps(x: jax.Array, w: jax.Array, pads, **kw) -> jax.Array:
    """Stride 1: every tap's output channels from one matmul, then the shifted sum over taps;
    a band of output rows at a time (`chunked`) where all rows' products would exceed
    OUTPUT_TAPS_BAND_BYTES. x: (B, T, H, W, Ci), w: (kt, kh, kw, Ci, Co); gradients by
    `_output_taps_bwd`."""
    (t_lo, t_hi), rows, (w_lo, w_hi) = (tuple(p) for p in pads)
    taps = math.prod(w.shape[:3]) * w.shape[-1]  # output channels of the matmul
    b, t, _, wd, _ = x.shape
    row_bytes = b * (t + t_lo + t_hi) * (wd + w_lo + w_hi) * taps * jnp.dtype(x.dtype).itemsize
    band = max(1, OUTPUT_TAPS_BAND_BYTES // row_bytes)
    options = (kw.get("precision"), kw.get("preferred_element_type"))
    out = _output(x, w, (1, 1, 1), pads, kw)
    if band >= out.shape[2]:
        return _output_taps(x, w, ((t_lo, t_hi), rows, (w_lo, w_hi)), *options)
    band_pads = ((t_lo, t_hi), (0, 0), (w_lo, w_hi))
    conv = lambda x: _output_taps(x, w, band_pads, *options)  # noqa: E731
    return chunked(conv, x, out, 2, w.shape[1], rows, band)


def _taps_matrix(w: jax.Array) -> jax.Array:
    """(kt, kh, kw, Ci, Co) -> (Ci, kt*kh*kw*Co), columns in the order (i, j, k, co)."""
    kt, kh, kw_, c_in, c_out = w.shape
    return jnp.transpose(w, (3, 0, 1, 2, 4)).reshape(c_in, kt * kh * kw_ * c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _output_taps(x, w, pads, precision=None, preferred_element_type=None):
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    kt, kh, kw_, _, c_out = w.shape
    taps_matrix = _taps_matrix(after(w, x))  # made once x is there (see `after`)
    z = lax.dot_general(x, taps_matrix, (((4,), (0,)), ((), ())), **kw)  # (B,T,H,W,taps*Co)
    z = jnp.pad(z.reshape(*x.shape[:4], kt, kh, kw_, c_out), [(0, 0), *pads, (0, 0)] + [(0, 0)] * 3)
    t, h, wd = (z.shape[d] - k + 1 for d, k in zip((1, 2, 3), (kt, kh, kw_), strict=True))
    out = None
    for i in range(kt):
        for j in range(kh):
            for k in range(kw_):
                y = z[:, i : i + t, j : j + h, k : k + wd, i, j, k]
                out = y if out is None else out + y
    return out


def _output_taps_fwd(x, w, pads, precision, preferred_element_type):
    return _output_taps(x, w, pads, precision, preferred_element_type), (x, w)


def _output_taps_bwd(pads, precision, preferred_element_type, residuals, d_out):
    """The transpose of the shifted sum is a stack of shifted windows of d_out (tap (i, j, k)
    reads d_out at position - tap + padding), so both gradients are matmuls with it. (XLA's
    own transpose of the shifted sum scatters into the 8-D padded array, and its layout copy
    cost 130 ms of the 32 px training step's 1.2 s.)"""
    x, w = residuals
    kt, kh, kw_, c_in, c_out = w.shape
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    d_pad = jnp.pad(d_out, [(0, 0), (kt - 1,) * 2, (kh - 1,) * 2, (kw_ - 1,) * 2, (0, 0)])
    (pt, _), (ph, _), (pw, _) = pads
    t, h, wd = x.shape[1:4]
    windows = [
        d_pad[:, kt - 1 - i + pt : kt - 1 - i + pt + t, kh - 1 - j + ph : kh - 1 - j + ph + h,
              kw_ - 1 - k + pw : kw_ - 1 - k + pw + wd]
        for i in range(kt) for j in range(kh) for k in range(kw_)
    ]  # fmt: skip
    d_z = jnp.concatenate(windows, axis=-1)  # (B, T, H, W, taps*Co), columns as _taps_matrix
    d_x = lax.dot_general(d_z, _taps_matrix(w), (((4,), (1,)), ((), ())), **kw)
    d_w = lax.dot_general(x, d_z, (((0, 1, 2, 3), (0, 1, 2, 3)), ((), ())), **kw)
    d_w = jnp.transpose(d_w.reshape(c_in, kt, kh, kw_, c_out), (1, 2, 3, 0, 4))
    return d_x.astype(x.dtype), d_w.astype(w.dtype)


_output_taps.defvjp(_output_taps_fwd, _output_taps_bwd)


def patches_matmul(x: jax.Array, w: jax.Array, strides, pads, **kw) -> jax.Array:
    """Every tap's strided input positions gathered side by side into channels (one gather),
    then one matmul with the kernel flattened the same way.
    x: (B, T, H, W, Ci), w: (kt, kh, kw, Ci, Co)."""
    kt, kh, kw_, c_in, c_out = w.shape
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(x.shape[d + 1] - w.shape[d]) // strides[d] + 1 for d in range(3)]  # T, H, W out

    # One gather of every tap's positions (not one slice a tap: 27 fusions for XLA to compile
    # for each 3x3x3 convolution); the frames are small, so the table is too.
    grid = [np.arange(n) * st for n, st in zip(out, strides, strict=True)]  # first tap's index
    origin = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 1, 3)  # (P, 1, 3)
    taps = np.stack(np.meshgrid(*map(np.arange, (kt, kh, kw_)), indexing="ij"), -1).reshape(-1, 3)
    t_in, h_in, w_in = x.shape[1:4]
    flat = np.ravel_multi_index(tuple(np.moveaxis(origin + taps, -1, 0)), (t_in, h_in, w_in))
    patches = x.reshape(x.shape[0], -1, c_in)[:, flat]  # (B, P, taps, Ci), taps as (i, j, k)
    patches = patches.reshape(x.shape[0], *out, -1)  # (B, T_out, H_out, W_out, taps*Ci)
    w_flat = w.reshape(kt * kh * kw_ * c_in, c_out)  # rows in the order (i, j, k, ci)
    return lax.dot_general(patches, w_flat, (((4,), (0,)), ((), ())), **kw)


# Winograd F(m, 3) (Lavin & Gray 2015): output tiles of m x m from (m+2) x (m+2) input tiles;
# (B^T, G, A^T) with the interpolation points 0, +-1 (m = 2) and 0, +-1, +-2 (m = 4).
WINOGRAD = {
    2: (
        ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1)),
    ),
    4: (
        ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    ),
}  # fmt: skip


def _combine(rows: Sequence[jax.Array], matrix: Sequence[Sequence[float]]) -> list[jax.Array]:
    """[sum_a matrix[r][a] * rows[a] for each r], without the zero terms (a transform's adds)."""
    out = []
    for coefficients in matrix:
        terms = [
            row if c == 1 else -row if c == -1 else row * jnp.asarray(c, row.dtype)
            for row, c in zip(rows, coefficients, strict=True)
            if c != 0
        ]
        out.append(functools.reduce(operator.add, terms))
    return out


def winograd(x: jax.Array, w: jax.Array, t_pad: tuple[int, int], m: int, **kw) -> jax.Array:
    """A (kt, 3, 3) convolution, stride 1, spatial padding 1, temporal padding `t_pad`, by
    Winograd F(m x m, 3 x 3) over each frame: (m+2)^2 / (9 m^2) of the direct multiplies (0.44
    for m = 2, 0.25 for m = 4). x: (B, T, H, W, Ci), w: (kt, 3, 3, Ci, Co).

    The input tiles are transformed once per frame; one batched matmul over the (m+2)^2 tile
    positions yields every temporal tap's output channels; the shifted sum over the taps and
    the output transform follow. Each transform runs one tile axis at a time. The tile rows go
    through in bands (`winograd_band_rows`): the matmul's product holds (m+2)^2 / m^2 x kt
    times the output's size in float32 (6.75x for m = 4, kt = 3: 11.5 GB for a 128-channel
    conv of 16 x 288 x 640 frames), so a band at a time bounds it by WINOGRAD_BAND_BYTES.
    """
    g_t = WINOGRAD[m][1]
    kt, _, _, c_in, c_out = w.shape
    b, _, h, wd, _ = x.shape
    # The kernel's transform once the input is there (before the padding, whose first element
    # XLA knows): XLA:CPU would otherwise run every layer's transform (parameters only) first
    # and keep them all alive (ft4 at 256 px: 2.2 GB of the reconstruction's 5.5 GB peak).
    w = after(w, x)
    tiles_h, tiles_w = -(-h // m), -(-wd // m)
    n = m + 2  # input tile size
    g = jnp.asarray(g_t, jnp.float32)
    u = jnp.einsum("ra,tabio,sb->srito", g, w.astype(jnp.float32), g, precision="highest")
    u = u.reshape(n * n, c_in, kt * c_out).astype(w.dtype)  # (s, r) at s*n + r, as the input's

    def band(x_rows: jax.Array) -> jax.Array:
        """Output rows from x's rows and their halo (padded in H already): (B, T_out, rows, W,
        Co); T padded by `t_pad`, W to whole tiles plus the halo, here, a band at a time."""
        x_rows = jnp.pad(x_rows, [(0, 0), t_pad, (0, 0), (1, 1 + m * tiles_w - wd), (0, 0)])
        return _winograd_band(x_rows, u, kt, m, **kw)[:, :, :, :wd]

    t_in = x.shape[1] + t_pad[0] + t_pad[1]
    rows = m * winograd_band_rows((b, t_in), tiles_w, kt * c_out, m)
    if rows >= h:  # one band: H padded here too (an elementwise producer of x fuses into it)
        x_rows = jnp.pad(x, [(0, 0), (0, 0), (1, 1 + m * tiles_h - h), (0, 0), (0, 0)])
        return band(x_rows)[:, :, :h]
    # A band of rows at a time, all bands through one loop: the program (and XLA's compile of
    # it) stays the same size whatever the frame.
    out = _output(x, w, (1, 1, 1), [t_pad, (1, 1), (1, 1)], kw)
    return chunked(band, x, out, 2, 3, (1, 1), rows)


def after(x: Any, y: Any) -> Any:
    """`x` (a pytree), computed after `y` (a pytree): each floating leaf of x plus a zero made
    from one element of y (its bits shifted out, so always 0.0; the multiply-by-zero XLA would
    fold, or a NaN would spread, this never does). XLA:CPU drops optimization barriers before
    it schedules, and its scheduler ran independent pieces side by side (every Winograd band's
    matmul first, every tile group at once), all their buffers alive together."""
    y0 = jax.tree.leaves(y)[0].reshape(-1)[0]
    bits = lax.bitcast_convert_type(y0.astype(jnp.float32), jnp.uint32)
    zero = lax.shift_right_logical(lax.shift_right_logical(bits, jnp.uint32(31)), jnp.uint32(1))
    add = lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return jax.tree.map(add, x)


def winograd_band_rows(bt_in: Sequence[int], tiles_w: int, taps_out: int, m: int) -> int:
    """Tile rows per band: the matmul product of a band, (m+2)^2 x B x T_in x rows x tiles_w x
    kt*Co float32 values, within WINOGRAD_BAND_BYTES (at least one row)."""
    row_bytes = (m + 2) ** 2 * math.prod(bt_in) * tiles_w * taps_out * 4
    return max(1, WINOGRAD_BAND_BYTES // row_bytes)


def _winograd_band(x: jax.Array, u: jax.Array, kt: int, m: int, **kw) -> jax.Array:
    """One band of `winograd`: x (B, T_in, m * rows + 2, m * tiles_w + 2, Ci) padded, u the
    transformed kernel (n*n, Ci, kt*Co) -> (B, T_out, m * rows, m * tiles_w, Co)."""
    b_t, _, a_t = WINOGRAD[m]
    n = m + 2
    b, t_in, h_in, w_in, c_in = x.shape
    tiles_h, tiles_w = (h_in - 2) // m, (w_in - 2) // m
    t_out = t_in - kt + 1
    # The input transform one axis at a time, each pass over every tile row (column) at once:
    # n outputs of a few adds each (not n*n), so the program stays small (issue 30: 2-3x less
    # compile time a convolution, the same or less run time). The rows' pass is materialised (a
    # barrier), else XLA recomputes it inside each output of the columns' pass.
    rows = [x[:, :, a : a + m * tiles_h : m] for a in range(n)]  # each (B, T_in, th, W_in, Ci)
    by_row = lax.optimization_barrier(jnp.stack(_combine(rows, b_t)))  # (n_r, B, T_in, th, W_in, C)
    cols = [by_row[..., c : c + m * tiles_w : m, :] for c in range(n)]
    v = jnp.stack(_combine(cols, b_t))  # (n_s, n_r, B, T_in, th, tw, Ci), (s, r) at s*n + r
    z = lax.dot_general(v.reshape(n * n, -1, c_in), u, (((2,), (1,)), ((0,), (0,))), **kw)
    z = z.reshape(n * n, b, t_in, tiles_h, tiles_w, kt, -1)
    z = functools.reduce(operator.add, [z[:, :, i : i + t_out, :, :, i] for i in range(kt)])
    # The output transform, columns' pass materialised as above: (n_s, n_r) -> (m, n_r) -> m x m.
    z = z.reshape(n, n, *z.shape[1:])
    by_col = lax.optimization_barrier(jnp.stack(_combine([z[s] for s in range(n)], a_t)))
    y = jnp.stack(_combine([by_col[:, r] for r in range(n)], a_t))  # (m_r, m_c, B, T, th, tw, Co)
    y = jnp.transpose(y, (2, 3, 4, 0, 5, 1, 6))  # (B, T, th, m, tw, m, Co)
    return y.reshape(b, t_out, m * tiles_h, m * tiles_w, y.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def winograd_conv(x, w, t_pad, m, precision=None, preferred_element_type=None):
    """`winograd` forward; the gradients are those of the direct `temporal_taps` form (the
    backward pass keeps the convolutions XLA differentiates, as before)."""
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    return winograd(x, w, tuple(t_pad), m, **kw)


def _winograd_fwd(x, w, t_pad, m, precision, preferred_element_type):
    return winograd_conv(x, w, t_pad, m, precision, preferred_element_type), (x, w)


def _winograd_bwd(t_pad, m, precision, preferred_element_type, residuals, d_out):
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    pads = [tuple(t_pad), (1, 1), (1, 1)]
    _, pull = jax.vjp(lambda x, w: temporal_taps(x, w, (1, 1, 1), pads, **kw), *residuals)
    return pull(d_out)


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)


# Per output phase of a doubled axis, which of the 3 taps fall on x[m-1], x[m] (phase 0) or on
# x[m], x[m+1] (phase 1) after nearest upsampling. Over x padded by 1 on both sides, the 2-tap
# convolution gives size + 1 outputs, and phase r is the `size` of them from offset r.
_PHASE_TAPS = {0: ((1, 0, 0), (0, 1, 1)), 1: ((1, 1, 0), (0, 0, 1))}


def phases_apply(
    factors: Sequence[int], kernel_shape: Sequence[int], x_shape: Sequence[int]
) -> bool:
    """Whether `upsampled_conv` computes this upsampling + convolution: on the CPU, 3-tap
    kernels, factors 1 or 2, and upsampled frames of at least `PHASES_MIN_POSITIONS`."""
    upsampled_hw = x_shape[-3] * factors[-2] * x_shape[-2] * factors[-1]
    return (
        cpu_forms_enabled()
        and upsampled_hw >= PHASES_MIN_POSITIONS
        and all(f in (1, 2) for f in factors)
        and any(f == 2 for f in factors)
        and all(k == 3 for k in kernel_shape[: len(factors)])
    )


def _phase_kernel(kernel: jax.Array, factors: Sequence[int], phase: Sequence[int]) -> jax.Array:
    """The kernel of one output phase: each doubled axis' 3 taps summed into the 2 it sees."""
    for axis, (factor, r) in enumerate(zip(factors, phase, strict=True)):
        if factor == 2:
            mix = jnp.asarray(_PHASE_TAPS[r], kernel.dtype)
            kernel = jnp.moveaxis(jnp.tensordot(mix, kernel, ((1,), (axis,))), 0, axis)
    return kernel


def upsampled_conv(
    x: jax.Array,
    kernel: jax.Array,
    factors: Sequence[int],
    bias: jax.Array | None = None,
    **kw,
) -> jax.Array:
    """conv(nearest_upsample(x, factors), kernel) (+ bias) with padding 1, without the upsampled
    input.

    x: (B, *spatial, Ci), kernel: (*3-taps, Ci, Co), factors 1 or 2 per spatial axis. Output
    phase r of a doubled axis sees only two input positions, so its kernel is the 3 taps summed
    into 2 (`_PHASE_TAPS`); a factor-1 axis keeps its 3 taps.

    The phases go through one loop, each written into its place in the output as it is made:
    the program holds one convolution whatever the number of phases, and one phase's
    temporaries are alive at a time. (Unrolled and stacked, XLA:CPU kept every phase's per-tap
    partial sums alive for one fused sum-and-interleave, then copied the result for each
    consumer: at the tiny model's 256 px, 12 x 64 MiB and 3 x 256 MiB, its peak.)
    """
    spatial = len(factors)
    dims = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[spatial]
    b, *sizes, _ = x.shape
    c_out = kernel.shape[-1]
    phases = list(itertools.product(*[range(f) for f in factors]))
    kernel = after(kernel, x)
    kernels = jnp.stack([_phase_kernel(kernel, factors, phase) for phase in phases])
    phase_table = jnp.asarray(phases, jnp.int32)  # (P, spatial): each phase's offsets
    dtype = jnp.result_type(x, kernel) if bias is None else jnp.result_type(x, kernel, bias)
    # (B, s_0, f_0, s_1, f_1, ..., Co): phase (r_0, r_1, ...) at [:, :, r_0, :, r_1, ...]. Made
    # from x (`after`): a plain zero array is scheduled at the program's start, alive till here.
    interleaved = [n for size, f in zip(sizes, factors, strict=True) for n in (size, f)]
    y = after(jnp.zeros((b, *interleaved, c_out), dtype), x)
    zero = jnp.zeros((), jnp.int32)

    def one_phase(p: jax.Array, y: jax.Array) -> jax.Array:
        offsets = phase_table[p]
        out = conv_general_dilated(
            x, kernels[p], (1,) * spatial, [(1, 1)] * spatial, dimension_numbers=dims, **kw
        )  # (B, s_0 + f_0 - 1, ..., Co)
        out = lax.dynamic_slice(out, [zero, *offsets, zero], [b, *sizes, c_out])
        if bias is not None:
            out = out + bias
        out = out.reshape(b, *[n for size in sizes for n in (size, 1)], c_out)
        start = [zero, *[n for r in offsets for n in (zero, r)], zero]
        return lax.dynamic_update_slice(y, out.astype(dtype), start)

    y = lax.fori_loop(0, len(phases), one_phase, y)
    return y.reshape(b, *(s * f for s, f in zip(sizes, factors, strict=True)), c_out)
