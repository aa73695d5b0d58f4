"""The parity fixtures, whole (`REDUCIO_FIXTURES`) or in this repository's compact form.

`load(fixtures_dir, file)` gives a `Golden`: `golden[name]` is a whole array (inputs, latents,
small outputs), and `golden.assert_close(name, ours, atol)` checks an output against the
reference: the whole array when the file holds it, else the stored sample positions and the
block means (tests/fixtures/README.md). Each of those is within `atol` of the reference whenever
the whole array is, so the compact form keeps every tolerance.
"""

from __future__ import annotations

import pathlib

import numpy as np


class Golden:
    def __init__(self, fixtures_dir: pathlib.Path, file: str):
        self.dir = pathlib.Path(fixtures_dir)
        with np.load(self.dir / file) as data:
            self.arrays = {k: data[k] for k in data.files}

    def __contains__(self, name: str) -> bool:
        return name in self.arrays or f"{name}@from" in self.arrays

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.arrays:
            return self.arrays[name]
        if f"{name}@from" in self.arrays:
            return Golden(self.dir, str(self.arrays[f"{name}@from"]))[name]
        if f"{name}@values" in self.arrays:
            raise KeyError(f"{name} is stored compactly: compare it with assert_close")
        raise KeyError(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.arrays:
            return self.arrays[name].shape
        return tuple(int(n) for n in self.arrays[f"{name}@shape"])

    def assert_close(self, name: str, ours, atol: float) -> None:
        """max |ours - reference| < atol over everything the fixture holds of `name`."""
        ours = np.asarray(ours)
        assert ours.shape == self.shape(name), (name, ours.shape, self.shape(name))
        if name in self.arrays:
            _assert_below(name, ours, self.arrays[name], atol)
            return
        index = self.arrays[f"{name}@index"]
        _assert_below(
            f"{name} (samples)", ours.reshape(-1)[index], self.arrays[f"{name}@values"], atol
        )
        _assert_below(
            f"{name} (block means)",
            block_means(ours, int(self.arrays[f"{name}@pool"])),
            self.arrays[f"{name}@pooled"],
            atol,
        )


def block_means(x: np.ndarray, pool: int) -> np.ndarray:
    """Means over `pool` x `pool` blocks of the last two axes, in float64."""
    *lead, h, w = x.shape
    return x.astype(np.float64).reshape(*lead, h // pool, pool, w // pool, pool).mean(axis=(-3, -1))


def _assert_below(what: str, ours: np.ndarray, want: np.ndarray, atol: float) -> None:
    err = float(np.max(np.abs(ours.astype(np.float64) - want.astype(np.float64))))
    assert err < atol, f"{what}: max abs error {err:.3g} >= {atol:g}"


def load(fixtures_dir: pathlib.Path, file: str) -> Golden:
    return Golden(fixtures_dir, file)
