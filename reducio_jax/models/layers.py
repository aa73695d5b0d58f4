"""Building blocks shared by the encoders and the decoder (channels-last).

Every module takes `dtype` (compute) and `param_dtype` (storage) and annotates its parameters
with logical axis names (`conv_in`, `conv_out`, `embed`, `norm`), which the sharding rules in the
config map onto mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.models import constraints
from reducio_jax.models.convolution import (
    conv_general_dilated,
    cpu_forms_enabled,
    phases_apply,
    target_platform,
    upsampled_conv,
)

Dtype = jnp.dtype | type
Padding = Sequence[tuple[int, int]]

# torch's default init (kaiming-uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Buffer(nnx.Variable):
    """A non-trainable array that checkpoints carry (e.g. fixed positional tables)."""


def conv(
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int],
    *,
    stride: Sequence[int] | int = 1,
    padding: Padding | str = "SAME",
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An N-d convolution over channels-last inputs `(B, *spatial, C)` (CPU forms: convolution.py)."""
    spatial = len(kernel_size)
    strides = (stride,) * spatial if isinstance(stride, int) else tuple(stride)
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=tuple(kernel_size),
        strides=strides,
        padding=padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(
            default_kernel_init, (None,) * spatial + ("conv_in", "conv_out")
        ),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def same_conv(
    in_features: int,
    out_features: int,
    spatial: int,
    *,
    kernel: int = 3,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A stride-1 convolution with symmetric zero padding `kernel // 2` in every dimension."""
    pad = kernel // 2
    return conv(
        in_features,
        out_features,
        (kernel,) * spatial,
        padding=[(pad, pad)] * spatial,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def dense(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = ("embed", "heads"),
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(default_kernel_init, axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        dot_general=gathered_dot_general,
        rngs=rngs,
    )


def gathered_dot_general(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
    """`lax.dot_general` with the kernel `rhs` whole on every device (constraints.py)."""
    return jax.lax.dot_general(lhs, constraints.gathered(rhs), *args, **kwargs)


def standardize(x: jax.Array, axes: tuple[int, ...], epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(biased var + eps) over `axes`, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + epsilon)


# Elements per sample from which GroupNorm takes the CPU's channel-sum form (forward 1.6-2.4x
# faster at 4-16M elements); smaller inputs keep the plain form, whose graph compiles faster.
CHANNEL_SUMS_MIN_SIZE = 1 << 22


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last inputs, statistics in float32, optional fused SiLU.

    Matches `torch.nn.GroupNorm(num_groups, C, eps)`: per sample and group, the mean and biased
    variance over all positions and the group's channels.
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        epsilon: float = 1e-6,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        del rngs
        if num_features % num_groups:
            raise ValueError(
                f"GroupNorm: {num_features} channels do not split into {num_groups} groups"
            )
        self.num_groups = num_groups
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array, *, silu: bool = False) -> jax.Array:
        shape = x.shape  # (B, *spatial, C)
        scale = self.scale[...].astype(jnp.float32)
        bias = self.bias[...].astype(jnp.float32)
        if not cpu_forms_enabled():
            cfg = (self.num_groups, self.epsilon, silu, jnp.dtype(self.dtype).name)
            return group_norm_lean(x, scale, bias, cfg)
        if math.prod(shape[1:]) >= CHANNEL_SUMS_MIN_SIZE:
            out = self._channel_sums(x, scale, bias).reshape(shape)
        else:
            grouped = x.reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
            out = standardize(grouped, (1, 3), self.epsilon).reshape(shape) * scale + bias
        if silu:
            out = jax.nn.silu(out)
        return out.astype(self.dtype)

    def _channel_sums(self, x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
        """The same statistics from per-channel sums over positions (a reduction that keeps the
        channels minor, which XLA:CPU vectorises: forward 1.6-2.4x faster), then one fused
        `x * a + b` per channel. Returns (B, positions, C) float32."""
        b, c = x.shape[0], x.shape[-1]
        x32 = x.astype(jnp.float32).reshape(b, -1, c)  # (B, P, C)
        per_group = c // self.num_groups
        count = x32.shape[1] * per_group

        def group_mean(channel_sums: jax.Array) -> jax.Array:  # (B, C) -> (B, C)
            sums = channel_sums.reshape(b, self.num_groups, per_group).sum(-1)
            return jnp.repeat(sums / count, per_group, axis=-1)

        mean = group_mean(jnp.sum(x32, axis=1))
        centred = x32 - mean[:, None]
        var = group_mean(jnp.sum(centred * centred, axis=1))
        a = scale * jax.lax.rsqrt(var + self.epsilon)  # (B, C)
        return x32 * a[:, None] + (bias - mean * a)[:, None]


def _group_mean(per_channel: jax.Array, groups: int, count: int) -> jax.Array:
    """(B, C) per-channel sums -> (B, C): each channel gets its group's sum / count."""
    b, c = per_channel.shape
    sums = per_channel.reshape(b, groups, c // groups).sum(-1)  # (B, G)
    return jnp.repeat(sums / count, c // groups, axis=-1)


def _channel_stats(x: jax.Array, groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Per sample and channel: its group's mean and 1/std, float32 (B, C) (two passes over x)."""
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)
    x32 = x.astype(jnp.float32)
    mean = _group_mean(jnp.sum(x32, axis=axes), groups, count)
    centred = x32 - _per_channel(mean, x.ndim)
    var = _group_mean(jnp.sum(centred * centred, axis=axes), groups, count)
    return mean, jax.lax.rsqrt(var + epsilon)


def _per_channel(v: jax.Array, ndim: int) -> jax.Array:
    """(B, C) -> (B, 1, ..., 1, C) broadcastable against a (B, *spatial, C) array."""
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[-1])


def _group_norm_fwd(x, scale, bias, cfg):
    groups, epsilon, silu, dtype = cfg
    mean, rstd = _channel_stats(x, groups, epsilon)
    a = scale * rstd  # (B, C): y = x * a + b
    b = bias - mean * a
    y = x.astype(jnp.float32) * _per_channel(a, x.ndim) + _per_channel(b, x.ndim)
    out = jax.nn.silu(y) if silu else y
    # materialised here, in x's layout: fused into the convolution that reads it, the TPU
    # compiler materialised the per-channel coefficients at x's size in float32 instead
    out = jax.lax.optimization_barrier(out.astype(dtype))
    return out, (x, mean, rstd, scale, bias)


def _group_norm_bwd(cfg, residuals, d_out):
    """The gradient from x and the (B, C) statistics alone: dy (the cotangent through the
    SiLU) in x's dtype, two per-channel reductions over the positions, then dx as one
    per-channel affine map of (dy, x). Nothing float32 of x's size is needed between kernels."""
    groups, _, silu, _ = cfg
    x, mean, rstd, scale, bias = residuals
    nd, axes = x.ndim, tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)
    per_channel = lambda v: _per_channel(v, nd)  # noqa: E731
    x32 = x.astype(jnp.float32)
    dy = d_out.astype(jnp.float32)
    if silu:
        a = scale * rstd
        y = x32 * per_channel(a) + per_channel(bias - mean * a)
        sig = jax.nn.sigmoid(y)
        dy = dy * sig * (1.0 + y * (1.0 - sig))
    dy = dy.astype(x.dtype).astype(jnp.float32)  # held in the compute dtype between kernels
    sum_dy = jnp.sum(dy, axis=axes)  # (B, C)
    sum_dy_xhat = (jnp.sum(dy * x32, axis=axes) - mean * sum_dy) * rstd  # (B, C)
    mean_d = _group_mean(sum_dy * scale, groups, count)
    mean_dx = _group_mean(sum_dy_xhat * scale, groups, count)
    # dx = rstd * (scale * dy - mean_d - x_hat * mean_dx), x_hat = (x - mean) * rstd
    c_dy = rstd * scale
    c_x = -rstd * rstd * mean_dx
    c_0 = -rstd * mean_d - mean * c_x
    dx = dy * per_channel(c_dy) + x32 * per_channel(c_x) + per_channel(c_0)
    dx = jax.lax.optimization_barrier(dx.astype(x.dtype))  # as in the forward pass
    return dx, jnp.sum(sum_dy_xhat, axis=0), jnp.sum(sum_dy, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def group_norm_lean(x: jax.Array, scale: jax.Array, bias: jax.Array, cfg: tuple) -> jax.Array:
    """GroupNorm (+ SiLU) of x (B, *spatial, C) with float32 scale/bias (C,); cfg = (groups,
    epsilon, silu, output dtype name). The same statistics as the plain form, taken as
    per-channel sums over the positions (no regrouping reshape of x, whose layout the TPU
    compiler then copied), and a backward pass that keeps x and the (B, C) statistics instead
    of the float32 copies of x that XLA's autodiff keeps (at 256 px 0.5-1 GiB each per clip).
    Used on GPU and TPU."""
    return _group_norm_fwd(x, scale, bias, cfg)[0]


group_norm_lean.defvjp(_group_norm_fwd, _group_norm_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (torch `nn.LayerNorm(dim)`, eps 1e-5), float32 statistics."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        del rngs
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        out = standardize(x, (-1,), self.epsilon) * self.scale[...].astype(jnp.float32) + self.bias[
            ...
        ].astype(jnp.float32)
        return out.astype(self.dtype)


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-Conv twice, with a 1x1 projection on the skip path when widths differ."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        spatial: int,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(in_features, **kw)
        self.conv1 = same_conv(in_features, out_features, spatial, **kw)
        self.norm2 = GroupNorm(out_features, **kw)
        self.conv2 = same_conv(out_features, out_features, spatial, **kw)
        self.nin_shortcut = (
            same_conv(in_features, out_features, spatial, kernel=1, **kw)
            if in_features != out_features
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nnx.Module):
    """Strided convolution with the reference's asymmetric (0, 1) zero padding.

    `factors` is the stride per dimension, e.g. (1, 2, 2) halves only H and W of a video; a
    dimension with factor 1 gets a size-1 kernel and no padding.
    """

    def __init__(
        self,
        features: int,
        factors: Sequence[int],
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel = tuple(3 if f == 2 else 1 for f in factors)
        padding = [(0, 1) if f == 2 else (0, 0) for f in factors]
        self.conv = conv(
            features,
            features,
            kernel,
            stride=tuple(factors),
            padding=padding,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, factors: Sequence[int]) -> jax.Array:
    """Nearest-neighbour upsampling of the spatial axes of `(B, *spatial, C)` by integer factors."""
    for axis, factor in enumerate(factors, start=1):
        if factor > 1:
            x = jnp.repeat(x, factor, axis=axis)
    return x


class Upsample(nnx.Module):
    """Nearest-neighbour upsampling by `factors`, then a 3x3(x3) convolution."""

    def __init__(
        self,
        features: int,
        factors: Sequence[int],
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.factors = tuple(factors)
        self.conv = same_conv(
            features, features, len(factors), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if phases_apply(self.factors, self.conv.kernel_size, x.shape):
            return self._phases(x)
        return self.conv(upsample_nearest(x, self.factors))

    def _phases(self, x: jax.Array) -> jax.Array:
        """The same on the CPU, computed per output phase on x's grid (convolution.py)."""
        conv = self.conv
        x, kernel, bias = nnx.nn.dtypes.promote_dtype(
            (x, conv.kernel[...], conv.bias[...]), dtype=conv.dtype
        )
        return upsampled_conv(x, kernel, self.factors, bias, precision=conv.precision)


_FORWARD_ONLY = contextvars.ContextVar("reducio_jax_forward_only", default=False)


@contextlib.contextmanager
def forward_only() -> Iterator[None]:
    """Traced inside, `remat` is ignored: a program with no backward pass has nothing to
    recompute, and `nnx.remat` would only cost tracing (the tiny model's reconstruct: 0.7 of
    its 1.6 s of lowering, the same program). For programs that are never differentiated."""
    token = _FORWARD_ONLY.set(True)
    try:
        yield
    finally:
        _FORWARD_ONLY.reset(token)


def remat_call(fn, *args, remat: bool):
    """`fn(*args)` (modules and arrays), its activations recomputed in the backward pass if
    `remat` (only its inputs are kept; not inside `forward_only()`)."""
    if _recompute(remat):
        return nnx.remat(fn)(*args)
    return fn(*args)


def _recompute(remat: bool) -> bool:
    """Whether a program traced now recomputes what `remat` asks (never under `forward_only`)."""
    return remat and not _FORWARD_ONLY.get()


def maybe_remat(module: nnx.Module, *args: jax.Array, remat: bool) -> jax.Array:
    """Calls `module(*args)`, rematerialising its activations in the backward pass if `remat`."""
    return remat_call(lambda m, *a: m(*a), module, *args, remat=remat)


# Consecutive identical blocks run as one loop whose body is one block, traced, lowered and
# compiled once however many there are (`run_blocks`), in programs for GPUs and TPUs. XLA:CPU
# runs the loop's backward pass 2.5-3x slower (the tiny 32 px training step: 3.4 s against
# 1.15-1.37 s) and compiles the inference programs no faster, so CPU programs stay unrolled.
SCAN_BLOCKS = True


def run_blocks(blocks: Sequence[nnx.Module], h: jax.Array, *, remat: bool) -> jax.Array:
    """`h` through `blocks` in order (each `block(h)`), rematerialised per block if `remat`.

    Runs of identical blocks (the same graph definition and parameter shapes: a level's
    res-blocks after its first) are one `lax.scan` whose body is one block (not in CPU
    programs: `SCAN_BLOCKS`). The modules and their parameters stay where they are (the
    checkpoint layout and the converter's names do not change); each step picks its block's
    parameters with a `lax.switch` over them. Stacking them instead would copy every run's
    parameters into the program's temporaries (ft4's reconstruct at 64 px: 0.24 -> 1.19 GiB)."""
    scan = SCAN_BLOCKS and target_platform() != "cpu"
    for run in _identical_runs(blocks) if scan else [[block] for block in blocks]:
        if len(run) == 1:
            h = maybe_remat(run[0], h, remat=remat)
        else:
            h = _scan_run(run, h, remat=remat)
    return h


def _identical_runs(blocks: Sequence[nnx.Module]) -> list[list[nnx.Module]]:
    """The blocks in order, consecutive identical ones grouped."""
    runs: list[list[nnx.Module]] = []
    last = None
    for block in blocks:
        graphdef, state = nnx.split(block)
        kind = (graphdef, jax.tree.map(lambda x: (x.shape, x.dtype), state))
        if kind == last:
            runs[-1].append(block)
        else:
            runs.append([block])
        last = kind
    return runs


def _scan_run(run: list[nnx.Module], h: jax.Array, *, remat: bool) -> jax.Array:
    """`h` through the identical blocks of `run`, one loop step each."""
    graphdef = nnx.graphdef(run[0])
    states = [nnx.state(block) for block in run]
    pickers = [functools.partial(lambda i, ss: ss[i], i) for i in range(len(run))]

    def body(carry: jax.Array, index: jax.Array) -> tuple[jax.Array, None]:
        state = jax.lax.switch(index, pickers, states)
        return nnx.merge(graphdef, state)(carry), None

    if _recompute(remat):
        body = jax.checkpoint(body)
    return jax.lax.scan(body, h, jnp.arange(len(run)))[0]
