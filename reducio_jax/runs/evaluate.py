"""Reconstruction metrics of a Reducio-VAE over a dataset: PSNR, SSIM, LPIPS and rFVD.

```python
from reducio_jax.runs.evaluate import EvalOptions, evaluate, write_reports
result = evaluate(EvalOptions(checkpoint="reducio-ft4.ckpt", config="configs/reducio_ft4.py",
                              data="/data/ucf101_val", num_clips=1000, i3d="i3d.pt"))
write_reports(result, "eval_out")        # metrics.json, metrics.md, per_clip.jsonl
```

Each batch is split over the devices ("data" mesh axis), reconstructed with
`ReducioVAE.reconstruct` (tiled when frames exceed one tile window) and scored like the
reference's `validation_step`: both videos clamped to [-1, 1], frames flattened to (B*T, ...),
PSNR and SSIM on (x + 1) / 2; LPIPS per frame on [-1, 1] input (the convention of the training
loss; `lpips_unit_range=True` feeds [0, 1] as the reference validation step does); rFVD from
I3D features of the real and reconstructed clips (bilinear resize to `i3d_resolution`),
accumulated as streaming mean/covariance. Padding rows of the last batch (mask False) and
clips past `num_clips` are excluded. A metric whose weights are missing is None, with the reason
in `result["unavailable"]`. Unreadable files are skipped (one warning each) and counted:
`files_read`, `clips_used`, `files_skipped` in metrics.json / metrics.md, one line per skipped
file with its reason in `skipped.jsonl`. SIGTERM stops after the batch in flight: the reports
are written for the clips done so far (`"preempted": true`, marked in metrics.md), the progress
is kept in `OUT/eval_state.json` (+ `.npz` with the FVD statistics) and `eval.py` exits with
143 (`reducio_jax/cli/eval.py`); running the same command again continues from there (single-process runs).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from reducio_jax.config import frame_size
from reducio_jax.convert.torch_format import load_state_dict
from reducio_jax.data import make_loader
from reducio_jax.data.skips import SKIPPED_FILE
from reducio_jax.data.video import safe_stem, to_uint8, write_mp4
from reducio_jax.errors import InputError
from reducio_jax.metrics import FVDAccumulator, InceptionI3d, load_i3d, resize_video
from reducio_jax.metrics.image import psnr_per_image, ssim_per_image
from reducio_jax.runs.preemption import StopOnSigterm
from reducio_jax.runs.runtime import (
    RunOptions,
    clip_count,
    config_label,
    describe_devices,
    global_mesh,
    load_vae,
    prepare,
    replicate,
    to_host,
)
from reducio_jax.storage.paths import Path, PathLike, as_path, staged, write_text

log = logging.getLogger(__name__)
METRICS = ("psnr", "ssim", "lpips", "rfvd")
PER_CLIP = ("psnr", "ssim", "lpips")
LABELS = {"psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "rfvd": "rFVD ↓"}
NO_LPIPS = (
    "the checkpoint has no LPIPS weights (no loss.perceptual_loss.* keys); use a training "
    "checkpoint or a pretrained directory converted without --vae_only"
)
STATE_FILE = "eval_state.json"  # progress of a run stopped by SIGTERM (resumed by a rerun)
NO_I3D = "no --i3d weights given; pass a pytorch-i3d InceptionI3d state dict (.pt, .safetensors)"


@dataclasses.dataclass(kw_only=True)
class EvalOptions(RunOptions):
    """`eval`: the shared `RunOptions` and the metrics' own (flags in `reducio_jax.cli.eval`)."""

    out: str | None = None  # reports, sample videos and the progress of a stopped run
    save_videos: int = 4  # input | reconstruction mp4s to write
    i3d: str | None = None  # pytorch-i3d state dict for rFVD (None: rFVD unavailable)
    i3d_resolution: int = 224  # I3D input size
    sample_posterior: bool = False  # sample z instead of taking the posterior mean
    seed: int = 0  # posterior sampling seed
    lpips_unit_range: bool = False  # LPIPS on [0, 1] frames, as the reference validation_step


# -- jitted metric kernels ------------------------------------------------------------------------


