"""`python -m reducio_jax reconstruct IN OUT`: a whole video file (or a folder of them) through
the VAE and back, streamed, with PSNR/SSIM of the whole video.

The input is decoded with PyAV frame by frame, resampled to the config's fps by sample and
hold (`keep_fps` keeps the source rate), cut into the overlapping 16-frame windows of
`models/windows.py`, reconstructed `window_batch` windows per compiled call
(`ReducioVAE.reconstruct_windows`: any frame size >= 32 px, tiled above one tile window when
the config enables tiling), cross-faded, and encoded to H.264 frame by frame. Host memory
holds the frames of one window batch, not the video. The video files are read and written by
`reducio_jax/data/video.py` (`probe`, `source_frames`, `resample`, `video_file`); this module
is the pipeline between them.

The window batch is chosen per video from memory by default (`window_batch="auto"`:
`ReducioVAE.plan_memory`, `reducio_jax/programs/planner.py`): one window a call on the CPU, on
accelerators as many (up to 16, and no more than the video has) as the compiled program's
memory analysis says fit in the memory available or `max_memory`; frames are tiled one tile
a step when one window does not fit, and when one tile does not either the video fails with
`OutOfMemory` (an `InputError`: "not enough memory: ... needs X and ... leaves Y") before its
output is started.
A fixed `window_batch` that does not fit fails the same way. The output is written to a hidden
temporary file next to OUT and renamed when complete; on any failure it is removed.

Bad input (not a video, no frames, frames under 32 px) raises `InputError` before the model is
loaded; a truncated or corrupt file is reconstructed as far as it decodes, with one warning
saying how many frames were lost. In a folder, every file is either reconstructed or named in
one `warning: skipped: ...` line (a file that is not a video by its extension, as a `.gif`, an
`.m4a` or a `.txt`, as well as a video that cannot be used; hidden files are left out) and
counted in `skipped`: the run then ends with an `InputError` ("N of M files could not be
used") once the others are done.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from reducio_jax.api import DEFAULT_OVERLAP, ReducioVAE
from reducio_jax.config import derived
from reducio_jax.data.video import (
    DecodeReport,
    Probe,
    VideoWriter,
    check_size,
    expected_output_frames,
    find_videos,
    lost_frames,
    probe,
    resample,
    source_frames,
    to_uint8,
    video_file,
    warn,
    warn_passed_over,
)
from reducio_jax.metrics.image import psnr_per_image, ssim_per_image
from reducio_jax.models.windows import (
    Stitcher,
    check_overlap,
    end_start,
    pad_frames,
    plan_windows,
)
from reducio_jax.programs.budget import parse_size
from reducio_jax.programs.footprint import Plan
from reducio_jax.programs.planner import parse_window_batch, plan_batch
from reducio_jax.runs.runtime import ConfigSpec, InputError, load_vae, resolve_config
from reducio_jax.storage.paths import Path, as_path, is_remote

OUTPUT_SUFFIXES = (".mp4", ".mkv", ".mov")


@dataclasses.dataclass
class ReconstructOptions:
    """`reconstruct` (flags in `reducio_jax.cli`)."""

    input: str
    output: str
    checkpoint: str
    config: ConfigSpec = None
    keep_fps: bool = False
    side_by_side: bool = False
    overlap: int = DEFAULT_OVERLAP
    window_batch: int | str = "auto"  # or a fixed number of windows a call
    max_memory: str | int | None = None  # "8GB" or bytes: for the whole process (None: measured)
    crf: int = 18
    progress: bool = True


# -- metrics ------------------------------------------------------------------------------------


@jax.jit
def _metric_sums(source: jax.Array, recon: jax.Array, count: jax.Array) -> jax.Array:
    """uint8 source and [-1, 1] reconstruction (T, H, W, 3) of which the first `count` frames
    are real -> the sums of their PSNR and SSIM, (2,)."""
    x = source.astype(jnp.float32) / 255.0
    y = (jnp.clip(recon, -1.0, 1.0) + 1.0) / 2.0
    real = jnp.arange(source.shape[0]) < count
    psnr = jnp.where(real, psnr_per_image(y, x), 0.0)
    ssim = jnp.where(real, ssim_per_image(y, x), 0.0)
    return jnp.stack([jnp.sum(psnr), jnp.sum(ssim)])


@dataclasses.dataclass
class Totals:
    """Sums of the per-frame metrics, `length` frames a call: one compiled shape per frame
    size, whatever the stitcher hands over."""

    length: int
    frames: int = 0
    psnr: float = 0.0
    ssim: float = 0.0

    def add(self, source: np.ndarray, recon: np.ndarray) -> None:
        for start in range(0, source.shape[0], self.length):
            piece = [a[start : start + self.length] for a in (source, recon)]
            count = piece[0].shape[0]
            short = [(0, self.length - count)] + [(0, 0)] * 3
            sums = _metric_sums(*(np.pad(a, short) for a in piece), count)
            psnr, ssim = np.asarray(sums, np.float64)
            self.frames += count
            self.psnr += float(psnr)
            self.ssim += float(ssim)


# -- one video ----------------------------------------------------------------------------------


class _Pipeline:
    """Frames in, windows through the model, stitched frames out.

    Holds the source frames from the first one not yet written (needed for the metrics and
    the side-by-side view) or the last `window` ones (the end-aligned window), whichever is
    earlier: about `window_batch * stride + window` frames, whatever the video's length.
    """

    def __init__(
        self, vae: ReducioVAE, opts: ReconstructOptions, plan: Plan, writer: VideoWriter, bar
    ):
        self.vae, self.opts, self.writer, self.bar = vae, opts, writer, bar
        self.plan, self.batch = plan, plan.window_batch
        self.window = vae.window
        self.stitcher = Stitcher(opts.overlap)
        self.frames: list[np.ndarray] = []  # source frames from `base` on
        self.base = 0  # index of frames[0]
        self.written = 0  # frames written so far
        self.queue: list[int] = []  # starts of windows waiting for the model
        self.next_start = 0  # the next regular window's start
        self.last_start = 0
        self.totals = Totals(self.window)
        self.windows = 0
        self.peak_frames = 0  # most source frames held at once

    @property
    def count(self) -> int:
        """Frames pushed so far."""
        return self.base + len(self.frames)

    def push(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        self.peak_frames = max(self.peak_frames, len(self.frames))
        if self.count == self.next_start + self.window:
            self._queue(self.next_start)
            self.next_start += self.window - self.opts.overlap
        if len(self.queue) >= self.batch:
            self._run(num_frames=None)
        self._trim()

    def finish(self) -> int:
        """Runs what is left; returns the number of frames of the video."""
        num_frames = self.count
        if num_frames < self.window:  # short video: one window, its last frame repeated
            self.frames = list(pad_frames(np.stack(self.frames)[None], self.window)[0])
            self._queue(0)
        else:
            last = end_start(num_frames, self.window, self.last_start)
            if last is not None:
                self._queue(last)
        self._run(num_frames=num_frames)
        self._emit(self.stitcher.finish(num_frames)[0], num_frames)
        return num_frames

    def _queue(self, start: int) -> None:
        self.queue.append(start)
        self.last_start = start

    def _trim(self) -> None:
        keep_from = min(self.written, max(0, self.count - self.window))
        if keep_from > self.base:
            del self.frames[: keep_from - self.base]
            self.base = keep_from

    def _run(self, num_frames: int | None) -> None:
        while self.queue:
            starts = self.queue[: self.batch]
            del self.queue[: len(starts)]
            windows = np.stack([self._source(s, self.window) for s in starts])  # (k, T, H, W, 3)
            recon = self._reconstruct(windows)  # (k, T, H, W, 3) float32
            for start, frames in zip(starts, recon, strict=True):
                self._emit(self.stitcher.add(start, frames[None])[0], num_frames)
            self.windows += len(starts)
            self.bar.update(len(starts))

    def _source(self, start: int, length: int) -> np.ndarray:
        return np.stack(self.frames[start - self.base : start - self.base + length])

    def _reconstruct(self, windows: np.ndarray) -> np.ndarray:
        batch, rows = self.batch, windows.shape[0]
        if rows < batch:  # one compiled shape: pad with copies of the last window
            windows = np.concatenate([windows, np.repeat(windows[-1:], batch - rows, axis=0)])
        video = windows.astype(np.float32) / 127.5 - 1.0  # on the host: no program for it
        return np.asarray(self.vae.reconstruct_windows(video, plan=self.plan))[:rows]

    def _emit(self, recon: np.ndarray, num_frames: int | None) -> None:
        """Writes final frames (t, H, W, 3), the next ones after those already written."""
        if num_frames is not None:  # a short video's padding
            recon = recon[: max(0, num_frames - self.written)]
        if recon.shape[0] == 0:
            return
        source = self._source(self.written, recon.shape[0])
        self.totals.add(source, recon)
        out = to_uint8(recon)
        if self.opts.side_by_side:
            out = np.concatenate([source, out], axis=2)  # (t, H, 2W, 3): input | reconstruction
        self.writer.write(out)
        self.written += recon.shape[0]


def reconstruct_file(
    vae: ReducioVAE, info: Probe, output: Path, opts: ReconstructOptions
) -> dict[str, Any]:
    """One video -> `output` (complete, or not there at all); returns its summary."""
    began = time.perf_counter()
    fps = info.fps if opts.keep_fps and info.fps > 0 else float(vae.config.data.fps)
    note = functools.partial(print, f"{info.path.name}:", file=sys.stderr, flush=True)
    if opts.progress:  # planning compiles programs: minutes for large frames and models
        note(f"planning memory for {info.width}x{info.height} frames (compiling) ...")
    plan = plan_memory(vae, info, opts, expected_output_frames(info, fps))  # before any output
    if opts.progress:
        note(f"{plan.describe()}; planned in {time.perf_counter() - began:.1f} s")
    report = DecodeReport()
    with video_file(output, fps, opts.crf) as writer:  # never a partial file left behind
        pipeline = _stream(vae, info, opts, plan, fps, writer, report)
    return _summary(info, output, fps, report, pipeline, time.perf_counter() - began)


def plan_memory(
    vae: ReducioVAE, info: Probe, opts: ReconstructOptions, expected: int | None
) -> Plan:
    """The window batch and tiling for `info`'s frames: chosen from memory ("auto", at most the
    windows the video has), or the fixed `window_batch` checked to fit. OutOfMemory if not."""
    windows = (
        None if expected is None else len(plan_windows(expected, vae.window, opts.overlap).starts)
    )
    return plan_batch(
        vae.programs,
        None,
        info.height,
        info.width,
        op="reconstruct",
        batch=opts.window_batch,
        max_memory=opts.max_memory,
        count=windows,
    )


def _stream(
    vae: ReducioVAE,
    info: Probe,
    opts: ReconstructOptions,
    plan: Plan,
    fps: float,
    writer: VideoWriter,
    report: DecodeReport,
) -> _Pipeline:
    """Decodes, (resamples,) reconstructs and writes every frame; returns the finished pipeline."""
    expected = expected_output_frames(info, fps)
    windows = None if expected is None else plan_windows(expected, vae.window, opts.overlap)
    total = None if windows is None else len(windows.starts)
    with tqdm(total=total, desc=info.path.name, unit="window", disable=not opts.progress) as bar:
        pipeline = _Pipeline(vae, opts, plan, writer, bar)
        timed = source_frames(info.path, report)
        frames = (f for _, f in timed) if opts.keep_fps else resample(timed, fps, info.fps)
        for frame in frames:
            pipeline.push(frame)
        if pipeline.count == 0:
            raise InputError(f"{info.path}: no frame could be decoded ({report.error})")
        pipeline.finish()
    return pipeline


def _summary(
    info: Probe,
    output: Path,
    fps: float,
    report: DecodeReport,
    pipeline: _Pipeline,
    seconds: float,
) -> dict[str, Any]:
    """Warns about lost frames, prints the video's PSNR/SSIM line, returns the summary."""
    lost = lost_frames(info, report)
    if lost:
        warn(
            f"{info.path}: decoded {report.decoded} of {info.expected_frames} frames; {lost} lost "
            f"({report.error or 'the file ends early'}); the output has the decoded part only"
        )
    totals = pipeline.totals
    summary = {
        "input": str(info.path),
        "output": str(output),
        "frames": totals.frames,
        "fps": round(fps, 3),
        "size": [info.height, info.width],
        "windows": pipeline.windows,
        "window_batch": pipeline.batch,
        "tiled": pipeline.plan.tiled,
        "memory_per_call": pipeline.plan.need,
        "psnr": round(totals.psnr / totals.frames, 3),
        "ssim": round(totals.ssim / totals.frames, 4),
        "lost_frames": lost,
        "peak_buffered_frames": pipeline.peak_frames,
        "seconds": round(seconds, 3),
    }
    print(
        f"{info.path} -> {output}: {totals.frames} frames at {summary['fps']:g} fps, "
        f"{pipeline.windows} window{'s' if pipeline.windows != 1 else ''}, PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}; "
        f"{pipeline.plan.describe()}"
    )
    return summary


