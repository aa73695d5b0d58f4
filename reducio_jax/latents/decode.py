"""Latent store -> videos (`python -m reducio_jax decode ...`).

`decode_store` yields decoded clips (float32 [-1, 1]) batch by batch; `decode_to_mp4` writes
one H.264 file per clip, ``OUT/<index>_<name>.mp4`` (for a store of whole videos, one file per
video of its original length and size, `latents.videos.decode_videos`). The content frame is read as stored
(uint8) and converted exactly as the data loader converts frames, so decoding the stored
latent reproduces `ReducioVAE.reconstruct` of the same clip.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from reducio_jax.api import ReducioVAE
from reducio_jax.config import config_from_dict
from reducio_jax.data import video_to_float
from reducio_jax.data.video import safe_stem, to_uint8, write_mp4
from reducio_jax.latents.store import VIDEOS, LatentStore, StoreError
from reducio_jax.paths import as_path
from reducio_jax.runtime import InputError, batch_size_for, load_vae, local_mesh, to_host
from reducio_jax.sharding import batch_sharding

Entry = tuple[int, int, dict[str, Any]]  # (shard, row, clip info)


@dataclasses.dataclass
class DecodeOptions:
    """`decode` (flags in `reducio_jax.cli`)."""

    store: str
    checkpoint: str
    out: str
    config: str | None = None
    num_clips: int | None = None
    batch_size: int | None = None
    devices: int | None = None
    fps: float | None = None
    allow_partial: bool = False
    progress: bool = True


def read_entries(store: LatentStore, entries: Sequence[Entry], name: str) -> np.ndarray:
    """Rows of array `name` for `entries` (any shards), stacked (len(entries), *shape)."""
    futures = [store.handle(shard, name)[row].read() for shard, row, _ in entries]
    return np.stack([f.result() for f in futures])


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)], axis=0)


def decode_entries(
    vae: ReducioVAE, store: LatentStore, entries: Sequence[Entry], mesh: Mesh, batch: int
) -> np.ndarray:
    """Decodes up to `batch` stored clips -> float32 (len(entries), T, H, W, 3) in ~[-1, 1]."""
    sharding = batch_sharding(mesh)
    latent = jax.device_put(_pad_rows(read_entries(store, entries, "latent"), batch), sharding)
    content = jax.device_put(_pad_rows(read_entries(store, entries, "content"), batch), sharding)
    video = vae.decode(latent, video_to_float(content))
    return to_host(video)[: len(entries)]


def decode_store(
    vae: ReducioVAE,
    store: LatentStore,
    mesh: Mesh,
    batch: int,
    num_clips: int | None = None,
) -> Iterator[tuple[list[Entry], np.ndarray]]:
    """Yields (entries, decoded clips) for the valid clips of the finished shards, in order."""
    entries = store.entries()[:num_clips]
    for i in range(0, len(entries), batch):
        chunk = entries[i : i + batch]
        yield chunk, decode_entries(vae, store, chunk, mesh, batch)


def _store_config(store: LatentStore, config: str | None) -> Any:
    if config is not None:
        return config
    stored = store.meta.get("model", {}).get("config")
    return None if stored is None else config_from_dict(stored)


def decode_to_mp4(opts: DecodeOptions) -> dict[str, Any]:
    """Writes one mp4 per stored clip into `opts.out`; returns a summary."""
    began = time.perf_counter()
    store = LatentStore(opts.store, allow_partial=opts.allow_partial)
    if opts.num_clips is not None and opts.num_clips <= 0:
        raise InputError(f"--num_clips {opts.num_clips} must be positive")
    mesh = local_mesh(opts.devices)
    batch = batch_size_for(mesh, opts.batch_size)
    vae = load_vae(opts.checkpoint, _store_config(store, opts.config), mesh)
    _check_model(vae, store)
    out = as_path(opts.out)
    if store.kind == VIDEOS:  # whole videos: streamed, each at its own length, size and fps
        from reducio_jax.latents.videos import decode_videos  # imports reconstruct (no cycle)

        written = decode_videos(
            vae,
            store,
            mesh,
            batch,
            out,
            num_videos=opts.num_clips,
            fps=opts.fps,
            progress=opts.progress,
        )
        return {
            "out": str(out),
            "videos": written,
            "seconds": round(time.perf_counter() - began, 3),
        }
    fps = opts.fps or float(store.meta["video"]["fps"])
    written = []
    total = len(store.entries()[: opts.num_clips])
    with tqdm(total=total, desc="decode", unit="clip", disable=not opts.progress) as bar:
        for entries, videos in decode_store(vae, store, mesh, batch, opts.num_clips):
            for (_, _, clip), video in zip(entries, videos, strict=True):
                path = out / f"{clip['index']:06d}_{safe_stem(clip['name'])}.mp4"
                write_mp4(path, to_uint8(video), fps)
                written.append(str(path))
            bar.update(len(entries))
    return {"out": str(out), "videos": written, "seconds": round(time.perf_counter() - began, 3)}


def _check_model(vae: ReducioVAE, store: LatentStore) -> None:
    """The model must produce latents of the stored shape."""
    z = store.arrays["latent"].shape
    embed_dim = int(vae.config.model.embed_dim)
    if z[-1] != embed_dim:
        raise StoreError(
            f"{store.root} holds latents with {z[-1]} channels but the model's embed_dim is "
            f"{embed_dim}; decode with the checkpoint that encoded it"
        )


__all__ = ["DecodeOptions", "decode_entries", "decode_store", "decode_to_mp4", "read_entries"]
