"""The one checkpoint layout: a training step is a pretrained directory (LPIPS and config
included) that restores into the training shardings, and a pretrained directory of the earlier
layout is refused in one line."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from reducio_jax import ReducioVAE
from reducio_jax.convert.mapping import ConversionError
from reducio_jax.convert.pretrained import load_pretrained
from reducio_jax.models import build_vae
from reducio_jax.sharding import make_mesh
from reducio_jax.storage import checkpoints
from reducio_jax.train.checkpoint import restore_step, save_step
from reducio_jax.train.errors import TrainingError
from reducio_jax.train.state import init_state, make_lpips, state_shardings
from reducio_jax.train.weights import load_init_weights


def _assert_equal_trees(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_is_a_pretrained_directory(micro, tmp_path):
    mesh = make_mesh(micro.mesh, jax.devices()[:2])
    state = init_state(micro, mesh)
    with nnx.use_eager_sharding(False):
        lpips = nnx.state(make_lpips(micro))
    ckpt = checkpoints.RunCheckpoints(tmp_path / "checkpoints", keep=2, async_save=False)
    config = checkpoints.config_item(micro, logvar=0.5)
    save_step(ckpt, 3, state, config=config, lpips_state=lpips, data_state=None)
    restored, restored_lpips = restore_step(ckpt, 3, micro, mesh, iterator=None)
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "3"
    assert checkpoints.items_in(step_dir) == {
        "vae",
        "discriminator",
        "lpips",
        "config",
        "optimizer",
    }
    _assert_equal_trees(restored, state)
    _assert_equal_trees(restored_lpips, lpips)
    want = jax.tree.leaves(state_shardings(micro, mesh))
    assert [x.sharding for x in jax.tree.leaves(restored)] == want  # straight into the shards
    # the step read as a pretrained directory, on one device
    weights = load_pretrained(step_dir)
    assert weights.logvar == 0.5
    _assert_equal_trees(nnx.state(weights.vae, nnx.Param), state.vae_params)
    _assert_equal_trees(nnx.state(weights.discriminator, nnx.BatchStat), state.disc_stats)
    _assert_equal_trees(nnx.state(weights.lpips), lpips)
    vae = ReducioVAE.from_pretrained(step_dir)
    assert vae.config.model.to_dict() == micro.model.to_dict()


def test_earlier_pretrained_layout_is_refused_in_one_line(micro, tmp_path):
    """A directory as the converter wrote it before (plain Orbax calls: pure-dict items, a
    config item without `format`)."""
    with nnx.use_eager_sharding(False):
        vae = build_vae(micro.model)
    old = (tmp_path / "old").absolute()
    items = {
        "vae": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(vae))),
        "config": ocp.args.JsonSave(
            {"config": json.loads(micro.to_json_best_effort()), "logvar": 0.0}
        ),
    }
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(old, ocp.args.Composite(**items))
    mesh = make_mesh(micro.mesh, jax.devices()[:1])
    loaders = {
        "load_pretrained": load_pretrained,
        "from_pretrained": ReducioVAE.from_pretrained,
        "--init_from": lambda path: load_init_weights(str(path), micro, mesh),
    }
    for name, load in loaders.items():
        with pytest.raises((ConversionError, TrainingError)) as info:
            load(old)
        message = str(info.value)
        assert "\n" not in message, name
        assert "re-convert it with convert_torch_weights.py" in message, name
