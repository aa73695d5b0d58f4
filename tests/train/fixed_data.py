"""A loader of fixed random batches (the same global batch for any number of processes)."""

from __future__ import annotations

import jax
import numpy as np

from reducio_jax.sharding import batch_sharding


class FixedData:
    """Batch n is uniform noise from seed n, split over the mesh like the real loader's."""

    def __init__(self, data_cfg, *, mesh, train: bool = True):
        res = int(data_cfg.resolution)
        self.shape = (int(data_cfg.batch_size), int(data_cfg.num_frames), res, res, 3)
        self.sharding = batch_sharding(mesh)
        self.count = 0

    def __next__(self) -> dict:
        video = np.random.default_rng(self.count).uniform(-1, 1, self.shape).astype(np.float32)
        b = self.shape[0]
        index = np.arange(self.count * b, (self.count + 1) * b, dtype=np.int32)
        self.count += 1
        put = lambda a: jax.make_array_from_callback(a.shape, self.sharding, lambda i: a[i])  # noqa: E731
        return {"video": put(video), "index": put(index)}

    def get_state(self) -> dict:
        return {"count": self.count}
