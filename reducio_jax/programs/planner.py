"""How many windows (and tiles) a compiled call can take in the memory there is.

The planner asks XLA, not a table: it compiles the per-window program through the model's
`Programs` (compiled.py; the executable it chose is the one that then runs, the candidates
it rejected are dropped) and reads its `memory_analysis()`: the bytes of its arguments,
outputs and temporaries. What a call needs (`Footprint.need`) is that minus the parameters
already resident (those the program takes: an encode takes only the encoder's, XLA drops the
arguments a program does not use), plus one host copy of the output, plus `HEADROOM` of it for
what the analysis does not see (the CPU convolutions' per-thread scratch, the allocator's slack).

What there is: `budget.py` (the accelerator's free memory, or the host's RAM, cgroup and
address-space room less `RESERVE`; `--max_memory` instead).

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

import jax
from jax.sharding import Mesh

from reducio_jax.errors import InputError
from reducio_jax.models.tiling import TileConfig
from reducio_jax.models.windows import pad_size
from reducio_jax.programs import allocator
from reducio_jax.programs.budget import MaxMemory, available_memory, budget, gib
from reducio_jax.programs.compiled import Programs, mesh_devices
from reducio_jax.programs.footprint import Footprint, Plan

# One window a call on the CPU: more buy no speed there, and XLA:CPU's compile of a batched
# program grows far faster than the batch (the released ft4 at 256 px: planning with 2
# windows a call peaked at 16.0 GiB resident while compiling, and 4 were killed for memory on
# 24 GB, before a single window ran; benchmarks/RESULTS.md, "Memory")
CPU_MAX_BATCH = 1
DEVICE_MAX_BATCH = 16
PROBE_AREAS = 4  # frames over this many tiles' area: estimate the whole window before compiling
SKIP_OVER = 1.5  # tile without compiling the whole window when its estimate is this far over
WindowBatch = int | str | None  # a number, "auto" (from memory) or None (all windows at once)


class OutOfMemory(InputError):
    """Not even one tile of one window fits (an `InputError`: the CLIs exit 2)."""


def parse_window_batch(value: int | str | None, flag: str = "--window_batch") -> WindowBatch:
    """The one rule of a window batch: "auto", None (all at once) or a positive number."""
    if value is None or value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{flag} {value!r}: give 'auto' or a number of windows") from None
    if number < 1 or number != value and str(number) != str(value).strip():
        raise InputError(f"{flag} {value}: give 'auto' or a number of windows of at least 1")
    return number


def check_batch(mesh: Mesh | None, batch: int | str, flag: str) -> None:
    """`batch` is "auto" or a positive multiple of the mesh's devices (InputError if not)."""
    n = mesh_devices(mesh)
    batch = parse_window_batch(batch, flag)
    if batch != "auto" and (batch is None or batch % n):
        raise InputError(f"{flag} {batch} must be a positive multiple of the {n} device(s)")


def default_cap(device: jax.Device | None = None) -> int:
    return CPU_MAX_BATCH if (device or jax.devices()[0]).platform == "cpu" else DEVICE_MAX_BATCH


@dataclasses.dataclass(frozen=True)
class Request:
    """What to plan for: `op` of the model's `programs` on (padded) `frame`s, the memory
    `available`, the largest batch a device worth having (`cap`), the config's `tiles` (or None) and
    the `fallback` tiles for frames that do not fit untiled; `estimate`: a large frame's need
    is estimated from two small untiled programs before it is compiled whole."""

    programs: Programs
    op: str
    frame: tuple[int, int]
    available: tuple[int, str]
    cap: int
    tiles: TileConfig | None
    fallback: TileConfig
    estimate: bool = True
    mesh: Mesh | None = None  # the windows split over its devices (None: one device)

    @classmethod
    def of(
        cls, programs: Programs, op: str, frame, available, cap: int, mesh: Mesh | None = None
    ) -> Request:
        tiles, fallback = programs.tiles, programs.fallback
        return cls(programs, op, frame, available, cap, tiles, fallback, mesh=mesh)

    @property
    def resident(self) -> int:
        return self.programs.resident

    @property
    def devices(self) -> int:
        return mesh_devices(self.mesh)

    def measure(self, batch: int, tiles: TileConfig | None) -> Footprint:
        """The footprint of `batch` windows a device with `tiles`: the program of `batch` times
        the mesh's devices windows split over them, the one that runs (its executable kept)."""
        return self.programs.footprint(
            self.op, batch * self.devices, self.frame, tiles, mesh=self.mesh
        )

    def probe(self, frame: tuple[int, int]) -> Footprint:
        """One untiled window a device of another frame size, only measured."""
        return self.programs.footprint(
            self.op, self.devices, frame, None, keep=False, mesh=self.mesh
        )

    @property
    def each(self) -> str:
        """What a message adds to "one window" on a mesh."""
        return "" if self.devices == 1 else f" on each of {self.devices} devices"


def padded_frame(programs: Programs, height: int, width: int) -> tuple[int, int]:
    f = programs.spatial_factor
    return (height + pad_size(height, f), width + pad_size(width, f))


