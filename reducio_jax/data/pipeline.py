"""Grain pipelines: sharded, shuffled, checkpointable clip batches, on host and on device;
and `record_batches`, every record in order with unreadable ones kept as invalid rows.

Host pipeline (per JAX process ``p`` of ``P``), over record indices ``0..N-1``::

    range(N) -> shuffle(seed) [train] -> even split: [:N - N % P] [train] or pad to a
    multiple of the global batch with masked repeats [eval] -> [p::P] -> repeat(num_epochs)
    -> load/decode (random crop/start from a per-element RNG) -> batch(B / P)
    -> mp_prefetch(num_workers)

Every process applies the same global permutation (reshuffled each epoch) and keeps every
P-th element, so processes see disjoint clips that together cover the epoch. A record
that fails to load is replaced by the next readable index (``i+1``, ``i+2``, ...,
deterministic); eval marks replacements and padding with ``mask = False`` so each clip
counts exactly once. Each element carries which records were passed over and why
(``skipped_index``, ``skipped_reason``), so the main process (:class:`Loader`) warns once per
file, whichever worker decoded it, and keeps a :class:`SkipReport` of them.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reducio_jax.config import data_block, frame_size
from reducio_jax.data.errors import BadVideoError, DataError
from reducio_jax.data.skips import SkipReport
from reducio_jax.data.sources import ClipSource, make_source
from reducio_jax.data.video import ClipSpec
from reducio_jax.sharding import BATCH_AXES
from reducio_jax.sharding import batch_axes as batch_axes_of

log = logging.getLogger(__name__)
_MAX_REPLACEMENTS = 64  # consecutive unreadable records tolerated before giving up
_REASON_BYTES = 160  # of a skip reason carried in the batch (fixed width, so batches stack)
_MAX_REASON_BYTES = 300  # of the reason of an unreadable record in `record_batches`


class _LoadClip:
    """Record index -> element dict; replaces unreadable records by the next readable one."""

    def __init__(self, source: ClipSource, num_records: int, mask_replaced: bool):
        self.source, self.num_records, self.mask_replaced = source, num_records, mask_replaced

    def __call__(self, position: int, rng: np.random.Generator | None = None) -> dict:
        # Known-bad files are retried rather than cached: the result must depend only on
        # (position, rng), not on what this process saw before (resumed runs match).
        n = len(self.source)
        index, valid = position % n, position < self.num_records
        passed = np.full((_MAX_REPLACEMENTS,), -1, np.int32)  # records skipped for this clip
        reasons = np.zeros((_MAX_REPLACEMENTS,), f"S{_REASON_BYTES}")
        for skipped in range(min(n, _MAX_REPLACEMENTS)):
            i = (index + skipped) % n
            try:
                video = self.source.load(i, rng)  # (T, H, W, 3) uint8
            except BadVideoError as e:
                log.debug("Unreadable video %s (%s)", self.source.name(i), e)
                passed[skipped], reasons[skipped] = i, str(e).encode()[:_REASON_BYTES]
                continue
            keep = valid and not (self.mask_replaced and skipped)
            # every record passed over before this one was unreadable
            return {
                "video": video,
                "index": np.int32(i),
                "mask": np.bool_(keep),
                "skipped": np.int32(skipped),
                "skipped_index": passed,
                "skipped_reason": reasons,
            }
        raise DataError(
            f"{min(n, _MAX_REPLACEMENTS)} consecutive records from {self.source.name(index)} "
            "on are unreadable: check the dataset (PyAV must decode the files)."
        )


def _load_record(source: ClipSource, spec: ClipSpec, index: int) -> dict[str, Any]:
    """Record -> {"video" uint8 (T, H, W, 3), "index", "valid", "reason"}; an unreadable record
    is a zero clip with the reason (bytes)."""
    try:
        video, valid, reason = source.load(index, None), True, ""
    except BadVideoError as err:
        log.warning("Skipping unreadable video %s (%s)", source.name(index), err)
        video = np.zeros((spec.num_frames, spec.height, spec.width, 3), np.uint8)
        valid, reason = False, str(err)
    return {
        "video": video,
        "index": np.int64(index),
        "valid": np.bool_(valid),
        "reason": np.bytes_(reason.encode()[:_MAX_REASON_BYTES]),
    }


def record_batches(
    source: ClipSource, spec: ClipSpec, start: int, stop: int, batch: int, *, threads: int = 1
) -> grain.IterDataset:
    """Records [start, stop) in order, one row each, batched (the last batch may be short) and
    decoded `threads` at a time ahead: ``video`` (b, T, H, W, 3) uint8, ``index`` (b,) int64,
    ``valid`` (b,) bool, ``reason`` (b,) bytes. Nothing is replaced: an unreadable record is a
    zero clip with ``valid`` False and the reason (for tools that keep a row per record, such
    as the latent store)."""
    ds = grain.MapDataset.range(start, stop).map(functools.partial(_load_record, source, spec))
    return _batched(ds, batch, threads=threads, prefetch=2 * batch, drop_remainder=False)


def _batched(
    ds: grain.MapDataset, batch: int, *, threads: int, prefetch: int, drop_remainder: bool
) -> grain.IterDataset:
    read = grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=prefetch)
    return ds.to_iter_dataset(read).batch(batch, drop_remainder=drop_remainder)


def as_config(cfg: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
    """The data block with defaults (:func:`reducio_jax.config.data_block`) for keys it does not set."""
    given = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    return ml_collections.ConfigDict({**data_block().to_dict(), **given})


def _clip_spec(cfg: Any, train: bool) -> ClipSpec:
    h, w = frame_size(cfg.resolution)
    return ClipSpec(
        num_frames=int(cfg.num_frames),
        fps=float(cfg.fps),
        height=h,
        width=w,
        random_start=train,
        random_crop=train and bool(cfg.random_crop),
    )


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n:
        raise ValueError(f"process_index {p} is not in [0, {n}).")
    return p, n


def _local_batch(cfg: Any, process_count: int) -> int:
    if cfg.batch_size <= 0 or cfg.batch_size % process_count:
        raise ValueError(
            f"data.batch_size {cfg.batch_size} must be a positive multiple of the "
            f"process count {process_count}."
        )
    return cfg.batch_size // process_count


def _index_dataset(n: int, cfg: Any, train: bool, p: int, count: int) -> grain.MapDataset:
    """Positions for process p: values >= n (eval padding) load record ``v % n`` masked."""
    ds = grain.MapDataset.range(n)
    if train:
        if cfg.shuffle:
            ds = ds.shuffle(seed=int(cfg.seed) % 2**32)
        if n < count:
            raise DataError(f"Only {n} clips for {count} processes: add data or use fewer hosts.")
        ds = ds[: n - n % count]
    else:
        padded = math.ceil(n / cfg.batch_size) * cfg.batch_size
        ds = grain.MapDataset.range(padded)
    return ds[p::count]


def _check_epochs(cfg: Any, per_process: int, local_batch: int, train: bool) -> int | None:
    epochs = cfg.num_epochs if (train or cfg.num_epochs is not None) else 1
    if epochs is not None and per_process * epochs < local_batch:
        raise DataError(
            f"{per_process * epochs} clips per process cannot fill one batch of "
            f"{local_batch}: lower data.batch_size or add data."
        )
    return epochs


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; parse defaults if the app did not."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_host_dataset(
    cfg: ml_collections.ConfigDict | dict,
    *,
    train: bool,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """This process's batches as numpy: a Grain ``IterDataset`` of dicts

    ``video`` (B/P, T, H, W, 3) uint8, ``index`` (B/P,) int32 record index, ``mask``
    (B/P,) bool (False for eval padding/replacements), ``skipped`` (B/P,) int32 number of
    unreadable files passed over for each clip, ``skipped_index`` (B/P, 64) int32 their record
    indices (-1 = none) and ``skipped_reason`` (B/P, 64) bytes why. ``iter()`` it for a
    checkpointable iterator.

    Raises:
      DataError: missing/empty dataset (before any device work).
    """
    dataset, _ = _build(as_config(cfg), train, *_process_info(process_index, process_count))
    return dataset


def _build(cfg: Any, train: bool, p: int, count: int) -> tuple[grain.IterDataset, ClipSource]:
    local_batch = _local_batch(cfg, count)
    source = make_source(cfg, _clip_spec(cfg, train))
    n = len(source)
    ds = _index_dataset(n, cfg, train, p, count)
    ds = ds.repeat(_check_epochs(cfg, len(ds), local_batch, train))
    load = _LoadClip(source, n, mask_replaced=not train)
    if train:
        seed = int(np.random.SeedSequence([int(cfg.seed), p]).generate_state(1)[0])
        ds = ds.random_map(load, seed=seed)
    else:
        ds = ds.map(load)
    it_ds = _batched(ds, local_batch, threads=1, prefetch=local_batch, drop_remainder=True)
    if cfg.num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it_ds, source


@jax.jit
def video_to_float(video: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1], on device (keeps the input's sharding)."""
    return video.astype(jnp.float32) / 127.5 - 1.0


