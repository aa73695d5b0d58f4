"""Gradient accumulation: 2 micro-batches of 1 give the generator gradients of 1 batch of 2.

Exact before `disc_start` (the GAN term has weight 0): the L1, KL and penalty terms are
per-clip means and each clip's posterior noise depends only on its clip id. After
`disc_start` the discriminator's BatchNorm sees micro-batch statistics, so the GAN gradients
differ by design (docs/training.md).
"""

from __future__ import annotations

import jax
import numpy as np

from reducio_jax import losses
from reducio_jax import sharding as sh
from reducio_jax.train import state as st
from reducio_jax.train.step import _accumulate


def test_two_micro_batches_equal_one_batch():
    import micro_config

    cfg = micro_config.get_config()
    cfg.model.dtype = "float32"  # bf16 rounding would depend on the batch size
    mesh = sh.make_mesh(cfg.mesh, jax.devices()[:1])
    state = st.init_state(cfg, mesh)
    vae_graph, disc_graph = st.graphdefs(cfg)
    nets = st.Networks(vae_graph, disc_graph, None, None)
    w = losses.LossWeights.from_config(cfg.loss, perceptual_weight=0.0)
    rng = np.random.default_rng(1)
    video = rng.uniform(-1, 1, (2, cfg.data.num_frames, 32, 32, 3)).astype(np.float32)
    batch = {"video": video, "index": np.array([5, 9], np.int32)}

    def grads(accum: int):
        fn = jax.jit(lambda s, v: _accumulate(nets, w, s, None, v, accum, mesh)[1:],
                     compiler_options=st.FAST_COMPILE)  # fmt: skip
        return fn(state, batch)

    g1, _, m1 = grads(1)
    g2, _, m2 = grads(2)
    for name in ("l1", "kl_loss", "penalty_loss", "nll_loss"):
        np.testing.assert_allclose(float(m2[name]), float(m1[name]), rtol=1e-5, err_msg=name)
    flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(flat1) == len(flat2) > 100
    scale = max(float(np.abs(np.asarray(a)).max()) for a in flat1)
    for a, b in zip(flat1, flat2, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale)
