"""A training run's step -> a pretrained directory: a copy of the items a user needs (`vae`,
`discriminator`, `lpips` when the run had one, `config`), in the one checkpoint layout
(`reducio_jax.storage.checkpoints`) that `ReducioVAE.from_pretrained`, `eval.py`,
`python -m reducio_jax encode|decode` and `train.py --init_from` read.

    python -m reducio_jax export --run runs/tiny --out weights/tiny          # latest step
    python -m reducio_jax export --run runs/tiny/checkpoints/100 --out weights/tiny_100

The optimizer states and the data position stay in the run.
"""

from __future__ import annotations

from reducio_jax.storage import checkpoints
from reducio_jax.storage.paths import Path, PathLike, as_path
from reducio_jax.train.errors import TrainingError


def find_run(path: PathLike) -> tuple[Path, int | None]:
    """(run directory, the step `path` names or None) for a run directory or one of its
    `checkpoints/<step>` directories."""
    path = as_path(path)
    if not path.exists():
        raise TrainingError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        return path, None
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    raise TrainingError(
        f"{path} is neither a training run directory (with checkpoints/) nor one of its "
        "checkpoints/<step> directories"
    )


def run_steps(run_dir: Path) -> list[int]:
    """The committed steps of a run, oldest first."""
    # read only: nothing is saved, so `keep` prunes nothing
    ckpt = checkpoints.RunCheckpoints(run_dir / "checkpoints", keep=1, async_save=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def _choose_step(run_dir: Path, steps: list[int], named: int | None, step: int | None) -> int:
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


def find_step(path: PathLike, step: int | None = None) -> tuple[Path, int]:
    """(the step's checkpoint directory, the step) of a run directory (its latest step, or
    `step`) or of one of its `checkpoints/<step>` directories; checks the step's config item."""
    run_dir, named = find_run(path)
    step = _choose_step(run_dir, run_steps(run_dir), named, step)
    step_dir = run_dir / "checkpoints" / str(step)
    try:
        checkpoints.read_config(step_dir)
    except checkpoints.CheckpointError as err:
        raise TrainingError(f"{err} (not a step written by train.py)") from None
    return step_dir, step


def export_run(
    path: PathLike,
    out: PathLike,
    *,
    step: int | None = None,
    overwrite: bool = False,
) -> dict[str, object]:
    """Copies a run's step into a pretrained directory. `path`: a run directory (its latest
    step, or `step`) or one of its `checkpoints/<step>` directories."""
    out = as_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TrainingError(f"{out} exists and is not empty; pass --overwrite to replace it")
    step_dir, step = find_step(path, step)
    copied = checkpoints.copy_items(step_dir, out, checkpoints.PRETRAINED)
    parts = sorted(name for name in copied if name in checkpoints.NETWORKS)
    return {"out": str(out), "step": step, "parts": parts}
