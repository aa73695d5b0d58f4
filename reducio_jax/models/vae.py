"""Reducio-VAE: 3D motion encoder, 2D content encoder and content-prior fusion decoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.models.decoder import FusionDecoder
from reducio_jax.models.encoder import Encoder
from reducio_jax.models.layers import Dtype, same_conv
from reducio_jax.models.posterior import DiagonalGaussian, latent_layer_norm


def _window(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def content_frame_index(num_frames: int) -> int:
    """The frame the content encoder sees: the middle one, (T - 1) // 2."""
    return (num_frames - 1) // 2


class VideoVAE(nnx.Module):
    """The network. Videos are channels-last (B, T, H, W, 3) in [-1, 1].

    Built from the official config's `ddconfig` / `ddconfig_2d` / `embed_dim` (see
    `from_config`); parameter names follow the reference so the converter's table stays short.
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
        dd, dd2 = dict(ddconfig), dict(ddconfig_2d)
        _check_supported(dd)
        common = dict(attention_impl=attention_impl, remat=remat, **kw)
        self.encoder_3d = Encoder(
            ch=dd["ch"],
            ch_mult=dd["ch_mult"],
            num_res_blocks=dd["num_res_blocks"],
            in_channels=dd.get("in_channels", 3),
            z_channels=dd["z_channels"],
            out_z=True,
            f_t=dd.get("f_t", 0),
            f_s=dd.get("f_s"),
            spatial=3,
            window_size=_window(dd.get("window_size", 256)),
            fp32_attention=dd.get("fp32_attention", True),
            **common,
        )
        self.encoder_2d = Encoder(
            ch=dd2["ch"],
            ch_mult=dd2["ch_mult"],
            num_res_blocks=dd2["num_res_blocks"],
            in_channels=dd2.get("in_channels", 3),
            z_channels=dd2["z_channels"],
            out_z=False,
            spatial=2,
            window_size=_window(dd2.get("window_size", 256)),
            fp32_attention=dd2.get("fp32_attention", True),
            **common,
        )
        self.decoder = FusionDecoder(
            ch=dd["ch"],
            ch_in=dd.get("ch_in"),
            ch_mult=dd["ch_mult"],
            ch_fuse=dd["ch_fuse"],
            num_res_blocks=dd["num_res_blocks"],
            temp_res=dd["temp_res"],
            z_channels=dd["z_channels"],
            ch_2d=dd2["ch"],
            ch_mult_2d=dd2["ch_mult"],
            out_ch=dd.get("out_ch", 3),
            f_t=dd.get("f_t", 0),
            f_s=dd.get("f_s"),
            fuse_mid=dd.get("fuse_mid", False),
            window_size=_window(dd.get("window_size", 256)),
            fp32_attention=dd.get("fp32_attention", True),
            **common,
        )
        z = dd["z_channels"]
        self.quant_conv = same_conv(2 * z, 2 * embed_dim, 3, kernel=1, **kw)
        self.post_quant_conv = same_conv(embed_dim, z, 3, kernel=1, **kw)
        self.temporal_factor = 2 ** dd.get("f_t", 0)
        self.num_frames = dd["temp_res"]
        self.dtype = dtype

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs) -> VideoVAE:
        """Builds the network from a config's `model` block (see `reducio_jax.config`)."""
        return cls(
            model_cfg["ddconfig"],
            model_cfg["ddconfig_2d"],
            model_cfg["embed_dim"],
            attention_impl=model_cfg.get("attention_impl") or None,
            remat=model_cfg.get("remat", False),
            dtype=jnp.dtype(model_cfg.get("dtype", "float32")),
            param_dtype=jnp.dtype(model_cfg.get("param_dtype", "float32")),
            rngs=rngs,
        )

    def encode(self, video: jax.Array) -> DiagonalGaussian:
        """(B, T, H, W, 3) -> posterior over (B, T/2**f_t, H/2**f_s, W/2**f_s, embed_dim)."""
        moments = self.quant_conv(self.encoder_3d(video))
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def content_features(self, frame: jax.Array) -> list[jax.Array]:
        """(B, H, W, 3) content frame -> the 2D features the decoder attends to, fine to coarse."""
        return self.encoder_2d(frame)

    def decode(
        self,
        latent: jax.Array,
        content_features: Sequence[jax.Array],
        *,
        return_last_features: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Normalised latent (B, t, h, w, embed_dim) + content features -> (B, T, H, W, 3).

        With `return_last_features`, also the input of the decoder's last conv (B, T', H, W, C)
        (T' >= T: before the temporal padding is dropped), for the adaptive GAN weight.
        """
        z = self.post_quant_conv(latent.astype(self.dtype))
        features = self.decoder.last_features(z, content_features)
        pad = (-self.num_frames) % self.temporal_factor
        video = self.decoder.conv_out(features)[:, pad:]
        return (video, features) if return_last_features else video

    def __call__(
        self, video: jax.Array, rng: jax.Array | None = None
    ) -> tuple[jax.Array, DiagonalGaussian, jax.Array]:
        """Reconstructs `video`; samples the posterior when `rng` is given, else uses its mean."""
        content = self.content_features(video[:, content_frame_index(video.shape[1])])
        posterior = self.encode(video)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        latent = latent_layer_norm(z)
        return self.decode(latent, content), posterior, latent


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
