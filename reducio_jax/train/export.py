"""A training run's checkpoint -> a pretrained directory (`save_pretrained`): the form that
`ReducioVAE.from_pretrained`, `eval.py` and `python -m reducio_jax encode|decode` read, and
that `train.py --init_from` fine-tunes from.

    python -m reducio_jax export --run runs/tiny --out weights/tiny          # latest step
    python -m reducio_jax export --run runs/tiny/checkpoints/100 --out weights/tiny_100

The VAE, the discriminator (with its BatchNorm statistics), the frozen LPIPS weights when the
run had them, logvar and the run's config are written; optimizer states and the data
position stay in the run.
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
from flax import nnx

from reducio_jax import sharding as shard_lib
from reducio_jax.config import config_from_dict
from reducio_jax.convert.checkpoint import ReducioWeights, save_pretrained
from reducio_jax.train import state as state_lib
from reducio_jax.train.checkpoint import Checkpointer
from reducio_jax.train.errors import TrainingError
from reducio_jax.train.loop import META_FILE
from reducio_jax.train.weights import restore_lpips


def find_run(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """(run directory, the step `path` names or None) for a run directory or one of its
    `checkpoints/<step>` directories."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise TrainingError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        run_dir, named = path, None
    elif path.parent.name == "checkpoints" and path.name.isdigit():
        run_dir, named = path.parent.parent, int(path.name)
    else:
        raise TrainingError(
            f"{path} is neither a training run directory (with checkpoints/) nor one of its "
            "checkpoints/<step> directories"
        )
    if not (run_dir / META_FILE).is_file():
        raise TrainingError(f"{run_dir} has no {META_FILE}: not a run written by train.py")
    return run_dir, named


def _choose_step(
    run_dir: pathlib.Path, steps: list[int], named: int | None, step: int | None
) -> int:
    if named is not None and step is not None and named != step:
        raise TrainingError(
            f"{run_dir}/checkpoints/{named} is the checkpoint of step {named}, not {step}"
        )
    wanted = named if named is not None else step
    if not steps:
        raise TrainingError(f"{run_dir / 'checkpoints'} holds no finished checkpoint")
    if wanted is not None and wanted not in steps:
        raise TrainingError(f"{run_dir} has no checkpoint of step {wanted}; it has {steps}")
    return steps[-1] if wanted is None else wanted


def load_run_weights(
    path: str | pathlib.Path, step: int | None = None
) -> tuple[ReducioWeights, ml_collections.ConfigDict, int]:
    """The networks of a training checkpoint on one device: (weights, config, step)."""
    run_dir, named = find_run(path)
    meta = json.loads((run_dir / META_FILE).read_text())
    cfg = config_from_dict(meta["config"])
    mesh = shard_lib.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    target = shard_lib.abstract_with_shardings(state_lib.abstract_state(cfg), mesh, cfg.mesh.rules)
    # read only: nothing is saved, so `keep` prunes nothing
    ckpt = Checkpointer(run_dir / "checkpoints", keep=1, async_save=False)
    try:
        step = _choose_step(run_dir, sorted(ckpt.all_steps()), named, step)
        state = ckpt.restore(step, target, iterator=None)
    finally:
        ckpt.close()
    vae_graph, disc_graph = state_lib.graphdefs(cfg)
    lpips = None
    if (run_dir / "lpips").is_dir():
        lpips_state = restore_lpips(run_dir / "lpips", cfg, mesh)
        lpips = nnx.merge(state_lib.lpips_graph(cfg), lpips_state)
    weights = ReducioWeights(
        vae=nnx.merge(vae_graph, state.vae_params, state.vae_buffers),
        discriminator=nnx.merge(disc_graph, state.disc_params, state.disc_stats),
        lpips=lpips,
        logvar=float(meta.get("logvar", cfg.loss.get("logvar_init", 0.0))),
    )
    return weights, cfg, step


def export_run(
    path: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    step: int | None = None,
    overwrite: bool = False,
) -> dict[str, object]:
    """Writes a run's checkpoint as a pretrained directory. `path`: a run directory (its latest
    step, or `step`) or one of its `checkpoints/<step>` directories."""
    out = pathlib.Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TrainingError(f"{out} exists and is not empty; pass --overwrite to replace it")
    weights, cfg, step = load_run_weights(path, step)
    save_pretrained(weights, out, cfg)
    return {"out": str(out), "step": step, "parts": sorted(weights.modules())}
