"""Video files, the one home of their reading and writing: listing a folder, decoding clips
for the data pipeline, streaming whole videos in (`reconstruct`, `encode --whole_videos`), and
writing H.264 files.

Listing (`find_videos`, `list_videos`): the video files under a folder (by extension, any
depth), the lines of a list file, or one file. A folder's other files are named with the reason
they are not read (`Listing.passed_over`), for the folder runs' `skipped: FILE: REASON`
warnings (`warn_passed_over`); hidden files (dot-files) that are not videos are left out.

Frame-rate rule ("sample and hold"): output frame ``k`` shows the source frame that is on
screen at time ``start + k / fps``, i.e. the last source frame whose timestamp is
``<= start + k / fps``. A 32 fps file therefore gives every other frame (0, 2, 4, ...),
an 8 fps file repeats each frame twice (0, 0, 1, 1, ...). A file is too short when the
last target time is not covered by a decoded frame (a frame covers one source frame
duration after its timestamp). `decode_clip` (a clip) and `resample` (a stream of frames)
both follow it.

Clips (`decode_clip`): frames are converted one at a time, straight from the decoder's pixel
format (any: yuv420p, yuv444p, gray, 10-bit, ...) to RGB at the size that covers the output
(swscale, area interpolation), so memory holds one resized clip, never a full-resolution one; a
display rotation (phone videos: multiples of 90 degrees in the stream's display matrix) is
applied, so clips are upright. Unusable files raise `BadVideoError` with a short reason:
missing, empty, not a video, no video stream, no decodable frames, corrupt/truncated, too short.

Whole videos: `probe` reads what the container says and decodes the first frame (an
`InputError` when the file cannot be used; `check_size` refuses frames under `MIN_SIZE` px),
`source_frames` yields every decodable frame at full size with its time, stopping at the first
decode error (`DecodeReport` says how many decoded and why it stopped; `lost_frames` counts the
rest), and `resample` holds them to a frame rate.

Writing: `VideoWriter` encodes H.264 frame by frame (yuv420p; yuv444p for odd frame sizes,
which keeps the exact size), `video_file` gives one whose file appears only complete
(`paths.staged`), and `write_mp4` writes a whole array through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av
import numpy as np

from reducio_jax.data.errors import BadVideoError, DataError
from reducio_jax.errors import InputError
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
# named as audio when a folder run passes them over (".ogg" may hold video: not listed)
AUDIO_EXTENSIONS = (".aac", ".aiff", ".flac", ".m4a", ".mp3", ".opus", ".wav", ".wma")
MIN_SIZE = 32  # pixels on each side: the model's spatial compression (`check_size`)
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


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a video path holds: `videos` to read (sorted), and `passed_over`, (file, reason)
    for each other file of a folder (a list file or one file passes nothing over)."""

    videos: list[str]
    passed_over: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def find_videos(path: PathLike) -> Listing:
    """The video files under a folder (recursive, by extension) and the folder's other files
    with the reason each is not read (hidden non-video files are left out); the lines of a
    list file; or one file. Local or in a bucket (`gs://...`).

    Raises:
      DataError: when the path is missing or holds no video.
    """
    p = as_path(path) if os.fspath(path) else None
    if p is None or not p.exists():
        raise DataError(
            f"Video path '{path}' does not exist: set data.path to a folder of videos "
            "(mp4, webm, mov, avi) or to a text file listing one video per line."
        )
    passed_over: list[tuple[str, str]] = []
    if p.is_dir():
        files = []
        for f in sorted(files_under(p), key=os.fspath):
            if f.suffix.lower() in VIDEO_EXTENSIONS:
                files.append(os.fspath(f))
            elif not _hidden(f, p):
                passed_over.append((os.fspath(f), not_a_video_reason(f.name)))
    elif p.suffix.lower() in VIDEO_EXTENSIONS:
        files = [os.fspath(p)]
    else:
        files = _read_list_file(p)
    if not files:
        others = f" ({len(passed_over)} other file(s) there are not videos)" if passed_over else ""
        raise DataError(
            f"No video files (mp4, webm, mov, avi) found in '{path}'{others}: put videos there "
            "or point data.path at a folder or list file that has some."
        )
    return Listing(files, passed_over)


def _hidden(file: Path, folder: Path) -> bool:
    """A dot-file, or a file in a dot-folder below `folder`."""
    relative = os.fspath(file)[len(os.fspath(folder)) :]
    return any(part.startswith(".") for part in relative.split("/"))


def list_videos(path: PathLike) -> list[str]:
    """Sorted video files under a folder (recursive), the lines of a list file, or one file;
    local or in a bucket (`gs://...`). `find_videos(path).videos`.

    Raises:
      DataError: when the path is missing or holds no video.
    """
    return find_videos(path).videos


def not_a_video_reason(name: str) -> str:
    """Why a folder's file `name` is not read: its extension is not a video one."""
    ext = pathlib.PurePath(name).suffix.lower()
    if ext in AUDIO_EXTENSIONS:
        return f"an audio file ({ext}), not a video"
    readable = " ".join(VIDEO_EXTENSIONS)
    return f"not a video file this reads ({ext or 'no extension'}; it reads {readable})"


def warn_passed_over(passed_over: Sequence[tuple[str, str]]) -> list[str]:
    """One `warning: skipped: FILE: REASON` line for each file a folder listing passed over
    (`Listing.passed_over`); returns those files."""
    for name, reason in passed_over:
        warn(f"skipped: {name}: {reason}")
    return [name for name, _ in passed_over]


def warn(message: str) -> None:
    """One `warning: MESSAGE` line on stderr (the folder runs' skipped files, lost frames)."""
    print(f"warning: {message}", file=sys.stderr)


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


