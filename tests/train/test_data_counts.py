"""Training on a folder with unreadable files: `data/skipped` in TensorBoard, skipped.jsonl;
a data pipeline that fails mid-run: the last finished step is checkpointed."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_sharded_step import _tensorboard

from reducio_jax.data import make_loader
from reducio_jax.data.video import write_mp4
from reducio_jax.errors import RUN_FAILED, exit_status
from reducio_jax.storage.checkpoints import RunCheckpoints
from reducio_jax.train import TrainingError, run


def test_skipped_files_counted_in_tensorboard_and_listed(micro, tmp_path):
    folder = tmp_path / "videos"
    rng = np.random.default_rng(0)
    for name in ("a.mp4", "c.mp4"):
        write_mp4(folder / name, rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 16)
    (folder / "b.mp4").write_text("not a video\n")
    (folder / "d.mp4").write_bytes(b"")
    data_cfg = micro.data.copy_and_resolve_references()
    data_cfg.source, data_cfg.path = "folder", str(folder)
    # the config keeps its synthetic data block, so the compiled step is the one of the other
    # micro-config tests; the loader reads the folder (4 records: 2 batches cover them all)
    factory = lambda _, **kw: make_loader(data_cfg, **kw)  # noqa: E731
    workdir = tmp_path / "run"
    run(micro, workdir, progress=False, devices=jax.devices()[:2], loader_factory=factory)
    tags = _tensorboard(workdir / "tensorboard")
    skipped = [v for _, v in tags["data/skipped"]]  # distinct files so far, at steps 1 and 2
    assert len(skipped) == 2 and skipped[0] <= skipped[1] == 2.0  # each met once, counted once
    assert tags["data/files_read"][-1][1] == 4.0
    rows = [json.loads(x) for x in (workdir / "skipped.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == [str(folder / "b.mp4"), str(folder / "d.mp4")]
    assert all(r["reason"] for r in rows)


class _DeletesFilesAfterFirstBatch:
    """The real loader; once it has given its first batch the videos vanish (a dropped mount)."""

    def __init__(self, loader, files):
        self.loader, self.files = loader, files

    def __next__(self):
        batch = next(self.loader)
        for f in self.files:
            f.unlink(missing_ok=True)
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def test_failing_data_pipeline_checkpoints_last_step(micro, tmp_path):
    folder = tmp_path / "videos"
    rng = np.random.default_rng(1)
    files = [folder / f"{name}.mp4" for name in ("a", "b")]
    for f in files:
        write_mp4(f, rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 16)
    data_cfg = micro.data.copy_and_resolve_references()
    data_cfg.source, data_cfg.path = "folder", str(folder)
    factory = lambda _, **kw: _DeletesFilesAfterFirstBatch(make_loader(data_cfg, **kw), files)  # noqa: E731
    micro.train.num_steps = 6
    workdir = tmp_path / "run"
    with pytest.raises(TrainingError, match="consecutive records") as info:
        run(micro, workdir, progress=False, devices=jax.devices()[:2], loader_factory=factory)
    ckpt = RunCheckpoints(workdir / "checkpoints", keep=3)
    step = ckpt.latest_step()
    ckpt.close()
    assert step is not None and 1 <= step < 6  # batches decoded ahead of the deletion are used
    assert f"checkpoint {workdir / 'checkpoints' / str(step)} is committed" in str(info.value)
    assert "--resume" in str(info.value)
    assert exit_status(info.value) == RUN_FAILED  # a run that failed, not bad input
