"""Train or fine-tune Reducio-VAE (docs/training.md): Orbax checkpoints, TensorBoard logs and
reconstruction previews in --workdir.

A workdir that already holds a run needs --resume. SIGTERM (preemption) finishes the step in
flight, commits a checkpoint of that step on every process and exits with status 143 after one
`preempted: ...` line: rerun the same command with --resume. Ctrl-C also checkpoints, then
exits with 130.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError

USAGE = (
    "--config FILE [--config.KEY=VALUE ...] [--workdir DIR] [--resume] "
    "[--init_from CKPT_OR_DIR] [--lpips_weights FILE_OR_DIR] [--noprogress]"
)
log = logging.getLogger("reducio_jax.train")


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    shared.define_config(fv, argv)
    flags.DEFINE_string(
        "workdir",
        None,
        "Run directory, a path or a gs:// URL (default: train.workdir or runs/<config name>).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "resume", False, "Continue from the latest checkpoint in --workdir.", flag_values=fv
    )
    flags.DEFINE_string(
        "init_from",
        None,
        "Start from a released torch checkpoint (.ckpt/.pt/.safetensors), a pretrained "
        "directory (paths or gs:// URLs) or released weights by name (hf://OWNER/REPO/FILE).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "lpips_weights",
        None,
        "LPIPS weights: a torch file with loss.perceptual_loss.* keys or a pretrained directory.",
        flag_values=fv,
    )
    shared.define_progress(fv)
    shared.define_distributed(fv)


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if positional:
        raise InputError(f"unexpected arguments: {' '.join(positional)}")
    if fv["config"].value is None:
        raise InputError("--config is required (e.g. --config configs/demo.py)")
    from reducio_jax.runs.preemption import PREEMPTED_STATUS, Preempted

    _set_up_logging()
    shared.init_distributed(fv)
    from reducio_jax.train.loop import run as train

    cfg = fv["config"].value
    workdir = workdir_for(cfg, fv["workdir"].value, fv["config"].config_filename)
    try:
        result = train(
            cfg, workdir, resume=fv["resume"].value, init_from=fv["init_from"].value,
            lpips_weights=fv["lpips_weights"].value, progress=fv["progress"].value,
        )  # fmt: skip
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
        return PREEMPTED_STATUS
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"the state at the interruption was checkpointed in {workdir}"
        ) from None
    except FileNotFoundError:
        raise
    except OSError as err:  # storage that fails mid-run (a bucket's server unreachable, ...)
        from reducio_jax.errors import message
        from reducio_jax.train.errors import RunFailure

        raise RunFailure(
            f"{workdir}: storage failed ({type(err).__name__}: {message(err)}); its last "
            "committed checkpoint is complete: rerun with --resume once it is back"
        ) from err
    summarize(result)
    return 0


def _set_up_logging() -> None:
    """absl's log format on stderr at INFO, as `absl.app.run` sets it up."""
    from absl import logging as absl_logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # absl's own flags (--verbosity, ...) keep their defaults
    absl_logging.use_absl_handler()
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def workdir_for(cfg, flag_value: str | None, config_path: str):
    """The run's folder (an `epath.Path`, local or `gs://`): the flag, the config's, or
    runs/<config name>."""
    from reducio_jax.storage.paths import as_path

    if flag_value:
        return as_path(flag_value)
    if cfg.train.get("workdir"):
        return as_path(cfg.train.workdir)
    return as_path(
        os.path.join("runs", os.path.splitext(os.path.basename(config_path.split(":")[0]))[0])
    )


def summarize(result) -> None:
    """One line per process: steps, L1 and total loss of the first and last log, outputs."""
    import jax

    logs = result.logs
    losses = "no steps run"
    if logs:
        first, last = logs[0], logs[-1]
        losses = (
            f"L1 {first['l1']:.6f} -> {last['l1']:.6f}, total loss {first['total_loss_ae']:.6f} "
            f"-> {last['total_loss_ae']:.6f} (first -> last log)"
        )
    if result.preview_l1:
        (s0, a), (s1, b) = result.preview_l1[0], result.preview_l1[-1]
        losses += f"; preview-clip L1 {a:.4f} (step {s0}) -> {b:.4f} (step {s1})"
    prefix = ""
    if jax.process_count() > 1:
        prefix = f"[process {jax.process_index()}/{jax.process_count()}] "
    print(
        f"{prefix}done: steps {result.start_step} -> {result.end_step}; {losses}; "
        f"{result.seconds:.1f} s; checkpoint {result.checkpoint}; preview {result.preview}; "
        f"tensorboard {result.workdir / 'tensorboard'}",
        flush=True,
    )
