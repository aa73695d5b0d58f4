"""A training step as a checkpoint of the one layout (`reducio_jax.storage.checkpoints`).

`<workdir>/checkpoints/<step>/` holds the networks of the `TrainState` (`vae`: parameters and
fixed tables; `discriminator`: parameters and BatchNorm statistics), the frozen `lpips` when the
run has one, the run's `config` (with logvar), the `optimizer` item (both Adam states, the step
count and the noise key) and `data` (each process's Grain iterator position). So a step is also
a pretrained directory: `ReducioVAE.from_pretrained` and `--init_from` read it as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from reducio_jax.sharding import abstract_model, abstract_with_shardings
from reducio_jax.storage import checkpoints
from reducio_jax.storage.checkpoints import (
    DATA,
    DISCRIMINATOR,
    LPIPS,
    OPTIMIZER,
    VAE,
    RunCheckpoints,
)
from reducio_jax.train import state as state_lib
from reducio_jax.train.state import TrainState

log = logging.getLogger(__name__)


def train_items(state: TrainState) -> dict[str, Any]:
    """The checkpoint items of a train state (or of its abstract form)."""
    return {
        VAE: nnx.merge_state(state.vae_params, state.vae_buffers),
        DISCRIMINATOR: nnx.merge_state(state.disc_params, state.disc_stats),
        OPTIMIZER: {
            "step": state.step,
            "rng": state.rng,
            "vae": state.opt_vae,
            "discriminator": state.opt_disc,
        },
    }


def train_state(items: dict[str, Any]) -> TrainState:
    """Inverse of `train_items`."""
    vae_params, vae_buffers = nnx.split_state(items[VAE], nnx.Param, ...)
    disc_params, disc_stats = nnx.split_state(items[DISCRIMINATOR], nnx.Param, nnx.BatchStat)
    optimizer = items[OPTIMIZER]
    return TrainState(
        step=optimizer["step"],
        rng=optimizer["rng"],
        vae_params=vae_params,
        vae_buffers=vae_buffers,
        disc_params=disc_params,
        disc_stats=disc_stats,
        opt_vae=optimizer["vae"],
        opt_disc=optimizer["discriminator"],
    )


def save_step(
    ckpt: RunCheckpoints,
    step: int,
    state: TrainState,
    *,
    config: dict[str, Any],
    lpips_state: nnx.State | None,
    data_state: Any | None,
) -> None:
    """Saves (asynchronously) the checkpoint of `step`: `state`, the run's config item, LPIPS
    and the data iterator's position when there are."""
    items = train_items(state)
    items[checkpoints.CONFIG] = config
    if lpips_state is not None:
        items[LPIPS] = lpips_state
    if data_state is not None:
        items[DATA] = data_state
    ckpt.save(step, items)


def restore_step(
    ckpt: RunCheckpoints,
    step: int,
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    iterator: Any | None,
) -> tuple[TrainState, nnx.State | None]:
    """The train state and LPIPS of `step`, placed on `mesh` per `cfg.mesh.rules`; restores
    the position of `iterator` (a Grain iterator) in place when given."""
    held = checkpoints.items_in(ckpt.step_dir(step))
    abstract = abstract_with_shardings(state_lib.abstract_state(cfg), mesh, cfg.mesh.rules)
    targets: dict[str, Any] = train_items(abstract)
    if LPIPS in held:
        targets[LPIPS] = abstract_model(lambda: state_lib.make_lpips(cfg), mesh, cfg.mesh.rules)[1]
    if iterator is not None and DATA in held:
        targets[DATA] = iterator
    elif iterator is not None:
        log.warning("Checkpoint %d has no data-iterator state; the data starts over.", step)
    restored = ckpt.restore(step, targets)
    return train_state(restored), restored.get(LPIPS)
