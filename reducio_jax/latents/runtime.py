"""Plumbing shared by `eval.py` and the `encode` / `decode` CLI: model, mesh, data, mp4 files.

* `load_vae(checkpoint, config, mesh)`: a released torch file (.ckpt/.pt/.pth/.safetensors) or an
  Orbax pretrained directory, with its parameters placed (replicated) on `mesh`.
* `data_config(spec, ...)`: the data block for `--data` (`synthetic`, `tfds:NAME`, or a folder /
  list file / single video).
* `eval_mesh(devices)`: a ("data", "fsdp"=1) mesh; the batch is split over "data".
* `write_mp4(path, frames, fps)`: uint8 (T, H, W, 3) frames -> H.264 mp4 (PyAV).
* `to_uint8`, `to_host`: [-1, 1] floats -> uint8; (sharded) jax arrays -> numpy.
* `USER_ERRORS`: the exception types that mean "bad input": CLIs print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import av
import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reducio_jax.api import ReducioVAE, load_config
from reducio_jax.config import ConfigError
from reducio_jax.convert.checkpoint import load_pretrained_config
from reducio_jax.convert.mapping import ConversionError
from reducio_jax.convert.torch_format import CheckpointFormatError
from reducio_jax.data import DataError
from reducio_jax.data.pipeline import as_config
from reducio_jax.data.video import to_uint8
from reducio_jax.latents.store import StoreError
from reducio_jax.sharding import make_mesh

DEFAULT_SYNTHETIC_CLIPS = 16
MAX_ERROR_CHARS = 600


class InputError(ValueError):
    """A command-line input that cannot be used (missing file, inconsistent sizes, ...)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ConversionError,
    CheckpointFormatError,
    DataError,
    InputError,
    StoreError,
    FileNotFoundError,
)


def error_line(err: BaseException) -> str:
    """One line for stderr: the first line of the message, shortened if it is very long."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " ... (truncated)"
    return f"error: {text}"


# -- devices ------------------------------------------------------------------------------------


def eval_mesh(devices: int | None = None) -> Mesh:
    """Mesh ("data", "fsdp") = (n, 1) over the first `devices` devices (default: all)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise InputError(f"--devices {n}: this machine has {len(available)} device(s)")
    if n != len(available) and jax.process_count() > 1:
        raise InputError("--devices is for single-process runs; leave it out with several hosts")
    return make_mesh({"data": n, "fsdp": 1}, devices=available[:n])


def local_mesh(devices: int | None = None) -> Mesh:
    """Like `eval_mesh` over this process's devices only (each host works on its own shards)."""
    local = jax.local_devices()
    n = len(local) if devices is None else devices
    if not 1 <= n <= len(local):
        raise InputError(f"--devices {n}: this process has {len(local)} device(s)")
    return make_mesh({"data": n, "fsdp": 1}, devices=local[:n])


def batch_size_for(mesh: Mesh, batch_size: int | None) -> int:
    """The global batch: default one clip per device; must divide over the mesh."""
    n = mesh.devices.size
    b = n if batch_size is None else batch_size
    if b <= 0 or b % n:
        raise InputError(f"--batch_size {b} must be a positive multiple of the {n} device(s)")
    return b


