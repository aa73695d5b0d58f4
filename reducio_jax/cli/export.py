"""Export the weights of a training run (train.py's --workdir, or one of its checkpoints/N) as a
pretrained directory that eval, encode, reconstruct and `ReducioVAE.from_pretrained` read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from absl import flags

from reducio_jax.cli import shared_flags as shared
from reducio_jax.errors import InputError

USAGE = "--run DIR --out DIR [--step N] [--overwrite]"


def define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    flags.DEFINE_string(
        "run", None, "Run directory of train.py, or its checkpoints/N.", flag_values=fv
    )
    shared.define_out(fv, "Pretrained directory to write.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.", flag_values=fv)


def run(fv: flags.FlagValues, positional: Sequence[str]) -> int:
    if positional:
        raise InputError(f"unexpected arguments: {' '.join(positional)}")
    shared.require(fv, "run", "out")
    from reducio_jax.train.export import export_run

    summary = export_run(
        fv["run"].value, fv["out"].value, step=fv["step"].value, overwrite=fv["overwrite"].value
    )
    print(json.dumps(summary))
    return 0
