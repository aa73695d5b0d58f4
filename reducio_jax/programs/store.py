"""Executables on disk under a key made without tracing: a later process loads the program
instead of tracing, lowering and looking it up in JAX's persistent cache.

JAX's cache keys an executable by its lowered module, so a process traces and lowers every
program before it can find it there (ft4 at 256 px: about 3 s of a warm start). This store
keys it by what made the program: the package's own source files, the library versions, the
backend, its devices and this process's place among the processes, the XLA flags and the JAX
settings that change a trace, and the program's `identity` (for an inference program: the
model's graph definition with every static attribute, the op, the tiling, each input's and
the state's shapes, dtypes and shardings). An entry (one file, `<digest>.exe`) holds the
serialized executable and its memory analysis, so that the memory planner reads the figures
of a program it will not run without loading it.

It lives in a folder of the persistent compilation cache (`--compilation_cache`, or JAX's
`jax_compilation_cache_dir` however set): `<cache>/reducio_jax_programs/`, local or in a
bucket, and is off when that cache is. A local store keeps at most `MAX_BYTES`, the least
recently written entries going first.

On XLA:CPU (jax 0.10.2) an executable serializes without some of its functions when its
process had loaded an executable before compiling it (from JAX's persistent cache, or
deserialized), and a later process then fails to run it ("Function ... not found";
benchmarks/RESULTS.md, "Compile"). So the store takes only executables of processes that
have loaded none (`loaded_any`, from JAX's and this module's events): the first, cold run
of a command fills it. An entry that fails to load is deleted and the program made the usual
way (`Programs` also remakes a loaded program that fails at its first call).

Entries are pickles (the executable itself is code): point the cache only at folders you
trust, as with JAX's own cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from jax import monitoring
from jax.experimental import serialize_executable

from reducio_jax.models import convolution
from reducio_jax.programs.footprint import memory_figures
from reducio_jax.storage.paths import as_path, is_remote, make_dirs, write_bytes

FOLDER = "reducio_jax_programs"
FORMAT = "reducio_jax program store 1"
MAX_BYTES = 4 << 30
LOADED_EVENT = "/reducio_jax/programs/store_loads"  # counted by `cache.CompileCount`
_PACKAGE = os.path.dirname(os.path.dirname(__file__))  # reducio_jax/
_LIBRARIES = ("jax", "jaxlib", "flax", "numpy", "ml_collections", "einops")
_PLUGINS = ("libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin")
# JAX settings that change what a function traces or lowers to.
_JAX_SETTINGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_numpy_rank_promotion",
    "jax_use_shardy_partitioner",
)
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_CONSTANT = re.compile(r"[A-Z][A-Z0-9_]*")


_PROCESS = {"loaded": False}  # whether this process has loaded an executable


def _on_event(event: str, **_) -> None:
    if event in (_JAX_CACHE_HIT, LOADED_EVENT):
        mark_loaded()


def mark_loaded() -> None:
    """Notes that this process deserialized an executable: what it compiles from now on is
    not stored (see the module docstring)."""
    _PROCESS["loaded"] = True


def loaded_any() -> bool:
    return _PROCESS["loaded"]


monitoring.register_event_listener(_on_event)


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the store holds for one program: its memory analysis, and the executable."""

    memory: dict[str, int]  # XLA's memory_analysis() figures (bytes)
    executable: bytes
    trees: tuple  # the executable's (input, output) pytree definitions


@functools.cache
def _source_digest() -> str:
    """sha256 of every Python file of the package (its path and bytes)."""
    digest = hashlib.sha256()
    files = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(_PACKAGE)
        for name in names
        if name.endswith(".py")
    ]
    for file in sorted(files):
        digest.update(os.path.relpath(file, _PACKAGE).encode())
        digest.update(as_path(file).read_bytes())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    found = {}
    for name in _LIBRARIES + _PLUGINS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def describe(value: Any) -> str:
    """A text for `value` that is the same in every process (no memory addresses)."""
    return _ADDRESS.sub("", repr(value))


def _model_settings() -> dict[str, str]:
    """The models' tuning constants (module-level UPPER_CASE names of `reducio_jax.models.*`,
    which pick the forms a program is traced in), the platform traced for and the CPU forms'
    switch: a program traced under other values is another program."""
    found = {
        "target_platform": convolution.target_platform(),
        "REDUCIO_JAX_CPU_CONV": os.environ.get("REDUCIO_JAX_CPU_CONV", "1"),
    }
    for module_name, module in sorted(sys.modules.items()):
        if not module_name.startswith("reducio_jax.models.") or module is None:
            continue
        for name, value in sorted(vars(module).items()):
            if _CONSTANT.fullmatch(name) and not callable(value):
                found[f"{module_name}.{name}"] = describe(value)
    return found


