"""Reducio-VAE ft2 weights with spatial tiling for 1024px frames."""

from reducio_jax.config import make_config
from reducio_jax.official import reducio_params


def get_config():
    return make_config(reducio_params(f_t=1, resolution=1024, use_tiling=True))