def plan_memory(
    programs: Programs,
    height: int,
    width: int,
    *,
    op: str = "reconstruct",
    max_memory: MaxMemory = None,
    cap: int | None = None,
    mesh: Mesh | None = None,
) -> Plan:
    """The window batch (<= `cap` a device, default 1 on the CPU, 16 on accelerators) and
    tiling for `op` of HxW frames (padded to the model's multiple), from the compiled program's
    memory analysis and the memory available (`max_memory`: for the whole process instead).
    With a `mesh`, the programs measured are those of the windows split over its devices (the
    plan's window batch is the whole call's, a multiple of them). Of the programs compiled to
    choose, only the chosen one's executable is kept: it is the one the run calls. Raises
    `OutOfMemory` when one tile of one window (a device) does not fit."""
    frame = padded_frame(programs, height, width)
    request = Request.of(programs, op, frame, budget(max_memory), cap or default_cap(), mesh)
    with programs.candidates() as keep:
        plan = plan_windows_batch(request)
        if max_memory is None:  # (a figure of the user's is not the machine's)
            allocator.release_freed_memory()  # what the planner's compiles freed
            plan = replan_if_short(plan, request, available_memory(address_space=False))
        plan = dataclasses.replace(plan, window_batch=plan.window_batch * request.devices)
        keep(op, plan.window_batch, plan.frame, plan.tiles, mesh)
    return plan


def plan_batch(
    programs: Programs,
    mesh: Mesh | None,
    height: int,
    width: int,
    *,
    op: str,
    batch: int | str = "auto",
    max_memory: MaxMemory = None,
    count: int | None = None,
    flag: str = "--window_batch",
) -> Plan:
    """The global batch (windows or clips a call, a positive multiple of the devices of `mesh`,
    split over them) and tiling for `op` on HxW frames: "auto" as many as fit in memory (at
    most `count`, the most the data has), or the fixed `batch` checked to fit. `OutOfMemory`
    (one line, an `InputError`) when it does not, or not even one tile of one window a device
    fits. The programs measured are the mesh's (the devices of a CPU mesh share the host's
    memory, `Footprint.devices`), so the one chosen is the one that runs."""
    check_batch(mesh, batch, flag)
    n = mesh_devices(mesh)
    if batch != "auto":
        return _fixed_batch(programs, mesh, height, width, op, int(batch) // n, max_memory, flag)
    cap = default_cap() if count is None else min(default_cap(), -(-count // n))
    return plan_memory(programs, height, width, op=op, max_memory=max_memory, cap=cap, mesh=mesh)


def _fixed_batch(programs, mesh, height, width, op, local, max_memory, flag) -> Plan:
    """`local` windows a device: its program with the config's tiling must fit (or, at one
    window a device, the planner's tiling)."""
    n = mesh_devices(mesh)
    plan = plan_memory(programs, height, width, op=op, max_memory=max_memory, cap=local, mesh=mesh)
    if plan.window_batch != local * n:  # (the planner's linear estimate may have stopped short)
        request = Request.of(programs, op, plan.frame, plan.available, local, mesh)
        need = request.measure(local, programs.tiles).need(plan.resident)
        if need > plan.available:
            where = "" if n == 1 else f" ({local} a device)"
            raise OutOfMemory(
                f"{flag} {local * n}{where} needs {gib(need)} and {plan.source} leaves "
                f"{gib(plan.available)}; leave {flag} out to choose it from memory"
            )
        plan = dataclasses.replace(plan, window_batch=local * n, tiles=programs.tiles, need=need)
    return plan


# -- the choice -----------------------------------------------------------------------------------


def plan_windows_batch(req: Request) -> Plan:
    """The largest window batch (a device) <= `cap` whose program fits `available`; when one
    window does not fit, tiled one tile a step; `OutOfMemory` when one tile does not fit. (XLA:CPU's
    memory-minded schedule, once a step between the two, needs more than the default schedule
    since the convolutions run in chunks: benchmarks/RESULTS.md, "Memory per clip".)"""
    resident, tiles, cap = req.resident, req.tiles, req.cap
    room, source = req.available
    estimate = untiled_estimate(req)
    if estimate is not None and estimate > SKIP_OVER * room:
        return _tiled_plan(req, estimate, estimated=True)
    need = req.measure(1, tiles).need(resident)
    if need > room:
        return _tiled_plan(req, need)
    batch = max(1, min(cap, room // max(need, 1)))
    while batch > 1:  # the estimate assumed memory linear in the batch: check the real program
        need_b = req.measure(batch, tiles).need(resident)
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
    the config tiles, or without `estimate`."""
    h, w = req.frame
    tile_area = req.fallback.sample_size**2
    configured = req.tiles is not None and req.tiles.applies_to(h, w)
    if not req.estimate or configured or h * w <= PROBE_AREAS * tile_area:
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
            f"not enough memory: one {req.frame[0]}x{req.frame[1]} window{req.each} needs "
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
        f"not enough memory: one {tiles.sample_window} px tile of one window{req.each} needs "
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
