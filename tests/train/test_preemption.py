"""Real signals sent to real `python train.py` processes (the micro config, one CPU device).

* SIGTERM at a step that is not a multiple of `checkpoint_every`, to a run in a bucket
  (`--workdir gs://...`, a real GCS server): the run checkpoints that step there, exits 143,
  and `--resume` finds it and gives the loss curve of an uninterrupted run in a local folder,
  bit for bit.
* SIGKILL while an asynchronous checkpoint is being written: `--resume` ignores the partial save,
  says which (complete) step it resumed from, and again ends on the uninterrupted curve.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from reducio_jax.storage.paths import as_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "tests" / "train" / "micro_config.py")
STEPS = 6
TMP_MARK = ".orbax-checkpoint-tmp"


def _args(workdir: pathlib.Path | str, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "--config", MICRO, "--workdir", str(workdir),
        f"--config.train.num_steps={STEPS}", "--noprogress", *extra,
    ]  # fmt: skip


def _run(workdir, env, *extra) -> subprocess.CompletedProcess:
    cmd = _args(workdir, *extra)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _start(workdir, env, *extra, log_dir=None) -> subprocess.Popen:
    path = pathlib.Path(log_dir or workdir.parent) / f"{time.monotonic_ns()}.log"
    with open(path, "w") as log:
        proc = subprocess.Popen(_args(workdir, *extra), env=env, stdout=log, stderr=log)
    proc.log_path = path
    return proc


def _output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def _curve(workdir: pathlib.Path) -> dict[int, dict]:
    """Logged values by step (a step logged twice, before a crash and after the resume, keeps
    its last line; both must be equal for the curve to match anyway)."""
    drop = ("clips_per_second", "seconds_per_step", "mfu")
    rows = [json.loads(x) for x in (as_path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in drop} for r in rows}


def _logged_steps(workdir: pathlib.Path | str) -> int:
    path = as_path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)


def _complete_steps(workdir: pathlib.Path | str) -> list[int]:
    folder = as_path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight(subprocess_env, tmp_path_factory) -> pathlib.Path:
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    done = _run(workdir, subprocess_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_sigterm_checkpoints_step_in_flight_in_bucket_and_resume_matches(
    straight, subprocess_env, gcs, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here as ./gs:
    env, workdir = {**subprocess_env, **gcs.client_env()}, gcs.url("preempted")
    proc = _start(workdir, env, "--config.train.checkpoint_every=4", log_dir=tmp_path)
    deadline = time.monotonic() + 300
    while _logged_steps(workdir) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # step 1 is done; 5 remain
    assert proc.wait(timeout=300) == 143, _output(proc)[-3000:]
    out = _output(proc)
    assert "Traceback" not in out
    lines = [x for x in out.splitlines() if x.startswith("preempted: ")]
    assert len(lines) == 1 and "--resume" in lines[0] and workdir in lines[0]
    stopped = _complete_steps(workdir)[-1]
    assert 1 <= stopped < STEPS and stopped % 4 != 0  # not a regular checkpoint
    assert f"stopped at step {stopped}" in lines[0] and _logged_steps(workdir) == stopped

    resumed = _run(workdir, env, "--config.train.checkpoint_every=4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from step {stopped} " in resumed.stderr
    assert f"steps {stopped} -> {STEPS}" in resumed.stdout
    want, got = _curve(straight), _curve(workdir)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    assert want == got  # every logged loss part, bit for bit
    assert not (tmp_path / "gs:").exists()


def _kill_during_save(workdir: pathlib.Path, env: dict, resume: bool) -> str | None:
    """Starts a run that saves every step and SIGKILLs it while a save is uncommitted;
    returns the name of the partial save left on disk (None if the kill came too late)."""
    proc = _start(workdir, env, "--config.train.checkpoint_every=1", *(["--resume"] * resume))
    folder, deadline = workdir / "checkpoints", time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        names = os.listdir(folder) if folder.is_dir() else []
        if any(TMP_MARK in n and not n.startswith("1.") for n in names):  # a save after step 1
            proc.kill()
            break
        time.sleep(0.001)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, _output(proc)[-3000:]
    partial = [n for n in os.listdir(folder) if TMP_MARK in n]
    return partial[0] if partial else None


def test_sigkill_during_async_save_resumes_from_last_complete(straight, subprocess_env, tmp_path):
    workdir = tmp_path / "run"
    partial = None
    for attempt in range(3):  # the save may commit between the poll and the kill
        partial = _kill_during_save(workdir, subprocess_env, resume=attempt > 0)
        if partial:
            break
    assert partial, "never caught a save in flight"
    complete = _complete_steps(workdir)
    partial_step = int(partial.split(".")[0])
    assert complete and partial_step not in complete and partial_step > complete[-1]

    resumed = _run(workdir, subprocess_env, "--config.train.checkpoint_every=1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from step {complete[-1]} " in resumed.stderr
    assert partial in resumed.stderr  # named as ignored
    assert not [n for n in os.listdir(workdir / "checkpoints") if TMP_MARK in n]  # cleaned up
    assert _curve(straight) == _curve(workdir)
