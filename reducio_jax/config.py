"""Configs: one `ml_collections.ConfigDict` per run, one schema.

`get_default_config()` is the schema: every key of the blocks `model`, `loss`, `optim`, `data`
(`data_block()`), `train`, `mesh`, each default written once with its meaning.
`make_config(params)` overrides it with an official Lightning `model.params` mapping (the same
keys: `ddconfig`, `ddconfig_2d`, `embed_dim`, `lossconfig`, ...); `config_from_yaml(path)` does
the same from an official YAML file (whole file or just its `model.params`; JSON accepted).
`load_config(spec)` is the one loader of the API and the command line (`--config`): a
`configs/*.py` file (`get_config()`, `file.py:ARG` passes ARG), an official YAML, or JSON.
`derived(cfg)` gives every quantity that follows from the model (spatial and temporal factor,
clip length, latent shape, content frame).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import numbers
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import yaml
from ml_collections import config_dict

from reducio_jax.errors import InputError

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

# Optional keys of the official `ddconfig` (3D encoder / fusion decoder) and their defaults; the

# model reads a ddconfig merged over these.
DDCONFIG_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,  # video channels
    "out_ch": 3,  # decoded video channels
    "ch_in": None,  # decoder input width (None: ch)
    "f_t": 0,  # temporal compression 2**f_t
    "f_s": None,  # spatial compression 2**f_s (None: len(ch_mult) - 1)
    "fuse_mid": False,  # content cross-attention in the decoder's middle block
    "window_size": 256,  # attention window (pixels, int or (h, w))
    "fp32_attention": True,  # attention softmax in float32
}
# Optional keys of the official `ddconfig_2d` (2D content encoder) and their defaults.
DDCONFIG_2D_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,  # content frame channels
    "window_size": 256,  # attention window (pixels, int or (h, w))
    "fp32_attention": True,  # attention softmax in float32
}

# Logical parameter axes -> mesh axes. Channels of convolutions and dense layers are sharded
# over "fsdp" (ZeRO-3 style); everything else is replicated. The batch goes over data x fsdp.
DEFAULT_SHARDING_RULES = (
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", None),
    ("heads", "fsdp"),
    ("norm", None),
    # activations (models/constraints.py): clips over the batch axes, frame rows over `space`
    ("activation_batch", ("data", "fsdp")),
    ("activation_height", "space"),
)


def get_default_config() -> ml_collections.ConfigDict:
    """Every key of a run config, each with its default; `configs/*.py` set what differs."""
    cfg = ml_collections.ConfigDict()

    cfg.model = model = ml_collections.ConfigDict()
    model.ddconfig = {}  # 3D encoder / fusion decoder: the official ddconfig (DDCONFIG_DEFAULTS)
    model.ddconfig_2d = {}  # 2D content encoder: the official ddconfig_2d (DDCONFIG_2D_DEFAULTS)
    model.embed_dim = 16  # latent channels
    model.enable_2d = True  # content encoder on (the only mode this port supports)
    model.use_tiling = False  # tile frames taller than tile_sample_min_size * (1 + overlap)
    model.tile_overlap_factor = 0.2  # fraction of a tile shared with each neighbour
    model.tile_sample_min_size = 256  # tile step in pixels
    model.dtype = "float32"  # compute dtype ("bfloat16" on accelerators; params stay float32)
    model.param_dtype = "float32"  # parameter dtype
    model.attention_impl = ""  # "" = XLA; "cudnn" = cuDNN flash attention (bf16, GPU)
    model.remat = False  # recompute blocks in the backward pass (the YAML's use_checkpoint)

    cfg.loss = loss = ml_collections.ConfigDict()
    loss.disc_start = 10001  # step from which the GAN loss counts
    loss.logvar_init = 0.0  # the fixed log-variance dividing the reconstruction loss
    loss.kl_weight = 1e-6  # weight of the KL term
    loss.disc_num_layers = 3  # PatchGAN depth
    loss.disc_in_channels = 3  # PatchGAN input channels
    loss.disc_ch = 64  # PatchGAN width
    loss.disc_factor = 1.0  # GAN loss factor once disc_start is reached
    loss.disc_weight = 0.05  # scale of the adaptive GAN weight
    loss.loss_norm = "l1"  # reconstruction distance: "l1" or "l2"
    loss.rec_weight = 1.0  # weight of the reconstruction (+ perceptual) loss
    loss.perceptual_weight = 0.1  # LPIPS weight inside the reconstruction loss
    loss.perceptual_chunk = 0  # LPIPS on this many frames of each clip at a time (0: all)
    loss.disc_loss = "hinge"  # discriminator loss: "hinge" or "vanilla"
    loss.disc_loss_scale = 0.1  # discriminator learning rate / VAE learning rate
    loss.use_adaptive_gan = True  # GAN weight from last-layer gradient norms (else fixed)
    loss.warm_d_weight_steps = 0  # steps of the fixed-GAN-weight warm-up (use_adaptive_gan off)
    loss.penalty_weight = 1.0  # weight of the brightness penalty
    loss.penalty_radius = 3.0  # output magnitude the penalty starts at
    loss.enable_2d = False  # 2D (frame) discriminator: off in the released recipe
    loss.enable_3d = True  # 3D (video) discriminator
    loss.use_groupnorm = False  # reference option of the discriminator; unused by the port
    loss.use_actnorm = False  # reference option of the discriminator; unused by the port
    loss.act_tanh = False  # reference option of the discriminator; unused by the port

    cfg.optim = optim = ml_collections.ConfigDict()
    optim.base_learning_rate = 2e-5  # VAE learning rate before the schedule's factor
    optim.b1, optim.b2 = 0.5, 0.9  # Adam betas of both networks
    optim.grad_clip_norm = 0.0  # VAE gradient clipping by global norm (0 = off)
    optim.disc_grad_clip_norm = 0.0  # discriminator gradient clipping (0 = off)
    optim.scheduler = ml_collections.ConfigDict()  # VAE LambdaLinear factor, one entry per cycle
    optim.scheduler.warm_up_steps = [0]  # linear ramp from f_start to f_max
    optim.scheduler.cycle_lengths = [1_000_000]  # steps per cycle
    optim.scheduler.f_start = [1.0]  # factor at the cycle's start
    optim.scheduler.f_max = [1.0]  # factor after the warm-up
    optim.scheduler.f_min = [0.01]  # factor the cycle decays towards
    optim.scheduler_disc = ml_collections.ConfigDict()  # discriminator WarmupLR factor
    optim.scheduler_disc.warmup_factor = 0.1  # factor before warmup_start_iters
    optim.scheduler_disc.warmup_start_iters = 5000  # step the warm-up starts at
    optim.scheduler_disc.warmup_iters = 1000  # steps of the warm-up to factor 1
    optim.scheduler_disc.warmup_method = "linear"  # "linear" ramp or "constant"

    cfg.data = data_block()  # the data block (its keys: DATA_KEYS_DOC)

    cfg.train = train = ml_collections.ConfigDict()
    train.num_steps = 1_000_000  # optimizer steps (each updates the VAE and the discriminator)
    train.grad_accum_steps = 1  # micro-batches per step (data.batch_size is the whole step)
    train.seed = 0  # parameter init and posterior sampling
    train.workdir = ""  # "" -> runs/<config name>; the --workdir flag wins
    train.log_every = 50  # TensorBoard scalars and metrics.jsonl (window means)
    train.checkpoint_every = 5000  # Orbax checkpoint every N steps, and at exit
    train.keep_checkpoints = 3  # keep the last K
    train.async_checkpointing = True  # write checkpoints in the background
    train.preview_every = 5000  # reconstruction preview (PNG + GIF + TensorBoard image)
    train.fast_compile = False  # XLA without expensive LLVM passes: faster compile, slower steps
    # XLA options of the train step on TPUs only. The latency-hiding scheduler may plan for 60%
    # of HBM (libtpu's default, more, overlaps more collectives and kept ft4 at 2 clips a chip
    # off a v5e-256: benchmarks/RESULTS.md, "TPU memory plan: the scheduler's memory limit")
    train.tpu_compiler_options = {"xla_tpu_scheduler_percent_shared_memory_limit": 60}
    train.lpips_weights = ""  # LPIPS source when --init_from has none (see docs/training.md)
    train.compiled_step = ""  # a step file from `compile --serialize` to load ("" compiles here)

    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.shape = {"data": -1, "fsdp": 1}  # -1: all remaining devices
    cfg.mesh.rules = DEFAULT_SHARDING_RULES  # logical axis -> mesh axis
    return cfg


def config_from_dict(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config saved as JSON (a pretrained directory, a run, a latent store), completed with
    the schema's defaults for any key it predates."""
    return ml_collections.ConfigDict(_merged(_as_json(get_default_config()), saved))


