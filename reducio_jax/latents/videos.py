"""Whole videos in the latent store (`python -m reducio_jax encode --whole_videos ...`).

Each video file (of any length and size) is stored as its `VideoLatent` (docs/video.md): the
latents and content frames of its overlapping 16-frame windows, its window table and its size.
Encoding streams as `reconstruct` does, with the same video readers (`reducio_jax/data/video.py`):
frames are decoded with PyAV one at a time (resampled to the config's fps unless ``keep_fps``,
or resized and centre-cropped to ``resolution`` when given), cut into windows
(`windows.WindowCutter`), and each batch of windows is encoded and appended to the video's Zarr
arrays, so host memory holds about one window batch whatever the video's length. Shards of
videos are resumable as the clip store's are. A video that cannot be used is stored as an
invalid record with its reason; a file of the folder that is not a video (by its extension: a
`.gif`, an `.m4a`, a `.txt`) is not in the store; each is named in one `warning: skipped: ...`
line and listed in the summary's ``skipped_videos``.

The window batch and tiling are chosen per frame size from memory (``window_batch="auto"``,
`planner.plan_batch`: the compiled encoder's memory analysis against the memory available or
``max_memory``), or a fixed ``window_batch`` is checked to fit; every frame size of the run
(``resolution``, or each video's, read from its first frame) is planned before the store is
created or touched, so a run that cannot fit fails with one `OutOfMemory` line and no store.

`decode_videos` streams back: window batches (planned per frame size in the same way) are
decoded, cross-faded (`windows.Stitcher`), cropped and written (`data.video.video_file`) to one
H.264 file per video of the original length and size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from reducio_jax.api import DEFAULT_OVERLAP, ReducioVAE
from reducio_jax.config import derived, frame_size
from reducio_jax.data import video_to_float
from reducio_jax.data.video import (
    ClipSpec,
    DecodeReport,
    Probe,
    check_size,
    expected_output_frames,
    find_videos,
    lost_frames,
    probe,
    resample,
    resize_and_crop,
    safe_stem,
    source_frames,
    to_uint8,
    video_file,
    warn,
    warn_passed_over,
)
from reducio_jax.latents.encode import LATENT_DOC, EncodeOptions, check_store, prepare_store
from reducio_jax.latents.store import (
    DONE_FILE,
    FORMAT,
    VERSION,
    VIDEOS,
    VIDEOS_FILE,
    ArraySpec,
    LatentStore,
    StoreError,
    create_array,
    default_num_shards,
    shard_done,
    shard_name,
    shard_ranges,
    video_dir_name,
    write_json_atomic,
)
from reducio_jax.models import content_frame_index
from reducio_jax.models.windows import (
    Stitcher,
    WindowCutter,
    check_overlap,
    pad_rows,
    pad_spatial,
    plan_windows,
)
from reducio_jax.programs.budget import parse_size
from reducio_jax.programs.footprint import Plan, plan_records
from reducio_jax.programs.planner import OutOfMemory, check_batch, plan_batch
from reducio_jax.runs.runtime import (
    InputError,
    clip_count,
    load_vae,
    local_mesh,
    resolve_config,
    to_host,
)
from reducio_jax.sharding import batch_sharding
from reducio_jax.storage.paths import Path, as_path, make_dirs, rmtree

VIDEOS_PER_SHARD = 16
Size = tuple[int, int]  # frame height, width (before padding)


@dataclasses.dataclass(kw_only=True)
class VideoEncodeOptions(EncodeOptions):
    """`encode --whole_videos`: `num_clips` counts videos, `resolution` None keeps each
    video's size; `num_frames`, `batch_size` and `save_moments` are refused."""

    keep_fps: bool = False  # keep each video's frame rate (default: `fps` or the config's)
    overlap: int = DEFAULT_OVERLAP  # frames shared by neighbouring windows
    window_batch: int | str = "auto"  # windows a call: from memory, or a multiple of the devices
    max_memory: str | int | None = None  # for the whole process: "8GB" or bytes (None: measured)


# -- options ----------------------------------------------------------------------------------


