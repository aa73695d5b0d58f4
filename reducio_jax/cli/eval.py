"""PSNR, SSIM, LPIPS and rFVD of Reducio-VAE reconstructions over a dataset (docs/eval.md).

Writes OUT/metrics.json, OUT/metrics.md, OUT/per_clip.jsonl, OUT/skipped.jsonl and
OUT/videos/*.mp4 (input | reconstruction). SIGTERM stops after the batch in flight, writes the
reports of the clips done (marked partial) and exits with 143; the same command again continues
from there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError

USAGE = (
    "--checkpoint CKPT_OR_DIR [--config FILE] --data DATA [--out DIR] [--num_clips N] "
    "[--i3d FILE] [flags]"
)


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    shared.define_checkpoint(fv)
    shared.define_config(fv, argv, shared.CONFIG_HELP + " Optional for pretrained dirs.")
    shared.define_data(fv)
    shared.define_out(fv, "Output folder.", default="eval_out")
    flags.DEFINE_integer("save_videos", 4, "input | reconstruction mp4s to write.", flag_values=fv)
    flags.DEFINE_string(
        "i3d", None, "pytorch-i3d state dict for rFVD (else rFVD unavailable).", flag_values=fv
    )
    flags.DEFINE_integer("i3d_resolution", 224, "I3D input size.", flag_values=fv)
    flags.DEFINE_bool(
        "sample_posterior", False, "Sample z instead of taking the mean.", flag_values=fv
    )
    flags.DEFINE_integer("seed", 0, "Posterior sampling seed.", flag_values=fv)
    flags.DEFINE_bool(
        "lpips_unit_range",
        False,
        "LPIPS on [0, 1] frames, as the reference validation_step (default [-1, 1]).",
        flag_values=fv,
    )
    shared.define_progress(fv)
    shared.define_distributed(fv)


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if positional:
        raise InputError(f"unexpected arguments: {' '.join(positional)}")
    shared.require(fv, "checkpoint", "data")
    import jax

    from reducio_jax.runs.evaluate import EvalOptions, evaluate, format_markdown, write_reports
    from reducio_jax.runs.preemption import PREEMPTED_STATUS

    shared.init_distributed(fv)
    opts = shared.options(EvalOptions, fv)
    result = evaluate(opts)
    out = write_reports(result, opts.out)
    if jax.process_index() == 0:
        print(format_markdown(result))
        print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    if result.get("preempted"):
        print(
            f"preempted: SIGTERM after {result['clips_used']} clips; partial reports in {out}",
            file=sys.stderr,
        )
        return PREEMPTED_STATUS
    return 0
