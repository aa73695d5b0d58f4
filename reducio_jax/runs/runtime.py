"""What `eval`, `encode`, `decode` and `reconstruct` share: a model on a mesh and a data block.

* `RunOptions`: the options every dataset command takes (checkpoint, config, data, devices, ...);
  `EvalOptions` and `EncodeOptions` add their own.
* `load_vae(checkpoint, config, mesh)`: a released torch file (.ckpt/.pt/.pth/.safetensors) or an
  Orbax pretrained directory, with its parameters placed (replicated) on `mesh`.
* `prepare(opts, mesh)`: the global batch, the model config and the data block of a run.
* `data_config(spec, ...)`: the data block for `--data` (`synthetic`, `tfds:NAME`, or a folder /
  list file / single video), read by the `data/` pipeline.
* `global_mesh(devices)` / `local_mesh(devices)`: a ("data", "fsdp"=1) mesh; the batch is split
  over "data".
* `to_host`: (sharded, multi-host) jax arrays -> numpy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reducio_jax.api import ReducioVAE
from reducio_jax.config import load_config
from reducio_jax.convert.hub import is_hub
from reducio_jax.convert.pretrained import load_pretrained_config
from reducio_jax.data.pipeline import as_config
from reducio_jax.errors import InputError
from reducio_jax.sharding import make_mesh
from reducio_jax.storage.paths import as_path

DEFAULT_SYNTHETIC_CLIPS = 16
ConfigSpec = str | os.PathLike | ml_collections.ConfigDict | None


@dataclasses.dataclass(kw_only=True)
class RunOptions:
    """A model and a dataset on devices: the options `eval` and `encode` share."""

    checkpoint: str  # torch .ckpt/.pt/.safetensors or an Orbax pretrained directory
    config: ConfigSpec = None  # configs/*.py, official YAML, a ConfigDict; None: the stored one
    data: str = "synthetic"  # 'synthetic', 'tfds:NAME[:VERSION]', or a folder / list / video
    data_dir: str = ""  # TFDS data_dir (for tfds:NAME)
    split: str = "train"  # TFDS split
    num_clips: int | None = None  # the first N clips (None: all; synthetic: 16)
    batch_size: int | None = None  # global batch (None: one per device)
    resolution: int | tuple[int, int] | None = None  # N or (H, W) (None: the config's)
    num_frames: int | None = None  # frames per clip (None: the config's)
    fps: float | None = None  # clip frame rate (None: the config's)
    num_workers: int = 0  # Grain decode processes
    devices: int | None = None  # the first N devices (None: all)
    progress: bool = True  # a progress bar


# -- devices ------------------------------------------------------------------------------------


def global_mesh(devices: int | None = None) -> Mesh:
    """Mesh ("data", "fsdp") = (n, 1) over the first `devices` devices (default: all)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise InputError(f"--devices {n}: this machine has {len(available)} device(s)")
    if n != len(available) and jax.process_count() > 1:
        raise InputError("--devices is for single-process runs; leave it out with several hosts")
    return make_mesh({"data": n, "fsdp": 1}, devices=available[:n])


def local_mesh(devices: int | None = None) -> Mesh:
    """Like `global_mesh` over this process's devices only (each host works on its own shards)."""
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


def describe_devices(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{mesh.devices.size} x {d.platform}:{getattr(d, 'device_kind', '')}"


# -- model --------------------------------------------------------------------------------------


def resolve_config(checkpoint: str | os.PathLike, config: ConfigSpec) -> ml_collections.ConfigDict:
    """The run config: `config` if given, else the one stored in a pretrained directory (or a
    training run's `checkpoints/<step>`, the same layout)."""
    if is_hub(str(checkpoint)):
        if config is None:
            raise InputError(f"--config is needed to convert the torch checkpoint {checkpoint}")
        return load_config(config)
    path = as_path(checkpoint)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / "checkpoints").is_dir():
        raise InputError(
            f"{path} is a training run; pass one of its steps (--checkpoint {path}/checkpoints/N, "
            f"the same layout as a pretrained directory) or export it: "
            f"python -m reducio_jax export --run {path} --out DIR"
        )
    if config is not None:
        return load_config(config)
    if path.is_dir():
        return load_pretrained_config(path)
    raise InputError(f"--config is needed to convert the torch checkpoint {path}")


def load_vae(checkpoint: str | os.PathLike, config: ConfigSpec, mesh: Mesh | None) -> ReducioVAE:
    """A torch checkpoint file (needs `config`) or an Orbax pretrained directory, on `mesh`."""
    cfg = resolve_config(checkpoint, config)
    if is_hub(str(checkpoint)):
        return ReducioVAE.from_torch_checkpoint(str(checkpoint), cfg, mesh=mesh)
    path = as_path(checkpoint)
    if path.is_dir():
        return ReducioVAE.from_pretrained(path, cfg, mesh=mesh)
    return ReducioVAE.from_torch_checkpoint(path, cfg, mesh=mesh)


def config_label(config: ConfigSpec) -> str | None:
    """How a report names the config: its file, or "given" for an in-memory ConfigDict."""
    if config is None:
        return None
    return "given" if isinstance(config, ml_collections.ConfigDict) else str(config)


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
    opts: RunOptions, model_cfg: ml_collections.ConfigDict, batch_size: int
) -> ml_collections.ConfigDict:
    """`data_config` from the data fields of `opts`."""
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
        cfg.path = os.fspath(as_path(directory))
    else:
        cfg.source, cfg.path = "folder", spec


def prepare(
    opts: RunOptions, mesh: Mesh
) -> tuple[int, ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(global batch, model config, data block) of `opts` on `mesh`; checks them, loads nothing."""
    batch_size = batch_size_for(mesh, opts.batch_size)
    model_cfg = resolve_config(opts.checkpoint, opts.config)
    return batch_size, model_cfg, data_config_for(opts, model_cfg, batch_size)


def clip_count(num_records: int, num_clips: int | None) -> int:
    """How many clips a run covers: all records, or the first `num_clips` of them."""
    if num_clips is not None and num_clips <= 0:
        raise InputError(f"--num_clips {num_clips} must be positive")
    return num_records if num_clips is None else min(num_records, num_clips)


__all__ = [
    "InputError",
    "RunOptions",
    "batch_size_for",
    "clip_count",
    "config_label",
    "data_config",
    "data_config_for",
    "describe_devices",
    "global_mesh",
    "load_vae",
    "local_mesh",
    "prepare",
    "replicate",
    "resolve_config",
    "to_host",
]
