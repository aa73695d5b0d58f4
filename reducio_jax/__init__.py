"""reducio-jax: Reducio-VAE in JAX / Flax NNX with PyTorch-checkpoint parity."""

from reducio_jax.models import host_memory

if host_memory.runs_on_cpu():
    host_memory.reuse_freed_memory()  # before JAX's threads first allocate (host_memory.py)

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
