"""Convert a released Reducio-VAE PyTorch checkpoint into a pretrained directory (Orbax).

Reads .ckpt / .pt / .pth (torch's zip format, no torch needed) and .safetensors, fp32/fp16/bf16
tensors, keys with or without a `module.` prefix. Writes the VAE, plus the discriminator, LPIPS
and logvar when the file has `loss.*` keys, and the config, to one directory that
`ReducioVAE.from_pretrained(OUT)` loads. Every checkpoint key must be used and every parameter
filled: otherwise it stops and names them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError

USAGE = "--checkpoint FILE --config FILE --out DIR [--vae_only]"


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    shared.define_checkpoint(fv, "Released checkpoint (.ckpt, .pt, .pth, .safetensors).")
    shared.define_config(fv, argv)
    shared.define_out(fv, "Output pretrained directory (replaced if it exists).")
    flags.DEFINE_bool(
        "vae_only", False, "Drop the discriminator/LPIPS/logvar even if present.", flag_values=fv
    )


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if positional:
        raise InputError(f"unexpected arguments: {' '.join(positional)}")
    shared.require(fv, "checkpoint", "config", "out")
    from reducio_jax.convert.pretrained import convert_torch_checkpoint, save_pretrained

    start = time.perf_counter()
    checkpoint, out = fv["checkpoint"].value, fv["out"].value
    cfg = fv["config"].value
    print(f"reading and converting {checkpoint} ...", flush=True)
    weights = convert_torch_checkpoint(checkpoint, cfg)
    if fv["vae_only"].value:
        weights.discriminator = weights.lpips = weights.logvar = None
    print(f"writing {', '.join(weights.modules())} to {out} ...", flush=True)
    written = save_pretrained(weights, out, cfg)
    print(f"done in {time.perf_counter() - start:.1f}s: {written}")
    return 0
