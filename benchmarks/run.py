"""Speed of Reducio-VAE in JAX: one command, JSON lines on stdout, Markdown into RESULTS.md.

    python benchmarks/run.py --quick                                   # CI: tiny, 32 px, each op once
    python benchmarks/run.py --config tiny --resolution 256 --op reconstruct \\
        --torch-reference ~/src/Reducio-VAE                            # beside the official code
    python benchmarks/run.py --config tiny --resolution 64 --per-layer  # where the time goes
    python benchmarks/run.py --suite accelerator [--dry-run]           # the GPU/TPU figures

Operations (`--op`, default all): encode, decode, reconstruct (the `ReducioVAE` methods),
train_step (the full GAN step: generator and discriminator update, LPIPS on, past
disc_start) and eval_metrics (eval.py's per-clip PSNR/SSIM/LPIPS). Each is compiled once
(compile time reported apart), run once to warm up, then `--repeats` times; the median gives
clips/s, and XLA's cost analysis of the compiled program gives FLOPs, FLOP/s and, on devices
of known peak, MFU. Weights are random but fixed; inputs are fixed noise.

Every record is one JSON line on stdout (and in `--jsonl FILE`); `--write-results` puts the
table, the machine, versions, commit, XLA_FLAGS, date and this command into a named section of
benchmarks/RESULTS.md. Exit status 0, 1 when a run fails (or the torch outputs disagree), 2 on
bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import shlex
import sys
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "RESULTS.md"
ACCELERATOR_MINUTES = 8.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from harness import CONFIGS, DTYPES, OPS

    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Times Reducio-VAE operations; JSON lines out, Markdown into RESULTS.md.",
        epilog="Exit status 0 on success, 1 when a run fails, 2 on bad input.",
    )
    p.add_argument("--op", nargs="+", choices=OPS, default=list(OPS), help="operations to time")
    p.add_argument(
        "--config",
        nargs="+",
        choices=CONFIGS,
        default=["tiny"],
        help="configs/NAME.py (several: each is timed, in one run)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    p.add_argument("--batch", type=int, default=1, help="clips per call")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument(
        "--resolution",
        type=int,
        nargs="+",
        help="frame size (default: the config's); one, or one per --config",
    )
    p.add_argument(
        "--attention",
        choices=["xla", "cudnn"],
        default="xla",
        help="attention implementation (cudnn: cuDNN flash attention, NVIDIA GPUs, bf16)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="time every distinct conv/attention/"
        "norm call of the reconstruction alone, forward and forward+backward",
    )
    p.add_argument(
        "--torch-reference",
        metavar="PATH",
        help="checkout of microsoft/Reducio-VAE: time its reconstruction beside ours "
        "on the same weights and input, check they agree",
    )
    p.add_argument("--suite", choices=["accelerator"], help="the 256px ft4 bf16 GPU/TPU suite")
    p.add_argument("--quick", action="store_true", help="tiny, 32 px, each op once (CI)")
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.add_argument(
        "--max-minutes",
        type=float,
        help=f"skip what would start after this (suite default {ACCELERATOR_MINUTES})",
    )
    p.add_argument("--jsonl", help="also append the records to this file")
    p.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--results", default=str(DEFAULT_RESULTS), help="the Markdown file to update")
    p.add_argument("--section", help="section name in the Markdown file (default from the run)")
    p.add_argument("--note", default="", help="a line for the section (e.g. how the machine was)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if sum([args.quick, args.suite is not None, args.per_layer]) > 1:
        p.error("choose one of --quick, --suite, --per-layer")
    if args.resolution and len(args.resolution) not in (1, len(args.config)):
        p.error("give one --resolution, or one per --config")
    if args.per_layer and len(args.config) > 1:
        p.error("--per-layer takes one --config")
    return args


# -- what to run ----------------------------------------------------------------------------------


def accelerator_cases() -> list:
    """The 256px ft4 bf16 suite, most wanted first (a time budget skips from the end)."""
    from harness import Case

    def ft4(op: str, batch: int, config: str = "reducio_ft4") -> Case:
        return Case(op, config, "bfloat16", batch=batch, frames=16)

    first = [ft4("reconstruct", 1), ft4("reconstruct", 8), ft4("encode", 1), ft4("encode", 8)]
    train = [ft4("train_step", b) for b in (1, 2, 4, 8)]
    tiled = [ft4("reconstruct", 1, "reducio_ft4_1024px")]
    rest = [ft4(op, b) for op in ("reconstruct", "encode") for b in (2, 4)]
    cudnn = [dataclasses.replace(ft4("reconstruct", 8), attention="cudnn")]
    return first + train + tiled + rest + cudnn


def plan(args: argparse.Namespace) -> tuple[list, dict]:
    """(cases, run options) for the arguments."""
    from harness import OPS, Case

    if args.quick:
        cases = [Case(op, "tiny", "float32", 1, 16, 32) for op in OPS]
        return cases, {"repeats": 1, "warmup": False, "section": "quick"}
    if args.suite == "accelerator":
        return accelerator_cases(), {
            "repeats": args.repeats,
            "warmup": True,
            "section": "accelerator",
        }
    ops = ["reconstruct"] if args.per_layer else args.op
    sizes = args.resolution or [None]
    sizes = sizes * len(args.config) if len(sizes) == 1 else sizes
    cases = [
        Case(op, config, args.dtype, args.batch, args.frames, size, args.attention)
        for config, size in zip(args.config, sizes, strict=True)
        for op in ops
    ]
    shapes = ", ".join(
        f"{c} {args.batch}x{args.frames}x" + (f"{s}x{s}" if s else "default")
        for c, s in zip(args.config, sizes, strict=True)
    )
    name = f"{'per-layer' if args.per_layer else 'ops'} {args.dtype} {shapes}"
    if args.attention != "xla":
        name += f" attention={args.attention}"
    if args.torch_reference:
        name += " vs torch"
    return cases, {"repeats": args.repeats, "warmup": True, "section": name}


# -- running --------------------------------------------------------------------------------------


class Output:
    """JSON lines to stdout and, optionally, a file."""

    def __init__(self, jsonl: str | None):
        self.file = open(jsonl, "a") if jsonl else None

    def emit(self, rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def skipped(case, reason: str) -> dict:
    from harness import case_config, case_fields

    return {"record": "skipped", **case_fields(case, case_config(case)), "reason": reason}


def run_ops(cases: list, opts: dict, args: argparse.Namespace, out: Output) -> list[dict]:
    import harness
    from tqdm import tqdm

    budget = args.max_minutes
    if budget is None and args.suite == "accelerator":
        budget = ACCELERATOR_MINUTES
    start, records = time.perf_counter(), []
    for case in tqdm(
        cases, desc="benchmarks", unit="op", disable=args.no_progress, file=sys.stderr
    ):
        if budget is not None and time.perf_counter() - start > 60 * budget:
            rec = skipped(case, f"time budget of {budget:g} min spent")
        elif args.torch_reference and case.op == "reconstruct":
            import torch_reference

            rec = {
                "record": "op",
                **torch_reference.compare(case, args.torch_reference, opts["repeats"]),
            }
            rec["env"]["torch"] = rec["torch_reference"]["torch"]
        else:
            rec = {"record": "op", **harness.run_case(case, opts["repeats"], warmup=opts["warmup"])}
        out.emit(rec)
        records.append(rec)
    for rec in records:
        if "torch_reference" in rec:
            import torch_reference

            torch_reference.check(rec)
    return records


def run_per_layer(case, opts: dict, args: argparse.Namespace, out: Output) -> tuple[list, dict]:
    import harness
    import per_layer
    from tqdm import tqdm

    def progress(sites):
        return tqdm(sites, desc="layers", unit="call", disable=args.no_progress, file=sys.stderr)

    rows = per_layer.per_layer(case, opts["repeats"], progress)
    cfg = harness.case_config(case)
    shape = {
        "config": case.config,
        "dtype": case.dtype,
        "batch": case.batch,
        "frames": case.frames,
        "resolution": int(cfg.data.resolution),
    }
    for row in rows:
        out.emit({"record": "layer", **shape, **row})
    whole = {"record": "op", **harness.run_case(case, opts["repeats"])}
    out.emit(whole)
    return rows, whole


def write_results(
    args, opts: dict, records: list[dict], layers: list | None, argv, wall_s: float
) -> None:
    import harness
    import results

    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv)
    env = dict(harness.environment())
    env.update({k: v for r in records for k, v in r.get("env", {}).items() if k == "torch"})
    body = results.env_block(env, command, args.note)
    body += f"\n- Whole run: {wall_s:.0f} s (imports, set-up, compiles and runs)"
    if layers is not None:
        whole = records[-1]["median_s"] if records else None
        body += "\n\n" + results.layer_table(layers, whole)
    else:
        body += "\n\n" + results.op_table(records)
    name = args.section or opts["section"]
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", name).strip("-")
    results.update_section(pathlib.Path(args.results), slug, name, body)


def dry_run(cases: list, args: argparse.Namespace, out: Output) -> None:
    from harness import case_config

    for case in cases:
        cfg = case_config(case)  # checks the case
        out.emit(
            {
                "record": "planned",
                "what": case.describe(cfg),
                "per_layer": bool(args.per_layer),
                "torch_reference": args.torch_reference if case.op == "reconstruct" else None,
            }
        )


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()  # before the package and JAX are imported
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(HERE))
    args = parse_args(argv)
    from harness import BenchmarkError

    try:
        return _main(args, argv, start)
    except (BenchmarkError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        print(
            f"error: run failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            file=sys.stderr,
        )
        return 1


def _main(args: argparse.Namespace, argv: list[str], start: float) -> int:
    import jax
    from harness import BenchmarkError, case_config

    from reducio_jax.programs import allocator

    cases, opts = plan(args)
    for case in cases:
        case_config(case)  # bad input stops here, before anything runs
    if all(case.op != "train_step" for case in cases):
        allocator.share_one_heap()  # before JAX starts; the records say whether it took
    out = Output(args.jsonl)
    if args.dry_run:
        dry_run(cases, args, out)
        return 0
    if args.suite == "accelerator" and jax.default_backend() == "cpu":
        raise BenchmarkError(
            "--suite accelerator needs a GPU or TPU, but JAX's backend is cpu; "
            "run it on an accelerator host, or add --dry-run to list what it would run"
        )
    layers = None
    if args.per_layer:
        layers, whole = run_per_layer(cases[0], opts, args, out)
        records = [whole]
    else:
        records = run_ops(cases, opts, args, out)
    if args.write_results:
        write_results(args, opts, records, layers, argv, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
