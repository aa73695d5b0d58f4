"""Encode videos into a latent store (Zarr via TensorStore; docs/eval.md), resumable shard by
shard: one 16-frame clip per video, or with --whole_videos every video whole, at any length and
size, as its windows (docs/video.md).

SIGTERM stops after the batch in flight and exits with 143: finished shards are kept and the
same command again encodes only what is missing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError

USAGE = (
    "--checkpoint CKPT_OR_DIR [--config FILE] --data DATA --out STORE [--num_shards N] "
    "[--save_moments] [--whole_videos [--overlap 4] [--window_batch auto|N] [--max_memory 8GB] "
    "[--keep_fps]]"
)
WINDOW_FLAGS = ("keep_fps", "overlap", "window_batch", "max_memory")


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    shared.define_checkpoint(fv)
    shared.define_config(fv, argv, shared.CONFIG_HELP + " Optional for pretrained dirs.")
    shared.define_data(fv)
    shared.define_out(fv, "Store directory (created, or resumed).")
    flags.DEFINE_integer(
        "num_shards", None, "Shard directories (default: 256 clips each).", flag_values=fv
    )
    flags.DEFINE_bool(
        "save_moments", False, "Also store the posterior mean and logvar.", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "Discard an existing store at --out.", flag_values=fv)
    shared.define_progress(fv)
    shared.define_distributed(fv)
    flags.DEFINE_bool(
        "whole_videos",
        False,
        "Store each video of any length and size as its VideoLatent (its 16-frame windows) "
        "instead of one 16-frame clip per video; frames keep their size unless --resolution "
        "is given.",
        flag_values=fv,
    )
    prefix = "--whole_videos: "
    shared.define_windows(
        fv, prefix, " With several devices: a multiple of their number (auto: rounded down)."
    )
    shared.define_max_memory(fv, prefix)


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if positional:
        raise InputError(f"unexpected arguments: {' '.join(positional)}")
    shared.require(fv, "checkpoint", "data", "out")
    from reducio_jax.runs.preemption import PREEMPTED_STATUS

    shared.init_distributed(fv)
    if fv["whole_videos"].value:
        from reducio_jax.latents.videos import VideoEncodeOptions, encode_videos_to_store

        summary = encode_videos_to_store(shared.options(VideoEncodeOptions, fv))
    else:
        from reducio_jax.latents.encode import EncodeOptions, encode_to_store

        _refuse_window_flags(fv)
        summary = encode_to_store(shared.options(EncodeOptions, fv))
    print(json.dumps(summary))
    if summary.get("preempted"):
        print(
            f"preempted: SIGTERM; finished shards are kept, unfinished ones "
            f"{summary['unfinished_shards']} are rewritten when the same command is run again",
            file=sys.stderr,
        )
        return PREEMPTED_STATUS
    return 0


def _refuse_window_flags(fv: flags.FlagValues) -> None:
    """The window flags only mean something with --whole_videos."""
    given = [f"--{name}" for name in WINDOW_FLAGS if fv[name].present]
    if given:
        raise InputError(
            f"{', '.join(given)} only apply with --whole_videos (16-frame clips have no windows; "
            "their batch is --batch_size)"
        )