def environment(devices: Sequence[jax.Device]) -> str:
    """What every key shares: source, versions, backend, devices, flags, JAX settings and the
    models' constants."""
    parts = {
        "source": _source_digest(),
        "versions": _versions(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": [d.id for d in devices],
        "process": (jax.process_index(), jax.process_count()),
        "flags": [os.environ.get(name, "") for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")],
        "settings": [str(getattr(jax.config, name, None)) for name in _JAX_SETTINGS],
        "models": _model_settings(),
    }
    return describe(parts)


def directory() -> str | None:
    """The store's folder: inside JAX's persistent compilation cache, None when it is off."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or not jax.config.jax_enable_compilation_cache:
        return None
    return cache.rstrip("/") + "/" + FOLDER if is_remote(cache) else os.path.join(cache, FOLDER)


def key(identity: str, devices: Sequence[jax.Device]) -> str:
    """The entry name of the program described by `identity` on `devices`."""
    text = FORMAT + "\n" + environment(devices) + "\n" + identity
    return hashlib.sha256(text.encode()).hexdigest()


class Store:
    """The entries in `folder` (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = as_path(folder)

    @classmethod
    def current(cls) -> Store | None:
        """The store of this process's compilation cache (None: off)."""
        folder = directory()
        return None if folder is None else cls(folder)

    def _file(self, name: str):
        return self.folder / f"{name}.exe"

    def get(self, name: str) -> Entry | None:
        """The entry `name`, None if absent or unreadable (a foreign or cut file is deleted)."""
        file = self._file(name)
        try:
            data = file.read_bytes()
        except (FileNotFoundError, OSError):
            return None
        try:
            record = pickle.loads(data)
            if record.get("format") != FORMAT:
                raise ValueError(record.get("format"))
            return Entry(record["memory"], record["executable"], record["trees"])
        except Exception:  # noqa: BLE001 - a cut or foreign file: forget it
            self.drop(name)
            return None

    def load(self, name: str, devices: Sequence[jax.Device]) -> jax.stages.Compiled | None:
        """The executable of entry `name` loaded onto `devices`; None (the entry deleted) if
        it is absent or does not load."""
        entry = self.get(name)
        if entry is None:
            return None
        try:
            compiled = serialize_executable.deserialize_and_load(
                entry.executable, *entry.trees, execution_devices=list(devices)
            )
        except Exception:  # noqa: BLE001 - XLA refused it (see the module docstring)
            self.drop(name)
            return None
        monitoring.record_event(LOADED_EVENT)
        return compiled

    def put(self, name: str, compiled: jax.stages.Compiled) -> bool:
        """Stores `compiled` (just compiled) under `name` unless this process has loaded an
        executable before (see the module docstring) or it cannot be serialized; whether it
        was stored."""
        if loaded_any():
            return False
        try:
            payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        except (ValueError, NotImplementedError):
            return False  # not serializable (closed-over constants, a host callback)
        record = {
            "format": FORMAT,
            "memory": memory_figures(compiled),
            "executable": payload,
            "trees": (in_tree, out_tree),
        }
        data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._write(self._file(name), data)
        except Exception as err:  # noqa: BLE001 - a cache: the run goes on without it
            logging.warning("Could not store a compiled program in %s: %s", self.folder, err)
            return False
        self._bound()
        return True

    @staticmethod
    def _write(file, data: bytes) -> None:
        """One upload to a bucket; locally a file of this process's own moved into place
        (processes storing the same program at once each replace it whole)."""
        if is_remote(file):
            write_bytes(file, data)
            return
        folder = os.fspath(make_dirs(file.parent))
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".partial", delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o644)  # as JAX's cache files (NamedTemporaryFile makes 0600)
        os.replace(tmp.name, os.fspath(file))

    def drop(self, name: str) -> None:
        try:
            self._file(name).unlink()
        except (FileNotFoundError, OSError):
            pass

    def _bound(self, limit: int = MAX_BYTES) -> None:
        """Deletes the oldest entries of a local store beyond `limit` bytes."""
        if is_remote(self.folder):
            return
        files = []
        for path in self.folder.glob("*.exe"):
            try:
                stat = os.stat(os.fspath(path))
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, os.fspath(path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= limit:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            total -= size
