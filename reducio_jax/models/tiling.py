"""Spatial tiling with seam blending for frames larger than a tile (the 1024px configs).

Same tiles and blends as the reference: tiles of `tile * (1 + overlap)` pixels every `tile`
pixels; neighbouring outputs are cross-faded linearly over their overlap, visiting tiles row by
row so that each tile blends with its already-blended upper and left neighbours. Tiles of equal
shape run as one batch (at most four shapes: interior, right edge, bottom edge, corner), so a
whole frame costs one compiled call with a handful of batched encoder/decoder traces.

Two fields bound the memory of a tiled call (set by the memory planner, `reducio_jax/programs/planner.py`,
never by a config): `max_batch` runs at most that many tiles of a shape at once (the rest in a
`lax.map` loop, one chunk after another, so only one chunk's activations are alive), and `wide`
also tiles frames that are only wider than one tile window (the reference looks at the height).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from reducio_jax.config import derived
from reducio_jax.models.convolution import after

Grid = list[list]


@dataclasses.dataclass(frozen=True)
class TileConfig:
    sample_size: int  # tile step in pixels (`tile_sample_min_size`)
    overlap: float  # `tile_overlap_factor`
    spatial_factor: int  # pixels per latent position (2**f_s)
    max_batch: int | None = None  # tiles of one shape per step (None: all at once)
    wide: bool = False  # also tile frames wider (not taller) than one tile window

    @property
    def latent_size(self) -> int:
        return int(self.sample_size / self.spatial_factor)

    @property
    def sample_window(self) -> int:
        return int(self.sample_size * (1 + self.overlap))

    @property
    def latent_window(self) -> int:
        return int(self.latent_size * (1 + self.overlap))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TileConfig | None:
        """The tiling of a config (whole, or its `model` block); None when it is off."""
        model = cfg["model"] if "model" in cfg else cfg
        if not model["use_tiling"]:
            return None
        return cls(
            int(model["tile_sample_min_size"]),
            float(model["tile_overlap_factor"]),
            derived(model).spatial_factor,
        )

    def applies_to(self, height: int, width: int = 0) -> bool:
        """The reference tiles when the frame height exceeds one tile window (with `wide`, the
        width too)."""
        return height > self.sample_window or (self.wide and width > self.sample_window)


def blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """Cross-fades the last `extent` entries of `a` into the first ones of `b` along `axis`."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    weight = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    mixed = (tail.astype(jnp.float32) * (1 - weight) + head.astype(jnp.float32) * weight).astype(
        b.dtype
    )
    rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([mixed, rest], axis=axis)


def blend_grid(grid: Grid, blend_tile: Callable[[object, object, int], object]) -> Grid:
    """Blends each tile with its upper (direction 0) and left (direction 1) neighbours, in order."""
    out = [list(row) for row in grid]
    for i, row in enumerate(out):
        for j in range(len(row)):
            if i > 0:
                row[j] = blend_tile(out[i - 1][j], row[j], 0)
            if j > 0:
                row[j] = blend_tile(row[j - 1], row[j], 1)
    return out


def run_batched(fn: Callable, tiles: Grid, max_batch: int | None = None) -> Grid:
    """Applies `fn` to every tile, batching tiles of equal shape into one call (at most
    `max_batch` tiles a call, the calls one after another in a loop)."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            shapes = tuple(x.shape for x in jax.tree.leaves(tile))
            groups.setdefault(shapes, []).append((i, j))
    out: Grid = [[None] * len(row) for row in tiles]
    result = None
    for members in groups.values():
        parts = [tiles[i][j] for i, j in members]
        if max_batch is not None and result is not None:  # bounded memory: one group at a time
            parts = after(parts, result)
        result = _run_group(fn, parts, max_batch)
        for k, (i, j) in enumerate(members):
            size = jax.tree.leaves(tiles[i][j])[0].shape[0]
            out[i][j] = jax.tree.map(lambda x, k=k, size=size: x[k * size : (k + 1) * size], result)
    return out


def _run_group(fn: Callable, parts: list, max_batch: int | None):
    """`fn` over the tiles `parts` (equal shapes) concatenated on axis 0; in chunks of
    `max_batch` tiles through `lax.map` (the last chunk padded with copies of the last tile)."""
    concat = lambda *xs: jnp.concatenate(xs, axis=0)  # noqa: E731
    if max_batch is None or len(parts) <= max_batch:
        return fn(jax.tree.map(concat, *parts))
    chunks = -(-len(parts) // max_batch)
    padded = parts + [parts[-1]] * (chunks * max_batch - len(parts))
    steps = [
        jax.tree.map(concat, *padded[c * max_batch : (c + 1) * max_batch]) for c in range(chunks)
    ]
    result = _looped(fn, jax.tree.map(lambda *xs: jnp.stack(xs), *steps))
    rows = len(parts) * jax.tree.leaves(parts[0])[0].shape[0]
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:rows], result)


def _looped(fn: Callable, xs: Any) -> Any:
    """`lax.map(fn, xs)`. When `fn` is an nnx Module or a method of one, the module's state is
    the loop's carry and the module is merged inside the loop, so that its layers (and their
    `nnx.remat`) trace at the loop's level."""
    owner = fn if isinstance(fn, nnx.Module) else getattr(fn, "__self__", None)
    if not isinstance(owner, nnx.Module):
        return jax.lax.map(fn, xs)
    graphdef, state = nnx.split(owner)
    method = None if owner is fn else fn.__name__

    def body(carry, x):
        module = nnx.merge(graphdef, carry)
        return carry, (module if method is None else getattr(module, method))(x)

    return jax.lax.scan(body, state, xs)[1]