class Loader:
    """Iterates global batches ``{"video", "mask", "index"}`` as sharded ``jax.Array``s.

    ``video`` (B, T, H, W, 3) float32 in [-1, 1], ``mask`` (B,) bool, ``index`` (B,) int32;
    the batch dimension is split over ``batch_axes`` of ``mesh``. Checkpoint
    :attr:`iterator` with ``grain.checkpoint.CheckpointSave/CheckpointRestore`` (or use
    :meth:`get_state` / :meth:`set_state`). Not re-iterable: one pass per ``Loader``.
    ``loader.source.name(i)`` names record ``i`` (file path, TFDS id or ``synthetic/i``).
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        *,
        mesh: Mesh,
        batch_axes: Sequence[str],
        global_batch: int,
        source: ClipSource | None = None,
    ):
        self.dataset, self.source = dataset, source
        self.iterator = iter(dataset)
        self.sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
        self.global_batch = global_batch
        self._stats = {"batches": 0, "clips": 0, "skipped": 0}
        self.skip_report = SkipReport()  # distinct unreadable files met by this process
        self._used: set[int] = set()  # records that gave a clip

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = self._next_host_batch()  # host numpy, this process's rows
        self._stats["batches"] += 1
        self._stats["clips"] += int(batch["mask"].sum())
        self._stats["skipped"] += int(batch["skipped"].sum())
        self._used.update(int(i) for i in batch["index"][batch["mask"]])
        self._note_skips(batch["skipped_index"], batch["skipped_reason"])
        return {
            "video": video_to_float(self._global(batch["video"])),
            "mask": self._global(batch["mask"]),
            "index": self._global(batch["index"]),
        }

    def _note_skips(self, indices: np.ndarray, reasons: np.ndarray) -> None:
        """One warning per unreadable file (the first time this process meets it)."""
        for i, reason in zip(indices[indices >= 0], reasons[indices >= 0], strict=True):
            name = self.source.name(int(i)) if self.source is not None else str(int(i))
            text = bytes(reason).decode(errors="replace")
            if self.skip_report.add(name, int(i), text):
                log.warning("Skipping unreadable video %s (%s)", name, text)

    def _next_host_batch(self) -> dict[str, np.ndarray]:
        try:
            return next(self.iterator)
        except (StopIteration, DataError):
            raise
        except Exception as err:
            msg = " ".join(str(err).split()) or "no details"
            raise DataError(f"the data pipeline failed ({type(err).__name__}: {msg})") from err

    def _global(self, local: np.ndarray) -> jax.Array:
        shape = (self.global_batch, *local.shape[1:])
        return jax.make_array_from_process_local_data(self.sharding, local, shape)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def counts_state(self) -> dict:
        """The file counters behind :meth:`stats` (JSON-able), to carry over a restart."""
        return {"used": sorted(self._used), "skipped": list(self.skip_report.entries.values())}

    def load_counts_state(self, state: dict) -> None:
        self._used.update(int(i) for i in state["used"])
        for entry in state["skipped"]:
            self.skip_report.entries.setdefault(entry["name"], entry)

    def stats(self) -> dict[str, int]:
        """Counters since construction (this process): ``batches``, ``clips`` (unmasked),
        ``skipped`` (unreadable files passed over, counted each time), ``files_read``
        (distinct files opened: used or skipped), ``files_skipped`` (distinct unreadable
        files; also those loaded into ``skip_report`` from an earlier run)."""
        read = len(self._used | self.skip_report.indices())
        return {**self._stats, "files_read": read, "files_skipped": len(self.skip_report)}

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _batch_axes(mesh: Mesh, batch_axes: Sequence[str] | None) -> tuple[str, ...]:
    axes = batch_axes_of(mesh) if batch_axes is None else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if not axes or missing:
        raise ValueError(f"Batch axes {axes or BATCH_AXES} not in mesh {mesh.axis_names}.")
    return axes


def make_loader(
    cfg: ml_collections.ConfigDict | dict,
    *,
    mesh: Mesh,
    train: bool,
    batch_axes: Sequence[str] | None = None,
) -> Loader:
    """Device loader for this JAX process (see :class:`Loader`).

    ``batch_axes`` default: those of ``("data", "fsdp")`` present in ``mesh``; the global
    batch must divide evenly over them and over ``jax.process_count()``.
    """
    cfg = as_config(cfg)
    axes = _batch_axes(mesh, batch_axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    if cfg.batch_size % shards:
        raise ValueError(
            f"data.batch_size {cfg.batch_size} is not divisible by the {shards} devices "
            f"along mesh axes {axes}."
        )
    dataset, source = _build(cfg, train, *_process_info(None, None))
    return Loader(
        dataset, mesh=mesh, batch_axes=axes, global_batch=int(cfg.batch_size), source=source
    )
