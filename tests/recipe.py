"""Rebuilds the exact weights the parity fixtures used, from a manifest (see fixtures README)."""

from __future__ import annotations

import json
import pathlib
import zlib

import numpy as np

LPIPS_SHIFT = [-0.030, -0.088, -0.188]
LPIPS_SCALE = [0.458, 0.448, 0.450]


def sinusoid(length: int, dim: int) -> np.ndarray:
    table = np.array(
        [[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)] for pos in range(length)]
    )
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


def recipe_value(key: str, shape: list[int], dtype: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")))
    last = key.rsplit(".", 1)[-1]
    n = int(np.prod(shape)) if shape else 1
    if dtype == "int64":
        return np.array(7, np.int64)
    if "pos_embed" in key:
        value = sinusoid(shape[1], shape[-1]).reshape(shape)
    elif key.endswith("scaling_layer.shift"):
        value = np.array(LPIPS_SHIFT).reshape(shape)
    elif key.endswith("scaling_layer.scale"):
        value = np.array(LPIPS_SCALE).reshape(shape)
    elif key == "loss.logvar":
        value = np.zeros(shape)
    elif last == "running_var":
        value = 0.5 + rng.random(shape)
    elif last == "running_mean":
        value = 0.1 * rng.standard_normal(shape)
    elif len(shape) >= 2:
        value = rng.standard_normal(shape) / np.sqrt(n // shape[0])
        if key.startswith("loss.perceptual_loss.lin"):
            value = np.abs(value)
    elif last == "weight":
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        value = 0.1 * rng.standard_normal(shape)
    return value.astype(np.float32)


def manifest(fixtures: pathlib.Path, name: str) -> list[dict]:
    return json.loads((fixtures / f"manifest_{name}.json").read_text())


def state_dict(fixtures: pathlib.Path, name: str) -> dict[str, np.ndarray]:
    return {
        e["key"]: recipe_value(e["key"], e["shape"], e["dtype"]) for e in manifest(fixtures, name)
    }


def video_input(u8: np.ndarray) -> np.ndarray:
    """Fixture video uint8 (B, 3, T, H, W) -> model input float32 (B, T, H, W, 3) in [-1, 1]."""
    return np.transpose(u8.astype(np.float32) / 127.5 - 1.0, (0, 2, 3, 4, 1))


def to_ncthw(x: np.ndarray) -> np.ndarray:
    """Channels-last (B, T, H, W, C) -> the fixtures' (B, C, T, H, W)."""
    return np.transpose(np.asarray(x), (0, 4, 1, 2, 3))
