"""How many windows (and tiles) a compiled call can take in the memory there is.

The planner asks XLA, not a table: it compiles the per-window program (`lower().compile()`,
which `jax.jit` then reuses) and reads its `memory_analysis()`: the bytes of its arguments,
outputs and temporaries. What a call needs (`Footprint.need`) is that minus the parameters
already resident (those the program takes: an encode takes only the encoder's, XLA drops the
arguments a program does not use), plus one host copy of the output, plus `HEADROOM` of it for
what the analysis does not see (the CPU convolutions' per-thread scratch, the allocator's slack).

What there is (`available_memory`): on an accelerator the device's `bytes_limit` less its
`bytes_in_use`; on the CPU the least of the kernel's MemAvailable, the cgroup's limit less its
usage, and the address-space limit (`ulimit -v`) less the process's size, less `RESERVE` for
the rest of the process (the compiler, decoding, encoding). `--max_memory` replaces it (on the
CPU less the process's resident set and `RESERVE`).

`plan_windows_batch` then takes the largest window batch (up to a cap) that fits, compiling
the batch it chose to check it; when one whole window does not fit it tiles the frames (one
tile a step, the config's tile size, then half of it), and when the smallest tile does not
fit either it raises `OutOfMemory`, which names what is needed and what there is.

A frame of more than `PROBE_AREAS` tiles is not compiled whole to learn that it does not fit
(for ft4 at 720p that compile alone took more than 25 minutes and 16 GB): the need of its
whole window is first estimated from two untiled programs at one and two tiles' area (with
the frame's aspect), as a program's memory is close to affine in the frame's area, and the
whole frame is only compiled when that estimate is under `SKIP_OVER` times the room.

Compiling takes memory of its own that the analysis does not count, part of which the process
keeps (executables, caches): once a plan is made from the memory available, the heap's free
memory goes back to the kernel and the plan is checked against the RAM (or accelerator
memory) left (`available_memory(address_space=False)`, `replan_if_short`), so that it is
made again rather than run into the kernel's OOM killer.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import resource
from collections.abc import Callable

import jax

from reducio_jax.errors import InputError
from reducio_jax.models.tiling import TileConfig

HEADROOM = 0.15  # fraction of a call's bytes added for what the analysis does not count
# CPU: bytes kept for the rest of the process, the compiler's memory first (compiling the tiny
# model's tiled 288x640 program raised the peak RSS by 1.1 GB; with 512 MiB kept, a run under
# --max_memory 5GB peaked at 5.0 GiB)
RESERVE = 2**30
# One window a call on the CPU: more buy no speed there, and XLA:CPU's compile of a batched
# program grows far faster than the batch (the released ft4 at 256 px: planning with 2
# windows a call peaked at 16.0 GiB resident while compiling, and 4 were killed for memory on
# 24 GB, before a single window ran; benchmarks/RESULTS.md, "Memory")
CPU_MAX_BATCH = 1
DEVICE_MAX_BATCH = 16
PROBE_AREAS = 4  # frames over this many tiles' area: estimate the whole window before compiling
SKIP_OVER = 1.5  # tile without compiling the whole window when its estimate is this far over
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class OutOfMemory(InputError):
    """Not even one tile of one window fits (an `InputError`: the CLIs exit 2)."""


@dataclasses.dataclass(frozen=True)
class Footprint:
    """The memory of one compiled program (XLA's `memory_analysis()`), in bytes."""

    argument: int
    output: int
    temp: int
    alias: int = 0
    inputs: int = 0  # bytes of the arguments that are not parameters (the video, the latent)

    @classmethod
    def of(cls, compiled, inputs: int = 0) -> Footprint:
        m = compiled.memory_analysis()
        return cls(
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(m.alias_size_in_bytes),
            inputs,
        )

    @property
    def total(self) -> int:
        """Arguments + outputs + temporaries (aliased outputs counted once)."""
        return self.argument + self.output + self.temp - self.alias

    def need(self, resident: int) -> int:
        """Bytes a call adds to a process already holding `resident` bytes of parameters: the
        program's less the parameters among its arguments (at most `resident`), one host copy
        of its output, and `HEADROOM`."""
        held = min(resident, self.argument - self.inputs)
        return int((self.total - held + self.output) * (1 + HEADROOM))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the planner chose, and why."""

    window_batch: int
    tiles: TileConfig | None
    need: int  # bytes one call of the chosen program needs (`Footprint.need`)
    available: int  # bytes it had (after any reserve)
    source: str  # where `available` came from
    frame: tuple[int, int]  # the (padded) frame size planned for
    resident: int  # bytes of parameters already held

    @property
    def tiled(self) -> bool:
        return self.tiles is not None and self.tiles.applies_to(*self.frame)

    def record(self) -> dict[str, int | bool]:
        """The choice for a JSON summary: window batch, tiled or not, bytes a call needs."""
        return {
            "window_batch": self.window_batch,
            "tiled": self.tiled,
            "memory_per_call": self.need,
        }

    def describe(self) -> str:
        tiled = f", tiled {self.tiles.sample_window} px" if self.tiled else ""
        return (
            f"{self.window_batch} window(s) a call{tiled}: {gib(self.need)} of "
            f"{gib(self.available)} ({self.source})"
        )


def plan_records(plans: dict[tuple[int, int], Plan]) -> list[dict]:
    """Plans per frame size (height, width) for a JSON summary: size, window batch, tiled, bytes."""
    return [{"size": list(size), **plan.record()} for size, plan in plans.items()]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def parse_size(text: str) -> int:
    """'8GB', '512M', '1.5GiB', '1000000' -> bytes (binary units: 1 GB = 2**30 bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--max_memory {text!r}: give a size such as 8GB, 512MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


# -- what there is --------------------------------------------------------------------------------


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
        size = _status("VmSize")
        found.append((soft - size if size is not None else None, "the address-space limit"))
    return min((f for f in found if f[0] is not None), key=lambda f: f[0])


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


def _status(name: str) -> int | None:
    return _kib_field(_read("/proc/self/status"), name)


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


def budget(max_memory: str | int | None, device: jax.Device | None = None) -> tuple[int, str]:
    """`--max_memory` (bytes for the whole process, less what it already holds and `RESERVE`
    on the CPU) or what there is."""
    if max_memory is None:
        return available_memory(device)
    limit = parse_size(max_memory) if isinstance(max_memory, str) else int(max_memory)
    if (device or jax.devices()[0]).platform != "cpu":
        return limit, "--max_memory"
    return max(0, limit - (_status("VmRSS") or 0) - RESERVE), "--max_memory"


# -- the choice -----------------------------------------------------------------------------------

Measure = Callable[[int, TileConfig | None], Footprint]  # (window batch, tiles) -> its footprint
Probe = Callable[[tuple[int, int]], Footprint]  # (height, width) -> one untiled window's footprint


@dataclasses.dataclass(frozen=True)
class Request:
    """What to plan for: `measure`, the parameters' bytes already `resident`, the config's
    `tiles` (or None), the `fallback` tiles for frames that do not fit untiled, the (padded)
    frame size, the memory `available` and the largest batch worth having (`cap`); `probe`
    (one untiled window of another frame size) lets a large frame's need be estimated first."""

    measure: Measure
    resident: int
    tiles: TileConfig | None
    fallback: TileConfig
    frame: tuple[int, int]
    available: tuple[int, str]
    cap: int
    probe: Probe | None = None


def plan_windows_batch(req: Request) -> Plan:
    """The largest window batch <= `cap` whose program fits `available`; tiled one tile a step
    when one window does not fit; `OutOfMemory` when one tile does not either."""
    measure, resident, tiles, cap = req.measure, req.resident, req.tiles, req.cap
    room, source = req.available
    estimate = untiled_estimate(req)
    if estimate is not None and estimate > SKIP_OVER * room:
        return _tiled_plan(req, estimate, estimated=True)
    need = measure(1, tiles).need(resident)
    if need > room:
        return _tiled_plan(req, need)
    batch = max(1, min(cap, room // max(need, 1)))
    while batch > 1:  # the estimate assumed memory linear in the batch: check the real program
        need_b = measure(batch, tiles).need(resident)
        if need_b <= room:
            return Plan(batch, tiles, need_b, room, source, req.frame, resident)
        batch = max(1, min(batch - 1, int(batch * room / need_b)))
    return Plan(1, tiles, need, room, source, req.frame, resident)


def replan_if_short(plan: Plan, req: Request, now: tuple[int, str]) -> Plan:
    """`plan` again against the memory there is `now`, after its compiles: XLA's compiler
    keeps part of what it took (its executables, caches), which the room measured before
    did not know of. A plan that no longer fits is made again with the room left (smaller
    tiles, or `OutOfMemory`), rather than run into the kernel's OOM killer."""
    if plan.need <= now[0]:
        return plan
    return plan_windows_batch(dataclasses.replace(req, available=now))


def untiled_estimate(req: Request) -> int | None:
    """Bytes one untiled window of a frame over `PROBE_AREAS` tiles would need, extrapolated
    in area from untiled windows of one and two tiles' area; None for smaller frames, frames
    the config tiles, or without a `probe`."""
    h, w = req.frame
    tile_area = req.fallback.sample_size**2
    configured = req.tiles is not None and req.tiles.applies_to(h, w)
    if req.probe is None or configured or h * w <= PROBE_AREAS * tile_area:
        return None
    f = req.fallback.spatial_factor
    points = []
    for area in (tile_area, 2 * tile_area):
        scale = math.sqrt(area / (h * w))
        frame = (max(f, round(h * scale / f) * f), max(f, round(w * scale / f) * f))
        points.append((frame[0] * frame[1], req.probe(frame).need(req.resident)))
    (a1, n1), (a2, n2) = points
    slope = max(0.0, (n2 - n1) / (a2 - a1)) if a2 != a1 else n2 / a2
    return int(n2 + slope * (h * w - a2))


def _tiled_plan(req: Request, untiled: int, estimated: bool = False) -> Plan:
    """One window, one tile a step: the config's tiles (else the fallback's), then tiles of
    half that size while they fit the model's grid. A tile size whose share of the whole
    window's need is clearly over the room is not compiled (but the smallest always is).
    `estimated`: `untiled` is `untiled_estimate`'s, not a compiled program's."""
    room, source = req.available
    about = "about " if estimated else ""
    sizes = [t for t in tile_sizes(req.tiles or req.fallback) if t.applies_to(*req.frame)]
    if not sizes:
        raise OutOfMemory(
            f"not enough memory: one {req.frame[0]}x{req.frame[1]} window needs "
            f"{about}{gib(untiled)} and {source} leaves {gib(room)}"
        )
    for tiles in sizes:
        share = min(1.0, tiles.sample_window**2 / (req.frame[0] * req.frame[1]))
        if tiles is not sizes[-1] and untiled * share > 1.5 * room:
            continue
        need = req.measure(1, tiles).need(req.resident)
        if need <= room:
            return Plan(1, tiles, need, room, source, req.frame, req.resident)
    raise OutOfMemory(
        f"not enough memory: one {tiles.sample_window} px tile of one window needs "
        f"{gib(need)} and {source} leaves {gib(room)} (a whole "
        f"{req.frame[0]}x{req.frame[1]} window: {about}{gib(untiled)})"
    )


def tile_sizes(tiles: TileConfig) -> list[TileConfig]:
    """`tiles` one tile a step (`max_batch` 1, wide frames too), then at half the tile size
    while the tile and its window stay whole multiples of the latent grid."""
    out = [dataclasses.replace(tiles, max_batch=1, wide=True)]
    while True:
        half = dataclasses.replace(out[-1], sample_size=out[-1].sample_size // 2)
        f = half.spatial_factor
        if half.sample_size % f or half.sample_window % f or half.sample_size < f:
            return out
        out.append(half)


def default_cap(device: jax.Device | None = None) -> int:
    return CPU_MAX_BATCH if (device or jax.devices()[0]).platform == "cpu" else DEVICE_MAX_BATCH
