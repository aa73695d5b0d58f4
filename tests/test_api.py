"""The public API: shapes, jit, batch sizes, non-square frames, bf16, sharded loading, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_err, recipe_checkpoint
from jax.sharding import NamedSharding, PartitionSpec

from configs import tiny
from reducio_jax import ReducioVAE
from reducio_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def ckpt(fixtures_dir, tmp_path_factory):
    return recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("api") / "tiny.ckpt")


@pytest.fixture(scope="module")
def vae(ckpt):
    return ReducioVAE.from_torch_checkpoint(ckpt, tiny.get_config())


def _video(batch: int, height: int, width: int, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, (batch, 16, height, width, 3)).astype(np.float32))


def test_shapes_non_square_and_batch(vae):
    video = _video(3, 32, 64)
    posterior = vae.encode(video)
    assert posterior.mean.shape == posterior.logvar.shape == (3, 4, 1, 2, 16)
    latent = vae.latent(posterior)
    recon = vae.decode(latent, video[:, 7])
    assert recon.shape == video.shape and recon.dtype == jnp.float32
    # Per-clip independence: clip 1 alone gives the same reconstruction as inside the batch.
    alone = vae.reconstruct(video[1:2])
    assert max_err(alone[0], recon[1]) < 1e-4


def test_latent_is_layer_normed_and_sampling_uses_rng(vae):
    posterior = vae.encode(_video(2, 32, 32))
    mode = np.asarray(vae.latent(posterior))
    assert np.allclose(mode.reshape(2, -1).mean(1), 0, atol=1e-5)
    assert np.allclose(mode.reshape(2, -1).std(1), 1, atol=1e-3)
    a = vae.latent(posterior, jax.random.key(1))
    b = vae.latent(posterior, jax.random.key(1))
    c = vae.latent(posterior, jax.random.key(2))
    assert max_err(a, b) == 0.0 and max_err(a, c) > 1e-3 and max_err(a, mode) > 1e-3


def test_methods_run_under_user_jit(vae):
    video = _video(1, 32, 32)
    eager = vae.reconstruct(video)
    jitted = jax.jit(lambda v: vae.decode(vae.latent(vae.encode(v)), v[:, 7]))(video)
    assert max_err(eager, jitted) < 1e-5


def test_bfloat16_compute_tracks_float32(ckpt, vae):
    cfg = tiny.get_config()
    cfg.model.dtype = "bfloat16"
    vae_bf16 = ReducioVAE.from_torch_checkpoint(ckpt, cfg)
    video = _video(1, 32, 32)
    ref, ours = (
        np.asarray(vae.reconstruct(video)),
        np.asarray(vae_bf16.reconstruct(video), np.float32),
    )
    assert vae_bf16.model.decoder.conv_out.kernel[...].dtype == jnp.float32  # params stay float32
    assert np.isfinite(ours).all()
    assert np.mean(np.abs(ours - ref)) / np.mean(np.abs(ref)) < 0.05


def test_sharded_loading_matches_single_device(ckpt, vae):
    mesh = make_mesh({"data": 2, "fsdp": 4})
    sharded = ReducioVAE.from_torch_checkpoint(ckpt, tiny.get_config(), mesh=mesh)
    kernel = sharded.model.decoder.up[2].block_1[0].conv1.kernel[...]  # (3, 3, 3, 128, 64)
    assert kernel.sharding.spec == PartitionSpec(None, None, None, None, "fsdp")
    video = jax.device_put(_video(2, 32, 32), NamedSharding(mesh, PartitionSpec("data")))
    assert max_err(sharded.reconstruct(video), vae.reconstruct(np.asarray(video))) < 1e-4


def test_save_and_load_pretrained(tmp_path, vae):
    vae.save_pretrained(tmp_path / "pre")
    again = ReducioVAE.from_pretrained(tmp_path / "pre")
    video = _video(1, 32, 32)
    assert max_err(again.reconstruct(video), vae.reconstruct(video)) == 0.0


@pytest.mark.parametrize(
    "shape, match",
    [((1, 16, 32, 32), r"\(B, T, H, W, 3\)"), ((1, 16, 40, 32, 3), "multiple of 32")],
)
def test_bad_video_shapes(vae, shape, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(jnp.zeros(shape))


def test_wrong_number_of_frames(vae):
    posterior = vae.encode(_video(1, 32, 32)[:, :8])
    with pytest.raises(ValueError, match="temp_res"):
        vae.decode(vae.latent(posterior), jnp.zeros((1, 32, 32, 3)))
