"""Host memory for XLA:CPU: freed buffers are reused instead of handed back to the kernel.

XLA:CPU allocates every temporary and output of a program run with the C library's malloc.
glibc serves a block of more than 128 KiB-32 MiB with a fresh `mmap` and returns it with
`munmap` when freed, so each run of a program touches all its large buffers for the first time
again: one page fault per 4 KiB page, costly in a virtual machine. Blocks allocated on XLA's
worker threads are worse off: each thread gets its own malloc arena, whose heaps are at most
64 MiB, so a larger block there is always mmapped, whatever `M_MMAP_MAX` says. Measured on the
2-core CI machine (Intel Xeon, jax 0.10.2; benchmarks/RESULTS.md): an elementwise pass over
134 MB ran at 4-5 GB/s with glibc's defaults; its output buffer still took 32768 page faults a
run with the first two settings below, and none with all three (26-32 ms against 70-80 ms).

`reuse_freed_memory()` sets glibc's `M_MMAP_MAX` to 0 (every block from the heap),
`M_TRIM_THRESHOLD` to its largest value (freed heap memory is kept for the next run) and
`M_ARENA_MAX` to 1 (every thread allocates from the main heap). The arena limit only reaches
threads that have not allocated yet, so `import reducio_jax` calls it before JAX starts its
threads when the process will run JAX on the CPU (`runs_on_cpu()`), and the first model trace
on the CPU backend calls it otherwise. The process then keeps its peak heap until it exits.
`REDUCIO_JAX_MALLOC=0` leaves malloc alone; it does nothing off glibc. Transparent huge pages
for the heap (another 1.2-1.6x on large matmuls here) can only be asked for when the process
starts: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (README, Benchmarks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
M_ARENA_MAX = -8
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


@functools.cache
def reuse_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (once per process); whether it was set."""
    if os.environ.get("REDUCIO_JAX_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD))
    return all([bool(mallopt(param, value)) for param, value in settings])


def runs_on_cpu() -> bool:
    """Whether this process will run JAX on the CPU, decided without starting JAX's backends:
    `JAX_PLATFORMS` puts the CPU first, or it is unset and no GPU/TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    return not any(importlib.metadata.entry_points(group="jax_plugins"))
