"""The encoders: the 3D motion encoder (video -> posterior moments) and the 2D content encoder
(middle frame -> multi-scale content features). One class serves both, as in the reference."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.models.attention import SelfAttention
from reducio_jax.models.layers import (
    Downsample,
    Dtype,
    GroupNorm,
    ResnetBlock,
    maybe_remat,
    remat_call,
    run_blocks,
    same_conv,
)


def downsample_factors(
    level: int, num_levels: int, f_s: int, f_t: int, spatial: int
) -> tuple[int, ...] | None:
    """Stride per dimension after `level`, or None when the level keeps its resolution.

    Levels near the bottom halve space and time; earlier ones only space (f_s > f_t) or only time
    (f_t > f_s), so that the totals are 2**f_s spatially and 2**f_t temporally.
    """
    if level == num_levels - 1 or level < num_levels - 1 - max(f_s, f_t):
        return None
    if spatial == 2:
        return (2, 2)
    if f_s > f_t and level < num_levels - f_t - 1:
        return (1, 2, 2)
    if f_t > f_s and level < num_levels - f_s - 1:
        return (2, 1, 1)
    return (2, 2, 2)


class DownLevel(nnx.Module):
    def __init__(self, block: list[ResnetBlock], downsample: Downsample | None):
        self.block = nnx.data(block)
        self.downsample = downsample


class MidBlock(nnx.Module):
    def __init__(self, features: int, spatial: int, attn: SelfAttention, *, kw: dict):
        self.block_1 = ResnetBlock(features, features, spatial=spatial, **kw)
        self.attn_1 = attn
        self.block_2 = ResnetBlock(features, features, spatial=spatial, **kw)


class Encoder(nnx.Module):
    """Down levels of ResNet blocks, a mid block with self-attention, then the output conv.

    `spatial=3`: input (B, T, H, W, C), output moments (B, T/2**f_t, H/2**f_s, W/2**f_s, 2*z).
    `spatial=2` with `out_z=False`: input (B, H, W, C), returns the list of skip features (one
    per level, before its downsampling) plus the mid-block features after attention.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        in_channels: int = 3,
        z_channels: int = 16,
        out_z: bool = True,
        double_z: bool = True,
        f_t: int = 0,
        f_s: int | None = None,
        spatial: int = 3,
        window_size: tuple[int, int] = (256, 256),
        fp32_attention: bool = True,
        attention_impl: str | None = None,
        remat: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        num_levels = len(ch_mult)
        f_s = num_levels - 1 if f_s is None else f_s
        self.out_z = out_z
        self.remat = remat
        self.dtype = dtype
        self.conv_in = same_conv(in_channels, ch, spatial, **kw)
        levels, block_in = [], ch
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, spatial=spatial, **kw))
                block_in = ch * mult
            factors = downsample_factors(level, num_levels, f_s, f_t, spatial)
            down = Downsample(block_in, factors, **kw) if factors else None
            levels.append(DownLevel(blocks, down))
        self.down = nnx.data(levels)
        attn = SelfAttention(
            block_in,
            window_size=window_size,
            fp32_attention=fp32_attention,
            attention_impl=attention_impl,
            **kw,
        )
        self.mid = MidBlock(block_in, spatial, attn, kw=kw)
        self.norm_out = GroupNorm(block_in, **kw)
        out_features = 2 * z_channels if double_z else z_channels
        self.conv_out = same_conv(block_in, out_features, spatial, **kw) if out_z else None

    def __call__(self, x: jax.Array) -> jax.Array | list[jax.Array]:
        # With remat, each level is recomputed from its input in the backward pass (and each of
        # its blocks from the block's input within that): only the levels' inputs are kept.
        r = self.remat
        h = self.conv_in(x.astype(self.dtype))
        skips = []
        for level in self.down:
            skip, h = remat_call(lambda lvl, a: _down_level(lvl, a, remat=r), level, h, remat=r)
            skips.append(skip)
        h = maybe_remat(self.mid.block_1, h, remat=r)
        h = maybe_remat(self.mid.attn_1, h, remat=r)
        if not self.out_z:
            # The content encoder's features end here; its block_2/norm_out feed nothing.
            return [*skips, h]
        h = maybe_remat(self.mid.block_2, h, remat=r)
        h = remat_call(lambda norm, a: norm(a, silu=True), self.norm_out, h, remat=r)
        return self.conv_out(h)


def _down_level(level: DownLevel, h: jax.Array, *, remat: bool) -> tuple[jax.Array, jax.Array]:
    """(the level's output before downsampling: its skip feature, after downsampling)"""
    h = run_blocks(level.block, h, remat=remat)
    return h, h if level.downsample is None else level.downsample(h)
