"""The CPU's malloc setting (reducio_jax/models/host_memory.py), in fresh processes: set on
`import reducio_jax` for a CPU process, or on the first model trace on the CPU; large blocks
then come from the main heap, on the main thread and on new threads; off with
REDUCIO_JAX_MALLOC=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Reports whether the setting was applied (after `import reducio_jax`, and after tracing one
# convolution), and whether 64 MiB (main thread) and 128 MiB (a new thread, whose own arena
# could only mmap it) come from the main heap, below the program break, rather than an mmap.
PROBE = """
import ctypes, threading
import reducio_jax
from reducio_jax.models import convolution, host_memory
on_import = host_memory.reuse_freed_memory.cache_info().currsize
import jax.numpy as jnp
x, w = jnp.ones((1, 2, 4, 4, 8)), jnp.ones((3, 3, 3, 8, 8))
convolution.conv_general_dilated(x, w, (1, 1, 1), [(1, 1)] * 3,
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.sbrk.argtypes = (ctypes.c_size_t,), (ctypes.c_long,)
blocks = [libc.malloc(64 << 20)]
thread = threading.Thread(target=lambda: blocks.append(libc.malloc(128 << 20)))
thread.start(), thread.join()
after_trace = host_memory.reuse_freed_memory.cache_info().currsize
print(on_import, after_trace, *(block < libc.sbrk(0) for block in blocks))
"""


def _probe(**env) -> list[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


@linux_only
def test_set_on_import_for_the_cpu():
    assert _probe(REDUCIO_JAX_MALLOC="1") == ["1", "1", "True", "True"]


@linux_only
def test_switched_off():
    assert _probe(REDUCIO_JAX_MALLOC="0") == ["1", "1", "False", "False"]  # called, not set


@linux_only
def test_accelerator_process_waits_for_a_cpu_trace():
    # JAX_PLATFORMS names a GPU: nothing on import; the probe then switches JAX to the CPU
    # (this machine has no GPU), and the CPU trace sets it.
    probe = PROBE.replace(
        "import jax.numpy as jnp",
        "import jax, jax.numpy as jnp\njax.config.update('jax_platforms', 'cpu')",
    )
    env = {**os.environ, "JAX_PLATFORMS": "cuda", "REDUCIO_JAX_MALLOC": "1"}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[:3] == ["0", "1", "True"]
