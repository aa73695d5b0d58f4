"""How a command ends: one exit status per kind of outcome, one `error: ...` line on stderr.

* bad input (a missing file, a flag value or config that cannot be used, a store or checkpoint
  that does not fit): exit 2. Every module's input error (`ConfigError`, `ConversionError`,
  `DataError`, `StoreError`, `OutOfMemory`, a `TrainingError` of the set-up, ...) subclasses
  `InputError`.
* a run that failed: exit 1. The expected ones (`NonFiniteLossError`, data that broke mid-run)
  subclass `RunFailure`; anything unexpected (a disk error) is named by its type.

This module is the ground floor: it imports nothing of the package, and the exit status is
read from the two base classes, not from a list of every error type.
* Ctrl-C: exit 130; SIGTERM (preemption, `reducio_jax.runs.preemption`): exit 143.
"""

from __future__ import annotations

import ast

from absl import flags

OK, RUN_FAILED, BAD_INPUT, INTERRUPTED = 0, 1, 2, 130
MAX_ERROR_CHARS = 600


class InputError(ValueError):
    """An input that cannot be used (missing file, inconsistent sizes, bad flag value, ...):
    every module's bad-input error subclasses it (exit 2)."""


class RunFailure(RuntimeError):
    """A run that started and then failed (a non-finite loss, data that broke mid-run): every
    module's run-failure error subclasses it (exit 1)."""


def exit_status(err: BaseException) -> int:
    """2 for bad input (an `InputError`, a missing file, an absl flag error), 1 otherwise."""
    if isinstance(err, RunFailure):
        return RUN_FAILED
    if isinstance(err, (InputError, FileNotFoundError, flags.Error)):
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
    type (default: for unexpected failures, i.e. not an `InputError` or `RunFailure`)."""
    if isinstance(err, str):
        text = err
    else:
        text = message(err)
        if named is None:
            named = exit_status(err) == RUN_FAILED and not isinstance(err, RunFailure)
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
    "RunFailure",
    "error_line",
    "message",
    "exit_status",
]
