"""Two processes (jax.distributed on localhost, 4 CPU devices each) train into one bucket
(`python train.py --workdir gs://...`, a real GCS server): both write their shards and their
data position into one checkpoint there, and the losses equal those of one process training on
8 devices into a local folder (tests/train/test_distributed.py makes the same comparison for a
local workdir; the tolerances are the ones explained there)."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
import numpy as np
from gcs_server import free_port
from helpers import losses_line, start_training_process

from reducio_jax.storage.paths import as_path

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAIN = ROOT / "tests" / "train"
sys.path.insert(0, str(TRAIN))


def test_two_processes_save_one_checkpoint_in_bucket(gcs, tmp_path):
    import dist_config

    from reducio_jax.train import run

    env = {**os.environ, **gcs.client_env(), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(TRAIN)])}  # fmt: skip
    workdir = gcs.url("two")
    port = free_port()
    procs = [start_training_process(i, port, workdir, env) for i in range(2)]
    try:
        one = run(dist_config.get_config(), tmp_path / "one", progress=False,
                  devices=jax.devices()[:8]).logs  # fmt: skip
        lines = [losses_line(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert lines[0] == lines[1] and lines[0].startswith("steps 0 -> 2")
    step = as_path(workdir) / "checkpoints" / "2"
    assert (step / "data" / "process_1-of-2.json").is_file()
    assert (step / "data" / "process_0-of-2.json").is_file()
    assert (step / "_CHECKPOINT_METADATA").is_file()  # committed
    two = [json.loads(x) for x in (as_path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one, strict=True):
        for key in dist_config.COMPARED:
            rtol = 1e-3 if key == "d_weight" else 1e-4
            np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-7, err_msg=key)
