"""Test set-up: eight simulated CPU devices and the parity fixtures directory."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

# The repository's own compact copy (tests/fixtures/README.md); REDUCIO_FIXTURES may point at the
# full fixtures instead (the same files with every array whole).
FIXTURES = pathlib.Path(
    os.environ.get("REDUCIO_FIXTURES", pathlib.Path(__file__).resolve().parent / "fixtures")
)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"parity fixtures not found at {FIXTURES}; set REDUCIO_FIXTURES")
    return FIXTURES
