"""Hostile files in a video folder (docs/data.md, "Hostile videos"): each is either decoded
correctly or skipped with one warning and counted; a dead decode worker ends in an error, not
a hang. Every file is made here with PyAV and kept tiny."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
from fractions import Fraction

import av
import jax
import numpy as np
import psutil
import pytest
from data_video_helpers import frame_ids, write_video

from reducio_jax.data import DataError, get_config, make_loader
from reducio_jax.data.errors import BadVideoError
from reducio_jax.data.sources import FolderSource
from reducio_jax.data.video import ClipSpec, decode_clip, not_a_video_reason
from reducio_jax.sharding import make_mesh

SPEC = ClipSpec(num_frames=8, fps=16, height=32, width=32)
INDEX = list(range(8))


def _write(path, n, *, codec="libx264", pix_fmt="yuv420p", size=(32, 48), rotation=None,
           pts_ms=None, options=None, container_options=None, marker=False) -> pathlib.Path:  # fmt: skip
    """n "index" frames (grey 10 + 6 i) of size (H, W) at 16 fps, or at `pts_ms` times."""
    h, w = size
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=16)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.options = {"preset": "ultrafast", "g": "8"} if codec == "libx264" else {}
        s.options.update(options or {})
        if rotation is not None:
            s.set_display_rotation(rotation)
        if pts_ms is not None:
            s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            rgb = np.full((h, w, 3), 10 + 6 * i, np.uint8)
            if marker:
                rgb[: h // 4, : w // 4] = 250  # bright top-left corner
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[i]), Fraction(1, 1000)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def _bad(path, match: str) -> None:
    with pytest.raises(BadVideoError, match=match):
        decode_clip(str(path), SPEC)


# -- skipped ----------------------------------------------------------------------------------------


def test_empty_file(tmp_path):
    (tmp_path / "e.mp4").write_bytes(b"")
    _bad(tmp_path / "e.mp4", "empty file")


def test_text_renamed_mp4(tmp_path):
    (tmp_path / "t.mp4").write_text("just some notes\n" * 50)
    _bad(tmp_path / "t.mp4", "not a readable video")


def test_truncated_mid_stream_keeps_the_frames_before_the_cut(tmp_path):
    """moov atom first (faststart), last 40% of the bytes gone: a clip inside the kept part is
    decoded, one past the cut is too short."""
    full = _write(tmp_path / "full.mp4", 40, container_options={"movflags": "faststart"})
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert frame_ids(decode_clip(str(cut), SPEC)) == INDEX
    with pytest.raises(BadVideoError, match="too short|cut short|no decodable"):
        decode_clip(str(cut), SPEC, start=1.9)  # frames 30..37: after the cut


def test_zero_decodable_frames(tmp_path):
    """Header and index intact, every compressed frame overwritten."""
    data = bytearray(_write(tmp_path / "ok.mp4", 12, container_options={"movflags": "faststart"})
                     .read_bytes())  # fmt: skip
    start = data.find(b"mdat") + 4
    data[start:] = b"\x00" * (len(data) - start)
    (tmp_path / "zeros.mp4").write_bytes(bytes(data))
    _bad(tmp_path / "zeros.mp4", "no decodable frames")


def test_fewer_frames_than_a_clip(tmp_path):
    _bad(_write(tmp_path / "short.mp4", 5), "too short: 5 of 8 frames")


def test_a_folders_other_files_are_named_once(tmp_path, caplog):
    write_video(tmp_path / "a.mp4", 8, 16)
    (tmp_path / "notes.txt").write_text("not a video")
    with caplog.at_level(logging.WARNING, logger="reducio_jax.data.sources"):
        source = FolderSource(str(tmp_path), SPEC)
    assert len(source) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}: 1 file(s) not read: {tmp_path / 'notes.txt'} ({not_a_video_reason('notes.txt')})"
    ]


def test_file_disappears_between_listing_and_reading(tmp_path):
    write_video(tmp_path / "a.mp4", 8, 16)
    source = FolderSource(str(tmp_path), SPEC)
    (tmp_path / "a.mp4").unlink()
    with pytest.raises(BadVideoError, match="file not found"):
        source.load(0, None)


# -- used -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "codec", "pix_fmt", "size"),
    [
        ("odd.mp4", "libx264", "yuv444p", (143, 177)),  # odd sizes need 4:4:4 for x264
        ("gray.mkv", "ffv1", "gray", (32, 48)),
        ("yuv444.mp4", "libx264", "yuv444p", (32, 48)),
        ("tenbit.mp4", "libx264", "yuv420p10le", (32, 48)),
    ],
)
def test_pixel_formats_and_odd_sizes_decode(tmp_path, name, codec, pix_fmt, size):
    path = _write(tmp_path / name, 8, codec=codec, pix_fmt=pix_fmt, size=size)
    with av.open(str(path)) as c:  # the file really has that format
        stream = c.streams.video[0]
        assert (stream.codec_context.pix_fmt, stream.height, stream.width) == (pix_fmt, *size)
    clip = decode_clip(str(path), SPEC)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8
    assert frame_ids(clip) == INDEX
    grey = np.asarray([10 + 6 * i for i in INDEX], float)
    np.testing.assert_allclose(clip.reshape(8, -1).mean(axis=1), grey, atol=2.5)


def test_rotation_metadata_gives_upright_clips(tmp_path):
    """Stored 48 wide x 32 high with a bright top-left corner, displayed turned 90 degrees
    counter-clockwise: 32 wide x 48 high, the corner at the bottom left."""
    path = _write(tmp_path / "rot.mp4", 8, size=(32, 48), rotation=90, marker=True)
    spec = ClipSpec(num_frames=8, fps=16, height=48, width=32)
    clip = decode_clip(str(path), spec)  # the upright size: no resize, no crop
    assert clip.shape == (8, 48, 32, 3)
    assert clip[0, -3:, :3].min() > 200 and clip[0, :3, :3].max() < 60
    assert clip[0, -3:, -3:].max() < 60  # bottom right: not the marker


def test_variable_frame_rate_sample_and_hold(tmp_path):
    """Irregular timestamps: output frame k is the last frame shown at k / 16 s."""
    gaps = [40, 80, 40, 120, 60, 60, 100, 40, 40, 200, 50, 50]
    pts = np.cumsum([0, *gaps])  # ms
    path = _write(tmp_path / "vfr.mkv", len(pts), codec="ffv1", pts_ms=pts)
    expected = [int(np.searchsorted(pts, k * 1000 / 16, side="right")) - 1 for k in range(8)]
    assert len(set(expected)) < 8  # some frames are held, some dropped
    assert frame_ids(decode_clip(str(path), SPEC)) == expected


_PEAK = """
import sys
import av
import jax
from reducio_jax.data.video import ClipSpec, decode_clip, not_a_video_reason
def status(key):  # bytes
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := current RSS
before = status("VmRSS")
if sys.argv[2] == "clip":
    decode_clip(sys.argv[1], ClipSpec(num_frames=16, fps=16, height=32, width=32))
