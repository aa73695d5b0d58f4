"""`python -m reducio_jax encode/decode`, the Zarr store, resuming and `LatentSource` (32 px)."""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import av
import grain
import numpy as np
import pytest
from helpers import recipe_checkpoint

from reducio_jax.__main__ import main
from reducio_jax.data import make_loader
from reducio_jax.data.video import write_mp4
from reducio_jax.latents import LatentSource, LatentStore, StoreError, decode_store
from reducio_jax.runs.runtime import data_config, load_vae, local_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
SIZE = ["--resolution", "32", "--batch_size", "2", "--devices", "2", "--noprogress"]


def _encode(ckpt, out, *extra) -> int:
    args = ["encode", "--checkpoint", str(ckpt), "--config", TINY, "--out", str(out), *SIZE]
    return main([*args, *extra])


@pytest.fixture(scope="module")
def ckpt(fixtures_dir, tmp_path_factory) -> pathlib.Path:
    return recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def store(ckpt, tmp_path_factory) -> pathlib.Path:
    """3 synthetic clips in 2 shards, with the posterior moments."""
    out = tmp_path_factory.mktemp("latents") / "store"
    extra = ["--data", "synthetic", "--num_clips", "3", "--num_shards", "2", "--save_moments"]
    assert _encode(ckpt, out, *extra) == 0
    return out


@pytest.fixture(scope="module")
def mesh():
    return local_mesh(2)


@pytest.fixture(scope="module")
def vae(ckpt, mesh):
    return load_vae(ckpt, TINY, mesh)


def test_layout(store):
    meta = json.loads((store / "store.json").read_text())
    assert meta["num_clips"] == 3 and meta["shard_ranges"] == [[0, 2], [2, 3]]
    assert meta["arrays"]["latent"] == {"shape": [4, 1, 1, 16], "dtype": "float32"}
    assert meta["arrays"]["content"] == {"shape": [32, 32, 3], "dtype": "uint8"}
    for shard, rows in (("shard-00000", 2), ("shard-00001", 1)):
        assert json.loads((store / shard / "done").read_text())["rows"] == rows
        zarray = json.loads((store / shard / "latent" / ".zarray").read_text())
        assert zarray["shape"] == [rows, 4, 1, 1, 16] and zarray["chunks"] == [1, 4, 1, 1, 16]


def test_decode_equals_reconstruct(store, vae, mesh):
    """encode -> store -> decode gives `reconstruct` of the same clips."""
    decoded = np.concatenate([v for _, v in decode_store(vae, LatentStore(store), mesh, 2)])
    cfg = data_config("synthetic", vae.config, num_clips=3, batch_size=2, resolution=32)
    with make_loader(cfg, mesh=mesh, train=False) as loader:
        recon = np.concatenate([np.asarray(vae.reconstruct(b["video"])) for b in loader])[:3]
    assert decoded.shape == (3, 16, 32, 32, 3)
    np.testing.assert_allclose(decoded, recon, atol=1e-5, rtol=0)


def test_stored_moments_match_encode(store, vae, mesh):
    cfg = data_config("synthetic", vae.config, num_clips=3, batch_size=2, resolution=32)
    with make_loader(cfg, mesh=mesh, train=False) as loader:
        batch = next(iter(loader))
        post = vae.encode(batch["video"])
        content = np.asarray((batch["video"][:, 7] + 1.0) * 127.5).round().astype(np.uint8)
    source = LatentSource(store, arrays=("latent", "mean", "logvar", "content"))
    np.testing.assert_allclose(source[1]["mean"], np.asarray(post.mean[1]), atol=1e-6)
    np.testing.assert_allclose(source[1]["logvar"], np.asarray(post.logvar[1]), atol=1e-6)
    np.testing.assert_allclose(source[1]["latent"], np.asarray(vae.latent(post)[1]), atol=1e-6)
    np.testing.assert_array_equal(source[0]["content"], content[0])


