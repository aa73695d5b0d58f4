"""Reducio-VAE 2x temporal compression (16x8x8x8 latents at 256px)."""

from configs._official import reducio_params
from reducio_jax.config import make_config


def get_config():
    return make_config(reducio_params(f_t=1, resolution=256, use_tiling=False))
