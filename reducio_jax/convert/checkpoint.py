"""Released checkpoint (.ckpt/.pt/.safetensors) -> Flax modules, and Orbax export/import.

`convert_torch_checkpoint` reads a checkpoint without torch, renames and transposes every
tensor, and fills the VAE (and the discriminator, LPIPS and logvar when the file has `loss.*`
keys), failing with one message that names every missing, unused or mis-shaped key.
`save_pretrained` / `load_pretrained` keep the result as an Orbax checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from reducio_jax.config import config_from_dict
from reducio_jax.convert.load import Shardings, abstract_model, load_converted
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

CONFIG_ITEM = "config"


@dataclasses.dataclass
class ReducioWeights:
    """The networks of a released checkpoint; the loss parts are None when it has no `loss.*`."""

    vae: VideoVAE
    discriminator: PatchDiscriminator | None = None
    lpips: LPIPS | None = None
    logvar: float | None = None

    def modules(self) -> dict[str, nnx.Module]:
        named = {"vae": self.vae, "discriminator": self.discriminator, "lpips": self.lpips}
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
    sharding_for: Shardings | None = None,
) -> ReducioWeights:
    """A torch state_dict (numpy arrays) -> filled Flax modules for `cfg`."""
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
            sharding_for=sharding_for,
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
    path: str | pathlib.Path,
    cfg: ml_collections.ConfigDict,
    *,
    sharding_for: Shardings | None = None,
) -> ReducioWeights:
    """Reads a released checkpoint file (no torch needed) and fills the modules of `cfg`."""
    return convert_state_dict_to_modules(load_state_dict(path), cfg, sharding_for=sharding_for)


def save_pretrained(
    weights: ReducioWeights, directory: str | pathlib.Path, cfg: ml_collections.ConfigDict
) -> pathlib.Path:
    """Writes the modules and the config as one Orbax checkpoint directory."""
    directory = pathlib.Path(directory).absolute()
    items: dict[str, Any] = {
        name: ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(module)))
        for name, module in weights.modules().items()
    }
    meta = {"config": json.loads(cfg.to_json_best_effort()), "logvar": weights.logvar}
    items[CONFIG_ITEM] = ocp.args.JsonSave(meta)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, ocp.args.Composite(**items), force=True)
    return directory


def load_pretrained_config(directory: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config stored beside the weights by `save_pretrained`."""
    meta = _read_meta(pathlib.Path(directory).absolute())
    return config_from_dict(meta["config"])


def _read_meta(directory: pathlib.Path) -> dict[str, Any]:
    meta_dir = directory / CONFIG_ITEM
    if not meta_dir.is_dir():
        raise ConversionError(
            f"{directory} is not a reducio-jax pretrained directory (no '{CONFIG_ITEM}' item); "
            "create one with convert_torch_weights.py"
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            directory, ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()})
        )
    return dict(restored[CONFIG_ITEM])


def load_pretrained(
    directory: str | pathlib.Path,
    cfg: ml_collections.ConfigDict | None = None,
    *,
    sharding_for: Shardings | None = None,
    parts: tuple[str, ...] = ("vae", "discriminator", "lpips"),
) -> ReducioWeights:
    """Restores modules saved by `save_pretrained` straight into (sharded) arrays."""
    directory = pathlib.Path(directory).absolute()
    meta = _read_meta(directory)
    cfg = cfg if cfg is not None else config_from_dict(meta["config"])
    factories = _factories(cfg)
    present = [name for name in parts if (directory / name).is_dir()]
    if "vae" not in present:
        raise ConversionError(f"{directory} holds no VAE weights")
    abstract = {name: abstract_model(factories[name]) for name in present}
    targets = {name: _restore_target(state, sharding_for) for name, (_, state) in abstract.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            directory,
            ocp.args.Composite(
                **{name: ocp.args.StandardRestore(t) for name, t in targets.items()}
            ),
        )
    modules = {}
    for name, (graphdef, state) in abstract.items():
        nnx.replace_by_pure_dict(state, restored[name])
        modules[name] = nnx.merge(graphdef, state)
    return ReducioWeights(
        vae=modules["vae"],
        discriminator=modules.get("discriminator"),
        lpips=modules.get("lpips"),
        logvar=meta.get("logvar"),
    )


def _restore_target(state: nnx.State, sharding_for: Shardings | None) -> dict:
    """Abstract pure dict whose leaves carry the shardings the arrays should be restored with."""
    flat = []
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for path, variable in nnx.to_flat_state(state):
        sharding = (sharding_for(path, variable) if sharding_for else None) or default
        flat.append(
            (
                path,
                variable.replace(
                    jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=sharding)
                ),
            )
        )
    return nnx.to_pure_dict(nnx.from_flat_state(flat))
