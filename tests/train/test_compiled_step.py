"""A train step compiled by `compile --serialize` and loaded by `train` (`train.compiled_step`):
it trains as the step the run compiles itself, loss for loss; a file of another program, of
another jax, or no program at all is refused with one line before anything is written.

The step is compiled by the command in a process of its own, as a user runs it: XLA:CPU
(jax 0.10.2) serializes an executable without some of its functions when the process had
compiled others that share them (benchmarks/RESULTS.md, "Compile")."""

from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys

import jax
import pytest

from reducio_jax import cli
from reducio_jax.errors import InputError
from reducio_jax.train import run

DEVICES = 2
MICRO = "tests/train/micro_config.py"
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cfg():
    import micro_config

    cfg = micro_config.get_config()
    cfg.loss.perceptual_weight = 0.0  # no LPIPS weights in these runs
    return cfg


def _run(cfg, workdir):
    return run(cfg, workdir, progress=False, devices=jax.devices()[:DEVICES])


def _curve(workdir) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    drop = ("clips_per_second", "seconds_per_step", "mfu")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.fixture(scope="module")
def step_file(tmp_path_factory, subprocess_env):
    path = tmp_path_factory.mktemp("compiled") / "step.bin"
    argv = ["compile", "--topology", f"cpu:{DEVICES}", "--config", MICRO, "--batch_per_chip"]
    argv += ["1", "--config.loss.perceptual_weight=0.0", "--serialize", str(path)]
    env = {**subprocess_env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # --serialize compiles, whatever the cache
    done = subprocess.run(
        [sys.executable, "-m", "reducio_jax", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote the compiled step" in done.stdout
    return path


def test_a_loaded_step_trains_as_the_compiled_one(step_file, tmp_path):
    cfg = _cfg()
    compiled = _run(cfg, tmp_path / "compiled")
    cfg.train.compiled_step = str(step_file)
    cfg.train.seed = 0  # the loop's settings may differ from the compile's
    cfg.train.log_every = 1
    loaded = _run(cfg, tmp_path / "loaded")
    assert loaded.end_step == compiled.end_step == cfg.train.num_steps
    assert _curve(tmp_path / "loaded") == _curve(tmp_path / "compiled")


def _rewritten(step_file, tmp_path, change) -> str:
    record = pickle.loads(step_file.read_bytes())
    change(record)
    path = tmp_path / "changed.bin"
    path.write_bytes(pickle.dumps(record))
    return str(path)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            lambda cfg, f, t: cfg.data.update(batch_size=4),
            r"config\.data\.batch_size: 2 in the file, 4 here",
        ),
        (lambda cfg, f, t: cfg.loss.update(kl_weight=1.0), r"loss_weights"),
        (
            lambda cfg, f, t: cfg.train.update(
                compiled_step=_rewritten(f, t, lambda r: r["environment"].update(jax="0.0.1"))
            ),
            r"another set-up \(jax: '0.0.1' in the file, '" + jax.__version__,
        ),
        (
            lambda cfg, f, t: cfg.train.update(
                compiled_step=_rewritten(f, t, lambda r: r["environment"].update(devices=8))
            ),
            r"devices: 8 in the file, 2 here",
        ),
        (
            lambda cfg, f, t: (
                (t / "junk.bin").write_bytes(b"not a program")
                and cfg.train.update(compiled_step=str(t / "junk.bin"))
            ),
            "is not a compiled program",
        ),
        (
            lambda cfg, f, t: cfg.train.update(compiled_step=str(t / "none.bin")),
            "no compiled program at",
        ),
    ],
    ids=["batch", "loss", "jax", "devices", "junk", "missing"],
)
def test_another_program_or_set_up_is_refused(step_file, tmp_path, edit, fragment):
    cfg = _cfg()
    cfg.train.compiled_step = str(step_file)
    edit(cfg, step_file, tmp_path)
    with pytest.raises(InputError, match=fragment):
        _run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--find_batch"], "--serialize writes one program"),
        (["--program", "encode"], "writes the train step, not encode"),
        (["--topology", "cpu:99"], "CPU device"),
    ],
)
def test_bad_serialize_flags_are_one_error_line(args, fragment, tmp_path, capsys):
    argv = ["compile", "--topology", f"cpu:{DEVICES}", "--config", MICRO]
    argv += ["--serialize", str(tmp_path / "x.bin"), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "x.bin").exists()
