"""Test set-up: eight simulated CPU devices, one XLA compilation cache for the whole run, the
parity fixtures directory, the GCS server of the bucket tests, and how `pytest -n auto`
(pytest-xdist) splits the suite.

Most of the suite's time is XLA compiling (one CPU core each), so two workers run it in about
half the time on two cores. Every process of a run (both workers and the CLI subprocesses the
tests start) shares one persistent compilation cache: the same program compiled by another
test, another worker or a subprocess is read back instead of compiled again.
"""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keyed by the program, the jax/jaxlib versions and the flags, so a cache left by an earlier run
# is safe to reuse; bounded (least recently used entries go, under a file lock).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(tempfile.gettempdir()) / f"reducio-jax-tests-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# Two workers share the machine's memory: glibc's defaults hand freed blocks back (the package's
# malloc setting, tested in tests/programs/test_allocator.py, keeps a process's peak heap).
os.environ.setdefault("REDUCIO_JAX_MALLOC", "0")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402
from gcs_server import GcsServer  # noqa: E402

# The repository's own compact copy (tests/fixtures/README.md); REDUCIO_FIXTURES may point at the
# full fixtures instead (the same files with every array whole).
FIXTURES = pathlib.Path(
    os.environ.get("REDUCIO_FIXTURES", pathlib.Path(__file__).resolve().parent / "fixtures")
)
# Session fixtures that are costly to build: the files using one run on the same worker.
SHARED_SESSION_FIXTURES = ("eight_device_run",)
GIB = 1 << 30
WORKER_MEMORY = 10 * GIB  # what one worker may hold at its peak (the 256 px parity tests)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"parity fixtures not found at {FIXTURES}; set REDUCIO_FIXTURES")
    return FIXTURES


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A started GCS emulator (tests/gcs_server.py); this process's clients point at it while
    the session runs."""
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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file: drop the compiled programs and traces of every jitted function,
    so a worker's memory stays that of one file (the cache above makes recompiling cheap)."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, as many as the memory holds."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(os.cpu_count() or 1, memory // WORKER_MEMORY))


def pytest_collection_modifyitems(config, items) -> None:
    """With `--dist loadgroup`, a test file runs on one worker (its module fixtures are built
    once), and so do all the files that use one of `SHARED_SESSION_FIXTURES`."""
    root = pathlib.Path(str(config.rootpath))
    for item in items:
        shared = [name for name in SHARED_SESSION_FIXTURES if name in item.fixturenames]
        group = shared[0] if shared else str(pathlib.Path(str(item.path)).relative_to(root))
        item.add_marker(pytest.mark.xdist_group(group))
