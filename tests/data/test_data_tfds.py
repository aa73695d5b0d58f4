"""TFDS source: pack a folder with the builder, read it back through tfds.data_source."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from data_video_helpers import frame_ids

from reducio_jax.data import DataError, build_tfds_dataset, get_config, make_host_dataset


@pytest.fixture(scope="module")
def tfds_dir(video_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    counts = build_tfds_dataset(
        {"train": video_dir, "validation": video_dir / "v0.mp4"},
        data_dir,
        name="tiny_videos",
        num_frames=8,
        resolution=(32, 40),
        clips_per_video=2,
    )
    assert counts == {
        "train": {"clips": 12, "skipped": 0},
        "validation": {"clips": 2, "skipped": 0},
    }
    return data_dir


def _cfg(data_dir: pathlib.Path, **kw):
    cfg = get_config()
    cfg.update(source="tfds", path=str(data_dir), tfds_name="tiny_videos", num_frames=4)
    cfg.update(resolution=(32, 40), batch_size=2, num_epochs=1)
    cfg.update(kw)
    return cfg


def test_builder_writes_clips_readable_in_eval(tfds_dir: pathlib.Path) -> None:
    batches = list(make_host_dataset(_cfg(tfds_dir), train=False))
    assert len(batches) == 6
    starts = []
    for b in batches:
        assert b["video"].shape == (2, 4, 32, 40, 3) and b["mask"].all()
        for v in b["video"]:
            ids = frame_ids(v)
            assert ids == list(range(ids[0], ids[0] + 4))
            starts.append(ids[0])
    assert sorted(starts) == [0] * 6 + [8] * 6  # two consecutive 8-frame clips per video
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(12))


def test_train_random_temporal_and_spatial_crop(tfds_dir: pathlib.Path) -> None:
    cfg = _cfg(tfds_dir, split="validation", resolution=16, num_epochs=8)
    starts, videos = set(), []
    for b in make_host_dataset(cfg, train=True):
        for v in b["video"]:
            ids = frame_ids(v)
            assert v.shape == (4, 16, 16, 3) and ids == list(range(ids[0], ids[0] + 4))
            starts.add(ids[0] % 8)  # offset inside the stored 8-frame clip
            videos.append(v)
    assert len(starts) > 1 and max(starts) <= 4
    assert np.stack(videos).dtype == np.uint8


def test_missing_split_or_name_is_a_clear_error(tfds_dir: pathlib.Path) -> None:
    with pytest.raises(DataError, match="test"):
        make_host_dataset(_cfg(tfds_dir, split="test"), train=False)
    with pytest.raises(DataError, match="tfds_name"):
        make_host_dataset(_cfg(tfds_dir, tfds_name=""), train=False)


def test_builder_refuses_to_reuse_another_clip_shape(
    tfds_dir: pathlib.Path, video_dir: pathlib.Path
) -> None:
    again = build_tfds_dataset(
        video_dir, tfds_dir, name="tiny_videos", num_frames=8, resolution=(32, 40)
    )
    assert again["train"]["clips"] == 12  # reused as is
    with pytest.raises(DataError, match="overwrite=True"):
        build_tfds_dataset(video_dir, tfds_dir, name="tiny_videos", num_frames=8, resolution=16)
