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


# Reports share_one_heap()'s answer, then the fewest page faults of a repeated convolution
# whose worker threads take scratch over 64 MiB each (YNNPACK pads each thread's share of the
# input), and how many heaps glibc holds.
ONE_HEAP_PROBE = """
import ctypes, os, resource, sys, tempfile
import jax, jax.numpy as jnp
from reducio_jax.models import host_memory
if sys.argv[1] == "after":
    jnp.zeros(1).block_until_ready()  # JAX's CPU backend and its threads have started
shared = host_memory.share_one_heap()
dims = ("NHWC", "HWIO", "NHWC")
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=dims))
x, w = jnp.ones((8, 256, 256, 96)), jnp.ones((3, 3, 96, 8))  # 201 MB in, 17 MB out
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    conv(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(faults[1:])  # the fewest of the runs after the first
libc = ctypes.CDLL(None)
libc.fdopen.restype, libc.fdopen.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_char_p)
libc.malloc_info.argtypes, libc.fclose.argtypes = (ctypes.c_int, ctypes.c_void_p), (ctypes.c_void_p,)
with tempfile.TemporaryFile() as report:
    stream = libc.fdopen(os.dup(report.fileno()), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    report.seek(0)
    heaps = report.read().count(b"<heap nr=")
print(shared, faults, heaps)
"""


def _one_heap_probe(when: str, **env) -> tuple[bool, int, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    result = subprocess.run(
        [sys.executable, "-c", ONE_HEAP_PROBE, when],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    shared, faults, heaps = result.stdout.split()
    return shared == "True", int(faults), int(heaps)


PAGES = (64 << 20) // 4096  # 4 KiB pages of 64 MiB: a thread arena's largest heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_one_heap_before_jax_starts_reuses_the_output():
    shared, faults, heaps = _one_heap_probe("before", REDUCIO_JAX_MALLOC="1")
    assert shared and heaps == 1
    assert faults < PAGES // 4  # the scratch comes back from the heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_one_heap_too_late_or_switched_off_changes_nothing():
    for when, switch in (("after", "1"), ("before", "0")):
        shared, faults, heaps = _one_heap_probe(when, REDUCIO_JAX_MALLOC=switch)
        assert not shared and heaps > 1
        assert faults >= PAGES  # scratch over 64 MiB mapped afresh, every run
