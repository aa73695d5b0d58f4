"""Inflated 3D ConvNet (Inception-v1 I3D, Kinetics-400) in Flax NNX, for FVD features.

Layout and behaviour follow the ``InceptionI3d`` of piergiaj/pytorch-i3d (itself a port of
deepmind/kinetics-i3d), in eval mode, with channels-last tensors:

* ``Unit3D``: Conv3d (no bias) + BatchNorm3d (eps 1e-3, running statistics) + ReLU, with
  TensorFlow "SAME" padding computed per dimension from the input size (``pad = k - s`` when
  the size is divisible by the stride, else ``k - size % s``; the extra pixel goes at the end).
  This is exactly JAX's ``"SAME"`` padding, so the convolution uses it directly.
* ``MaxPool3dSamePadding``: the same padding, filled with zeros, then a VALID max pool.
* Inception modules ``Mixed_3b`` .. ``Mixed_5c`` (branches ``b0``, ``b1a/b1b``, ``b2a/b2b``,
  ``b3a`` max pool + ``b3b``), concatenated on channels.
* ``AvgPool3d`` (2, 7, 7), stride 1, VALID; dropout (identity: this model is inference only);
  ``logits``: 1x1x1 Conv3d with bias, no BN, no activation.

``__call__`` returns per-time logits ``(B, T', 400)``; ``features`` averages them over time,
which is the 400-d pre-softmax vector FVD tools use (StyleGAN-V's ``i3d_torchscript.pt`` called
with ``return_features=True``). That torchscript file holds the TF-Hub I3D weights; convert
them (or pytorch-i3d's ``rgb_imagenet.pt``) to the pytorch-i3d key layout and load them with
``convert_i3d_state_dict`` / ``load_i3d``.

Inputs are ``(B, T, H, W, 3)`` RGB in ``[-1, 1]``, nominally 224 x 224 and T >= 9 so that the
final feature map is at least (2, 7, 7). Other sizes work when ``avg_pool_window`` is set to
fit the final map (e.g. ``(2, 2, 2)`` for 64 x 64 inputs); the tests use that to stay small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reducio_jax.sharding import abstract_model, materialize

__all__ = [
    "I3D_FEATURE_DIM",
    "I3D_INPUT_SIZE",
    "InceptionI3d",
    "InceptionModule",
    "Unit3D",
    "convert_i3d_state_dict",
    "i3d_state_dict_shapes",
    "i3d_torch_key",
    "load_i3d",
    "max_pool_3d_same",
    "resize_video",
]

I3D_FEATURE_DIM = 400
I3D_INPUT_SIZE = 224
BN_EPS = 1e-3

Triple = tuple[int, int, int]

# (name, in_channels, [b0, b1a, b1b, b2a, b2b, b3b]) of the Inception modules.
_INCEPTION_SPECS: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)

# Max pools between stages: name -> (kernel, stride), inserted before the named end point.
_MAX_POOLS: dict[str, tuple[Triple, Triple]] = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}

# Order of the end points (as pytorch-i3d's VALID_ENDPOINTS, up to Mixed_5c).
_ENDPOINTS: tuple[str, ...] = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (front, back) for one dimension, as pytorch-i3d computes it."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def max_pool_3d_same(x: jax.Array, kernel: Triple, stride: Triple) -> jax.Array:
    """Zero-padded "SAME" max pool: ``(B, T, H, W, C) -> (B, ceil(T/st), ceil(H/sh), ceil(W/sw), C)``."""
    pads = [_same_pads(s, k, st) for s, k, st in zip(x.shape[1:4], kernel, stride, strict=True)]
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, *kernel, 1), (1, *stride, 1), "VALID"
    )


class Unit3D(nnx.Module):
    """Conv3d ("SAME") [+ BatchNorm3d (eval)] [+ ReLU]: ``(B, T, H, W, I) -> (B, T', H', W', O)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        *,
        use_batch_norm: bool = True,
        use_bias: bool = False,
        activation: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        self.conv3d = nnx.Conv(
            in_channels,
            out_channels,
            kernel_size=kernel,
            strides=stride,
            padding="SAME",
            use_bias=use_bias,
            rngs=rngs,
        )
        self.bn = (
            nnx.BatchNorm(out_channels, use_running_average=True, epsilon=BN_EPS, rngs=rngs)
            if use_batch_norm
            else None
        )
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return jax.nn.relu(x) if self.activation else x


class InceptionModule(nnx.Module):
    """Four-branch Inception block: ``(B, T, H, W, I) -> (B, T, H, W, b0 + b1b + b2b + b3b)``."""

    def __init__(self, in_channels: int, out: Sequence[int], *, rngs: nnx.Rngs) -> None:
        self.b0 = Unit3D(in_channels, out[0], rngs=rngs)
        self.b1a = Unit3D(in_channels, out[1], rngs=rngs)
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3), rngs=rngs)
        self.b2a = Unit3D(in_channels, out[3], rngs=rngs)
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3), rngs=rngs)
        self.b3b = Unit3D(in_channels, out[5], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.b0(x)
        b1 = self.b1b(self.b1a(x))
        b2 = self.b2b(self.b2a(x))
        b3 = self.b3b(max_pool_3d_same(x, (3, 3, 3), (1, 1, 1)))  # b3a
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nnx.Module):
    """Inception-v1 I3D (eval mode). ``(B, T, H, W, 3)`` in [-1, 1] -> logits ``(B, T', classes)``.

    At 224 x 224 and T frames, ``T' = ceil(T / 8) - 1``.
    """

    def __init__(
        self,
        num_classes: int = I3D_FEATURE_DIM,
        in_channels: int = 3,
        avg_pool_window: Triple = (2, 7, 7),
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = num_classes
        self.avg_pool_window = tuple(avg_pool_window)
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
        for name, cin, out in _INCEPTION_SPECS:
            setattr(self, name, InceptionModule(cin, out, rngs=rngs))
        self.logits = Unit3D(
            1024,
            num_classes,
            use_batch_norm=False,
            use_bias=True,
            activation=False,
            rngs=rngs,
        )

    def trunk(self, x: jax.Array) -> jax.Array:
        """Layers up to Mixed_5c: ``(B, T, H, W, 3) -> (B, ~T/8, ~H/32, ~W/32, 1024)``."""
        for name in _ENDPOINTS:
            if name in _MAX_POOLS:
                x = max_pool_3d_same(x, *_MAX_POOLS[name])
            else:
                x = getattr(self, name)(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.trunk(x)  # (B, t, h, w, 1024)
        win = self.avg_pool_window
        if any(s < k for s, k in zip(x.shape[1:4], win, strict=True)):
            raise ValueError(
                f"final feature map {x.shape[1:4]} is smaller than the average pool {win}; "
                "use 224 x 224 inputs with T >= 9, or set avg_pool_window"
            )
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *win, 1), (1, 1, 1, 1, 1), "VALID")
        x = x / float(np.prod(win))  # (B, t', h', w', 1024); dropout is identity in eval
        x = self.logits(x)  # (B, t', h', w', classes)
        if x.shape[2:4] != (1, 1):
            raise ValueError(f"logits are not spatially 1x1 (got {x.shape[2:4]}); check input size")
        return x[:, :, 0, 0, :]  # (B, t', classes)

    def features(self, x: jax.Array) -> jax.Array:
        """FVD features: logits averaged over time, ``(B, T, H, W, 3) -> (B, classes)``."""
        return jnp.mean(self(x), axis=1)


