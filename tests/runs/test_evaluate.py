"""eval.py end to end (tiny model, synthetic 64 px clips) and the metric kernels.

The reconstruction runs compile once per shape; both end-to-end runs use batch 2 over 2 of
the 8 simulated devices so the second reuses the first's executables.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from helpers import recipe_checkpoint
from torch_writer import save_torch_checkpoint

from reducio_jax import ReducioVAE, cli, load_config
from reducio_jax.metrics import i3d_state_dict_shapes, psnr, ssim
from reducio_jax.runs.evaluate import MetricTotals, i3d_pool_window, image_metrics, lpips_per_clip

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    """`python -m reducio_jax eval ARGV` (= `python eval.py ARGV`), in this process."""
    return cli.main(["eval", *argv])


TINY = str(ROOT / "configs" / "tiny.py")
RUN = ["--data", "synthetic", "--resolution", "64", "--batch_size", "2", "--devices", "2"]


def _random_i3d(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in i3d_state_dict_shapes().items():
        if key.endswith("running_var"):
            v = 0.5 + rng.random(shape)
        elif key.endswith("conv3d.weight"):
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            v = 0.1 * rng.standard_normal(shape)
        sd[key] = v.astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def ckpt(fixtures_dir, tmp_path_factory) -> pathlib.Path:
    return recipe_checkpoint(fixtures_dir, "tiny", tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


@pytest.fixture(scope="module")
def tiny_vae(ckpt) -> ReducioVAE:
    return ReducioVAE.from_torch_checkpoint(ckpt, load_config(TINY))


@pytest.fixture(scope="module")
def first_run(ckpt, tmp_path_factory) -> pathlib.Path:
    """3 clips in 2 batches (the second padded), LPIPS from the checkpoint, no I3D."""
    out = tmp_path_factory.mktemp("eval")
    args = ["--checkpoint", str(ckpt), "--config", TINY, *RUN, "--num_clips", "3"]
    assert main([*args, "--out", str(out), "--save_videos", "2", "--noprogress"]) == 0
    return out


def test_metrics_json(first_run):
    m = json.loads((first_run / "metrics.json").read_text())
    for key in ("psnr", "ssim", "lpips"):
        assert math.isfinite(m[key]), key
    assert m["rfvd"] is None and "--i3d" in m["unavailable"]["rfvd"]
    assert "lpips" not in m["unavailable"]
    assert m["num_clips"] == 3 and m["num_frames"] == 16 and m["resolution"] == [64, 64]
    assert 0.0 < m["ssim"] <= 1.0 and m["lpips"] >= 0.0


def test_per_clip_rows_exclude_padding(first_run):
    rows = [json.loads(line) for line in (first_run / "per_clip.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]  # the padded 4th row is not counted
    m = json.loads((first_run / "metrics.json").read_text())
    assert m["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows]), rel=1e-6)


def test_markdown_and_videos(first_run):
    md = (first_run / "metrics.md").read_text()
    assert "| PSNR (dB) ↑ |" in md and "| rFVD ↓ | unavailable: no --i3d" in md
    videos = sorted((first_run / "videos").glob("*.mp4"))
    assert [v.name[:5] for v in videos] == ["00000", "00001"]
    with av.open(str(videos[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (64, 128, 3)  # input | reconstruction


def test_unreadable_files_are_counted_and_listed(ckpt, tmp_path):
    """A folder with 2 readable and 2 unreadable files: counts in metrics.json and metrics.md,
    one line per skipped file (with the reason) in skipped.jsonl."""
    from reducio_jax.data.video import write_mp4

    folder = tmp_path / "videos"
    rng = np.random.default_rng(0)
    for name in ("a.mp4", "c.mp4"):
        write_mp4(folder / name, rng.integers(0, 255, (16, 64, 64, 3), dtype=np.uint8), 16)
    (folder / "b.mp4").write_text("not a video\n")
    (folder / "d.mp4").write_bytes(b"")
    out = tmp_path / "eval"
    args = ["--checkpoint", str(ckpt), "--config", TINY, *RUN, "--data", str(folder)]
    assert main([*args, "--out", str(out), "--save_videos", "0", "--noprogress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["files_read"], m["clips_used"], m["files_skipped"]) == (4, 2, 2)
    assert m["num_clips"] == 2 and m["preempted"] is False
    assert "4 read, 2 clips used, 2 skipped" in (out / "metrics.md").read_text()
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(pathlib.Path(s["name"]).name for s in skipped) == ["b.mp4", "d.mp4"]
    assert all(s["reason"] for s in skipped)


def test_i3d_rfvd_and_missing_lpips(tiny_vae, first_run, tmp_path):
    """An Orbax dir without LPIPS (config read from it) and a random I3D at 64 px."""
    vae_only = ReducioVAE(tiny_vae.model, tiny_vae.config)
    pretrained = vae_only.save_pretrained(tmp_path / "pretrained")
    i3d = tmp_path / "i3d.pt"
    save_torch_checkpoint(i3d, _random_i3d())
    out = tmp_path / "eval"
    args = ["--checkpoint", str(pretrained), *RUN, "--num_clips", "2", "--out", str(out)]
    assert main([*args, "--i3d", str(i3d), "--i3d_resolution", "64", "--save_videos", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(m["rfvd"]) and m["rfvd"] >= 0.0
    assert m["lpips"] is None and "LPIPS" in m["unavailable"]["lpips"]
    assert not (out / "videos").exists()
    first = json.loads((first_run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (first_run / "per_clip.jsonl").read_text().splitlines()]
    assert m["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows[:2]]), rel=1e-5)
    assert first["settings"]["i3d"] is None and m["settings"]["i3d"]["resolution"] == 64


# -- metric kernels -------------------------------------------------------------------------------


def _clips(seed: int, shape=(2, 4, 32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def test_identical_videos_are_perfect():
    x = _clips(0)
    m = image_metrics(x, x)
    np.testing.assert_allclose(np.asarray(m["psnr"]), 80.0, rtol=1e-6)  # -10 log10(1e-8)
    np.testing.assert_allclose(np.asarray(m["ssim"]), 1.0, atol=1e-5)


def test_identical_videos_lpips_zero(tiny_vae):
    lpips = tiny_vae.weights.lpips
    x, y = _clips(1), _clips(2)
    same = np.asarray(lpips_per_clip(lpips, x, x))
    assert same.shape == (2,) and np.all(np.abs(same) < 1e-6)
    assert np.all(np.asarray(lpips_per_clip(lpips, x, y)) > 1e-3)


def test_image_metrics_follow_reference_flattening():
    """Per-clip frame means average to the reference's (B*T)-frame mean; recon is clamped."""
    x, y = _clips(3), 1.5 * _clips(4)
    m = image_metrics(x, y)
    flat = lambda v: (np.clip(v, -1, 1).reshape(-1, 32, 32, 3) + 1) / 2  # noqa: E731
    assert float(np.mean(m["psnr"])) == pytest.approx(float(psnr(flat(y), flat(x))), rel=1e-5)
    assert float(np.mean(m["ssim"])) == pytest.approx(float(ssim(flat(y), flat(x))), abs=1e-6)


