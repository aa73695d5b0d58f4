"""The memory there is for a program: the accelerator's free memory, or on the CPU the least of
the kernel's MemAvailable, the cgroup's limit less its usage and the address-space limit
(`ulimit -v`) less the process's size, less `RESERVE` for the rest of the process (the
compiler, decoding, encoding). `--max_memory` (`budget(max_memory)`) replaces it, on the CPU
less the process's resident set and `RESERVE`.
"""

from __future__ import annotations

import pathlib
import re
import resource

import jax

from reducio_jax.errors import InputError

# CPU: bytes kept for the rest of the process, the compiler's memory first (compiling the tiny
# model's tiled 288x640 program raised the peak RSS by 1.1 GB; with 512 MiB kept, a run under
# --max_memory 5GB peaked at 5.0 GiB)
RESERVE = 2**30
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

MaxMemory = int | str | None  # bytes, a size such as "8GB", or None (what there is)


def gib(n: int, unit: str = " GiB") -> str:
    """Bytes as "1.25 GiB" (`unit=""`: "1.25")."""
    return f"{n / 2**30:.2f}{unit}"


def parse_size(text: str | int) -> int:
    """'8GB', '512M', '1.5GiB', '1000000' (or an int) -> bytes (binary units: 1 GB = 2**30)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise InputError(f"--max_memory {text}: give a positive size such as 8GB")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--max_memory {text!r}: give a size such as 8GB, 512MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def available_memory(
    device: jax.Device | None = None, address_space: bool = True
) -> tuple[int, str]:
    """(bytes free for a program, where that figure comes from) on `device` (default: the
    first). `address_space=False`: leave out the address-space limit (`ulimit -v`), where an
    allocation fails with an error, and keep the memory whose exhaustion ends in the kernel's
    OOM killer."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if stats.get("bytes_limit"):
            free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
            return free, f"free memory of {device.device_kind}"
    free, source = host_available(address_space)
    return max(0, free - RESERVE), source


def host_available(address_space: bool = True) -> tuple[int, str]:
    """The least of MemAvailable, the cgroup's room and (with `address_space`) the
    address-space limit's room."""
    found = [(_meminfo("MemAvailable"), "available RAM")]
    found.append((_cgroup_room(), "the cgroup's memory limit"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if address_space and soft != resource.RLIM_INFINITY:
        size = process_status("VmSize")
        found.append((soft - size if size is not None else None, "the address-space limit"))
    return min((f for f in found if f[0] is not None), key=lambda f: f[0])


def budget(max_memory: MaxMemory, device: jax.Device | None = None) -> tuple[int, str]:
    """`max_memory` (bytes for the whole process, less what it already holds and `RESERVE`
    on the CPU) or what there is."""
    if max_memory is None:
        return available_memory(device)
    limit = parse_size(max_memory)
    if (device or jax.devices()[0]).platform != "cpu":
        return limit, "--max_memory"
    return max(0, limit - (process_status("VmRSS") or 0) - RESERVE), "--max_memory"


def process_status(name: str) -> int | None:
    """A byte figure of this process from /proc/self/status ("VmRSS", "VmSize", "VmHWM")."""
    return _kib_field(_read("/proc/self/status"), name)


def _read(path: str) -> str | None:
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return None


def _kib_field(text: str | None, name: str) -> int | None:
    match = re.search(rf"^{name}:\s+(\d+) kB", text or "", re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _meminfo(name: str) -> int | None:
    return _kib_field(_read("/proc/meminfo"), name)


def _cgroup_room() -> int | None:
    """cgroup v2 memory.max - memory.current (or v1's limit - usage); None when unlimited."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        cap, used = _read(limit), _read(usage)
        if cap is None or used is None or not cap.strip().isdigit():
            continue
        if int(cap) >= 2**60:  # v1's "unlimited"
            return None
        return int(cap) - int(used)
    return None
