"""Latent store: videos -> Reducio latents + content frames on disk, and back.

Public API::

    encode_to_store(EncodeOptions(checkpoint=..., config=..., data=..., out="latents/ds"))
        # -> {"encoded_shards", "skipped_shards", ...}; resumable (finished shards skipped)
    LatentSource("latents/ds", arrays=("latent", "content"))   # Grain random-access source
    LatentStore("latents/ds")                  # metadata, finished shards, raw row reads
    decode_store(vae, store, mesh, batch)      # -> (entries, float videos) batches
    decode_to_mp4(DecodeOptions(store=..., checkpoint=..., out="videos/"))
    StoreError                                 # missing / unfinished / inconsistent store

Whole videos of any length (``encode --whole_videos``, `VideoLatent`s): see
`reducio_jax.latents.videos` (imported on its own, not re-exported here; its video files are
read and written by `reducio_jax.data.video`);
`LatentStore.videos` / `video_latent` and `LatentSource` read them.

Command line: ``python -m reducio_jax encode ...`` / ``decode ...`` (or ``reducio-jax``).
Store layout: see `reducio_jax.latents.store`; docs/eval.md.
"""

from reducio_jax.latents.decode import DecodeOptions, decode_entries, decode_store, decode_to_mp4
from reducio_jax.latents.encode import EncodeOptions, encode_to_store
from reducio_jax.latents.source import LatentSource
from reducio_jax.latents.store import LatentStore, StoreError

__all__ = [
    "DecodeOptions",
    "EncodeOptions",
    "LatentSource",
    "LatentStore",
    "StoreError",
    "decode_entries",
    "decode_store",
    "decode_to_mp4",
    "encode_to_store",
]
