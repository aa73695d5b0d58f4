"""PyAV decoding: frame counts, fps resampling, seeking, crop geometry, bad files."""

from __future__ import annotations

import pathlib

import av
import numpy as np
import pytest
from data_video_helpers import frame_ids, write_video

from reducio_jax.config import frame_size
from reducio_jax.data.errors import BadVideoError, DataError
from reducio_jax.data.video import ClipSpec, decode_clip, find_videos, list_videos, write_mp4

SPEC = ClipSpec(num_frames=16, fps=16, height=32, width=32)


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mov", ".avi"])
def test_formats_decode_16_frames_in_order(video_dir: pathlib.Path, ext: str) -> None:
    path = sorted(video_dir.glob(f"*{ext}"))[0]
    clip = decode_clip(str(path), SPEC)
    assert clip.shape == (16, 32, 32, 3) and clip.dtype == np.uint8
    assert frame_ids(clip) == list(range(16))


@pytest.mark.parametrize(
    ("src_fps", "frames", "expected"),
    [
        (32, 40, list(range(0, 32, 2))),  # every other frame
        (8, 10, [i // 2 for i in range(16)]),  # each frame held twice
        (16, 16, list(range(16))),  # exactly long enough
    ],
)
def test_fps_resampling(tmp_path: pathlib.Path, src_fps: int, frames: int, expected: list) -> None:
    path = write_video(tmp_path / "v.mp4", frames, src_fps)
    assert frame_ids(decode_clip(str(path), SPEC)) == expected


def test_seek_to_start_time(video_dir: pathlib.Path) -> None:
    spec = ClipSpec(num_frames=8, fps=16, height=32, width=32)
    for ext in (".mp4", ".webm", ".avi"):
        path = sorted(video_dir.glob(f"*{ext}"))[0]
        assert frame_ids(decode_clip(str(path), spec, start=0.75)) == list(range(12, 20))


def test_random_start_is_seeded_and_contiguous(video_dir: pathlib.Path) -> None:
    spec = ClipSpec(num_frames=8, fps=16, height=32, width=32, random_start=True)
    path = str(video_dir / "v0.mp4")
    starts = set()
    for seed in range(6):
        ids = frame_ids(decode_clip(path, spec, np.random.default_rng(seed)))
        again = frame_ids(decode_clip(path, spec, np.random.default_rng(seed)))
        assert ids == again and ids == list(range(ids[0], ids[0] + 8))
        assert 0 <= ids[0] <= 24 - 8
        starts.add(ids[0])
    assert len(starts) > 1


def test_center_and_random_crop_geometry(tmp_path: pathlib.Path) -> None:
    path = str(write_video(tmp_path / "ramp.mp4", 4, 16, kind="ramp"))  # pixel x = 4 x
    spec = ClipSpec(num_frames=2, fps=16, height=32, width=16)
    center = decode_clip(path, spec)  # 32x48 -> no resize, crop x in [16, 32)
    assert center.shape == (2, 32, 16, 3)
    np.testing.assert_allclose(center[0, 16, :, 1], 4 * np.arange(16, 32), atol=3)
    rand = ClipSpec(num_frames=2, fps=16, height=32, width=16, random_crop=True)
    offsets = set()
    for seed in range(8):
        clip = decode_clip(path, rand, np.random.default_rng(seed))
        x0 = int(round(clip[0, 16, 0, 1] / 4))
        np.testing.assert_allclose(clip[0, 16, :, 1], 4 * np.arange(x0, x0 + 16), atol=3)
        assert 0 <= x0 <= 32
        offsets.add(x0)
    assert len(offsets) > 2


def test_resize_short_side_then_crop(tmp_path: pathlib.Path) -> None:
    path = str(write_video(tmp_path / "ramp.mp4", 4, 16, kind="ramp"))  # 32x48
    clip = decode_clip(path, ClipSpec(num_frames=2, fps=16, height=64, width=64))
    assert clip.shape == (2, 64, 64, 3)  # resized to 64x96, centre columns 16..80
    row = clip[0, 32, :, 1].astype(float)
    np.testing.assert_allclose(row[[0, -1]], [4 * 7.75, 4 * 39.25], atol=4)


def _bad_files(tmp_path: pathlib.Path, good: pathlib.Path) -> dict[str, pathlib.Path]:
    data = good.read_bytes()
    files = {
        "truncated": tmp_path / "truncated.mp4",
        "zero": tmp_path / "zero.mp4",
        "text": tmp_path / "text.mp4",
        "short": write_video(tmp_path / "short.mp4", 5, 16),
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["zero"].write_bytes(b"")
    files["text"].write_text("this is not a video\n" * 20)
    return files


def test_bad_files_raise_bad_video_error(tmp_path: pathlib.Path, video_dir: pathlib.Path) -> None:
    for name, path in _bad_files(tmp_path, video_dir / "v0.mp4").items():
        with pytest.raises(BadVideoError):
            decode_clip(str(path), SPEC)
            pytest.fail(f"{name} decoded")


def test_list_videos_folder_list_file_and_errors(tmp_path: pathlib.Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "sub/a.webm", "c.AVI", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = list_videos(tmp_path)
    assert [pathlib.Path(f).name for f in found] == ["b.mp4", "c.AVI", "a.webm"]
    lst = tmp_path / "list.txt"
    lst.write_text("b.mp4\n\nsub/a.webm\n")
    assert list_videos(lst) == [str(tmp_path / "b.mp4"), str(tmp_path / "sub/a.webm")]
    with pytest.raises(DataError, match="does not exist"):
        list_videos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No video files"):
        list_videos(tmp_path / "empty")


def test_find_videos_names_every_other_file_of_a_folder(tmp_path: pathlib.Path) -> None:
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    names = ("b.mp4", "sub/a.webm", "anim.gif", "sub/song.M4A", "notes.txt", "README",
             ".DS_Store", "sub/.git/config")  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    listing = find_videos(tmp_path)
    assert listing.videos == list_videos(tmp_path) == [str(tmp_path / "b.mp4"),
                                                       str(tmp_path / "sub/a.webm")]  # fmt: skip
    passed = dict(listing.passed_over)  # hidden files (and a hidden folder's) left out
    assert sorted(passed) == sorted(str(tmp_path / n) for n in ("anim.gif", "sub/song.M4A",
                                                                "notes.txt", "README"))  # fmt: skip
    assert passed[str(tmp_path / "anim.gif")].startswith("not a video file this reads (.gif; it")
    assert passed[str(tmp_path / "sub/song.M4A")] == "an audio file (.m4a), not a video"
    assert passed[str(tmp_path / "README")].startswith("not a video file this reads (no extension")
    lst = tmp_path / "list.txt"  # a list file is taken as it is: nothing passed over
    lst.write_text("b.mp4\nanim.gif\n")
    assert find_videos(lst).passed_over == [] and len(find_videos(lst).videos) == 2
    (tmp_path / "gifs").mkdir()
    (tmp_path / "gifs" / "x.gif").write_bytes(b"x")
    with pytest.raises(DataError, match=r"No video files .*\(1 other file"):
        find_videos(tmp_path / "gifs")


@pytest.mark.parametrize("size, pix_fmt", [((32, 48), "yuv420p"), ((33, 35), "yuv444p")])
def test_write_mp4_keeps_the_frame_size(tmp_path: pathlib.Path, size, pix_fmt) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (3, *size, 3), dtype=np.uint8)
    write_mp4(tmp_path / "v.mp4", frames, 16)
    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt == pix_fmt and float(stream.average_rate) == 16
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert np.stack(decoded).shape == (3, *size, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no partial file left


def test_frame_size() -> None:
    assert frame_size(64) == frame_size(np.int64(64)) == (64, 64)
    assert frame_size((48, 64)) == frame_size([48, np.int32(64)]) == (48, 64)
