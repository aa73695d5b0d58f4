"""Data layer: 16-frame clips at 16 fps, 256x256, for training, evaluation and latents.

Public API::

    cfg = get_config()                      # the data config block (config.data_block)
    loader = make_loader(cfg, mesh=mesh, train=True)   # -> Loader
    for batch in loader:                    # {"video": (B, T, H, W, 3) f32 in [-1, 1],
        ...                                 #  "mask": (B,) bool, "index": (B,) int32},
                                            #  sharded over mesh axes ("data", "fsdp")
    loader.iterator                         # grain iterator: grain.checkpoint.CheckpointSave
    loader.stats()                          # {"batches", "clips", "skipped", "files_read",
                                            #  "files_skipped"}
    loader.skip_report                      # unreadable files and why; .write("skipped.jsonl")
    loader.source.name(i)                   # record i: file path, TFDS id or "synthetic/i"
    loader.close()                          # stops worker processes (or use `with`)

    make_host_dataset(cfg, train=False, process_index=0, process_count=1)
        # -> grain.IterDataset of numpy batches ("video" uint8 (B/P, T, H, W, 3), "index",
        #    "mask", "skipped"), for tools that do not need devices
    record_batches(source, spec, start, stop, batch)   # records in order, one row each,
        # unreadable ones kept as invalid zero rows with the reason (the latent store)
    video_to_float(video_uint8)             # jitted uint8 -> float32 [-1, 1] on device
    build_tfds_dataset(folder, data_dir, name="my_videos")  # pack videos as TFDS once
    DataError                               # missing / empty / misconfigured dataset

Sources (``cfg.source``): ``"folder"`` (PyAV decode of mp4/webm/mov/avi files),
``"tfds"`` (``tfds.data_source``, ArrayRecord), ``"synthetic"`` (moving textured shapes).
Unreadable files are skipped with one warning each and counted; see pipeline.py for the
sharding, shuffling and replacement rules, video.py for frame-rate resampling, and
docs/data.md for the whole picture and throughput numbers.
"""

from reducio_jax.config import data_block as get_config
from reducio_jax.data.errors import DataError
from reducio_jax.data.pipeline import (
    Loader,
    make_host_dataset,
    make_loader,
    record_batches,
    video_to_float,
)
from reducio_jax.data.tfds_builder import build_tfds_dataset

__all__ = [
    "DataError",
    "Loader",
    "build_tfds_dataset",
    "get_config",
    "make_host_dataset",
    "make_loader",
    "record_batches",
    "video_to_float",
]
