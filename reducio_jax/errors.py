"""How a command ends: one exit status per kind of outcome, one `error: ...` line on stderr.

* bad input (a missing file, a flag value or config that cannot be used, a store or checkpoint
  that does not fit): exit 2. Code that checks input raises `InputError`; the library's own
  input errors (`ConfigError`, `ConversionError`, `CheckpointFormatError`, `DataError`,
  `StoreError`, a `TrainingError` of the set-up) count the same.
* a run that failed (`RunFailure`: a non-finite loss, data that broke mid-run; a disk error,
  anything unexpected): exit 1.
* Ctrl-C: exit 130; SIGTERM (preemption, `reducio_jax.preemption`): exit 143.
"""

from __future__ import annotations

import ast

OK, RUN_FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
MAX_ERROR_CHARS = 600


class InputError(ValueError):
    """An input that cannot be used (missing file, inconsistent sizes, bad flag value, ...)."""


def bad_input_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input" (exit 2)."""
    from absl import flags

    from reducio_jax.config import ConfigError
    from reducio_jax.convert.hub import HubError
    from reducio_jax.convert.mapping import ConversionError
    from reducio_jax.convert.torch_format import CheckpointFormatError
    from reducio_jax.data.errors import DataError
    from reducio_jax.latents.store import StoreError

    return (
        InputError,
        ConfigError,
        ConversionError,
        CheckpointFormatError,
        HubError,
        DataError,
        StoreError,
        FileNotFoundError,
        flags.Error,
    )


def exit_status(err: BaseException) -> int:
    """2 for bad input, 1 for a run that failed."""
    from reducio_jax.train.errors import RunFailure, TrainingError

    if isinstance(err, RunFailure):
        return RUN_FAILED
    if isinstance(err, (*bad_input_types(), TrainingError)):
        return BAD_INPUT
    return RUN_FAILED


def message(err: BaseException) -> str:
    """An exception's message on one line (a repr()'d message, as KeyError's, unquoted)."""
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return " ".join(text.split())


def error_line(err: BaseException | str, *, named: bool | None = None) -> str:
    """`error: MESSAGE` on one line, shortened if very long. `named`: prefix the exception's
    type (default: for unexpected failures, i.e. run failures that are not a `TrainingError`)."""
    from reducio_jax.train.errors import TrainingError

    if isinstance(err, str):
        text = err
    else:
        text = message(err)
        if named is None:
            named = exit_status(err) == RUN_FAILED and not isinstance(err, TrainingError)
        if named or not text:
            text = f"{type(err).__name__}: {text}".rstrip(": ")
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " ... (truncated)"
    return f"error: {text}"


__all__ = [
    "BAD_INPUT",
    "INTERRUPTED",
    "OK",
    "RUN_FAILED",
    "InputError",
    "bad_input_types",
    "error_line",
    "message",
    "exit_status",
]
