"""Peak memory of one clip's reconstruction, ours against the official PyTorch code, each side
in its own fresh process (no torch in ours, no JAX in theirs).

    python benchmarks/memory_side_by_side.py --torch-reference ~/Reducio-VAE \\
        --case tiny:16x256x256 tiny:16x288x640 reducio_ft4:16x256x256 --write-results

Both sides read the same recipe weights (tests/recipe.py) from one torch-format checkpoint and
the same fixed float32 clip. Each child process loads its model and the clip, then measures
from there on the CPU with the kernel's counters (`/proc/self/status`: VmHWM, reset through
`/proc/self/clear_refs` after glibc's `malloc_trim`):

- set-up: the resident set once the model and the clip are loaded (after `malloc_trim`);
- compile (ours): the peak above set-up while XLA compiles the program (`lower().compile()`);
- run: the peak above set-up while one clip is reconstructed (compiled already, for ours);
- process: the process's peak resident set over its life (the largest VmHWM of set-up and
  the blocks), what a user's process needs. (`ru_maxrss` cannot serve: a child inherits its
  parent's figure at `exec`, and the reset of VmHWM resets it too.)

Our side runs as the inference commands do (one malloc heap for all threads, freed memory kept
for the next run: reducio_jax/programs/allocator.py). The two reconstructions are compared
(max abs difference).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import proc_memory  # noqa: E402  (benchmarks/: JAX-free, so is the torch side's set-up)

GiB = 1 << 30


def parse_case(text: str) -> dict:
    """`config:TxHxW` -> {"config", "frames", "height", "width"}."""
    try:
        config, shape = text.split(":")
        frames, height, width = (int(n) for n in shape.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad case {text!r}: write CONFIG:TxHxW, e.g. reducio_ft4:16x256x256"
        ) from None
    return {"config": config, "frames": frames, "height": height, "width": width}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-reference", required=True, help="checkout of microsoft/Reducio-VAE")
    p.add_argument("--case", nargs="+", type=parse_case, default=[parse_case("tiny:16x256x256")])
    p.add_argument("--jsonl", default=None)
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--section", default="Memory per clip, each side in its own process")
    p.add_argument("--note", default="")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one side
    return p.parse_args(argv)


# -- one side, in its own process -----------------------------------------------------------------


_PEAKS: list[int] = []  # VmHWM of set-up and of each measured block


def _peak() -> int:
    return proc_memory.status_bytes("VmHWM") or 0


def trimmed_rss() -> int:
    """The resident set once glibc hands freed heap memory back (the peak so far noted)."""
    _PEAKS.append(_peak())
    proc_memory.trim_heap()
    return proc_memory.status_bytes("VmRSS") or 0


class Above:
    """The peak resident set of a block above the resident set when it starts (after freed
    heap memory is handed back and the kernel's high-water mark is reset)."""

    def __enter__(self) -> Above:
        _PEAKS.append(_peak())
        self.start_rss = proc_memory.reset_peak()
        if self.start_rss is None:
            raise RuntimeError("this kernel cannot reset the peak resident set (Linux only)")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_above = _peak() - self.start_rss
        _PEAKS.append(_peak())


def clip_and_config(job: dict):
    import numpy as np
    from harness import ROOT

    from reducio_jax.config import load_config

    cfg = load_config(ROOT / "configs" / f"{job['config']}.py")
    cfg.model.dtype = "float32"
    rng = np.random.default_rng(0)
    shape = (1, job["frames"], job["height"], job["width"], 3)
    return cfg, rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def run_ours(job: dict) -> dict:
    from reducio_jax.programs import allocator

    allocator.share_one_heap()  # as the inference commands, before JAX starts
    import jax
    import numpy as np
    from flax import nnx

    from reducio_jax.api import ReducioVAE

    cfg, video = clip_and_config(job)
    vae = ReducioVAE.from_torch_checkpoint(job["checkpoint"], cfg)
    graph, state = nnx.split(vae.model)
    fn = jax.jit(lambda s, v: ReducioVAE(nnx.merge(graph, s), cfg).reconstruct(v))
    video = jax.device_put(video)
    setup = trimmed_rss()
    with Above() as compile_block:
        compiled = fn.lower(state, video).compile()
    with Above() as run_block:
        recon = np.asarray(compiled(state, video))
    np.save(job["output"], recon)
    m = compiled.memory_analysis()
    xla = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return {
        "setup_rss": setup,
        "compile_above": compile_block.peak_above,
        "compile_s": compile_block.seconds,
        "run_above": run_block.peak_above,
        "run_s": run_block.seconds,
        "xla_temp": m.temp_size_in_bytes,
        "xla_total": xla - m.alias_size_in_bytes,
        "versions": {"jax": jax.__version__},
    }


def run_torch(job: dict) -> dict:
    import contextlib

    import numpy as np
    import torch

    from reducio_jax.convert.torch_format import load_state_dict
    from reducio_jax.runs import parity

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg, video = clip_and_config(job)
    with contextlib.redirect_stdout(sys.stderr):  # the official code prints while it builds
        module = parity.import_reference(job["torch_reference"])
        model = parity.build_reference(module, cfg, load_state_dict(job["checkpoint"]))
    setup = trimmed_rss()
    with Above() as run_block, contextlib.redirect_stdout(sys.stderr):
        recon = parity.reference_stages(model, video)["recon"]
    np.save(job["output"], recon)
    return {
        "setup_rss": setup,
        "run_above": run_block.peak_above,
        "run_s": run_block.seconds,
        "versions": {"torch": torch.__version__},
    }


def child(job: dict) -> None:
    result = run_ours(job) if job["side"] == "jax" else run_torch(job)
    result["process_peak"] = max(_PEAKS)
    print(json.dumps(result))


# -- the parent -----------------------------------------------------------------------------------


def write_checkpoint(reference: str, config: str, path: pathlib.Path) -> None:
    """The recipe weights of the official model for `config`, as a torch checkpoint."""
    import contextlib

    import torch
    from torch_reference import recipe_state_dict

    from reducio_jax.runs import parity

    cfg, _ = clip_and_config({"config": config, "frames": 1, "height": 8, "width": 8})
    with contextlib.redirect_stdout(sys.stderr):
        model = parity.reference_model(parity.import_reference(reference), cfg)
        weights = recipe_state_dict(model)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in weights.items()}}, path)