else:  # the decoder alone, same threading, no conversion
    with av.open(sys.argv[1]) as c:
        c.streams.video[0].thread_type = "AUTO"
        assert sum(1 for _ in c.decode(video=0)) == 16
print(max(status("VmHWM") - before, 0))
"""


def _peak_growth(path: pathlib.Path, mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-c", _PEAK, str(path), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout)


def test_huge_frames_are_resized_frame_by_frame(tmp_path):
    """1920x1080 (docs/data.md has the 7680x4320 figures): decoding a 16-frame 32x32 clip
    needs no more memory than the decoder itself plus less than one full-resolution RGB frame
    (a full-resolution clip would be 16 x 1080 x 1920 x 3 = 100 MB)."""
    path = _write(tmp_path / "big.mp4", 16, size=(1080, 1920))
    clip = decode_clip(str(path), ClipSpec(num_frames=16, fps=16, height=32, width=32))
    assert clip.shape == (16, 32, 32, 3) and frame_ids(clip) == list(range(16))
    decoder, total = _peak_growth(path, "decoder"), _peak_growth(path, "clip")
    frame = 1080 * 1920 * 3
    assert total - decoder < frame, f"decoder {decoder / 1e6:.1f} MB, clip {total / 1e6:.1f} MB"


# -- through the pipeline ---------------------------------------------------------------------------


def _mesh():
    return make_mesh({"data": 2, "fsdp": 1}, devices=jax.devices()[:2])


def test_mixed_folder_each_bad_file_warned_once_and_counted(tmp_path, caplog):
    good = {
        "a_plain.mp4": _write(tmp_path / "a_plain.mp4", 8),
        "b_odd.mp4": _write(tmp_path / "b_odd.mp4", 8, pix_fmt="yuv444p", size=(143, 177)),
        "c_gray.mkv": _write(tmp_path / "c_gray.mkv", 8, codec="ffv1", pix_fmt="gray"),
        "d_rot.mp4": _write(tmp_path / "d_rot.mp4", 8, rotation=270),
    }
    (tmp_path / "e_empty.mp4").write_bytes(b"")
    (tmp_path / "f_text.mp4").write_text("hello\n")
    _write(tmp_path / "g_short.mp4", 3)
    _write(tmp_path / "h_gone.mp4", 8)
    cfg = get_config()
    cfg.update(source="folder", path=str(tmp_path), num_frames=8, resolution=32, batch_size=2)
    cfg.num_epochs = 2  # every file met twice: still one warning each
    with caplog.at_level(logging.WARNING), make_loader(cfg, mesh=_mesh(), train=True) as loader:
        (tmp_path / "h_gone.mp4").unlink()  # after the listing
        batches = list(loader)
        stats = loader.stats()
    assert len(batches) == 8  # 16 positions, every bad one replaced by a readable clip
    used = {loader.source.name(int(i)) for b in batches for i in np.asarray(b["index"])}
    assert used == {str(p) for p in good.values()}
    bad = ["e_empty.mp4", "f_text.mp4", "g_short.mp4", "h_gone.mp4"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(next(n for n in bad if n in w) for w in warnings) == bad  # one each
    assert stats["files_skipped"] == 4 and stats["files_read"] == 8
    assert stats["skipped"] >= 8  # events: each bad file met in both epochs, maybe more
    reasons = {
        pathlib.Path(e["name"]).name: e["reason"] for e in loader.skip_report.entries.values()
    }
    assert "empty" in reasons["e_empty.mp4"] and "not found" in reasons["h_gone.mp4"]
    assert "too short" in reasons["g_short.mp4"] and "not a readable" in reasons["f_text.mp4"]
    report = loader.skip_report.write(tmp_path / "skipped.jsonl")
    assert len([json.loads(x) for x in report.read_text().splitlines()]) == 4


def test_dead_worker_process_is_an_error_not_a_hang(tmp_path):
    for i in range(4):
        write_video(tmp_path / f"v{i}.mp4", 24, 16)
    cfg = get_config()
    cfg.update(source="folder", path=str(tmp_path), num_frames=8, resolution=32, batch_size=2)
    cfg.num_workers = 2
    signal.alarm(120)  # a hang fails the test instead of blocking the suite
    try:
        loader = make_loader(cfg, mesh=_mesh(), train=True)
        next(loader)
        workers = [p for p in psutil.Process().children() if "resource_tracker" not in
                   " ".join(p.cmdline())]  # fmt: skip
        assert workers
        workers[0].kill()
        with pytest.raises(DataError, match="data pipeline failed"):
            for _ in range(100):
                next(loader)
        loader.close()
    finally:
        signal.alarm(0)
