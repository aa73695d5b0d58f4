"""Reducio-VAE ft4 weights with spatial tiling for 1024px frames."""

from configs._official import reducio_params
from reducio_jax.config import make_config


def get_config():
    return make_config(reducio_params(f_t=2, resolution=1024, use_tiling=True))