def resize_video(video: jax.Array, size: int = I3D_INPUT_SIZE) -> jax.Array:
    """Bilinear per-frame resize ``(B, T, H, W, C) -> (B, T, size, size, C)``.

    Half-pixel centres, no antialiasing (like ``F.interpolate(..., align_corners=False)``).
    """
    b, t, _, _, c = video.shape
    return jax.image.resize(video, (b, t, size, size, c), method="linear", antialias=False)


# --------------------------------------------------------------------------- conversion

# Flax leaf name -> (pytorch-i3d leaf name, transform) for each sub-module kind.
_LEAF_MAP: dict[tuple[str, str], str] = {
    ("conv3d", "kernel"): "conv3d.weight",
    ("conv3d", "bias"): "conv3d.bias",
    ("bn", "scale"): "bn.weight",
    ("bn", "bias"): "bn.bias",
    ("bn", "mean"): "bn.running_mean",
    ("bn", "var"): "bn.running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_STRIP_PREFIXES = ("module.", "i3d.")


def i3d_torch_key(path: Sequence[Any]) -> str:
    """pytorch-i3d state-dict key of a Flax state path, e.g.

    ``('Mixed_3b', 'b1a', 'conv3d', 'kernel') -> 'Mixed_3b.b1a.conv3d.weight'``.
    """
    path = [str(p) for p in path]
    leaf = _LEAF_MAP.get((path[-2], path[-1]))
    if leaf is None:
        raise KeyError(f"no pytorch-i3d name for Flax path {'/'.join(path)}")
    return ".".join([*path[:-2], leaf])


def _to_flax(key: str, value: np.ndarray) -> np.ndarray:
    """Conv weights (O, I, T, H, W) -> (T, H, W, I, O); other tensors unchanged."""
    if key.endswith("conv3d.weight"):
        return np.transpose(value, (2, 3, 4, 1, 0))
    return value


def _expected_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Torch-side shape of a tensor whose Flax shape is ``flax_shape``."""
    if key.endswith("conv3d.weight"):
        t, h, w, i, o = flax_shape
        return (o, i, t, h, w)
    return tuple(flax_shape)


def _clean_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Strip wrapper prefixes, drop BN step counters, convert values to numpy."""
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.rsplit(".", 1)[-1] in _IGNORED_SUFFIXES:
            continue
        out[key] = np.asarray(value)
    return out


def _abstract(**kwargs: Any) -> tuple[nnx.GraphDef, nnx.State]:
    return abstract_model(lambda: InceptionI3d(rngs=nnx.Rngs(0), **kwargs))


def i3d_state_dict_shapes(num_classes: int = I3D_FEATURE_DIM) -> dict[str, tuple[int, ...]]:
    """Every pytorch-i3d key this model loads -> its torch shape (conv: (O, I, T, H, W))."""
    _, state = _abstract(num_classes=num_classes)
    return {
        (key := i3d_torch_key(path)): _expected_shape(key, tuple(var.shape))
        for path, var in nnx.to_flat_state(state)
    }


def convert_i3d_state_dict(
    sd: Mapping[str, Any], num_classes: int = I3D_FEATURE_DIM, dtype: Any = np.float32
) -> nnx.State:
    """Map a pytorch-i3d ``InceptionI3d`` state dict (numpy arrays) onto this model's state.

    Accepts keys prefixed with ``module.``; ignores ``*.num_batches_tracked``. Raises
    ``ValueError`` naming every missing, unused and mis-shaped key. The result can be applied
    with ``nnx.update(model, state)``.
    """
    src = _clean_state_dict(sd)
    _, state = _abstract(num_classes=num_classes)
    missing, bad_shape, used = [], [], set()
    values: dict[tuple[Any, ...], np.ndarray] = {}
    for path, var in nnx.to_flat_state(state):
        key = i3d_torch_key(path)
        if key not in src:
            missing.append(key)
            continue
        used.add(key)
        want = _expected_shape(key, tuple(var.shape))
        if tuple(src[key].shape) != want:
            bad_shape.append(f"{key}: got {tuple(src[key].shape)}, expected {want}")
            continue
        values[tuple(path)] = _to_flax(key, src[key]).astype(dtype)
    unused = sorted(set(src) - used)
    if missing or unused or bad_shape:
        lines = ["pytorch-i3d state dict does not match InceptionI3d:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unused: {k}" for k in unused]
        lines += [f"  mis-shaped: {k}" for k in bad_shape]
        raise ValueError("\n".join(lines))
    return materialize(state, values)


def load_i3d(
    sd: Mapping[str, Any], num_classes: int = I3D_FEATURE_DIM, **kwargs: Any
) -> InceptionI3d:
    """Build an ``InceptionI3d`` holding a pytorch-i3d state dict (no random init is run)."""
    graphdef, _ = _abstract(num_classes=num_classes, **kwargs)
    return nnx.merge(graphdef, convert_i3d_state_dict(sd, num_classes=num_classes))
