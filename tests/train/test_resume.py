"""Checkpoint/resume is bit-for-bit; a NaN stops the run naming the step and the checkpoint.

All runs share one compiled step (same program on the same 2 devices): the loop caches it.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from reducio_jax.data import make_loader
from reducio_jax.storage.checkpoints import DISCRIMINATOR, OPTIMIZER, VAE, RunCheckpoints
from reducio_jax.train import NonFiniteLossError, TrainingError, run

DEVICES = 2


def _cfg(num_steps: int):
    import micro_config

    cfg = micro_config.get_config()
    cfg.train.num_steps = num_steps
    return cfg


def _run(cfg, workdir, **kw):
    return run(cfg, workdir, progress=False, devices=jax.devices()[:DEVICES], **kw)


def _curve(workdir) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    drop = ("clips_per_second", "seconds_per_step", "mfu")
    return {r["step"]: {k: v for k, v in r.items() if k not in drop} for r in rows}


def _final_state(workdir, step):
    ckpt = RunCheckpoints(workdir / "checkpoints", keep=3)
    try:
        items = {name: ocp.args.StandardRestore() for name in (VAE, DISCRIMINATOR, OPTIMIZER)}
        return ckpt.manager.restore(step, args=ocp.args.Composite(**items))  # trees as saved
    finally:
        ckpt.close()


def test_resume_is_bit_for_bit(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(_cfg(3), straight)
    first = _run(_cfg(1), split)
    assert first.end_step == 1 and first.checkpoint == split / "checkpoints" / "1"
    with pytest.raises(TrainingError, match="--resume"):
        _run(_cfg(3), split)  # an existing run is never silently overwritten
    resumed = _run(_cfg(3), split, resume=True)
    assert (resumed.start_step, resumed.end_step) == (1, 3)
    want, got = _curve(straight), _curve(split)
    assert sorted(want) == sorted(got) == [1, 2, 3]
    assert want == got  # every logged loss part, bit for bit
    a, b = _final_state(straight, 3), _final_state(split, 3)
    leaves_a, leaves_b = jax.tree.leaves(dict(a)), jax.tree.leaves(dict(b))
    assert len(leaves_a) == len(leaves_b) > 100
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # micro_config computes in bfloat16; parameters and Adam moments stay float32
    floats = jax.tree.leaves([a[VAE], a[DISCRIMINATOR], a[OPTIMIZER]["vae"]])
    kinds = {np.asarray(x).dtype for x in floats if np.asarray(x).dtype.kind == "f"}
    assert kinds == {np.dtype(np.float32)}


class _Poisoned:
    """The real loader, with NaNs in the batch of step `at`."""

    def __init__(self, loader, at: int):
        self.loader, self.at, self.count = loader, at, 0

    def __next__(self):
        batch = next(self.loader)
        if self.count == self.at:
            batch = dict(batch, video=batch["video"] * np.nan)
        self.count += 1
        return batch

    def get_state(self):
        return self.loader.get_state()

    def close(self):
        self.loader.close()


def test_nan_stops_with_step_and_last_checkpoint(tmp_path):
    cfg = _cfg(4)
    cfg.train.checkpoint_every = 1
    factory = lambda data_cfg, **kw: _Poisoned(make_loader(data_cfg, **kw), at=2)  # noqa: E731
    with pytest.raises(NonFiniteLossError) as info:
        _run(cfg, tmp_path, loader_factory=factory)
    message = str(info.value)
    assert "step 2" in message
    assert str(tmp_path / "checkpoints" / "2") in message
    assert "\n" not in message
    ckpt = RunCheckpoints(tmp_path / "checkpoints", keep=3)
    assert ckpt.latest_step() == 2  # the poisoned state was never saved
    ckpt.close()