@jax.jit
def image_metrics(video: jax.Array, recon: jax.Array) -> dict[str, jax.Array]:
    """Per-clip mean over frames of PSNR and SSIM: (B, T, H, W, 3) x2 in [-1, 1] -> (B,) each."""
    b, t = video.shape[:2]
    x = (jnp.clip(video, -1.0, 1.0).reshape(b * t, *video.shape[2:]) + 1.0) / 2.0
    y = (jnp.clip(recon, -1.0, 1.0).reshape(b * t, *recon.shape[2:]) + 1.0) / 2.0
    return {
        "psnr": psnr_per_image(y, x).reshape(b, t).mean(axis=1),
        "ssim": ssim_per_image(y, x).reshape(b, t).mean(axis=1),
    }


@functools.partial(nnx.jit, static_argnames=("unit_range",))
def lpips_per_clip(
    lpips: nnx.Module, video: jax.Array, recon: jax.Array, unit_range: bool = False
) -> jax.Array:
    """Mean LPIPS over frames, (B,). One frame of every clip at a time (bounded memory)."""
    x, y = jnp.clip(video, -1.0, 1.0), jnp.clip(recon, -1.0, 1.0)
    if unit_range:
        x, y = (x + 1.0) / 2.0, (y + 1.0) / 2.0
    frames = (jnp.moveaxis(x, 1, 0), jnp.moveaxis(y, 1, 0))  # (T, B, H, W, 3) each
    per_frame = jax.lax.map(lambda xy: lpips(xy[0], xy[1]), frames)  # (T, B)
    return per_frame.mean(axis=0)


@functools.partial(nnx.jit, static_argnames=("size",))
def i3d_features(i3d: InceptionI3d, video: jax.Array, size: int) -> jax.Array:
    """FVD features (B, 400) of clips in [-1, 1], resized to size x size."""
    return i3d.features(resize_video(jnp.clip(video, -1.0, 1.0), size))


# -- I3D ------------------------------------------------------------------------------------------


def _same_out(size: int, strides: Sequence[int]) -> int:
    for s in strides:
        size = math.ceil(size / s)
    return size


def i3d_pool_window(resolution: int, num_frames: int) -> tuple[int, int, int]:
    """Average-pool window that leaves one spatial position: (2, 7, 7) at 224 px, 16 frames."""
    t = _same_out(num_frames, (2, 2, 2))
    s = _same_out(resolution, (2, 2, 2, 2, 2))
    return (min(2, t), s, s)


def load_i3d_file(path: str, resolution: int, num_frames: int, mesh: Mesh) -> InceptionI3d:
    """A pytorch-i3d state dict file -> `InceptionI3d` replicated on `mesh`."""
    state_dict = load_state_dict(path)
    try:
        model = load_i3d(state_dict, avg_pool_window=i3d_pool_window(resolution, num_frames))
    except ValueError as err:
        first = str(err).splitlines()
        raise InputError(
            f"--i3d {path} is not a pytorch-i3d InceptionI3d state dict: "
            + "; ".join(line.strip() for line in first[1:4])
        ) from err
    return replicate(model, mesh)


# -- accumulation ---------------------------------------------------------------------------------


