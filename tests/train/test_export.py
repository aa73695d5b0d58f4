"""`python -m reducio_jax export`: a training run's checkpoint becomes a pretrained directory
that `ReducioVAE.from_pretrained` (and so eval.py / encode) reads, with the trained values."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from reducio_jax import ReducioVAE
from reducio_jax.__main__ import main
from reducio_jax.convert.pretrained import load_pretrained
from reducio_jax.runs.runtime import InputError, resolve_config
from reducio_jax.storage import checkpoints
from reducio_jax.train.errors import TrainingError
from reducio_jax.train.export import export_run


def _by_path(*states) -> dict[str, np.ndarray]:
    """path -> array of nnx States (the key order of a State is not part of the contract)."""
    flat = {}
    for state in states:
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return flat


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) and len(want) > 10
    for path, value in want.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_export_holds_the_trained_networks(eight_device_run, tmp_path):
    trainer, result, _ = eight_device_run
    out = tmp_path / "exported"
    summary = export_run(trainer.workdir, out)
    assert summary["step"] == result.end_step == 2
    assert summary["parts"] == ["discriminator", "vae"]  # the run had no LPIPS weights
    assert checkpoints.items_in(out) == {"vae", "discriminator", "config"}  # a copy of those
    side = [p.name for p in trainer.workdir.iterdir() if p.name in ("run_meta.json", "lpips")]
    assert side == []  # the run keeps everything in its steps
    vae = ReducioVAE.from_pretrained(out)
    assert vae.config.model.to_dict() == trainer.cfg.model.to_dict()
    state = trainer.state
    _assert_same(_by_path(nnx.state(vae.model, nnx.Param)), _by_path(state.vae_params))
    disc = load_pretrained(out, parts=("vae", "discriminator")).discriminator
    _assert_same(
        _by_path(nnx.state(disc, nnx.Param), nnx.state(disc, nnx.BatchStat)),
        _by_path(state.disc_params, state.disc_stats),
    )
    # the run's step reads as it is, the same as its export
    step_vae = ReducioVAE.from_pretrained(trainer.workdir / "checkpoints" / "2")
    _assert_same(_by_path(nnx.state(step_vae.model)), _by_path(nnx.state(vae.model)))
    # the exported model runs
    video = np.zeros((1, trainer.cfg.data.num_frames, 32, 32, 3), np.float32)
    assert vae.reconstruct(video).shape == video.shape


def test_export_errors(eight_device_run, tmp_path, capsys):
    trainer, _, _ = eight_device_run
    with pytest.raises(TrainingError, match="no checkpoint of step 7"):
        export_run(trainer.workdir, tmp_path / "a", step=7)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["export", "--run", str(trainer.workdir), "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "neither a training run" in capsys.readouterr().err
    # eval.py / encode: a run directory is refused with the way out; one of its steps is a
    # pretrained directory already
    with pytest.raises(InputError, match="export"):
        resolve_config(trainer.workdir, None)
    assert resolve_config(trainer.workdir / "checkpoints" / "2", None).model == trainer.cfg.model
