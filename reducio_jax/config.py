"""Configs: one `ml_collections.ConfigDict` per run, built from the official model parameters.

`make_config(params)` turns an official Lightning `model.params` mapping (the same keys:
`ddconfig`, `ddconfig_2d`, `embed_dim`, `lossconfig`, ...) into this project's config with the
blocks `model`, `loss`, `optim`, `data`, `train`, `mesh`. `config_from_yaml(path)` does the same
from an official YAML file (whole file or just its `model.params`; JSON accepted).
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import yaml

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

LOSS_DEFAULTS: dict[str, Any] = {
    "disc_start": 10001,
    "logvar_init": 0.0,
    "kl_weight": 1e-6,
    "disc_num_layers": 3,
    "disc_in_channels": 3,
    "disc_ch": 64,
    "disc_factor": 1.0,
    "disc_weight": 0.05,
    "loss_norm": "l1",
    "rec_weight": 1.0,
    "perceptual_weight": 0.1,
    "disc_loss": "hinge",
    "disc_loss_scale": 0.1,
    "use_adaptive_gan": True,
    "penalty_weight": 1.0,
    "penalty_radius": 3.0,
    "enable_2d": False,
    "enable_3d": True,
    "use_groupnorm": False,
    "use_actnorm": False,
    "act_tanh": False,
}

SCHEDULER_DEFAULTS = {
    "warm_up_steps": [0],
    "cycle_lengths": [1_000_000],
    "f_start": [1.0],
    "f_max": [1.0],
    "f_min": [0.01],
}
DISC_SCHEDULER_DEFAULTS = {"warmup_factor": 0.1, "warmup_start_iters": 5000, "warmup_iters": 1000}

# Logical parameter axes -> mesh axes. Channels of convolutions and dense layers are sharded
# over "fsdp" (ZeRO-3 style); everything else is replicated. The batch goes over data x fsdp.
DEFAULT_SHARDING_RULES = (
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", None),
    ("heads", "fsdp"),
    ("norm", None),
)


class ConfigError(ValueError):
    """A config file or mapping that cannot describe a Reducio-VAE."""


def _coerce_numbers(value: Any) -> Any:
    """YAML 1.1 reads `1e-6` as a string; turn numeric strings back into numbers."""
    if isinstance(value, Mapping):
        return {k: _coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_coerce_numbers(v) for v in value]
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return (
            int(number)
            if number.is_integer() and "." not in value and "e" not in value.lower()
            else number
        )
    return value


def _params_of(target_or_params: Mapping[str, Any]) -> Mapping[str, Any]:
    """`{target, params}` -> params; anything else is returned as is."""
    if "params" in target_or_params and isinstance(target_or_params["params"], Mapping):
        return target_or_params["params"]
    return target_or_params


def model_block(params: Mapping[str, Any]) -> ml_collections.ConfigDict:
    for key in ("ddconfig", "ddconfig_2d", "embed_dim"):
        if key not in params:
            raise ConfigError(
                f"model parameters lack '{key}'; give an official Reducio-VAE config "
                "(a YAML with model.params.ddconfig, ddconfig_2d, embed_dim)"
            )
    block = ml_collections.ConfigDict()
    block.embed_dim = int(params["embed_dim"])
    block.enable_2d = bool(params.get("enable_2d", True))
    block.use_tiling = bool(params.get("use_tiling", False))
    block.tile_overlap_factor = float(params.get("tile_overlap_factor", 0.2))
    block.tile_sample_min_size = int(params.get("tile_sample_min_size", 256))
    block.ddconfig = dict(params["ddconfig"])
    block.ddconfig_2d = dict(params["ddconfig_2d"])
    if not block.enable_2d:
        raise ConfigError("enable_2d=False (no content encoder) is not supported by this port")
    # Runtime choices of this port (not in the official configs).
    block.dtype = "float32"
    block.param_dtype = "float32"
    block.attention_impl = ""  # "" = XLA; "cudnn" = cuDNN flash attention (bf16, GPU)
    block.remat = bool(params["ddconfig"].get("use_checkpoint", False))
    return block


def train_block() -> ml_collections.ConfigDict:
    """The run loop's settings (read by `reducio_jax.train`)."""
    block = ml_collections.ConfigDict()
    block.num_steps = 1_000_000  # optimizer steps (each updates the VAE and the discriminator)
    block.grad_accum_steps = 1  # micro-batches per step (data.batch_size is the whole step)
    block.seed = 0  # parameter init and posterior sampling
    block.workdir = ""  # "" -> runs/<config name>; the --workdir flag wins
    block.log_every = 50  # TensorBoard scalars and metrics.jsonl (window means)
    block.checkpoint_every = 5000  # Orbax checkpoint every N steps, and at exit
    block.keep_checkpoints = 3  # keep the last K
    block.async_checkpointing = True
    block.preview_every = 5000  # reconstruction preview (PNG + GIF + TensorBoard image)
    block.fast_compile = False  # XLA without expensive LLVM passes: faster compile, slower steps
    block.lpips_weights = ""  # LPIPS source when --init_from has none (see docs/training.md)
    return block


