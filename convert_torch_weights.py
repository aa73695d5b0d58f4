"""Convert a released Reducio-VAE PyTorch checkpoint into an Orbax checkpoint of Flax params.

    python convert_torch_weights.py --checkpoint reducio-ft4-fs32-attn23.ckpt \
        --config configs/reducio_ft4.py --out weights/reducio_ft4

Reads .ckpt / .pt / .pth (torch's zip format, no torch needed) and .safetensors, fp32/fp16/bf16
tensors, keys with or without a `module.` prefix. Writes the VAE, plus the discriminator, LPIPS
and logvar when the file has `loss.*` keys, and the config, to one Orbax directory that
`ReducioVAE.from_pretrained(OUT)` loads. Every checkpoint key must be used and every parameter
filled: otherwise it stops and names them.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 on success, 2 on bad input (one line on stderr says what and how to fix it).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=pathlib.Path,
        help="released checkpoint (.ckpt, .pt, .pth, .safetensors)",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="configs/*.py file, or an official Lightning YAML (whole file or model.params), or JSON",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=pathlib.Path,
        help="output Orbax directory (replaced if it exists)",
    )
    parser.add_argument(
        "--vae-only",
        action="store_true",
        help="drop the discriminator/LPIPS/logvar even if present",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from reducio_jax.api import load_config
    from reducio_jax.config import ConfigError
    from reducio_jax.convert.checkpoint import convert_torch_checkpoint, save_pretrained
    from reducio_jax.convert.mapping import ConversionError
    from reducio_jax.convert.torch_format import CheckpointFormatError

    try:
        start = time.perf_counter()
        cfg = load_config(args.config)
        print(f"reading and converting {args.checkpoint} ...", flush=True)
        weights = convert_torch_checkpoint(args.checkpoint, cfg)
        if args.vae_only:
            weights.discriminator = weights.lpips = weights.logvar = None
        parts = ", ".join(weights.modules())
        print(f"writing {parts} to {args.out} ...", flush=True)
        out = save_pretrained(weights, args.out, cfg)
    except (CheckpointFormatError, ConversionError, ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f}s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
