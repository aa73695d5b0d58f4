"""Host memory for XLA:CPU: freed buffers are reused instead of handed back to the kernel.

XLA:CPU allocates every temporary of a program run with the C library's malloc. glibc serves a
block of more than 128 KiB-32 MiB with a fresh `mmap` and returns it with `munmap` when freed,
so each run of a program touches all its large buffers for the first time again: one page
fault per 4 KiB page, costly in a virtual machine. Measured on the 2-core CI machine (Intel
Xeon, jax 0.10.2; benchmarks/RESULTS.md): an elementwise pass over 134 MB ran at 4-5 GB/s with
glibc's defaults and at 25-28 GB/s with the settings below; the decoder's convolutions'
output buffers pay the same.

`reuse_freed_memory()` (called once, the first time an inference program is lowered for the CPU
(`lowering.lower`) or a training step is jitted for CPU devices) sets
glibc's `M_MMAP_MAX` to 0 (every block from the heap) and `M_TRIM_THRESHOLD` to its largest
value (freed heap memory is kept for the next run). The process then keeps its peak heap
until it exits. Transparent huge pages for the heap (another 1.2-1.6x on large matmuls here)
can only be asked for when the process starts: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

Blocks that other threads allocate escape these settings: each thread has its own malloc
arena, whose heaps hold at most 64 MiB, so a larger block there is mmapped afresh on every
run. XLA allocates a program's temporaries off the Python thread, and YNNPACK's convolutions
take per-thread scratch of about 100 MB at 256 px: the tiny model's 16x256x256 reconstruct
took 1.2 million page faults a run. `share_one_heap()` gives every thread the main heap
(glibc's `M_ARENA_MAX` = 1): no faults, and that reconstruct ran 7.4-8.0 s against 8.7-9.7 s
in alternating runs (one 16x256x256 32->32 convolution alone: 340 ms against 600 ms). It only
reaches threads that have not allocated yet, so it must run before JAX starts its CPU
backend, and it costs compile time, the threads then contending for one heap (the tiny 256 px
reconstruct compiled in 17 s against 12 s, the 32 px training step in 54 s against 38 s). The
inference commands (`reconstruct`, `encode`, `decode`, `eval`) and the inference benchmarks
call it; training leaves it off. `REDUCIO_JAX_MALLOC=0` turns both settings off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import tempfile

from jax._src import xla_bridge  # backends_are_initialized: no public spelling in jax 0.10

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
M_ARENA_MAX = -8
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (it has `mallopt`), else None."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None  # e.g. musl has no mallopt


def _mallopt():
    """glibc's `mallopt`, or None: not glibc on Linux, or `REDUCIO_JAX_MALLOC=0`."""
    libc = _glibc()
    if libc is None or os.environ.get("REDUCIO_JAX_MALLOC", "1") == "0":
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


@functools.cache
def reuse_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (once per process); whether it was set."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD))


_one_heap = False  # set by share_one_heap()


def share_one_heap() -> bool:
    """Every thread allocates from the main heap from now on, and freed memory is kept (see the
    module docstring). Call it before the first JAX computation: once JAX's CPU backend has
    started, its threads keep their own arenas and this does nothing. Whether it was set."""
    global _one_heap
    mallopt = _mallopt()
    if not _one_heap and mallopt is not None and not xla_bridge.backends_are_initialized():
        _one_heap = bool(mallopt(M_ARENA_MAX, 1)) and reuse_freed_memory()
    return _one_heap


def release_freed_memory() -> bool:
    """Hands the heap's free memory back to the kernel (glibc's `malloc_trim`), e.g. what a
    compile freed, so that the memory available reads true again; whether it could."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def one_heap_shared() -> bool:
    """Whether `share_one_heap()` has given this process one heap (e.g. for a benchmark's record)."""
    return _one_heap


def heap_count() -> int | None:
    """How many malloc heaps glibc holds (its `malloc_info` report): 1 once every thread shares
    the main heap; None off glibc."""
    libc = _glibc()
    if libc is None:
        return None
    malloc_info, fdopen, fclose = libc.malloc_info, libc.fdopen, libc.fclose
    fdopen.restype, fdopen.argtypes = ctypes.c_void_p, (ctypes.c_int, ctypes.c_char_p)
    malloc_info.argtypes, fclose.argtypes = (ctypes.c_int, ctypes.c_void_p), (ctypes.c_void_p,)
    with tempfile.TemporaryFile() as report:
        stream = fdopen(os.dup(report.fileno()), b"w")
        malloc_info(0, stream)
        fclose(stream)
        report.seek(0)
        return report.read().count(b"<heap nr=")
