"""Random-access clip sources: ``len(src)`` records, ``src.load(i, rng)`` -> (T, H, W, 3) uint8.

``load`` raises :class:`BadVideoError` for a record that cannot be used; the pipeline
replaces it. Sources are pickled into Grain worker processes, so they hold only paths and
open their readers lazily.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds

from reducio_jax.data.errors import BadVideoError, DataError
from reducio_jax.data.synthetic import synthetic_clip
from reducio_jax.data.video import ClipSpec, decode_clip, find_videos, resize_and_crop

log = logging.getLogger(__name__)


class ClipSource(Protocol):
    """What the pipeline needs from a source."""

    def __len__(self) -> int: ...

    def load(self, index: int, rng: np.random.Generator | None) -> np.ndarray: ...

    def name(self, index: int) -> str: ...


class FolderSource:
    """Local video files (a folder searched recursively, or a list file), decoded by PyAV."""

    def __init__(self, path: str, spec: ClipSpec):
        listing = find_videos(path)
        self.files = listing.videos
        self.spec = spec
        if listing.passed_over:  # named once, not passed over in silence
            names = [f"{name} ({reason})" for name, reason in listing.passed_over]
            more = f", and {len(names) - 3} more" if len(names) > 3 else ""
            log.warning(
                "%s: %d file(s) not read: %s%s",
                path, len(names), "; ".join(names[:3]), more,
            )  # fmt: skip

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        return decode_clip(self.files[index], self.spec, rng)  # (T, H, W, 3)

    def name(self, index: int) -> str:
        return self.files[index]


class SyntheticSource:
    """``size`` procedurally rendered clips, each a pure function of ``(seed, index)``."""

    def __init__(self, size: int, spec: ClipSpec, seed: int = 0):
        if size <= 0:
            raise DataError(f"data.synthetic_size is {size}: set it to a positive clip count.")
        self.size, self.spec, self.seed = size, spec, seed

    def __len__(self) -> int:
        return self.size

    def load(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        s = self.spec
        return synthetic_clip(
            index, seed=self.seed, num_frames=s.num_frames, height=s.height, width=s.width
        )

    def name(self, index: int) -> str:
        return f"synthetic/{index}"


class TfdsSource:
    """A TFDS dataset read by ``tfds.data_source`` (ArrayRecord, random access).

    The video feature is the one called ``video``, else the first rank-4 feature with 3
    channels; records must be (T0, H0, W0, 3) uint8 with ``T0 >= num_frames``, stored at
    ``spec.fps``. Train clips start at a random frame, eval clips at frame 0.
    """

    def __init__(self, name: str, data_dir: str, split: str, spec: ClipSpec):
        self.tfds_name, self.data_dir, self.split, self.spec = name, data_dir, split, spec
        self._ds: Any = None
        ds = self._open()
        self._len = len(ds)
        self.key = _video_key(ds)
        self.id_key = _id_key(ds)
        if self._len == 0:
            raise DataError(
                f"TFDS split '{split}' of '{name}' in '{data_dir}' is empty: "
                "build it with reducio_jax.data.build_tfds_dataset or pick another split."
            )

    def _open(self) -> Any:
        if self._ds is None:
            self._ds = _open_tfds(self.tfds_name, self.data_dir, self.split)
        return self._ds

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None}  # reopened in each worker

    def __len__(self) -> int:
        return self._len

    def load(self, index: int, rng: np.random.Generator | None) -> np.ndarray:
        video = np.asarray(self._open()[index][self.key])  # (T0, H0, W0, 3)
        t = self.spec.num_frames
        if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < t:
            raise BadVideoError(f"record has shape {video.shape}, need ({t}+, H, W, 3)")
        start = 0
        if self.spec.random_start and rng is not None:
            start = int(rng.integers(0, video.shape[0] - t + 1))
        clip = video[start : start + t].astype(np.uint8, copy=False)
        return resize_and_crop(clip, self.spec, rng)  # (T, H, W, 3)

    def name(self, index: int) -> str:
        if self.id_key is None:
            return f"{self.tfds_name}/{self.split}/{index}"
        value = self._open()[index][self.id_key]
        return value.decode() if isinstance(value, bytes) else str(value)


def _open_tfds(name: str, data_dir: str, split: str) -> Any:
    if not name:
        raise DataError("data.tfds_name is empty: set it to the TFDS dataset name to read.")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # TFDS raises many types here
        raise DataError(
            f"Cannot open TFDS dataset '{name}' split '{split}' in data_dir '{data_dir}' "
            f"({type(e).__name__}): build it first (reducio_jax.data.build_tfds_dataset) "
            "or fix data.path / data.tfds_name / data.split."
        ) from e


def _features(ds: Any) -> dict:
    return dict(ds.dataset_info.features)


def _video_key(ds: Any) -> str:
    feats = _features(ds)
    if "video" in feats:
        return "video"
    for key, feat in feats.items():
        shape = getattr(feat, "shape", ())
        if len(shape) == 4 and shape[-1] == 3:
            return key
    raise DataError(f"TFDS dataset has no video feature (features: {sorted(feats)}).")


def _id_key(ds: Any) -> str | None:
    feats = _features(ds)
    return next((k for k in ("id", "video_id", "name", "filename") if k in feats), None)


def make_source(cfg: Any, spec: ClipSpec) -> ClipSource:
    """The source named by ``cfg.source``; raises :class:`DataError` if it is unusable."""
    if cfg.source == "folder":
        return FolderSource(cfg.path, spec)
    if cfg.source == "tfds":
        return TfdsSource(cfg.tfds_name, cfg.path, cfg.split, spec)
    if cfg.source == "synthetic":
        return SyntheticSource(cfg.synthetic_size, spec, seed=cfg.seed)
    raise DataError(f"data.source is '{cfg.source}': use 'synthetic', 'folder' or 'tfds'.")
