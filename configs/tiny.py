"""The tiny Reducio-VAE of the parity fixtures (width 32): for tests, demos and CPU runs."""

from reducio_jax.config import make_config
from reducio_jax.official import tiny_params


def get_config():
    cfg = make_config(tiny_params())
    cfg.data.resolution = 64
    cfg.data.batch_size = 2
    return cfg
