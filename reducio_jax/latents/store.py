"""On-disk latent store: Zarr arrays written with TensorStore, in resumable shards.

Layout of a store directory::

    STORE/store.json                  # layout, shapes, data and model settings (written first)
    STORE/shard-00000/latent/         # zarr (n, t, h, w, z) float32: LayerNorm(posterior mean)
    STORE/shard-00000/content/        # zarr (n, H, W, 3) uint8: the content (middle) frame
    STORE/shard-00000/mean/, logvar/  # zarr (n, t, h, w, z) float32, with --save_moments
    STORE/shard-00000/clips.json      # per row: record index, clip name, valid (decodable)
    STORE/shard-00000/done            # written last: the shard is complete
    STORE/shard-00001/...

Clips ``0..N-1`` are split into contiguous shards; every array is chunked one clip per chunk,
so a reader fetches exactly one clip per item. A shard without ``done`` is incomplete and is
rewritten from scratch by the next `encode` run; shards with ``done`` are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

FORMAT = "reducio-latents"
VERSION = 1
META_FILE = "store.json"
DONE_FILE = "done"
CLIPS_FILE = "clips.json"
# store.json keys that must agree for a run to resume into an existing store.
RESUME_KEYS = ("format", "version", "num_clips", "num_shards", "arrays", "video", "data")


class StoreError(ValueError):
    """A latent store that is missing, incomplete or inconsistent with the request."""


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Per-clip shape and dtype of one stored array."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArraySpec:
        return cls(tuple(int(s) for s in d["shape"]), str(d["dtype"]))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_ranges(num_clips: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) clip ranges, as even as possible, none empty."""
    if num_clips <= 0:
        raise StoreError(f"a latent store needs at least one clip, got {num_clips}")
    num_shards = max(1, min(num_shards, num_clips))
    bounds = [round(i * num_clips / num_shards) for i in range(num_shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def default_num_shards(num_clips: int, clips_per_shard: int = 256) -> int:
    return max(1, math.ceil(num_clips / clips_per_shard))


def write_json_atomic(path: pathlib.Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(root) / META_FILE
    if not path.is_file():
        raise StoreError(f"{root} is not a latent store (no {META_FILE}); create it with encode")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise StoreError(f"{path} is not a {FORMAT} store (format {meta.get('format')!r})")
    return meta


def check_resumable(existing: dict[str, Any], wanted: dict[str, Any], root: pathlib.Path) -> None:
    """Raises StoreError naming the first setting that differs from the existing store."""
    for key in RESUME_KEYS:
        if existing.get(key) != wanted.get(key):
            raise StoreError(
                f"{root} was written with a different '{key}' ({existing.get(key)!r} vs "
                f"{wanted.get(key)!r}); pass --overwrite or choose another --out"
            )


def _zarr_spec(path: pathlib.Path) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


def create_array(path: pathlib.Path, rows: int, spec: ArraySpec) -> ts.TensorStore:
    """A new zarr array (rows, *spec.shape), one row per chunk, replacing any old one."""
    shape = (rows, *spec.shape)
    return ts.open(
        _zarr_spec(path),
        create=True,
        delete_existing=True,
        dtype=ts.dtype(spec.dtype),
        shape=shape,
        chunk_layout=ts.ChunkLayout(chunk_shape=(1, *spec.shape)),
    ).result()


def open_array(path: pathlib.Path) -> ts.TensorStore:
    return ts.open(_zarr_spec(path), open=True, read=True).result()


class ShardWriter:
    """Writes one shard: arrays row by row (any order), then clips.json and the done marker."""

    def __init__(self, root: pathlib.Path, shard: int, rows: int, arrays: dict[str, ArraySpec]):
        self.dir = pathlib.Path(root) / shard_name(shard)
        if self.dir.exists():
            shutil.rmtree(self.dir)  # an unfinished shard restarts from scratch
        self.dir.mkdir(parents=True)
        self.rows = rows
        self.arrays = {name: create_array(self.dir / name, rows, s) for name, s in arrays.items()}
        self.clips: list[dict[str, Any] | None] = [None] * rows

    def write(self, start: int, values: dict[str, np.ndarray], clips: Sequence[dict]) -> None:
        """Rows [start, start + len(clips)) of every array; `values` may hold extra rows."""
        n = len(clips)
        futures = [
            self.arrays[name][start : start + n].write(np.asarray(values[name][:n]))
            for name in self.arrays
        ]
        for f in futures:
            f.result()
        self.clips[start : start + n] = list(clips)

    def finish(self, info: dict[str, Any]) -> None:
        if any(c is None for c in self.clips):
            raise StoreError(f"{self.dir}: some rows were never written")
        write_json_atomic(self.dir / CLIPS_FILE, self.clips)
        write_json_atomic(self.dir / DONE_FILE, {"rows": self.rows, **info})


def shard_done(root: str | os.PathLike, shard: int) -> bool:
    return (pathlib.Path(root) / shard_name(shard) / DONE_FILE).is_file()


class LatentStore:
    """Read access to a store: metadata, finished shards and per-clip rows."""

    def __init__(self, root: str | os.PathLike, *, allow_partial: bool = False):
        self.root = pathlib.Path(root)
        self.meta = read_meta(self.root)
        self.ranges = [tuple(r) for r in self.meta["shard_ranges"]]
        self.arrays = {k: ArraySpec.from_json(v) for k, v in self.meta["arrays"].items()}
        self.done = [s for s in range(len(self.ranges)) if shard_done(self.root, s)]
        missing = len(self.ranges) - len(self.done)
        if missing and not allow_partial:
            raise StoreError(
                f"{self.root}: {missing} of {len(self.ranges)} shards are unfinished; run encode "
                "again to complete them (or read with allow_partial=True)"
            )
        self._handles: dict[tuple[int, str], ts.TensorStore] = {}

    def clips(self, shard: int) -> list[dict[str, Any]]:
        """Rows of a finished shard: {"index", "name", "valid"}."""
        return json.loads((self.root / shard_name(shard) / CLIPS_FILE).read_text())

    def entries(self, valid_only: bool = True) -> list[tuple[int, int, dict[str, Any]]]:
        """(shard, row, clip) of every row of the finished shards, in clip order."""
        out = []
        for shard in self.done:
            for row, clip in enumerate(self.clips(shard)):
                if clip["valid"] or not valid_only:
                    out.append((shard, row, clip))
        return out

    def handle(self, shard: int, name: str) -> ts.TensorStore:
        if name not in self.arrays:
            raise StoreError(f"{self.root} has no '{name}' array (has {sorted(self.arrays)})")
        key = (shard, name)
        if key not in self._handles:
            self._handles[key] = open_array(self.root / shard_name(shard) / name)
        return self._handles[key]

    def read(self, shard: int, row: int, name: str) -> np.ndarray:
        return self.handle(shard, name)[row].read().result()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # TensorStore handles are reopened in each process
        return state


__all__ = [
    "ArraySpec",
    "LatentStore",
    "ShardWriter",
    "StoreError",
    "check_resumable",
    "default_num_shards",
    "read_meta",
    "shard_done",
    "shard_name",
    "shard_ranges",
    "write_json_atomic",
]
