"""PSNR / SSIM parity with the Reducio reference (``ldm/util.py``) fixtures."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from reducio_jax.metrics.image import (
    psnr,
    psnr_per_image,
    ssim,
    ssim_downsample_factor,
    ssim_per_image,
    to_unit_nhwc,
)

RTOL = 1e-4


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    with np.load(fixtures_dir / "golden_metrics.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("suffix", ["", "512"])
def test_psnr_matches_reference(golden, suffix):
    a = to_unit_nhwc(golden[f"a{suffix}_u8"])  # (N, H, W, 3)
    b = to_unit_nhwc(golden[f"b{suffix}_u8"])
    got = float(jax.jit(psnr)(b, a))
    np.testing.assert_allclose(got, golden[f"psnr{suffix}"], rtol=RTOL)


@pytest.mark.parametrize("suffix", ["", "512"])
def test_ssim_matches_reference(golden, suffix):
    a = to_unit_nhwc(golden[f"a{suffix}_u8"])
    b = to_unit_nhwc(golden[f"b{suffix}_u8"])
    got = float(jax.jit(ssim)(b, a))
    np.testing.assert_allclose(got, golden[f"ssim{suffix}"], rtol=RTOL)


def test_per_image_variants_average_to_batch_metric(golden):
    a, b = to_unit_nhwc(golden["a_u8"]), to_unit_nhwc(golden["b_u8"])
    p, s = psnr_per_image(b, a), ssim_per_image(b, a)
    assert p.shape == s.shape == (a.shape[0],)
    np.testing.assert_allclose(np.mean(p), psnr(b, a), rtol=1e-6)
    np.testing.assert_allclose(np.mean(s), ssim(b, a), rtol=1e-6)
    # Each image on its own gives the same value as inside the batch.
    np.testing.assert_allclose(ssim_per_image(b[1:2], a[1:2])[0], s[1], rtol=1e-6)


def test_identical_images():
    x = np.random.default_rng(0).random((2, 32, 40, 3), dtype=np.float32)
    np.testing.assert_allclose(psnr(x, x), 80.0, rtol=1e-6)  # -10 log10(1e-8)
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-5)


def test_downsample_factor_uses_python_round():
    assert ssim_downsample_factor(64, 64) == 1
    assert ssim_downsample_factor(383, 1000) == 1
    assert ssim_downsample_factor(384, 1000) == 2  # round(1.5) == 2
    assert ssim_downsample_factor(640, 640) == 2  # round(2.5) == 2 (banker's rounding)
    assert ssim_downsample_factor(700, 720) == 3


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError):
        ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))  # smaller than the 11x11 window


def _torch_ssim(x, y):
    """The reference algorithm, NCHW in torch (written for this test from ldm/util.py)."""
    import torch
    import torch.nn.functional as F

    f = max(1, round(min(x.shape[-2:]) / 256))
    if f > 1:
        x, y = F.avg_pool2d(x, f), F.avg_pool2d(y, f)
    coords = torch.arange(11, dtype=x.dtype) - 5.0
    g = torch.exp(-(coords[None] ** 2 + coords[:, None] ** 2) / (2 * 1.5**2))
    k = (g / g.sum())[None, None].repeat(x.shape[1], 1, 1, 1)

    def filt(v):
        return F.conv2d(v, k, groups=x.shape[1])

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ss = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs
    return ss.mean(dim=(-1, -2)).mean(1).mean(0).item()


@pytest.mark.parametrize("hw", [(37, 50), (300, 383)])  # f = 1 for both
def test_ssim_matches_torch_on_odd_sizes(hw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.random((2, 3, *hw), dtype=np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape, dtype=np.float32), 0, 1)
    want = _torch_ssim(torch.from_numpy(y), torch.from_numpy(x))
    got = float(ssim(y.transpose(0, 2, 3, 1), x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_ssim_matches_torch_with_floor_pooling():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.random((1, 3, 401, 397), dtype=np.float32)  # f = 2, odd sizes are floored
    y = np.clip(x + 0.05 * rng.standard_normal(x.shape, dtype=np.float32), 0, 1)
    assert ssim_downsample_factor(401, 397) == 2
    want = _torch_ssim(torch.from_numpy(y), torch.from_numpy(x))
    got = float(ssim(y.transpose(0, 2, 3, 1), x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, want, rtol=RTOL)
