"""Fréchet distance between Gaussians and a streaming mean/covariance accumulator.

``frechet_distance`` follows the usual FID/FVD tools (float64, ``scipy.linalg.sqrtm``):

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))

If ``sqrtm`` fails (non-finite result, e.g. for singular covariances) the product is retried
with ``eps * I`` added to both covariances; small imaginary parts from numerical error are
dropped (a warning is emitted when they are not small).

``RunningStats`` keeps float64 sums of ``x`` and ``x x^T`` so features can be streamed in
batches, merged across hosts/shards and saved (``state_dict`` holds plain numpy arrays).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg

__all__ = ["RunningStats", "frechet_distance", "gaussian_stats"]

_IMAG_ATOL = 1e-3


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    """``sqrtm(sigma1 @ sigma2)`` (D, D), retried with an ``eps * I`` offset if not finite."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
        warnings.warn(
            f"frechet_distance: sqrtm of the covariance product is not finite; "
            f"adding {eps} to the diagonals",
            RuntimeWarning,
            stacklevel=3,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag)) if covmean.size else 0.0
        if imag > _IMAG_ATOL:
            warnings.warn(
                f"frechet_distance: sqrtm has an imaginary diagonal component {imag:.3g}; "
                "keeping the real part",
                RuntimeWarning,
                stacklevel=3,
            )
        covmean = covmean.real
    return covmean


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Squared Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    mu*: (D,), sigma*: (D, D). Computed in float64; returns a Python float.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors must both be (D,), got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"covariances must both be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm_product(sigma1, sigma2, eps)
    tr = np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(diff @ diff + tr)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    x = np.asarray(features, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


class RunningStats:
    """Streaming float64 mean / covariance of D-dimensional features.

    ``update`` takes (N, D) batches; ``mean`` is (D,), ``cov`` (D, D) is unbiased (divides by
    ``count - 1``), like ``np.cov(x, rowvar=False)`` of all rows seen.
    """

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"feature dim must be positive, got {dim}")
        self.dim = int(dim)
        self.count = 0
        self.sum = np.zeros((self.dim,), np.float64)  # (D,)
        self.sum_outer = np.zeros((self.dim, self.dim), np.float64)  # (D, D)

    def update(self, features: Any) -> RunningStats:
        """Add a batch of features (N, D) (any array type numpy can read); returns self."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or Inf")
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        return self

    def merge(self, other: RunningStats) -> RunningStats:
        """Add the statistics of ``other`` (same dim) into self; returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    @property
    def mean(self) -> np.ndarray:
        """(D,) float64 mean of all features seen."""
        if self.count < 1:
            raise ValueError("RunningStats.mean needs at least one feature vector")
        return self.sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """(D, D) float64 unbiased covariance of all features seen."""
        if self.count < 2:
            raise ValueError("RunningStats.cov needs at least two feature vectors")
        mu = self.mean
        cov = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return 0.5 * (cov + cov.T)  # exact symmetry despite rounding

    def frechet_distance(self, other: RunningStats, eps: float = 1e-6) -> float:
        """Fréchet distance between the Gaussians fitted to self and ``other``."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov, eps=eps)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (e.g. for ``np.savez``)."""
        return {
            "dim": np.asarray(self.dim, np.int64),
            "count": np.asarray(self.count, np.int64),
            "sum": self.sum.copy(),
            "sum_outer": self.sum_outer.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RunningStats:
        """Inverse of :meth:`state_dict`."""
        missing = {"dim", "count", "sum", "sum_outer"} - set(state)
        if missing:
            raise KeyError(f"RunningStats state is missing {sorted(missing)}")
        stats = cls(int(np.asarray(state["dim"])))
        d = stats.dim
        s, so = np.asarray(state["sum"], np.float64), np.asarray(state["sum_outer"], np.float64)
        if s.shape != (d,) or so.shape != (d, d):
            raise ValueError(
                f"RunningStats state shapes {s.shape}, {so.shape} do not match dim {d}"
            )
        stats.count = int(np.asarray(state["count"]))
        stats.sum = s.copy()
        stats.sum_outer = so.copy()
        return stats

    def __repr__(self) -> str:
        return f"RunningStats(dim={self.dim}, count={self.count})"
