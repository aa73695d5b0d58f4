"""Errors raised by the data layer."""

from __future__ import annotations

from reducio_jax.errors import InputError


class DataError(InputError):
    """The dataset cannot be used at all (missing, empty, misconfigured)."""


class BadVideoError(Exception):
    """One record (video file) cannot be decoded; the pipeline skips it."""
