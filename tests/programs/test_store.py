"""The program store (reducio_jax/programs/store.py): a later process loads an inference program
by a key made without tracing and runs it to the same output; the key changes with what
changes the program; a probe reads the stored figures without compiling; a process that has
loaded an executable stores none (XLA:CPU then serializes incomplete ones); an entry that does
not load, or a loaded program that fails at its first call, is dropped and the program made
again."""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_probe

from configs import tiny
from reducio_jax import ReducioVAE
from reducio_jax.models import convolution
from reducio_jax.programs import store

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
# A fresh process: tiny (seed 0) with the compilation cache at argv[1] reconstructs one clip of
# argv[3] x argv[3] px (output: argv[2]); stdout: what the model and JAX's events counted.
RECONSTRUCT = f"""
import json, sys
import jax.numpy as jnp, numpy as np
from reducio_jax import ReducioVAE
from reducio_jax.programs import cache
cache.use_compilation_cache(sys.argv[1])
vae = ReducioVAE.from_config({TINY!r})
size = int(sys.argv[3])
video = jnp.linspace(-1, 1, 16 * size * size * 3).reshape(1, 16, size, size, 3)
with cache.CompileCount() as count:
    out = vae.reconstruct(video)
np.save(sys.argv[2], np.asarray(out))
print(json.dumps({{"loaded": vae.programs.loaded, "made": vae.programs.compiles,
                  "compiled": count.compiled, "from_cache": count.from_cache}}))
"""
# A process that has loaded an executable (the 32x32 encode program, from JAX's cache at
# argv[1] once a first run of this has put it there) compiles the 64x64 reconstruct program
# and writes it into the store itself, under the name `Programs` looks it up by: XLA:CPU
# serializes it without the functions the loaded one brought.
INCOMPLETE = f"""
import pickle, sys
import jax
from flax import nnx
from jax.experimental import serialize_executable
from reducio_jax import ReducioVAE
from reducio_jax.programs import cache, lowering, store
from reducio_jax.programs.footprint import memory_figures
cache.use_compilation_cache(sys.argv[1])
vae = ReducioVAE.from_config({TINY!r})
encode = lowering.window_inputs("encode", vae.model.sizes, 1, (32, 32))
graphdef, state = nnx.split(vae.model)
lowering.lower("encode", graphdef, state, encode, None).compile()
inputs = lowering.window_inputs("reconstruct", vae.model.sizes, 1, (64, 64))
jax.config.update("jax_enable_compilation_cache", False)
compiled = lowering.lower("reconstruct", graphdef, state, inputs, None).compile()
jax.config.update("jax_enable_compilation_cache", True)
name = vae.programs.stored_name("reconstruct", 1, (64, 64), None)
payload, *trees = serialize_executable.serialize(compiled)
record = dict(format=store.FORMAT, memory=memory_figures(compiled), executable=payload,
              trees=tuple(trees))
store.Store.current()._write(store.Store.current()._file(name), pickle.dumps(record))
print(store.loaded_any())
"""


def _reconstruct(cache: pathlib.Path, out: pathlib.Path, size: int = 32) -> dict:
    stdout = run_probe(RECONSTRUCT, str(cache), str(out), str(size), JAX_COMPILATION_CACHE_DIR="")
    return json.loads(stdout.strip().splitlines()[-1])


def _entries(cache: pathlib.Path) -> list[pathlib.Path]:
    return sorted((cache / store.FOLDER).glob("*.exe"))


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> pathlib.Path:
    """A cache folder whose store holds tiny's 32x32 reconstruct program (a cold process's)."""
    cache = tmp_path_factory.mktemp("filled") / "cache"
    first = _reconstruct(cache, cache.parent / "first.npy")
    assert first["loaded"] == 0 and first["made"] == 1 and first["compiled"] >= 1
    assert len(_entries(cache)) == 1
    return cache


@pytest.fixture()
def use_store(filled):
    """This process's store is `filled`'s for the test."""
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(filled))
    try:
        yield store.Store.current()
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)


