"""Bad remote input, against the GCS server: a bucket that does not exist, a missing object.
Each command ends with one `error:` line naming the URL and exit status 2, and nothing is
created (a missing bucket is never created)."""

from __future__ import annotations

import pathlib
import sys

import pytest
from etils import epath

from reducio_jax.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
MICRO = str(ROOT / "tests" / "train" / "micro_config.py")
NO_BUCKET = "gs://no-such-bucket-reducio"


def _error(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    status = main(argv)
    err = capsys.readouterr().err
    return status, [x for x in err.splitlines() if x.startswith("error: ")], err


@pytest.fixture
def missing(gcs) -> str:
    return gcs.url("missing")


def _cases(missing: str) -> list[tuple[list[str], str]]:
    return [
        (["train", "--config", MICRO, "--workdir", f"{NO_BUCKET}/run", "--noprogress"],
         f"{NO_BUCKET}/run: bucket {NO_BUCKET} does not exist"),
        (["convert", "--checkpoint", f"{missing}/x.ckpt", "--config", TINY, "--out", "o"],
         f"{missing}/x.ckpt does not exist"),
        (["eval", "--checkpoint", f"{missing}/pre", "--config", TINY, "--data", "synthetic"],
         f"{missing}/pre does not exist"),
        (["reconstruct", f"{missing}/in.mp4", f"{missing}/out.mp4", "--checkpoint",
          f"{missing}/pre", "--config", TINY], f"{missing}/pre does not exist"),
        (["decode", "--store", f"{missing}/store", "--checkpoint", f"{missing}/pre",
          "--out", f"{missing}/out"], f"{missing}/store is not a latent store"),
        (["train", "--config", MICRO, "--config.data.batch_size=8", "--workdir", "w",
          "--init_from", f"{missing}/x.ckpt"],
         f"--init_from {missing}/x.ckpt: no such file"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(6))
def test_bad_remote_input_one_line(case, missing, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, expected = _cases(missing)[case]
    status, lines, err = _error(capsys, argv)
    assert status == 2, err[-2000:]
    assert len(lines) == 1 and expected in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not epath.Path(NO_BUCKET).exists()  # never created
    assert not epath.Path(missing).exists()  # nothing half-written
    assert not (tmp_path / "gs:").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
