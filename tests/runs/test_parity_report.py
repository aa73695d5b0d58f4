"""`python -m reducio_jax.runs.parity`: the missing-reference errors, the comparison core (with a
stand-in reference built from the JAX model), the optional-dependency shims, and, opt-in, the
real report (set REDUCIO_REFERENCE_REPO to a checkout of the official repository)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest
from helpers import recipe_checkpoint

from reducio_jax import ReducioVAE, load_config
from reducio_jax.runs.parity import (
    STAGES,
    compare_stages,
    format_report,
    install_shims,
    jax_stages,
    main,
    run_report,
    synthetic_clips,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
REFERENCE = os.environ.get("REDUCIO_REFERENCE_REPO", "")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_without_reference_repo(capsys, tmp_path):
    assert main(["--ckpt", str(tmp_path / "x.ckpt"), "--config", TINY]) == 2
    assert "--reference-repo" in _one_error_line(capsys)


def test_reference_repo_without_official_code(capsys, tmp_path):
    args = ["--ckpt", str(tmp_path / "x.ckpt"), "--config", TINY]
    assert main([*args, "--reference-repo", str(tmp_path)]) == 2
    assert "ldm/models/reducio_vae.py" in _one_error_line(capsys)


@pytest.fixture(scope="module")
def vae(fixtures_dir, tmp_path_factory) -> ReducioVAE:
    path = recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("c") / "tiny.ckpt")
    return ReducioVAE.from_torch_checkpoint(path, load_config(TINY))


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    clips = synthetic_clips(2, 16, 32)
    assert clips.shape == (2, 16, 32, 32, 3) and clips.min() >= -1 and clips.max() <= 1
    return clips


def test_standin_reference_agrees_exactly(vae, video):
    report = run_report(vae, lambda v: jax_stages(vae, v), video)
    assert [e.stage for e in report["errors"]] == list(STAGES)
    assert all(e.max_abs == 0.0 and e.mean_abs == 0.0 for e in report["errors"])
    assert report["recon_psnr"] == pytest.approx(80.0)  # the 1e-8 MSE ceiling
    text = format_report(report)
    assert "content" in text and "recon" in text and "80.00 dB" in text


def test_standin_reference_with_known_errors(vae, video):
    ours = jax_stages(vae, video)
    assert len(ours["content"]) > 1 and ours["latent"].shape == (2, 4, 1, 1, 16)
    ref = dict(ours)
    ref["latent"] = ours["latent"] + 1e-3
    ref["content"] = [f.copy() for f in ours["content"]]
    ref["content"][-1][0, 0, 0, 0] += 0.5
    ref["recon"] = ours["recon"] + 0.01
    report = compare_stages(ours, ref)
    errors = {e.stage: e for e in report["errors"]}
    assert errors["latent"].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert errors["content"].max_abs == pytest.approx(0.5, rel=1e-5)
    assert errors["mean"].max_abs == 0.0
    # a 0.01 shift in [-1, 1] is 0.005 in [0, 1] (less where clamped): about 46 dB
    assert 40.0 < report["recon_psnr"] < 50.0


@pytest.fixture
def restore_modules():
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_shims(restore_modules):
    import torch

    installed = install_shims()
    if "xformers" in installed:
        import xformers.ops

        q, k, v = (
            torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)
        )
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        got = xformers.ops.memory_efficient_attention(q, k, v, attn_bias=None)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if "pytorch_lightning" in installed:
        import pytorch_lightning as pl

        assert issubclass(pl.LightningModule, torch.nn.Module)
    if "taming" in installed:
        from taming.modules.losses.lpips import LPIPS

        with pytest.raises(ValueError, match="stand-in"):
            LPIPS()


@pytest.mark.skipif(not REFERENCE, reason="set REDUCIO_REFERENCE_REPO to an official checkout")
def test_real_reference(fixtures_dir, tmp_path, capsys, restore_modules):
    ckpt = recipe_checkpoint(fixtures_dir, "tiny", tmp_path / "tiny.ckpt")
    args = ["--ckpt", str(ckpt), "--config", TINY, "--reference-repo", REFERENCE]
    assert main([*args, "--num-clips", "1", "--resolution", "32"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    errors = {r[0]: float(r[-2]) for r in rows if r and r[0] in STAGES}
    assert set(errors) == set(STAGES) and max(errors.values()) < 1e-3