def replicate(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every variable of `module` on all devices of `mesh` (in place; returns it)."""
    state = jax.device_put(nnx.state(module), NamedSharding(mesh, PartitionSpec()))
    nnx.update(module, state)
    return module


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# -- model --------------------------------------------------------------------------------------


def resolve_config(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | ml_collections.ConfigDict | None,
) -> ml_collections.ConfigDict:
    """The run config: `config` if given, else the one stored in an Orbax pretrained dir."""
    path = pathlib.Path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if path.is_dir() and ((path / "checkpoints").is_dir() or path.parent.name == "checkpoints"):
        raise InputError(
            f"{path} is a training run (or one of its checkpoints); export its weights first: "
            f"python -m reducio_jax export --run {path} --out DIR, then pass --checkpoint DIR"
        )
    if config is not None:
        return load_config(config)
    if path.is_dir():
        return load_pretrained_config(path)
    raise InputError(f"--config is needed to convert the torch checkpoint {path}")


def load_vae(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | ml_collections.ConfigDict | None,
    mesh: Mesh,
) -> ReducioVAE:
    """A torch checkpoint file (needs `config`) or an Orbax pretrained directory, on `mesh`."""
    cfg = resolve_config(checkpoint, config)
    path = pathlib.Path(checkpoint)
    if path.is_dir():
        return ReducioVAE.from_pretrained(path, cfg, mesh=mesh)
    return ReducioVAE.from_torch_checkpoint(path, cfg, mesh=mesh)


# -- data ---------------------------------------------------------------------------------------


def data_config(
    spec: str,
    model_cfg: ml_collections.ConfigDict,
    *,
    data_dir: str = "",
    split: str = "train",
    num_clips: int | None = None,
    batch_size: int = 1,
    resolution: int | Sequence[int] | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    num_workers: int = 0,
) -> ml_collections.ConfigDict:
    """The eval data block for `--data SPEC` (`synthetic`, `tfds:NAME[:VERSION]`, or a path)."""
    base = model_cfg.get("data") or {}
    given = dict(base.to_dict() if isinstance(base, ml_collections.ConfigDict) else base)
    given.update(
        batch_size=int(batch_size),
        num_workers=int(num_workers),
        random_crop=False,
        shuffle=False,
        num_epochs=None,
    )
    if resolution is not None:  # set before the ConfigDict fixes the field's type
        given["resolution"] = resolution if isinstance(resolution, int) else tuple(resolution)
    if num_frames is not None:
        given["num_frames"] = int(num_frames)
    if fps is not None:
        given["fps"] = float(fps)
    cfg = as_config(given)
    _set_source(cfg, spec, data_dir, split, num_clips)
    return cfg


def data_config_for(
    opts: Any, model_cfg: ml_collections.ConfigDict, batch_size: int
) -> ml_collections.ConfigDict:
    """`data_config` from a CLI options object with the usual data fields (`data`, `data_dir`,
    `split`, `num_clips`, `resolution`, `num_frames`, `fps`, `num_workers`)."""
    return data_config(
        opts.data,
        model_cfg,
        data_dir=opts.data_dir,
        split=opts.split,
        num_clips=opts.num_clips,
        batch_size=batch_size,
        resolution=opts.resolution,
        num_frames=opts.num_frames,
        fps=opts.fps,
        num_workers=opts.num_workers,
    )


def _set_source(
    cfg: ml_collections.ConfigDict, spec: str, data_dir: str, split: str, num_clips: int | None
) -> None:
    if not spec:
        raise InputError("--data is empty: give 'synthetic', 'tfds:NAME' or a folder/list file")
    if spec == "synthetic":
        cfg.source, cfg.path = "synthetic", ""
        cfg.synthetic_size = int(num_clips or DEFAULT_SYNTHETIC_CLIPS)
    elif spec.startswith("tfds:"):
        name = spec.split(":", 1)[1]
        directory = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        cfg.source, cfg.tfds_name, cfg.split = "tfds", name, split
        cfg.path = str(pathlib.Path(directory).expanduser())
    else:
        cfg.source, cfg.path = "folder", spec


def clip_count(num_records: int, num_clips: int | None) -> int:
    """How many clips a run covers: all records, or the first `num_clips` of them."""
    if num_clips is not None and num_clips <= 0:
        raise InputError(f"--num_clips {num_clips} must be positive")
    return num_records if num_clips is None else min(num_records, num_clips)


# -- command line -------------------------------------------------------------------------------


def _resolution(text: str) -> int | tuple[int, int]:
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution '{text}' is not N or HxW") from None
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) == 2:
        return sizes[0], sizes[1]
    raise argparse.ArgumentTypeError(f"resolution '{text}' is not N or HxW")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """--data/--data_dir/--split/--num_clips/--batch_size/... shared with the encode CLI."""
    parser.add_argument(
        "--data",
        required=True,
        help="'synthetic', 'tfds:NAME[:VERSION]' (with --data_dir), or a folder / list file / video",
    )
    parser.add_argument("--data_dir", default="", help="TFDS data_dir (for --data tfds:NAME)")
    parser.add_argument("--split", default="train", help="TFDS split, e.g. validation[:10%%]")
    parser.add_argument("--num_clips", type=int, help="first N clips (default: all; synthetic 16)")
    parser.add_argument("--batch_size", type=int, help="global batch (default: one per device)")
    parser.add_argument("--resolution", type=_resolution, help="N or HxW (default: config)")
    parser.add_argument("--num_frames", type=int, help="frames per clip (default: config, 16)")
    parser.add_argument("--fps", type=float, help="clip frame rate (default: config, 16)")
    parser.add_argument("--num_workers", type=int, default=0, help="Grain decode processes")
    parser.add_argument("--devices", type=int, help="use the first N devices (default: all)")


# -- videos -------------------------------------------------------------------------------------


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """uint8 (T, H, W, 3) -> H.264 mp4 (yuv420p; odd sizes are padded by one pixel)."""
    frames = np.asarray(frames, np.uint8)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
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


def describe_devices(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{mesh.devices.size} x {d.platform}:{getattr(d, 'device_kind', '')}"


__all__ = [
    "USER_ERRORS",
    "InputError",
    "add_data_flags",
    "batch_size_for",
    "clip_count",
    "data_config",
    "describe_devices",
    "error_line",
    "eval_mesh",
    "load_vae",
    "local_mesh",
    "replicate",
    "resolve_config",
    "safe_stem",
    "to_host",
    "to_uint8",
    "write_mp4",
]