def test_metric_totals_mask():
    totals = MetricTotals(with_fvd=False)
    values = {"psnr": np.array([10.0, 20.0, 99.0]), "ssim": np.array([0.5, 0.7, 0.0])}
    totals.update(values, np.array([True, True, False]), np.array([0, 1, 0]), str)
    assert totals.count == 2 and totals.means() == {"psnr": 15.0, "ssim": 0.6}
    assert totals.rfvd() == (None, totals.rfvd()[1]) and "--i3d" in totals.rfvd()[1]


def test_i3d_pool_window():
    assert i3d_pool_window(224, 16) == (2, 7, 7)
    assert i3d_pool_window(64, 16) == (2, 2, 2)


# -- bad input ------------------------------------------------------------------------------------


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_missing_checkpoint(capsys, tmp_path):
    line = _error(capsys, ["--checkpoint", str(tmp_path / "nope.ckpt"), "--config", TINY, *RUN])
    assert "does not exist" in line


def test_wrong_config_for_checkpoint(capsys, ckpt):
    cfg = str(ROOT / "configs" / "reducio_ft4.py")
    line = _error(capsys, ["--checkpoint", str(ckpt), "--config", cfg, *RUN])
    assert "mismatch" in line or "missing" in line


def test_missing_data(capsys, ckpt, tmp_path):
    args = ["--checkpoint", str(ckpt), "--config", TINY, "--data", str(tmp_path / "none")]
    assert str(tmp_path / "none") in _error(capsys, args)