# -- whole videos, streamed in -----------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    """What the container says about one input video."""

    path: Path
    height: int
    width: int
    fps: float  # source frame rate
    expected_frames: int | None  # frames the container announces (None: unknown)


def probe(path: Path) -> Probe:
    """Opens `path` and decodes its first frame; InputError when it cannot be used."""
    try:
        with open_media(path) as source, av.open(source) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video frames (no video stream)")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise InputError(f"{path} has no video frames")
            rate = stream.average_rate or stream.guessed_rate or 0
            return Probe(
                path, first.height, first.width, float(rate), _announced(container, stream)
            )
    except InputError:
        raise
    except Exception as err:  # any demuxer/decoder failure: not a usable video
        raise InputError(
            f"{path} is not a readable video ({_reason(err)}); give an mp4/webm/mov/mkv/avi file "
            "(an mp4 cut off before its index cannot be read at all)"
        ) from err


def _announced(container, stream) -> int | None:
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate
    if stream.duration is not None and stream.time_base and rate:
        return round(float(stream.duration * stream.time_base * rate))
    if container.duration is not None and rate:
        return round(container.duration / av.time_base * float(rate))
    return None


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def check_size(info: Probe) -> None:
    """InputError when the frames are under `MIN_SIZE` px on a side."""
    if min(info.height, info.width) < MIN_SIZE:
        raise InputError(
            f"{info.path}: frames are {info.width}x{info.height} px; the model needs at least "
            f"{MIN_SIZE} px on each side (upscale the video first)"
        )


@dataclasses.dataclass
class DecodeReport:
    decoded: int = 0  # source frames decoded
    error: str | None = None  # why decoding stopped early


def source_frames(path: Path, report: DecodeReport) -> Iterator[tuple[float, np.ndarray]]:
    """(time in seconds, uint8 (H, W, 3)) for each decodable frame; stops at the first error."""
    with open_media(path) as source, av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        dt = 1.0 / float(rate) if rate else 0.0
        frames, t = container.decode(stream), None
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except Exception as err:  # corrupt or truncated data: keep what decoded
                report.error = _reason(err)
                return
            t = float(frame.time) if frame.time is not None else (0.0 if t is None else t + dt)
            report.decoded += 1
            yield t, frame.to_ndarray(format="rgb24")


def resample(
    frames: Iterator[tuple[float, np.ndarray]], fps: float, source_fps: float
) -> Iterator[np.ndarray]:
    """Sample and hold at `fps`: output frame k is the last frame shown at time t0 + k / fps."""
    src_dt = 1.0 / source_fps if source_fps > 0 else 1.0 / fps
    eps = _TOL * min(src_dt, 1.0 / fps)
    k, t0, prev, prev_t = 0, None, None, None
    for t, image in frames:
        if t0 is None:
            t0 = t
        while prev is not None and t0 + k / fps < t - eps:
            yield prev
            k += 1
        prev, prev_t = image, t
    while prev is not None and t0 + k / fps < prev_t + src_dt - eps:
        yield prev  # the last frame stays on screen for one source frame period
        k += 1


def expected_output_frames(info: Probe, fps: float) -> int | None:
    """The frames a video gives at `fps`, from what its container announces (None: unknown)."""
    if info.expected_frames is None:
        return None
    if info.fps <= 0:
        return info.expected_frames
    return max(1, round(info.expected_frames * fps / info.fps))


def lost_frames(info: Probe, report: DecodeReport) -> int:
    """Frames the container announced that did not decode (0 when it announced none)."""
    if info.expected_frames is None:
        return 0
    return max(0, info.expected_frames - report.decoded)


# -- writing ------------------------------------------------------------------------------------


class VideoWriter:
    """H.264 frames to a container, opened on the first write (yuv420p; yuv444p for odd sizes,
    so the file has the frames' exact size)."""

    def __init__(self, path: PathLike, fps: float, crf: int):
        self.path, self.fps, self.crf = path, fps, crf
        self.container = self.stream = None

    def write(self, frames: np.ndarray) -> None:
        """uint8 (T, H, W, 3)."""
        if self.container is None:
            self._open(frames.shape[1], frames.shape[2])
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            self.container.mux(self.stream.encode(frame))

    def _open(self, height: int, width: int) -> None:
        self.container = av.open(os.fspath(self.path), mode="w")
        rate = Fraction(self.fps).limit_denominator(1001)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": str(self.crf)}

    def close(self, flush: bool) -> None:
        if self.container is None:
            return
        try:
            if flush:
                self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()
            self.container = None


@contextlib.contextmanager
def video_file(output: PathLike, fps: float, crf: int, suffix: str = "") -> Iterator[VideoWriter]:
    """A `VideoWriter` whose file appears at `output` (local or in a bucket) only complete
    (`paths.staged`): flushed when the block ends, dropped on any error (also Ctrl-C). The
    container is `suffix`'s (".mp4"), else `output`'s extension's."""
    with staged(output, suffix=suffix) as partial:
        writer = VideoWriter(partial, fps, crf)
        try:
            yield writer
            writer.close(flush=True)
        except BaseException:
            with contextlib.suppress(Exception):
                writer.close(flush=False)
            raise


def write_mp4(path: PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """uint8 (T, H, W, 3) -> H.264 mp4 at `path`, through `video_file` (yuv420p; yuv444p for
    odd sizes)."""
    with video_file(path, fps, crf, suffix=".mp4") as writer:
        writer.write(np.asarray(frames, np.uint8))


def safe_stem(name: str) -> str:
    """A file-name-safe short stem of a clip name (file path, TFDS id, synthetic/i)."""
    stem = pathlib.PurePath(name.split("#", 1)[0]).stem or "clip"
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return keep[:60]
