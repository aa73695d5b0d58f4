"""The training step's generator gradients equal the plain autodiff gradients of the loss.

`losses.generator_grads` differentiates the loss heads (discriminator, penalty, L1) with
respect to the reconstruction and runs one VAE backward on their weighted sum. Here the same
total loss is written out directly, with the adaptive weight computed as the reference does
(gradients of nll and g with respect to the decoder's last conv kernel), and differentiated
with `jax.grad` through the whole VAE. After `disc_start`, so the GAN term and the adaptive
weight count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from reducio_jax import losses
from reducio_jax import sharding as sh
from reducio_jax.train import state as st
from reducio_jax.train.step import _accumulate, reconstruct_sampled


def test_one_backward_equals_autodiff_of_the_total_loss():
    import micro_config

    cfg = micro_config.get_config()
    cfg.model.dtype = "float32"
    mesh = sh.make_mesh(cfg.mesh, jax.devices()[:1])
    state = st.init_state(cfg, mesh)
    w = losses.LossWeights.from_config(cfg.loss, perceptual_weight=0.0)
    state = state.replace(step=jnp.asarray(w.disc_start + 7, state.step.dtype))
    vae_graph, disc_graph = st.graphdefs(cfg)
    nets = st.Networks(vae_graph, disc_graph, None, None)
    rng = np.random.default_rng(3)
    video = rng.uniform(-1, 1, (2, cfg.data.num_frames, 32, 32, 3)).astype(np.float32)
    ids = np.array([4, 11], np.int32)

    def step_grads(s):
        _, grads, _, metrics = _accumulate(
            nets, w, s, None, {"video": video, "index": ids}, 1, mesh
        )
        return grads, metrics

    def parts(params, s):
        """(nll, kl, g, penalty) of the VAE with `params`, the discriminator in training mode."""
        key = jax.random.fold_in(jax.random.wrap_key_data(s.rng), s.step)
        vae = st.module_apply(nets.vae, params, s.vae_buffers)
        recon, posterior, _ = reconstruct_sampled(vae, video, key, ids)
        logits = st.module_apply(nets.disc, s.disc_params, s.disc_stats)(recon)
        nll = losses.reconstruction_terms(video, recon, None, w)[0]
        return nll, jnp.mean(posterior.kl()), -jnp.mean(logits), losses.penalty_loss(recon, w)

    def direct_grads(s):
        last = lambda g: g["decoder"]["conv_out"]["kernel"][...]  # noqa: E731
        nll_grad = last(jax.grad(lambda p: parts(p, s)[0])(s.vae_params))
        g_grad = last(jax.grad(lambda p: parts(p, s)[2])(s.vae_params))
        ratio = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
        d_weight = jnp.clip(ratio, 0.0, 1e4) * w.disc_weight
        factor = losses.disc_factor_at(s.step, w)

        def total(p):
            nll, kl, g, pen = parts(p, s)
            return w.rec_weight * nll + w.kl_weight * kl + d_weight * factor * g + pen

        return jax.grad(total)(s.vae_params), d_weight

    got, metrics = jax.jit(step_grads, compiler_options=st.FAST_COMPILE)(state)
    want, d_weight = jax.jit(direct_grads, compiler_options=st.FAST_COMPILE)(state)
    assert float(metrics["disc_factor"]) == 1.0 and float(d_weight) > 0
    np.testing.assert_allclose(float(metrics["d_weight"]), float(d_weight), rtol=1e-4)
    flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want) > 100
    scale = max(float(np.abs(np.asarray(a)).max()) for a in flat_want)
    for a, b in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
