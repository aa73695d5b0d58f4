"""One training step: the generator update, then the discriminator update on the same recons.

As in the reference `training_step`: the VAE reconstructs the batch (posterior sampled), the
generator loss (with the adaptive GAN weight) updates the VAE, then the discriminator loss on
(input, detached reconstruction) updates the discriminator. The discriminator runs in
training mode every time it is called: BatchNorm normalises with batch statistics and updates
its running statistics. The update of the generator pass (on the reconstruction) is kept, then
the discriminator pass updates them with the real and the fake batch, so the running
statistics (and num_batches_tracked, +3 per step) evolve exactly as in the reference. They
never influence a training loss (batch statistics are used); they matter for eval-mode use.

With `grad_accum_steps = A > 1` the batch is split into A strided micro-batches scanned in
order; gradients are averaged and each optimizer steps once. The adaptive GAN weight and the
discriminator's batch statistics are then per micro-batch (documented in docs/training.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from reducio_jax import losses
from reducio_jax.train import schedules
from reducio_jax.train.sharding import batch_sharding, replicated, tree_shardings
from reducio_jax.train.state import Networks, TrainState, make_optimizers, module_apply

Metrics = dict[str, jax.Array]


def last_layer(tree: Any) -> jax.Array:
    """The decoder's last conv kernel in a VAE-params-shaped tree (the adaptive-weight layer)."""
    return tree["decoder"]["conv_out"]["kernel"][...]


def _disc_call(graph: nnx.GraphDef, params: nnx.State, stats: nnx.State, video: jax.Array):
    """Discriminator in training mode -> (logits, updated BatchNorm statistics)."""
    disc = module_apply(graph, params, stats)
    logits = disc(video)
    return logits, nnx.state(disc, nnx.BatchStat)


