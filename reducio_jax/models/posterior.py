"""The diagonal Gaussian posterior over the motion latent and the latent LayerNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from reducio_jax.models.layers import standardize


@struct.dataclass
class DiagonalGaussian:
    """q(z | x) with `mean` and `logvar` of shape (B, t, h, w, z), logvar clamped to [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        # moments: (B, t, h, w, 2z) -> mean and logvar, split along channels
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        eps = jax.random.normal(rng, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.sample_with_noise(eps)

    def sample_with_noise(self, eps: jax.Array) -> jax.Array:
        return self.mean + self.std * eps

    def kl(self) -> jax.Array:
        """KL to the standard normal, summed over all non-batch axes: (B,)."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        terms = jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


def latent_layer_norm(z: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """Normalises each sample over all of (t, h, w, z), with no affine parameters."""
    return standardize(z, tuple(range(1, z.ndim)), epsilon).astype(z.dtype)
