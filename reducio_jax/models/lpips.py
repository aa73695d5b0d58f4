"""LPIPS (VGG16 features, unit-normalised, 5 learned linear heads), channels-last, eval mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reducio_jax.models.layers import Buffer, Dtype, dense, same_conv

# (in, out) channels of VGG16's 13 convs; a 2x2 max-pool precedes slices 2-5.
VGG16_CONVS = (
    (3, 64),
    (64, 64),
    (64, 128),
    (128, 128),
    (128, 256),
    (256, 256),
    (256, 256),
    (256, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
)
SLICE_ENDS = (2, 4, 7, 10, 13)  # the feature after conv SLICE_ENDS[i] - 1 feeds head i
# position of each conv in torchvision's `vgg16().features`
VGG16_FEATURE_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def _unit_normalize(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


def _max_pool(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
    """Perceptual distance between image batches (N, H, W, 3) in [-1, 1] -> (N,)."""

    def __init__(
        self, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vgg = nnx.data([same_conv(cin, cout, 2, **kw) for cin, cout in VGG16_CONVS])
        widths = [VGG16_CONVS[end - 1][1] for end in SLICE_ENDS]
        self.lins = nnx.data(
            [dense(c, 1, use_bias=False, axes=("embed", None), **kw) for c in widths]
        )
        self.shift = Buffer(jnp.asarray(SHIFT))
        self.input_scale = Buffer(jnp.asarray(SCALE))
        self.dtype = dtype

    def features(self, x: jax.Array) -> list[jax.Array]:
        h = ((x.astype(jnp.float32) - self.shift[...]) / self.input_scale[...]).astype(self.dtype)
        feats, start = [], 0
        for end in SLICE_ENDS:
            if start:
                h = _max_pool(h)
            for conv_layer in self.vgg[start:end]:
                h = jax.nn.relu(conv_layer(h))
            feats.append(h)
            start = end
        return feats

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        n = x.shape[0]
        feats = self.features(jnp.concatenate([x, y], axis=0))
        total = jnp.zeros((n,), jnp.float32)
        for feat, lin in zip(feats, self.lins, strict=True):
            f = _unit_normalize(feat.astype(jnp.float32))
            diff = jnp.square(f[:n] - f[n:])
            total = total + jnp.mean(
                lin(diff.astype(self.dtype)).astype(jnp.float32), axis=(1, 2, 3)
            )
        return total
