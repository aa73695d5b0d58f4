"""Videos -> latent store (`python -m reducio_jax encode ...`), resumable shard by shard.

For every clip (eval rules: first frames, centre crop) the store gets the decoder's input
``latent = LayerNorm(posterior mean)`` (B, t, h, w, z), the uint8 content frame (the middle
frame, `content_frame_index`) and, with ``save_moments``, the posterior mean and logvar.
Batches are split over this process's devices; with several processes, process ``p`` takes
shards ``p, p + P, ...``. Finished shards (with a ``done`` marker) are skipped, so rerunning
the same command after an interruption only encodes what is missing: a shard that was being
written when the process died (SIGKILL) has no marker and is rewritten from scratch. SIGTERM
stops after the batch in flight (the unfinished shard is left for the rerun); the summary then
says ``"preempted": true`` and the CLI exits with 143.

Unreadable videos are stored as invalid rows (zeros, ``valid: false``, the reason in
``clips.json``); ``STORE/skipped.jsonl`` lists them (one line per file, with the reason) and the
summary counts files read, clips used and files skipped over the finished shards of the store.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from reducio_jax.api import ReducioVAE
from reducio_jax.config import frame_size
from reducio_jax.data import video_to_float
from reducio_jax.data.pipeline import record_batches
from reducio_jax.data.sources import ClipSource, make_source
from reducio_jax.data.video import ClipSpec
from reducio_jax.latents.store import (
    CLIPS_FILE,
    FORMAT,
    META_FILE,
    VERSION,
    ArraySpec,
    ShardWriter,
    StoreError,
    check_resumable,
    default_num_shards,
    read_meta,
    shard_done,
    shard_name,
    shard_ranges,
    write_json_atomic,
)
from reducio_jax.models import content_frame_index
from reducio_jax.models.windows import pad_rows
from reducio_jax.runs.preemption import StopOnSigterm
from reducio_jax.runs.runtime import (
    InputError,
    RunOptions,
    clip_count,
    load_vae,
    local_mesh,
    prepare,
    to_host,
)
from reducio_jax.sharding import batch_sharding
from reducio_jax.storage.paths import Path, as_path, make_dirs, rmtree, write_text

SKIPPED_FILE = "skipped.jsonl"
LATENT_DOC = "LayerNorm over (t, h, w, z) of the posterior mean: the decoder's input"


@dataclasses.dataclass(kw_only=True)
class EncodeOptions(RunOptions):
    """`encode`: the shared `RunOptions` and the store's own (flags in `reducio_jax.cli`)."""

    out: str  # store directory (created, or resumed)
    num_shards: int | None = None  # shard directories (None: 256 clips each)
    save_moments: bool = False  # also store the posterior mean and logvar
    overwrite: bool = False  # discard an existing store at `out`


# -- clips ----------------------------------------------------------------------------------------


# -- the model step -------------------------------------------------------------------------------


def encode_batch(
    vae: ReducioVAE, video_u8: np.ndarray, mesh: Mesh, batch: int, moments: bool
) -> dict[str, np.ndarray]:
    """uint8 clips (b <= batch, T, H, W, 3) -> stored arrays for those clips (numpy)."""
    n = video_u8.shape[0]
    padded = jax.device_put(pad_rows(video_u8, batch), batch_sharding(mesh))
    posterior = vae.encode(video_to_float(padded))
    out = {"latent": vae.latent(posterior)}
    if moments:
        out.update(mean=posterior.mean, logvar=posterior.logvar)
    values = {k: to_host(v)[:n] for k, v in out.items()}
    values["content"] = video_u8[:, content_frame_index(video_u8.shape[1])]
    return values


def array_specs(
    vae: ReducioVAE, spec: ClipSpec, moments: bool, mesh: Mesh, batch: int
) -> dict[str, ArraySpec]:
    """Per-clip shapes/dtypes of the stored arrays (from an abstract encode)."""
    shape = (batch, spec.num_frames, spec.height, spec.width, 3)
    video = jax.ShapeDtypeStruct(shape, np.float32, sharding=batch_sharding(mesh))
    post = jax.eval_shape(vae.encode, video)
    z = ArraySpec(tuple(post.mean.shape[1:]), "float32")
    arrays = {"latent": z, "content": ArraySpec((spec.height, spec.width, 3), "uint8")}
    if moments:
        arrays.update(mean=z, logvar=z)
    return arrays


# -- the store ------------------------------------------------------------------------------------


def _store_meta(opts, vae, spec, source, arrays, ranges) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_clips": ranges[-1][1],
        "num_shards": len(ranges),
        "shard_ranges": [list(r) for r in ranges],
        "arrays": {k: v.to_json() for k, v in arrays.items()},
        "video": {
            "num_frames": spec.num_frames,
            "fps": spec.fps,
            "height": spec.height,
            "width": spec.width,
            "content_frame_index": content_frame_index(spec.num_frames),
        },
        "data": {
            "spec": opts.data,
            "split": opts.split if opts.data.startswith("tfds:") else None,
            "records": len(source),
        },
        "latent": LATENT_DOC,
        "model": {
            "checkpoint": str(opts.checkpoint),
            "config": json.loads(vae.config.to_json_best_effort()),
        },
    }


def _clear_store(root: Path) -> None:
    for child in root.glob("shard-*"):
        rmtree(child)
    (root / META_FILE).unlink(missing_ok=True)


