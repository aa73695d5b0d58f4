"""Executables kept on disk between processes: a second run skips tracing, lowering and
compiling its programs, not only compiling them (JAX's persistent cache is keyed by the lowered
program, so it must still trace and lower).

Inside `executable_store(directory)` (every command, under its `--compilation_cache`), each
`Programs` executable of one device is looked up as `<directory>/executables/<key>.pkl`
before it is traced, and written there after it is compiled (JAX's
`serialize_executable`). The key covers what the program depends on: the package's source
code, the jax and jaxlib versions, XLA_FLAGS and the REDUCIO_JAX_* environment, the backend
and its devices, the model's config and its state's shapes, the op, the tiling and the
inputs' shapes and dtypes. Programs placed on several devices, or traced under a mesh or for
another platform, are not kept. A file that cannot be read is compiled again; the files are
pickles, so keep the directory to yourself (as JAX's own cache).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import pickle
from collections.abc import Iterator

import jax
from jax.experimental import serialize_executable

from reducio_jax.storage.paths import as_path, make_dirs, write_bytes

_ACTIVE: contextvars.ContextVar[ExecutableStore | None] = contextvars.ContextVar(
    "reducio_jax_executable_store", default=None
)
PACKAGE = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def _source_digest() -> str:
    """The package's source code, as this process imported it."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + path.read_bytes())
    return digest.hexdigest()


def fingerprint() -> str:
    """What every stored executable depends on besides its own key (read at each use: the
    environment may change within a process)."""
    digest = hashlib.sha256(_source_digest().encode())
    device = jax.devices()[0]
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("REDUCIO_JAX_"))
    facts = (
        jax.__version__,
        importlib.metadata.version("jaxlib"),
        os.environ.get("XLA_FLAGS", ""),
        env,
        device.platform,
        device.device_kind,
        jax.device_count(),
        jax.config.jax_enable_x64,
        jax.config.jax_default_matmul_precision,
    )
    digest.update(repr(facts).encode())
    return digest.hexdigest()


class ExecutableStore:
    """A folder (local or gs://) of serialized executables, by key."""

    def __init__(self, directory: str):
        self.root = as_path(directory) / "executables"
        self.loaded = 0
        self.saved = 0

    def _path(self, key: str):
        return self.root / (hashlib.sha256((fingerprint() + key).encode()).hexdigest() + ".pkl")

    def load(self, key: str) -> jax.stages.Compiled | None:
        path = self._path(key)
        try:
            if not path.exists():
                return None
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            executable = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception:  # noqa: BLE001 - unreadable or from another build: compile instead
            return None
        self.loaded += 1
        return executable

    def save(self, key: str, executable: jax.stages.Compiled) -> None:
        try:
            data = pickle.dumps(serialize_executable.serialize(executable))
            make_dirs(self.root)
            write_bytes(self._path(key), data)
        except Exception:  # noqa: BLE001 - a program that cannot be kept is compiled next time
            return
        self.saved += 1


def active() -> ExecutableStore | None:
    """The store of the command running in this context, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def executable_store(directory: str | None) -> Iterator[ExecutableStore | None]:
    """Executables are read from and written to `directory` inside (None or '': not at all)."""
    store = ExecutableStore(directory) if directory else None
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)
