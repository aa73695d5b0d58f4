"""The converter: full key coverage of the released manifests, strict errors, file variants, CLI."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import recipe
from flax import nnx
from helpers import max_err, write_checkpoint
from torch_writer import save_safetensors

from configs import reducio_ft2, reducio_ft4, tiny
from reducio_jax.convert.load import target_shapes
from reducio_jax.convert.mapping import (
    ConversionError,
    convert_state_dict,
    fill_state,
    split_groups,
)
from reducio_jax.convert.pretrained import (
    convert_state_dict_to_modules,
    convert_torch_checkpoint,
    load_pretrained,
)
from reducio_jax.convert.torch_format import CheckpointFormatError
from reducio_jax.models import build_discriminator, build_lpips, build_vae
from reducio_jax.sharding import abstract_model

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, config",
    [
        ("reducio_kl_ft4_fs32_z16_attn23", reducio_ft4),
        ("reducio_kl_ft2_fs32_z16_attn23", reducio_ft2),
        ("tiny", tiny),
    ],
)
def test_manifest_full_coverage(fixtures_dir, name, config):
    """Every released key is consumed, every Flax variable filled, every shape equal."""
    entries = recipe.manifest(fixtures_dir, name)
    zeros = {
        e["key"]: np.zeros(e["shape"], np.int64 if e["dtype"] == "int64" else np.float32)
        for e in entries
    }
    groups = split_groups(convert_state_dict(zeros))
    assert set(groups) == {"vae", "discriminator", "lpips", "logvar"}
    cfg = config.get_config()
    factories = {
        "vae": lambda: build_vae(cfg.model),
        "discriminator": lambda: build_discriminator(cfg),
        "lpips": build_lpips,
    }
    consumed = 1  # loss.logvar
    for part, make in factories.items():
        _, state = abstract_model(make)
        targets = target_shapes(state)
        filled = fill_state(targets, groups[part], what=part)
        assert set(filled) == set(targets)
        consumed += len(filled)
    assert consumed == len(entries)


@pytest.fixture(scope="module")
def tiny_sd(fixtures_dir):
    return recipe.state_dict(fixtures_dir, "tiny")


def test_missing_unused_and_misshaped_keys_are_all_named(tiny_sd):
    sd = dict(tiny_sd)
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["encoder_3d.conv_in.weight"] = np.zeros((32, 3, 3, 3, 5), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_state_dict_to_modules(sd, tiny.get_config())
    message = str(err.value)
    assert "decoder.conv_out.bias" in message  # missing
    assert "decoder.extra.weight" in message  # unused
    assert (
        "encoder_3d.conv_in.weight" in message
        and "(32, 3, 3, 3, 5)" in message
        and "(3, 3, 3, 3, 32)" in message
    )


def test_wrong_config_for_checkpoint(tiny_sd):
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert_state_dict_to_modules(tiny_sd, reducio_ft4.get_config())


def test_vae_only_checkpoint(tiny_sd):
    vae_only = {k: v for k, v in tiny_sd.items() if not k.startswith("loss.")}
    weights = convert_state_dict_to_modules(vae_only, tiny.get_config())
    assert weights.discriminator is None and weights.lpips is None and weights.logvar is None


def _decoder_kernel(weights) -> np.ndarray:
    return np.asarray(weights.vae.decoder.conv_out.kernel[...])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_and_module_prefix(tmp_path, tiny_sd, dtype):
    half = {
        f"module.{k}": (v.astype(dtype) if v.dtype == np.float32 else v) for k, v in tiny_sd.items()
    }
    path = write_checkpoint(tmp_path / "half.ckpt", half, use_torch=False)
    weights = convert_torch_checkpoint(path, tiny.get_config())
    expected = np.transpose(
        tiny_sd["decoder.conv_out.weight"].astype(dtype).astype(np.float32), (2, 3, 4, 1, 0)
    )
    assert weights.vae.decoder.conv_out.kernel[...].dtype == np.float32
    assert max_err(_decoder_kernel(weights), expected) == 0.0


def test_safetensors_and_torch_files_agree(tmp_path, tiny_sd):
    save_safetensors(tmp_path / "w.safetensors", tiny_sd)
    a = convert_torch_checkpoint(tmp_path / "w.safetensors", tiny.get_config())
    b = convert_torch_checkpoint(write_checkpoint(tmp_path / "w.ckpt", tiny_sd), tiny.get_config())
    assert max_err(_decoder_kernel(a), _decoder_kernel(b)) == 0.0


def test_truncated_file(tmp_path, tiny_sd):
    path = write_checkpoint(tmp_path / "full.ckpt", tiny_sd, use_torch=False)
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="cut.ckpt"):
        convert_torch_checkpoint(tmp_path / "cut.ckpt", tiny.get_config())


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "convert_torch_weights.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def test_cli_help():
    result = _cli("--help")
    assert (
        result.returncode == 0 and "--checkpoint" in result.stdout and "--config" in result.stdout
    )


def test_cli_converts_and_round_trips(tmp_path, tiny_sd):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", tiny_sd)
    result = _cli(
        "--checkpoint", str(ckpt), "--config", "configs/tiny.py", "--out", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    restored = load_pretrained(tmp_path / "out")
    direct = convert_torch_checkpoint(ckpt, tiny.get_config())
    assert restored.logvar == 0.0 and restored.lpips is not None
    for a, b in zip(
        nnx.to_flat_state(nnx.state(restored.vae)),
        nnx.to_flat_state(nnx.state(direct.vae)),
        strict=True,
    ):
        assert a[0] == b[0] and max_err(a[1][...], b[1][...]) == 0.0
    bn = restored.discriminator.norms[0]
    assert int(bn.num_batches_tracked[...]) == 7
    assert max_err(bn.var[...], tiny_sd["loss.discriminator.main.3.running_var"]) == 0.0


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("text", "neither"),
        ("missing", "does not exist"),
        ("wrong_config", "shape mismatch"),
        ("truncated", "cut.ckpt"),
        ("bad_config", "config file"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, tiny_sd, setup, expected):
    ckpt, config = tmp_path / "x.ckpt", "configs/tiny.py"
    if setup == "text":
        ckpt.write_text("hello, I am not a checkpoint\n")
    elif setup == "wrong_config":
        write_checkpoint(ckpt, tiny_sd, use_torch=False)
        config = "configs/reducio_ft4.py"
    elif setup == "truncated":
        data = write_checkpoint(ckpt, tiny_sd, use_torch=False).read_bytes()
        ckpt = tmp_path / "cut.ckpt"
        ckpt.write_bytes(data[:1000])
    elif setup == "bad_config":
        write_checkpoint(ckpt, tiny_sd, use_torch=False)
        config = str(tmp_path / "nope.yaml")
    result = _cli("--checkpoint", str(ckpt), "--config", config, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
        result.stderr
    )
    assert not (tmp_path / "out").exists()