def _check_options(opts: VideoEncodeOptions, window: int, smallest: int) -> VideoEncodeOptions:
    """`opts` checked (windows of `window` frames, frames of at least `smallest` px), with its
    memory size parsed (once, before the model loads)."""
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
    if opts.resolution is not None and min(frame_size(opts.resolution)) < smallest:
        raise InputError(
            f"--resolution {opts.resolution}: the model needs at least {smallest} px"
        )
    if opts.max_memory is None:
        return opts
    return dataclasses.replace(opts, max_memory=parse_size(opts.max_memory))


# -- one batch of windows ---------------------------------------------------------------------


def encode_windows(
    vae: ReducioVAE, windows: np.ndarray, mesh: Mesh, batch: int, plan: Plan | None = None
) -> dict[str, np.ndarray]:
    """uint8 windows (k <= batch, T, H, W, 3) -> {"latent" (k, t, h, w, z) float32,
    "content" (k, H', W', 3) uint8}, reflect-padded to multiples of 32 as `encode_video` pads
    (`plan`: the tiling of a `plan_batch` result instead of the config's)."""
    padded = pad_spatial(windows, vae.spatial_factor)  # (k, T, H', W', 3)
    video = jax.device_put(pad_rows(padded, batch), batch_sharding(mesh))
    latent = vae.latent(vae.encode(video_to_float(video), plan=plan))
    content = padded[:, content_frame_index(windows.shape[1])]
    return {"latent": to_host(latent)[: windows.shape[0]], "content": content}


def decode_windows(
    vae: ReducioVAE,
    latent: np.ndarray,
    content: np.ndarray,
    mesh: Mesh,
    batch: int,
    plan: Plan | None = None,
) -> np.ndarray:
    """Stored windows (k <= batch) -> decoded float32 (k, T, H', W', 3) in ~[-1, 1]
    (`plan`: the tiling of a `plan_batch` result instead of the config's)."""
    sharding = batch_sharding(mesh)
    z = jax.device_put(pad_rows(latent, batch), sharding)
    frames = jax.device_put(pad_rows(content, batch), sharding)
    return to_host(vae.decode(z, video_to_float(frames), plan=plan))[: latent.shape[0]]


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
    fps: float  # target frame rate (unless keep_fps)
    bar: Any = None
    plans: dict[Size, Plan] = dataclasses.field(default_factory=dict)  # per frame size
    probes: dict[int, Probe] = dataclasses.field(default_factory=dict)  # read while planning

    def plan(self, size: Size, windows: int | None = None) -> Plan:
        """The window batch and tiling for frames of `size` (planned once; OutOfMemory)."""
        if size not in self.plans:
            self.plans[size] = plan_batch(
                self.vae.programs,
                self.mesh,
                *size,
                op="encode",
                batch=self.opts.window_batch,
                max_memory=self.opts.max_memory,
                count=windows,
            )
        return self.plans[size]

    def video_fps(self, info: Probe) -> float:
        return info.fps if self.opts.keep_fps and info.fps > 0 else self.fps


def _frames(ctx: _Context, info, fps: float, report: DecodeReport) -> Iterator[np.ndarray]:
    """The video's uint8 frames at `fps` (or its own rate), resized when --resolution is set."""
    timed = source_frames(info.path, report)
    frames = (f for _, f in timed) if ctx.opts.keep_fps else resample(timed, fps, info.fps)
    if ctx.opts.resolution is None:
        return frames
    h, w = frame_size(ctx.opts.resolution)
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
    info = ctx.probes.pop(index, None) or probe(path)
    if ctx.opts.resolution is None:
        check_size(info)
    fps = ctx.video_fps(info)
    report = DecodeReport()
    stored = _encode_frames(ctx, _frames(ctx, info, fps, report), folder)
    if stored is None:
        raise InputError(f"{path}: no frame could be decoded ({report.error})")
    lost = lost_frames(info, report)
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
            height, width = frame.shape[:2]
            plan = ctx.plan((height, width))  # (planned before the store unless a surprise)
            arrays = VideoArrays(folder, _latent_specs(ctx.vae, height, width))
        pending += cutter.push(frame)
        if len(pending) >= plan.window_batch:
            starts += _flush(ctx, plan, arrays, pending)
    if arrays is None:
        return None
    pending += cutter.finish()
    while pending:
        starts += _flush(ctx, plan, arrays, pending)
    size = {"height": int(height), "width": int(width)}
    return {"num_frames": cutter.num_frames, **size, "starts": starts}


