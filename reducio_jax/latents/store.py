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

A store of whole videos (``encode --whole_videos``, store.json ``"kind": "videos"``) holds each
video's `VideoLatent` (docs/video.md): its K overlapping 16-frame windows, one window per chunk::

    STORE/shard-00000/video-000000/latent/   # zarr (K, t, h, w, z) float32, one per window
    STORE/shard-00000/video-000000/content/  # zarr (K, H', W', 3) uint8: each window's content
                                             #   frame at the padded size (multiples of 32)
    STORE/shard-00000/videos.json            # per video: index, name, valid, num_frames,
                                             #   height, width, fps, starts (the window table)
    STORE/shard-00000/done

Videos ``0..N-1`` are split into shards as clips are, and resumed the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from reducio_jax.api import VideoLatent
from reducio_jax.data import video_to_float
from reducio_jax.errors import InputError
from reducio_jax.storage import paths
from reducio_jax.storage.paths import Path, PathLike, as_path

FORMAT = "reducio-latents"
VERSION = 1
META_FILE = "store.json"
DONE_FILE = "done"
CLIPS_FILE = "clips.json"
VIDEOS_FILE = "videos.json"
CLIPS, VIDEOS = "clips", "videos"  # store kinds: 16-frame clips, or whole videos
# store.json keys that must agree for a run to resume into an existing store.
RESUME_KEYS = (
    "format",
    "version",
    "kind",
    "num_clips",
    "num_videos",
    "num_shards",
    "arrays",
    "video",
    "data",
)


class StoreError(InputError):
    """A latent store that is missing, incomplete or inconsistent with the request."""


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Per-clip (per-window) shape and dtype of one stored array; None: differs per video."""

    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArraySpec:
        return cls(tuple(None if s is None else int(s) for s in d["shape"]), str(d["dtype"]))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def video_dir_name(index: int) -> str:
    """The folder of one whole video's arrays inside its shard."""
    return f"video-{index:06d}"