def run_side(job: dict) -> dict:
    cmd = [sys.executable, __file__, "--torch-reference", job["torch_reference"]]
    done = subprocess.run([*cmd, "--child", json.dumps(job)], capture_output=True, text=True)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if "Error" in line]
        last = (lines or done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {last.strip()[:300]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_case(case: dict, reference: str, tmp: pathlib.Path) -> dict:
    import numpy as np

    checkpoint = tmp / f"{case['config']}.ckpt"
    if not checkpoint.exists():
        write_checkpoint(reference, case["config"], checkpoint)
    record = dict(case)
    for side in ("jax", "torch"):
        job = {
            **case,
            "side": side,
            "checkpoint": str(checkpoint),
            "torch_reference": reference,
            "output": str(tmp / f"{side}.npy"),
        }
        record[side] = run_side(job)
        print(f"{case['config']} {side}: {record[side]}", file=sys.stderr, flush=True)
    if "error" not in record["jax"] and "error" not in record["torch"]:
        diff = np.abs(np.load(tmp / "jax.npy") - np.load(tmp / "torch.npy"))
        record["max_abs_diff"] = float(diff.max())
    return record


def _g(n: int | None) -> str:
    return "–" if n is None else f"{n / GiB:.2f}"


def table(records: list[dict]) -> str:
    rows = [
        "| config | clip TxHxW | side | set-up GiB | compile: peak above set-up GiB | "
        "run: peak above set-up GiB | process peak GiB | run s | XLA temp GiB | "
        "max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        clip = f"{r['frames']}x{r['height']}x{r['width']}"
        for side in ("jax", "torch"):
            s = r[side]
            if "error" in s:
                rows.append(f"| {r['config']} | {clip} | {side} | {s['error']} |||||||")
                continue
            rows.append(
                f"| {r['config']} | {clip} | {'ours' if side == 'jax' else 'official'} | "
                f"{_g(s['setup_rss'])} | {_g(s.get('compile_above'))} | {_g(s['run_above'])} | "
                f"{_g(s['process_peak'])} | {s['run_s']:.1f} | {_g(s.get('xla_temp'))} | "
                f"{r.get('max_abs_diff', float('nan')):.1e} |"
            )
    return "\n".join(rows)


def ratios(records: list[dict]) -> str:
    lines = []
    for r in records:
        ours, theirs = r["jax"], r["torch"]
        if "error" in ours or "error" in theirs:
            continue
        clip = f"{r['frames']}x{r['height']}x{r['width']}"
        run = ours["run_above"] / max(theirs["run_above"], 1)
        peak = ours["process_peak"] / max(theirs["process_peak"], 1)
        lines.append(
            f"- {r['config']} {clip}: the run's peak above set-up, ours / official = "
            f"**{run:.2f}x**; the whole process's peak (ours with its compile) = {peak:.2f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    import harness
    import results

    reference = str(pathlib.Path(args.torch_reference).expanduser().resolve())
    start, records = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.case:
            records.append(measure_case(case, reference, pathlib.Path(tmp)))
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
    body = table(records) + "\n\n" + ratios(records)
    print(body)
    if args.write_results:
        import torch

        env = {**harness.environment(), "torch": torch.__version__}
        env["malloc"] = (
            "ours: one heap for all threads, as the inference commands; official: glibc's defaults"
        )
        command = "python benchmarks/memory_side_by_side.py " + shlex.join(sys.argv[1:])
        note = args.note or f"whole run {time.perf_counter() - start:.0f} s"
        head = results.env_block(env, command, note)
        results.update_section(
            pathlib.Path(args.results), args.section, args.section, head + "\n\n" + body
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
