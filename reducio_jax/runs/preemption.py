"""SIGTERM as a "stop after this step" request, for training, encoding and evaluation.

Schedulers (Kubernetes, SLURM, Cloud TPU/GPU preemption) send SIGTERM, wait a grace period,
then SIGKILL. Inside `StopOnSigterm` a SIGTERM only sets a flag; the loop polls
`should_stop(step)` after each step or batch, saves what it has, and the command exits with
`PREEMPTED_STATUS` (143 = 128 + SIGTERM, what a shell reports for a SIGTERM'd process and what
schedulers read as "terminated; rerun me").

With `jax.distributed` initialised, jax's preemption service owns SIGTERM (it handles it in C++
and tells every host); `should_stop(step)` then asks
`multihost_utils.reached_preemption_sync_point(step)`, which is True on every process at the
same step, so all processes save the same step. It must be called at every step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from jax._src import distributed  # the preemption service: no public spelling in jax 0.10
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
PREEMPTED_STATUS = 128 + int(signal.SIGTERM)  # 143


class Preempted(Exception):
    """The run stopped on SIGTERM after saving its work; rerun (with --resume) to continue."""


def _preemption_service() -> bool:
    state = distributed.global_state
    return state.client is not None and state.preemption_sync_manager is not None


class StopOnSigterm:
    """Context manager: while inside, SIGTERM asks the loop to stop instead of killing it.

    The previous handler is restored on exit. Outside the main thread (where Python cannot
    install handlers) and under the multi-host preemption service it installs nothing.
    """

    def __init__(self) -> None:
        self.signal_received = False
        self.multihost = _preemption_service()
        self._previous = None
        self._installed = False

    def __enter__(self) -> StopOnSigterm:
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.signal_received:
            log.warning("SIGTERM received: stopping after the work in flight and saving.")
        self.signal_received = True

    def should_stop(self, step: int | None = None) -> bool:
        """True once a stop was requested. Multi-host: call it at every step with the step
        number (the same on every process); True on all processes at the same step."""
        if self.multihost and step is not None:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal_received


__all__ = ["PREEMPTED_STATUS", "Preempted", "StopOnSigterm"]
