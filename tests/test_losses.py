"""The training losses against the reference `LPIPSWithDiscriminator` (golden_tiny.npz)."""

from __future__ import annotations

import golden as fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import recipe
from flax import nnx

import configs.tiny as tiny
from reducio_jax import losses
from reducio_jax.config import content_frame_index, get_default_config
from reducio_jax.convert.load import load_converted
from reducio_jax.convert.mapping import convert_state_dict, split_groups
from reducio_jax.models import build_discriminator, build_lpips, build_vae, latent_layer_norm
from reducio_jax.train.state import FAST_COMPILE
from reducio_jax.train.step import last_layer_grad_fn

GEN = ("p_loss", "rec_loss", "nll_loss", "kl_loss", "penalty_loss", "g_loss", "total_loss_ae")
DISC = ("logits_real", "logits_fake", "disc_loss")


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return fixtures.load(fixtures_dir, "golden_tiny.npz")


@pytest.fixture(scope="module")
def nets(fixtures_dir):
    cfg = tiny.get_config()
    groups = split_groups(convert_state_dict(recipe.state_dict(fixtures_dir, "tiny")))
    vae = load_converted(lambda: build_vae(cfg.model), groups["vae"], what="VAE")
    disc = load_converted(lambda: build_discriminator(cfg), groups["discriminator"], what="D")
    lpips = load_converted(build_lpips, groups["lpips"], what="LPIPS")
    logvar = float(np.asarray(groups["logvar"]["logvar"]))
    return cfg, vae, disc, lpips, logvar


@pytest.fixture(scope="module")
def results(golden, nets):
    """Both steps from one compiled function (the step is a traced argument)."""
    return {step: _losses_at(step, golden, nets) for step in (0, 20000)}


_RUN = {}


def _losses_at(step: int, golden, nets):
    cfg, vae, disc, lpips, logvar = nets
    w = losses.LossWeights.from_config(cfg.loss, logvar=logvar)
    x = jnp.asarray(recipe.video_input(golden["input_u8"]))  # (B, T, H, W, 3)
    eps = jnp.asarray(np.transpose(golden["eps"], (0, 2, 3, 4, 1)))  # NCTHW -> NTHWC
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    d_graph, d_state = nnx.split(disc)

    def disc_fn(state, video):  # training mode: batch statistics (updates are dropped)
        return nnx.merge(d_graph, state, copy=True)(video)

    def run(p, d_state, step):
        def forward(p):
            model = nnx.merge(graphdef, p, rest, copy=True)
            content = model.content_features(x[:, content_frame_index(x.shape[1])])
            posterior = model.encode(x)
            latent = latent_layer_norm(posterior.sample_with_noise(eps))
            recon, features = model.decode(latent, content, return_last_features=True)
            return (recon, posterior.kl()), features

        last_grad = last_layer_grad_fn(nnx.merge(graphdef, p, rest, copy=True))
        d_call = lambda v: (disc_fn(d_state, v), None)  # noqa: E731
        _, logs, (recon, _) = losses.generator_grads(
            forward, p, x, lpips, d_call, last_grad, step, w
        )
        real = disc_fn(d_state, x)
        fake = disc_fn(d_state, jax.lax.stop_gradient(recon))
        d_loss, d_logs = losses.discriminator_loss(real, fake, step, w)
        return logs, d_logs, d_loss, recon

    if "run" not in _RUN:
        _RUN["run"] = jax.jit(run, compiler_options=FAST_COMPILE)  # compile time dominates
    return _RUN["run"](params, d_state, jnp.asarray(step, jnp.int32))


@pytest.mark.parametrize("step", [0, 20000])
def test_golden_losses(step, golden, results):
    logs, d_logs, d_loss, recon = results[step]
    # the fixtures README's float32 reconstruction tolerance
    golden.assert_close("recon_sampled", recipe.to_ncthw(recon), 1e-3)
    for name in GEN:
        want = golden[f"gen_step{step}/{name}"]
        np.testing.assert_allclose(float(logs[name]), want, rtol=1e-4, atol=1e-7, err_msg=name)
    for name in ("d_weight", "nll_grads", "g_grads"):
        want = golden[f"gen_step{step}/{name}"]
        np.testing.assert_allclose(float(logs[name]), want, rtol=1e-3, err_msg=name)
    np.testing.assert_allclose(
        float(logs["total_loss_ae"]), golden[f"gen_loss_step{step}"], rtol=1e-4
    )
    np.testing.assert_allclose(float(logs["disc_factor"]), golden[f"gen_step{step}/disc_factor"])
    for name in DISC:
        want = golden[f"disc_step{step}/{name}"]
        np.testing.assert_allclose(float(d_logs[name]), want, rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(float(d_loss), golden[f"disc_loss_step{step}"], rtol=1e-4, atol=1e-7)


def test_penalty_and_hinge_formulas():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((2, 3, 8, 8, 3)).astype(np.float32) * 2
    w = losses.LossWeights.from_config(get_default_config().loss, penalty_radius=0.5)
    mean = r.mean(axis=(2, 3), keepdims=True)
    std = r.std(axis=(2, 3), keepdims=True, ddof=1)
    want = np.maximum(r - mean - 0.5 * std, 0).mean()
    np.testing.assert_allclose(float(losses.penalty_loss(jnp.asarray(r), w)), want, rtol=1e-5)
    real, fake = rng.standard_normal(10), rng.standard_normal(10)
    want = 0.5 * (np.maximum(1 - real, 0).mean() + np.maximum(1 + fake, 0).mean())
    np.testing.assert_allclose(
        float(losses.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake))), want, rtol=1e-6
    )


def test_lpips_pieces_keep_a_sharded_batch_on_its_devices():
    """The recomputed LPIPS pieces loop over frames: with the clips sharded over 8 devices,
    no device gathers the others' frames (a loop over the batch axis would), and the values
    are those of all frames at once."""
    from jax.sharding import NamedSharding, PartitionSpec

    from reducio_jax.models.convolution import traced_for

    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(build_lpips(seed=1))
    lpips_fn = lambda a, b: nnx.merge(graphdef, state, copy=True)(a, b)  # noqa: E731
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    clips = NamedSharding(mesh, PartitionSpec("data"))
    scalar = NamedSharding(mesh, PartitionSpec())
    x, r = (
        jax.device_put(jax.random.uniform(jax.random.key(i), (8, 3, 16, 16, 3), minval=-1), clips)
        for i in (1, 2)
    )

    def loss(r, chunk):
        return jnp.sum(losses.perceptual_per_frame(lpips_fn, x, r, chunk))

    with traced_for("tpu"):
        grad = jax.jit(jax.value_and_grad(loss), static_argnums=1, out_shardings=(scalar, clips))
        compiled = grad.lower(r, 1).compile()
        (value, d_r), (whole, d_whole) = compiled(r), grad(r, 0)
    assert "all-gather" not in compiled.as_text()
    np.testing.assert_allclose(value, whole, rtol=1e-5)
    np.testing.assert_allclose(d_r, d_whole, rtol=1e-4, atol=1e-6)