def test_latent_source_through_grain(store):
    source = LatentSource(store)
    assert len(source) == 3 and source[-1]["index"] == 2
    with pytest.raises(IndexError):
        source[3]
    source = pickle.loads(pickle.dumps(source))  # as Grain worker processes get it
    ds = grain.MapDataset.source(source).shuffle(seed=0).batch(2)
    batch = ds[0]
    assert batch["latent"].shape == (2, 4, 1, 1, 16) and batch["latent"].dtype == np.float32
    assert batch["content"].shape == (2, 32, 32, 3) and batch["content"].dtype == np.uint8
    assert sorted(int(i) for b in ds for i in b["index"]) == [0, 1, 2]
    with pytest.raises(StoreError, match="save_moments"):
        LatentSource(store, arrays=("latent", "missing"))


def test_resume_skips_finished_shards(ckpt, store, tmp_path, capsys):
    copy = tmp_path / "store"
    _copy_tree(store, copy)
    (copy / "shard-00001" / "done").unlink()  # as if interrupted while writing shard 1
    with pytest.raises(StoreError, match="unfinished"):
        LatentSource(copy)
    assert len(LatentSource(copy, allow_partial=True)) == 2
    mtime = (copy / "shard-00000" / "latent" / "0.0.0.0.0").stat().st_mtime_ns
    extra = ["--data", "synthetic", "--num_clips", "3", "--num_shards", "2", "--save_moments"]
    capsys.readouterr()
    assert _encode(ckpt, copy, *extra) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["encoded_shards"] == ["shard-00001"]
    assert summary["skipped_shards"] == ["shard-00000"] and summary["encoded_clips"] == 1
    assert (copy / "shard-00000" / "latent" / "0.0.0.0.0").stat().st_mtime_ns == mtime
    for name in ("latent", "content"):
        np.testing.assert_array_equal(LatentSource(copy)[2][name], LatentSource(store)[2][name])
    assert _encode(ckpt, copy, *extra) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["encoded_clips"] == 0


def test_resume_with_other_settings_refused(ckpt, store, tmp_path, capsys):
    copy = tmp_path / "store"
    _copy_tree(store, copy)
    extra = ["--data", "synthetic", "--num_clips", "2", "--num_shards", "2", "--save_moments"]
    assert _encode(ckpt, copy, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different 'num_clips'" in err[0] and "--overwrite" in err[0]


def test_decode_cli_writes_mp4(ckpt, store, tmp_path, capsys):
    out = tmp_path / "videos"
    args = ["decode", "--store", str(store), "--checkpoint", str(ckpt), "--out", str(out)]
    assert main([*args, "--devices", "2", "--num_clips", "2", "--noprogress"]) == 0
    files = sorted(out.glob("*.mp4"))
    assert [f.name[:6] for f in files] == ["000000", "000001"]
    with av.open(str(files[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (32, 32, 3)


def test_folder_with_a_bad_video(ckpt, tmp_path, capsys):
    """Readable files are encoded; an unreadable one is kept as an invalid row, counted in the
    summary and listed with its reason in skipped.jsonl."""
    folder = tmp_path / "videos"
    rng = np.random.default_rng(0)
    write_mp4(folder / "a.mp4", rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8), 16)
    (folder / "b.mp4").write_bytes(b"not a video")
    out = tmp_path / "store"
    capsys.readouterr()
    assert _encode(ckpt, out, "--data", str(folder)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["files_read"], summary["clips_used"], summary["files_skipped"]) == (2, 1, 1)
    clips = json.loads((out / "shard-00000" / "clips.json").read_text())
    assert [c["valid"] for c in clips] == [True, False]
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["name"] for s in skipped] == [str(folder / "b.mp4")] and skipped[0]["reason"]
    source = LatentSource(out)
    assert len(source) == 1 and source[0]["content"].shape == (32, 32, 3)


def test_cli_errors(ckpt, tmp_path, capsys):
    assert _encode(ckpt, tmp_path / "s", "--data", str(tmp_path / "missing")) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    args = ["decode", "--store", str(tmp_path), "--checkpoint", str(ckpt), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a latent store" in err[0]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    assert _encode(ckpt, tmp_path / "junk", "--data", "synthetic", "--num_clips", "1") == 2
    assert "not a latent store" in capsys.readouterr().err


def _copy_tree(src: pathlib.Path, dst: pathlib.Path) -> None:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
