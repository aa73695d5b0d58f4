"""Orbax checkpoints of the train state and of the Grain data iterator.

A checkpoint `<workdir>/checkpoints/<step>/` holds two items: `state` (the whole `TrainState`
as a nested dict of arrays: parameters, both Adam states, BatchNorm statistics, step, rng) and
`data` (each process's Grain iterator position, one JSON file per process, written by Grain's
own Orbax handler). Saves are asynchronous (the arrays are copied, then written in the
background) and only the last `keep` checkpoints are kept. Restoring puts every array straight
into its shards.

A save is written to `<step>.orbax-checkpoint-tmp-<time>/` and renamed to `<step>/` once every
process has finished writing (Orbax's atomic commit), so a process killed mid-save (SIGKILL,
power loss) leaves only a tmp directory: `latest_step()` never sees it, `--resume` takes the last
complete checkpoint, and the training run (`cleanup=True`) deletes such leftovers at start.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix of a save that is not committed yet


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def to_nested(tree: Any) -> dict:
    """Any pytree -> nested dict of its leaves keyed by path names (Orbax-friendly)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        names = [_key_name(k) for k in path]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_nested(like: Any, nested: dict) -> Any:
    """Inverse of `to_nested`, with the tree structure of `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for key in path:
            node = node[_key_name(key)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


class _IteratorSnapshot:
    """The data iterator's position at save time (the live iterator moves on meanwhile)."""

    def __init__(self, state: Any):
        self._state = (
            json.dumps(state, indent=4).encode() if not isinstance(state, bytes) else state
        )

    def get_state(self) -> bytes:
        return self._state


def incomplete_saves(directory: pathlib.Path) -> list[str]:
    """Names of uncommitted (interrupted) saves in a checkpoint directory."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if TMP_MARK in p.name)


class Checkpointer:
    """Save / restore (state, data iterator) under `<workdir>/checkpoints`."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        keep: int,
        async_save: bool = True,
        cleanup: bool = False,
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.incomplete = incomplete_saves(self.directory)
        if cleanup and jax.process_index() == 0:
            # Deleted here, synchronously: Orbax's own clean-up runs in a background thread that
            # fails noisily when the process exits right after set-up (e.g. on bad input).
            for name in self.incomplete:
                shutil.rmtree(self.directory / name, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any | None) -> None:
        items = {"state": ocp.args.StandardSave(to_nested(state))}
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> Any:
        """The state of `step` in the shardings given by `abstract_state`'s ShapeDtypeStructs;
        restores the position of `iterator` (a Grain iterator) in place when given."""
        items = {"state": ocp.args.StandardRestore(to_nested(abstract_state))}
        has_data = (self.directory / str(step) / "data").is_dir()
        if iterator is not None and has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        elif iterator is not None:
            log.warning("Checkpoint %d has no data-iterator state; the data starts over.", step)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return from_nested(abstract_state, restored["state"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
