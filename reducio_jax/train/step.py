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
from reducio_jax.config import frame_size
from reducio_jax.models import content_frame_index, latent_layer_norm
from reducio_jax.models.convolution import target_platform, traced_for
from reducio_jax.programs import allocator
from reducio_jax.sharding import batch_sharding, replicated, tree_shardings, video_sharding
from reducio_jax.train import schedules
from reducio_jax.train.state import (
    FAST_COMPILE,
    Networks,
    TrainState,
    make_optimizers,
    module_apply,
)

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]  # {"video": (B, T, H, W, 3) float32, "index": (B,) int32}


def batch_shardings(mesh: Mesh) -> dict[str, Any]:
    return {"video": video_sharding(mesh), "index": batch_sharding(mesh)}


def batch_spec(data_cfg: Any, mesh: Mesh) -> Batch:
    """ShapeDtypeStructs of one global batch of `data_cfg` (for lowering the step)."""
    h, w = frame_size(data_cfg.resolution)
    b, t = int(data_cfg.batch_size), int(data_cfg.num_frames)
    shard = batch_sharding(mesh)
    return {
        "video": jax.ShapeDtypeStruct((b, t, h, w, 3), jnp.float32, sharding=video_sharding(mesh)),
        "index": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shard),
    }


def last_layer_grad_fn(vae: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(features (b, T', H, W, C), d_recon (b, T, H, W, 3)) -> gradient of the decoder's last
    conv kernel; the VAE drops the first T' - T frames (temporal padding) after that conv."""
    graph, params, rest = nnx.split(vae.decoder.conv_out, nnx.Param, ...)

    def grad(features: jax.Array, d_recon: jax.Array) -> jax.Array:
        def apply(kernel: jax.Array) -> jax.Array:
            conv = nnx.merge(graph, params, rest, copy=True)
            conv.kernel = nnx.Param(kernel)
            out = conv(features)
            return out[:, out.shape[1] - d_recon.shape[1] :]

        kernel = params["kernel"][...]
        _, pull = jax.vjp(apply, kernel)
        return pull(d_recon.astype(features.dtype))[0]

    return grad


def reconstruct_sampled(
    vae: Any, x: jax.Array, key: jax.Array, sample_ids: jax.Array
) -> tuple[jax.Array, Any, jax.Array]:
    """VAE forward with a posterior sample whose noise depends only on (step key, clip id):
    micro-batching, batch order, sharding and the process count do not change the sample.
    Returns (recon, posterior, input of the decoder's last conv)."""
    content = vae.content_features(x[:, content_frame_index(x.shape[1])])
    posterior = vae.encode(x)  # mean, logvar: (b, t, h, w, z)
    shape = posterior.mean.shape[1:]
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(sample_ids)
    latent = latent_layer_norm(posterior.sample_with_noise(eps.astype(posterior.mean.dtype)))
    recon, features = vae.decode(latent, content, return_last_features=True)
    return recon, posterior, features


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
    sample_ids: jax.Array,
) -> tuple[nnx.State, Any, Any, Metrics]:
    """Gradients of both networks on one (micro-)batch x (b, T, H, W, 3)."""
    lpips_fn = None
    if nets.lpips is not None:
        lpips_fn = lambda a, b: module_apply(nets.lpips, lpips_state)(a, b)  # noqa: E731

    def forward(vae_params: nnx.State):
        vae = module_apply(nets.vae, vae_params, state.vae_buffers)
        recon, posterior, features = reconstruct_sampled(vae, x, key, sample_ids)
        return (recon, posterior.kl()), features  # recon: (b, T, H, W, 3)

    def disc_fn(video: jax.Array):
        return _disc_call(nets.disc, state.disc_params, disc_stats, video)

    last_grad = last_layer_grad_fn(module_apply(nets.vae, state.vae_params, state.vae_buffers))
    g_grads, logs, (recon, stats) = losses.generator_grads(
        forward, state.vae_params, x, lpips_fn, disc_fn, last_grad, state.step, w
    )
    fake_input = jax.lax.stop_gradient(recon)

    def disc_loss(disc_params: nnx.State):
        real, s = _disc_call(nets.disc, disc_params, stats, x)
        fake, s = _disc_call(nets.disc, disc_params, s, fake_input)
        loss, d_logs = losses.discriminator_loss(real, fake, state.step, w)
        return loss, (d_logs, s)

    (_, (d_logs, stats)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(state.disc_params)
    metrics = {**logs, **d_logs, "l1": logs["rec_loss"] - logs["p_loss"]}
    return stats, g_grads, d_grads, metrics


def _accumulate(
    nets: Networks,
    w: losses.LossWeights,
    state: TrainState,
    lpips_state: nnx.State | None,
    batch: Batch,
    accum: int,
    mesh: Mesh,
) -> tuple[nnx.State, Any, Any, Metrics]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    video, ids = batch["video"], batch["index"]  # (B, T, H, W, 3), (B,)
    if accum == 1:
        return _micro_step(nets, w, state, lpips_state, state.disc_stats, video, key, ids)
    b = video.shape[0]

    def micro(a: jax.Array) -> jax.Array:
        # strided micro-batches: micro-batch i holds rows i, i + A, ... (devices keep their rows)
        a = jnp.swapaxes(a.reshape(b // accum, accum, *a.shape[1:]), 0, 1)
        shard = video_sharding if a.ndim == 6 else batch_sharding
        return jax.lax.with_sharding_constraint(a, shard(mesh, extra_dims=1))

    xs, id_s = micro(video), micro(ids)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731

    def body(carry, inputs):
        stats, g_sum, d_sum = carry
        x, ids = inputs
        stats, g, d, metrics = _micro_step(nets, w, state, lpips_state, stats, x, key, ids)
        g_sum = jax.tree.map(jnp.add, g_sum, g)
        d_sum = jax.tree.map(jnp.add, d_sum, d)
        return (stats, g_sum, d_sum), metrics

    init = (state.disc_stats, zeros(state.vae_params), zeros(state.disc_params))
    # XLA:CPU runs convolutions inside a while loop 4x (30x without LLVM optimisation) slower
    # than unrolled (measured on the tiny model): unroll there; keep the loop on accelerators,
    # where it compiles once for any number of micro-batches.
    unroll = accum if target_platform() == "cpu" else 1
    (stats, g_sum, d_sum), metrics = jax.lax.scan(body, init, (xs, id_s), unroll=unroll)
    mean = lambda t: jax.tree.map(lambda a: a / accum, t)  # noqa: E731
    return stats, mean(g_sum), mean(d_sum), jax.tree.map(jnp.mean, metrics)


def train_step_fn(
    cfg: ml_collections.ConfigDict, nets: Networks, w: losses.LossWeights, mesh: Mesh
) -> Callable[[TrainState, jax.Array, nnx.State | None], tuple[TrainState, Metrics]]:
    """The (unjitted) step: (state, batch, lpips_state) -> (state, metrics).

    batch: {"video": (B, T, H, W, 3) float32 in [-1, 1], "index": (B,) int32 clip ids (the
    record index from the data loader; it keys each clip's posterior noise)}."""
    tx_vae, tx_disc = make_optimizers(cfg)
    lr_vae = schedules.vae_schedule(cfg.optim)
    lr_disc = schedules.disc_schedule(cfg.optim, cfg.loss)
    accum = int(cfg.train.grad_accum_steps)

    platform = mesh.devices.flat[0].platform  # the forms of the devices it runs on

    def step(state: TrainState, batch: Batch, lpips_state: nnx.State | None):
        # the layers' sharding constraints (models/constraints.py) follow this mesh and rules
        with (
            traced_for(platform),
            jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
            nnx.logical_axis_rules(cfg.mesh.rules),
        ):
            stats, g_grads, d_grads, metrics = _accumulate(
                nets, w, state, lpips_state, batch, accum, mesh
            )
        updates, opt_vae = tx_vae.update(g_grads, state.opt_vae, state.vae_params)
        vae_params = optax.apply_updates(state.vae_params, updates)
        updates, opt_disc = tx_disc.update(d_grads, state.opt_disc, state.disc_params)
        disc_params = optax.apply_updates(state.disc_params, updates)
        metrics = dict(metrics)
        metrics.update(
            grad_norm_vae=optax.tree.norm(g_grads),
            grad_norm_disc=optax.tree.norm(d_grads),
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
    if mesh.devices.flat[0].platform == "cpu":
        allocator.reuse_freed_memory()  # once: the CPU programs' buffers (allocator.py)
    lpips_shardings = None
    if nets.lpips_state is not None:
        lpips_shardings = tree_shardings(nets.lpips_state, mesh, cfg.mesh.rules)
    return jax.jit(
        train_step_fn(cfg, nets, w, mesh),
        in_shardings=(state_shardings, batch_shardings(mesh), lpips_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_first_clip(mesh: Mesh):
    """(B, T, H, W, 3) sharded batch -> its first clip (1, T, H, W, 3), replicated."""
    return jax.jit(lambda video: video[:1], out_shardings=replicated(mesh))


def jit_reconstruct(nets: Networks, mesh: Mesh):
    """(vae_params, vae_buffers, clip (1, T, H, W, 3)) -> its reconstruction from the posterior
    mean, float32, replicated (for previews)."""

    def reconstruct(params: nnx.State, buffers: nnx.State, clip: jax.Array) -> jax.Array:
        return module_apply(nets.vae, params, buffers)(clip)[0].astype(jnp.float32)

    return jax.jit(
        reconstruct,
        out_shardings=replicated(mesh),
        compiler_options=FAST_COMPILE,  # runs rarely
    )
