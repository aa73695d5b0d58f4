"""Fréchet distance, streaming statistics and the FVD accumulator."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from reducio_jax.metrics.frechet import RunningStats, frechet_distance, gaussian_stats
from reducio_jax.metrics.fvd import FVDAccumulator


def _direct_fd(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook formula on full feature sets (float64)."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16)) / 4
    x = rng.standard_normal((200, 16)) @ mix + 0.5
    y = rng.standard_normal((150, 16)) @ (mix + 0.1 * np.eye(16)) - 0.2
    return x.astype(np.float32), y.astype(np.float32)


def test_running_stats_match_numpy_in_chunks(feats):
    x, _ = feats
    stats = RunningStats(16)
    for chunk in np.array_split(x, [1, 7, 64, 150]):  # uneven chunks, one of size 1
        stats.update(chunk)
    mu, cov = gaussian_stats(x)
    assert stats.count == 200
    np.testing.assert_allclose(stats.mean, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False), atol=1e-12)


def test_merge_and_state_dict_roundtrip(feats, tmp_path):
    x, _ = feats
    a, b = RunningStats(16).update(x[:80]), RunningStats(16).update(x[80:])
    whole = RunningStats(16).update(x)
    np.savez(tmp_path / "a.npz", **a.state_dict())
    with np.load(tmp_path / "a.npz") as data:
        restored = RunningStats.from_state_dict(dict(data))
    restored.merge(b)
    assert restored.count == whole.count
    np.testing.assert_allclose(restored.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(restored.cov, whole.cov, atol=1e-12)


def test_frechet_distance_matches_direct(feats):
    x, y = feats
    sx, sy = RunningStats(16).update(x), RunningStats(16).update(y)
    got = frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov)
    np.testing.assert_allclose(
        got, _direct_fd(x.astype(np.float64), y.astype(np.float64)), rtol=1e-8
    )
    assert got > 0.1
    np.testing.assert_allclose(sx.frechet_distance(sy), got, rtol=1e-12)


def test_frechet_distance_of_identical_gaussians_is_zero(feats):
    x, _ = feats
    mu, cov = gaussian_stats(x)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-8


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_singular_covariances_are_handled():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, 12)), rng.standard_normal((6, 12)) + 1.0  # rank < D
    mx, cx = gaussian_stats(x)
    my, cy = gaussian_stats(y)
    d = frechet_distance(mx, cx, my, cy)
    assert np.isfinite(d) and isinstance(d, float)
    assert abs(frechet_distance(mx, cx, mx, cx)) < 1e-4
    # Zero covariances (a point mass): distance is the squared mean difference.
    zero = np.zeros((12, 12))
    np.testing.assert_allclose(frechet_distance(mx, zero, my, zero), ((mx - my) ** 2).sum())


def test_input_validation():
    with pytest.raises(ValueError):
        RunningStats(4).update(np.zeros((3, 5)))
    with pytest.raises(ValueError):
        RunningStats(4).update(np.zeros((2, 4))).merge(RunningStats(3))
    with pytest.raises(ValueError):
        _ = RunningStats(4).update(np.zeros((1, 4))).cov  # needs two rows
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fvd_accumulator(feats, tmp_path):
    x, y = feats
    acc = FVDAccumulator(dim=16)
    for i in range(0, 150, 50):
        acc.update(real=x[i : i + 50], fake=y[i : i + 50])
    acc.update_real(x[150:])
    np.testing.assert_allclose(
        acc.compute(), _direct_fd(x.astype(np.float64), y.astype(np.float64)), rtol=1e-8
    )
    np.savez(tmp_path / "acc.npz", **acc.state_dict())
    with np.load(tmp_path / "acc.npz") as data:
        again = FVDAccumulator.from_state_dict(dict(data))
    assert again.real.count == 200 and again.fake.count == 150
    np.testing.assert_allclose(again.compute(), acc.compute(), rtol=1e-12)
    same = FVDAccumulator(dim=16).update(real=x, fake=x)
    assert abs(same.compute()) < 1e-8
