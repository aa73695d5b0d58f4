"""Training into a bucket (a real GCS server, tests/gcs_server.py) gives the run a local folder
gives: the same losses, the same checkpointed arrays; `resume` continues from the bucket; the
TensorBoard events, metrics and previews are objects there; no local `gs:` folder appears.

All runs share one compiled step (the micro config on the same 2 devices).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from reducio_jax.storage.checkpoints import DISCRIMINATOR, OPTIMIZER, VAE, RunCheckpoints
from reducio_jax.storage.paths import as_path
from reducio_jax.train import run

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))
DEVICES = 2


def _cfg(num_steps: int):
    import micro_config

    cfg = micro_config.get_config()
    cfg.train.num_steps = num_steps
    cfg.train.preview_every = 2
    return cfg


def _run(cfg, workdir, **kw):
    return run(cfg, workdir, progress=False, devices=jax.devices()[:DEVICES], **kw)


def _curve(workdir) -> dict[int, dict]:
    text = (as_path(workdir) / "metrics.jsonl").read_text()
    drop = ("clips_per_second", "seconds_per_step", "mfu")
    rows = [json.loads(line) for line in text.splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in drop} for r in rows}


def _final_state(workdir, step):
    ckpt = RunCheckpoints(as_path(workdir) / "checkpoints", keep=3)
    try:
        items = {name: ocp.args.StandardRestore() for name in (VAE, DISCRIMINATOR, OPTIMIZER)}
        return ckpt.manager.restore(step, args=ocp.args.Composite(**items))
    finally:
        ckpt.close()


def test_train_and_resume_in_bucket_match_local_run(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here as ./gs:
    local, remote = tmp_path / "local", gcs.url("run")
    _run(_cfg(3), local)
    first = _run(_cfg(1), remote)
    assert os.fspath(first.checkpoint) == remote + "/checkpoints/1"
    resumed = _run(_cfg(3), remote, resume=True)
    assert (resumed.start_step, resumed.end_step) == (1, 3)
    assert not (tmp_path / "gs:").exists()

    want, got = _curve(local), _curve(remote)
    assert sorted(got) == [1, 2, 3] and want == got  # every logged loss part, bit for bit
    a, b = _final_state(local, 3), _final_state(remote, 3)
    leaves_a, leaves_b = jax.tree.leaves(dict(a)), jax.tree.leaves(dict(b))
    assert len(leaves_a) == len(leaves_b) > 100
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # the objects are in the server's store, not on this host's disk
    stored = gcs.local_object(remote)
    assert sorted(p.name for p in (stored / "checkpoints").iterdir()) == ["1", "3"]
    assert any(p.name.startswith("events.out.tfevents") for p in (stored / "tensorboard").iterdir())
    previews = {p.name for p in (stored / "previews").iterdir()}
    assert {p.name for p in (local / "previews").iterdir()} <= previews
    assert "step_0000003.png" in previews
