"""The memory forms of training change no value: nested remat (levels, then blocks) against no
remat, and LPIPS in recomputed pieces against all frames at once, traced for a TPU (the forms
the `compile` command sizes) and run here on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reducio_jax import losses
from reducio_jax.config import load_config
from reducio_jax.models import build_lpips, build_vae, layers
from reducio_jax.models.convolution import traced_for

MICRO = "tests/train/micro_config.py"


def _vae(remat: bool, res_blocks: int = 1):
    cfg = load_config(MICRO)
    cfg.model.dtype = "float32"
    cfg.model.remat = remat
    for ddconfig in (cfg.model.ddconfig, cfg.model.ddconfig_2d):
        ddconfig.num_res_blocks = res_blocks
    with nnx.use_eager_sharding(False):
        return build_vae(cfg.model, seed=3)


def _loss_and_grads(vae, video):
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)

    def loss(p):
        recon = nnx.merge(graphdef, p, rest, copy=True)(video)[0]
        return jnp.sum(jnp.sin(3.0 * recon))

    with traced_for("tpu"):
        return jax.jit(jax.value_and_grad(loss))(params)


def test_nested_remat_changes_no_value_or_gradient():
    video = jax.random.uniform(jax.random.key(0), (2, 4, 32, 32, 3), minval=-1, maxval=1)
    plain, plain_grads = _loss_and_grads(_vae(False), video)
    remat, remat_grads = _loss_and_grads(_vae(True), video)
    np.testing.assert_allclose(remat, plain, rtol=1e-5)
    flat = jax.tree.leaves(plain_grads)
    assert len(flat) == len(jax.tree.leaves(remat_grads))
    for got, want in zip(jax.tree.leaves(remat_grads), flat, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))) + 1e-7)


def test_identical_blocks_in_one_loop_change_no_value_or_gradient(monkeypatch):
    """In a GPU/TPU program a level's identical res-blocks run as one loop (`layers.run_blocks`):
    the program holds one copy of them, and the values and gradients are those of the blocks
    one after another (traced for a TPU, run here)."""
    video = jax.random.uniform(jax.random.key(0), (2, 4, 32, 32, 3), minval=-1, maxval=1)
    results, convolutions = {}, {}
    for scan in (False, True):
        monkeypatch.setattr(layers, "SCAN_BLOCKS", scan)
        vae = _vae(True, res_blocks=2)
        graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
        apply = lambda p, g=graphdef, r=rest: nnx.merge(g, p, r, copy=True)(video)[0]  # noqa: E731
        with traced_for("tpu"):
            convolutions[scan] = jax.jit(apply).lower(params).as_text().count("convolution(")
        results[scan] = _loss_and_grads(vae, video)
    assert convolutions[True] < convolutions[False]
    (plain, plain_grads), (looped, looped_grads) = results[False], results[True]
    np.testing.assert_allclose(looped, plain, rtol=1e-5)
    # Fused differently, so rounded differently: gradients that are zero but for rounding (a
    # bias before a GroupNorm) differ at 1e-6; compared at the scale of all the gradients.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads))
    for got, want in zip(jax.tree.leaves(looped_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_lpips_in_recomputed_pieces_matches_all_frames_at_once():
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(build_lpips(seed=1))
    lpips_fn = lambda a, b: nnx.merge(graphdef, state, copy=True)(a, b)  # noqa: E731
    x, r = (jax.random.uniform(jax.random.key(i), (2, 5, 32, 32, 3), minval=-1) for i in (1, 2))

    def per_frame(chunk):
        fn = lambda r: losses.perceptual_per_frame(lpips_fn, x, r, chunk)  # noqa: E731
        with traced_for("tpu"):
            value, pull = jax.vjp(jax.jit(fn), r)
            return value, pull(jnp.cos(value))[0]

    whole, d_whole = per_frame(0)
    pieces, d_pieces = per_frame(2)  # 5 frames a clip: pieces of 2, the last one padded
    assert whole.shape == (2, 5)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d_pieces, d_whole, rtol=1e-4, atol=1e-6)
