"""The GCS server of the remote-storage tests (tests/gcs_server.py), one per test session."""

from __future__ import annotations

import gc
import os

import pytest
from gcs_server import GcsServer


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A started GCS emulator; this process's clients point at it while the session runs."""
    server = GcsServer(tmp_path_factory.mktemp("gcs"))
    server.start()
    saved = {k: os.environ.get(k) for k in server.client_env()}
    os.environ.update(server.client_env())
    yield server
    gc.collect()  # writers that flush once more when collected (tensorboardX's) do it now
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