class MetricTotals:
    """Streaming sums of per-clip metrics and FVD statistics over the kept clips."""

    def __init__(self, with_fvd: bool) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.resumed = 0  # clips restored from a stopped run
        self.fvd = FVDAccumulator() if with_fvd else None
        self.per_clip: list[dict[str, Any]] = []

    def update(
        self,
        values: dict[str, np.ndarray],
        keep: np.ndarray,
        index: np.ndarray,
        names: Callable[[int], str],
    ) -> None:
        """values: per-clip (B,) arrays and optionally "real"/"fake" features (B, D)."""
        rows = np.flatnonzero(keep)
        for key in (k for k in PER_CLIP if k in values):
            total = float(np.sum(values[key][rows], dtype=np.float64))
            self.sums[key] = self.sums.get(key, 0.0) + total
        if self.fvd is not None and rows.size:
            self.fvd.update(real=values["real"][rows], fake=values["fake"][rows])
        self.count += rows.size
        for r in rows:
            clip = {"index": int(index[r]), "name": names(int(index[r]))}
            clip.update({k: float(values[k][r]) for k in PER_CLIP if k in values})
            self.per_clip.append(clip)

    def means(self) -> dict[str, float]:
        return {k: v / self.count for k, v in self.sums.items()} if self.count else {}

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able sums, count and rows; FVD statistics as arrays) to resume from."""
        arrays = self.fvd.state_dict() if self.fvd is not None else {}
        return {"sums": self.sums, "count": self.count, "per_clip": self.per_clip}, arrays

    def restore(self, values: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.sums, self.count = dict(values["sums"]), int(values["count"])
        self.per_clip = list(values["per_clip"])
        self.resumed = self.count
        if self.fvd is not None and arrays:
            self.fvd = FVDAccumulator.from_state_dict(arrays)

    def rfvd(self) -> tuple[float | None, str | None]:
        if self.fvd is None:
            return None, NO_I3D
        if self.count < 2:
            return None, f"rFVD needs at least 2 clips, got {self.count}"
        return self.fvd.compute(), None


# -- sample videos --------------------------------------------------------------------------------


class VideoSaver:
    """Writes input | reconstruction mp4s of the clips with index < `count` (process 0)."""

    def __init__(self, folder: Path | None, count: int, fps: float, names) -> None:
        self.folder, self.count, self.fps, self.names = folder, count, fps, names
        self.written: list[str] = []

    def wanted(self, keep: np.ndarray, index: np.ndarray) -> np.ndarray:
        return np.flatnonzero(keep & (index < self.count)) if self.folder else np.array([], int)

    def add(self, video: jax.Array, recon: jax.Array, keep: np.ndarray, index: np.ndarray) -> None:
        rows = self.wanted(keep, index)
        if not rows.size:
            return
        inputs, outputs = to_uint8(to_host(video)[rows]), to_uint8(to_host(recon)[rows])
        if jax.process_index() != 0:
            return
        for r, a, b in zip(rows, inputs, outputs, strict=True):
            i = int(index[r])
            path = self.folder / f"{i:05d}_{safe_stem(self.names(i))}.mp4"
            write_mp4(path, np.concatenate([a, b], axis=2), self.fps)
            self.written.append(str(path))


# -- the run --------------------------------------------------------------------------------------


def _posterior_rng(opts: EvalOptions, step: int, mesh: Mesh) -> jax.Array | None:
    if not opts.sample_posterior:
        return None
    key = jax.random.fold_in(jax.random.key(opts.seed), step)
    return jax.device_put(key, NamedSharding(mesh, PartitionSpec()))


def _batch_values(
    video: jax.Array, recon: jax.Array, lpips, i3d, opts: EvalOptions
) -> dict[str, np.ndarray]:
    values = dict(image_metrics(video, recon))
    if lpips is not None:
        values["lpips"] = lpips_per_clip(lpips, video, recon, unit_range=opts.lpips_unit_range)
    if i3d is not None:
        values["real"] = i3d_features(i3d, video, opts.i3d_resolution)
        values["fake"] = i3d_features(i3d, recon, opts.i3d_resolution)
    return {k: to_host(v) for k, v in values.items()}


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Runs the evaluation; returns the result dict that `write_reports` writes."""
    start = time.perf_counter()
    mesh = global_mesh(opts.devices)
    batch_size, cfg, data_cfg = prepare(opts, mesh)
    with make_loader(data_cfg, mesh=mesh, train=False) as loader:  # checks the data first
        num_clips = clip_count(len(loader.source), opts.num_clips)
        i3d = None
        if opts.i3d:
            i3d = load_i3d_file(opts.i3d, opts.i3d_resolution, int(data_cfg.num_frames), mesh)
        vae = load_vae(opts.checkpoint, cfg, mesh)
        lpips = vae.weights.lpips
        with StopOnSigterm() as stop:
            run = _run(loader, vae, lpips, i3d, opts, mesh, num_clips, data_cfg, stop)
        totals, saver, stopped = run
        files = _file_counts(loader, totals, stopped)
    seconds = time.perf_counter() - start
    result = _result(opts, totals, data_cfg, mesh, batch_size, seconds, saver.written, lpips)
    return {**result, **files}


