"""Configs: the ml_collections files and `config_from_yaml` build the same model config."""

from __future__ import annotations

import json

import pytest
import yaml

from configs import reducio_ft2, reducio_ft2_1024px, reducio_ft4, reducio_ft4_1024px, tiny
from reducio_jax import config_from_yaml, load_config
from reducio_jax.config import ConfigError

CONFIG_FILES = {
    "reducio_kl_ft4_fs32_z16_attn23": reducio_ft4,
    "reducio_kl_ft2_fs32_z16_attn23": reducio_ft2,
    "reducio_kl_ft4_fs32_z16_attn23_1024px": reducio_ft4_1024px,
    "reducio_kl_ft2_fs32_z16_attn23_1024px": reducio_ft2_1024px,
    "tiny": tiny,
}


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return json.loads((fixtures_dir / "configs.json").read_text())


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_match_official(official, name):
    cfg, ref = CONFIG_FILES[name].get_config(), official[name]
    assert cfg.model.ddconfig.to_dict() == ref["ddconfig"]
    assert cfg.model.ddconfig_2d.to_dict() == ref["ddconfig_2d"]
    assert cfg.model.embed_dim == ref["embed_dim"] and cfg.model.use_tiling == ref["use_tiling"]
    assert cfg.model.tile_overlap_factor == ref["tile_overlap_factor"]
    for key, value in ref["lossconfig"]["params"].items():
        assert cfg.loss[key] == value, key
    # configs/tiny.py trains its CPU demo at a higher rate (documented there)
    want_lr = tiny.DEMO_LEARNING_RATE if name == "tiny" else ref["base_learning_rate"]
    assert cfg.optim.base_learning_rate == want_lr
    assert cfg.optim.scheduler.to_dict() == ref["scheduler_config"]["params"]
    assert cfg.optim.scheduler_disc.to_dict() == ref["scheduler_disc_config"]["params"]


def _minus_demo(block) -> dict:
    """A config block without the fields configs/tiny.py sets for its CPU training demo."""
    return {k: v for k, v in block.to_dict().items() if k not in ("remat", "base_learning_rate")}


def _as_lightning_yaml(ref: dict) -> str:
    params = {k: v for k, v in ref.items() if k != "base_learning_rate"}
    # Official files write small floats as `1e-6`, which YAML 1.1 reads as strings.
    text = yaml.safe_dump(
        {
            "model": {
                "base_learning_rate": ref["base_learning_rate"],
                "target": "x.ReducioVAE",
                "params": params,
            }
        }
    )
    return text.replace("1.0e-06", "1e-6")


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("form", ["yaml_whole", "yaml_params", "json"])
def test_config_from_yaml(tmp_path, official, name, form):
    ref = official[name]
    if form == "yaml_whole":
        path = tmp_path / "c.yaml"
        path.write_text(_as_lightning_yaml(ref))
    elif form == "yaml_params":
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(ref))
    else:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(ref))
    from_yaml, from_file = config_from_yaml(path), CONFIG_FILES[name].get_config()
    assert _minus_demo(from_yaml.model) == _minus_demo(from_file.model)
    assert from_yaml.loss.to_dict() == from_file.loss.to_dict()
    assert from_yaml.optim.base_learning_rate == ref["base_learning_rate"]
    assert from_yaml.model.remat == ref["ddconfig"]["use_checkpoint"]
    assert _minus_demo(from_yaml.optim) == _minus_demo(from_file.optim)


def test_yaml_string_numbers_are_numbers(tmp_path, official):
    path = tmp_path / "c.yaml"
    path.write_text(_as_lightning_yaml(official["tiny"]))
    assert "1e-6" in path.read_text()
    assert config_from_yaml(path).loss.kl_weight == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "content, match",
    [
        ("just a string", "no mapping"),
        ("model: {params: {embed_dim: 4}}", "ddconfig"),
        ("a: [1, 2", "cannot parse"),
    ],
)
def test_bad_yaml(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        config_from_yaml(path)


def test_load_config_forms(tmp_path):
    assert load_config("configs/tiny.py").model.ddconfig.ch == 32
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.py")
