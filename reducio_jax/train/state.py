"""The train state (a pytree of arrays), the networks' graph definitions and the optimizers.

`TrainState` holds everything a checkpoint must restore: the VAE parameters and buffers, the
discriminator parameters and BatchNorm statistics, both Adam states, the step and the base
PRNG key. The graph definitions (static) and the frozen LPIPS weights live in `Networks`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from reducio_jax.models import LPIPS, build_discriminator, build_lpips, build_vae
from reducio_jax.sharding import abstract_model, tree_shardings
from reducio_jax.train import schedules

log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer updates done
    rng: jax.Array  # (2,) uint32: base key; step s samples with fold_in(rng, s)
    vae_params: nnx.State  # nnx.Param leaves
    vae_buffers: nnx.State  # fixed tables (not trained)
    disc_params: nnx.State
    disc_stats: nnx.State  # BatchNorm running mean / var / num_batches_tracked
    opt_vae: Any  # optax state over vae_params
    opt_disc: Any  # optax state over disc_params


@dataclasses.dataclass(frozen=True)
class Networks:
    """Static graph definitions and the frozen LPIPS state (None: no perceptual loss)."""

    vae: nnx.GraphDef
    disc: nnx.GraphDef
    lpips: nnx.GraphDef | None
    lpips_state: nnx.State | None


def compute_dtype(cfg: ml_collections.ConfigDict) -> jnp.dtype:
    return jnp.dtype(cfg.model.dtype)


def run_keys(cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The run's seed split into its three random streams: VAE init, discriminator init, noise."""
    vae_key, disc_key, noise_key = jax.random.split(jax.random.key(int(cfg.train.seed)), 3)
    return vae_key, disc_key, noise_key


def make_lpips(cfg: ml_collections.ConfigDict) -> LPIPS:
    return build_lpips(dtype=compute_dtype(cfg))


def make_optimizers(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, ...]:
    """Adam(b1, b2) for the VAE (LambdaLinear lr) and the discriminator (WarmupLR lr)."""
    optim = cfg.optim

    def adam(schedule: optax.Schedule, clip: float) -> optax.GradientTransformation:
        tx = optax.adam(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=1e-8)
        return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx

    tx_vae = adam(schedules.vae_schedule(optim), float(optim.grad_clip_norm))
    tx_disc = adam(schedules.disc_schedule(optim, cfg.loss), float(optim.disc_grad_clip_norm))
    return tx_vae, tx_disc


