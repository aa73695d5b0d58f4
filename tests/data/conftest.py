"""Fixtures for the data tests."""

from __future__ import annotations

import pathlib

import pytest
from data_video_helpers import write_video


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Six 24-frame 16 fps "index" videos (3 mp4, mov, avi, webm) in one folder."""
    d = tmp_path_factory.mktemp("videos")
    for i, ext in enumerate([".mp4", ".mp4", ".mov", ".avi", ".mp4", ".webm"]):
        write_video(d / f"v{i}{ext}", 24, 16)
    return d
