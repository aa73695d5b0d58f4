"""benchmarks/run.py: one op of the quick suite in process, its JSON record and Markdown row,
the RESULTS.md section update, and the accelerator suite's dry run / CPU refusal. No timing
assertions: speed is judged from benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import results  # noqa: E402
import run  # noqa: E402


@pytest.fixture(scope="module")
def encode_record() -> dict:
    case = harness.Case("encode", "tiny", "float32", batch=1, frames=16, resolution=32)
    return harness.run_case(case, repeats=1, warmup=False)  # as --quick runs it


def test_record_fields(encode_record):
    rec = json.loads(json.dumps(encode_record))  # one JSON line
    assert (rec["op"], rec["config"], rec["dtype"]) == ("encode", "tiny", "float32")
    assert (rec["batch"], rec["frames"], rec["resolution"]) == (1, 16, 32)
    assert len(rec["times_s"]) == 1 and rec["median_s"] == rec["times_s"][0] > 0
    assert rec["compile_s"] > 0 and rec["trace_s"] > 0
    assert rec["clips_per_s"] == pytest.approx(1 / rec["median_s"], rel=1e-3)
    assert rec["flops"] > 0  # XLA's cost analysis of the compiled encode
    assert rec["flop_per_s"] == pytest.approx(rec["flops"] / rec["median_s"], rel=1e-3)
    assert rec["peak_flop_per_s"] is None and rec["mfu"] is None  # no MFU on a CPU
    mem = rec["memory_bytes"]
    assert mem["peak"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"] > 0
    # measured around the runs: the resident set above its size at their start (the run's
    # temporaries fault in afresh after malloc_trim), within the process's peak since it began
    peak = rec["peak_bytes"]
    assert 0 < peak["rss_above_start"] <= peak["process_peak_rss"]
    env = rec["env"]
    assert env["backend"] == "cpu" and env["cpu_cores"] >= 1 and env["cpu"]
    assert env["jax"] and env["jaxlib"] and env["flax"] and env["date"].endswith("UTC")
    assert "xla_flags" in env and "commit" in env


def test_results_section_replaced_in_place(encode_record, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nhand-written text\n")
    body = results.env_block(encode_record["env"], "python benchmarks/run.py --quick", "a note")
    for _ in range(2):
        results.update_section(
            path, "quick", "Quick", body + "\n\n" + results.op_table([encode_record])
        )
    text = path.read_text()
    assert text.count("<!-- bench:quick -->") == 1 and text.count("<!-- /bench:quick -->") == 1
    assert "hand-written text" in text and "**a note**" in text
    row = next(line for line in text.splitlines() if line.startswith("| encode |"))
    head = next(line for line in text.splitlines() if line.startswith("| op |"))
    assert row.count("|") == head.count("|") and "peak GiB (measured)" in head
    assert (
        "| tiny | float32 | 1x16x32x32 |" in row and f"{encode_record['median_s']:.3f} (1)" in row
    )


def test_accelerator_suite_dry_run_and_cpu_refusal(capsys):
    assert run.main(["--suite", "accelerator", "--dry-run"]) == 0
    planned = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    whats = [p["what"] for p in planned]
    assert all(p["record"] == "planned" for p in planned)
    assert {f"train_step reducio_ft4 bfloat16 {b}x16x256x256" for b in (1, 2, 4, 8)} <= set(whats)
    assert "reconstruct reducio_ft4_1024px bfloat16 1x16x1024x1024" in whats
    assert run.main(["--suite", "accelerator"]) == 2  # JAX's backend here is the CPU
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --suite accelerator needs a GPU or TPU")


def test_bad_resolution_is_one_error_line(capsys):
    assert run.main(["--config", "tiny", "--resolution", "40", "--op", "encode"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiple of 32" in err[0]


@pytest.mark.skipif(
    not os.environ.get("REDUCIO_REFERENCE_REPO"),
    reason="set REDUCIO_REFERENCE_REPO to an official checkout",
)
def test_memory_side_by_side_writes_both_sides(tmp_path):
    """benchmarks/memory_side_by_side.py: each side in its own process, the same
    reconstruction (float32 rounding), a peak above set-up for each, one RESULTS section."""
    out, rows = tmp_path / "RESULTS.md", tmp_path / "rows.jsonl"
    argv = [sys.executable, str(BENCH / "memory_side_by_side.py"), "--case", "tiny:16x32x32"]
    argv += ["--torch-reference", os.environ["REDUCIO_REFERENCE_REPO"], "--write-results"]
    done = subprocess.run(
        [*argv, "--results", str(out), "--jsonl", str(rows)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(rows.read_text())
    assert record["max_abs_diff"] < 1e-4
    assert record["jax"]["run_above"] > 0 and record["torch"]["run_above"] > 0
    assert record["jax"]["process_peak"] >= record["jax"]["setup_rss"]
    assert record["api"]["call_s"][1] < record["api"]["call_s"][0]  # the second call reuses
    assert record["api"]["plan"]["memory_per_call"] > 0 and record["api_max_abs_diff"] < 1e-4
    assert record["cli"]["process_peak"] > 0 and record["cli"]["plan"] is not None
    text = out.read_text()
    assert text.count("| tiny | 16x32x32 |") == 4 and "ours / official" in text
    assert "| ours: API |" in text and "| ours: CLI |" in text


def test_memory_side_by_side_reads_the_plan_line_and_tables_each_path():
    """The command's plan line (`Plan.describe`, `CompileCount.describe`) is read back, and
    each path is a row, its process peak in the ratios; no torch, no child process."""
    import memory_side_by_side as bench

    from reducio_jax.models.tiling import TileConfig
    from reducio_jax.programs.cache import CompileCount
    from reducio_jax.programs.footprint import Plan

    tiles = TileConfig(256, 0.25, 32, max_batch=1, wide=True)
    plan = Plan(1, tiles, 3 * bench.GiB // 2, 20 * bench.GiB, "available RAM", (512, 512), 0)
    count = CompileCount()
    count.requests, count.from_cache = 8, 2
    read = bench.cli_plan(f"clip.mp4: {plan.describe()}\n{count.describe()}\n")
    assert read["plan"]["tiled"] and read["plan"]["memory_per_call"] == 3 * bench.GiB // 2
    assert read["plan"]["available"] == 20 * bench.GiB and read["compiles"] == 6
    assert bench.cli_plan("no plan here") == {"plan": None, "compiles": None}

    side = {"setup_rss": bench.GiB, "run_above": bench.GiB // 4, "process_peak": 2 * bench.GiB}
    record = {"config": "tiny", "frames": 16, "height": 64, "width": 64, "max_abs_diff": 1e-6}
    record["jax"] = {**side, "compile_above": bench.GiB, "run_s": 1.0, "xla_temp": 0}
    record["api"] = {**side, "call_s": [9.0, 1.0], "plan": read["plan"]}
    record["cli"] = {"process_peak": 3 * bench.GiB, "wall_s": 20.0, "plan": None}
    record["torch"] = {**side, "run_s": 2.0}
    text = bench.table([record]) + "\n" + bench.ratios([record])
    assert text.count("| tiny | 16x64x64 |") == 4 and "| 9.0 / 1.0 |" in text
    assert "CLI process peak 1.50x" in text and "| 3.00 | – | 20.0 (wall) |" in text
    record["cli"] = {"error": "exit 2: error: bad input"}
    assert "| ours: CLI | exit 2: error: bad input |" in bench.table([record])
