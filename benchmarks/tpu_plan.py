"""The TPU memory plan: per-chip memory of compiled programs over configs, topologies, per-chip
batches, remat on/off and fsdp sizes, as the TPU compiler reports it (libtpu's compile-only
client on this host; `pip install -e ".[tpu]"`). One JSON line per compile on stdout (and in
`--jsonl FILE`); `--write-results` puts the table into benchmarks/RESULTS.md.

    python benchmarks/tpu_plan.py --config reducio_ft4 reducio_ft2 --topology v5e:2x4 v6e:2x4 \\
        --batch 1 2 4 8 --remat on off --write-results
    python benchmarks/tpu_plan.py --config reducio_ft4 --topology v5e:16x16 --batch 2 \\
        --fsdp 1 8 16 --write-results --section "ft4 on v5e-256, fsdp"
    python benchmarks/tpu_plan.py --config reducio_ft4 --program encode --batch 1 ...

A compile that does not fit fails fast (a few minutes for ft4 at 256 px on 2 cores); one
that fits runs the TPU compiler to the end, whose code generation takes far longer on a small
host (more than 25 minutes for ft4 at 256 px). `--stop_at_buffer_assignment` runs each compile
in a child process with XLA's dump on and stops it once the buffer assignment (the per-chip
temporaries) is written and the compiler has not refused it: the record then has the
temporaries from that assignment and the arguments computed from the shardings, and no FLOPs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["reducio_ft4"], help="configs/NAME.py")
    p.add_argument("--topology", nargs="+", default=["v5e:2x4"])
    p.add_argument("--program", default="train_step")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 2], help="clips per chip")
    p.add_argument("--remat", nargs="+", choices=["on", "off"], default=["on"])
    p.add_argument("--fsdp", nargs="+", type=int, default=[0], help="fsdp axis sizes; 0: all chips")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--resolution", type=int, default=None, help="default: the config's")
    p.add_argument(
        "--tile_batch", type=int, default=None, help="tiled inference: tiles of a shape per step"
    )
    p.add_argument(
        "--stop_at_first_misfit",
        action="store_true",
        help="per (config, topology, remat, fsdp): skip larger batches once one misfits",
    )
    p.add_argument(
        "--stop_at_buffer_assignment",
        action="store_true",
        help="child process per compile, stopped after XLA's buffer assignment",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one compile
    p.add_argument("--jsonl", default=None)
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--section", default=None)
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def gib(n: int) -> str:
    from reducio_jax.programs import budget  # (imports jax: not before the flags are set)

    return budget.gib(n, unit="")


def table(records: list[dict]) -> str:
    head = (
        "| config | program | topology (chips) | mesh | clips/chip | remat | fits | total GiB "
        "(of HBM) | state GiB | temp GiB | TFLOP/clip | compile s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in records:
        mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
        total = f"> {gib(r['temp_bytes'])} (temp alone)" if r["error"] else gib(r["total_bytes"])
        flops = "–" if r.get("stopped_at") or r["error"] else f"{r['flops_per_clip'] / 1e12:.2f}"
        if r.get("stopped_at"):
            total += " *"
        program = r["program"]
        if r.get("tile_batch"):
            program += f" ({r['tile_batch']} tile{'s' if r['tile_batch'] > 1 else ''} a step)"
        rows.append(
            f"| {r['config']} | {program} | {r['topology']} ({r['num_chips']}) | {mesh} | "
            f"{r['batch_per_chip']} | {'on' if r['remat'] else 'off'} | "
            f"{'yes' if r['fits'] else '**no**'} | {total} ({gib(r['hbm_bytes'])}) | "
            f"{gib(r['state_bytes'])} | {gib(r['temp_bytes'])} | "
            f"{flops} | {r['compile_seconds']:.0f} |"
        )
    return "\n".join([head, *rows])


def largest_fitting(records: list[dict]) -> str:
    best: dict[tuple, int] = {}
    for r in records:
        key = (r["config"], r["topology"], r["remat"], json.dumps(r["mesh"]))
        best.setdefault(key, 0)
        if r["fits"]:
            best[key] = max(best[key], r["batch_per_chip"])
    lines = [
        f"- {c} on {t}, remat {'on' if rm else 'off'}, mesh {json.loads(m)}: largest measured "
        f"clips per chip that fit: **{b or 'none'}**"
        for (c, t, rm, m), b in best.items()
    ]
    return "\n".join(lines)


def make_config(name: str, args, remat: str, fsdp: int):
    from reducio_jax.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.py")
    cfg.model.dtype, cfg.model.remat = args.dtype, remat == "on"
    cfg.loss.perceptual_chunk = 1 if cfg.model.remat else 0  # as the released configs set it
    if args.resolution:
        cfg.data.resolution = args.resolution
    cfg.mesh.shape = {"data": 1, "fsdp": -1} if fsdp == 0 else {"data": -1, "fsdp": fsdp}
    return cfg


def until_buffer_assignment(argv: list[str], job: dict, dump: pathlib.Path) -> dict:
    """Runs one compile (`--child`) with XLA's dump in `dump`; returns its record, or once the
    step's buffer assignment is written and not refused, a record built from it."""
    module = "step" if job.get("program", "train_step") == "train_step" else "run"  # jit names
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_module_re=.*{module}.*"}
    cmd = [sys.executable, __file__, *argv, "--child", json.dumps(job)]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    start, seen = time.perf_counter(), None
    while child.poll() is None:
        reports = list(dump.glob(f"*{module}*memory-usage-report.txt"))
        if reports and seen is None:
            seen = time.perf_counter()
        if seen is not None and time.perf_counter() - seen > 20:  # the HBM check passed
            child.kill()
            child.wait()
            return {
                "temp_bytes": _report_total(reports[0]),
                "compile_seconds": seen - start,
                "stopped_at": "buffer assignment",
            }
        time.sleep(2)
    out = child.stdout.read().decode().strip().splitlines()
    if child.returncode != 0 or not out:
        raise RuntimeError(f"compile of {job} failed (exit {child.returncode})")
    return json.loads(out[-1])


