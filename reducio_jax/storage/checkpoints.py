"""The one checkpoint layout: a pretrained directory and each step of a training run.

A checkpoint is an Orbax composite directory with one sub-directory per item:

    vae/            nnx.State of the VideoVAE (parameters and fixed tables)
    discriminator/  nnx.State of the PatchDiscriminator (parameters and BatchNorm statistics)
    lpips/          nnx.State of the frozen LPIPS network (when there is one)
    config/         JSON {"format": 2, "config": the whole config, "logvar": float, ...}
    optimizer/      training steps only: both Adam states, the step count and the noise key
    data/           training steps only: each process's Grain iterator position

A run keeps its steps as `<workdir>/checkpoints/<step>/` (one `ocp.CheckpointManager`);
`copy_items` (the `export` command) copies the items a user needs of one step into a
pretrained directory, and every reader takes either. Arrays are restored straight into
their shards: the target of each network item is `sharding.abstract_model` of that network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from reducio_jax.errors import InputError
from reducio_jax.storage.paths import Path, PathLike, as_path, copytree, make_dirs, rmtree

VAE = "vae"
DISCRIMINATOR = "discriminator"
LPIPS = "lpips"
CONFIG = "config"
OPTIMIZER = "optimizer"
DATA = "data"
NETWORKS = (VAE, DISCRIMINATOR, LPIPS)
PRETRAINED = (*NETWORKS, CONFIG)  # what `export` copies out of a training step
FORMAT = 2  # the config item's "format"; 1 (no key) was the layout of pretrained dirs before
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix of a save that is not committed yet
METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's per-checkpoint metadata


class CheckpointError(InputError):
    """A directory that is not a checkpoint of this layout (one line, says what to do)."""


def config_item(cfg: ml_collections.ConfigDict, *, logvar: float | None, **extra: Any) -> dict:
    """The JSON config item: the whole config, logvar (None: a VAE-only directory) and any
    `extra` keys."""
    config = json.loads(cfg.to_json_best_effort())
    logvar = None if logvar is None else float(logvar)
    return {"format": FORMAT, "config": config, "logvar": logvar, **extra}


class _IteratorSnapshot:
    """The data iterator's position at save time (the live iterator moves on meanwhile)."""

    def __init__(self, state: Any):
        self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def _save_arg(name: str, value: Any) -> Any:
    if name == CONFIG:
        return ocp.args.JsonSave(value)
    if name == DATA:
        return grain.checkpoint.CheckpointSave(_IteratorSnapshot(value))
    return ocp.args.StandardSave(value)


def _restore_arg(name: str, target: Any) -> Any:
    if name == CONFIG:
        return ocp.args.JsonRestore()
    if name == DATA:
        return grain.checkpoint.CheckpointRestore(target)  # the live iterator, restored in place
    return ocp.args.StandardRestore(target)


