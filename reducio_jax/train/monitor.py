"""Run monitoring: TensorBoard scalars and images, metrics.jsonl, MFU, reconstruction previews.

Only process 0 writes. Scalars are means over the logging window; throughput is clips/s over
the window's wall time; MFU = (compiled step FLOPs per device x steps/s) / peak FLOP/s of the
device kind (bf16 dense peak, table below; unknown kinds such as CPUs -> no MFU).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from reducio_jax.data.video import to_uint8
from reducio_jax.storage.paths import Path, TextLog, is_remote, make_dirs, mirror, staged

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per JAX device, matched (in order) against `device.device_kind`.
# Sources (dense, i.e. without the 2:4-sparsity figure the datasheets print beside it):
# NVIDIA H100 SXM / H200 datasheets (989 TFLOPS bf16 Tensor Core), A100 datasheet (312),
# B200 (HGX B200 spec, 2.25 PFLOPS per GPU), L40S / L4 / A10G datasheets; Google Cloud TPU
# system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e: 275, 197, 459,
# 918 TFLOPS bf16 per chip; v3: 123 per chip, two cores).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),  # per core (a v3 chip is two JAX devices)
    ("H200", 989e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled step, per device (XLA's cost analysis), or None."""
    try:
        analysis = compiled.cost_analysis()
    except Exception as err:  # backends without cost analysis
        log.info("No cost analysis (%s): MFU is not logged.", err)
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def mfu(flops_per_step: float | None, steps_per_second: float, device_kind: str) -> float | None:
    peak = peak_flops(device_kind)
    if not flops_per_step or peak is None:
        return None
    return flops_per_step * steps_per_second / peak


def preview_grid(clip: np.ndarray, recon: np.ndarray, num_frames: int = 4) -> np.ndarray:
    """(T, H, W, 3) input and recon -> (rows * H, 2 * W, 3) uint8: rows of input | recon."""
    t = clip.shape[0]
    picks = np.linspace(0, t - 1, min(num_frames, t)).round().astype(int)
    rows = [np.concatenate([clip[i], recon[i]], axis=1) for i in picks]  # (H, 2W, 3)
    return to_uint8(np.concatenate(rows, axis=0))


def side_by_side(clip: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) x2 -> (T, H, 2W, 3) uint8."""
    return to_uint8(np.concatenate([clip, recon], axis=2))


class Monitor:
    """Writers of one run (no-ops on processes other than 0)."""

    def __init__(
        self, workdir: Path, *, enabled: bool, device_kind: str, flops_per_step: float | None
    ):
        self.enabled = enabled
        self.workdir = workdir
        self.device_kind = device_kind
        self.flops_per_step = flops_per_step  # of the compiled step (MFU), None: unknown
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.events = workdir / "tensorboard"
            self.staging = None  # a run in a bucket: events written here, uploaded at each log
            if is_remote(workdir):
                self.staging = tempfile.TemporaryDirectory(prefix="reducio-tensorboard-")
            folder = self.staging.name if self.staging else os.fspath(self.events)
            self.writer = SummaryWriter(folder)
            self.jsonl = TextLog(workdir / "metrics.jsonl")

    def scalars(
        self, step: int, window: list[Mapping[str, float]], seconds: float, clips: int
    ) -> dict[str, float]:
        """Writes the window means (+ throughput, MFU) at `step`; returns them."""
        if not window:
            return {}
        keys = window[0].keys()
        means = {k: float(np.mean([m[k] for m in window])) for k in keys}
        means["clips_per_second"] = clips / max(seconds, 1e-9)
        means["seconds_per_step"] = seconds / len(window)
        value = mfu(self.flops_per_step, len(window) / max(seconds, 1e-9), self.device_kind)
        if value is not None:
            means["mfu"] = value
        if self.enabled:
            for k, v in means.items():
                self.writer.add_scalar(_tag(k), v, step)
            self.jsonl.write(json.dumps({"step": step, **means}) + "\n")
            self.jsonl.flush()
            self._upload_events()
        return means

    def counters(self, step: int, values: Mapping[str, float]) -> None:
        """Data counters under `data/` (`data/skipped`: distinct unreadable files so far)."""
        if self.enabled:
            for k, v in values.items():
                self.writer.add_scalar(f"data/{k}", v, step)

    def preview(self, step: int, clip: np.ndarray, recon: np.ndarray, l1: float) -> Path | None:
        """Writes previews/step_<step>.png (grid) and .gif (input | recon), a TB image and the
        clip's reconstruction L1 (`preview/l1`)."""
        if not self.enabled:
            return None
        from PIL import Image

        folder = self.workdir / "previews"
        make_dirs(folder)
        grid = preview_grid(clip, recon)
        png = folder / f"step_{step:07d}.png"
        with staged(png) as local:
            Image.fromarray(grid).save(local)
        frames = [Image.fromarray(f) for f in side_by_side(clip, recon)]
        with staged(folder / f"step_{step:07d}.gif") as local:
            frames[0].save(local, save_all=True, append_images=frames[1:], duration=62, loop=0)
        self.writer.add_image("preview/input_recon", grid, step, dataformats="HWC")
        self.writer.add_scalar("preview/l1", l1, step)
        return png

    def text(self, tag: str, value: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, value, 0)

    def _upload_events(self) -> None:
        """A run in a bucket: the event files as they are now, each in one upload (the same
        whole-file re-upload tensorboardX's own gs:// writer does, through the one GCS client
        of every other path)."""
        if self.staging is not None:
            self.writer.flush()
            mirror(self.staging.name, self.events)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._upload_events()
            self.jsonl.close()
            if self.staging is not None:
                self.staging.cleanup()


_GROUPS = {
    "disc_loss": "disc",
    "logits_real": "disc",
    "logits_fake": "disc",
    "lr_vae": "optim",
    "lr_disc": "optim",
    "grad_norm_vae": "optim",
    "grad_norm_disc": "optim",
    "clips_per_second": "perf",
    "seconds_per_step": "perf",
    "mfu": "perf",
}


def _tag(name: str) -> str:
    return f"{_GROUPS.get(name, 'train')}/{name}"
