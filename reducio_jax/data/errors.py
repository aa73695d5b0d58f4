"""Errors raised by the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """The dataset cannot be used at all (missing, empty, misconfigured)."""


class BadVideoError(Exception):
    """One record (video file) cannot be decoded; the pipeline skips it."""
