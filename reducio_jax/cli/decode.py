"""Decode a latent store written by `encode` back into mp4 videos (one per stored clip, or per
whole video at its length and size).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError

USAGE = (
    "--store STORE --checkpoint CKPT_OR_DIR --out DIR [--num_clips N] [--batch_size N] "
    "[--max_memory 8GB] [flags]"
)


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    flags.DEFINE_string("store", None, "Store directory written by encode.", flag_values=fv)
    shared.define_checkpoint(fv)
    shared.define_config(
        fv, argv, shared.CONFIG_HELP + " Default: the model config recorded in the store."
    )
    shared.define_out(fv, "Folder for the mp4 files.")
    shared.define_num_clips(fv, "The first N stored clips (default: all).")
    shared.define_batch_size(
        fv,
        "Clips (for a store of whole videos: windows) per compiled call, a multiple of the "
        "devices (default: as many as fit in memory, from the compiled decoder's memory analysis "
        "against the memory available or --max_memory, tiling large frames when one does not "
        "fit); a number that does not fit is an error.",
    )
    shared.define_max_memory(fv)
    shared.define_devices(fv)
    shared.define_fps(fv, "Frame rate of the files (default: the store's).")
    flags.DEFINE_bool("allow_partial", False, "Decode finished shards only.", flag_values=fv)
    shared.define_progress(fv)


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if positional:
        raise InputError(f"unexpected arguments: {' '.join(positional)}")
    shared.require(fv, "store", "checkpoint", "out")
    from reducio_jax.latents import DecodeOptions, decode_to_mp4

    summary = decode_to_mp4(shared.options(DecodeOptions, fv))
    print(json.dumps({**summary, "videos": len(summary["videos"])}))
    return 0
