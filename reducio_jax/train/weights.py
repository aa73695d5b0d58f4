"""Starting weights: `--init_from` (released torch checkpoint or converted Orbax directory) and
the LPIPS weights (from `--init_from`, `--lpips_weights`, or a resumed run's own copy)."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from reducio_jax.convert.load import load_converted
from reducio_jax.convert.mapping import ConversionError, convert_state_dict, split_groups
from reducio_jax.convert.torch_format import CheckpointFormatError, load_state_dict
from reducio_jax.sharding import abstract_with_shardings
from reducio_jax.train.checkpoint import from_nested, to_nested
from reducio_jax.train.errors import TrainingError
from reducio_jax.train.state import abstract_module_state, make_lpips

log = logging.getLogger(__name__)
LPIPS_PREFIX = "loss.perceptual_loss."


def _existing(path: str | pathlib.Path, flag: str) -> pathlib.Path:
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise TrainingError(f"{flag} {path}: no such file or directory")
    return p


def load_init_weights(path: str, cfg: ml_collections.ConfigDict, sharding_for: Callable) -> Any:
    """A torch .ckpt/.pt/.safetensors (converted on the fly) or an Orbax directory written by
    `save_pretrained` -> `ReducioWeights` (vae, discriminator | None, lpips | None, logvar)."""
    from reducio_jax.convert.checkpoint import convert_torch_checkpoint, load_pretrained

    p = _existing(path, "--init_from")
    try:
        if p.is_dir():
            return load_pretrained(p, cfg, sharding_for=sharding_for)
        return convert_torch_checkpoint(p, cfg, sharding_for=sharding_for)
    except (ConversionError, CheckpointFormatError, ValueError, FileNotFoundError) as err:
        raise TrainingError(f"--init_from {path}: {_one_line(err)}") from err


def load_lpips_weights(
    path: str, cfg: ml_collections.ConfigDict, sharding_for: Callable
) -> nnx.Module:
    """LPIPS from a torch file with `loss.perceptual_loss.*` keys or a pretrained directory."""
    from reducio_jax.convert.checkpoint import load_pretrained

    p = _existing(path, "--lpips_weights")
    try:
        if p.is_dir():
            weights = load_pretrained(p, cfg, sharding_for=sharding_for)
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
            sharding_for=sharding_for,
        )
    except (ConversionError, CheckpointFormatError) as err:
        raise TrainingError(f"--lpips_weights {path}: {_one_line(err)}") from err


def save_state(directory: pathlib.Path, state: nnx.State) -> None:
    """Writes a frozen network state (the LPIPS of a run) once, for resuming."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory.absolute(), to_nested(state), force=True)


def restore_state(directory: pathlib.Path, abstract: nnx.State) -> nnx.State:
    """Reads what `save_state` wrote into the shardings of `abstract` (ShapeDtypeStructs)."""
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(directory.absolute(), to_nested(abstract))
    return from_nested(abstract, restored)


def restore_lpips(directory: pathlib.Path, cfg: ml_collections.ConfigDict, mesh: Mesh) -> nnx.State:
    """The LPIPS state a run saved at start (`save_state`), placed per `cfg.mesh.rules`."""
    abstract = abstract_module_state(lambda: make_lpips(cfg))
    return restore_state(directory, abstract_with_shardings(abstract, mesh, cfg.mesh.rules))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