def plan_outputs(source: str, output: str) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(input file, output file) pairs: one file -> OUT, or a folder's videos -> the same tree
    under OUT; and the folder's other files, (file, why it is not read) (`find_videos`)."""
    src, out = as_path(source), as_path(output)
    if not src.exists():
        raise InputError(f"{src} does not exist: give a video file or a folder of videos")
    if src.is_dir():
        if out.exists() and not out.is_dir():
            raise InputError(f"{src} is a folder, so OUT must be a folder too; {out} is a file")
        listing = find_videos(src)
        files = [as_path(f) for f in listing.videos]
        pairs = [(f, out / f.relative_to(src).with_suffix(".mp4")) for f in files]
        return pairs, listing.passed_over
    if out.is_dir():
        return [(src, out / src.with_suffix(".mp4").name)], []
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"output {out} must end in one of {', '.join(OUTPUT_SUFFIXES)}")
    if out == src or (not is_remote(out) and os.path.realpath(out) == os.path.realpath(src)):
        raise InputError(f"output {out} is the input; give another file name")
    return [(src, out)], []


def _checked(opts: ReconstructOptions, window: int) -> ReconstructOptions:
    """`opts` with its window batch and memory size parsed (once, before the model loads)."""
    window_batch = parse_window_batch(opts.window_batch)
    if window_batch is None:
        raise InputError("--window_batch: give 'auto' or a number of windows")
    max_memory = None if opts.max_memory is None else parse_size(opts.max_memory)
    try:
        check_overlap(window, opts.overlap)
    except ValueError as err:
        raise InputError(f"--overlap: {err}") from None
    return dataclasses.replace(opts, window_batch=window_batch, max_memory=max_memory)


