"""Fréchet Video Distance from streamed I3D features.

Feed (N, D) feature batches of real and generated videos (e.g. ``InceptionI3d.features``,
D = 400) into ``FVDAccumulator``; ``compute()`` fits a Gaussian to each set and returns the
Fréchet distance between them. The accumulator can be merged across shards and saved.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reducio_jax.metrics.frechet import RunningStats
from reducio_jax.metrics.i3d import I3D_FEATURE_DIM

__all__ = ["FVDAccumulator"]


class FVDAccumulator:
    """Two ``RunningStats`` (real, fake) over D-dimensional video features."""

    def __init__(self, dim: int = I3D_FEATURE_DIM) -> None:
        self.real = RunningStats(dim)
        self.fake = RunningStats(dim)

    @property
    def dim(self) -> int:
        return self.real.dim

    def update_real(self, features: Any) -> FVDAccumulator:
        """Add real-video features (N, D); returns self."""
        self.real.update(np.asarray(features))
        return self

    def update_fake(self, features: Any) -> FVDAccumulator:
        """Add generated-video features (N, D); returns self."""
        self.fake.update(np.asarray(features))
        return self

    def update(self, real: Any | None = None, fake: Any | None = None) -> FVDAccumulator:
        """Add either or both feature batches (N, D); returns self."""
        if real is not None:
            self.update_real(real)
        if fake is not None:
            self.update_fake(fake)
        return self

    def merge(self, other: FVDAccumulator) -> FVDAccumulator:
        """Add the statistics of another accumulator; returns self."""
        self.real.merge(other.real)
        self.fake.merge(other.fake)
        return self

    def compute(self, eps: float = 1e-6) -> float:
        """FVD: Fréchet distance between the real and fake feature Gaussians."""
        return self.real.frechet_distance(self.fake, eps=eps)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays (``real/...``, ``fake/...``), e.g. for ``np.savez``."""
        out = {f"real/{k}": v for k, v in self.real.state_dict().items()}
        out.update({f"fake/{k}": v for k, v in self.fake.state_dict().items()})
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FVDAccumulator:
        """Inverse of :meth:`state_dict`."""
        acc = cls.__new__(cls)
        for part in ("real", "fake"):
            sub = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{part}/")}
            setattr(acc, part, RunningStats.from_state_dict(sub))
        if acc.real.dim != acc.fake.dim:
            raise ValueError(f"real/fake feature dims differ: {acc.real.dim} vs {acc.fake.dim}")
        return acc

    def __repr__(self) -> str:
        return f"FVDAccumulator(dim={self.dim}, real={self.real.count}, fake={self.fake.count})"
