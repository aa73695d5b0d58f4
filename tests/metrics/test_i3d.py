"""I3D (pytorch-i3d layout) in Flax NNX: state-dict conversion and forward parity.

The forward tests run a small input, (1, 9, 64, 64, 3), whose final feature map is
(2, 2, 2); ``avg_pool_window=(2, 2, 2)`` replaces the (2, 7, 7) pool that 224 x 224 needs.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from reducio_jax.metrics.i3d import (
    convert_i3d_state_dict,
    i3d_state_dict_shapes,
    i3d_torch_key,
    load_i3d,
    resize_video,
)

SMALL = (1, 9, 64, 64, 3)  # (B, T, H, W, C)
POOL = (2, 2, 2)


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            v = 0.5 + rng.random(shape)
        elif key.endswith("running_mean"):
            v = 0.1 * rng.standard_normal(shape)
        elif key.endswith("conv3d.weight"):
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            v = 0.1 * rng.standard_normal(shape)
        sd[key] = v.astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def shapes():
    return i3d_state_dict_shapes()


@pytest.fixture(scope="module")
def state_dict(shapes):
    return _random_state_dict(shapes)


def test_key_layout_matches_pytorch_i3d(shapes):
    # 57 Unit3D blocks with BN (conv + 4 BN tensors) and the logits conv (weight + bias).
    assert len(shapes) == 57 * 5 + 2
    assert shapes["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert shapes["Conv3d_2c_3x3.bn.running_mean"] == (192,)
    assert shapes["Mixed_3b.b1b.conv3d.weight"] == (128, 96, 3, 3, 3)
    assert shapes["Mixed_4f.b3b.conv3d.weight"] == (128, 528, 1, 1, 1)
    assert shapes["Mixed_5c.b2b.bn.weight"] == (128,)
    assert shapes["logits.conv3d.weight"] == (400, 1024, 1, 1, 1)
    assert shapes["logits.conv3d.bias"] == (400,)
    assert not any(k.startswith("logits.bn") for k in shapes)


def test_convert_roundtrip(state_dict):
    sd = {f"module.{k}": v for k, v in state_dict.items()}  # DataParallel prefix
    sd["module.Mixed_3b.b0.bn.num_batches_tracked"] = np.array(7)
    state = convert_i3d_state_dict(sd)
    n = 0
    for path, var in nnx.to_flat_state(state):
        src = state_dict[i3d_torch_key(path)]
        if src.ndim == 5:
            src = src.transpose(2, 3, 4, 1, 0)  # (O, I, T, H, W) -> (T, H, W, I, O)
        np.testing.assert_array_equal(np.asarray(var.get_value()), src)
        n += 1
    assert n == len(state_dict)


def test_convert_reports_every_problem(state_dict):
    sd = dict(state_dict)
    del sd["Mixed_4c.b1a.bn.running_var"]
    del sd["logits.conv3d.bias"]
    sd["Mixed_9z.b0.conv3d.weight"] = np.zeros((1,), np.float32)
    sd["Conv3d_2b_1x1.conv3d.weight"] = np.zeros((64, 64, 1, 1, 2), np.float32)
    with pytest.raises(ValueError) as err:
        convert_i3d_state_dict(sd)
    msg = str(err.value)
    for key in (
        "missing: Mixed_4c.b1a.bn.running_var",
        "missing: logits.conv3d.bias",
        "unused: Mixed_9z.b0.conv3d.weight",
        "mis-shaped: Conv3d_2b_1x1.conv3d.weight",
    ):
        assert key in msg


@pytest.fixture(scope="module")
def small_video():
    return np.random.default_rng(1).uniform(-1, 1, SMALL).astype(np.float32)


@pytest.fixture(scope="module")
def jax_logits(state_dict, small_video):
    model = load_i3d(state_dict, avg_pool_window=POOL)
    logits = nnx.jit(lambda m, x: m(x))(model, small_video)  # (B, T', 400)
    feats = nnx.jit(lambda m, x: m.features(x))(model, small_video)  # (B, 400)
    return np.asarray(logits), np.asarray(feats)


def test_forward_shapes(jax_logits):
    logits, feats = jax_logits
    assert logits.shape == (1, 1, 400)
    assert feats.shape == (1, 400)
    assert np.all(np.isfinite(feats))
    np.testing.assert_allclose(feats, logits.mean(axis=1), rtol=1e-6)


def test_avg_pool_too_large_raises(state_dict, small_video):
    model = load_i3d(state_dict)  # default (2, 7, 7) pool needs 224 x 224 inputs
    with pytest.raises(ValueError, match="smaller than the average pool"):
        jax.eval_shape(lambda x: model(x), small_video)


def test_reference_224_output_shape(state_dict):
    model = load_i3d(state_dict)
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((2, 16, 224, 224, 3), np.float32))
    assert out.shape == (2, 1, 400)
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 32, 224, 224, 3), np.float32))
    assert out.shape == (1, 3, 400)  # T' = 32 / 8 - 1


def _torch_i3d(pool):
    """A small torch re-implementation of the pytorch-i3d layout (eval mode), for parity."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def same(size, k, s):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        return total // 2, total - total // 2

    def pad_same(x, k, s):
        (tf, tb), (hf, hb), (wf, wb) = (same(x.shape[2 + i], k[i], s[i]) for i in range(3))
        return F.pad(x, (wf, wb, hf, hb, tf, tb))

    class Unit(nn.Module):
        def __init__(self, cin, cout, k=(1, 1, 1), s=(1, 1, 1), bn=True, bias=False, act=True):
            super().__init__()
            self.k, self.s, self.act = k, s, act
            self.conv3d = nn.Conv3d(cin, cout, k, s, padding=0, bias=bias)
            if bn:
                self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)
            self.use_bn = bn

        def forward(self, x):
            x = self.conv3d(pad_same(x, self.k, self.s))
            if self.use_bn:
                x = self.bn(x)
            return F.relu(x) if self.act else x

    def maxpool(x, k, s):
        return F.max_pool3d(pad_same(x, k, s), k, s)

    class Inception(nn.Module):
        def __init__(self, cin, o):
            super().__init__()
            self.b0 = Unit(cin, o[0])
            self.b1a, self.b1b = Unit(cin, o[1]), Unit(o[1], o[2], (3, 3, 3))
            self.b2a, self.b2b = Unit(cin, o[3]), Unit(o[3], o[4], (3, 3, 3))
            self.b3b = Unit(cin, o[5])

        def forward(self, x):
            b3 = self.b3b(maxpool(x, (3, 3, 3), (1, 1, 1)))
            return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], 1)

    class I3D(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv3d_1a_7x7 = Unit(3, 64, (7, 7, 7), (2, 2, 2))
            self.Conv3d_2b_1x1 = Unit(64, 64)
            self.Conv3d_2c_3x3 = Unit(64, 192, (3, 3, 3))
            self.Mixed_3b = Inception(192, [64, 96, 128, 16, 32, 32])
            self.Mixed_3c = Inception(256, [128, 128, 192, 32, 96, 64])
            self.Mixed_4b = Inception(480, [192, 96, 208, 16, 48, 64])
            self.Mixed_4c = Inception(512, [160, 112, 224, 24, 64, 64])
            self.Mixed_4d = Inception(512, [128, 128, 256, 24, 64, 64])
            self.Mixed_4e = Inception(512, [112, 144, 288, 32, 64, 64])
            self.Mixed_4f = Inception(528, [256, 160, 320, 32, 128, 128])
            self.Mixed_5b = Inception(832, [256, 160, 320, 32, 128, 128])
            self.Mixed_5c = Inception(832, [384, 192, 384, 48, 128, 128])
            self.logits = Unit(1024, 400, bn=False, bias=True, act=False)

        def forward(self, x):  # (B, 3, T, H, W)
            x = maxpool(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
            x = maxpool(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))
            x = maxpool(self.Mixed_3c(self.Mixed_3b(x)), (3, 3, 3), (2, 2, 2))
            for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
                x = getattr(self, name)(x)
            x = maxpool(x, (2, 2, 2), (2, 2, 2))
            x = self.Mixed_5c(self.Mixed_5b(x))
            x = self.logits(F.avg_pool3d(x, pool, stride=1))
            return x.squeeze(3).squeeze(3)  # (B, 400, T')

    return I3D().eval()


def test_forward_matches_torch_reimplementation(shapes, state_dict, small_video, jax_logits):
    torch = pytest.importorskip("torch")
    model = _torch_i3d(POOL)
    torch_sd = model.state_dict()
    # The Flax-derived key set is exactly the torch layout (plus BN step counters).
    assert {k for k in torch_sd if not k.endswith("num_batches_tracked")} == set(shapes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False)
    with torch.no_grad():
        want = model(torch.from_numpy(small_video.transpose(0, 4, 1, 2, 3))).numpy()
    got = jax_logits[0].transpose(0, 2, 1)  # (B, 400, T')
    scale = np.abs(want).max()
    assert scale > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("size", [16, 5])  # up- and down-sampling
def test_resize_video_matches_torch_bilinear(size):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    video = np.random.default_rng(2).uniform(-1, 1, (1, 2, 12, 10, 3)).astype(np.float32)
    got = np.asarray(resize_video(video, size))  # (B, T, size, size, C)
    frames = torch.from_numpy(video[0].transpose(0, 3, 1, 2))  # (T, C, H, W)
    want = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got[0], want.numpy().transpose(0, 2, 3, 1), atol=1e-5)
