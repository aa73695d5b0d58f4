"""Configs: the ml_collections files and `config_from_yaml` build the same model config."""

from __future__ import annotations

import json

import pytest
import yaml

from configs import demo, reducio_ft2, reducio_ft2_1024px, reducio_ft4, reducio_ft4_1024px, tiny
from reducio_jax import config_from_yaml, load_config
from reducio_jax.api import ReducioVAE
from reducio_jax.config import (
    ConfigError,
    config_from_dict,
    derived,
    get_default_config,
    make_config,
)
from reducio_jax.models.tiling import TileConfig

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
    assert cfg.optim.base_learning_rate == ref["base_learning_rate"]
    assert cfg.optim.scheduler.to_dict() == ref["scheduler_config"]["params"]
    for key, value in ref["scheduler_disc_config"]["params"].items():
        assert cfg.optim.scheduler_disc[key] == value, key


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
    assert from_yaml.to_dict() == from_file.to_dict()
    assert from_yaml.optim.base_learning_rate == ref["base_learning_rate"]
    assert from_yaml.model.remat == ref["ddconfig"]["use_checkpoint"]


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


def test_demo_is_tiny_with_demo_settings():
    cfg, fixture = demo.get_config(), tiny.get_config()
    assert cfg.model.ddconfig.to_dict() == fixture.model.ddconfig.to_dict()
    assert cfg.loss.to_dict() == fixture.loss.to_dict()
    assert cfg.optim.base_learning_rate > fixture.optim.base_learning_rate
    assert cfg.data.resolution == 32 and cfg.train.num_steps < fixture.train.num_steps
    assert load_config("configs/demo.py").to_dict() == cfg.to_dict()


def test_make_config_keeps_the_schema_defaults_of_missing_keys():
    """Keys an official mapping leaves out keep the schema's default; given ones win."""
    params = {k: v for k, v in reducio_ft4.PARAMS.items() if k not in ("lossconfig", "use_tiling")}
    params["lossconfig"] = {"target": "x.Loss", "params": {"disc_start": 7}}
    cfg, defaults = make_config(params), get_default_config()
    assert cfg.loss.disc_start == 7
    assert cfg.loss.kl_weight == defaults.loss.kl_weight
    assert cfg.loss.disc_ch == defaults.loss.disc_ch
    assert cfg.model.use_tiling == defaults.model.use_tiling
    assert cfg.optim.scheduler_disc.warmup_method == defaults.optim.scheduler_disc.warmup_method


def test_config_from_dict_completes_old_saved_configs():
    saved = json.loads(tiny.get_config().to_json_best_effort())
    del saved["optim"]["scheduler_disc"]["warmup_method"], saved["loss"]["warm_d_weight_steps"]
    cfg = config_from_dict(saved)
    assert cfg.optim.scheduler_disc.warmup_method == "linear"
    assert cfg.loss.warm_d_weight_steps == 0
    assert cfg.model.ddconfig.to_dict() == tiny.get_config().model.ddconfig.to_dict()


@pytest.mark.parametrize(
    "ddconfig, spatial, temporal, latent_frames",
    [
        ({"ch_mult": [1, 2, 2, 4, 4, 4], "f_t": 2, "temp_res": 16}, 32, 4, 4),
        ({"ch_mult": [1, 2, 2, 4, 4, 4], "f_t": 1, "temp_res": 16}, 32, 2, 8),
        ({"ch_mult": [1, 2, 2, 4], "f_s": 2, "temp_res": 5, "f_t": 1}, 4, 2, 3),  # explicit f_s
        ({"ch_mult": [1, 1, 1], "temp_res": 4}, 4, 1, 4),  # f_t defaults to 0
    ],
)
def test_derived(ddconfig, spatial, temporal, latent_frames):
    model = {"ddconfig": ddconfig, "embed_dim": 16}
    sizes = derived(model)
    assert (sizes.spatial_factor, sizes.temporal_factor) == (spatial, temporal)
    assert sizes.latent_frames == latent_frames
    assert sizes.temporal_padding == latent_frames * temporal - ddconfig["temp_res"]
    assert sizes.content_frame == (ddconfig["temp_res"] - 1) // 2
    assert sizes.latent_shape(64, 128) == (latent_frames, 64 // spatial, 128 // spatial, 16)
    assert derived({"model": model}) == sizes


def test_model_and_api_use_the_derived_sizes():
    cfg = tiny.get_config()
    cfg.model.use_tiling = True
    vae = ReducioVAE.from_config(cfg)
    assert vae.model.sizes == derived(cfg)
    assert vae.spatial_factor == derived(cfg).spatial_factor
    assert vae.tiles == TileConfig(256, 0.25, derived(cfg).spatial_factor)
    assert TileConfig.from_config(tiny.get_config()) is None
