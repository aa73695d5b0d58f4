"""Reconstruct a video file of any length and size (or every video of a folder, into the same
tree under OUTPUT): overlapping 16-frame windows (docs/video.md), an H.264 file of the same
length and size, PSNR/SSIM of the whole video. Unusable files of a folder are skipped with a
warning (exit 2 at the end).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError

USAGE = (
    "INPUT OUTPUT --checkpoint CKPT_OR_DIR [--config FILE] [--keep_fps] [--side_by_side] "
    "[--window_batch auto|N] [--max_memory 8GB]"
)


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    shared.define_checkpoint(fv)
    shared.define_config(fv, argv, shared.CONFIG_HELP + " Optional for pretrained dirs.")
    flags.DEFINE_bool(
        "side_by_side", False, "Write input | reconstruction side by side.", flag_values=fv
    )
    shared.define_windows(fv)
    shared.define_max_memory(fv)
    flags.DEFINE_integer(
        "crf", 18, "H.264 quality (lower: better, larger).", lower_bound=0, flag_values=fv
    )
    shared.define_progress(fv)


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if len(positional) != 2:
        raise InputError(
            f"reconstruct takes INPUT and OUTPUT (a video file or a folder each), got "
            f"{len(positional)} argument(s): {' '.join(positional) or 'none'}"
        )
    shared.require(fv, "checkpoint")
    from reducio_jax.runs.reconstruct import ReconstructOptions, reconstruct_videos

    opts = shared.options(ReconstructOptions, fv, input=positional[0], output=positional[1])
    try:
        summary = reconstruct_videos(opts)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("the unfinished output file was removed") from None
    print(json.dumps({**summary, "videos": len(summary["videos"])}))
    return 0