def _flush(ctx: _Context, plan: Plan, arrays: VideoArrays, pending: list) -> list[int]:
    """Encodes and stores the first `plan.window_batch` pending windows (removed from
    `pending`)."""
    batch = plan.window_batch
    chunk = pending[:batch]
    del pending[: len(chunk)]
    windows = np.stack([frames for _, frames in chunk])  # (k, T, H, W, 3) uint8
    arrays.append(encode_windows(ctx.vae, windows, ctx.mesh, batch, plan))
    if ctx.bar is not None:
        ctx.bar.update(len(chunk))
    return [start for start, _ in chunk]


# -- the store --------------------------------------------------------------------------------


def _store_meta(opts, vae: ReducioVAE, target_fps: float, files, ranges) -> dict[str, Any]:
    size = None if opts.resolution is None else frame_size(opts.resolution)
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


def _frame_sizes(ctx: _Context, files: list[str], indices: Iterable[int]) -> dict[Size, tuple]:
    """{frame size: (the first video of that size or None, the most windows a video of that
    size has or None: unknown)} over the videos `indices`: `--resolution`'s one size, or each
    video's (its first frame, kept in `ctx.probes` for its turn). Unusable videos are left
    out here; they are skipped with their warning when their turn comes."""
    if ctx.opts.resolution is not None:
        return {frame_size(ctx.opts.resolution): (None, None)}
    sizes: dict[Size, tuple] = {}
    for index in indices:
        try:
            info = probe(as_path(files[index]))
            check_size(info)
        except InputError:
            continue
        ctx.probes[index] = info
        expected = expected_output_frames(info, ctx.video_fps(info))
        windows = None if expected is None else len(_starts(ctx, expected))
        first, most = sizes.get((info.height, info.width), (str(info.path), 0))
        sizes[(info.height, info.width)] = (
            first,
            None if None in (most, windows) else max(most, windows),
        )
    return sizes


def _starts(ctx: _Context, num_frames: int) -> tuple[int, ...]:
    return plan_windows(num_frames, ctx.vae.window, ctx.opts.overlap).starts


def _plan_sizes(ctx: _Context, files: list[str], indices: Iterable[int]) -> None:
    """Plans every frame size of the videos `indices` (the largest first); OutOfMemory names
    the first video of a size that does not fit."""
    sizes = _frame_sizes(ctx, files, indices)
    for size in sorted(sizes, key=lambda s: -s[0] * s[1]):
        first, windows = sizes[size]
        try:
            plan = ctx.plan(size, windows)
        except OutOfMemory as err:
            raise OutOfMemory(str(err) if first is None else f"{first}: {err}") from None
        print(f"encode {size[0]}x{size[1]} frames: {plan.describe()}")


def _before_the_store(step: Callable[[], None]) -> None:
    """Runs `step` (every check before the store is created or touched). With several
    processes all of them stop, none touching the store, when one of them fails."""
    error = None
    try:
        step()
    except (InputError, StoreError) as err:
        error = err
    if jax.process_count() > 1:
        ok = multihost_utils.process_allgather(np.array([error is None], np.int32))
        if error is None and not np.all(ok):
            raise InputError("another process could not start (its error is on its stderr)")
    if error is not None:
        raise error


