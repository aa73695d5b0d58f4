"""Host memory for XLA:CPU: freed buffers are reused instead of handed back to the kernel.

XLA:CPU allocates every temporary of a program run with the C library's malloc. glibc serves a
block of more than 128 KiB-32 MiB with a fresh `mmap` and returns it with `munmap` when freed,
so each run of a program touches all its large buffers for the first time again: one page
fault per 4 KiB page, costly in a virtual machine. Measured on the 2-core CI machine (Intel
Xeon, jax 0.10.2; benchmarks/RESULTS.md): an elementwise pass over 134 MB ran at 4-5 GB/s with
glibc's defaults and at 25-28 GB/s with the settings below; the decoder's convolutions'
output buffers pay the same.

`reuse_freed_memory()` (called once, the first time a model traces on the CPU backend) sets
glibc's `M_MMAP_MAX` to 0 (every block from the heap) and `M_TRIM_THRESHOLD` to its largest
value (freed heap memory is kept for the next run). The process then keeps its peak heap
until it exits. `REDUCIO_JAX_MALLOC=0` leaves malloc alone; it does nothing off glibc.
Transparent huge pages for the heap (another 1.2-1.6x on large matmuls here) can only be asked
for when the process starts: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (README, Benchmarks).

Blocks that XLA's worker threads allocate escape these settings: each thread has its own malloc
arena, whose heaps hold at most 64 MiB, so a larger block there is mmapped afresh on every run
(an elementwise op's 134 MB output: 32768 page faults, 72 ms; 26-32 ms from the main heap).
One arena for all threads (`M_ARENA_MAX=1`) fixes that but costs more than it saves for
training and compiling, so it is not set: XLA's parallel compilation then contends for one
heap (the tiny training step compiled in 66 s instead of 37 s and stepped 3.5 s instead of
3.1 s at 32 px). Large clips on the CPU can still ask for it at start-up:
`GLIBC_TUNABLES=glibc.malloc.arena_max=1`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
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
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD))