def _report_total(path: pathlib.Path) -> int:
    match = re.search(r"Total bytes: (\d+)", path.read_text())
    return int(match.group(1)) if match else 0


def child_compile(args) -> int:
    """One compile from `--child JOB`; its record as the last stdout line."""
    from reducio_jax.aot import sizing, topologies

    job = json.loads(args.child)
    cfg = make_config(job["config"], args, job["remat"], job["fsdp"])
    devices = topologies.target_devices(job["topology"])
    rec = sizing.compile_program(
        cfg,
        args.program,
        devices,
        batch_per_chip=job["batch"],
        topology=job["topology"],
        tile_batch=args.tile_batch,
    )
    print(json.dumps(rec.as_json()), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.child:
        return child_compile(args)
    from reducio_jax.aot import sizing, topologies
    from reducio_jax.errors import InputError

    start = time.perf_counter()
    records: list[dict] = []
    sink = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115
    try:
        for name, topology, remat, fsdp in itertools.product(
            args.config, args.topology, args.remat, args.fsdp
        ):
            devices = topologies.target_devices(topology)
            for batch in sorted(args.batch):
                cfg = make_config(name, args, remat, fsdp)
                if args.stop_at_buffer_assignment:
                    job = {
                        "config": name,
                        "topology": topology,
                        "batch": batch,
                        "remat": remat,
                        "fsdp": fsdp,
                        "program": args.program,
                    }
                    with tempfile.TemporaryDirectory() as dump:
                        row = until_buffer_assignment(argv, job, pathlib.Path(dump))
                    if "stopped_at" in row:
                        rec = sizing.planned_record(
                            cfg,
                            args.program,
                            devices,
                            batch_per_chip=batch,
                            topology=topology,
                            temp_bytes=row["temp_bytes"],
                            seconds=row["compile_seconds"],
                        )
                        row = {**rec.as_json(), "stopped_at": row["stopped_at"]}
                        row["tile_batch"] = args.tile_batch
                else:
                    rec = sizing.compile_program(
                        cfg,
                        args.program,
                        devices,
                        batch_per_chip=batch,
                        topology=topology,
                        tile_batch=args.tile_batch,
                    )
                    row = rec.as_json()
                row = {"config": name, **row}
                rec = sizing.CompileRecord(
                    **{k: v for k, v in row.items() if k in sizing.CompileRecord.__dataclass_fields__}
                )
                records.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
                if args.stop_at_first_misfit and not rec.fits:
                    break
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if sink:
            sink.close()
    if args.write_results and records:
        write_results(args, argv, records, time.perf_counter() - start)
    return 0


def write_results(args, argv, records, wall_s) -> None:
    import harness
    import results

    command = "python benchmarks/tpu_plan.py " + " ".join(shlex.quote(a) for a in argv)
    env = dict(harness.environment())
    body = results.env_block(env, command, args.note)
    body += (
        f"\n- Whole run: {wall_s:.0f} s; per-chip figures from the TPU compiler "
        "(`memory_analysis()`; a program that does not fit is reported by its temporaries "
        "alone, from the compiler's RESOURCE_EXHAUSTED message)"
    )
    body += "\n\n" + table(records) + "\n\n" + largest_fitting(records)
    if any(r.get("stopped_at") for r in records):
        body += (
            "\n\n\\* compile stopped after XLA's buffer assignment (the TPU compiler accepted "
            "the temporaries; arguments computed from the shardings; no FLOPs): "
            "`--stop_at_buffer_assignment`"
        )
    name = (
        args.section or f"TPU plan {' '.join(args.config)} {args.program} {' '.join(args.topology)}"
    )
    slug = "tpu-" + "-".join(name.lower().split())
    results.update_section(pathlib.Path(args.results), slug, name, body)


if __name__ == "__main__":
    sys.exit(main())
