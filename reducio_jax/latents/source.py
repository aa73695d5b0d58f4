"""`LatentSource`: a Grain random-access data source over a latent store, for diffusion training.

```python
import grain
from reducio_jax.latents import LatentSource
source = LatentSource("latents/ucf101", arrays=("latent", "content"))
ds = grain.MapDataset.source(source).shuffle(seed=0).batch(32)
ds[0]["latent"]        # (32, t, h, w, z) float32, ds[0]["content"] (32, H, W, 3) uint8
```

Items are dicts of numpy arrays: the requested arrays of one clip plus ``index`` (the
record index in the encoded dataset). Unreadable clips (``valid`` False) are left out.

Over a store of whole videos (``encode --whole_videos``) an item is one 16-frame **window**
of a video: its ``latent`` (t, h, w, z) and ``content`` frame (H', W', 3) plus ``index`` (the
video's record index), ``window`` (its position in the video's window table) and ``start``
(its first frame), so a diffusion model can sample windows. Videos of different frame sizes
give windows of different shapes (encode with ``--resolution`` for one shape to batch).

TensorStore handles are opened lazily in each process, so the source pickles into Grain
worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from reducio_jax.latents.store import VIDEOS, LatentStore, StoreError


class LatentSource:
    """``len(src)`` stored clips (or windows of whole videos); ``src[i]`` -> {name: array for
    name in arrays, "index": int64} (and "window", "start" for whole videos)."""

    def __init__(
        self,
        root: str | os.PathLike,
        arrays: Sequence[str] = ("latent", "content"),
        *,
        allow_partial: bool = False,
    ) -> None:
        self.store = LatentStore(root, allow_partial=allow_partial)
        missing = [a for a in arrays if a not in self.store.arrays]
        if missing:
            raise StoreError(
                f"{root} has no {missing} array(s); it has {sorted(self.store.arrays)} "
                "(mean/logvar need encode --save_moments)"
            )
        self.arrays = tuple(arrays)
        if self.store.kind == VIDEOS:
            self._windows = [
                (shard, video, k, int(start))
                for shard, video in self.store.videos()
                for k, start in enumerate(video["starts"])
            ]
            self._rows = []
        else:
            self._windows = []
            self._rows = [(s, row, int(clip["index"])) for s, row, clip in self.store.entries()]

    def __len__(self) -> int:
        return len(self._windows) or len(self._rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"LatentSource index {i} out of range for {n} items")
        if self._windows:
            return self._window(int(i))
        shard, row, index = self._rows[int(i)]
        item = {name: self.store.read(shard, row, name) for name in self.arrays}
        item["index"] = np.int64(index)
        return item

    def _window(self, i: int) -> dict[str, np.ndarray]:
        shard, video, k, start = self._windows[i]
        item = {
            name: self.store.read_windows(shard, video, name, k, k + 1)[0] for name in self.arrays
        }
        item.update(index=np.int64(video["index"]), window=np.int64(k), start=np.int64(start))
        return item

    @property
    def meta(self) -> dict:
        """The store's store.json (video size, fps, model config, ...)."""
        return self.store.meta

    def __repr__(self) -> str:
        return f"LatentSource({str(self.store.root)!r}, arrays={self.arrays}, len={len(self)})"


__all__ = ["LatentSource"]
