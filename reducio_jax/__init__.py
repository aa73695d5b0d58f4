"""reducio-jax: Reducio-VAE in JAX / Flax NNX with PyTorch-checkpoint parity."""

from reducio_jax.api import ReducioVAE, VideoLatent, load_config
from reducio_jax.config import config_from_yaml, make_config
from reducio_jax.models.posterior import DiagonalGaussian

__all__ = [
    "DiagonalGaussian",
    "ReducioVAE",
    "VideoLatent",
    "config_from_yaml",
    "load_config",
    "make_config",
]
__version__ = "0.1.0"
