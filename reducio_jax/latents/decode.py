"""Latent store -> videos (`python -m reducio_jax decode ...`).

`decode_store` yields decoded clips (float32 [-1, 1]) batch by batch; `decode_to_mp4` writes
one H.264 file per clip, ``OUT/<index>_<name>.mp4`` (for a store of whole videos, one file per
video of its original length and size, `latents.videos.decode_videos`). The content frame is read as stored
(uint8) and converted exactly as the data loader converts frames, so decoding the stored
latent reproduces `ReducioVAE.reconstruct` of the same clip.

The batch (clips, or windows of whole videos, a call) and tiling are chosen from memory by
default (`planner.plan_batch` for the store's frame size, or per frame size of its whole videos:
the compiled decoder's memory analysis against the memory available or ``max_memory``); a fixed
``batch_size`` is checked to fit. Either is planned before any file is written, so a store that
cannot be decoded in the memory there is fails with one `OutOfMemory` line and no output.
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
from reducio_jax.models.windows import pad_rows
from reducio_jax.programs.budget import parse_size
from reducio_jax.programs.footprint import Plan, plan_records
from reducio_jax.programs.planner import check_batch, plan_batch
from reducio_jax.runs.runtime import (
    InputError,
    load_vae,
    local_mesh,
    to_host,
)
from reducio_jax.sharding import batch_sharding
from reducio_jax.storage.paths import as_path

Entry = tuple[int, int, dict[str, Any]]  # (shard, row, clip info)


@dataclasses.dataclass
class DecodeOptions:
    """`decode` (flags in `reducio_jax.cli`)."""

    store: str
    checkpoint: str
    out: str
    config: str | None = None
    num_clips: int | None = None
    batch_size: int | None = None  # clips (windows) a call; None: as many as fit in memory
    max_memory: str | int | None = None  # for the whole process: "8GB" or bytes (None: measured)
    devices: int | None = None
    fps: float | None = None
    allow_partial: bool = False
    progress: bool = True


def read_entries(store: LatentStore, entries: Sequence[Entry], name: str) -> np.ndarray:
    """Rows of array `name` for `entries` (any shards), stacked (len(entries), *shape)."""
    futures = [store.handle(shard, name)[row].read() for shard, row, _ in entries]
    return np.stack([f.result() for f in futures])


def decode_entries(
    vae: ReducioVAE,
    store: LatentStore,
    entries: Sequence[Entry],
    mesh: Mesh,
    batch: int,
    plan: Plan | None = None,
) -> np.ndarray:
    """Decodes up to `batch` stored clips -> float32 (len(entries), T, H, W, 3) in ~[-1, 1]
    (`plan`: the tiling of a `plan_batch` result instead of the config's)."""
    sharding = batch_sharding(mesh)
    latent = jax.device_put(pad_rows(read_entries(store, entries, "latent"), batch), sharding)
    content = jax.device_put(pad_rows(read_entries(store, entries, "content"), batch), sharding)
    video = vae.decode(latent, video_to_float(content), plan=plan)
    return to_host(video)[: len(entries)]


def decode_store(
    vae: ReducioVAE,
    store: LatentStore,
    mesh: Mesh,
    batch: int,
    num_clips: int | None = None,
    plan: Plan | None = None,
) -> Iterator[tuple[list[Entry], np.ndarray]]:
    """Yields (entries, decoded clips) for the valid clips of the finished shards, in order,
    `batch` a call (tiled as `plan` says, default as the config does)."""
    entries = store.entries()[:num_clips]
    for i in range(0, len(entries), batch):
        chunk = entries[i : i + batch]
        yield chunk, decode_entries(vae, store, chunk, mesh, batch, plan)


def _store_config(store: LatentStore, config: str | None) -> Any:
    if config is not None:
        return config
    stored = store.meta.get("model", {}).get("config")
    return None if stored is None else config_from_dict(stored)


def decode_to_mp4(opts: DecodeOptions) -> dict[str, Any]:
    """Writes one mp4 per stored clip (or whole video) into `opts.out`; returns a summary."""
    began = time.perf_counter()
    store = LatentStore(opts.store, allow_partial=opts.allow_partial)
    if opts.num_clips is not None and opts.num_clips <= 0:
        raise InputError(f"--num_clips {opts.num_clips} must be positive")
    if opts.max_memory is not None:  # parsed once: a bad size fails before the model loads
        opts = dataclasses.replace(opts, max_memory=parse_size(opts.max_memory))
    mesh = local_mesh(opts.devices)
    batch = "auto" if opts.batch_size is None else opts.batch_size
    check_batch(mesh, batch, "--batch_size")
    vae = load_vae(opts.checkpoint, _store_config(store, opts.config), mesh)
    _check_model(vae, store)
    out = as_path(opts.out)
    if store.kind == VIDEOS:  # whole videos: streamed, each at its own length, size and fps
        written, plans = _decode_videos(vae, store, mesh, batch, opts)
    else:
        written, plans = _decode_clips(vae, store, mesh, batch, opts)
    return {
        "out": str(out),
        "videos": written,
        "memory": plan_records(plans),
        "seconds": round(time.perf_counter() - began, 3),
    }


def _decode_clips(
    vae: ReducioVAE, store: LatentStore, mesh: Mesh, batch: int | str, opts: DecodeOptions
) -> tuple[list[str], dict[tuple[int, int], Plan]]:
    """Every stored clip -> OUT/<index>_<name>.mp4, the batch planned first."""
    total = len(store.entries()[: opts.num_clips])
    size = (int(store.meta["video"]["height"]), int(store.meta["video"]["width"]))
    plan = plan_batch(
        vae.programs,
        mesh,
        *size,
        op="decode",
        batch=batch,
        max_memory=opts.max_memory,
        count=total,
        flag="--batch_size",
    )
    print(f"decode {size[0]}x{size[1]} frames: {plan.describe()}")
    fps = opts.fps or float(store.meta["video"]["fps"])
    out, written = as_path(opts.out), []
    clips = decode_store(vae, store, mesh, plan.window_batch, opts.num_clips, plan)
    with tqdm(total=total, desc="decode", unit="clip", disable=not opts.progress) as bar:
        for entries, videos in clips:
            for (_, _, clip), video in zip(entries, videos, strict=True):
                path = out / f"{clip['index']:06d}_{safe_stem(clip['name'])}.mp4"
                write_mp4(path, to_uint8(video), fps)
                written.append(str(path))
            bar.update(len(entries))
    return written, {size: plan}


def _decode_videos(
    vae: ReducioVAE, store: LatentStore, mesh: Mesh, batch: int | str, opts: DecodeOptions
) -> tuple[list[str], dict[tuple[int, int], Plan]]:
    """Every stored whole video -> OUT/<index>_<name>.mp4, each frame size planned first."""
    from reducio_jax.latents.videos import decode_videos, plan_decode

    videos = store.videos()[: opts.num_clips]
    plans = plan_decode(vae, mesh, videos, batch, opts.max_memory)
    for (h, w), plan in plans.items():
        print(f"decode {h}x{w} frames: {plan.describe()}")
    out = as_path(opts.out)
    written = decode_videos(
        vae, store, videos, mesh, plans, out, fps=opts.fps, progress=opts.progress
    )
    return written, plans


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
