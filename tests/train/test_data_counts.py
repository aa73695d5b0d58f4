"""Training on a folder with unreadable files: `data/skipped` in TensorBoard, skipped.jsonl."""

from __future__ import annotations

import json

import jax
import numpy as np
from test_sharded_step import _tensorboard

from reducio_jax.data import make_loader
from reducio_jax.latents.runtime import write_mp4
from reducio_jax.train import run


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
