"""Packs a folder of videos into a TFDS ArrayRecord dataset (no TensorFlow needed).

Each record is one clip: ``video`` = ``tfds.features.Tensor((T, H, W, 3), uint8)`` (zlib),
resampled to ``fps`` and centre-cropped to ``resolution``, plus ``id`` = ``"<relative
path>#<clip number>"`` (TFDS reorders records on write). ``tfds.features.Video`` is not
used because it needs TensorFlow. Read it back with ``source="tfds"``, ``path=data_dir``,
``tfds_name=name``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from reducio_jax.config import frame_size
from reducio_jax.data.errors import BadVideoError, DataError
from reducio_jax.data.video import ClipSpec, decode_clip, list_videos

log = logging.getLogger(__name__)
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class _VideoClips(tfds.core.GeneratorBasedBuilder):
    """Generic builder; :func:`build_tfds_dataset` subclasses it with the dataset name."""

    VERSION = tfds.core.Version("1.0.0")
    # A class in a package makes TFDS look up its source folder through
    # `importlib_resources`, which is not installed; no checksums file is needed anyway.
    code_path = None

    def __init__(self, *, videos: Mapping[str, list[str]], spec: ClipSpec, clips: int, **kw):
        self._videos, self._spec, self._clips = videos, spec, clips
        self.skipped: dict[str, int] = {}
        super().__init__(**kw)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self._spec
        shape = (s.num_frames, s.height, s.width, 3)
        features = tfds.features.FeaturesDict(
            {
                "video": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
                "id": tfds.features.Text(),
            }
        )
        desc = f"Video clips: {s.num_frames} frames at {s.fps} fps, {s.height}x{s.width}."
        return tfds.core.DatasetInfo(builder=self, features=features, description=desc)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {split: self._generate_examples(split) for split in self._videos}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        files = self._videos[split]
        root = os.path.commonpath([os.path.dirname(f) for f in files])
        self.skipped[split] = 0
        for path in files:
            clips = self._clips_of(path)
            if not clips:
                self.skipped[split] += 1
            for k, clip in enumerate(clips):
                key = f"{os.path.relpath(path, root)}#{k}"
                yield key, {"video": clip, "id": key}
        if self.skipped[split] == len(files):
            s = self._spec
            raise DataError(
                f"No readable video for split '{split}' ({len(files)} files, first "
                f"{files[0]}): check they decode and last {s.num_frames / s.fps:g} s or more."
            )

    def _clips_of(self, path: str) -> list[np.ndarray]:
        """Up to ``clips`` consecutive clips of ``path``; [] (and a warning) if unreadable."""
        clips, span = [], self._spec.num_frames / self._spec.fps
        for k in range(self._clips):
            try:
                clips.append(decode_clip(path, self._spec, start=k * span))  # (T, H, W, 3)
            except BadVideoError as e:
                if k == 0:
                    log.warning("Skipping video %s: %s", path, e)
                break
        return clips


def build_tfds_dataset(
    videos: str | os.PathLike | Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    name: str = "reducio_videos",
    num_frames: int = 16,
    fps: float = 16,
    resolution: int | tuple[int, int] = 256,
    clips_per_video: int = 1,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Builds TFDS dataset ``name`` in ``data_dir`` from video folders (or list files).

    Args:
      videos: one folder/list file (split ``"train"``), or ``{split: folder}``.
      data_dir: TFDS data_dir to write to (``<data_dir>/<name>/1.0.0/``).
      name: dataset name (lowercase snake_case).
      num_frames, fps, resolution: clip format stored (centre crop).
      clips_per_video: consecutive clips cut from each video (fewer if it is shorter).
      overwrite: rebuild even if the dataset already exists.

    Returns:
      ``{split: {"clips": n, "skipped": bad files}}``.

    Raises:
      DataError: bad name, missing/empty folder, or a split without any readable clip.
    """
    if not _NAME_RE.match(name):
        raise DataError(f"TFDS name '{name}' is invalid: use lowercase snake_case.")
    splits = {"train": videos} if isinstance(videos, str | os.PathLike) else dict(videos)
    files = {split: list_videos(path) for split, path in splits.items()}
    h, w = frame_size(resolution)
    spec = ClipSpec(num_frames=num_frames, fps=fps, height=h, width=w)
    with tfds.core.registered.skip_registration():
        cls = type(f"ReducioVideos_{name}", (_VideoClips,), {"name": name})
    builder = cls(
        videos=files,
        spec=spec,
        clips=clips_per_video,
        data_dir=os.fspath(data_dir),
        file_format="array_record",
    )
    mode = tfds.download.GenerateMode
    config = tfds.download.DownloadConfig(
        download_mode=mode.FORCE_REDOWNLOAD if overwrite else mode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(download_config=config)
    _check_shape(builder, spec)
    return {
        split: {
            "clips": builder.info.splits[split].num_examples,
            "skipped": builder.skipped.get(split, 0),
        }
        for split in splits
    }


def _check_shape(builder: _VideoClips, spec: ClipSpec) -> None:
    """An existing dataset is reused as is: refuse one stored with another clip shape."""
    stored_builder = tfds.builder_from_directory(builder.data_dir)
    stored = tuple(stored_builder.info.features["video"].shape)
    wanted = (spec.num_frames, spec.height, spec.width, 3)
    if stored != wanted:
        raise DataError(
            f"TFDS dataset '{builder.name}' in '{builder.data_dir}' holds clips of shape "
            f"{stored}, not {wanted}: pass overwrite=True or use another name."
        )