def check_store(root: Path, meta: dict[str, Any], overwrite: bool) -> None:
    """StoreError unless `root` can take a store of `meta` (new, resumed or, with `overwrite`,
    replaced); reads only."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"--out {root} exists and is not a directory")
    has_meta = (root / META_FILE).is_file()
    if root.is_dir() and not has_meta and any(root.iterdir()):
        raise StoreError(f"--out {root} is a non-empty folder that is not a latent store")
    if has_meta and not overwrite:
        check_resumable(read_meta(root), meta, root)


def prepare_store(root: Path, meta: dict[str, Any], overwrite: bool) -> None:
    """Creates `root` with store.json, or checks that an existing store can be resumed."""
    check_store(root, meta, overwrite)
    if (root / META_FILE).is_file():
        if not overwrite:
            return
        _clear_store(root)
    make_dirs(root)
    write_json_atomic(root / META_FILE, meta)


def _row(source: ClipSource, index: Any, valid: Any, reason: bytes) -> dict[str, Any]:
    row = {"index": int(index), "name": source.name(int(index)), "valid": bool(valid)}
    if not valid:
        row["reason"] = bytes(reason).decode(errors="replace")
    return row


def _encode_shard(vae, source, spec, root, shard, clips, arrays, mesh, batch, threads, bar, stop):
    """Writes one shard; False if a SIGTERM stopped it after a batch (left unfinished)."""
    start, end = clips
    writer = ShardWriter(root, shard, end - start, arrays)
    began, valid = time.perf_counter(), 0
    row = 0
    for b in record_batches(source, spec, start, end, batch, threads=threads):
        values = encode_batch(vae, b["video"], mesh, batch, "mean" in arrays)
        rows = [_row(source, *r) for r in zip(b["index"], b["valid"], b["reason"], strict=True)]
        writer.write(row, values, rows)
        row += len(rows)
        valid += int(np.sum(b["valid"]))
        bar.update(len(rows))
        if stop.should_stop() and row < end - start:
            return False
    writer.finish({"valid": valid, "seconds": round(time.perf_counter() - began, 3)})
    return True


def store_counts(root: Path, num_shards: int) -> dict[str, Any]:
    """Files read, clips used and files skipped over the finished shards; rewrites
    STORE/skipped.jsonl (one line per unreadable file: name, index, reason)."""
    rows = []
    for s in range(num_shards):
        if shard_done(root, s):
            rows += json.loads((root / shard_name(s) / CLIPS_FILE).read_text())
    skipped = [r for r in rows if not r["valid"]]
    lines = (json.dumps({k: r.get(k) for k in ("name", "index", "reason")}) for r in skipped)
    write_text(root / SKIPPED_FILE, "".join(f"{line}\n" for line in lines))
    return {
        "files_read": len(rows),
        "clips_used": len(rows) - len(skipped),
        "files_skipped": len(skipped),
        "skipped_list": str(root / SKIPPED_FILE),
    }


def encode_to_store(opts: EncodeOptions) -> dict[str, Any]:
    """Encodes the clips into `opts.out`; returns which shards were encoded and skipped."""
    began = time.perf_counter()
    mesh = local_mesh(opts.devices)
    batch, model_cfg, cfg = prepare(opts, mesh)
    h, w = frame_size(cfg.resolution)
    spec = ClipSpec(num_frames=int(cfg.num_frames), fps=float(cfg.fps), height=h, width=w)
    source = make_source(cfg, spec)
    n = clip_count(len(source), opts.num_clips)
    if opts.num_shards is not None and opts.num_shards <= 0:
        raise InputError(f"--num_shards {opts.num_shards} must be positive")
    ranges = shard_ranges(n, opts.num_shards or default_num_shards(n))
    vae = load_vae(opts.checkpoint, model_cfg, mesh)
    arrays = array_specs(vae, spec, opts.save_moments, mesh, batch)
    root = as_path(opts.out)
    if jax.process_index() == 0:
        prepare_store(root, _store_meta(opts, vae, spec, source, arrays, ranges), opts.overwrite)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("reducio_jax.latents.encode: store ready")
    mine = range(jax.process_index(), len(ranges), jax.process_count())
    todo = [s for s in mine if not shard_done(root, s)]
    skipped = [s for s in mine if s not in todo]
    total = sum(ranges[s][1] - ranges[s][0] for s in todo)
    encoded: list[int] = []
    with (
        StopOnSigterm() as stop,
        tqdm(total=total, desc="encode", unit="clip", disable=not opts.progress) as bar,
    ):
        for s in todo:
            args = (root, s, ranges[s], arrays, mesh, batch, max(1, opts.num_workers))
            if not _encode_shard(vae, source, spec, *args, bar, stop):
                break
            encoded.append(s)
            if stop.should_stop():
                break
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("reducio_jax.latents.encode: shards written")
    counts = store_counts(root, len(ranges)) if jax.process_index() == 0 else {}
    return {
        "store": str(root),
        "num_clips": n,
        "num_shards": len(ranges),
        "encoded_shards": [shard_name(s) for s in encoded],
        "skipped_shards": [shard_name(s) for s in skipped],
        "unfinished_shards": [shard_name(s) for s in todo if s not in encoded],
        "encoded_clips": sum(ranges[s][1] - ranges[s][0] for s in encoded),
        **counts,
        "preempted": stop.signal_received,
        "seconds": round(time.perf_counter() - began, 3),
    }


__all__ = [
    "EncodeOptions",
    "array_specs",
    "check_store",
    "encode_batch",
    "encode_to_store",
    "prepare_store",
]
