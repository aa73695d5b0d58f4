"""A real GCS server on 127.0.0.1 for the tests: `gcp-storage-emulator` (PyPI) in a subprocess.

Its objects live under `<base>/.cloudstorage/<bucket>/...`. Clients find it through the
environment of `client_env()`: gcsfs (etils.epath's `gs://` backend, tensorboardX's writer)
through `STORAGE_EMULATOR_HOST`, TensorStore's GCS driver (Orbax's arrays, the latent store)
through `TENSORSTORE_GCS_HTTP_URL` with a fixed test token instead of cloud credentials.
The emulator runs through tests/gcs_emulator_main.py, which adds two answers of real GCS that
TensorStore needs and the emulator lacks (the object generation on downloads, key-range
listings).
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid

BUCKET = "reducio-test"
LAUNCHER = pathlib.Path(__file__).resolve().parent / "gcs_emulator_main.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """The emulator process; `start()` / `stop()` (a stopped server refuses connections)."""

    def __init__(self, base: pathlib.Path, bucket: str = BUCKET):
        self.base, self.bucket, self.port = base, bucket, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        }

    def start(self) -> None:
        cmd = [
            sys.executable, str(LAUNCHER), "start", "--host=127.0.0.1",
            f"--port={self.port}", f"--default-bucket={self.bucket}",
        ]  # fmt: skip
        env = dict(os.environ, STORAGE_BASE=str(self.base))
        log = open(self.base / "server.log", "ab")
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the GCS emulator exited: see {self.base / 'server.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the GCS emulator did not start listening in 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def url(self, *parts: str) -> str:
        """A fresh `gs://<bucket>/<unique>/<parts>` URL (each test its own prefix)."""
        return "/".join([f"gs://{self.bucket}", uuid.uuid4().hex[:12], *parts])

    def local_object(self, url: str) -> pathlib.Path:
        """Where the emulator keeps the object `url` on disk."""
        return self.base / ".cloudstorage" / url.removeprefix("gs://")
