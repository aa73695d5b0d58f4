"""Errors of a training run that the CLI reports as one line (no traceback)."""

from reducio_jax.errors import InputError
from reducio_jax.errors import RunFailure as BaseRunFailure


class TrainingError(InputError):
    """A run that cannot start or continue: bad workdir, weights, config or data (exit 2)."""


class RunFailure(BaseRunFailure, TrainingError):
    """A run that started and then failed (exit status 1, not 2): the data pipeline broke
    mid-run, a NaN/inf loss, ..."""


class NonFiniteLossError(RunFailure):
    """A NaN/inf loss or gradient: the run stops, naming the step and the last good checkpoint."""