def _file_counts(loader, totals: MetricTotals, preempted: bool) -> dict[str, Any]:
    stats = loader.stats()
    return {
        "files_read": stats["files_read"],
        "clips_used": totals.count,
        "files_skipped": stats["files_skipped"],
        "preempted": preempted,
        "skipped": list(loader.skip_report.entries.values()),
    }


def _run(loader, vae, lpips, i3d, opts, mesh, num_clips, data_cfg, stop):
    totals = MetricTotals(with_fvd=i3d is not None)
    folder = as_path(opts.out) / "videos" if opts.out and opts.save_videos > 0 else None
    saver = VideoSaver(folder, opts.save_videos, float(data_cfg.fps), loader.source.name)
    steps = math.ceil(num_clips / loader.global_batch)
    start = _resume(opts, totals, saver, loader)
    bar = tqdm(
        itertools.islice(loader, steps - start),
        total=steps,
        initial=start,
        desc="eval",
        unit="batch",
        disable=not opts.progress or jax.process_index() != 0,
    )
    for step, batch in enumerate(bar, start=start):
        recon = vae.reconstruct(batch["video"], rng=_posterior_rng(opts, step, mesh))
        index = to_host(batch["index"])
        keep = to_host(batch["mask"]) & (index < num_clips)
        totals.update(
            _batch_values(batch["video"], recon, lpips, i3d, opts), keep, index, loader.source.name
        )
        saver.add(batch["video"], recon, keep, index)
        bar.set_postfix({k: f"{v:.4f}" for k, v in totals.means().items()})
        if stop.should_stop() and step + 1 < steps:
            _save_progress(opts, step + 1, totals, saver, loader)
            return totals, saver, True
    _clear_progress(opts)
    return totals, saver, False


# -- stop and resume --------------------------------------------------------------------------


def _progress_paths(opts: EvalOptions) -> tuple[Path, Path] | None:
    """OUT/eval_state.json and .npz: single-process runs with an --out folder."""
    if not opts.out or jax.process_count() > 1:
        return None
    out = as_path(opts.out)
    return out / STATE_FILE, out / STATE_FILE.replace(".json", ".npz")


def _fingerprint(opts: EvalOptions) -> dict[str, Any]:
    values = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    if isinstance(opts.config, ml_collections.ConfigDict):
        values["config"] = json.loads(opts.config.to_json_best_effort())
    values.pop("progress")
    return values


