"""Flax NNX modules of Reducio-VAE and its training losses' networks, built from config blocks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.config import content_frame_index
from reducio_jax.models.discriminator import PatchDiscriminator
from reducio_jax.models.lpips import LPIPS
from reducio_jax.models.posterior import DiagonalGaussian, latent_layer_norm
from reducio_jax.models.vae import VideoVAE


def build_vae(model_cfg: Mapping[str, Any], *, seed: int | jax.Array = 0) -> VideoVAE:
    """The VAE of a config's `model` block, randomly initialised from `seed` (an int or a key)."""
    return VideoVAE.from_config(model_cfg, rngs=nnx.Rngs(seed))


def build_discriminator(
    cfg: Mapping[str, Any], *, spatial: int = 3, seed: int | jax.Array = 0
) -> PatchDiscriminator:
    """The PatchGAN of a config's `loss` block (3D on videos, or the 2D one on frames).

    Parameters are float32; it computes in the model's dtype (`cfg.model.dtype`), as the VAE.
    """
    loss_cfg = cfg["loss"]
    return PatchDiscriminator(
        in_channels=loss_cfg["disc_in_channels"],
        ndf=loss_cfg["disc_ch"],
        n_layers=loss_cfg["disc_num_layers"],
        spatial=spatial,
        dtype=jnp.dtype(cfg["model"]["dtype"]),
        rngs=nnx.Rngs(seed),
    )


def build_lpips(*, dtype: Any = jnp.float32, seed: int = 0) -> LPIPS:
    return LPIPS(dtype=dtype, rngs=nnx.Rngs(seed))


__all__ = [
    "LPIPS",
    "DiagonalGaussian",
    "PatchDiscriminator",
    "VideoVAE",
    "build_discriminator",
    "build_lpips",
    "build_vae",
    "content_frame_index",
    "latent_layer_norm",
]
