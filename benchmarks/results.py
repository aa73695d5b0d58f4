"""Markdown tables of benchmark records, kept as named sections of benchmarks/RESULTS.md.

A section sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; writing it again
replaces it in place, a new one is appended, and the text around the sections is kept.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

MiB = 2**20


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _clip(r: dict) -> str:
    return f"{r['batch']}x{r['frames']}x{r['resolution']}x{r['resolution']}"


def _dtype(r: dict) -> str:
    attention = r.get("attention", "xla")
    return r["dtype"] + ("" if attention == "xla" else f", {attention} attention")


def _runs(r: dict) -> str:
    return f"{r['median_s']:.3f} ({len(r['times_s'])})"


def _peak(r: dict) -> str:
    """The measured peak (harness.PeakMemory): RSS above the runs' start on the CPU, the
    device's peak bytes in use on accelerators."""
    peak = r.get("peak_bytes") or {}
    value = peak.get("rss_above_start", peak.get("device_peak_in_use"))
    return _num(value and value / 2**30, ".2f")


def op_table(records: list[dict]) -> str:
    """One row per operation record (skipped ones say why)."""
    head = (
        "| op | config | dtype | clip BxTxHxW | compile s | median s (runs) | clips/s | "
        "GFLOP | GFLOP/s | MFU | peak mem GiB (XLA est.) | peak GiB (measured) | torch s | "
        "jax / torch | torch peak GiB (measured) | max abs diff |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in records:
        if r.get("record") == "skipped":
            lines.append(
                f"| {r['op']} | {r['config']} | {_dtype(r)} | {_clip(r)} | "
                f"skipped: {r['reason']} |" + " |" * 11
            )
            continue
        mem = (r.get("memory_bytes") or {}).get("peak")
        ref = r.get("torch_reference") or {}
        lines.append(
            f"| {r['op']} | {r['config']} | {_dtype(r)} | {_clip(r)} | {r['compile_s']:.1f} | "
            f"{_runs(r)} | {r['clips_per_s']:.3g} | {_num(r['flops'] and r['flops'] / 1e9, '.1f')} | "
            f"{_num(r['flop_per_s'] and r['flop_per_s'] / 1e9, '.1f')} | "
            f"{_num(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
            f"{_num(mem and mem / 2**30, '.2f')} | {_peak(r)} | {_num(ref.get('median_s'), '.3f')} | "
            f"{_num(ref.get('jax_over_torch'), '.2f')} | {_peak(ref)} | "
            f"{_num(ref.get('max_abs_diff'), '.1e')} |"
        )
    return "\n".join(lines)


def layer_table(rows: list[dict], whole_s: float | None = None) -> str:
    """Per-layer rows (sorted already); shares are of the sum of the top-level rows."""
    top = sum(r["total_fwd_s"] for r in rows if not r["within"])
    head = (
        "| # | kind | call | within | count | fwd ms | fwd+bwd ms | total fwd ms | "
        "total fwd+bwd ms | share fwd | fwd GFLOP/s |"
    )
    lines = [head, "|" + "---|" * 11]
    for i, r in enumerate(rows, 1):
        share = f"{100 * r['total_fwd_s'] / top:.1f}%" if top and not r["within"] else "–"
        lines.append(
            f"| {i} | {r['kind']} | `{r['name']}` | {r['within'] or ''} | {r['count']} | "
            f"{1e3 * r['fwd_s']:.2f} | {1e3 * r['fwd_bwd_s']:.2f} | {1e3 * r['total_fwd_s']:.1f} | "
            f"{1e3 * r['total_fwd_bwd_s']:.1f} | {share} | "
            f"{_num(r['fwd_flop_per_s'] and r['fwd_flop_per_s'] / 1e9, '.1f')} |"
        )
    total_bwd = sum(r["total_fwd_bwd_s"] for r in rows if not r["within"])
    lines.append("")
    lines.append(
        f"Sum of the top-level rows: forward {top:.3f} s, forward+backward {total_bwd:.3f} s."
    )
    if whole_s is not None:
        lines.append(
            f"The whole reconstruction (one compiled program): {whole_s:.3f} s; the rows cover "
            f"{100 * top / whole_s:.0f}% of it (the rest: upsampling, elementwise work, layout "
            "copies, and what fusion across layers saves or costs)."
        )
    return "\n".join(lines)


def env_block(env: dict[str, Any], command: str, note: str = "") -> str:
    """Where and how the numbers were taken."""
    lines = [
        f"- Command: `{command}`",
        f"- Date: {env['date']}; commit `{env['commit']}`",
        f"- Machine: {env['cpu']}, {env['cpu_cores']} cores; JAX backend `{env['backend']}`, "
        f"device `{env['device_kind']}` x{env['device_count']}; load average "
        f"{env.get('load_average_1min')} at the start",
        f"- Versions: jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, "
        f"python {env['python']}" + (f", torch {env['torch']}" if env.get("torch") else ""),
        f"- XLA_FLAGS: `{env['xla_flags'] or '(none)'}`; malloc: {env.get('malloc', 'not recorded')}",
    ]
    if note:
        lines.insert(0, f"- **{note}**")
    return "\n".join(lines)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def update_section(path: pathlib.Path, name: str, title: str, body: str) -> None:
    """Writes section `name` (heading `title`) into `path`, replacing an older copy."""
    start, end = _markers(name)
    block = f"{start}\n### {title}\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
