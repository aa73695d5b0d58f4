"""Shared test helpers: build checkpoint files from the fixture recipe; run a Python probe."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import av
import numpy as np
import recipe
from torch_writer import save_torch_checkpoint

LIGHTNING_EXTRA = {
    "epoch": 3,
    "global_step": 20000,
    "pytorch-lightning_version": "2.0.1",
    "optimizer_states": [],
    "lr_schedulers": [],
}

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def write_checkpoint(
    path: pathlib.Path, state_dict: dict[str, np.ndarray], *, use_torch: bool = HAVE_TORCH
) -> pathlib.Path:
    """A released-layout Lightning checkpoint: with torch.save when torch is installed, else with
    the project's own writer of torch-format files."""
    if use_torch:
        import torch

        tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}
        torch.save({**LIGHTNING_EXTRA, "state_dict": tensors}, path)
    else:
        save_torch_checkpoint(path, state_dict, extra=LIGHTNING_EXTRA)
    return path


def recipe_checkpoint(fixtures: pathlib.Path, name: str, path: pathlib.Path, **kw) -> pathlib.Path:
    return write_checkpoint(path, recipe.state_dict(fixtures, name), **kw)


def max_err(ours, golden) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - np.asarray(golden, np.float32))))


def run_probe(code: str, *args: str, **env: str) -> str:
    """Runs `python -c code *args` on JAX's CPU backend with `env` added; its stdout (it must
    exit 0)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


ROOT = pathlib.Path(__file__).resolve().parents[1]
DIST_CONFIG = str(ROOT / "tests" / "train" / "dist_config.py")


def start_training_process(i: int, port: int, workdir: str | os.PathLike, env: dict):
    """Process `i` of a 2-process `train.py` run of tests/train/dist_config.py on localhost."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", DIST_CONFIG, "--workdir",
           str(workdir), "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
           "--process_id", str(i), "--noprogress"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses_line(proc: subprocess.Popen) -> str:
    """The "steps ...; L1 ..." part of a finished training process's `done:` line."""
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    done = [line for line in stdout.splitlines() if "done: " in line]
    assert len(done) == 1, stdout
    return re.search(r"done: (steps [^;]*; L1 [^;]*);", done[0]).group(1)


TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def pattern(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """uint8 (N, H, W, 3): a smooth colour pattern drifting over the frame."""
    t = np.arange(num_frames)[:, None, None, None]
    y = np.arange(height)[None, :, None, None]
    x = np.arange(width)[None, None, :, None]
    c = np.arange(3)[None, None, None, :]
    wave = np.sin(2 * np.pi * (x / width + t / 48) + c) * np.cos(2 * np.pi * (y / height - t / 64))
    return np.round((0.7 * wave + 1) * 127.5).astype(np.uint8)


def write_video(path: pathlib.Path, frames: np.ndarray, fps: int = 16, **options) -> pathlib.Path:
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0", "preset": "ultrafast", "g": "4"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_video(path: pathlib.Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


def write_gif(path: pathlib.Path, size: int = 32) -> pathlib.Path:
    """Four frames of `pattern` as an animated GIF (a format the commands do not read)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("gif", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "rgb8"
        for frame in pattern(4, size, size):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_audio_only(path: pathlib.Path) -> pathlib.Path:
    """About a second of AAC silence, no video stream (.m4a, or any MPEG-4 name)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(16):
            silence = np.zeros((1, 1024), np.float32)
            frame = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
