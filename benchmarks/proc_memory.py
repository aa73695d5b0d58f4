"""This process's memory from the kernel's counters (Linux `/proc/self`), for measurements of
both sides of a comparison: imports neither JAX nor torch.

* `status_bytes(name)`: a `/proc/self/status` field in bytes (VmRSS, VmHWM, ...), None if absent.
* `reset_peak()`: hands freed heap memory back (glibc's `malloc_trim`), resets the kernel's
  high-water mark (VmHWM, through `/proc/self/clear_refs`); the resident set now, or None
  where the kernel offers no reset.
"""

from __future__ import annotations

import ctypes


def status_bytes(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def trim_heap() -> None:
    """glibc's `malloc_trim(0)`: freed heap pages back to the kernel (no-op elsewhere)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> int | None:
    trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return status_bytes("VmRSS")