def shard_ranges(num_clips: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) clip ranges, as even as possible, none empty."""
    if num_clips <= 0:
        raise StoreError(f"a latent store needs at least one clip, got {num_clips}")
    num_shards = max(1, min(num_shards, num_clips))
    bounds = [round(i * num_clips / num_shards) for i in range(num_shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def default_num_shards(num_clips: int, clips_per_shard: int = 256) -> int:
    return max(1, math.ceil(num_clips / clips_per_shard))


def write_json_atomic(path: PathLike, value: Any) -> None:
    paths.write_text(path, json.dumps(value, indent=2) + "\n")


def read_meta(root: PathLike) -> dict[str, Any]:
    path = as_path(root) / META_FILE
    if not path.is_file():
        raise StoreError(f"{root} is not a latent store (no {META_FILE}); create it with encode")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise StoreError(f"{path} is not a {FORMAT} store (format {meta.get('format')!r})")
    return meta


def check_resumable(existing: dict[str, Any], wanted: dict[str, Any], root: Path) -> None:
    """Raises StoreError naming the first setting that differs from the existing store."""
    for key in RESUME_KEYS:
        if existing.get(key) != wanted.get(key):
            raise StoreError(
                f"{root} was written with a different '{key}' ({existing.get(key)!r} vs "
                f"{wanted.get(key)!r}); pass --overwrite or choose another --out"
            )


def _zarr_spec(path: Path) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": paths.kvstore(path)}  # a bucket: TensorStore's gcs


def create_array(path: Path, rows: int, spec: ArraySpec) -> ts.TensorStore:
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


def open_array(path: Path) -> ts.TensorStore:
    return ts.open(_zarr_spec(path), open=True, read=True).result()


class ShardWriter:
    """Writes one shard: arrays row by row (any order), then clips.json and the done marker."""

    def __init__(self, root: PathLike, shard: int, rows: int, arrays: dict[str, ArraySpec]):
        self.dir = as_path(root) / shard_name(shard)
        if self.dir.exists():
            paths.rmtree(self.dir)  # an unfinished shard restarts from scratch
        paths.make_dirs(self.dir)
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


def shard_done(root: PathLike, shard: int) -> bool:
    return (as_path(root) / shard_name(shard) / DONE_FILE).is_file()


class LatentStore:
    """Read access to a store: metadata, finished shards and per-clip rows."""

    def __init__(self, root: PathLike, *, allow_partial: bool = False):
        self.root = as_path(root)
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
        self._handles: dict[tuple, ts.TensorStore] = {}

    @property
    def kind(self) -> str:
        """ "clips" (16-frame clips, one row each) or "videos" (whole videos, `VideoLatent`s)."""
        return self.meta.get("kind", CLIPS)

    def _require(self, kind: str, use: str) -> None:
        if self.kind != kind:
            raise StoreError(
                f"{self.root} holds {self.kind}, not {kind}: use {use} "
                f"(the store was written {'with' if self.kind == VIDEOS else 'without'} "
                "encode --whole_videos)"
            )

    def clips(self, shard: int) -> list[dict[str, Any]]:
        """Rows of a finished shard: {"index", "name", "valid"}."""
        return json.loads((self.root / shard_name(shard) / CLIPS_FILE).read_text())

    def entries(self, valid_only: bool = True) -> list[tuple[int, int, dict[str, Any]]]:
        """(shard, row, clip) of every row of the finished shards, in clip order."""
        self._require(CLIPS, "videos() / video_latent() for a store of whole videos")
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

    # -- whole videos ---------------------------------------------------------------------------
    def videos(self, valid_only: bool = True) -> list[tuple[int, dict[str, Any]]]:
        """(shard, video) of every video of the finished shards, in order. A video is
        {"index", "name", "valid", "num_frames", "height", "width", "fps", "starts", ...}."""
        self._require(VIDEOS, "entries() / decode_store() for a store of clips")
        out = []
        for shard in self.done:
            records = json.loads((self.root / shard_name(shard) / VIDEOS_FILE).read_text())
            out += [(shard, v) for v in records if v["valid"] or not valid_only]
        return out

    def video_handle(self, shard: int, index: int, name: str) -> ts.TensorStore:
        """The zarr array `name` (K, ...) of video `index` (its record index) in `shard`."""
        if name not in self.arrays:
            raise StoreError(f"{self.root} has no '{name}' array (has {sorted(self.arrays)})")
        key = (shard, index, name)
        if key not in self._handles:
            path = self.root / shard_name(shard) / video_dir_name(index) / name
            self._handles[key] = open_array(path)
        return self._handles[key]

    def read_windows(
        self, shard: int, video: dict[str, Any], name: str, start: int = 0, stop: int | None = None
    ) -> np.ndarray:
        """Windows [start, stop) of one video's array `name` (stop clamped to K): (k, ...)."""
        handle = self.video_handle(shard, int(video["index"]), name)
        stop = handle.shape[0] if stop is None else min(stop, handle.shape[0])
        return handle[start:stop].read().result()

    def video_latent(self, shard: int, video: dict[str, Any]) -> VideoLatent:
        """One stored video as the `VideoLatent` (batch of 1) that `ReducioVAE.decode_video`
        takes; the content frames converted to [-1, 1] as the data loader converts frames."""
        latents = self.read_windows(shard, video, "latent")  # (K, t, h, w, z)
        content = np.asarray(video_to_float(self.read_windows(shard, video, "content")))
        return VideoLatent(
            latents=latents[None],
            content_frames=content[None],  # (1, K, H', W', 3)
            starts=tuple(int(s) for s in video["starts"]),
            num_frames=int(video["num_frames"]),
            height=int(video["height"]),
            width=int(video["width"]),
            window=int(self.meta["video"]["window"]),
            overlap=int(self.meta["video"]["overlap"]),
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # TensorStore handles are reopened in each process
        return state


__all__ = [
    "CLIPS",
    "VIDEOS",
    "VIDEOS_FILE",
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
    "video_dir_name",
    "write_json_atomic",
]
