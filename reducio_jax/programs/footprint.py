"""What a compiled program needs (`Footprint`, XLA's memory analysis) and what the memory
planner chose (`Plan`)."""

from __future__ import annotations

import dataclasses

from reducio_jax.models.tiling import TileConfig
from reducio_jax.programs.budget import gib

HEADROOM = 0.15  # fraction of a call's bytes added for what the analysis does not count
# Bytes a call takes whatever its program: the runtime's threads and per-call allocations. The
# 15% alone left ft4 at 64 px (0.24 GiB of temporaries) 11% under its measured run
# (benchmarks/RESULTS.md, "Memory per clip").
FIXED = 64 << 20


def memory_figures(compiled) -> dict[str, int]:
    """XLA's memory analysis of `compiled` as {"argument": bytes, "output", "temp", "alias"}
    (what `Footprint.from_memory` and the program store keep)."""
    m = compiled.memory_analysis()
    names = ("argument", "output", "temp", "alias")
    return {n: int(getattr(m, f"{n}_size_in_bytes")) for n in names}


@dataclasses.dataclass(frozen=True)
class Footprint:
    """The memory of one compiled program (XLA's `memory_analysis()`), in bytes."""

    argument: int
    output: int
    temp: int
    alias: int = 0
    inputs: int = 0  # bytes of the arguments that are not parameters (the video, the latent)
    devices: int = 1  # devices running the program (all its figures are one's) in one memory

    @classmethod
    def of(cls, compiled, inputs: int = 0, devices: int = 1) -> Footprint:
        """`compiled`'s memory analysis (a device's, for a program split over a mesh); `inputs`:
        a device's bytes of them; `devices`: how many devices hold such buffers in the memory
        planned for (a CPU mesh's devices all live in the host's)."""
        return cls.from_memory(memory_figures(compiled), inputs, devices)

    @classmethod
    def from_memory(cls, memory: dict[str, int], inputs: int = 0, devices: int = 1) -> Footprint:
        """The same from the figures of a memory analysis ({"argument": bytes, "output",
        "temp", "alias"}), as the program store keeps them."""
        names = ("argument", "output", "temp", "alias")
        return cls(*(int(memory[n]) for n in names), inputs, devices)

    @property
    def total(self) -> int:
        """Arguments + outputs + temporaries (aliased outputs counted once)."""
        return self.argument + self.output + self.temp - self.alias

    def need(self, resident: int) -> int:
        """Bytes a call adds to a process already holding `resident` bytes of parameters (a
        copy on each device): the program's less the parameters among its arguments (at most
        `resident`), one host copy of its output, `HEADROOM`, times `devices`, and `FIXED`."""
        held = min(resident, self.argument - self.inputs)
        return int((self.total - held + self.output) * (1 + HEADROOM)) * self.devices + FIXED


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
