"""`python train.py` reports bad input in one `error:` line, exit status 2, no traceback."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MICRO = str(ROOT / "tests" / "train" / "micro_config.py")


def _train(args: list[str], env: dict, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args,status,expected",
    [
        (["--config", "no/such/config.py"], 2, "config file no/such/config.py does not exist"),
        (["--config", MICRO, "--config.train.num_stepz=5"], 2, 'Did you mean "num_steps"'),
        (["--config", MICRO, "--config.train.num_steps=abc"], 2, "--config.train.num_steps=abc"),
        ([], 2, "--config is required"),
        (
            ["--config", MICRO, "--init_from", "missing.ckpt"],
            2,
            "--init_from missing.ckpt: no such file",
        ),
        (
            ["--config", MICRO, "--init_from", MICRO],
            2,
            "neither a torch.save zip archive nor a safetensors",
        ),
        (
            ["--config", MICRO, "--lpips_weights", "nope.pt"],
            2,
            "--lpips_weights nope.pt: no such file",
        ),
        (
            ["--config", MICRO, "--config.data.source=folder", "--config.data.path=no_videos"],
            2,
            "data:",
        ),
    ],
)
def test_bad_input_one_line(args, status, expected, subprocess_env, tmp_path):
    result = _train([*args, "--workdir", str(tmp_path / "run")], subprocess_env, tmp_path)
    assert result.returncode == status, result.stderr[-2000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
