"""Grain pipeline: batches, sharding over processes and devices, checkpointing, bad files."""

from __future__ import annotations

import logging
import pathlib
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_video_helpers import frame_ids, write_video
from jax.sharding import AxisType, PartitionSpec

from reducio_jax.data import DataError, get_config, make_host_dataset, make_loader
from reducio_jax.data.synthetic import synthetic_clip


def _cfg(**kw):
    cfg = get_config()
    cfg.num_frames, cfg.resolution, cfg.batch_size = 4, (16, 24), 2
    cfg.synthetic_size = 10
    cfg.update(kw)
    return cfg


def _mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x["index"]), np.asarray(y["index"]))
        np.testing.assert_array_equal(np.asarray(x["video"]), np.asarray(y["video"]))


def test_config_defaults_and_resolution_types() -> None:
    cfg = get_config()
    assert (cfg.num_frames, cfg.fps, cfg.resolution, cfg.num_epochs) == (16, 16, 256, None)
    cfg.resolution = (128, 256)
    cfg.resolution = 64
    assert cfg.source == "synthetic" and cfg.num_workers == 0


def test_synthetic_batches_are_deterministic_per_index() -> None:
    cfg = _cfg(num_epochs=1, shuffle=False)
    batches = list(make_host_dataset(cfg, train=True, process_index=0, process_count=1))
    assert len(batches) == 5
    b = batches[1]
    assert b["video"].shape == (2, 4, 16, 24, 3) and b["video"].dtype == np.uint8
    assert b["index"].tolist() == [2, 3] and b["mask"].all() and not b["skipped"].any()
    expected = synthetic_clip(3, seed=0, num_frames=4, height=16, width=24)
    np.testing.assert_array_equal(b["video"][1], expected)
    assert b["video"][0].std() > 10  # textured, not flat


def test_two_processes_see_disjoint_clips_covering_the_epoch() -> None:
    seen = []
    for p in range(2):
        ds = make_host_dataset(_cfg(num_epochs=1), train=True, process_index=p, process_count=2)
        seen.append([i for b in ds for i in b["index"].tolist()])  # local batch 1
    assert len(seen[0]) == len(seen[1]) == 5
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_shuffle_is_seeded_and_changes_each_epoch() -> None:
    def order(seed: int) -> list[int]:
        ds = make_host_dataset(_cfg(num_epochs=2, seed=seed), train=True)
        return [i for b in ds for i in b["index"].tolist()]

    a, b = order(0), order(1)
    assert a == order(0) and a != b
    assert sorted(a[:10]) == sorted(a[10:]) == list(range(10)) and a[:10] != a[10:]


def test_eval_pads_last_batch_with_mask(video_dir: pathlib.Path) -> None:
    cfg = _cfg(source="folder", path=str(video_dir), batch_size=4)  # 6 videos
    per_process = []
    for p in range(2):
        batches = list(make_host_dataset(cfg, train=False, process_index=p, process_count=2))
        assert len(batches) == 2  # 8 padded positions / 2 processes / 2 per batch
        per_process.append({i for b in batches for i in b["index"][b["mask"]].tolist()})
        for b in batches:
            assert [frame_ids(v) for v in b["video"]] == [[0, 1, 2, 3]] * 2  # eval: from start
    assert per_process[0] | per_process[1] == set(range(6))
    assert not per_process[0] & per_process[1]


def test_loader_yields_sharded_float_batches(video_dir: pathlib.Path) -> None:
    cfg = _cfg(source="folder", path=str(video_dir), batch_size=8, resolution=16)
    with make_loader(cfg, mesh=_mesh(), train=True) as loader:
        batch = next(loader)
    video = batch["video"]
    assert video.shape == (8, 4, 16, 16, 3) and video.dtype == np.float32
    assert video.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert len(video.sharding.device_set) == 8
    v = np.asarray(video)
    assert v.min() >= -1.0 and v.max() <= 1.0 and v.min() < -0.8  # grey 10 -> -0.92
    assert batch["mask"].shape == (8,) and batch["index"].dtype == np.int32


def test_host_iterator_state_restores_same_batches(video_dir: pathlib.Path) -> None:
    cfg = _cfg(source="folder", path=str(video_dir))  # random crops and start times
    it = iter(make_host_dataset(cfg, train=True))
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    it2 = iter(make_host_dataset(cfg, train=True))
    it2.set_state(state)
    _assert_same(_take(it2, 3), expected)


