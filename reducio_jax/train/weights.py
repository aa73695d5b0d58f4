"""Starting weights: `--init_from` (a released torch checkpoint, a pretrained directory or a
run's step) and the LPIPS weights (from `--init_from` or `--lpips_weights`; a resumed run
reads its own from its checkpoint)."""

from __future__ import annotations

import logging
from typing import Any

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from reducio_jax.convert.hub import HubError, download, is_hub
from reducio_jax.convert.load import load_converted
from reducio_jax.convert.mapping import ConversionError, convert_state_dict, split_groups
from reducio_jax.convert.pretrained import load_hub_weights
from reducio_jax.convert.torch_format import CheckpointFormatError, load_state_dict
from reducio_jax.storage.paths import Path, PathLike, as_path
from reducio_jax.train.errors import TrainingError
from reducio_jax.train.state import make_lpips

log = logging.getLogger(__name__)
LPIPS_PREFIX = "loss.perceptual_loss."


def _existing(path: PathLike, flag: str) -> Path:
    p = as_path(path)
    if not p.exists():
        raise TrainingError(f"{flag} {path}: no such file or directory")
    return p


def load_init_weights(path: str, cfg: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    """A torch .ckpt/.pt/.safetensors (converted on the fly), a pretrained directory or a run's
    step -> `ReducioWeights` (vae, discriminator | None, lpips | None, logvar) on `mesh`."""
    from reducio_jax.convert.pretrained import convert_torch_checkpoint, load_pretrained

    try:
        if is_hub(path):
            return load_hub_weights(path, cfg, mesh=mesh)
        p = _existing(path, "--init_from")
        if p.is_dir():
            return load_pretrained(p, cfg, mesh=mesh)
        return convert_torch_checkpoint(p, cfg, mesh=mesh)
    except (ConversionError, CheckpointFormatError, HubError, ValueError, FileNotFoundError) as err:
        raise TrainingError(f"--init_from {path}: {_one_line(err)}") from err


def load_lpips_weights(path: str, cfg: ml_collections.ConfigDict, mesh: Mesh) -> nnx.Module:
    """LPIPS from a torch file with `loss.perceptual_loss.*` keys or a pretrained directory."""
    from reducio_jax.convert.pretrained import load_pretrained

    try:
        p = download(path) if is_hub(path) else _existing(path, "--lpips_weights")
        if p.is_dir():
            weights = load_pretrained(p, cfg, mesh=mesh)
            if weights.lpips is None:
                raise TrainingError(f"--lpips_weights {path}: the directory holds no LPIPS weights")
            return weights.lpips
        tensors = {k: v for k, v in load_state_dict(p).items() if k.startswith(LPIPS_PREFIX)}
        if not tensors:
            raise TrainingError(
                f"--lpips_weights {path}: no '{LPIPS_PREFIX}*' tensors in the file (give a "
                "released Reducio-VAE checkpoint or a file with the LPIPS VGG16 + linear heads)"
            )
        groups = split_groups(convert_state_dict(tensors))
        return load_converted(
            lambda: make_lpips(cfg),
            groups.get("lpips", {}),
            what="LPIPS",
            mesh=mesh,
            rules=cfg.mesh.rules,
        )
    except (ConversionError, CheckpointFormatError, HubError) as err:
        raise TrainingError(f"--lpips_weights {path}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
