"""Video files: listing, decoding with PyAV, fps resampling, resize and crop; writing mp4s.

Frame-rate rule ("sample and hold"): output frame ``k`` shows the source frame that is on
screen at time ``start + k / fps``, i.e. the last source frame whose timestamp is
``<= start + k / fps``. A 32 fps file therefore gives every other frame (0, 2, 4, ...),
an 8 fps file repeats each frame twice (0, 0, 1, 1, ...). A file is too short when the
last target time is not covered by a decoded frame (a frame covers one source frame
duration after its timestamp).

Frames are converted one at a time, straight from the decoder's pixel format (any: yuv420p,
yuv444p, gray, 10-bit, ...) to RGB at the size that covers the output (swscale, area
interpolation), so memory holds one resized clip, never a full-resolution one; a display
rotation (phone videos: multiples of 90 degrees in the stream's display matrix) is applied, so
clips are upright. Unusable files raise `BadVideoError` with a short reason: missing, empty,
not a video, no video stream, no decodable frames, corrupt/truncated, too short.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

from reducio_jax.data.errors import BadVideoError, DataError
from reducio_jax.storage.paths import (
    Path,
    PathLike,
    as_path,
    files_under,
    is_remote,
    open_media,
    staged,
)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
_TOL = 0.1  # timestamps within 10% of a frame period count as equal (ms time bases)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """What to cut from a video: ``num_frames`` at ``fps``, ``height`` x ``width`` pixels."""

    num_frames: int
    fps: float
    height: int
    width: int
    random_start: bool = False  # else start at the first frame
    random_crop: bool = False  # else centre crop


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (clamped, rounded): the inverse of the loader's
    `uint8 / 127.5 - 1`."""
    x = (np.clip(np.asarray(video, np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(x).astype(np.uint8)


def parse_resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``256`` -> ``(256, 256)``; ``(H, W)`` -> ``(H, W)``."""
    if isinstance(resolution, int | np.integer):
        return int(resolution), int(resolution)
    h, w = (int(x) for x in resolution)
    return h, w


def list_videos(path: PathLike) -> list[str]:
    """Sorted video files under a folder (recursive), the lines of a list file, or one file;
    local or in a bucket (`gs://...`).

    Raises:
      DataError: when the path is missing or holds no video.
    """
    p = as_path(path) if os.fspath(path) else None
    if p is None or not p.exists():
        raise DataError(
            f"Video path '{path}' does not exist: set data.path to a folder of videos "
            "(mp4, webm, mov, avi) or to a text file listing one video per line."
        )
    if p.is_dir():
        files = sorted(os.fspath(f) for f in files_under(p) if f.suffix.lower() in VIDEO_EXTENSIONS)
    elif p.suffix.lower() in VIDEO_EXTENSIONS:
        files = [os.fspath(p)]
    else:
        files = _read_list_file(p)
    if not files:
        raise DataError(
            f"No video files (mp4, webm, mov, avi) found in '{path}': put videos there or "
            "point data.path at a folder or list file that has some."
        )
    return files


def _read_list_file(p: Path) -> list[str]:
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    return [os.fspath(p.parent / ln) if not _absolute(ln) else ln for ln in lines if ln]


def _absolute(line: str) -> bool:
    return os.path.isabs(line) or is_remote(line)


def cover_size(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Smallest (h', w') with the aspect of (h, w) that covers (out_h, out_w)."""
    scale = max(out_h / h, out_w / w)
    return max(out_h, round(h * scale)), max(out_w, round(w * scale))


def crop_offsets(
    h: int, w: int, out_h: int, out_w: int, rng: np.random.Generator | None
) -> tuple[int, int]:
    """Top-left corner of the crop: random when ``rng`` is given, else centred."""
    if rng is None:
        return (h - out_h) // 2, (w - out_w) // 2
    return int(rng.integers(0, h - out_h + 1)), int(rng.integers(0, w - out_w + 1))


def resize_and_crop(
    frames: np.ndarray, spec: ClipSpec, rng: np.random.Generator | None
) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, H, W, 3) uint8: resize to cover, then crop."""
    _, h, w, _ = frames.shape
    rh, rw = cover_size(h, w, spec.height, spec.width)
    if (rh, rw) != (h, w):
        frames = np.stack([_resize_rgb(f, rh, rw) for f in frames])
    y, x = crop_offsets(rh, rw, spec.height, spec.width, rng if spec.random_crop else None)
    return np.ascontiguousarray(frames[:, y : y + spec.height, x : x + spec.width])


def _resize_rgb(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    return vf.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")


def decode_clip(
    path: str,
    spec: ClipSpec,
    rng: np.random.Generator | None = None,
    *,
    start: float | None = None,
) -> np.ndarray:
    """Decodes one clip: (T, H, W, 3) uint8 at ``spec.fps``.

    The clip starts ``start`` seconds after the first frame; if ``start`` is None, at a
    random time when ``spec.random_start`` and ``rng`` are set, else at the first frame.

    Raises:
      BadVideoError: unreadable, corrupt, truncated or too short file.
    """
    try:
        if as_path(path).stat().length == 0:
            raise BadVideoError("empty file (0 bytes)")
        with open_media(path) as source, av.open(source) as container:
            return _decode(container, spec, rng, start)
    except BadVideoError:
        raise
    except FileNotFoundError as e:
        raise BadVideoError("file not found (moved or deleted after the listing)") from e
    except Exception as e:  # any decoder failure means a bad file
        msg = " ".join(str(e).replace(f": '{path}'", "").split()) or "no details"
        raise BadVideoError(f"not a readable video ({type(e).__name__}: {msg})") from e


def _decode(container, spec: ClipSpec, rng, start: float | None) -> np.ndarray:
    if not container.streams.video:
        raise BadVideoError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    tb = float(stream.time_base) if stream.time_base else 1.0
    t0 = stream.start_time * tb if stream.start_time is not None else 0.0
    src_dt = 1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / spec.fps
    if start is None:
        start = _pick_start(container, stream, spec, rng)
    if start > 0:
        container.seek(int((t0 + start) / tb), stream=stream)
    targets = t0 + start + np.arange(spec.num_frames) / spec.fps  # (T,) seconds
    return _sample_frames(container.decode(stream), targets, src_dt, spec, rng)


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _pick_start(container, stream, spec: ClipSpec, rng: np.random.Generator | None) -> float:
    if not spec.random_start or rng is None:
        return 0.0
    duration = _duration(container, stream)
    if duration is None:
        return 0.0
    latest = duration - spec.num_frames / spec.fps
    return float(rng.uniform(0.0, latest)) if latest > 0 else 0.0


def _sample_frames(frames, targets: np.ndarray, src_dt: float, spec: ClipSpec, rng) -> np.ndarray:
    """Sample-and-hold: for each target time the last frame with timestamp <= it."""
    eps = _TOL * min(src_dt, 1.0 / spec.fps)  # seconds
    out: list[np.ndarray] = []
    geom: list = []  # (resize h, resize w, crop y, crop x), fixed by the first frame used
    cache: list = [None, None]  # [frame, its (H, W, 3) array]: convert each frame once

    def rgb(f) -> np.ndarray:
        if cache[0] is not f:
            cache[:] = [f, _to_rgb(f, spec, geom, rng)]
        return cache[1]

    prev, prev_t, decoded = None, None, 0
    frames = _FramesUntilError(frames)
    for frame in frames:
        decoded += 1
        t = _frame_time(frame, prev_t, src_dt)
        while len(out) < len(targets) and t > targets[len(out)] + eps:
            out.append(rgb(prev if prev is not None else frame))  # None: seek landed late
        if len(out) == len(targets):
            break
        prev, prev_t = frame, t
    while (
        prev is not None and len(out) < len(targets) and targets[len(out)] < prev_t + src_dt - eps
    ):
        out.append(rgb(prev))  # end of stream: the last frame covers one frame duration
    if decoded == 0:
        raise BadVideoError(f"no decodable frames{frames.error}")
    if len(out) < len(targets):
        raise BadVideoError(
            f"too short: {len(out)} of {len(targets)} frames at {spec.fps} fps{frames.error}"
        )
    return np.stack(out)  # (T, H, W, 3)


class _FramesUntilError:
    """The decoded frames until the stream ends or a decode error (a truncated or corrupt
    file); `error` then describes the error (else "")."""

    def __init__(self, frames):
        self.frames, self.error = frames, ""

    def __iter__(self):
        try:
            yield from self.frames
        except av.error.FFmpegError as e:  # InvalidDataError, EOFError, ...
            msg = " ".join(str(e).split()) or type(e).__name__
            self.error = f" (stream cut short or corrupt: {msg})"


def _frame_time(frame, prev_t: float | None, src_dt: float) -> float:
    if frame.pts is not None and frame.time is not None:
        return float(frame.time)
    return 0.0 if prev_t is None else prev_t + src_dt


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that make the frame upright (its display matrix)."""
    try:
        degrees = float(frame.rotation or 0)
    except (AttributeError, ValueError, TypeError):
        return 0
    return round(degrees / 90) % 4


def _to_rgb(frame, spec: ClipSpec, geom: list, rng) -> np.ndarray:
    """One decoded frame -> (H, W, 3) uint8: rotated upright, resized to cover, cropped.
    Converted straight from the decoder's pixel format at the resized size (no full-size
    RGB copy)."""
    if not geom:
        turns = _quarter_turns(frame)
        h, w = (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)
        rh, rw = cover_size(h, w, spec.height, spec.width)  # upright size
        y, x = crop_offsets(rh, rw, spec.height, spec.width, rng if spec.random_crop else None)
        geom.extend((turns, rh, rw, y, x))
    turns, rh, rw, y, x = geom
    sh, sw = (rw, rh) if turns % 2 else (rh, rw)  # the stored (unrotated) orientation
    arr = frame.to_ndarray(format="rgb24", width=sw, height=sh, interpolation="AREA")
    if turns:
        arr = np.rot90(arr, turns)
    return arr[y : y + spec.height, x : x + spec.width]


# -- writing ------------------------------------------------------------------------------------


def write_mp4(path: PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """uint8 (T, H, W, 3) -> H.264 mp4 (yuv420p; odd sizes are padded by one pixel)."""
    frames = np.asarray(frames, np.uint8)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with staged(path, suffix=".mp4") as local, av.open(str(local), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def safe_stem(name: str) -> str:
    """A file-name-safe short stem of a clip name (file path, TFDS id, synthetic/i)."""
    stem = pathlib.PurePath(name.split("#", 1)[0]).stem or "clip"
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return keep[:60]
