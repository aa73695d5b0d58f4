"""Whole videos in the latent store (`python -m reducio_jax encode --whole_videos ...`).

Each video file (of any length and size) is stored as its `VideoLatent` (docs/video.md): the
latents and content frames of its overlapping 16-frame windows, its window table and its size.
Encoding streams as `reconstruct` does: frames are decoded with PyAV one at a time (resampled
to the config's fps unless ``keep_fps``, or resized and centre-cropped to ``resolution`` when
given), cut into windows (`windows.WindowCutter`), and each batch of ``window_batch`` windows
is encoded and appended to the video's Zarr arrays, so host memory holds about one window
batch whatever the video's length. Shards of videos are resumable as the clip store's are.

`decode_videos` streams back: window batches are decoded, cross-faded (`windows.Stitcher`),
cropped and written to one H.264 file per video of the original length and size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from reducio_jax.api import DEFAULT_OVERLAP, ReducioVAE
from reducio_jax.data import video_to_float
from reducio_jax.data.video import (
    ClipSpec,
    list_videos,
    parse_resolution,
    resize_and_crop,
    safe_stem,
    to_uint8,
)
from reducio_jax.latents.encode import LATENT_DOC, EncodeOptions, prepare_store
from reducio_jax.latents.store import (
    DONE_FILE,
    FORMAT,
    VERSION,
    VIDEOS,
    VIDEOS_FILE,
    ArraySpec,
    LatentStore,
    create_array,
    default_num_shards,
    shard_done,
    shard_name,
    shard_ranges,
    video_dir_name,
    write_json_atomic,
)
from reducio_jax.models import content_frame_index
from reducio_jax.models.windows import Stitcher, WindowCutter, check_overlap, pad_spatial
from reducio_jax.paths import Path, as_path, make_dirs, rmtree
from reducio_jax.reconstruct import (
    DecodeReport,
    check_size,
    probe,
    resample,
    source_frames,
    video_file,
    warn,
)
from reducio_jax.runtime import (
    InputError,
    clip_count,
    load_vae,
    local_mesh,
    resolve_config,
    to_host,
)
from reducio_jax.sharding import batch_sharding

DEFAULT_WINDOW_BATCH = 4
VIDEOS_PER_SHARD = 16


@dataclasses.dataclass(kw_only=True)
class VideoEncodeOptions(EncodeOptions):
    """`encode --whole_videos`: `num_clips` counts videos, `resolution` None keeps each
    video's size; `num_frames`, `batch_size` and `save_moments` are refused."""

    keep_fps: bool = False  # keep each video's frame rate (default: `fps` or the config's)
    overlap: int = DEFAULT_OVERLAP  # frames shared by neighbouring windows
    window_batch: int | None = None  # None: 4, rounded up to a multiple of the devices


# -- options ----------------------------------------------------------------------------------


def _check_options(opts: VideoEncodeOptions, window: int) -> None:
    if opts.data == "synthetic" or opts.data.startswith("tfds:"):
        raise InputError(
            f"--whole_videos reads video files; --data {opts.data} is not a folder, list file "
            "or video"
        )
    for flag, value in (("--num_frames", opts.num_frames), ("--batch_size", opts.batch_size)):
        if value is not None:
            raise InputError(
                f"{flag} does not apply to --whole_videos (windows of {window} frames, "
                "--window_batch windows per call); leave it out"
            )
    if opts.save_moments:
        raise InputError("--save_moments is for 16-frame clips; --whole_videos stores latents only")
    try:
        check_overlap(window, opts.overlap)
    except ValueError as err:
        raise InputError(f"--overlap: {err}") from None
    if opts.num_shards is not None and opts.num_shards <= 0:
        raise InputError(f"--num_shards {opts.num_shards} must be positive")
    if opts.resolution is not None and min(parse_resolution(opts.resolution)) < 32:
        raise InputError(f"--resolution {opts.resolution}: the model needs at least 32 px")


