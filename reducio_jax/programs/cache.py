"""JAX's persistent compilation cache for every command, and a count of what was compiled.

`use_compilation_cache(directory)` points JAX's cache at a local folder or a bucket (`gs://`,
read and written through etils.epath), with no minimum compile time, so that a second run of a
command on the same shapes loads every executable instead of compiling it; `''` leaves it
off, and `JAX_COMPILATION_CACHE_DIR` in the environment wins. `CompileCount` counts XLA's
backend compiles while it is open (from JAX's monitoring events): how many programs were
compiled, how many came from the cache, and the seconds they took.
"""

from __future__ import annotations

import os

import jax
from jax import monitoring

from reducio_jax.programs.store import LOADED_EVENT
from reducio_jax.storage.paths import as_path

DEFAULT_CACHE = "~/.cache/reducio_jax/xla"
# JAX's monitoring event names (jax/_src/dispatch.py, jax/_src/compiler.py)
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def use_compilation_cache(directory: str | None) -> str | None:
    """Turns the persistent compilation cache on at `directory` (None or '': off); returns the
    directory in use (the environment's `JAX_COMPILATION_CACHE_DIR` wins)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not directory:
        return None
    path = os.fspath(as_path(directory))
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


class CompileCount:
    """Counts XLA compiles while open (`with CompileCount() as count: ...`)."""

    def __init__(self) -> None:
        self.requests = 0  # executables asked of XLA (compiled or loaded from the cache)
        self.from_cache = 0
        self.seconds = 0.0

    @property
    def compiled(self) -> int:
        return self.requests - self.from_cache

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == _BACKEND_COMPILE:
            self.requests += 1
            self.seconds += duration

    def _on_event(self, event: str, **_) -> None:
        if event == _CACHE_HIT:
            self.from_cache += 1
        elif event == LOADED_EVENT:  # an executable loaded from the program store (store.py)
            self.requests += 1
            self.from_cache += 1

    def __enter__(self) -> CompileCount:
        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)

    def describe(self) -> str:
        return (
            f"compiled {self.compiled} program(s) ({self.from_cache} from the cache) "
            f"in {self.seconds:.1f} s"
        )