def _micro_step(
    nets: Networks,
    w: losses.LossWeights,
    state: TrainState,
    lpips_state: nnx.State | None,
    disc_stats: nnx.State,
    x: jax.Array,
    key: jax.Array,
) -> tuple[nnx.State, Any, Any, Metrics]:
    """Gradients of both networks on one (micro-)batch x (b, T, H, W, 3)."""
    lpips_fn = None
    if nets.lpips is not None:
        lpips_fn = lambda a, b: module_apply(nets.lpips, lpips_state)(a, b)  # noqa: E731

    def terms_fn(vae_params: nnx.State):
        vae = module_apply(nets.vae, vae_params, state.vae_buffers)
        recon, posterior, _ = vae(x, rng=key)  # (b, T, H, W, 3)
        box = {}

        def disc_fn(video: jax.Array) -> jax.Array:
            logits, box["stats"] = _disc_call(nets.disc, state.disc_params, disc_stats, video)
            return logits

        terms, extra = losses.generator_terms(x, recon, posterior.kl(), lpips_fn, disc_fn, w)
        return terms, (extra, recon, box["stats"])

    g_grads, logs, (extra, recon, stats) = losses.generator_grads(
        terms_fn, state.vae_params, last_layer, state.step, w
    )
    fake_input = jax.lax.stop_gradient(recon)

    def disc_loss(disc_params: nnx.State):
        real, s = _disc_call(nets.disc, disc_params, stats, x)
        fake, s = _disc_call(nets.disc, disc_params, s, fake_input)
        loss, d_logs = losses.discriminator_loss(real, fake, state.step, w)
        return loss, (d_logs, s)

    (_, (d_logs, stats)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(state.disc_params)
    metrics = {**logs, **extra, **d_logs, "l1": extra["rec_loss"] - extra["p_loss"]}
    return stats, g_grads, d_grads, metrics


def _accumulate(
    nets: Networks,
    w: losses.LossWeights,
    state: TrainState,
    lpips_state: nnx.State | None,
    video: jax.Array,
    accum: int,
    mesh: Mesh,
) -> tuple[nnx.State, Any, Any, Metrics]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if accum == 1:
        return _micro_step(nets, w, state, lpips_state, state.disc_stats, video, key)
    b = video.shape[0]
    # strided micro-batches: micro-batch a holds rows a, a + A, ... (every device keeps its rows)
    xs = jnp.swapaxes(video.reshape(b // accum, accum, *video.shape[1:]), 0, 1)
    xs = jax.lax.with_sharding_constraint(xs, batch_sharding(mesh, extra_dims=1))
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731

    def body(carry, inputs):
        stats, g_sum, d_sum = carry
        x, index = inputs
        stats, g, d, metrics = _micro_step(
            nets, w, state, lpips_state, stats, x, jax.random.fold_in(key, index)
        )
        g_sum = jax.tree.map(jnp.add, g_sum, g)
        d_sum = jax.tree.map(jnp.add, d_sum, d)
        return (stats, g_sum, d_sum), metrics

    init = (state.disc_stats, zeros(state.vae_params), zeros(state.disc_params))
    (stats, g_sum, d_sum), metrics = jax.lax.scan(body, init, (xs, jnp.arange(accum)))
    mean = lambda t: jax.tree.map(lambda a: a / accum, t)  # noqa: E731
    return stats, mean(g_sum), mean(d_sum), jax.tree.map(jnp.mean, metrics)


def train_step_fn(
    cfg: ml_collections.ConfigDict, nets: Networks, w: losses.LossWeights, mesh: Mesh
) -> Callable[[TrainState, jax.Array, nnx.State | None], tuple[TrainState, Metrics]]:
    """The (unjitted) step: (state, video (B, T, H, W, 3), lpips_state) -> (state, metrics)."""
    tx_vae, tx_disc = make_optimizers(cfg)
    lr_vae = schedules.vae_schedule(cfg.optim)
    lr_disc = schedules.disc_schedule(cfg.optim, cfg.loss)
    accum = int(cfg.train.get("grad_accum_steps", 1))

    def step(state: TrainState, video: jax.Array, lpips_state: nnx.State | None):
        stats, g_grads, d_grads, metrics = _accumulate(
            nets, w, state, lpips_state, video, accum, mesh
        )
        updates, opt_vae = tx_vae.update(g_grads, state.opt_vae, state.vae_params)
        vae_params = optax.apply_updates(state.vae_params, updates)
        updates, opt_disc = tx_disc.update(d_grads, state.opt_disc, state.disc_params)
        disc_params = optax.apply_updates(state.disc_params, updates)
        metrics = dict(metrics)
        metrics.update(
            grad_norm_vae=optax.global_norm(g_grads),
            grad_norm_disc=optax.global_norm(d_grads),
            lr_vae=lr_vae(state.step),
            lr_disc=lr_disc(state.step),
        )
        metrics["finite"] = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()])).astype(
            jnp.float32
        )
        new_state = state.replace(
            step=state.step + 1,
            vae_params=vae_params,
            disc_params=disc_params,
            disc_stats=stats,
            opt_vae=opt_vae,
            opt_disc=opt_disc,
        )
        return new_state, metrics

    return step


def jit_train_step(
    cfg: ml_collections.ConfigDict,
    nets: Networks,
    w: losses.LossWeights,
    mesh: Mesh,
    state_shardings: Any,
):
    """`jax.jit` of the step with explicit in/out shardings; the state is donated."""
    lpips_shardings = None
    if nets.lpips_state is not None:
        lpips_shardings = tree_shardings(nets.lpips_state, mesh, cfg.mesh.rules)
    return jax.jit(
        train_step_fn(cfg, nets, w, mesh),
        in_shardings=(state_shardings, batch_sharding(mesh), lpips_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_reconstruct(nets: Networks, mesh: Mesh):
    """(vae_params, vae_buffers, video) -> (first clip, its reconstruction from the posterior
    mean), both replicated: (1, T, H, W, 3) each, for previews."""

    def reconstruct(params: nnx.State, buffers: nnx.State, video: jax.Array):
        clip = video[:1]
        recon = module_apply(nets.vae, params, buffers)(clip)[0]
        return clip, recon.astype(jnp.float32)

    return jax.jit(reconstruct, out_shardings=(replicated(mesh), replicated(mesh)))
