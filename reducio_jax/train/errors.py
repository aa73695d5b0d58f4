"""Errors of a training run that the CLI reports as one line (no traceback)."""


class TrainingError(RuntimeError):
    """A run that cannot start or continue: bad workdir, weights, config or data."""


class NonFiniteLossError(TrainingError):
    """A NaN/inf loss or gradient: the run stops, naming the step and the last good checkpoint."""
