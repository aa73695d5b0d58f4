"""Shared set-up of the training tests: the micro config, the environment of subprocesses,
and device subsets of the 8 simulated CPU devices (tests/conftest.py)."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import micro_config  # noqa: E402


@pytest.fixture
def micro():
    return micro_config.get_config()


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment of `python train.py` subprocesses: CPU, one device, the run's compilation
    cache (tests/conftest.py)."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")]),
    )
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="session")
def eight_device_run(tmp_path_factory):
    """Two steps of dist_config on the 8 simulated devices (data=4 x fsdp=2), in process:
    (trainer, result, parameters before training as numpy)."""
    import dist_config
    import jax
    import numpy as np

    from reducio_jax.train import Trainer

    trainer = Trainer(
        dist_config.get_config(), tmp_path_factory.mktemp("eight"), progress=False,
        devices=jax.devices()[:8],
    )  # fmt: skip
    before = jax.tree.map(lambda a: np.asarray(a).copy(), trainer.state)
    return trainer, trainer.run(), before
