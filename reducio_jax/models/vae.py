"""Reducio-VAE: 3D motion encoder, 2D content encoder and content-prior fusion decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.config import (
    DDCONFIG_2D_DEFAULTS,
    DDCONFIG_DEFAULTS,
    content_frame_index,
    derived,
)
from reducio_jax.models.decoder import FusionDecoder
from reducio_jax.models.encoder import Encoder
from reducio_jax.models.layers import Dtype, same_conv
from reducio_jax.models.posterior import DiagonalGaussian, latent_layer_norm
from reducio_jax.models.tiling import (
    TileConfig,
    tiled_content_features,
    tiled_decode,
    tiled_moments,
)


def _window(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _tiled(tiles: TileConfig | None, height: int, width: int) -> bool:
    """Tile when tiling is on and the frame is taller than one tile window (as the reference;
    with the planner's `wide`, also wider)."""
    return tiles is not None and tiles.applies_to(height, width)


class VideoVAE(nnx.Module):
    """The network. Videos are channels-last (B, T, H, W, 3) in [-1, 1].

    Built from the official config's `ddconfig` / `ddconfig_2d` / `embed_dim` (see
    `from_config`); parameter names follow the reference so the converter's table stays short.
    `content_features`, `encode`, `decode` and `__call__` take `tiles`: frames taller than one
    tile window then go through overlapping spatial tiles with blended seams (`tiling.py`).
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        ddconfig_2d: Mapping[str, Any],
        embed_dim: int,
        *,
        attention_impl: str | None = None,
        remat: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dd = {**DDCONFIG_DEFAULTS, **ddconfig}
        dd2 = {**DDCONFIG_2D_DEFAULTS, **ddconfig_2d}
        _check_supported(dd)
        common = dict(attention_impl=attention_impl, remat=remat, **kw)
        self.encoder_3d = Encoder(
            ch=dd["ch"],
            ch_mult=dd["ch_mult"],
            num_res_blocks=dd["num_res_blocks"],
            in_channels=dd["in_channels"],
            z_channels=dd["z_channels"],
            out_z=True,
            f_t=dd["f_t"],
            f_s=dd["f_s"],
            spatial=3,
            window_size=_window(dd["window_size"]),
            fp32_attention=dd["fp32_attention"],
            **common,
        )
        self.encoder_2d = Encoder(
            ch=dd2["ch"],
            ch_mult=dd2["ch_mult"],
            num_res_blocks=dd2["num_res_blocks"],
            in_channels=dd2["in_channels"],
            z_channels=dd2["z_channels"],
            out_z=False,
            spatial=2,
            window_size=_window(dd2["window_size"]),
            fp32_attention=dd2["fp32_attention"],
            **common,
        )
        self.decoder = FusionDecoder(
            ch=dd["ch"],
            ch_in=dd["ch_in"],
            ch_mult=dd["ch_mult"],
            ch_fuse=dd["ch_fuse"],
            num_res_blocks=dd["num_res_blocks"],
            temp_res=dd["temp_res"],
            z_channels=dd["z_channels"],
            ch_2d=dd2["ch"],
            ch_mult_2d=dd2["ch_mult"],
            out_ch=dd["out_ch"],
            f_t=dd["f_t"],
            f_s=dd["f_s"],
            fuse_mid=dd["fuse_mid"],
            window_size=_window(dd["window_size"]),
            fp32_attention=dd["fp32_attention"],
            **common,
        )
        z = dd["z_channels"]
        self.quant_conv = same_conv(2 * z, 2 * embed_dim, 3, kernel=1, **kw)
        self.post_quant_conv = same_conv(embed_dim, z, 3, kernel=1, **kw)
        self.sizes = derived({"ddconfig": dd, "embed_dim": embed_dim})  # factors, clip length
        self.dtype = dtype

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> VideoVAE:
        """Builds the network from a config's `model` block (see `reducio_jax.config`)."""
        return cls(
            model_cfg["ddconfig"],
            model_cfg["ddconfig_2d"],
            model_cfg["embed_dim"],
            attention_impl=model_cfg["attention_impl"] or None,
            remat=model_cfg["remat"],
            dtype=jnp.dtype(model_cfg["dtype"]),
            param_dtype=jnp.dtype(model_cfg["param_dtype"]),
            rngs=rngs,
        )

    def encode(self, video: jax.Array, *, tiles: TileConfig | None = None) -> DiagonalGaussian:
        """(B, T, H, W, 3) -> posterior over (B, T/2**f_t, H/2**f_s, W/2**f_s, embed_dim)."""
        if _tiled(tiles, video.shape[2], video.shape[3]):
            return DiagonalGaussian.from_moments(tiled_moments(self._moments, video, tiles))
        return DiagonalGaussian.from_moments(self._moments(video))

    def _moments(self, video: jax.Array) -> jax.Array:
        """(B, T, H, W, 3) -> posterior mean and log-variance, (B, t, h, w, 2 * embed_dim)."""
        return self.quant_conv(self.encoder_3d(video)).astype(jnp.float32)

    def content_features(self, frame: jax.Array, *, tiles: TileConfig | None = None) -> Any:
        """(B, H, W, 3) content frame -> the 2D features the decoder attends to, fine to coarse
        (when tiled: a grid of per-tile feature lists)."""
        if _tiled(tiles, frame.shape[1], frame.shape[2]):
            return tiled_content_features(self.encoder_2d, frame, tiles)
        return self.encoder_2d(frame)

    def decode(
        self,
        latent: jax.Array,
        content_features: Any,
        *,
        tiles: TileConfig | None = None,
        return_last_features: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Normalised latent (B, t, h, w, embed_dim) + content features -> (B, T, H, W, 3).

        `content_features` comes from `content_features` with the same `tiles`. With
        `return_last_features` (untiled only), also the input of the decoder's last conv
        (B, T', H, W, C) (T' >= T: before the temporal padding is dropped), for the adaptive
        GAN weight.
        """
        z = self.post_quant_conv(latent.astype(self.dtype))
        features = None
        if tiles is not None and _tiled(
            tiles, latent.shape[2] * tiles.spatial_factor, latent.shape[3] * tiles.spatial_factor
        ):
            if return_last_features:
                raise ValueError("return_last_features is not available for tiled decoding")
            video = tiled_decode(self.decoder, z, content_features, tiles)
        else:
            features = self.decoder.last_features(z, content_features)
            video = self.decoder.conv_out(features)
        video = video[:, self.sizes.temporal_padding :]  # (B, T, H, W, 3)
        return (video, features) if return_last_features else video

    def __call__(
        self, video: jax.Array, rng: jax.Array | None = None, *, tiles: TileConfig | None = None
    ) -> tuple[jax.Array, DiagonalGaussian, jax.Array]:
        """Reconstructs `video`; samples the posterior when `rng` is given, else uses its mean."""
        frame = video[:, content_frame_index(video.shape[1])]
        content = self.content_features(frame, tiles=tiles)
        posterior = self.encode(video, tiles=tiles)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        latent = latent_layer_norm(z)
        return self.decode(latent, content, tiles=tiles), posterior, latent


def _check_supported(dd: Mapping[str, Any]) -> None:
    """Rejects reference options that no released Reducio config uses and this port lacks."""
    unsupported = {
        "fuse_type": ("attn", None),
        "upsample_first": (True,),
        "use_3d_conv": (True,),
        "pos_embed_mode": ("t",),
        "norm_type": ("layer",),
        "upsample_mode": ("interpolate",),
        "out_z_2d": (False,),
        "tanh_out": (False,),
        "use_conv_shortcut": (False,),
        "is_tanh_gating": (False,),
        "fuse_mid_type": (None, "attn"),
    }
    for key, allowed in unsupported.items():
        if key in dd and dd[key] not in allowed:
            raise NotImplementedError(
                f"ddconfig.{key}={dd[key]!r} is not supported (supported: {allowed}); "
                "the released Reducio-VAE configs use the supported values"
            )
