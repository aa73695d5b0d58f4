"""Peak memory of one clip's reconstruction, ours against the official PyTorch code, each side
in its own fresh process (no torch in ours, no JAX in theirs), ours through each entry point a
user has: the module, the Python API and the command line.

    python benchmarks/memory_side_by_side.py --torch-reference ~/Reducio-VAE \\
        --case tiny:16x256x256 tiny:16x288x640 reducio_ft4:16x256x256 --write-results

Every side reads the same recipe weights (tests/recipe.py) from one torch-format checkpoint and
the same fixed float32 clip (the CLI: that clip as a 16-frame H.264 file, written beforehand
with `reducio_jax.data.video.write_mp4`). Each child process loads its model and the clip, then
measures from there on the CPU with the kernel's counters (`/proc/self/status`: VmHWM, reset
through `/proc/self/clear_refs` after glibc's `malloc_trim`).

Paths (`--paths`, default all three; the official side always runs, it is the baseline):

- module: ours as the benchmarks call it, the model's jit lowered and compiled by hand, one
  malloc heap for all threads as the inference commands (reducio_jax/programs/allocator.py);
- api: a Python user's process: `ReducioVAE.from_torch_checkpoint(CKPT, "configs/X.py")`, then
  `vae.reconstruct(clip)` twice (the first call compiles, the second reuses the program), with
  glibc's default heaps; then `vae.plan_memory(H, W)`, the planner's prediction for one window
  (after the two calls, whose executable it reuses, so the calls are the user's own);
- cli: `python -m reducio_jax reconstruct IN.mp4 OUT.mp4 --checkpoint CKPT --config
  configs/X.py` as a subprocess under `/usr/bin/time -f %M` (its maximum resident set; a child's
  own `ru_maxrss` would start from this parent's figure, see below), persistent compilation
  cache off so that it compiles as the others do; it must exit 0 and write OUT. The planner's
  prediction is the `... GiB of ... GiB` line it prints on stderr.

Columns (GiB unless named):

- set-up: the resident set once the model and the clip are loaded (after `malloc_trim`);
- compile (module): the peak above set-up while XLA compiles the program (`lower().compile()`);
- run: the peak above the resident set at its start while one clip is reconstructed (compiled
  already: module; the second `reconstruct` call: api);
- process: the process's peak resident set over its life (the largest VmHWM of set-up and
  the blocks; api: up to the end of its second call; cli: `/usr/bin/time`'s %M), what a user's
  process needs. (`ru_maxrss` cannot serve: a child inherits its parent's figure at `exec`,
  and the reset of VmHWM resets it too.)
- planner: what the memory planner says one call needs above the parameters already resident
  (`Plan.need`: XLA's memory analysis, one host copy of the output, 15% headroom), to set
  against run (api) and process (cli);
- seconds: the run (module, official); call 1 / call 2 (api); the whole command's wall time
  (cli);
- XLA temp: the compiled program's temporaries (module);
- max abs diff: against the official reconstruction (module, api; the cli's input is uint8).

Below the table, ours / official for the process peak of each path (and the module's run).
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE))

import proc_memory  # noqa: E402  (benchmarks/: JAX-free, so is the torch side's set-up)

GiB = 1 << 30
PATHS = ("module", "api", "cli")
TIME = "/usr/bin/time"  # GNU time: the child's own maximum resident set (%M, KiB)
# The planner's line on stderr (`Plan.describe`) and the compile count (`CompileCount.describe`)
PLAN_LINE = re.compile(
    r"(\d+) window\(s\) a call(?:, tiled (\d+) px)?: ([\d.]+) GiB of ([\d.]+) GiB"
)
COMPILE_LINE = re.compile(r"compiled (\d+) program\(s\) \((\d+) from the cache\) in ([\d.]+) s")


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
    p.add_argument(
        "--paths", nargs="+", choices=PATHS, default=list(PATHS), help="our entry points to run"
    )
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


def config_file(name: str) -> pathlib.Path:
    return ROOT / "configs" / f"{name}.py"


def make_clip(job: dict):
    """The fixed float32 clip (1, T, H, W, 3) in [-1, 1] every side reconstructs."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (1, job["frames"], job["height"], job["width"], 3)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def clip_and_config(job: dict):
    from harness import ROOT

    from reducio_jax.config import load_config

    cfg = load_config(ROOT / "configs" / f"{job['config']}.py")
    cfg.model.dtype = "float32"
    return cfg, make_clip(job)


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