def encode_videos_to_store(opts: VideoEncodeOptions) -> dict[str, Any]:
    """Encodes every video of `opts.data` whole into `opts.out`; returns a summary."""
    began = time.perf_counter()
    model_cfg = resolve_config(opts.checkpoint, opts.config)  # bad checkpoint/config: fail first
    sizes = derived(model_cfg)
    opts = _check_options(opts, sizes.num_frames, sizes.spatial_factor)
    listing = find_videos(opts.data)
    files = listing.videos
    n = clip_count(len(files), opts.num_clips)
    ranges = shard_ranges(n, opts.num_shards or default_num_shards(n, VIDEOS_PER_SHARD))
    mesh = local_mesh(opts.devices)
    check_batch(mesh, opts.window_batch, "--window_batch")
    vae = load_vae(opts.checkpoint, model_cfg, mesh)
    fps = float(opts.fps or model_cfg.data.fps)
    root = as_path(opts.out)
    meta = _store_meta(opts, vae, fps, files, ranges)
    mine = range(jax.process_index(), len(ranges), jax.process_count())
    todo = [s for s in mine if opts.overwrite or not shard_done(root, s)]
    ctx = _Context(vae, opts, mesh, fps)
    videos = [i for s in todo for i in range(*ranges[s])]
    _before_the_store(
        lambda: (check_store(root, meta, opts.overwrite), _plan_sizes(ctx, files, videos))
    )
    if jax.process_index() == 0:
        prepare_store(root, meta, opts.overwrite)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("reducio_jax.latents.videos: store ready")
    # the files of a folder that are not videos: named once (by process 0), with the skipped
    passed_over = warn_passed_over(listing.passed_over) if jax.process_index() == 0 else []
    records = []
    with tqdm(desc="encode", unit="window", disable=not opts.progress) as bar:
        ctx.bar = bar
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
        "skipped_videos": sorted([r["name"] for r in records if not r["valid"]] + passed_over),
        "memory": plan_records(ctx.plans),
        "seconds": round(time.perf_counter() - began, 3),
    }


# -- back to videos ---------------------------------------------------------------------------


def plan_decode(
    vae: ReducioVAE,
    mesh: Mesh,
    videos: list[tuple[int, dict[str, Any]]],
    batch: int | str = "auto",
    max_memory: str | int | None = None,
) -> dict[Size, Plan]:
    """The window batch and tiling (`planner.plan_batch`) of each frame size of the stored
    `videos` (the largest first; "auto": at most the windows the longest of them has)."""
    most: dict[Size, int] = {}
    for _, video in videos:
        size = (int(video["height"]), int(video["width"]))
        most[size] = max(most.get(size, 0), len(video["starts"]))
    return {
        size: plan_batch(
            vae.programs,
            mesh,
            *size,
            op="decode",
            batch=batch,
            max_memory=max_memory,
            count=most[size],
            flag="--batch_size",
        )
        for size in sorted(most, key=lambda s: -s[0] * s[1])
    }


def decode_video_frames(
    vae: ReducioVAE,
    store: LatentStore,
    shard: int,
    video: dict[str, Any],
    mesh: Mesh,
    batch: int,
    bar: Any = None,
    plan: Plan | None = None,
) -> Iterator[np.ndarray]:
    """One stored video -> its frames, float32 (t, H, W, 3) chunks in order, `batch` windows
    decoded per call (tiled as `plan` says, default as the config does) and cross-faded as
    they come (the same frames as `decode_video`)."""
    starts, num_frames = [int(s) for s in video["starts"]], int(video["num_frames"])
    h, w = int(video["height"]), int(video["width"])
    stitcher, written = Stitcher(int(store.meta["video"]["overlap"])), 0
    for i in range(0, len(starts), batch):
        z = store.read_windows(shard, video, "latent", i, i + batch)
        content = store.read_windows(shard, video, "content", i, i + batch)
        decoded = decode_windows(vae, z, content, mesh, batch, plan)  # (k, T, H', W', 3)
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
    videos: list[tuple[int, dict[str, Any]]],
    mesh: Mesh,
    plans: dict[Size, Plan],
    out: Path,
    *,
    fps: float | None = None,
    progress: bool = True,
) -> list[str]:
    """Writes `OUT/<index>_<name>.mp4` per stored video of `videos` ((shard, record) of
    `store.videos()`), each at its own length, size and fps, as its size's plan says
    (`plan_decode`)."""
    written = []
    total = sum(len(v["starts"]) for _, v in videos)
    with tqdm(total=total, desc="decode", unit="window", disable=not progress) as bar:
        for shard, video in videos:
            plan = plans[(int(video["height"]), int(video["width"]))]
            path = out / f"{int(video['index']):06d}_{safe_stem(video['name'])}.mp4"
            frames = decode_video_frames(
                vae, store, shard, video, mesh, plan.window_batch, bar, plan
            )
            with video_file(path, fps or float(video["fps"]), crf=18) as writer:
                for chunk in frames:
                    if chunk.shape[0]:
                        writer.write(to_uint8(chunk))
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
    "plan_decode",
]
