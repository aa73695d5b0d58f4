"""Where compile time and compile memory go: per inference program, its size and its compile.

    python benchmarks/compile_profile.py                       # the four CPU cases of issue 30
    python benchmarks/compile_profile.py --case tiny:256x256 --case ft4:64x64 --write-results

For each case (a config, a frame size, the reconstruct program of one 16-frame window), in a
fresh process: the lowered program's size (StableHLO ops, convolutions, while loops), the
seconds to trace and lower, the seconds XLA takes to compile it, the optimised module's size
(HLO instructions, fusions, while loops) and how far the compile raised the process's peak
resident memory. The persistent compilation cache is off, so every compile is a real one.
`--second-process` adds the seconds from nothing to a ready
executable (trace, lower, compile or load) in fresh processes sharing one cache folder:
cold; then with the program store warm (loaded without a trace, reducio_jax/programs/store.py);
then with the store set aside, JAX's persistent cache alone (it traces and lowers). JSON lines on stdout;
`--write-results` puts the table into the "Compile" section of
benchmarks/RESULTS.md with the machine, versions and commit. Weights are random (sizes and
compile times do not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = ("tiny:256x256", "tiny:288x640", "ft4:64x64", "ft4:256x256")
CONFIG_FILES = {"tiny": "tiny.py", "ft4": "reducio_ft4.py", "ft2": "reducio_ft2.py"}


def parse_case(text: str) -> tuple[str, int, int]:
    match = re.fullmatch(r"(\w+):(\d+)x(\d+)", text)
    if not match or match.group(1) not in CONFIG_FILES:
        raise SystemExit(f"error: --case {text!r}: give CONFIG:HxW, CONFIG one of tiny, ft4, ft2")
    h, w = int(match.group(2)), int(match.group(3))
    if h % 32 or w % 32:
        raise SystemExit(f"error: --case {text!r}: the frame size must be a multiple of 32")
    return match.group(1), h, w


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, re.MULTILINE))


def profile(config: str, height: int, width: int, op: str) -> dict:
    """One case, in this process (the child)."""
    import resource
    import time

    import jax
    from flax import nnx

    from reducio_jax.config import derived, load_config
    from reducio_jax.models import build_vae
    from reducio_jax.programs import budget, lowering
    from reducio_jax.train.state import FAST_COMPILE

    cfg = load_config(ROOT / "configs" / CONFIG_FILES[config])
    with nnx.use_eager_sharding(False):
        make = lambda: build_vae(cfg.model, seed=0)  # noqa: E731
        graphdef = nnx.graphdef(nnx.eval_shape(make))
        state = jax.jit(lambda: nnx.state(make()), compiler_options=FAST_COMPILE)()
    start = time.perf_counter()
    inputs = lowering.window_inputs(op, derived(cfg), 1, (height, width))
    lowered = lowering.lower(op, graphdef, state, inputs, None)
    stablehlo = lowered.as_text()
    lower_s = time.perf_counter() - start
    rss_before = budget.process_status("VmRSS") or 0
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hlo = compiled.as_text()
    return {
        "config": config,
        "frame": [height, width],
        "op": op,
        "stablehlo_ops": _count(r"^\s*(%\S+ = )?\"?stablehlo\.", stablehlo),
        "convolutions": _count(r"stablehlo\.convolution", stablehlo),
        "while_loops": _count(r"stablehlo\.while", stablehlo),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "hlo_instructions": _count(r"^\s+(ROOT )?%?\S+ = ", hlo),
        "fusions": _count(r"^\s+(ROOT )?%?\S+ = .*\bfusion\(", hlo),
        "hlo_while_loops": _count(r"^\s+(ROOT )?%?\S+ = .*\bwhile\(", hlo),
        "compile_peak_rise_gib": round(max(0, peak - rss_before) / 2**30, 2),
        "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 2),
    }


def ready_seconds(config: str, height: int, width: int, op: str, cache: str) -> float:
    """Seconds from nothing to `op`'s executable ready (trace, lower, compile or load) in this
    process, with JAX's persistent cache at `cache`."""
    import time

    import jax

    from reducio_jax import ReducioVAE
    from reducio_jax.programs import cache as compile_cache

    compile_cache.use_compilation_cache(cache)
    vae = ReducioVAE.from_config(ROOT / "configs" / CONFIG_FILES[config])
    jax.block_until_ready(jax.tree.leaves(vae.programs.model))
    start = time.perf_counter()
    vae.programs.footprint(op, 1, (height, width), None)
    return time.perf_counter() - start


def first_and_second(case: str, op: str) -> dict:
    """Seconds to a ready executable: a cold process, a second one with the program store
    warm, a third with the store set aside (JAX's persistent cache alone)."""
    import shutil
    import tempfile

    from reducio_jax.programs.store import FOLDER

    def ready(cache: str) -> float:
        return run_child(case, op, extra=["--ready", cache])["ready_s"]

    with tempfile.TemporaryDirectory() as cache:
        cold, stored = ready(cache), ready(cache)
        shutil.rmtree(os.path.join(cache, FOLDER))
        return {"cold_s": cold, "store_s": stored, "jax_cache_s": ready(cache)}


def table(records: list[dict]) -> str:
    head = (
        "| case | StableHLO ops | convolutions | while | lower s | compile s | HLO instr. "
        "(fusions, while) | compile peak rise GiB | temp GiB | ready s: cold / store / JAX cache |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {r['config']} {r['frame'][0]}x{r['frame'][1]} {r['op']} | {r['stablehlo_ops']} | "
        f"{r['convolutions']} | {r['while_loops']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
        f"{r['hlo_instructions']} ({r['fusions']}, {r['hlo_while_loops']}) | "
        f"{r['compile_peak_rise_gib']:.2f} | {r['temp_gib']:.2f} | {_ready(r)} |"
        for r in records
    ]
    return head + "\n".join(rows) + "\n"


def _ready(r: dict) -> str:
    if "cold_s" not in r:
        return "–"
    return f"{r['cold_s']:.1f} / {r.get('store_s', float('nan')):.1f} / {r['jax_cache_s']:.1f}"


def run_child(case: str, op: str, extra: Sequence[str] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", case, "--op", op]
    cmd += list(extra)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"error: {case}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/compile_profile.py", description=__doc__)
    p.add_argument("--case", action="append", help="CONFIG:HxW (repeat; default: the four)")
    p.add_argument("--op", default="reconstruct", choices=("encode", "decode", "reconstruct"))
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--note", default="")
    p.add_argument("--second-process", action="store_true",
                   help="also time a ready executable in fresh processes: cold, store, JAX cache")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child and args.ready:
        seconds = ready_seconds(*parse_case(args.child), args.op, args.ready)
        print(json.dumps({"ready_s": seconds}))
        return 0
    if args.child:
        print(json.dumps(profile(*parse_case(args.child), args.op)))
        return 0
    cases = args.case or list(CASES)
    for case in cases:
        parse_case(case)
    records = []
    for case in cases:
        records.append(run_child(case, args.op))
        if args.second_process:
            records[-1].update(first_and_second(case, args.op))
        print(json.dumps(records[-1]), flush=True)
    print(table(records))
    if args.write_results:
        sys.path.insert(0, str(HERE))
        import harness
        from results import env_block, update_section

        command = "python benchmarks/compile_profile.py " + " ".join(argv or sys.argv[1:])
        body = env_block(harness.environment(), command.strip(), args.note) + "\n\n" + table(records)
        update_section(HERE / "RESULTS.md", "compile", "Compile: program size and compile time", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
