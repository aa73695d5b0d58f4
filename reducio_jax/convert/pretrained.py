"""Released checkpoint (.ckpt/.pt/.safetensors) -> Flax modules, and Orbax export/import.

`convert_torch_checkpoint` reads a checkpoint without torch, renames and transposes every
tensor, and fills the VAE (and the discriminator, LPIPS and logvar when the file has `loss.*`
keys), failing with one message that names every missing, unused or mis-shaped key.
`save_pretrained` / `load_pretrained` keep the result as a checkpoint directory of the one
layout (`reducio_jax.storage.checkpoints`): the layout of a training step, which they read too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reducio_jax.config import config_from_dict
from reducio_jax.convert.hub import converted_dir, download, is_hub
from reducio_jax.convert.load import load_converted
from reducio_jax.convert.mapping import (
    ConversionError,
    convert_state_dict,
    source_keys,
    split_groups,
)
from reducio_jax.convert.torch_format import load_state_dict
from reducio_jax.models import (
    LPIPS,
    PatchDiscriminator,
    VideoVAE,
    build_discriminator,
    build_lpips,
    build_vae,
)
from reducio_jax.sharding import abstract_model
from reducio_jax.storage import checkpoints
from reducio_jax.storage.paths import Path, PathLike, as_path


@dataclasses.dataclass
class ReducioWeights:
    """The networks of a released checkpoint; the loss parts are None when it has no `loss.*`."""

    vae: VideoVAE
    discriminator: PatchDiscriminator | None = None
    lpips: LPIPS | None = None
    logvar: float | None = None

    def modules(self) -> dict[str, nnx.Module]:
        named = {
            checkpoints.VAE: self.vae,
            checkpoints.DISCRIMINATOR: self.discriminator,
            checkpoints.LPIPS: self.lpips,
        }
        return {name: module for name, module in named.items() if module is not None}


def _factories(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        "vae": lambda: build_vae(cfg.model),
        "discriminator": lambda: build_discriminator(cfg),
        "discriminator_2d": lambda: build_discriminator(cfg, spatial=2),
        "lpips": lambda: build_lpips(),
    }


def convert_state_dict_to_modules(
    state_dict: Mapping[str, np.ndarray],
    cfg: ml_collections.ConfigDict,
    *,
    mesh: Mesh | None = None,
) -> ReducioWeights:
    """A torch state_dict (numpy arrays) -> Flax modules for `cfg`, placed on `mesh` (default:
    one device) per `cfg.mesh.rules`."""
    groups = split_groups(convert_state_dict(state_dict))
    sources = split_groups(source_keys(state_dict))
    if "unknown" in groups:
        raise ConversionError(
            f"{len(groups['unknown'])} checkpoint key(s) belong to no Reducio-VAE part: "
            + ", ".join(sorted(sources["unknown"].values()))
        )
    if "discriminator_2d" in groups:
        raise ConversionError(
            "checkpoint has a 2D discriminator (loss.discriminator_2d), which this port does not train"
        )
    if "vae" not in groups:
        raise ConversionError("checkpoint has no VAE weights (no encoder_3d/decoder keys)")
    factories = _factories(cfg)
    built = {
        name: load_converted(
            factories[name],
            groups[name],
            what=name,
            mesh=mesh,
            rules=cfg.mesh.rules,
            source_keys=sources[name],
        )
        for name in ("vae", "discriminator", "lpips")
        if name in groups
    }
    logvar = groups.get("logvar", {}).get("logvar")
    return ReducioWeights(
        vae=built["vae"],
        discriminator=built.get("discriminator"),
        lpips=built.get("lpips"),
        logvar=None if logvar is None else float(np.asarray(logvar, np.float32)),
    )


def convert_torch_checkpoint(
    path: PathLike,
    cfg: ml_collections.ConfigDict,
    *,
    mesh: Mesh | None = None,
) -> ReducioWeights:
    """Reads a released checkpoint file (no torch needed) and fills the modules of `cfg`: a
    path, a `gs://` URL or a hub name `hf://OWNER/REPO/FILE[@REVISION]` (downloaded)."""
    path = download(path) if is_hub(path) else path
    return convert_state_dict_to_modules(load_state_dict(path), cfg, mesh=mesh)


def save_pretrained(
    weights: ReducioWeights, directory: PathLike, cfg: ml_collections.ConfigDict
) -> Path:
    """Writes the modules and the config (with logvar) as one checkpoint directory."""
    items: dict[str, Any] = {name: nnx.state(m) for name, m in weights.modules().items()}
    items[checkpoints.CONFIG] = checkpoints.config_item(cfg, logvar=weights.logvar)
    return checkpoints.save(directory, items)


def load_pretrained_config(directory: PathLike) -> ml_collections.ConfigDict:
    """The config stored in a pretrained directory or a training step."""
    return config_from_dict(_read_config(directory)["config"])


def _read_config(directory: PathLike) -> dict[str, Any]:
    try:
        return checkpoints.read_config(directory)
    except checkpoints.CheckpointError as err:
        raise ConversionError(str(err)) from None


def load_pretrained(
    directory: PathLike,
    cfg: ml_collections.ConfigDict | None = None,
    *,
    mesh: Mesh | None = None,
    parts: tuple[str, ...] = checkpoints.NETWORKS,
) -> ReducioWeights:
    """Restores the networks `parts` of a pretrained directory (or of a training step) straight
    into their shards on `mesh` (default: one device), per `cfg.mesh.rules`."""
    directory = as_path(directory)
    item = _read_config(directory)
    cfg = cfg if cfg is not None else config_from_dict(item["config"])
    present = [name for name in parts if name in checkpoints.items_in(directory)]
    if checkpoints.VAE not in present:
        raise ConversionError(f"{directory} holds no VAE weights")
    factories = _factories(cfg)
    abstract = {name: abstract_model(factories[name], mesh, cfg.mesh.rules) for name in present}
    restored = checkpoints.restore(directory, {name: a[1] for name, a in abstract.items()})
    modules = {name: nnx.merge(abstract[name][0], restored[name]) for name in present}
    return ReducioWeights(
        vae=modules[checkpoints.VAE],
        discriminator=modules.get(checkpoints.DISCRIMINATOR),
        lpips=modules.get(checkpoints.LPIPS),
        logvar=item.get("logvar"),
    )


def load_hub_weights(spec: str, cfg: Any, *, mesh: Any = None):
    """`ReducioWeights` of a hub file: converted once, then read from the converted cache."""
    local = download(spec)
    directory = converted_dir(local)
    if not (directory / "config").is_dir():
        weights = convert_torch_checkpoint(local, cfg, mesh=mesh)
        save_pretrained(weights, directory, cfg)
        return weights
    return load_pretrained(directory, cfg, mesh=mesh)