def test_a_later_process_loads_the_program_and_gets_the_same_output(filled, tmp_path):
    second = _reconstruct(filled, tmp_path / "second.npy")
    assert second["loaded"] == 1 and second["made"] == 1  # loaded, not traced and compiled
    assert second["compiled"] == 0 and second["from_cache"] >= 1
    first = np.load(filled.parent / "first.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "second.npy"), first)


def test_a_process_that_loaded_an_executable_stores_none(filled, tmp_path):
    """With the store set aside, the next process gets its programs from JAX's cache (the
    cold process's) and stores none of them."""
    shutil.move(filled / store.FOLDER, tmp_path / "aside")
    try:
        again = _reconstruct(filled, tmp_path / "b.npy")
        assert again["loaded"] == 0 and again["compiled"] == 0 and not _entries(filled)
    finally:
        shutil.rmtree(filled / store.FOLDER, ignore_errors=True)
        shutil.move(tmp_path / "aside", filled / store.FOLDER)


def test_a_loaded_program_that_fails_its_first_call_is_made_again(filled, tmp_path):
    before = _entries(filled)
    loaded = [run_probe(INCOMPLETE, str(filled), JAX_COMPILATION_CACHE_DIR="") for _ in range(2)]
    assert loaded[-1].split()[-1] == "True"  # the second had loaded the encode program
    assert len(_entries(filled)) == len(before) + 1
    again = _reconstruct(filled, tmp_path / "b.npy", 64)
    assert again["loaded"] == 1 and again["made"] == 2  # loaded, failed, made here
    assert _entries(filled) == before  # the incomplete entry was dropped
    video = jnp.linspace(-1, 1, 16 * 64 * 64 * 3).reshape(1, 16, 64, 64, 3)
    want = ReducioVAE.from_config(tiny.get_config()).reconstruct(video)
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), want, atol=1e-5)


def test_the_key_follows_what_makes_the_program(use_store, monkeypatch):
    a, b = (ReducioVAE.from_config(tiny.get_config()) for _ in range(2))
    name = a.programs.stored_name("encode", 1, (32, 32), None)
    assert name == b.programs.stored_name("encode", 1, (32, 32), None)  # another instance
    assert name != a.programs.stored_name("encode", 2, (32, 32), None)
    assert name != a.programs.stored_name("encode", 1, (64, 32), None)
    assert name != a.programs.stored_name("decode", 1, (32, 32), None)
    half = tiny.get_config()
    half.model.dtype = "bfloat16"
    assert name != ReducioVAE.from_config(half).programs.stored_name("encode", 1, (32, 32), None)
    monkeypatch.setattr(convolution, "CHUNK_BYTES", 1 << 20)  # another form of the convolutions
    assert name != a.programs.stored_name("encode", 1, (32, 32), None)


def test_a_probe_reads_the_stored_figures_and_a_bad_entry_is_dropped(use_store):
    probe = ReducioVAE.from_config(tiny.get_config())
    name = probe.programs.stored_name("reconstruct", 1, (32, 32), None)
    entry = use_store.get(name)
    assert entry is not None  # the cold process's program, found under this process's key
    footprint = probe.programs.footprint("reconstruct", 1, (32, 32), None, keep=False)
    assert probe.programs.compiles == 0  # nothing compiled or loaded: the figures were stored
    assert (footprint.temp, footprint.argument) == (entry.memory["temp"], entry.memory["argument"])

    path = use_store._file(name)
    saved = path.read_bytes()
    try:
        path.write_bytes(saved[: len(saved) // 2])  # a cut file
        assert use_store.get(name) is None and not path.exists()
        path.write_bytes(pickle.dumps(dict(pickle.loads(saved), executable=b"not one")))
        fresh = ReducioVAE.from_config(tiny.get_config())
        assert fresh.footprint("reconstruct", 1, (32, 32), None) == footprint
        assert fresh.programs.loaded == 0 and fresh.programs.compiles == 1  # made again
        assert not path.exists()  # dropped (and this process, which loaded others, stores none)
    finally:
        path.write_bytes(saved)
