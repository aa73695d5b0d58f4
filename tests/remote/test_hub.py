"""Released weights by name through huggingface_hub, against a local hub (tests/hub_server.py)
serving a small checkpoint the test writes (the tiny model in the released file layout).

Each call runs in a subprocess: huggingface_hub reads `HF_ENDPOINT`, `HF_HOME` and
`HF_HUB_OFFLINE` when it is imported.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import recipe_checkpoint
from hub_server import HubServer

from reducio_jax import ReducioVAE

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
REPO = "test-org/Reducio-VAE"
FILE = "reducio-ft4-fs32-attn23.ckpt"  # the name variant "ft4" asks for
LOAD = """
import sys, numpy as np, jax
from flax import nnx
from reducio_jax import ReducioVAE
vae = ReducioVAE.from_pretrained(sys.argv[1], sys.argv[2], variant=sys.argv[3] or None)
np.savez(sys.argv[4], *[np.asarray(x) for x in jax.tree.leaves(nnx.state(vae.model))])
"""


@pytest.fixture(scope="module")
def hub(fixtures_dir, tmp_path_factory):
    server = HubServer()
    ckpt = recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("hub") / FILE)
    server.repos[REPO] = {FILE: ckpt.read_bytes()}
    server.local_file = ckpt
    yield server
    server.stop()


def _env(hub, home: pathlib.Path, **extra) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_ENDPOINT": hub.endpoint,
           "HF_HOME": str(home / "hf"), "REDUCIO_JAX_CACHE": str(home / "reducio")}  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("XLA_FLAGS", None)
    return {**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra}


def _load(env, name: str, variant: str, out: pathlib.Path) -> list[np.ndarray]:
    cmd = [sys.executable, "-c", LOAD, name, TINY, variant, str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_from_pretrained_by_name_converts_once_and_works_offline(hub, tmp_path):
    from flax import nnx

    want = ReducioVAE.from_torch_checkpoint(hub.local_file, TINY)
    want = [np.asarray(x) for x in jax.tree.leaves(nnx.state(want.model))]
    env = _env(hub, tmp_path)
    first = _load(env, REPO, "ft4", tmp_path / "a.npz")
    converted = list((tmp_path / "reducio" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "vae").is_dir()  # converted once, kept
    pinned = f"hf://{REPO}/{FILE}@{hub.commit(REPO)}"
    hub.requests.clear()
    offline = _load({**env, "HF_HUB_OFFLINE": "1"}, pinned, "", tmp_path / "b.npz")
    assert hub.requests == []  # offline: the cache only
    assert len(first) == len(offline) == len(want) > 50
    for a, b, c in zip(want, first, offline, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert list((tmp_path / "reducio" / "converted").iterdir()) == converted


def _convert(env, checkpoint: str, out: pathlib.Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "reducio_jax", "convert", "--checkpoint", checkpoint,
           "--config", TINY, "--out", str(out)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("hf://test-org/no-such-repo/x.ckpt", "no repository test-org/no-such-repo"),
        (f"hf://{REPO}/missing.ckpt", "has no file missing.ckpt"),
        (f"hf://{REPO}/{FILE}@0123456789abcdef0123456789abcdef01234567", "has no revision"),
        ("hf://just-a-name", "is not hf://OWNER/REPO/FILE"),
    ],
)
def test_bad_hub_names_one_line(hub, tmp_path, name, expected):
    result = _convert(_env(hub, tmp_path), name, tmp_path / "out")
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and expected in lines[0] and name in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_network_one_line(hub, tmp_path):
    env = _env(hub, tmp_path, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    result = _convert(env, f"hf://{REPO}/{FILE}", tmp_path / "out")
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "cannot reach the hub" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
