"""The CPU backend's malloc setting (reducio_jax/models/host_memory.py), in fresh processes:
set on the first model trace on the CPU, reusing freed memory; off with REDUCIO_JAX_MALLOC=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Traces one convolution on the CPU, then reports whether the setting was applied, and whether
# a 64 MiB block now comes from the heap (below the program break) rather than its own mmap.
PROBE = """
import ctypes, jax, jax.numpy as jnp
from reducio_jax.models import convolution, host_memory
x, w = jnp.ones((1, 2, 4, 4, 8)), jnp.ones((3, 3, 3, 8, 8))
convolution.conv_general_dilated(x, w, (1, 1, 1), [(1, 1)] * 3,
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.sbrk.argtypes = (ctypes.c_size_t,), (ctypes.c_long,)
block = libc.malloc(64 << 20)
print(host_memory.reuse_freed_memory.cache_info().currsize, block < libc.sbrk(0))
"""


def _probe(**env) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_set_on_the_first_cpu_trace():
    assert _probe(REDUCIO_JAX_MALLOC="1") == ["1", "True"]  # set by the trace; heap block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_switched_off():
    assert _probe(REDUCIO_JAX_MALLOC="0") == ["1", "False"]  # glibc's default: its own mmap
