"""The flags several commands share, each defined once (absl flags in a per-command FlagValues).

`--config` is an `ml_collections.config_flags` flag (so `--config.train.num_steps=50` overrides
any key) whose file is read by `reducio_jax.config.load_config`, the loader of the Python API:
a `configs/*.py` file (`FILE.py:ARG` passes ARG to `get_config`), an official YAML, or JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from reducio_jax.errors import InputError
from reducio_jax.programs.cache import DEFAULT_CACHE

CHECKPOINT_HELP = (
    "A released torch .ckpt/.pt/.safetensors file or an Orbax pretrained directory (a path or a "
    "gs:// URL), or released weights by name: hf://OWNER/REPO/FILE[@REVISION]."
)
CONFIG_HELP = (
    "configs/*.py (get_config(); FILE.py:ARG passes ARG), an official Lightning YAML or JSON. "
    "Override any key with --config.KEY=VALUE, e.g. --config.model.use_tiling=true."
)


class ConfigParser(flags.ArgumentParser):
    """`--config SPEC` -> the ConfigDict of `reducio_jax.config.load_config(SPEC)`."""

    def parse(self, argument: Any) -> ml_collections.ConfigDict:
        from reducio_jax.config import load_config

        cfg = load_config(argument)
        cfg.lock()  # as config_flags does: an override of a key that does not exist fails
        return cfg

    def flag_type(self) -> str:
        return "config"


class ResolutionParser(flags.ArgumentParser):
    """`N` or `HxW` -> N or (H, W)."""

    def parse(self, argument: Any) -> int | tuple[int, int] | None:
        if argument is None or isinstance(argument, int | tuple):
            return argument
        try:
            sizes = [int(p) for p in str(argument).lower().split("x")]
        except ValueError:
            sizes = []
        if len(sizes) not in (1, 2) or min(sizes) <= 0:
            raise ValueError(f"'{argument}' is not N or HxW (positive pixel counts)")
        return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])

    def flag_type(self) -> str:
        return "N or HxW"


class WindowBatchParser(flags.ArgumentParser):
    """`auto` or a positive number of windows a compiled call."""

    def parse(self, argument: Any) -> int | str | None:
        from reducio_jax.programs.planner import parse_window_batch  # (jax: on use only)

        if argument is None:
            return None
        try:
            return parse_window_batch(argument, "")
        except InputError as err:  # absl names the flag itself
            raise ValueError(str(err).strip()) from None

    def flag_type(self) -> str:
        return "auto or N"


def define_config(fv: flags.FlagValues, argv: Sequence[str], help_text: str = CONFIG_HELP):
    """--config (and its --config.KEY=VALUE overrides, which are found in `argv`)."""
    holder = config_flags.DEFINE_config_file(
        "config", None, help_text, flag_values=fv, sys_argv=list(argv)
    )
    fv["config"].parser = ConfigParser()
    return holder


def define_checkpoint(fv: flags.FlagValues, help_text: str = CHECKPOINT_HELP) -> None:
    flags.DEFINE_string("checkpoint", None, help_text, flag_values=fv)


def define_out(fv: flags.FlagValues, help_text: str, default: str | None = None) -> None:
    flags.DEFINE_string("out", default, help_text, flag_values=fv)


def define_compilation_cache(fv: flags.FlagValues) -> None:
    """--compilation_cache, which every command takes (`reducio_jax.cli.run_command`)."""
    flags.DEFINE_string(
        "compilation_cache",
        DEFAULT_CACHE,
        "JAX's persistent compilation cache: a folder or gs:// URL ('' = off; the environment's "
        "JAX_COMPILATION_CACHE_DIR wins). A second run on the same shapes compiles nothing.",
        flag_values=fv,
    )


def define_progress(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("progress", True, "Show a progress bar (--noprogress: none).", flag_values=fv)


def define_devices(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer(
        "devices", None, "Use the first N devices (default: all).", lower_bound=1, flag_values=fv
    )


def define_batch_size(
    fv: flags.FlagValues, help_text: str = "Global batch (default: one clip per device)."
) -> None:
    flags.DEFINE_integer("batch_size", None, help_text, flag_values=fv)


def define_fps(fv: flags.FlagValues, help_text: str) -> None:
    flags.DEFINE_float("fps", None, help_text, flag_values=fv)


def define_num_clips(fv: flags.FlagValues, help_text: str) -> None:
    flags.DEFINE_integer("num_clips", None, help_text, flag_values=fv)


def define_resolution(fv: flags.FlagValues, help_text: str) -> None:
    flags.DEFINE(ResolutionParser(), "resolution", None, help_text, flag_values=fv)


def define_data(fv: flags.FlagValues) -> None:
    """--data and how clips are cut from it (the fields of `runtime.RunOptions`)."""
    flags.DEFINE_string(
        "data",
        None,
        "'synthetic', 'tfds:NAME[:VERSION]' (with --data_dir), or a folder / list file / video.",
        flag_values=fv,
    )
    flags.DEFINE_string("data_dir", "", "TFDS data_dir (for --data tfds:NAME).", flag_values=fv)
    flags.DEFINE_string("split", "train", "TFDS split, e.g. 'validation[:10%]'.", flag_values=fv)
    define_num_clips(fv, "The first N clips (default: all; synthetic: 16).")
    define_batch_size(fv)
    define_resolution(fv, "Clip size, N or HxW (default: the config's).")
    flags.DEFINE_integer(
        "num_frames", None, "Frames per clip (default: the config's, 16).", flag_values=fv
    )
    define_fps(fv, "Clip frame rate (default: the config's, 16).")
    flags.DEFINE_integer("num_workers", 0, "Grain decode processes.", flag_values=fv)
    define_devices(fv)


def define_windows(fv: flags.FlagValues, prefix: str = "", batch_note: str = "") -> None:
    """--keep_fps / --overlap / --window_batch (default "auto": from memory): how a video of
    any length is cut into 16-frame windows (`reconstruct`, `encode --whole_videos`;
    docs/video.md)."""
    flags.DEFINE_bool(
        "keep_fps",
        False,
        prefix + "Keep each video's frame rate (default: resample to the config's data.fps).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "overlap", 4, prefix + "Frames cross-faded between neighbour windows.", flag_values=fv
    )
    flags.DEFINE(
        WindowBatchParser(),
        "window_batch",
        "auto",
        prefix + "Windows per compiled call. 'auto': as many as fit in memory (the compiled "
        "program's memory analysis against the memory available or --max_memory), tiling large "
        "frames when one window does not fit; a number that does not fit is an error." + batch_note,
        flag_values=fv,
    )


def define_max_memory(fv: flags.FlagValues, prefix: str = "") -> None:
    """--max_memory: the memory the window batch and tiling are chosen for."""
    flags.DEFINE_string(
        "max_memory",
        None,
        prefix + "Memory for the whole process, e.g. 8GB or 512MB (default: the RAM available, "
        "the cgroup or ulimit -v limit, or the accelerator's free memory).",
        flag_values=fv,
    )


def define_distributed(fv: flags.FlagValues) -> None:
    """--distributed / --coordinator_address / --num_processes / --process_id."""
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() (auto-detected cluster: TPU pods, SLURM, ...).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (multi-process runs).", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_processes", None, "Number of processes (multi-process runs).", flag_values=fv
    )
    flags.DEFINE_integer(
        "process_id", None, "This process's index (multi-process runs).", flag_values=fv
    )


def init_distributed(fv: flags.FlagValues) -> None:
    """jax.distributed.initialize() when --distributed or --coordinator_address is given."""
    if fv["distributed"].value or fv["coordinator_address"].value is not None:
        import jax

        jax.distributed.initialize(
            coordinator_address=fv["coordinator_address"].value,
            num_processes=fv["num_processes"].value,
            process_id=fv["process_id"].value,
        )


def require(fv: flags.FlagValues, *names: str) -> None:
    """Bad input (exit 2) when one of the flags `names` was not given."""
    missing = [n for n in names if fv[n].value is None]
    if missing:
        given = ", ".join(f"--{n}" for n in missing)
        raise InputError(f"{given} {'is' if len(missing) == 1 else 'are'} required (see --help)")


def options(cls: type, fv: flags.FlagValues, **extra: Any) -> Any:
    """A dataclass of options filled from the flags of the same names (and `extra`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {n: fv[n].value for n in names if n in fv and n not in extra}
    return cls(**values, **extra)


__all__ = [
    "CHECKPOINT_HELP",
    "CONFIG_HELP",
    "define_batch_size",
    "define_checkpoint",
    "define_config",
    "define_data",
    "define_devices",
    "define_distributed",
    "define_fps",
    "define_max_memory",
    "define_num_clips",
    "define_out",
    "define_progress",
    "define_resolution",
    "define_windows",
    "init_distributed",
    "options",
    "require",
]
