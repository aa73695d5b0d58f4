"""Reducio-VAE 4x temporal compression (16x4x8x8 latents at 256px)."""

from reducio_jax.config import make_config
from reducio_jax.official import reducio_params


def get_config():
    return make_config(reducio_params(f_t=2, resolution=256, use_tiling=False))
