"""PyTorch state_dict -> Flax NNX state: a rename table, then layout transposes.

Pure functions over flat dicts. `convert_state_dict` maps every torch key to a Flax path and
array; `fill_state` puts them into a model's (abstract) state and fails, naming every key, on
anything missing, unused or mis-shaped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from reducio_jax.errors import InputError
from reducio_jax.models.discriminator import torch_layer_index
from reducio_jax.models.lpips import VGG16_FEATURE_INDEX

VAE_GROUPS = ("encoder_3d", "encoder_2d", "decoder", "quant_conv", "post_quant_conv")


class ConversionError(InputError):
    """The checkpoint does not fit the configured model."""


def _sequential_to_lists(match: re.Match) -> str:
    prefix, index = match.group(1), int(match.group(2))
    for kind in ("convs", "norms"):
        for position in range(index + 1):
            if torch_layer_index(kind, position) == index:
                return f"{prefix}.{kind}.{position}."
    raise ConversionError(f"no discriminator layer at torch index main.{index}")


def _vgg_index(match: re.Match) -> str:
    return f"lpips.vgg.{VGG16_FEATURE_INDEX.index(int(match.group(1)))}."


# (pattern, replacement) applied in order to each torch key.
RENAME_TABLE: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (r"^module\.", ""),
    (r"\.to_out\.0\.", ".to_out."),
    (r"^loss\.(discriminator(?:_2d)?)\.main\.(\d+)\.", _sequential_to_lists),
    (r"^loss\.perceptual_loss\.net\.slice\d\.(\d+)\.", _vgg_index),
    (r"^loss\.perceptual_loss\.lin(\d)\.model\.1\.", r"lpips.lins.\1."),
    (r"^loss\.perceptual_loss\.scaling_layer\.shift$", "lpips.shift"),
    (r"^loss\.perceptual_loss\.scaling_layer\.scale$", "lpips.input_scale"),
    (r"^loss\.logvar$", "logvar"),
    (r"\.running_mean$", ".mean"),
    (r"\.running_var$", ".var"),
)


def flax_name(torch_key: str, ndim: int) -> str:
    """The Flax path ('.'-joined) of a torch key whose tensor has `ndim` dimensions."""
    name = torch_key
    for pattern, replacement in RENAME_TABLE:
        name = re.sub(pattern, replacement, name)
    if name.endswith(".weight"):
        name = name[: -len(".weight")] + (".kernel" if ndim >= 2 else ".scale")
    return name


def to_flax_layout(value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Torch layout -> Flax layout for one tensor, given the Flax variable's shape."""
    if value.ndim in (4, 5) and len(target_shape) == value.ndim:  # conv (O, I, *k) -> (*k, I, O)
        return np.transpose(value, (*range(2, value.ndim), 1, 0))
    is_pointwise = value.ndim in (4, 5) and all(d == 1 for d in value.shape[2:])
    if is_pointwise and len(target_shape) == 2:  # 1x1 conv used as dense -> (I, O)
        return value.reshape(value.shape[0], value.shape[1]).T
    if value.ndim == 2 and len(target_shape) == 2:  # linear (O, I) -> (I, O)
        return value.T
    if value.size == int(np.prod(target_shape)):  # fixed tables and per-channel vectors
        return value.reshape(target_shape)
    return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames every torch key; returns {flax path: torch-layout array}."""
    renamed: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        renamed[flax_name(key, np.ndim(value))] = np.asarray(value)
    return renamed


def source_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{flax path: original torch key}, for error messages in the checkpoint's own names."""
    return {flax_name(key, np.ndim(value)): key for key, value in state_dict.items()}


def fill_state(
    target: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    renamed: Mapping[str, np.ndarray],
    *,
    source_keys: Mapping[str, str] | None = None,
    what: str = "model",
) -> dict[str, np.ndarray]:
    """Matches renamed arrays to `target` ({flax path: (shape, dtype)}) exactly.

    Returns {flax path: array in Flax layout and the target dtype}. Raises ConversionError listing
    every missing path, every unused key and every shape mismatch (with both shapes).
    """
    source_keys = source_keys or {k: k for k in renamed}
    missing = sorted(set(target) - set(renamed))
    unused = sorted(source_keys[k] for k in set(renamed) - set(target))
    filled, mismatched = {}, []
    for path, (shape, dtype) in target.items():
        if path not in renamed:
            continue
        value = to_flax_layout(renamed[path], tuple(shape))
        if tuple(value.shape) != tuple(shape):
            mismatched.append(
                f"{source_keys[path]}: checkpoint {tuple(renamed[path].shape)} vs {what} "
                f"expects {tuple(shape)} (flax {path})"
            )
            continue
        filled[path] = value.astype(dtype)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched))
    if missing:
        problems.append(
            f"{len(missing)} {what} parameter(s) missing from the checkpoint: " + ", ".join(missing)
        )
    if unused:
        problems.append(
            f"{len(unused)} checkpoint key(s) unused by the {what}: " + ", ".join(unused)
        )
    if problems:
        raise ConversionError(
            f"checkpoint does not match the configured {what} (check the config matches the "
            "checkpoint): " + " | ".join(problems)
        )
    return filled


def split_groups(renamed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Splits renamed entries into 'vae', 'discriminator', 'discriminator_2d', 'lpips', 'logvar'."""
    groups: dict[str, dict[str, Any]] = {}
    for path, value in renamed.items():
        head = path.split(".", 1)[0]
        if head in VAE_GROUPS:
            groups.setdefault("vae", {})[path] = value
        elif head in ("discriminator", "discriminator_2d", "lpips"):
            groups.setdefault(head, {})[path.split(".", 1)[1]] = value
        elif head == "logvar":
            groups["logvar"] = {"logvar": value}
        else:
            groups.setdefault("unknown", {})[path] = value
    return groups