def _usable(pairs, single: bool) -> tuple[list[tuple[Probe, Path]], list[str]]:
    """Probes every input; a bad one raises (one file) or is skipped with a warning (folder)."""
    usable, skipped = [], []
    for src, dst in pairs:
        try:
            info = probe(src)
            check_size(info)
        except InputError as err:
            if single:
                raise
            warn(f"skipped: {err}")
            skipped.append(str(src))
            continue
        usable.append((info, dst))
    return usable, skipped


def reconstruct_videos(opts: ReconstructOptions) -> dict[str, Any]:
    """`reconstruct IN OUT`: every input video -> its reconstruction; returns a summary.

    Raises InputError for unusable input (nothing is written), and after the other videos of a
    folder are done when some of its files could not be used (or are not videos).
    """
    cfg = resolve_config(opts.checkpoint, opts.config)  # bad checkpoint/config: fail first
    opts = _checked(opts, derived(cfg).num_frames)
    pairs, passed_over = plan_outputs(opts.input, opts.output)
    single = not as_path(opts.input).is_dir()
    skipped = warn_passed_over(passed_over)
    usable, unusable = _usable(pairs, single)
    skipped += unusable
    total = len(pairs) + len(passed_over)
    what = "files" if passed_over else "videos"  # not every file of the folder is a video
    if not usable:
        raise InputError(f"none of the {total} {what} in {opts.input} can be used")
    vae = load_vae(opts.checkpoint, cfg, None)
    videos = []
    for info, dst in usable:
        try:
            videos.append(reconstruct_file(vae, info, dst, opts))
        except InputError as err:
            if single:
                raise
            warn(f"skipped: {err}")
            skipped.append(str(info.path))
    summary = {"videos": videos, "skipped": skipped}
    if skipped and not single:
        raise InputError(
            f"{len(skipped)} of {total} {what} could not be used (warnings above); "
            f"{len(videos)} written to {opts.output}"
        )
    return summary


__all__ = [
    "ReconstructOptions",
    "plan_outputs",
    "reconstruct_file",
    "reconstruct_videos",
]
