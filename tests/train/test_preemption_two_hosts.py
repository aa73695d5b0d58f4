"""A SIGTERM to one of two `jax.distributed` training processes (`python train.py`, the micro
config, one CPU device each, on localhost) stops both at the same step and both save it.

In a file of its own so that `pytest -n auto` runs it beside the single-process preemption
tests (tests/train/test_preemption.py), not after them.
"""

from __future__ import annotations

import signal
import socket
import time

from test_preemption import _complete_steps, _logged_steps, _output, _start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_host_stops_both_at_the_same_step(subprocess_env, tmp_path):
    """Two jax.distributed processes (1 CPU device each): a SIGTERM to process 1 alone reaches
    process 0 through jax's preemption service; both stop at the same step, both save it."""
    env = dict(subprocess_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    workdir, port = tmp_path / "run", _free_port()
    extra = ["--config.train.num_steps=40", "--config.train.checkpoint_every=1000",
             "--coordinator_address", f"localhost:{port}", "--num_processes", "2"]  # fmt: skip
    procs = [_start(workdir, env, *extra, "--process_id", str(i)) for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while _logged_steps(workdir) < 1 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), _output(procs[0])[-3000:]
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [143, 143], _output(procs[0])[-2000:] + _output(procs[1])[-2000:]
    stopped = _complete_steps(workdir)
    assert len(stopped) == 1 and 1 <= stopped[0] < 40
    data = workdir / "checkpoints" / str(stopped[0]) / "data"
    assert sorted(p.name for p in data.iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json",
    ]  # fmt: skip
    for p in procs:
        assert f"stopped at step {stopped[0]}" in _output(p)