def make_config(
    params: Mapping[str, Any], *, base_learning_rate: float | None = None
) -> ml_collections.ConfigDict:
    """Builds the full run config from an official `model.params` mapping."""
    params = _coerce_numbers(copy.deepcopy(dict(params)))
    cfg = ml_collections.ConfigDict()
    cfg.model = model_block(params)
    loss = dict(LOSS_DEFAULTS)
    loss.update(
        {k: v for k, v in _params_of(params.get("lossconfig", {})).items() if k != "target"}
    )
    cfg.loss = ml_collections.ConfigDict(loss)

    cfg.optim = ml_collections.ConfigDict()
    lr = (
        base_learning_rate
        if base_learning_rate is not None
        else params.get("base_learning_rate", 2e-5)
    )
    cfg.optim.base_learning_rate = float(lr)
    cfg.optim.b1, cfg.optim.b2 = 0.5, 0.9
    sched = dict(SCHEDULER_DEFAULTS)
    sched.update(_params_of(params.get("scheduler_config") or {}))
    sched.pop("target", None)
    cfg.optim.scheduler = ml_collections.ConfigDict(sched)
    disc_sched = dict(DISC_SCHEDULER_DEFAULTS)
    disc_sched.update(_params_of(params.get("scheduler_disc_config") or {}))
    disc_sched.pop("target", None)
    cfg.optim.scheduler_disc = ml_collections.ConfigDict(disc_sched)
    cfg.optim.grad_clip_norm = 0.0  # 0 = off, as in the released configs

    from reducio_jax.data.config import get_config as data_config

    cfg.data = data_config()
    cfg.data.num_frames = int(params["ddconfig"].get("temp_res", 16))
    cfg.data.resolution = int(params["ddconfig"].get("resolution", 256))

    cfg.train = train_block()

    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.shape = {"data": -1, "fsdp": 1}  # -1: all remaining devices
    cfg.mesh.rules = DEFAULT_SHARDING_RULES
    return cfg


def config_from_yaml(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Reads an official Reducio-VAE Lightning YAML (or JSON) into a config.

    Accepts the whole file (`model: {base_learning_rate, params: {...}}`), the `model.params`
    mapping alone, or the same as JSON.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot parse {path} as YAML/JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path} holds no mapping; expected an official Reducio-VAE config")
    lr = None
    if "model" in loaded and isinstance(loaded["model"], Mapping):
        lr = loaded["model"].get("base_learning_rate")
        loaded = loaded["model"]
    params = _params_of(loaded)
    try:
        return make_config(
            params, base_learning_rate=_coerce_numbers(lr) if lr is not None else None
        )
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