def _save_progress(opts, batches: int, totals: MetricTotals, saver, loader) -> None:
    paths = _progress_paths(opts)
    if paths is None:
        return
    values, arrays = totals.state()
    state = {"options": _fingerprint(opts), "batches": batches, "totals": values,
             "videos": saver.written, "loader": loader.get_state(),
             "counts": loader.counts_state()}  # fmt: skip
    if arrays:
        with staged(paths[1]) as local:
            np.savez(local, **arrays)
    write_text(paths[0], json.dumps(state, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _resume(opts: EvalOptions, totals: MetricTotals, saver, loader) -> int:
    """Batches already done by a run of the same command stopped by SIGTERM (0 if none)."""
    paths = _progress_paths(opts)
    if paths is None or not paths[0].is_file():
        return 0
    state = json.loads(paths[0].read_text())
    if state.get("options") != json.loads(json.dumps(_fingerprint(opts), default=_json_default)):
        log.warning("Ignoring %s: written by an eval.py run with other options.", paths[0])
        return 0
    arrays = {}
    if paths[1].is_file():
        with paths[1].open("rb") as f:
            arrays = dict(np.load(f))
    totals.restore(state["totals"], arrays)
    saver.written = list(state["videos"])
    loader.set_state(state["loader"])
    loader.load_counts_state(state["counts"])
    log.warning("Resuming after %d batches (%d clips) from %s.", state["batches"],
                totals.count, paths[0])  # fmt: skip
    return int(state["batches"])


def _clear_progress(opts: EvalOptions) -> None:
    paths = _progress_paths(opts)
    for path in paths or ():
        path.unlink(missing_ok=True)


def _result(opts, totals, data_cfg, mesh, batch_size, seconds, videos, lpips) -> dict[str, Any]:
    means = totals.means()
    rfvd, rfvd_reason = totals.rfvd()
    values = {**{k: means.get(k) for k in PER_CLIP}, "rfvd": rfvd}
    unavailable = {}
    if lpips is None:
        unavailable["lpips"] = NO_LPIPS
    if rfvd_reason:
        unavailable["rfvd"] = rfvd_reason
    if totals.count == 0:
        unavailable.update({k: "no clips were evaluated" for k in PER_CLIP})
    h, w = frame_size(data_cfg.resolution)
    return {
        **values,
        "unavailable": unavailable,
        "num_clips": totals.count,
        "num_frames": int(data_cfg.num_frames),
        "resolution": [h, w],
        "fps": float(data_cfg.fps),
        "checkpoint": str(opts.checkpoint),
        "config": config_label(opts.config),
        "data": opts.data,
        "split": opts.split if opts.data.startswith("tfds:") else None,
        "settings": {
            "posterior": f"sample (seed {opts.seed})" if opts.sample_posterior else "mean",
            "lpips_input": "[0, 1]" if opts.lpips_unit_range else "[-1, 1]",
            "i3d": None if not opts.i3d else {"path": opts.i3d, "resolution": opts.i3d_resolution},
            "batch_size": batch_size,
            "devices": describe_devices(mesh),
        },
        "seconds": round(seconds, 3),
        "clips_per_second": (
            round((totals.count - totals.resumed) / seconds, 4) if seconds > 0 else None
        ),
        "resumed_clips": totals.resumed,
        "videos": videos,
        "per_clip": totals.per_clip,
    }


# -- reports --------------------------------------------------------------------------------------


def _cell(result: dict[str, Any], key: str) -> str:
    value = result.get(key)
    if value is None:
        return f"unavailable: {result['unavailable'].get(key, 'not computed')}"
    return f"{value:.2f}" if key in ("psnr", "rfvd") else f"{value:.4f}"


def format_markdown(result: dict[str, Any]) -> str:
    """The metrics table (`metrics.md`)."""
    h, w = result["resolution"]
    s = result["settings"]
    lines = [
        "# Reconstruction metrics",
        "",
        "| Metric | Value |",
        "|---|---|",
        *(f"| {LABELS[k]} | {_cell(result, k)} |" for k in METRICS),
        "",
        f"{result['num_clips']} clips x {result['num_frames']} frames at {h}x{w}, "
        f"{result['fps']:g} fps; checkpoint `{result['checkpoint']}`, data `{result['data']}`.",
        f"Posterior {s['posterior']}; LPIPS on {s['lpips_input']} input"
        + (f"; I3D at {s['i3d']['resolution']} px" if s["i3d"] else "")
        + f"; {s['devices']}, batch {s['batch_size']}, {result['seconds']:.1f} s.",
        "",
        f"Files: {result.get('files_read', 0)} read, {result.get('clips_used', 0)} clips used, "
        f"{result.get('files_skipped', 0)} skipped as unreadable"
        + (
            f" (listed with the reason in `{SKIPPED_FILE}`)."
            if result.get("files_skipped")
            else "."
        ),
        "",
    ]
    if result.get("preempted"):
        lines += ["**Partial**: stopped by SIGTERM; these figures cover the clips above only.", ""]
    return "\n".join(lines)


def write_reports(result: dict[str, Any], out: PathLike) -> Path:
    """metrics.json (without per-clip rows and skipped files), metrics.md, per_clip.jsonl and
    skipped.jsonl (one line per unreadable file: name, index, reason) under `out` (a folder or
    a bucket URL); each file is written whole or not at all (`paths.write_text`), metrics.json
    last."""
    out = as_path(out)
    if jax.process_index() != 0:
        return out
    skipped = (json.dumps(row) for row in result.get("skipped", []))
    write_text(out / SKIPPED_FILE, "".join(f"{row}\n" for row in skipped))
    rows = (json.dumps(row) for row in result["per_clip"])
    write_text(out / "per_clip.jsonl", "".join(f"{row}\n" for row in rows))
    write_text(out / "metrics.md", format_markdown(result))
    summary = {k: v for k, v in result.items() if k not in ("per_clip", "skipped")}
    write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return out


__all__ = [
    "EvalOptions",
    "MetricTotals",
    "evaluate",
    "format_markdown",
    "i3d_features",
    "i3d_pool_window",
    "image_metrics",
    "load_i3d_file",
    "lpips_per_clip",
    "write_reports",
]