def test_orbax_checkpoint_manager_restores_loader(tmp_path: pathlib.Path) -> None:
    cfg = _cfg(batch_size=8, synthetic_size=12)
    mesh = _mesh()
    loader = make_loader(cfg, mesh=mesh, train=True)
    _take(loader, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(loader.iterator)))
        mngr.wait_until_finished()
    expected = _take(loader, 2)
    resumed = make_loader(cfg, mesh=mesh, train=True)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        step = mngr.latest_step()
        mngr.restore(
            step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed.iterator))
        )
    assert step == 2
    _assert_same(_take(resumed, 2), expected)


def test_worker_processes_are_deterministic_and_restorable(video_dir: pathlib.Path) -> None:
    cfg = _cfg(source="folder", path=str(video_dir), num_workers=2)
    it = iter(make_host_dataset(cfg, train=True))
    first = _take(it, 2)
    state = it.get_state()
    expected = _take(it, 2)
    it.close()
    it2 = iter(make_host_dataset(cfg, train=True))
    _assert_same(_take(it2, 2), first)
    it2.set_state(state)
    _assert_same(_take(it2, 2), expected)
    it2.close()


def _folder_with_bad_files(tmp_path: pathlib.Path, video_dir: pathlib.Path) -> dict[str, str]:
    d = tmp_path / "mixed"
    d.mkdir()
    for name in ("a_good.mp4", "d_good.mp4", "g_good.mp4"):
        shutil.copy(video_dir / "v0.mp4", d / name)
    data = (video_dir / "v1.mp4").read_bytes()
    (d / "b_truncated.mp4").write_bytes(data[: len(data) // 2])
    (d / "c_zero.mp4").write_bytes(b"")
    (d / "e_text.mp4").write_text("not a video\n" * 10)
    write_video(d / "f_short.mp4", 2, 16)
    return {p.name: str(p) for p in sorted(d.iterdir())}


def test_bad_files_are_skipped_warned_once_and_counted(
    tmp_path: pathlib.Path, video_dir: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _folder_with_bad_files(tmp_path, video_dir)
    cfg = _cfg(source="folder", path=str(tmp_path / "mixed"), batch_size=8)
    with caplog.at_level(logging.WARNING), make_loader(cfg, mesh=_mesh(), train=False) as loader:
        batches = list(loader)  # 7 files -> one padded batch of 8
        stats = loader.stats()
    assert len(batches) == 1
    mask, index = np.asarray(batches[0]["mask"]), np.asarray(batches[0]["index"])
    assert sorted(index[mask].tolist()) == [0, 3, 6]  # each good file exactly once
    bad = [n for n in files if "good" not in n]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(bad)
    for name in bad:
        assert sum(name in w for w in warnings) == 1
    assert stats["clips"] == 3 and stats["skipped"] >= len(bad)
    assert loader.source.name(1) == files["b_truncated.mp4"]


def test_training_never_dies_on_bad_files(tmp_path: pathlib.Path, video_dir: pathlib.Path) -> None:
    _folder_with_bad_files(tmp_path, video_dir)
    cfg = _cfg(source="folder", path=str(tmp_path / "mixed"), num_epochs=2)
    batches = list(make_host_dataset(cfg, train=True))
    assert len(batches) == 7  # 14 clips, all replaced by readable ones
    assert {i for b in batches for i in b["index"].tolist()} <= {0, 3, 6}
    assert sum(int(b["skipped"].sum()) for b in batches) >= 8


@pytest.mark.parametrize("source", ["missing", "empty", "tfds"])
def test_missing_or_empty_dataset_is_a_clear_error(tmp_path: pathlib.Path, source: str) -> None:
    (tmp_path / "empty").mkdir()
    kw = {
        "missing": {"source": "folder", "path": str(tmp_path / "nope")},
        "empty": {"source": "folder", "path": str(tmp_path / "empty")},
        "tfds": {"source": "tfds", "path": str(tmp_path), "tfds_name": "not_built"},
    }[source]
    with pytest.raises(DataError, match=str(tmp_path)):
        make_loader(_cfg(batch_size=8, **kw), mesh=_mesh(), train=True)
