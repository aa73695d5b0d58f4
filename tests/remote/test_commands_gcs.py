"""The commands on `gs://` URLs (a real GCS server, tests/gcs_server.py) do what they do on local
folders, with the same results: `convert --out` and `from_pretrained`, `encode` to a store in
the bucket and `decode` back, `reconstruct` from and to the bucket, `eval` on videos there.

Every command runs twice, once on a local tree and once on the same tree in the bucket; the
tiny model at 32 px, so each program is compiled once for both. Arrays and metrics are compared
bit for bit. Written mp4s are compared by their frames' mean difference only: two runs of the
same command on the same local folder already give H.264 files whose frames differ (up to ~30
levels at single pixels of this noisy 32 px model output, mean under 1), so the encoder, not
the storage, decides those bytes.
"""

from __future__ import annotations

import json
import os
import pathlib

import av
import jax
import numpy as np
import pytest
from helpers import recipe_checkpoint

from reducio_jax import ReducioVAE
from reducio_jax.__main__ import main
from reducio_jax.data.video import write_mp4
from reducio_jax.latents import LatentStore
from reducio_jax.storage import paths

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
RUN = ["--resolution", "32", "--batch_size", "2", "--devices", "2", "--noprogress"]


def _frames(n: int, seed: int) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(n), np.arange(32), np.arange(32), indexing="ij")
    wave = np.sin((x + 3 * t + seed) / 5.0)[..., None] * np.cos((y - 2 * t) / 7.0)[..., None]
    return np.round((0.6 * wave * np.array([1.0, -0.5, 0.8]) + 1) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def trees(gcs, fixtures_dir, tmp_path_factory) -> dict[str, str]:
    """{"local": folder, "remote": gs:// URL}, each with ckpt.ckpt (torch) and videos/."""
    local = tmp_path_factory.mktemp("tree")
    recipe_checkpoint(fixtures_dir, "tiny", local / "ckpt.ckpt")
    write_mp4(local / "videos" / "a.mp4", _frames(20, 0), 16)
    write_mp4(local / "videos" / "sub" / "b.mp4", _frames(18, 7), 16)
    remote = gcs.url("tree")
    paths.copytree(local, remote)
    return {"local": str(local), "remote": remote}


@pytest.fixture(scope="module")
def pretrained(trees) -> dict[str, str]:
    """`convert` on each tree: the torch file there -> a pretrained directory there."""
    out = {}
    for side, root in trees.items():
        args = ["--checkpoint", f"{root}/ckpt.ckpt", "--config", TINY, "--out", f"{root}/pre"]
        assert main(["convert", *args]) == 0
        out[side] = f"{root}/pre"
    return out


def _leaves(vae: ReducioVAE) -> list[np.ndarray]:
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(vae.model))]


def _read_video(path: str) -> np.ndarray:
    with paths.open_media(path) as source, av.open(source) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _videos(root: str) -> dict[str, np.ndarray]:
    """Every mp4 under `root` (relative name -> frames)."""
    base = paths.as_path(root)
    found = sorted(p for p in paths.files_under(base) if p.suffix == ".mp4")
    return {os.fspath(p)[len(os.fspath(base)) :]: _read_video(os.fspath(p)) for p in found}


def test_from_pretrained_in_bucket(gcs, trees, pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    remote = ReducioVAE.from_pretrained(pretrained["remote"])
    local = ReducioVAE.from_pretrained(pretrained["local"])
    a, b = _leaves(local), _leaves(remote)
    assert len(a) == len(b) > 50
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert (gcs.local_object(pretrained["remote"]) / "vae").is_dir()  # it is in the bucket
    assert not (tmp_path / "gs:").exists()


def test_encode_decode_store_in_bucket(trees, pretrained):
    stores, decoded = {}, {}
    for side, root in trees.items():
        args = ["--checkpoint", pretrained[side], "--data", f"{root}/videos"]
        assert main(["encode", *args, "--out", f"{root}/store", *RUN]) == 0
        args = ["--store", f"{root}/store", "--checkpoint", pretrained[side]]
        assert main(["decode", *args, "--out", f"{root}/decoded", "--noprogress"]) == 0
        stores[side] = LatentStore(f"{root}/store")
        decoded[side] = _videos(f"{root}/decoded")
    local, remote = stores["local"], stores["remote"]
    assert [c["name"][len(trees["local"]) :] for _, _, c in local.entries()] == [
        c["name"][len(trees["remote"]) :] for _, _, c in remote.entries()
    ]
    assert len(local.entries()) == 2
    for (s, r, _), (s2, r2, _) in zip(local.entries(), remote.entries(), strict=True):
        for name in local.arrays:
            np.testing.assert_array_equal(local.read(s, r, name), remote.read(s2, r2, name))
    assert sorted(decoded["local"]) == sorted(decoded["remote"]) and len(decoded["local"]) == 2
    for name, frames in decoded["local"].items():
        _same_video(frames, decoded["remote"][name])


def _same_video(a: np.ndarray, b: np.ndarray) -> None:
    """Two H.264 encodings of the same frames (see the module docstring): libx264's output for
    identical frames differs between runs (seen: single pixels up to 30 levels, means of
    0.5-1.4 levels), so they are compared by shape and a small mean difference; the arrays
    behind them are compared exactly."""
    assert a.shape == b.shape
    assert np.mean(np.abs(a.astype(np.float32) - b)) < 3.0


def test_reconstruct_folder_from_and_to_bucket(trees, pretrained, capsys):
    out, lines = {}, {}
    for side, root in trees.items():
        args = [f"{root}/videos", f"{root}/recon", "--checkpoint", pretrained[side]]
        assert main(["reconstruct", *args, "--window_batch", "1", "--noprogress"]) == 0
        out[side] = _videos(f"{root}/recon")
        printed = capsys.readouterr().out.splitlines()
        # the line up to the PSNR/SSIM (the memory plan after it follows the RAM free then)
        lines[side] = [x.replace(root, "ROOT").split("; ")[0] for x in printed if "PSNR" in x]
    assert len(lines["local"]) == 2 and lines["local"] == lines["remote"]  # the same PSNR/SSIM
    assert sorted(out["local"]) == sorted(out["remote"]) == ["/a.mp4", "/sub/b.mp4"]
    for name, frames in out["local"].items():
        assert frames.shape[0] == (20 if name == "/a.mp4" else 18)
        _same_video(frames, out["remote"][name])
    leftovers = [p for p in paths.files_under(trees["remote"]) if "partial" in p.name]
    assert leftovers == []


def test_eval_on_videos_in_bucket(trees, pretrained):
    reports = {}
    for side, root in trees.items():
        args = ["--checkpoint", pretrained[side], "--data", f"{root}/videos", *RUN]
        assert main(["eval", *args, "--out", f"{root}/eval", "--save_videos", "1"]) == 0
        report = json.loads((paths.as_path(root) / "eval" / "metrics.json").read_text())
        reports[side] = report
    local, remote = reports["local"], reports["remote"]
    assert local["clips_used"] == remote["clips_used"] == 2
    for key in ("psnr", "ssim"):
        assert local[key] == remote[key] and local[key] is not None, key
    assert len(_videos(f"{trees['remote']}/eval/videos")) == 1
