"""Whole videos in the latent store: `encode --whole_videos`, `VideoLatent`s read back,
`decode` to files of the original length and size, `LatentSource` windows, resuming.

Real mp4 files written and read with PyAV; the tiny config at 32x40 px (padded to 32x64)."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import pickle
import shutil

import av
import grain
import jax
import numpy as np
import pytest
from flax import nnx
from helpers import recipe_checkpoint, write_audio_only, write_gif

from reducio_jax.__main__ import main
from reducio_jax.data import video_to_float
from reducio_jax.latents import LatentSource, LatentStore, StoreError
from reducio_jax.latents.videos import decode_video_frames
from reducio_jax.runs.runtime import load_vae, local_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
LENGTHS = {"1_long.mp4": 40, "2_short.mp4": 20}  # 3 and 2 windows at overlap 4
HEIGHT, WIDTH = 32, 40
FLAGS = ["--devices", "2", "--window_batch", "2", "--noprogress"]


def _frames(num_frames: int, seed: int) -> np.ndarray:
    """uint8 (N, H, W, 3): a smooth pattern moving over the frame (compresses well)."""
    t = np.arange(num_frames)[:, None, None, None]
    y = np.arange(HEIGHT)[None, :, None, None]
    x = np.arange(WIDTH)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    wave = np.sin(2 * np.pi * (x / WIDTH + t / 30 + seed / 7) + c) * np.cos(y / 9 - t / 20)
    return np.round((0.7 * wave + 1) * 127.5).astype(np.uint8)


def _write(path: pathlib.Path, frames: np.ndarray, **options) -> None:
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=16)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _read(path: pathlib.Path) -> np.ndarray:
    """Every frame that decodes (a truncated file: up to the first error)."""
    frames = []
    with av.open(str(path)) as container:
        with contextlib.suppress(av.FFmpegError):
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
    return np.stack(frames)


def _encode(ckpt, data, out, *extra) -> int:
    args = ["encode", "--checkpoint", str(ckpt), "--config", TINY, "--data", str(data)]
    return main([*args, "--out", str(out), "--whole_videos", *FLAGS, *extra])


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ckpt(fixtures_dir, tmp_path_factory) -> pathlib.Path:
    return recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """A file that is not a video, two videos of different lengths, a truncated video."""
    root = tmp_path_factory.mktemp("videos")
    (root / "0_bad.mp4").write_bytes(b"not a video")
    for seed, (name, length) in enumerate(LENGTHS.items()):
        _write(root / name, _frames(length, seed))
    _write(root / "full.mp4", _frames(40, 2), movflags="+faststart")
    data = (root / "full.mp4").read_bytes()
    (root / "3_cut.mp4").write_bytes(data[: len(data) * 6 // 10])  # index kept, frames cut
    (root / "full.mp4").unlink()
    return root


@pytest.fixture(scope="module")
def encoded(ckpt, folder, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """The store (2 shards: bad + long, short + cut), the encode summary and its warnings."""
    out = tmp_path_factory.mktemp("latents") / "store"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert _encode(ckpt, folder, out, "--num_shards", "2") == 0
    summary = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return out, summary, stderr.getvalue().strip().splitlines()


@pytest.fixture(scope="module")
def mesh():
    return local_mesh(2)


@pytest.fixture(scope="module")
def vae(ckpt, mesh):
    return load_vae(ckpt, TINY, mesh)


def test_summary_records_and_warnings(encoded, folder):
    store, summary, warnings = encoded
    records = [v for _, v in LatentStore(store).videos(valid_only=False)]
    assert [r["valid"] for r in records] == [False, True, True, True]
    assert "not a readable video" in records[0]["error"]
    for record in records[1:3]:
        assert record["num_frames"] == LENGTHS[pathlib.Path(record["name"]).name]
        assert record["lost_frames"] == 0
    cut = records[3]
    kept = cut["num_frames"]
    assert 16 < kept < 40 and cut["lost_frames"] == 40 - kept  # stored as far as it decodes
    for record in records[1:]:
        assert (record["height"], record["width"], record["fps"]) == (HEIGHT, WIDTH, 16)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("warning: skipped: ") and "0_bad.mp4" in warnings[0]
    assert f"decoded {kept} of 40 frames; {40 - kept} lost" in warnings[1]
    windows = sum(len(r["starts"]) for r in records[1:])
    assert summary["encoded_videos"] == 3 and summary["encoded_windows"] == windows
    assert summary["skipped_videos"] == [str(folder / "0_bad.mp4")]
    assert summary["encoded_shards"] == ["shard-00000", "shard-00001"]
    meta = json.loads((store / "store.json").read_text())
    assert meta["kind"] == "videos" and meta["num_videos"] == 4
    assert meta["video"]["overlap"] == 4 and meta["video"]["window"] == 16


def test_stored_video_latents_equal_encode_video(encoded, folder, vae):
    """Streamed window batch by window batch through the store = `encode_video` at once."""
    store = LatentStore(encoded[0])
    for shard, record in store.videos():
        frames = _read(pathlib.Path(record["name"]))  # the file's frames, as the encoder saw them
        # converted as the data loader converts frames, two windows per call as the store
        expected = vae.encode_video(video_to_float(frames[None]), window_batch=2)
        got = store.video_latent(shard, record)
        assert got.starts == expected.starts and got.num_frames == frames.shape[0]
        assert (got.height, got.width, got.overlap) == (HEIGHT, WIDTH, expected.overlap)
        assert got.latents.shape == expected.latents.shape  # (1, K, t, h, w, z)
        np.testing.assert_allclose(got.latents, np.asarray(expected.latents), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.content_frames, np.asarray(expected.content_frames))
        zarray = store.root / f"shard-{shard:05d}" / f"video-{record['index']:06d}" / "latent"
        chunks = json.loads((zarray / ".zarray").read_text())["chunks"]
        assert chunks == [1, *expected.latents.shape[2:]]  # one window per chunk


def test_streamed_decode_equals_decode_video(encoded, vae, mesh):
    """The long video: 3 windows in 2 calls (the second padded), 2 fades, cropped to 32x40."""
    store = LatentStore(encoded[0])
    shard, record = store.videos()[0]
    parts = list(decode_video_frames(vae, store, shard, record, mesh, batch=2))
    streamed = np.concatenate(parts)
    whole = np.asarray(vae.decode_video(store.video_latent(shard, record), window_batch=2))[0]
    assert streamed.shape == (40, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(streamed, whole, atol=1e-5, rtol=0)


def test_decode_cli_writes_original_length_and_size(encoded, ckpt, tmp_path, capsys):
    out = tmp_path / "decoded"
    args = ["decode", "--store", str(encoded[0]), "--checkpoint", str(ckpt), "--out", str(out)]
    flags = ["--devices", "2", "--batch_size", "2", "--num_clips", "2", "--noprogress"]
    assert main([*args, *flags]) == 0  # the first two stored videos
    assert _summary(capsys)["videos"] == 2
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["000001_1_long.mp4", "000002_2_short.mp4"]
    for path, length in zip(files, LENGTHS.values(), strict=True):
        assert _read(path).shape == (length, HEIGHT, WIDTH, 3)


def test_decode_batch_from_memory(encoded, ckpt, vae, mesh, tmp_path, capsys):
    """By default the windows a call come from the memory analysis of the decoder split over
    the 2 devices for the stored frame size (one window a device on the CPU); a budget under
    one window a device fails before any file is written."""
    args = ["decode", "--store", str(encoded[0]), "--checkpoint", str(ckpt), "--devices", "2"]
    out = tmp_path / "decoded"
    assert main([*args, "--out", str(out), "--num_clips", "1", "--noprogress"]) == 0
    resident = sum(x.nbytes for x in jax.tree.leaves(nnx.state(vae.model)))
    need = vae.programs.footprint("decode", 2, (32, 64), None, mesh=mesh).need(resident)
    memory = {"size": [32, 40], "window_batch": 2, "tiled": False, "memory_per_call": need}
    assert _summary(capsys)["memory"] == [memory]
    assert _read(out / "000001_1_long.mp4").shape == (40, HEIGHT, WIDTH, 3)
    small = tmp_path / "small"
    assert main([*args, "--out", str(small), "--max_memory", "1MB", "--noprogress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough memory: one 32x64 window on each of 2 devices needs" in err[0], err
    assert not small.exists()


def test_latent_source_gives_windows(encoded):
    store = LatentStore(encoded[0])
    source = pickle.loads(pickle.dumps(LatentSource(encoded[0])))  # as Grain workers get it
    items = [source[i] for i in range(len(source))]
    keys = [(int(x["index"]), int(x["window"]), int(x["start"])) for x in items]
    assert keys[:5] == [(1, 0, 0), (1, 1, 12), (1, 2, 24), (2, 0, 0), (2, 1, 4)]  # 40, 20 frames
    (_, cut) = store.videos()[2]
    assert keys[5:] == [(3, k, s) for k, s in enumerate(cut["starts"])]
    (shard, record) = store.videos()[0]
    latent = store.video_latent(shard, record)
    np.testing.assert_array_equal(items[2]["latent"], latent.latents[0, 2])
    assert items[2]["content"].dtype == np.uint8 and items[2]["content"].shape == (32, 64, 3)
    batch = grain.MapDataset.source(source).shuffle(seed=0).batch(len(source))[0]
    assert batch["latent"].shape == (len(source), *latent.latents.shape[2:])
    assert sorted(batch["start"].tolist()) == sorted(s for _, _, s in keys)
    with pytest.raises(IndexError):
        source[len(source)]


def test_resume_encodes_only_the_unfinished_shard(encoded, ckpt, folder, tmp_path, capsys):
    copy = tmp_path / "store"
    shutil.copytree(encoded[0], copy, copy_function=shutil.copy2)
    (copy / "shard-00001" / "done").unlink()  # as if interrupted in the short or cut video
    with pytest.raises(StoreError, match="unfinished"):
        LatentSource(copy)
    chunk = copy / "shard-00000" / "video-000001" / "latent" / "0.0.0.0.0"
    mtime = chunk.stat().st_mtime_ns
    capsys.readouterr()
    assert _encode(ckpt, folder, copy, "--num_shards", "2") == 0
    summary = _summary(capsys)
    assert summary["encoded_shards"] == ["shard-00001"]
    again = [len(v["starts"]) for shard, v in LatentStore(copy).videos() if shard == 1]
    assert summary["skipped_shards"] == ["shard-00000"] and summary["encoded_windows"] == sum(again)
    assert chunk.stat().st_mtime_ns == mtime
    resumed, first = LatentSource(copy), LatentSource(encoded[0])
    assert len(resumed) == len(first)
    for i in range(len(first)):
        np.testing.assert_array_equal(resumed[i]["latent"], first[i]["latent"])
    assert _encode(ckpt, folder, copy, "--num_shards", "2", "--overlap", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different 'video'" in err[0] and "--overwrite" in err[0]


def test_files_that_are_not_videos_are_named_and_listed(ckpt, tmp_path, capsys):
    """A folder's .gif, audio-only .m4a and .txt: one `skipped:` line each, in the summary's
    skipped_videos, not in the store; the video beside them is stored."""
    root = tmp_path / "videos"
    root.mkdir()
    _write(root / "a.mp4", _frames(16, 0))
    write_gif(root / "anim.gif")
    write_audio_only(root / "song.m4a")
    (root / "notes.txt").write_text("not a video\n")
    assert _encode(ckpt, root, tmp_path / "store") == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    others = [str(root / n) for n in ("anim.gif", "notes.txt", "song.m4a")]
    assert summary["skipped_videos"] == others and summary["encoded_videos"] == 1
    warnings = err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: skipped: ") for w in warnings), err
    for name, warning in zip(others, warnings, strict=True):
        assert f"skipped: {name}: " in warning
    records = [v for _, v in LatentStore(tmp_path / "store").videos(valid_only=False)]
    assert [(pathlib.Path(r["name"]).name, r["valid"]) for r in records] == [("a.mp4", True)]


def test_bad_input_and_wrong_readers(encoded, ckpt, folder, tmp_path, capsys):
    cases = [
        (["--data", "synthetic"], "reads video files"),
        (["--data", str(folder), "--batch_size", "2"], "--batch_size does not apply"),
        (["--data", str(folder), "--overlap", "9"], "--overlap"),
        (["--data", str(folder), "--window_batch", "3"], "multiple of the 2 device"),
        (["--data", str(folder), "--max_memory", "1MB"], "1_long.mp4: not enough memory: one"),
    ]
    for extra, message in cases:
        args = ["encode", "--checkpoint", str(ckpt), "--config", TINY, "--out", str(tmp_path / "s")]
        assert main([*args, "--whole_videos", *extra, "--devices", "2", "--noprogress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    args = ["encode", "--checkpoint", str(ckpt), "--config", TINY, "--out", str(tmp_path / "c")]
    assert main([*args, "--data", "synthetic", "--overlap", "2", "--noprogress"]) == 2
    assert "only apply with --whole_videos" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()
    with pytest.raises(StoreError, match="whole_videos"):
        LatentStore(encoded[0]).entries()