def split_tiles(x: jax.Array, step: int, window: int, h_axis: int) -> Grid:
    """Tiles of up to `window` positions every `step` positions over axes h_axis, h_axis + 1."""
    height, width = x.shape[h_axis], x.shape[h_axis + 1]
    rows = []
    for i in range(0, height, step):
        row = []
        for j in range(0, width, step):
            tile = jax.lax.slice_in_dim(x, i, min(i + window, height), axis=h_axis)
            row.append(jax.lax.slice_in_dim(tile, j, min(j + window, width), axis=h_axis + 1))
        rows.append(row)
    return rows


def stitch(grid: Grid, limit: int, h_axis: int) -> jax.Array:
    """Crops each blended tile to `limit` x `limit` and concatenates the grid back."""
    crop = lambda t: jax.lax.slice_in_dim(  # noqa: E731
        jax.lax.slice_in_dim(t, 0, min(limit, t.shape[h_axis]), axis=h_axis),
        0,
        min(limit, t.shape[h_axis + 1]),
        axis=h_axis + 1,
    )
    rows = [jnp.concatenate([crop(t) for t in row], axis=h_axis + 1) for row in grid]
    return jnp.concatenate(rows, axis=h_axis)


def tiled_content_features(
    encode_2d: Callable[[jax.Array], list[jax.Array]], frame: jax.Array, cfg: TileConfig
) -> Grid:
    """(B, H, W, 3) -> a grid of per-tile content feature lists, seams blended per level."""
    tiles = split_tiles(frame, cfg.sample_size, cfg.sample_window, h_axis=1)
    features = run_batched(encode_2d, tiles, cfg.max_batch)

    def blend_levels(
        a: Sequence[jax.Array], b: Sequence[jax.Array], direction: int
    ) -> list[jax.Array]:
        axis = 1 + direction  # (B, H, W, C)
        return [
            blend(fa, fb, int(fa.shape[axis] / (1 + cfg.overlap) * cfg.overlap), axis)
            for fa, fb in zip(a, b, strict=True)
        ]

    return blend_grid(features, blend_levels)


def tiled_moments(
    encode_3d: Callable[[jax.Array], jax.Array], video: jax.Array, cfg: TileConfig
) -> jax.Array:
    """(B, T, H, W, 3) -> posterior moments (B, t, h, w, 2z) assembled from blended tiles."""
    tiles = split_tiles(video, cfg.sample_size, cfg.sample_window, h_axis=2)
    moments = run_batched(encode_3d, tiles, cfg.max_batch)
    extent = int(cfg.latent_size * cfg.overlap)
    blended = blend_grid(moments, lambda a, b, d: blend(a, b, extent, 2 + d))
    return stitch(blended, cfg.latent_size, h_axis=2)


class _Pairs(nnx.Module):
    """`decode(latent, features)` as a module of one (latent, features) argument."""

    def __init__(self, decode: Callable[[jax.Array, list[jax.Array]], jax.Array]):
        self.decode = decode

    def __call__(self, pair: tuple[jax.Array, list[jax.Array]]) -> jax.Array:
        return self.decode(*pair)


def tiled_decode(
    decode: Callable[[jax.Array, list[jax.Array]], jax.Array],
    latent: jax.Array,
    content_grid: Grid,
    cfg: TileConfig,
) -> jax.Array:
    """Normalised latent (B, t, h, w, z) + per-tile content features -> (B, T, H, W, 3)."""
    tiles = split_tiles(latent, cfg.latent_size, cfg.latent_window, h_axis=2)
    paired = [
        [(tile, content_grid[i][j]) for j, tile in enumerate(row)] for i, row in enumerate(tiles)
    ]
    videos = run_batched(_Pairs(decode), paired, cfg.max_batch)
    extent = int(cfg.sample_size * cfg.overlap)
    blended = blend_grid(videos, lambda a, b, d: blend(a, b, extent, 2 + d))
    return stitch(blended, cfg.sample_size, h_axis=2)