def _split_vae(vae: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    return nnx.split(vae, nnx.Param, ...)


def _split_disc(disc: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    return nnx.split(disc, nnx.Param, nnx.BatchStat)


_TRACED: dict[str, Any] = {}  # graph definitions and abstract states, by model config


def _model_key(cfg: ml_collections.ConfigDict, *extra: Any) -> str:
    blocks = {k: json.loads(cfg[k].to_json_best_effort()) for k in ("model", "loss", "optim")}
    return json.dumps([blocks, int(cfg.train.seed), *extra], sort_keys=True)


def _cached(key: str, make: Callable[[], Any]) -> Any:
    if key not in _TRACED:
        _TRACED[key] = make()
    return _TRACED[key]


def graphdefs(cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    def make() -> tuple[nnx.GraphDef, nnx.GraphDef]:
        with nnx.use_eager_sharding(False):
            vae_graph = _split_vae(nnx.eval_shape(lambda: build_vae(cfg.model)))[0]
            disc_graph = _split_disc(nnx.eval_shape(lambda: build_discriminator(cfg)))[0]
        return vae_graph, disc_graph

    return _cached(_model_key(cfg, "graphdefs"), make)


def _assemble(
    cfg: ml_collections.ConfigDict,
    vae_params: nnx.State,
    vae_buffers: nnx.State,
    disc_params: nnx.State,
    disc_stats: nnx.State,
) -> TrainState:
    """The TrainState at step 0 around the networks' states, with fresh optimizer states."""
    tx_vae, tx_disc = make_optimizers(cfg)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(run_keys(cfg)[2]),
        vae_params=vae_params,
        vae_buffers=vae_buffers,
        disc_params=disc_params,
        disc_stats=disc_stats,
        opt_vae=tx_vae.init(vae_params),
        opt_disc=tx_disc.init(disc_params),
    )


def _fresh_disc(cfg: ml_collections.ConfigDict) -> tuple[nnx.State, nnx.State]:
    """Randomly initialised discriminator parameters and BatchNorm statistics."""
    return _split_disc(build_discriminator(cfg, seed=run_keys(cfg)[1]))[1:]


def _fresh_state(cfg: ml_collections.ConfigDict) -> TrainState:
    """Randomly initialised networks from the run's seed."""
    _, vae_params, vae_buffers = _split_vae(build_vae(cfg.model, seed=run_keys(cfg)[0]))
    return _assemble(cfg, vae_params, vae_buffers, *_fresh_disc(cfg))


def abstract_state(cfg: ml_collections.ConfigDict) -> TrainState:
    """Shapes, dtypes and axis metadata of the train state, nothing allocated."""

    def make() -> TrainState:
        with nnx.use_eager_sharding(False):
            return jax.eval_shape(lambda: _fresh_state(cfg))

    return _cached(_model_key(cfg, "abstract_state"), make)


def state_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Any:
    return tree_shardings(abstract_state(cfg), mesh, cfg.mesh.rules)


# XLA options for programs that run once (or in tests): skip the expensive LLVM passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def step_compiler_options(cfg: ml_collections.ConfigDict, platform: str) -> dict[str, Any]:
    """XLA options of the train step's compile for `platform`: FAST_COMPILE with
    `train.fast_compile`, and on TPUs `train.tpu_compiler_options` (TPU-only flags, which
    other platforms' compilers refuse)."""
    options = dict(FAST_COMPILE) if cfg.train.get("fast_compile", False) else {}
    if platform == "tpu":
        options.update(dict(cfg.train.get("tpu_compiler_options", None) or {}))
    return options


_INIT_FNS: dict[str, Callable[[], TrainState]] = {}  # jitted initialisers of this process


def _init_key(cfg: ml_collections.ConfigDict, mesh: Mesh) -> str:
    devices = [int(d.id) for d in mesh.devices.reshape(-1)]
    return _model_key(cfg, "init", dict(mesh.shape), devices)


def init_state(cfg: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
    """Randomly initialised state, created directly in its shards (jit with out_shardings)."""
    key = _init_key(cfg, mesh)
    if key not in _INIT_FNS:
        shardings = state_shardings(cfg, mesh)
        fresh = functools.partial(_fresh_state, cfg)
        # runs once: compile fast rather than well (the random init dominates start-up on CPUs)
        _INIT_FNS[key] = jax.jit(fresh, out_shardings=shardings, compiler_options=FAST_COMPILE)
    with nnx.use_eager_sharding(False):
        return _INIT_FNS[key]()


def state_from_modules(
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    vae: nnx.Module,
    disc: nnx.Module | None,
) -> TrainState:
    """State around pretrained modules (already placed); the discriminator is fresh if None."""
    shardings = state_shardings(cfg, mesh)
    if disc is None:
        log.info("The pretrained weights have no discriminator: it starts from random weights.")
        with nnx.use_eager_sharding(False):
            d_shard = (shardings.disc_params, shardings.disc_stats)
            disc_params, disc_stats = jax.jit(
                functools.partial(_fresh_disc, cfg),
                out_shardings=d_shard,
                compiler_options=FAST_COMPILE,
            )()
    else:
        _, disc_params, disc_stats = _split_disc(disc)
    _, vae_params, vae_buffers = _split_vae(vae)
    assemble = functools.partial(_assemble, cfg)
    return jax.jit(assemble, out_shardings=shardings)(
        vae_params, vae_buffers, disc_params, disc_stats
    )


def lpips_graph(cfg: ml_collections.ConfigDict) -> nnx.GraphDef:
    """LPIPS graph in the compute dtype (weights come from elsewhere)."""
    return abstract_model(lambda: make_lpips(cfg))[0]


def param_count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def module_apply(graph: nnx.GraphDef, *states: Any) -> Callable[..., Any]:
    """A fresh module from states (copied Variables, safe inside any trace level)."""
    return nnx.merge(graph, *states, copy=True)