def run_api(job: dict) -> dict:
    """A user's process: the public loader, `reconstruct` twice, then the planner's figure."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from reducio_jax import ReducioVAE

    vae = ReducioVAE.from_torch_checkpoint(job["checkpoint"], str(config_file(job["config"])))
    video = jnp.asarray(make_clip(job))
    setup = trimmed_rss()
    calls = []
    for _ in range(2):
        with Above() as call:
            recon = np.asarray(vae.reconstruct(video))
        calls.append(call)
    process_peak = max(_PEAKS)  # the user's two calls; the planner's check is not theirs
    with Above() as planning:
        plan = vae.plan_memory(job["height"], job["width"])
    np.save(job["output"], recon)
    return {
        "setup_rss": setup,
        "call_s": [c.seconds for c in calls],
        "call_above": [c.peak_above for c in calls],
        "run_above": calls[1].peak_above,
        "process_peak": process_peak,
        "plan": {**plan.record(), "available": plan.available, "source": plan.source},
        "plan_s": planning.seconds,
        "compiles": vae.programs.compiles,
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


CHILDREN = {"jax": run_ours, "api": run_api, "torch": run_torch}


def child(job: dict) -> None:
    result = CHILDREN[job["side"]](job)
    result.setdefault("process_peak", max(_PEAKS))
    print(json.dumps(result))


# -- the command line, under /usr/bin/time ---------------------------------------------------------


def cli_command(video: pathlib.Path, out: pathlib.Path, checkpoint: str, config: str) -> list[str]:
    """`python -m reducio_jax reconstruct` as README.md shows it (compilation cache off)."""
    return [
        *(sys.executable, "-m", "reducio_jax", "reconstruct", str(video), str(out)),
        *("--checkpoint", checkpoint, "--config", f"configs/{config}.py"),
        "--compilation_cache=",
    ]


def run_cli(job: dict, video: pathlib.Path, tmp: pathlib.Path) -> dict:
    """The command's maximum resident set (`/usr/bin/time`), wall seconds and its plan line."""
    if not os.access(TIME, os.X_OK):
        return {"error": f"{TIME} (GNU time) is needed to measure the command's peak"}
    out, maxrss = tmp / "cli_out.mp4", tmp / "cli_maxrss.txt"
    out.unlink(missing_ok=True)
    command = cli_command(video, out, job["checkpoint"], job["config"])
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    start = time.perf_counter()
    done = subprocess.run(
        [TIME, "-f", "%M", "-o", str(maxrss), *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode:
        return {"error": f"exit {done.returncode}: {last_error(done.stderr)}"}
    if not out.exists():
        return {"error": f"exit 0 but {out.name} was not written"}
    record = {"process_peak": int(maxrss.read_text().split()[-1]) * 1024, "wall_s": wall}
    return {**record, **cli_plan(done.stderr), "command": shlex.join(command)}


def cli_plan(stderr: str) -> dict:
    """The planner's figures and the compile count the command printed (None where absent)."""
    plan, compiles = PLAN_LINE.search(stderr), COMPILE_LINE.search(stderr)
    record = {"plan": None, "compiles": None}
    if plan:
        batch, tile, need, available = plan.groups()
        record["plan"] = {
            "window_batch": int(batch),
            "tiled": tile is not None,
            "memory_per_call": int(float(need) * GiB),  # printed to 0.01 GiB
            "available": int(float(available) * GiB),
        }
    if compiles:
        record["compiles"] = int(compiles.group(1))  # compiled, not loaded from a cache
    return record


def write_video(job: dict, path: pathlib.Path) -> None:
    """The case's clip as an H.264 file at the config's frame rate (no resampling)."""
    from reducio_jax.config import load_config
    from reducio_jax.data.video import to_uint8, write_mp4

    fps = float(load_config(config_file(job["config"])).data.fps)
    write_mp4(path, to_uint8(make_clip(job)[0]), fps)


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


def last_error(stderr: str) -> str:
    """The line of a failed child's stderr that says why (its last line naming an error)."""
    lines = [line for line in stderr.splitlines() if "rror" in line]
    last = (lines or stderr.strip().splitlines() or ["(no output)"])[-1]
    return last.strip()[:300]


def run_side(job: dict) -> dict:
    cmd = [sys.executable, __file__, "--torch-reference", job["torch_reference"]]
    done = subprocess.run([*cmd, "--child", json.dumps(job)], capture_output=True, text=True)
    if done.returncode:
        return {"error": f"exit {done.returncode}: {last_error(done.stderr)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# side -> the path that runs it (the official side always runs: it is every ratio's baseline)
SIDES = {"torch": None, "jax": "module", "api": "api"}


def measure_case(case: dict, reference: str, paths: Sequence[str], tmp: pathlib.Path) -> dict:
    checkpoint = tmp / f"{case['config']}.ckpt"
    if not checkpoint.exists():
        write_checkpoint(reference, case["config"], checkpoint)
    record = dict(case)
    for side, path in SIDES.items():
        if path is not None and path not in paths:
            continue
        job = {
            **case,
            "side": side,
            "checkpoint": str(checkpoint),
            "torch_reference": reference,
            "output": str(tmp / f"{side}.npy"),
        }
        record[side] = run_side(job)
        print(f"{case['config']} {side}: {record[side]}", file=sys.stderr, flush=True)
    if "cli" in paths:
        video = tmp / f"clip_{case['frames']}x{case['height']}x{case['width']}.mp4"
        write_video(case, video)
        record["cli"] = run_cli({**case, "checkpoint": str(checkpoint)}, video, tmp)
        print(f"{case['config']} cli: {record['cli']}", file=sys.stderr, flush=True)
    record.update(differences(record, tmp))
    return record


def differences(record: dict, tmp: pathlib.Path) -> dict:
    """Max abs difference of each of our reconstructions against the official one."""
    import numpy as np

    if not ok(record.get("torch")):
        return {}
    theirs = np.load(tmp / "torch.npy")
    names = {"jax": "max_abs_diff", "api": "api_max_abs_diff"}
    return {
        name: float(np.abs(np.load(tmp / f"{side}.npy") - theirs).max())
        for side, name in names.items()
        if ok(record.get(side))
    }


def ok(side: dict | None) -> bool:
    return side is not None and "error" not in side


# -- the report -----------------------------------------------------------------------------------


def _g(n: int | None) -> str:
    return "–" if n is None else f"{n / GiB:.2f}"


def _diff(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def _need(side: dict) -> int | None:
    plan = side.get("plan")
    return None if plan is None else plan["memory_per_call"]


def _seconds(label: str, s: dict) -> str:
    if label == "ours: API":
        return " / ".join(f"{t:.1f}" for t in s["call_s"])
    if label == "ours: CLI":
        return f"{s['wall_s']:.1f} (wall)"
    return f"{s['run_s']:.1f}"


ROWS = (  # (record key, label in the table, its max abs diff)
    ("jax", "ours: module", "max_abs_diff"),
    ("api", "ours: API", "api_max_abs_diff"),
    ("cli", "ours: CLI", None),
    ("torch", "official", None),
)
HEAD = (
    "| config | clip TxHxW | side | set-up GiB | compile: peak above set-up GiB | "
    "run: peak above its start GiB | process peak GiB | planner: a call needs GiB | seconds | "
    "XLA temp GiB | max abs diff |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict, key: str, label: str, diff: str | None) -> str:
    clip, s = f"{r['frames']}x{r['height']}x{r['width']}", r[key]
    if "error" in s:
        return f"| {r['config']} | {clip} | {label} | {s['error']} ||||||||"
    return (
        f"| {r['config']} | {clip} | {label} | {_g(s.get('setup_rss'))} | "
        f"{_g(s.get('compile_above'))} | {_g(s.get('run_above'))} | {_g(s['process_peak'])} | "
        f"{_g(_need(s))} | {_seconds(label, s)} | {_g(s.get('xla_temp'))} | "
        f"{_diff(r.get(diff) if diff else None)} |"
    )


def table(records: list[dict]) -> str:
    rows = [HEAD]
    for r in records:
        rows += [row(r, key, label, diff) for key, label, diff in ROWS if key in r]
    return "\n".join(rows)


def ratios(records: list[dict]) -> str:
    return "\n".join(line for r in records if (line := case_ratios(r)))


def case_ratios(r: dict) -> str:
    """One line: ours / official for each path's process peak (and the module's run), and the
    API's second call against the planner's figure."""
    theirs = r.get("torch")
    if not ok(theirs):
        return ""
    clip = f"{r['frames']}x{r['height']}x{r['width']}"
    parts = []
    if ok(r.get("jax")):
        run = r["jax"]["run_above"] / max(theirs["run_above"], 1)
        parts.append(f"module: the run's peak above set-up **{run:.2f}x**")
    for key, label, _ in ROWS[:3]:
        if ok(r.get(key)):
            peak = r[key]["process_peak"] / max(theirs["process_peak"], 1)
            parts.append(f"{label.removeprefix('ours: ')} process peak {peak:.2f}x")
    api = r.get("api")
    if ok(api) and _need(api):
        parts.append(f"API call 2's run / the planner's need = {api['run_above'] / _need(api):.2f}")
    return f"- {r['config']} {clip}, ours / official: " + "; ".join(parts)


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
            records.append(measure_case(case, reference, args.paths, pathlib.Path(tmp)))
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
    body = table(records) + "\n\n" + ratios(records)
    print(body)
    if args.write_results:
        import torch

        env = {**harness.environment(), "torch": torch.__version__}
        env["malloc"] = (
            "ours: one heap for all threads (module, CLI), glibc's defaults (API, as a user's "
            "process); official: glibc's defaults"
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
