"""Parity with the official PyTorch Reducio-VAE: every golden array of the fixtures.

Checkpoints are rebuilt from the fixtures' weight recipe, written as released-layout files and
converted through the public API; tolerances are the fixtures README's.
"""

from __future__ import annotations

import golden as fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import recipe
from flax import nnx
from helpers import max_err, recipe_checkpoint

from configs import reducio_ft2, reducio_ft4, tiny
from reducio_jax import ReducioVAE
from reducio_jax.models import latent_layer_norm

LATENT_TOL = 1e-4  # mean, logvar, latent
RECON_TOL = 1e-3  # float32 reconstructions
F16_TOL = 1e-2  # arrays stored as float16


@pytest.fixture(scope="module")
def tiny_ckpt(fixtures_dir, tmp_path_factory):
    return recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def tiny_vae(tiny_ckpt):
    return ReducioVAE.from_torch_checkpoint(tiny_ckpt, tiny.get_config())


@pytest.fixture(scope="module")
def golden_tiny(fixtures_dir):
    return fixtures.load(fixtures_dir, "golden_tiny.npz")


@pytest.fixture(scope="module")
def tiny_outputs(tiny_vae, golden_tiny):
    """All intermediate outputs of the tiny model on the fixture input, in one compiled call."""
    video = jnp.asarray(recipe.video_input(golden_tiny["input_u8"]))
    eps = jnp.asarray(np.transpose(golden_tiny["eps"], (0, 2, 3, 4, 1)))

    @nnx.jit
    def run(model, video, eps):
        content = model.content_features(video[:, (video.shape[1] - 1) // 2])
        posterior = model.encode(video)
        latent = latent_layer_norm(posterior.mode())
        latent_sampled = latent_layer_norm(posterior.sample_with_noise(eps))
        return {
            "content": content,
            "enc3d_out": model.encoder_3d(video),
            "mean": posterior.mean,
            "logvar": posterior.logvar,
            "latent": latent,
            "recon": model.decode(latent, content),
            "latent_sampled": latent_sampled,
            "recon_sampled": model.decode(latent_sampled, content),
        }

    return jax.device_get(run(tiny_vae.model, video, eps))


@pytest.mark.parametrize("level", range(5))
def test_tiny_content_features(tiny_outputs, golden_tiny, level):
    ours = np.transpose(tiny_outputs["content"][level], (0, 3, 1, 2))  # NHWC -> NCHW
    golden_tiny.assert_close(f"content_{level}", ours, LATENT_TOL)


@pytest.mark.parametrize(
    "name, tol",
    [
        ("enc3d_out", LATENT_TOL),
        ("mean", LATENT_TOL),
        ("logvar", LATENT_TOL),
        ("latent", LATENT_TOL),
        ("latent_sampled", LATENT_TOL),
        ("recon", RECON_TOL),
        ("recon_sampled", RECON_TOL),
    ],
)
def test_tiny_forward(tiny_outputs, golden_tiny, name, tol):
    golden_tiny.assert_close(name, recipe.to_ncthw(tiny_outputs[name]), tol)


def test_public_api_matches_golden(tiny_vae, golden_tiny):
    video = jnp.asarray(recipe.video_input(golden_tiny["input_u8"]))
    posterior = tiny_vae.encode(video)
    latent = tiny_vae.latent(posterior)
    recon = tiny_vae.decode(latent, video[:, 7])
    golden_tiny.assert_close("latent", recipe.to_ncthw(latent), LATENT_TOL)
    golden_tiny.assert_close("recon", recipe.to_ncthw(recon), RECON_TOL)
    assert max_err(tiny_vae.reconstruct(video), recon) < 1e-5


def test_tiny_discriminator_logits(tiny_vae, golden_tiny):
    disc = tiny_vae.weights.discriminator
    disc.eval()
    video = jnp.asarray(recipe.video_input(golden_tiny["input_u8"]))
    logits = recipe.to_ncthw(disc(video))
    golden_tiny.assert_close("disc_logits", logits, LATENT_TOL)


def _check_video_fixture(vae, golden, f16: bool):
    video = jnp.asarray(recipe.video_input(golden["input_u8"]))
    posterior = vae.encode(video)
    latent = vae.latent(posterior)
    recon = vae.decode(latent, video[:, (video.shape[1] - 1) // 2])
    for name, ours in (("mean", posterior.mean), ("logvar", posterior.logvar), ("latent", latent)):
        golden.assert_close(name, recipe.to_ncthw(ours), LATENT_TOL)
    key, tol = ("recon_f16", F16_TOL) if f16 else ("recon", RECON_TOL)
    golden.assert_close(key, recipe.to_ncthw(recon), tol)


def test_tiny_256px(tiny_vae, fixtures_dir):
    _check_video_fixture(tiny_vae, fixtures.load(fixtures_dir, "golden_tiny_256px.npz"), f16=True)


def test_tiny_tiled_256px(tiny_ckpt, fixtures_dir):
    golden = fixtures.load(fixtures_dir, "golden_tiny_tiled.npz")
    cfg = tiny.get_config()
    cfg.model.use_tiling = True
    cfg.model.tile_sample_min_size = int(golden["tile_sample_min_size"])
    cfg.model.tile_overlap_factor = float(golden["tile_overlap_factor"])
    vae = ReducioVAE.from_torch_checkpoint(tiny_ckpt, cfg)
    assert vae.tiles is not None and vae.tiles.applies_to(256)
    _check_video_fixture(vae, golden, f16=True)


@pytest.mark.parametrize(
    "name, config",
    [
        ("reducio_kl_ft4_fs32_z16_attn23", reducio_ft4),
        ("reducio_kl_ft2_fs32_z16_attn23", reducio_ft2),
    ],
)
def test_full_size_models_64px(fixtures_dir, tmp_path, name, config):
    ckpt = recipe_checkpoint(fixtures_dir, name, tmp_path / f"{name}.ckpt")
    vae = ReducioVAE.from_torch_checkpoint(ckpt, config.get_config())
    # Every key of the released manifest was consumed (conversion is strict) and the loss parts
    # came along.
    assert vae.weights.discriminator is not None and vae.weights.lpips is not None
    _check_video_fixture(vae, fixtures.load(fixtures_dir, f"golden_{name}_64px.npz"), f16=False)


def test_lpips(tiny_vae, fixtures_dir):
    golden = fixtures.load(fixtures_dir, "golden_lpips.npz")
    to_input = lambda u8: jnp.asarray(np.transpose(u8, (0, 2, 3, 1)).astype(np.float32) / 127.5 - 1)  # noqa: E731
    ours = tiny_vae.weights.lpips(to_input(golden["a_u8"]), to_input(golden["b_u8"]))
    assert max_err(ours, golden["lpips"].reshape(-1)) < LATENT_TOL