def window_batch_for(mesh: Mesh, window_batch: int | None) -> int:
    """Windows per compiled call: a positive multiple of the devices (default 4 rounded up)."""
    n = mesh.devices.size
    if window_batch is None:
        return -(-DEFAULT_WINDOW_BATCH // n) * n
    if not isinstance(window_batch, int):  # the shared flag also parses 'auto' (reconstruct's)
        raise InputError(
            f"--window_batch {window_batch}: encode --whole_videos takes a number of windows"
        )
    if window_batch <= 0 or window_batch % n:
        raise InputError(
            f"--window_batch {window_batch} must be a positive multiple of the {n} device(s)"
        )
    return window_batch


# -- one batch of windows ---------------------------------------------------------------------


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


def encode_windows(
    vae: ReducioVAE, windows: np.ndarray, mesh: Mesh, batch: int
) -> dict[str, np.ndarray]:
    """uint8 windows (k <= batch, T, H, W, 3) -> {"latent" (k, t, h, w, z) float32,
    "content" (k, H', W', 3) uint8}, reflect-padded to multiples of 32 as `encode_video` pads."""
    padded = pad_spatial(windows, vae.spatial_factor)  # (k, T, H', W', 3)
    video = jax.device_put(_pad_rows(padded, batch), batch_sharding(mesh))
    latent = vae.latent(vae.encode(video_to_float(video)))
    content = padded[:, content_frame_index(windows.shape[1])]
    return {"latent": to_host(latent)[: windows.shape[0]], "content": content}


def decode_windows(
    vae: ReducioVAE, latent: np.ndarray, content: np.ndarray, mesh: Mesh, batch: int
) -> np.ndarray:
    """Stored windows (k <= batch) -> decoded float32 (k, T, H', W', 3) in ~[-1, 1]."""
    sharding = batch_sharding(mesh)
    z = jax.device_put(_pad_rows(latent, batch), sharding)
    frames = jax.device_put(_pad_rows(content, batch), sharding)
    return to_host(vae.decode(z, video_to_float(frames)))[: latent.shape[0]]


# -- one video --------------------------------------------------------------------------------


class VideoArrays:
    """The growing Zarr arrays (K, ...) of one video, a window batch appended at a time."""

    def __init__(self, folder: Path, specs: dict[str, ArraySpec]):
        make_dirs(folder)
        self.arrays = {name: create_array(folder / name, 0, s) for name, s in specs.items()}
        self.rows = 0

    def append(self, values: dict[str, np.ndarray]) -> None:
        n = next(iter(values.values())).shape[0]
        for name, array in self.arrays.items():
            grown = array.resize(exclusive_max=[self.rows + n, *([None] * (array.rank - 1))])
            self.arrays[name] = grown.result()
        futures = [a[self.rows : self.rows + n].write(values[k]) for k, a in self.arrays.items()]
        for f in futures:
            f.result()
        self.rows += n


@dataclasses.dataclass
class _Context:
    """What every video of a run shares."""

    vae: ReducioVAE
    opts: VideoEncodeOptions
    mesh: Mesh
    batch: int
    fps: float  # target frame rate (unless keep_fps)
    bar: Any = None


def _frames(ctx: _Context, info, fps: float, report: DecodeReport) -> Iterator[np.ndarray]:
    """The video's uint8 frames at `fps` (or its own rate), resized when --resolution is set."""
    timed = source_frames(info.path, report)
    frames = (f for _, f in timed) if ctx.opts.keep_fps else resample(timed, fps, info.fps)
    if ctx.opts.resolution is None:
        return frames
    h, w = parse_resolution(ctx.opts.resolution)
    spec = ClipSpec(num_frames=1, fps=fps, height=h, width=w)
    return (resize_and_crop(f[None], spec, None)[0] for f in frames)


def _latent_specs(vae: ReducioVAE, height: int, width: int) -> dict[str, ArraySpec]:
    """Per-window specs of a video of frames height x width (padded to multiples of 32)."""
    padded = [s + (-s) % vae.spatial_factor for s in (height, width)]
    shape = (1, vae.window, *padded, 3)
    post = jax.eval_shape(vae.encode, jax.ShapeDtypeStruct(shape, np.float32))
    return {
        "latent": ArraySpec(tuple(post.mean.shape[1:]), "float32"),
        "content": ArraySpec((*padded, 3), "uint8"),
    }


def encode_video_file(ctx: _Context, path: Path, index: int, folder: Path) -> dict[str, Any]:
    """One video file -> its arrays in `folder`; returns its record (InputError: unusable)."""
    info = probe(path)
    if ctx.opts.resolution is None:
        check_size(info)
    fps = info.fps if ctx.opts.keep_fps and info.fps > 0 else ctx.fps
    report = DecodeReport()
    stored = _encode_frames(ctx, _frames(ctx, info, fps, report), folder)
    if stored is None:
        raise InputError(f"{path}: no frame could be decoded ({report.error})")
    lost = 0 if info.expected_frames is None else max(0, info.expected_frames - report.decoded)
    if lost:
        warn(
            f"{path}: decoded {report.decoded} of {info.expected_frames} frames; {lost} lost "
            f"({report.error or 'the file ends early'}); the store has the decoded part only"
        )
    record = {"index": index, "name": str(path), "valid": True}
    return {**record, **stored, "fps": round(fps, 6), "lost_frames": lost}


def _encode_frames(
    ctx: _Context, frames: Iterator[np.ndarray], folder: Path
) -> dict[str, Any] | None:
    """Frames -> windows -> stored batch by batch; {num_frames, height, width, starts}, or
    None when there was no frame."""
    cutter = WindowCutter(ctx.vae.window, ctx.opts.overlap)
    arrays, pending, starts = None, [], []
    for frame in frames:
        if arrays is None:  # the first frame gives the size
            arrays = VideoArrays(folder, _latent_specs(ctx.vae, *frame.shape[:2]))
            height, width = frame.shape[:2]
        pending += cutter.push(frame)
        if len(pending) >= ctx.batch:
            starts += _flush(ctx, arrays, pending)
    if arrays is None:
        return None
    pending += cutter.finish()
    while pending:
        starts += _flush(ctx, arrays, pending)
    size = {"height": int(height), "width": int(width)}
    return {"num_frames": cutter.num_frames, **size, "starts": starts}


def _flush(ctx: _Context, arrays: VideoArrays, pending: list) -> list[int]:
    """Encodes and stores the first `batch` pending windows (removed from `pending`)."""
    chunk = pending[: ctx.batch]
    del pending[: len(chunk)]
    windows = np.stack([frames for _, frames in chunk])  # (k, T, H, W, 3) uint8
    arrays.append(encode_windows(ctx.vae, windows, ctx.mesh, ctx.batch))
    if ctx.bar is not None:
        ctx.bar.update(len(chunk))
    return [start for start, _ in chunk]


# -- the store --------------------------------------------------------------------------------


def _store_meta(opts, vae: ReducioVAE, target_fps: float, files, ranges) -> dict[str, Any]:
    size = None if opts.resolution is None else parse_resolution(opts.resolution)
    specs = _latent_specs(vae, *(size or (32, 32)))
    if size is None:  # frame sizes differ from video to video: h, w, H', W' unknown (None)
        t, _, _, z = specs["latent"].shape
        specs["latent"] = ArraySpec((t, None, None, z), "float32")
        specs["content"] = ArraySpec((None, None, 3), "uint8")
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": VIDEOS,
        "num_videos": ranges[-1][1],
        "num_shards": len(ranges),
        "shard_ranges": [list(r) for r in ranges],
        "arrays": {k: v.to_json() for k, v in specs.items()},
        "video": {
            "window": vae.window,
            "overlap": opts.overlap,
            "fps": None if opts.keep_fps else target_fps,
            "keep_fps": opts.keep_fps,
            "resolution": None if size is None else list(size),
            "content_frame_index": content_frame_index(vae.window),
            "spatial_multiple": vae.spatial_factor,
        },
        "data": {"spec": opts.data, "records": len(files)},
        "latent": LATENT_DOC + ", per 16-frame window",
        "model": {
            "checkpoint": str(opts.checkpoint),
            "config": json.loads(vae.config.to_json_best_effort()),
        },
    }