def test_bad_i3d_file(capsys, ckpt, tmp_path):
    bad = tmp_path / "i3d.pt"
    save_torch_checkpoint(bad, {"x": np.zeros(3, np.float32)})
    args = ["--checkpoint", str(ckpt), "--config", TINY, *RUN, "--i3d", str(bad)]
    assert "pytorch-i3d" in _error(capsys, args)


def test_script_exit_status(tmp_path):
    """`python eval.py` as a script: one error line, exit status 2."""
    cmd = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(tmp_path / "x.ckpt")]
    proc = subprocess.run(
        [*cmd, "--config", TINY, "--data", "synthetic"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint")


def test_data_specs():
    from reducio_jax.runs.runtime import data_config

    cfg = load_config(TINY)
    tfds_cfg = data_config("tfds:ucf101_16f:1.0.0", cfg, data_dir="/d", split="validation")
    assert (tfds_cfg.source, tfds_cfg.tfds_name, tfds_cfg.path) == (
        "tfds",
        "ucf101_16f:1.0.0",
        "/d",
    )
    assert tfds_cfg.split == "validation" and not tfds_cfg.shuffle and not tfds_cfg.random_crop
    folder = data_config("/videos/list.txt", cfg, resolution=(64, 96), num_frames=8)
    assert (folder.source, folder.path, folder.resolution, folder.num_frames) == (
        "folder",
        "/videos/list.txt",
        (64, 96),
        8,
    )
    synthetic = data_config("synthetic", cfg, num_clips=5)
    assert synthetic.synthetic_size == 5
    assert synthetic.resolution == cfg.data.resolution  # from the config


def test_sigterm_writes_partial_reports_then_rerun_resumes(ckpt, tmp_path):
    """A real SIGTERM to `python eval.py` once a few batches are done: it finishes the batch in
    flight, writes reports marked partial and its progress, exits with 143; the same command
    again evaluates only the remaining clips, each exactly once."""
    out, log = tmp_path / "eval", tmp_path / "stderr.txt"
    cmd = [sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(ckpt), "--config", TINY]
    cmd += ["--data", "synthetic", "--resolution", "32", "--batch_size", "2", "--devices", "2"]
    cmd += ["--num_clips", "12", "--save_videos", "0", "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )  # the rerun skips compiling
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if re.search(r"\b[2-4]/6\b", log.read_text()):  # tqdm: a few batches done
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=300) == 143, log.read_text()[-2000:]
    text = log.read_text()
    assert "Traceback" not in text and text.count("preempted: ") == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["preempted"] is True and 4 <= m["clips_used"] < 12 and m["clips_used"] % 2 == 0
    assert m["num_clips"] == m["clips_used"] and math.isfinite(m["psnr"])
    assert "**Partial**" in (out / "metrics.md").read_text()
    first = (out / "per_clip.jsonl").read_text().splitlines()
    assert (out / "eval_state.json").is_file()

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"Resuming after {len(first) // 2} batches ({len(first)} clips)" in again.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["preempted"] is False and m["num_clips"] == 12 and m["resumed_clips"] == len(first)
    rows = (out / "per_clip.jsonl").read_text().splitlines()
    assert rows[: len(first)] == first  # the clips before the stop are kept as they were
    assert [json.loads(r)["index"] for r in rows] == list(range(12))  # each clip once
    assert m["psnr"] == pytest.approx(np.mean([json.loads(r)["psnr"] for r in rows]), rel=1e-6)
    assert not (out / "eval_state.json").exists()
