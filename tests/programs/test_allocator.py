"""The CPU backend's malloc settings (reducio_jax/programs/allocator.py), in fresh processes:
freed memory reused from the first program lowered for the CPU, one heap for all threads when asked
before JAX starts; both off with REDUCIO_JAX_MALLOC=0."""

from __future__ import annotations

import sys

import pytest
from helpers import run_probe

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Lowers an inference program for the CPU, then reports whether the setting was applied, and
# whether a 64 MiB block now comes from the heap (below the program break) rather than its own
# mmap.
PROBE = """
import ctypes, jax, jax.numpy as jnp
from flax import nnx
from configs import tiny
from reducio_jax.models import build_vae
from reducio_jax.programs import allocator, lowering
with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(build_vae(tiny.get_config().model))
frame = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
lowering.lower("content", graphdef, state, (frame,), None)
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.sbrk.argtypes = (ctypes.c_size_t,), (ctypes.c_long,)
block = libc.malloc(64 << 20)
print(allocator.reuse_freed_memory.cache_info().currsize, block < libc.sbrk(0))
"""


def _probe(**env) -> list[str]:
    return run_probe(PROBE, **env).split()


@linux_only
def test_set_on_the_first_cpu_trace():
    assert _probe(REDUCIO_JAX_MALLOC="1") == ["1", "True"]  # set by the trace; heap block


@linux_only
def test_switched_off():
    assert _probe(REDUCIO_JAX_MALLOC="0") == ["1", "False"]  # glibc's default: its own mmap


# Reports share_one_heap()'s answer and one_heap_shared()'s after it, then the fewest page
# faults of a repeated convolution whose worker threads take scratch over 64 MiB each (YNNPACK
# pads each thread's share of the input), and how many heaps glibc holds.
ONE_HEAP_PROBE = """
import resource, sys
import jax, jax.numpy as jnp
from reducio_jax.programs import allocator
if sys.argv[1] == "after":
    jnp.zeros(1).block_until_ready()  # JAX's CPU backend and its threads have started
shared = allocator.share_one_heap()
dims = ("NHWC", "HWIO", "NHWC")
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=dims))
x, w = jnp.ones((8, 256, 256, 96)), jnp.ones((3, 3, 96, 8))  # 201 MB in, 17 MB out
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    conv(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(faults[1:])  # the fewest of the runs after the first
heaps = allocator.heap_count()
print(shared, allocator.one_heap_shared(), faults, heaps)
"""


def _one_heap_probe(when: str, **env) -> tuple[bool, int, int]:
    shared, recorded, faults, heaps = run_probe(ONE_HEAP_PROBE, when, **env).split()
    assert recorded == shared  # what benchmarks record
    return shared == "True", int(faults), int(heaps)


PAGES = (64 << 20) // 4096  # 4 KiB pages of 64 MiB: a thread arena's largest heap


@linux_only
def test_one_heap_before_jax_starts_reuses_the_scratch():
    shared, faults, heaps = _one_heap_probe("before", REDUCIO_JAX_MALLOC="1")
    assert shared and heaps == 1
    # the scratch comes back from the heap (under a loaded suite the 17 MB output was seen
    # mapped afresh once, 4096 pages; the scratch alone is over PAGES, as below)
    assert faults < PAGES // 2


@linux_only
def test_one_heap_too_late_or_switched_off_changes_nothing():
    for when, switch in (("after", "1"), ("before", "0")):
        shared, faults, heaps = _one_heap_probe(when, REDUCIO_JAX_MALLOC=switch)
        assert not shared and heaps > 1
        assert faults >= PAGES  # scratch over 64 MiB mapped afresh, every run