def _encode_shard(ctx: _Context, root: Path, shard: int, files, videos) -> list[dict]:
    """Encodes videos [start, stop) into shard `shard` (restarted from scratch if unfinished)."""
    began = time.perf_counter()
    folder = root / shard_name(shard)
    if folder.exists():
        rmtree(folder)
    make_dirs(folder)
    records = []
    for index in range(*videos):
        path, out = as_path(files[index]), folder / video_dir_name(index)
        try:
            records.append(encode_video_file(ctx, path, index, out))
        except InputError as err:
            warn(f"skipped: {err}")
            rmtree(out)
            records.append({"index": index, "name": str(path), "valid": False, "error": str(err)})
    write_json_atomic(folder / VIDEOS_FILE, records)
    valid = sum(r["valid"] for r in records)
    info = {"rows": len(records), "valid": valid, "seconds": round(time.perf_counter() - began, 3)}
    write_json_atomic(folder / DONE_FILE, info)
    return records


def encode_videos_to_store(opts: VideoEncodeOptions) -> dict[str, Any]:
    """Encodes every video of `opts.data` whole into `opts.out`; returns a summary."""
    began = time.perf_counter()
    model_cfg = resolve_config(opts.checkpoint, opts.config)  # bad checkpoint/config: fail first
    _check_options(opts, int(model_cfg.model.ddconfig.get("temp_res", 16)))
    files = list_videos(opts.data)
    n = clip_count(len(files), opts.num_clips)
    ranges = shard_ranges(n, opts.num_shards or default_num_shards(n, VIDEOS_PER_SHARD))
    mesh = local_mesh(opts.devices)
    batch = window_batch_for(mesh, opts.window_batch)
    vae = load_vae(opts.checkpoint, model_cfg, mesh)
    fps = float(opts.fps or model_cfg.data.fps)
    root = as_path(opts.out)
    if jax.process_index() == 0:
        prepare_store(root, _store_meta(opts, vae, fps, files, ranges), opts.overwrite)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("reducio_jax.latents.videos: store ready")
    mine = range(jax.process_index(), len(ranges), jax.process_count())
    todo = [s for s in mine if not shard_done(root, s)]
    records = []
    with tqdm(desc="encode", unit="window", disable=not opts.progress) as bar:
        ctx = _Context(vae, opts, mesh, batch, fps, bar)
        for s in todo:
            records += _encode_shard(ctx, root, s, files, ranges[s])
    return {
        "store": str(root),
        "num_videos": n,
        "num_shards": len(ranges),
        "encoded_shards": [shard_name(s) for s in todo],
        "skipped_shards": [shard_name(s) for s in mine if s not in todo],
        "encoded_videos": sum(r["valid"] for r in records),
        "encoded_windows": sum(len(r.get("starts", ())) for r in records),
        "skipped_videos": [r["name"] for r in records if not r["valid"]],
        "seconds": round(time.perf_counter() - began, 3),
    }