def save_args(items: Mapping[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(**{name: _save_arg(name, v) for name, v in items.items()})


def restore_args(targets: Mapping[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(**{name: _restore_arg(name, t) for name, t in targets.items()})


def items_in(directory: PathLike) -> set[str]:
    """The item names a checkpoint directory holds."""
    directory = as_path(directory)
    return {p.name for p in directory.iterdir() if p.is_dir()} if directory.is_dir() else set()


def read_config(directory: PathLike) -> dict[str, Any]:
    """The config item of a checkpoint; one-line errors for other directories and for
    pretrained directories of the earlier layout."""
    directory = as_path(directory)
    if not (directory / CONFIG).is_dir():
        raise CheckpointError(
            f"{directory} is not a reducio-jax checkpoint (no '{CONFIG}' item); create one with "
            "convert_torch_weights.py, or export a training run"
        )
    item = dict(restore(directory, {CONFIG: None})[CONFIG])
    if item.get("format") != FORMAT:
        raise CheckpointError(
            f"{directory} has an older checkpoint layout (format {item.get('format', 1)}, this "
            f"version reads {FORMAT}); re-convert it with convert_torch_weights.py"
        )
    return item


def write_arrays_whole_in_one_process() -> None:
    """Orbax's replica-parallel saving (its default off GPU) splits the write of a replicated
    array across the array's replicas: one compiled slice per device and array. That pays only
    when the replicas live on several hosts; in a single process (one CPU host with simulated
    devices, one TPU host) it cost 184 small compiles, ~26 s, per save of the test suite's micro
    model on 8 devices. A single process therefore writes each array whole. (Orbax keeps its
    array handler in a global registry; this replaces only that handler's replica choice.)"""
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        array_metadata_store=array_metadata_store.Store(),  # as in Orbax's default handler
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def save(directory: PathLike, items: Mapping[str, Any]) -> Path:
    """Writes `items` as one checkpoint directory (replacing what was there), atomically."""
    directory = as_path(directory)
    make_dirs(directory.parent)  # in a bucket: that the bucket exists (Orbax would create it)
    write_arrays_whole_in_one_process()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, save_args(items), force=True)
    return directory


def restore(directory: PathLike, targets: Mapping[str, Any]) -> dict[str, Any]:
    """The items named in `targets` (abstract states with shardings; None for the config)."""
    directory = as_path(directory)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return dict(checkpointer.restore(directory, restore_args(targets)))


def copy_items(source: PathLike, out: PathLike, names: Iterable[str]) -> list[str]:
    """Copies the items `names` that `source` holds into a new checkpoint directory `out`
    (replaced whole, via a temporary directory); returns the names copied. In a bucket the
    last step, the rename, is a copy: `out` has its metadata file only once it is complete."""
    source, out = as_path(source), as_path(out)
    names = [name for name in names if (source / name).is_dir()]
    tmp = out.with_name(out.name + TMP_MARK + "-copy")
    rmtree(tmp)
    make_dirs(tmp)
    for name in names:
        copytree(source / name, tmp / name)
    if (source / METADATA_FILE).is_file():
        (source / METADATA_FILE).copy(tmp / METADATA_FILE, overwrite=True)
    rmtree(out)
    tmp.rename(out)
    return names


def incomplete_saves(directory: Path) -> list[str]:
    """Names of uncommitted (interrupted) saves in a run's checkpoint directory."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if TMP_MARK in p.name)


class RunCheckpoints:
    """The steps of a run, `<directory>/<step>/`, each a checkpoint of the layout above.

    Saves are asynchronous (arrays are copied, then written in the background); only the last
    `keep` steps are kept. A save goes to `<step>.orbax-checkpoint-tmp-<time>/` and is renamed
    to `<step>/` once every process has written it (Orbax's atomic commit), so a process killed
    mid-save leaves only a tmp directory that `latest_step()` never sees; `cleanup=True`
    deletes such leftovers."""

    def __init__(
        self,
        directory: PathLike,
        *,
        keep: int,
        async_save: bool = True,
        cleanup: bool = False,
    ):
        self.directory = as_path(directory)
        self.incomplete = incomplete_saves(self.directory)
        if cleanup and jax.process_index() == 0:
            # Deleted here, synchronously: Orbax's own clean-up runs in a background thread that
            # fails noisily when the process exits right after set-up (e.g. on bad input).
            for name in self.incomplete:
                rmtree(self.directory / name)
        write_arrays_whole_in_one_process()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1), enable_async_checkpointing=async_save, create=True
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in (*NETWORKS, OPTIMIZER)}
        handlers[CONFIG] = ocp.JsonCheckpointHandler()
        handlers[DATA] = grain.checkpoint.CheckpointHandler()
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, items: Mapping[str, Any]) -> None:
        self.manager.save(step, args=save_args(items), force=True)

    def restore(self, step: int, targets: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.manager.restore(step, args=restore_args(targets)))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
