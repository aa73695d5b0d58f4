"""Real signals sent to real `python -m reducio_jax encode` processes (tiny model, 32 px).

SIGKILL while a shard is half written, then SIGTERM in a later shard or the same one (exit 143,
summary says preempted), then a plain rerun: the store reads back every clip exactly once, with
the content frames of the synthetic clips.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import recipe_checkpoint

from reducio_jax.data.synthetic import synthetic_clip
from reducio_jax.latents import LatentSource
from reducio_jax.models import content_frame_index

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
CLIPS, SHARDS = 12, 2  # 6 clips (3 batches of 2) per shard


@pytest.fixture(scope="module")
def ckpt(fixtures_dir, tmp_path_factory) -> pathlib.Path:
    return recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def _start(ckpt, out: pathlib.Path, env: dict) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "reducio_jax", "encode", "--checkpoint", str(ckpt), "--config",
        TINY, "--out", str(out), "--data", "synthetic", "--num_clips", str(CLIPS),
        "--num_shards", str(SHARDS), "--resolution", "32", "--batch_size", "2", "--devices", "2",
        "--noprogress",
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _identity(path: pathlib.Path) -> tuple[int, int]:
    st = path.stat()  # a recreated directory may reuse the inode, not the ctime
    return st.st_ino, st.st_ctime_ns


def _half_written(out: pathlib.Path, old: set[tuple[int, int]]) -> pathlib.Path | None:
    """A shard (not one of the directories `old`) with a stored clip and no done marker."""
    for shard in sorted(out.glob("shard-*")):
        latent = shard / "latent"
        try:
            if _identity(shard) in old or (shard / "done").exists():
                continue
            if len(os.listdir(latent)) > 1:  # .zarray and a clip's chunk
                return shard
        except FileNotFoundError:  # being replaced right now
            continue
    return None


def _signal_mid_shard(proc: subprocess.Popen, out: pathlib.Path, sig: int) -> str:
    old = {_identity(p) for p in out.glob("shard-*")}  # left by an earlier run
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        shard = _half_written(out, old)
        if shard is not None:
            proc.send_signal(sig)
            return shard.name
        time.sleep(0.005)
    pytest.fail(f"no half-written shard seen: {proc.communicate()[1][-2000:]}")


def test_killed_and_terminated_encode_completes_on_rerun(ckpt, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    out = tmp_path / "store"

    proc = _start(ckpt, out, env)
    killed = _signal_mid_shard(proc, out, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / killed / "done").exists()  # left half written

    proc = _start(ckpt, out, env)
    _signal_mid_shard(proc, out, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len([x for x in stderr.splitlines() if x.startswith("preempted: ")]) == 1
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["preempted"] is True and summary["unfinished_shards"]
    assert killed in summary["encoded_shards"] + summary["unfinished_shards"]

    proc = _start(ckpt, out, env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["preempted"] is False and not summary["unfinished_shards"]
    assert (summary["files_read"], summary["clips_used"], summary["files_skipped"]) == (12, 12, 0)

    source = LatentSource(out)  # refuses a store with unfinished shards
    items = [source[i] for i in range(len(source))]
    assert sorted(int(x["index"]) for x in items) == list(range(CLIPS))  # none missing, none twice
    middle = content_frame_index(16)
    for x in items:
        clip = synthetic_clip(int(x["index"]), seed=0, num_frames=16, height=32, width=32)
        np.testing.assert_array_equal(x["content"], clip[middle])
        assert np.all(np.isfinite(x["latent"]))