# -- back to videos ---------------------------------------------------------------------------


def decode_video_frames(
    vae: ReducioVAE,
    store: LatentStore,
    shard: int,
    video: dict[str, Any],
    mesh: Mesh,
    batch: int,
    bar: Any = None,
) -> Iterator[np.ndarray]:
    """One stored video -> its frames, float32 (t, H, W, 3) chunks in order, `batch` windows
    decoded per call and cross-faded as they come (the same frames as `decode_video`)."""
    starts, num_frames = [int(s) for s in video["starts"]], int(video["num_frames"])
    h, w = int(video["height"]), int(video["width"])
    stitcher, written = Stitcher(int(store.meta["video"]["overlap"])), 0
    for i in range(0, len(starts), batch):
        z = store.read_windows(shard, video, "latent", i, i + batch)
        content = store.read_windows(shard, video, "content", i, i + batch)
        decoded = decode_windows(vae, z, content, mesh, batch)  # (k, T, H', W', 3)
        for start, frames in zip(starts[i : i + batch], decoded, strict=True):
            final = stitcher.add(start, frames[None])[0][: max(0, num_frames - written)]
            written += final.shape[0]
            yield final[:, :h, :w]
        if bar is not None:
            bar.update(decoded.shape[0])
    yield stitcher.finish(num_frames)[0][: max(0, num_frames - written), :h, :w]


def decode_videos(
    vae: ReducioVAE,
    store: LatentStore,
    mesh: Mesh,
    batch: int,
    out: Path,
    *,
    num_videos: int | None = None,
    fps: float | None = None,
    progress: bool = True,
) -> list[str]:
    """Writes `OUT/<index>_<name>.mp4` per stored video (its own length, size and fps)."""
    videos = store.videos()[:num_videos]
    written = []
    total = sum(len(v["starts"]) for _, v in videos)
    with tqdm(total=total, desc="decode", unit="window", disable=not progress) as bar:
        for shard, video in videos:
            path = out / f"{int(video['index']):06d}_{safe_stem(video['name'])}.mp4"
            with video_file(path, fps or float(video["fps"]), crf=18) as writer:
                for frames in decode_video_frames(vae, store, shard, video, mesh, batch, bar):
                    if frames.shape[0]:
                        writer.write(to_uint8(frames))
            written.append(os.fspath(path))
    return written


__all__ = [
    "VideoEncodeOptions",
    "decode_video_frames",
    "decode_videos",
    "decode_windows",
    "encode_video_file",
    "encode_videos_to_store",
    "encode_windows",
    "window_batch_for",
]
