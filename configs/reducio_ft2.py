"""Reducio-VAE 2x temporal compression (16x8x8x8 latents at 256px)."""

from reducio_jax.config import make_config
from reducio_jax.official import reducio_params


def get_config():
    return make_config(reducio_params(f_t=1, resolution=256, use_tiling=False))
