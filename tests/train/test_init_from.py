"""Fine-tuning starts: --init_from a released torch checkpoint or a converted Orbax directory,
and --lpips_weights from a torch file."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from helpers import recipe_checkpoint

import configs.tiny as tiny
from reducio_jax import sharding as sh
from reducio_jax.convert.pretrained import ReducioWeights, save_pretrained
from reducio_jax.models import build_discriminator, build_vae
from reducio_jax.storage.checkpoints import DISCRIMINATOR, VAE, RunCheckpoints
from reducio_jax.train import run
from reducio_jax.train.weights import load_init_weights, load_lpips_weights


def test_torch_checkpoint_gives_all_parts(fixtures_dir, tmp_path):
    ckpt = recipe_checkpoint(fixtures_dir, "tiny", tmp_path / "tiny.ckpt")
    cfg = tiny.get_config()
    mesh = sh.make_mesh(cfg.mesh, jax.devices()[:2])
    weights = load_init_weights(str(ckpt), cfg, mesh)
    assert weights.discriminator is not None and weights.lpips is not None
    assert weights.logvar == 0.0
    kernel = weights.vae.decoder.conv_in.kernel[...]
    assert kernel.sharding.mesh == mesh  # placed straight into the training mesh
    lpips = load_lpips_weights(str(ckpt), cfg, mesh)
    np.testing.assert_array_equal(
        np.asarray(lpips.lins[0].kernel[...]), np.asarray(weights.lpips.lins[0].kernel[...])
    )


def test_orbax_directory_starts_the_run(tmp_path):
    import micro_config

    cfg = micro_config.get_config()
    cfg.train.num_steps = 0  # set-up and the exit checkpoint only
    with nnx.use_eager_sharding(False):
        vae, disc = build_vae(cfg.model, seed=5), build_discriminator(cfg, seed=6)
    save_pretrained(ReducioWeights(vae=vae, discriminator=disc, logvar=0.0), tmp_path / "pre", cfg)
    result = run(cfg, tmp_path / "run", init_from=str(tmp_path / "pre"), progress=False,
                 devices=jax.devices()[:2])  # fmt: skip
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "0"
    ckpt = RunCheckpoints(tmp_path / "run" / "checkpoints", keep=1)
    items = {name: ocp.args.StandardRestore() for name in (VAE, DISCRIMINATOR)}
    saved = ckpt.manager.restore(0, args=ocp.args.Composite(**items))
    ckpt.close()
    got = saved[VAE]["decoder"]["conv_in"]["kernel"]["value"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(vae.decoder.conv_in.kernel[...]))
    got = saved[DISCRIMINATOR]["norms"]["0"]["var"]["value"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(disc.norms[0].var[...]))
