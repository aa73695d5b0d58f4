"""Training: the reference recipe (VAE + 3D PatchGAN, adaptive GAN weight, LPIPS) on a mesh.

Public API::

    from reducio_jax.train import run, Trainer, RunResult
    result = run(cfg, workdir, resume=False, init_from=None, lpips_weights=None)
    result.logs, result.preview_l1, result.checkpoint, result.preview

    make_mesh(cfg.mesh)                      # (data, fsdp) mesh over all devices
    init_state(cfg, mesh) / abstract_state(cfg) / state_shardings(cfg, mesh)
    jit_train_step(cfg, nets, weights, mesh, shardings)  # (state, batch, lpips) -> (state, metrics)
                                             # batch = {"video": (B,T,H,W,3), "index": (B,)}
    vae_schedule(cfg.optim) / disc_schedule(cfg.optim, cfg.loss)  # optax schedules
    TrainingError, NonFiniteLossError
    reducio_jax.runs.preemption.Preempted         # raised by run() after a SIGTERM (checkpoint saved)

See docs/training.md.
"""

from reducio_jax.sharding import make_mesh
from reducio_jax.train.errors import NonFiniteLossError, TrainingError
from reducio_jax.train.loop import RunResult, Trainer, run
from reducio_jax.train.schedules import disc_schedule, vae_schedule
from reducio_jax.train.state import (
    Networks,
    TrainState,
    abstract_state,
    init_state,
    state_shardings,
)
from reducio_jax.train.step import jit_train_step, train_step_fn

__all__ = [
    "Networks",
    "NonFiniteLossError",
    "RunResult",
    "TrainState",
    "Trainer",
    "TrainingError",
    "abstract_state",
    "disc_schedule",
    "init_state",
    "jit_train_step",
    "make_mesh",
    "run",
    "state_shardings",
    "train_step_fn",
    "vae_schedule",
]