def _as_json(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(cfg.to_json_best_effort())


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            value = _merged(out[key], value)
        out[key] = value
    return out


def content_frame_index(num_frames: int) -> int:
    """The frame the content encoder sees: the middle one, (T - 1) // 2."""
    return (num_frames - 1) // 2


@dataclasses.dataclass(frozen=True)
class Derived:
    """The quantities that follow from a model config (see `derived`)."""

    num_frames: int  # frames per clip (temp_res)
    spatial_factor: int  # pixels per latent position along H and W (2**f_s)
    temporal_factor: int  # frames per latent step (2**f_t)
    latent_channels: int  # embed_dim

    @property
    def temporal_padding(self) -> int:
        """Frames the decoder makes in front of the clip (T rounded up to 2**f_t); dropped."""
        return (-self.num_frames) % self.temporal_factor

    @property
    def latent_frames(self) -> int:
        return (self.num_frames + self.temporal_padding) // self.temporal_factor

    @property
    def content_frame(self) -> int:
        """Index of the content frame within a clip."""
        return content_frame_index(self.num_frames)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(t, h, w, embed_dim) of the latent of one (T, height, width, 3) clip."""
        f = self.spatial_factor
        return (self.latent_frames, height // f, width // f, self.latent_channels)


def derived(cfg: Mapping[str, Any]) -> Derived:
    """Spatial/temporal factor, clip length, latent shape, content frame of a config (whole, or
    its `model` block)."""
    model = cfg["model"] if "model" in cfg else cfg
    dd = {**DDCONFIG_DEFAULTS, **dict(model["ddconfig"])}
    f_s = len(dd["ch_mult"]) - 1 if dd["f_s"] is None else int(dd["f_s"])
    return Derived(
        num_frames=int(dd["temp_res"]),
        spatial_factor=2**f_s,
        temporal_factor=2 ** int(dd["f_t"]),
        latent_channels=int(model["embed_dim"]),
    )


class ConfigError(InputError):
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


def _check_model_params(params: Mapping[str, Any]) -> None:
    for key in ("ddconfig", "ddconfig_2d", "embed_dim"):
        if key not in params:
            raise ConfigError(
                f"model parameters lack '{key}'; give an official Reducio-VAE config "
                "(a YAML with model.params.ddconfig, ddconfig_2d, embed_dim)"
            )
    if not params.get("enable_2d", True):
        raise ConfigError("enable_2d=False (no content encoder) is not supported by this port")


def make_config(
    params: Mapping[str, Any], *, base_learning_rate: float | None = None
) -> ml_collections.ConfigDict:
    """The run config of an official `model.params` mapping: the defaults of
    `get_default_config`, overridden by every value the mapping gives."""
    params = _coerce_numbers(copy.deepcopy(dict(params)))
    _check_model_params(params)
    cfg = get_default_config()
    model = cfg.model
    model.ddconfig = dict(params["ddconfig"])
    model.ddconfig_2d = dict(params["ddconfig_2d"])
    model.embed_dim = int(params["embed_dim"])
    for key in ("enable_2d", "use_tiling", "tile_overlap_factor", "tile_sample_min_size"):
        if key in params:
            model[key] = type(model[key])(params[key])
    if "use_checkpoint" in params["ddconfig"]:
        model.remat = bool(params["ddconfig"]["use_checkpoint"])

    cfg.loss.update(_block(params, "lossconfig"))
    # the reference's gradient checkpointing covers LPIPS here too: a frame of each clip at a time
    cfg.loss.perceptual_chunk = 1 if model.remat else 0
    if base_learning_rate is None:
        base_learning_rate = params.get("base_learning_rate", cfg.optim.base_learning_rate)
    cfg.optim.base_learning_rate = float(base_learning_rate)
    cfg.optim.scheduler.update(_block(params, "scheduler_config"))
    cfg.optim.scheduler_disc.update(_block(params, "scheduler_disc_config"))

    cfg.data.num_frames = derived(cfg).num_frames
    if "resolution" in params["ddconfig"]:
        cfg.data.resolution = int(params["ddconfig"]["resolution"])
    return cfg


def _block(params: Mapping[str, Any], key: str) -> dict[str, Any]:
    """An official `{target, params}` block (or bare mapping) of `params`, without `target`."""
    block = dict(_params_of(params.get(key) or {}))
    block.pop("target", None)
    return block


def load_config(spec: ml_collections.ConfigDict | str | pathlib.Path) -> ml_collections.ConfigDict:
    """A ConfigDict as given, a `configs/*.py` file with `get_config()` (`FILE.py:ARG` calls
    `get_config("ARG")`), or an official Lightning YAML / JSON file (`config_from_yaml`)."""
    if isinstance(spec, ml_collections.ConfigDict):
        return spec
    text = str(spec)
    path, arg = pathlib.Path(text), ()
    if ".py:" in text and not path.is_file():
        head, tail = text.split(".py:", 1)
        path, arg = pathlib.Path(head + ".py"), (tail,)
    if path.suffix != ".py":
        return config_from_yaml(path)
    return _config_from_python(path, arg)


def _config_from_python(path: pathlib.Path, arg: tuple[str, ...]) -> ml_collections.ConfigDict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_reducio_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} has no get_config() function")
        cfg = module.get_config(*arg)
    except ConfigError:
        raise
    except Exception as err:  # a config file can raise anything while it runs
        raise ConfigError(f"{path}: {type(err).__name__}: {err}") from err
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
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


# -- the data block ------------------------------------------------------------------------------

DATA_KEYS_DOC = """The data config block shared by training, evaluation and latent extraction.

Keys (all read by :func:`reducio_jax.data.make_loader` / :func:`make_host_dataset`):

* ``source``: ``"synthetic"`` | ``"folder"`` | ``"tfds"``.
* ``path``: folder of videos (searched recursively for mp4/webm/mov/avi/mkv/m4v), or a
  text file listing one video path per line (relative paths are relative to the list
  file); for ``"tfds"`` the TFDS ``data_dir``.
* ``tfds_name``: TFDS dataset name, optionally with a version (``"my_videos:1.0.0"``).
* ``split``: TFDS split (``"train"``, ``"validation[:10%]"`` ...); unused by the
  other sources.
* ``num_frames``: frames per clip (16).
* ``fps``: frame rate clips are resampled to (16). TFDS records are assumed to be stored
  at this rate already (the builder in :mod:`reducio_jax.data.tfds_builder` does that).
* ``resolution``: output size, an int (square) or ``(H, W)`` (256). Frames are resized
  so that they cover it (short side for square outputs), then cropped.
* ``random_crop``: train only: random spatial crop (else centre crop). Train clips also
  start at a random time; eval clips start at the first frame, centre-cropped.
* ``batch_size``: global batch size (all processes together).
* ``num_workers``: Grain worker processes that decode (``mp_prefetch``); 0 decodes in
  the main process (with one prefetch thread).
* ``seed``: seed of the shuffle and of the random crops.
* ``shuffle``: train only: shuffle clip order (reshuffled every epoch).
* ``num_epochs``: passes over the data; ``None`` repeats forever (train). Eval makes a
  single pass when it is ``None``.
* ``synthetic_size``: number of distinct synthetic clips.
"""


def data_block() -> ml_collections.ConfigDict:
    """The default data block (synthetic source, 16 frames at 16 fps, 256 px); its keys are
    in `DATA_KEYS_DOC`."""
    c = ml_collections.ConfigDict()
    c.source = "synthetic"
    c.path = ""
    c.tfds_name = ""
    c.split = "train"
    c.num_frames = 16
    c.fps = 16
    # int or (H, W): a FieldReference of type object so either may be assigned.
    c.resolution = ml_collections.FieldReference(256, field_type=object)
    c.random_crop = True
    c.batch_size = 8
    c.num_workers = 0
    c.seed = 0
    c.shuffle = True
    c.num_epochs = config_dict.placeholder(int)
    c.synthetic_size = 1024
    return c


def frame_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """A resolution (`data.resolution`, `--resolution`) as (H, W): ``256`` -> ``(256, 256)``
    (any integer, numpy's too), ``(H, W)`` -> ``(H, W)``."""
    if isinstance(resolution, numbers.Integral):
        return int(resolution), int(resolution)
    h, w = (int(x) for x in resolution)
    return h, w
