"""The content-prior fusion decoder: 3D up-sampling path over the motion latent whose features
attend, at the configured levels and in the mid block, to the 2D content features."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.models.attention import ContentFusion, SelfAttention
from reducio_jax.models.layers import (
    Dtype,
    GroupNorm,
    ResnetBlock,
    Upsample,
    maybe_remat,
    remat_call,
    run_blocks,
    same_conv,
)


def upsample_factors(
    level: int, num_levels: int, f_s: int, f_t: int
) -> tuple[int, int, int] | None:
    """(T, H, W) upsampling after `level` (levels run bottom-up), mirroring the encoder."""
    if level == 0 or level < num_levels - max(f_s, f_t):
        return None
    if f_t < f_s and level < num_levels - f_t:
        return (1, 2, 2)
    if f_s < f_t and level < num_levels - f_s:
        return (2, 1, 1)
    return (2, 2, 2)


def fusion_depth(level: int, num_levels: int, temp_res: int, f_t: int) -> int:
    """Number of frames the motion features have at `level` (where the fusion's embedding sits)."""
    if level < num_levels - f_t:
        return temp_res
    if level == num_levels - 1:
        return temp_res // 2**f_t
    return temp_res // 2 ** (f_t - num_levels + 1 + level)


class UpLevel(nnx.Module):
    def __init__(
        self,
        block_1: list[ResnetBlock],
        fuse: list[ContentFusion],
        block_2: list[ResnetBlock],
        upsample: Upsample | None,
    ):
        self.block_1 = nnx.data(block_1)
        self.fuse = nnx.data(fuse)
        self.block_2 = nnx.data(block_2)
        self.upsample = upsample


class FusionMid(nnx.Module):
    def __init__(self, block_1, fuse, attn_1, block_2):
        self.block_1 = block_1
        self.fuse = nnx.data(fuse)
        self.attn_1 = attn_1
        self.block_2 = block_2


class FusionDecoder(nnx.Module):
    """Motion latent (B, t, h, w, z) + content features -> video (B, T, H, W, out_ch)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        ch_fuse: Sequence[int],
        num_res_blocks: int,
        temp_res: int,
        z_channels: int,
        ch_2d: int,
        ch_mult_2d: Sequence[int],
        ch_in: int | None = None,
        out_ch: int = 3,
        f_t: int = 0,
        f_s: int | None = None,
        fuse_mid: bool = True,
        window_size: tuple[int, int] = (256, 256),
        fp32_attention: bool = True,
        attention_impl: str | None = None,
        remat: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn_kw = dict(
            window_size=window_size, fp32_attention=fp32_attention, attention_impl=attention_impl
        )
        num_levels = len(ch_mult)
        f_s = num_levels - 1 if f_s is None else f_s
        ch_in = ch if ch_in is None else ch_in
        self.ch_fuse = tuple(ch_fuse)
        self.remat = remat
        self.dtype = dtype
        block_in = ch_in * ch_mult[-1]
        self.conv_in = same_conv(z_channels, ch * ch_mult[-1], 3, **kw)
        mid_fuse = []
        if fuse_mid:
            mid_fuse.append(
                ContentFusion(block_in, ch_2d * ch_mult_2d[-1], temp_res // 2**f_t, **attn_kw, **kw)
            )
        self.mid = FusionMid(
            ResnetBlock(ch * ch_mult[-1], block_in, spatial=3, **kw),
            mid_fuse,
            SelfAttention(block_in, **attn_kw, **kw),
            ResnetBlock(block_in, block_in, spatial=3, **kw),
        )
        levels: list[UpLevel] = []
        for level in reversed(range(num_levels)):
            block_1 = []
            for _ in range(num_res_blocks):
                block_1.append(ResnetBlock(block_in, ch_in * ch_mult[level], spatial=3, **kw))
                block_in = ch_in * ch_mult[level]
            fuse = []
            if ch_fuse[level] >= 0:
                depth = fusion_depth(level, num_levels, temp_res, f_t)
                context_dim = ch_2d * ch_mult_2d[ch_fuse[level]]
                fuse.append(ContentFusion(block_in, context_dim, depth, **attn_kw, **kw))
            block_2 = [
                ResnetBlock(block_in, block_in, spatial=3, **kw) for _ in range(num_res_blocks)
            ]
            factors = upsample_factors(level, num_levels, f_s, f_t)
            upsample = Upsample(block_in, factors, **kw) if factors else None
            levels.insert(0, UpLevel(block_1, fuse, block_2, upsample))
        self.up = nnx.data(levels)
        self.norm_out = GroupNorm(block_in, **kw)
        self.conv_out = same_conv(block_in, out_ch, 3, **kw)

    def __call__(self, z: jax.Array, content_features: Sequence[jax.Array]) -> jax.Array:
        # z: (B, t, h, w, z_channels); content_features[i]: (B, H_i, W_i, C_i)
        return self.conv_out(self.last_features(z, content_features))  # (B, T, H, W, out_ch)

    def last_features(self, z: jax.Array, content_features: Sequence[jax.Array]) -> jax.Array:
        """The input of `conv_out` (B, T, H, W, C): the layer of the adaptive GAN weight.

        With `remat`, each up level (with the upsampling of the level below it), the mid block
        and the output norm are recomputed in the backward pass from their inputs, and each
        block again from its own input within that recomputation: the backward pass keeps the
        levels' inputs, not every block's (docs/training.md, "Sizing a pod job")."""
        m = self.conv_in(z.astype(self.dtype))
        r = self.remat
        h = remat_call(
            lambda mid, a, c: _mid(mid, a, c, remat=r), self.mid, m, content_features[-1], remat=r
        )
        below = None  # the upsampling of the level below runs in this level's unit
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            context = content_features[self.ch_fuse[level]] if len(up.fuse) else None
            unit = lambda lo, lv, a, c: _up_level(lo, lv, a, c, remat=r)  # noqa: E731
            h = remat_call(unit, below, up, h, context, remat=r)
            below = up.upsample
        if below is not None:
            h = below(h)
        return remat_call(_norm_silu, self.norm_out, h, remat=r)


def _mid(mid: FusionMid, m: jax.Array, context: jax.Array, *, remat: bool) -> jax.Array:
    m = maybe_remat(mid.block_1, m, remat=remat)
    for fuse in mid.fuse:
        m = maybe_remat(fuse, m, context, remat=remat)
    m = maybe_remat(mid.attn_1, m, remat=remat)
    return maybe_remat(mid.block_2, m, remat=remat)


def _up_level(
    below: Upsample | None,
    up: UpLevel,
    h: jax.Array,
    context: jax.Array | None,
    *,
    remat: bool,
) -> jax.Array:
    """The upsampling of the level below (so a remat unit keeps the smaller tensor before it),
    then this level's blocks and fusion; this level's own upsampling runs in the next unit."""
    if below is not None:
        h = maybe_remat(below, h, remat=remat)
    if not up.fuse:  # one sequence of blocks
        return run_blocks([*up.block_1, *up.block_2], h, remat=remat)
    h = run_blocks(up.block_1, h, remat=remat)
    for fuse in up.fuse:
        h = maybe_remat(fuse, h, context, remat=remat)
    return run_blocks(up.block_2, h, remat=remat)


def _norm_silu(norm: GroupNorm, h: jax.Array) -> jax.Array:
    return norm(h, silu=True)
