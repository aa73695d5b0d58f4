"""SIGTERM to a real `python train.py --workdir gs://...` (the micro config, one CPU device):
the step in flight is checkpointed in the bucket, the run exits 143, and `--resume` finds the
latest step there and ends on the loss curve of an uninterrupted run in a local folder."""

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
DROP = ("clips_per_second", "seconds_per_step", "mfu")


@pytest.fixture(scope="module")
def env(gcs) -> dict[str, str]:
    env = {**os.environ, **gcs.client_env(), "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "train")])
    env.pop("XLA_FLAGS", None)
    return env


def _args(workdir: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "--config", MICRO, "--workdir", workdir,
        f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4", "--noprogress",
        *extra,
    ]  # fmt: skip


def _curve(workdir: str) -> dict[int, dict]:
    lines = (as_path(workdir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    return {r["step"]: {k: v for k, v in r.items() if k not in DROP} for r in rows}


def _logged_steps(workdir: str) -> int:
    path = as_path(workdir) / "metrics.jsonl"
    try:
        return max((json.loads(x)["step"] for x in path.read_text().splitlines()), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def test_sigterm_saves_in_bucket_and_resume_matches_local(gcs, env, tmp_path):
    local, remote = str(tmp_path / "straight"), gcs.url("run")
    done = subprocess.run(_args(local), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(_args(remote), env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while _logged_steps(remote) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "run.log").read_text()[-3000:]
    out = (tmp_path / "run.log").read_text()
    lines = [x for x in out.splitlines() if x.startswith("preempted: ")]
    assert len(lines) == 1 and "Traceback" not in out and remote in lines[0]
    steps = sorted(int(p.name) for p in (as_path(remote) / "checkpoints").iterdir())
    stopped = steps[-1]
    assert 1 <= stopped < STEPS and f"stopped at step {stopped}" in lines[0]

    resumed = subprocess.run(_args(remote, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from step {stopped} " in resumed.stderr
    want, got = _curve(local), _curve(remote)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    assert want == got  # every logged loss part, bit for bit
    assert not (pathlib.Path.cwd() / "gs:").exists()
