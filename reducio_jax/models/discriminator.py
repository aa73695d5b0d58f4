"""PatchGAN discriminators (3D over videos, 2D over frames) with torch-style BatchNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.models.layers import Dtype, conv


class BatchNorm(nnx.Module):
    """`torch.nn.BatchNorm{2,3}d` semantics over channels-last inputs.

    Training: normalises with the batch mean and biased variance (over every axis but channels;
    under `jit` on a sharded batch these are global-batch statistics) and updates the running
    mean and the running *unbiased* variance with momentum 0.1. Eval (`use_running_average`):
    normalises with the running statistics.
    """

    def __init__(
        self,
        features: int,
        *,
        momentum: float = 0.1,
        epsilon: float = 1e-5,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = nnx.Param(
            1.0 + 0.02 * jax.random.normal(rngs.params(), (features,), param_dtype),
            out_sharding=("norm",),
        )
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=("norm",))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            count = x.size // x.shape[-1]
            unbiased = var * count / max(count - 1, 1)
            m = self.momentum
            # set_value, not `[...] =`: flax's indexed assignment reads a traced value's
            # `sharding`, whose error message walks the whole jaxpr (~80 ms a call when
            # tracing the training step: its trace took 7.4 s with `[...] =`, 4.5 s without)
            self.mean.set_value((1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean))
            self.var.set_value((1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased))
            self.num_batches_tracked.set_value(self.num_batches_tracked[...] + 1)
        out = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        out = out * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return out.astype(x.dtype)


def _gan_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return 0.02 * jax.random.normal(key, shape, dtype)


class PatchDiscriminator(nnx.Module):
    """Pix2Pix PatchGAN: strided 4x4(x4) convs with BatchNorm and LeakyReLU(0.2), 1-channel map.

    `spatial=3` is the reference's 3D discriminator on (B, T, H, W, 3): its last stride-2 conv
    uses a (3, 4, 4) kernel and its two stride-1 convs (1, 4, 4) kernels. `spatial=2` is the
    image discriminator on (B, H, W, 3).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        spatial: int = 3,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        def make(cin: int, cout: int, kernel, stride: int, pad, bias: bool) -> nnx.Conv:
            layer = conv(
                cin,
                cout,
                kernel,
                stride=stride,
                padding=pad,
                use_bias=bias,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            layer.kernel.set_value(_gan_init(rngs.params(), layer.kernel.shape, param_dtype))
            return layer

        full = lambda k: (k,) * spatial  # noqa: E731
        pad1 = [(1, 1)] * spatial
        flat_kernel = (1, 4, 4) if spatial == 3 else (4, 4)
        flat_pad = [(0, 0), (1, 1), (1, 1)] if spatial == 3 else pad1
        convs = [make(in_channels, ndf, full(4), 2, pad1, True)]
        norms = []
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            kernel = (3, 4, 4) if spatial == 3 and n == n_layers - 1 else full(4)
            convs.append(make(ndf * prev, ndf * mult, kernel, 2, pad1, False))
            norms.append(BatchNorm(ndf * mult, param_dtype=param_dtype, rngs=rngs))
        prev, mult = mult, min(2**n_layers, 8)
        convs.append(make(ndf * prev, ndf * mult, flat_kernel, 1, flat_pad, False))
        norms.append(BatchNorm(ndf * mult, param_dtype=param_dtype, rngs=rngs))
        convs.append(make(ndf * mult, 1, flat_kernel, 1, flat_pad, True))
        self.convs = nnx.data(convs)
        self.norms = nnx.data(norms)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.convs[0](x.astype(self.dtype)), 0.2)
        for conv_layer, norm in zip(self.convs[1:-1], self.norms, strict=True):
            h = jax.nn.leaky_relu(norm(conv_layer(h)), 0.2)
        return self.convs[-1](h)  # (B, [T',] H', W', 1) logits


def torch_layer_index(kind: str, position: int) -> int:
    """Index in the reference's `main` Sequential of the `position`-th conv or norm layer."""
    if kind == "convs":
        return 0 if position == 0 else 3 * position - 1
    return 3 * (position + 1)
