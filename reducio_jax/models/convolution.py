"""The convolution every layer runs: plain XLA on GPU/TPU, 2D forms of 3D convolutions on CPU.

XLA:CPU runs 3D convolutions at a fraction of its 2D-convolution and matmul rates (measured in
`benchmarks/RESULTS.md`: 3-15x slower for this model's shapes). On the CPU backend, chosen at
trace time, a channels-last 3D convolution is therefore computed as the same sum in a form
XLA:CPU runs well:

- `temporal_taps`: one 2D convolution per temporal tap over frames folded into the batch,
  summed (all general shapes);
- `taps_as_channels`: the temporal taps stacked into channels, one 2D convolution (few input
  channels, e.g. RGB in);
- `output_taps`: one matmul into every tap's output channels, then shifted sums (few output
  channels, e.g. RGB out).

A 1x1x1 convolution is the matmul it is. The arithmetic is the convolution's; only the summation order differs (float32 rounding,
~1e-6 relative). GPU and TPU, dilated, grouped or string-padded convolutions, and anything not
channels-last take `lax.conv_general_dilated` unchanged. `REDUCIO_JAX_CPU_CONV=0` in the
environment turns the CPU forms off (read at trace time).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

FEW_CHANNELS = 8  # at most this many input (output) channels: taps_as_channels (output_taps)
OUTPUT_TAPS_MAX_BYTES = 1 << 28  # the per-tap outputs of output_taps stay below 256 MiB
DN_2D = ("NHWC", "HWIO", "NHWC")


def cpu_forms_enabled() -> bool:
    return jax.default_backend() == "cpu" and os.environ.get("REDUCIO_JAX_CPU_CONV", "1") != "0"


def conv_general_dilated(
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
    """`lax.conv_general_dilated`, with the CPU forms for channels-last 3D convolutions."""
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
        lhs.ndim == 5
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
    if rhs.shape[:3] == (1, 1, 1) and all(s == 1 for s in strides) and not any(map(any, pads)):
        return lax.dot_general(lhs, rhs[0, 0, 0], (((4,), (0,)), ((), ())), **kw)
    if c_out <= FEW_CHANNELS and all(s == 1 for s in strides):
        taps = math.prod(rhs.shape[:3]) * c_out  # output channels of the one matmul
        taps_bytes = math.prod(lhs.shape[:-1]) * taps * jnp.dtype(lhs.dtype).itemsize
        if taps_bytes <= OUTPUT_TAPS_MAX_BYTES:
            return output_taps(lhs, rhs, pads, **kw)
    if c_in <= FEW_CHANNELS:
        return taps_as_channels(lhs, rhs, strides, pads, **kw)
    return temporal_taps(lhs, rhs, strides, pads, **kw)


def _is_channels_last(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NDHWC", "DHWIO", "NDHWC"))
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == want


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
    """sum_i conv2d(frames meeting tap i, w[i]). x: (B, T, H, W, Ci), w: (kt, kh, kw, Ci, Co)."""
    frames = _frames_per_tap(x, w.shape[0], strides[0], pads[0])
    out = None
    for tap, x_tap in enumerate(frames):
        y = _conv2d(x_tap, w[tap], strides[1:], pads[1:], **kw)
        out = y if out is None else out + y
    return out


def taps_as_channels(x: jax.Array, w: jax.Array, strides, pads, **kw) -> jax.Array:
    """The temporal taps stacked into channels: one 2D conv with kt * Ci input channels."""
    frames = _frames_per_tap(x, w.shape[0], strides[0], pads[0])
    stacked = jnp.concatenate(frames, axis=-1)  # (B, T_out, H, W, kt*Ci)
    w2d = jnp.concatenate(list(w), axis=2)  # (kh, kw, kt*Ci, Co)
    return _conv2d(stacked, w2d, strides[1:], pads[1:], **kw)


def output_taps(x: jax.Array, w: jax.Array, pads, **kw) -> jax.Array:
    """Stride 1: every tap's output channels from one matmul, then the shifted sum over taps."""
    kt, kh, kw_, c_in, c_out = w.shape
    w_all = jnp.transpose(w, (3, 0, 1, 2, 4)).reshape(c_in, kt * kh * kw_ * c_out)
    z = lax.dot_general(x, w_all, (((4,), (0,)), ((), ())), **kw)  # (B, T, H, W, taps*Co)
    z = jnp.pad(z.reshape(*x.shape[:4], kt, kh, kw_, c_out), [(0, 0), *pads, (0, 0)] + [(0, 0)] * 3)
    t, h, wd = (z.shape[d] - k + 1 for d, k in zip((1, 2, 3), (kt, kh, kw_), strict=True))
    out = None
    for i in range(kt):
        for j in range(kh):
            for k in range(kw_):
                y = z[:, i : i + t, j : j + h, k : k + wd, i, j, k]
                out = y if out is None else out + y
    return out
