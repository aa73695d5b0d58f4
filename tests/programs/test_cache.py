"""Every command uses JAX's persistent compilation cache (`--compilation_cache`,
reducio_jax/programs/cache.py): a second run of `reconstruct` on the same shapes, in a fresh
process, loads every program from the cache and compiles none, and says so on stderr."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

from helpers import TINY, pattern, recipe_checkpoint, write_video

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _reconstruct(src: pathlib.Path, out: pathlib.Path, ckpt: str, cache: str) -> tuple[int, int]:
    """(programs compiled, programs loaded from the cache) of one run, from its stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name, None)  # the flag's cache, not the test run's
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "reducio_jax", "reconstruct", str(src), str(out),
           "--checkpoint", ckpt, "--config", TINY, "--keep_fps",
           "--compilation_cache", cache]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"compiled (\d+) program\(s\) \((\d+) from the cache\)", done.stderr)
    assert found, done.stderr[-2000:]
    return int(found.group(1)), int(found.group(2))


def test_a_second_run_compiles_nothing(fixtures_dir, tmp_path):
    ckpt = str(recipe_checkpoint(fixtures_dir, "tiny", tmp_path / "tiny.ckpt"))
    src = write_video(tmp_path / "in.mp4", pattern(16, 32, 32))
    cache = str(tmp_path / "xla-cache")
    compiled, loaded = _reconstruct(src, tmp_path / "a.mp4", ckpt, cache)
    assert compiled > 0 and loaded == 0 and any(pathlib.Path(cache).iterdir())
    compiled_again, loaded_again = _reconstruct(src, tmp_path / "b.mp4", ckpt, cache)
    assert compiled_again == 0 and loaded_again == compiled

