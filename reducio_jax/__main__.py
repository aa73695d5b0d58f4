"""`python -m reducio_jax` / `reducio-jax`: encode videos into a latent store, decode it back,
export a training run's weights, reconstruct whole video files.

    python -m reducio_jax encode --checkpoint reducio-ft4.ckpt --config configs/reducio_ft4.py \
        --data /data/videos --out latents/videos [--num_shards 8] [--save_moments]
    python -m reducio_jax encode ... --whole_videos [--overlap 4] [--window_batch 4]
    python -m reducio_jax decode --store latents/videos --checkpoint reducio-ft4.ckpt \
        --out decoded/ [--num_clips 16]
    python -m reducio_jax export --run runs/tiny --out weights/tiny [--step 100]
    python -m reducio_jax reconstruct IN.mp4 OUT.mp4 --checkpoint reducio-ft4.ckpt \
        --config configs/reducio_ft4.py [--keep_fps] [--side_by_side]   (or IN_DIR OUT_DIR)

Exit status 0 on success, 2 on bad input (one `error: ...` line on stderr), 143 when SIGTERM
stopped `encode` after the batch in flight (rerun the same command to finish the store).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

CHECKPOINT_HELP = "torch .ckpt/.pt/.safetensors or Orbax pretrained dir"


def _encode_parser(sub: argparse._SubParsersAction) -> None:
    from reducio_jax.latents.runtime import add_data_flags

    p = sub.add_parser("encode", help="videos -> latent store (Zarr via TensorStore)")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--config", help="configs/*.py or official YAML (optional for Orbax dirs)")
    add_data_flags(p)
    p.add_argument("--out", required=True, help="store directory (created, or resumed)")
    p.add_argument("--num_shards", type=int, help="shard directories (default: 256 clips each)")
    p.add_argument("--save_moments", action="store_true", help="also store posterior mean/logvar")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store at --out")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    whole = p.add_argument_group(
        "whole videos",
        "--whole_videos stores each video of any length and size as its VideoLatent (its "
        "16-frame windows, docs/video.md) instead of one 16-frame clip per video; frames keep "
        "their size unless --resolution is given",
    )
    whole.add_argument(
        "--whole_videos", action="store_true", help="encode every video whole, window by window"
    )
    whole.add_argument(
        "--keep_fps", action="store_true", help="keep each video's frame rate (default: --fps)"
    )
    whole.add_argument("--overlap", type=int, default=4, help="frames shared by neighbour windows")
    whole.add_argument(
        "--window_batch",
        type=int,
        help="windows per compiled call (default: 4, rounded up to a multiple of the devices)",
    )


def _decode_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("decode", help="latent store -> mp4 videos")
    p.add_argument("--store", required=True, help="store directory written by encode")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--config", help="model config (default: the one recorded in the store)")
    p.add_argument("--out", required=True, help="folder for the mp4 files")
    p.add_argument("--num_clips", type=int, help="first N stored clips (default: all)")
    p.add_argument("--batch_size", type=int, help="global batch (default: one per device)")
    p.add_argument("--devices", type=int, help="use the first N devices (default: all)")
    p.add_argument("--fps", type=float, help="frame rate of the files (default: the store's)")
    p.add_argument("--allow_partial", action="store_true", help="decode finished shards only")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="training run checkpoint -> pretrained dir (eval.py, encode, from_pretrained)",
    )
    p.add_argument("--run", required=True, help="run directory of train.py, or its checkpoints/N")
    p.add_argument("--out", required=True, help="pretrained directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _reconstruct_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="a video file of any length and size (or a folder of them) -> its reconstruction",
        description=(
            "Streams each video through overlapping 16-frame windows (docs/video.md) and writes "
            "an H.264 file of the same length and size; prints PSNR/SSIM of the whole video. "
            "A folder is converted file by file into the same tree under OUT; unusable files "
            "are skipped with a warning (exit 2 at the end)."
        ),
    )
    p.add_argument("input", help="video file, or a folder of videos")
    p.add_argument("output", help="output .mp4/.mkv/.mov file, or a folder")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--config", help="configs/*.py or official YAML (optional for Orbax dirs)")
    p.add_argument(
        "--keep_fps",
        action="store_true",
        help="keep the source frame rate (default: resample to the config's data.fps)",
    )
    p.add_argument(
        "--side_by_side", action="store_true", help="write input | reconstruction side by side"
    )
    p.add_argument("--overlap", type=int, default=4, help="frames cross-faded between windows")
    p.add_argument("--window_batch", type=int, default=4, help="windows per compiled call")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (lower: better, larger)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="reducio-jax",
        description=(
            "Reducio-VAE latents: encode videos into a store, decode them back; export the "
            "weights of a training run; reconstruct whole video files."
        ),
        epilog=(
            "Exit status 0 on success, 2 on bad input (one line on stderr says what), 143 when "
            "SIGTERM stopped encode (run the same command again to finish)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _encode_parser(sub)
    _decode_parser(sub)
    _export_parser(sub)
    _reconstruct_parser(sub)
    return parser.parse_args(argv)


def _options(cls: type, args: argparse.Namespace) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    return cls(**kwargs, progress=not args.no_progress)


def _refuse_video_flags(args: argparse.Namespace) -> None:
    """The window flags of `encode` only mean something with --whole_videos."""
    from reducio_jax.latents.runtime import InputError

    given = [f for f in ("keep_fps", "window_batch") if getattr(args, f)]
    given += ["overlap"] if args.overlap != 4 else []
    if given:
        flags = ", ".join(f"--{f}" for f in given)
        raise InputError(f"{flags} only apply with --whole_videos (16-frame clips have no windows)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from reducio_jax.latents import DecodeOptions, EncodeOptions, decode_to_mp4, encode_to_store

    if args.command == "export":
        from reducio_jax.train.export import export_run

        return export_run(args.run, args.out, step=args.step, overwrite=args.overwrite)
    if args.command == "reconstruct":
        from reducio_jax.reconstruct import ReconstructOptions, reconstruct_videos

        return reconstruct_videos(_options(ReconstructOptions, args))
    if args.command == "encode" and args.whole_videos:
        from reducio_jax.latents.videos import VideoEncodeOptions, encode_videos_to_store

        return encode_videos_to_store(_options(VideoEncodeOptions, args))
    if args.command == "encode":
        _refuse_video_flags(args)
        return encode_to_store(_options(EncodeOptions, args))
    return decode_to_mp4(_options(DecodeOptions, args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m reducio_jax` and the `reducio-jax` script."""
    args = parse_args(argv)
    from reducio_jax.latents.runtime import USER_ERRORS, error_line
    from reducio_jax.train.errors import TrainingError

    try:
        summary = run(args)
    except (*USER_ERRORS, TrainingError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command != "reconstruct":
            raise
        print("error: interrupted; the unfinished output file was removed", file=sys.stderr)
        return 130
    if args.command in ("decode", "reconstruct"):
        summary = {**summary, "videos": len(summary["videos"])}
    print(json.dumps(summary))
    if summary.get("preempted"):
        from reducio_jax.preemption import PREEMPTED_STATUS

        print(
            f"preempted: SIGTERM; finished shards are kept, unfinished ones "
            f"{summary['unfinished_shards']} are rewritten when the same command is run again",
            file=sys.stderr,
        )
        return PREEMPTED_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
