"""`python -m reducio_jax reconstruct`: real files written and read with PyAV, the CLI run in
process through its main function (and once as a subprocess, interrupted by a real SIGINT)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import av
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TINY,
    pattern,
    read_video,
    recipe_checkpoint,
    write_audio_only,
    write_gif,
    write_video,
)

from configs import tiny
from reducio_jax import ReducioVAE
from reducio_jax.__main__ import main
from reducio_jax.data.video import resample
from reducio_jax.metrics.image import psnr_per_image, ssim_per_image
from reducio_jax.runs.reconstruct import ReconstructOptions, reconstruct_videos

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(fixtures_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli") / "tiny.ckpt"
    return str(recipe_checkpoint(fixtures_dir, "tiny", path))


def run_cli(*args: str, capsys) -> tuple[int, list[str], list[str]]:
    try:
        status = main(["reconstruct", *args, "--noprogress"])
    except SystemExit as exit_:  # argparse
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*partial*"))


def test_file_to_file_is_the_api_reconstruction(ckpt, tmp_path, capsys):
    source = write_video(tmp_path / "in.mp4", pattern(52))
    out = tmp_path / "out" / "recon.mp4"
    opts = ReconstructOptions(
        str(source), str(out), ckpt, TINY, keep_fps=True, window_batch=2, crf=0, progress=False
    )
    summary = reconstruct_videos(opts)["videos"][0]
    recon, fps = read_video(out)
    assert recon.shape == (52, 32, 32, 3) and fps == 16 and summary["windows"] == 4
    assert leftovers(tmp_path) == []
    assert "PSNR" in capsys.readouterr().out
    # Streamed: at most two windows' strides plus one window of source frames held at once.
    assert summary["peak_buffered_frames"] <= 2 * 12 + 16 < 52
    # The streamed, stitched video has the PSNR/SSIM of ReducioVAE.reconstruct_video.
    frames, _ = read_video(source)
    vae = ReducioVAE.from_torch_checkpoint(ckpt, tiny.get_config())
    video = jnp.asarray(frames[None], jnp.float32) / 127.5 - 1.0
    whole = vae.reconstruct_video(video, window_batch=2)[0]
    x, y = frames / 255.0, (np.clip(np.asarray(whole), -1, 1) + 1) / 2
    assert summary["psnr"] == pytest.approx(float(np.mean(psnr_per_image(y, x))), abs=0.01)
    assert summary["ssim"] == pytest.approx(float(np.mean(ssim_per_image(y, x))), abs=1e-3)
    # What was written is that reconstruction, up to H.264 at crf 0 with 4:2:0 chroma: compare
    # the luma (the chroma of the untrained model's colour noise does not survive 4:2:0).
    diff = np.abs(luma(recon) - luma(np.round((np.clip(np.asarray(whole), -1, 1) + 1) * 127.5)))
    assert diff.mean() < 2.0  # measured 1.35


def test_folder_resampled_side_by_side_with_a_bad_file(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    write_video(src / "a.mp4", pattern(24), fps=24)  # 1 s at 24 fps -> 16 frames at 16 fps
    write_video(src / "sub" / "short.mkv", pattern(5), fps=16)  # shorter than one window
    (src / "bad.mp4").write_text("not a video")
    out = tmp_path / "out"
    status, lines, errors = run_cli(
        str(src), str(out), "--checkpoint", ckpt, "--config", TINY, "--side_by_side",
        "--window_batch", "1", capsys=capsys,
    )  # fmt: skip
    assert status == 2
    assert len(errors) == 2 and errors[0].startswith("warning: skipped") and "bad.mp4" in errors[0]
    assert errors[1].startswith("error: 1 of 3 videos could not be used")
    a, fps = read_video(out / "a.mp4")
    short, _ = read_video(out / "sub" / "short.mp4")
    assert a.shape == (16, 32, 64, 3) and fps == 16 and short.shape == (5, 32, 64, 3)
    left, right = (np.abs(luma(half) - luma(pattern(5))).mean() for half in np.split(short, 2, 2))
    assert left < 3 and right > 3 * left  # input | reconstruction
    assert not (out / "bad.mp4").exists() and leftovers(tmp_path) == []
    assert sum("PSNR" in line for line in lines) == 2


def test_folder_names_every_file_it_does_not_take(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_video(src / "clip.mp4", pattern(16))
    write_gif(src / "anim.gif")
    write_audio_only(src / "song.m4a")
    write_audio_only(src / "voice.mp4")  # a video's extension, but no video stream
    (src / "notes.txt").write_text("not a video\n")
    (src / ".DS_Store").write_bytes(b"\0" * 16)  # hidden: left out without a word
    with av.open(str(src / "song.m4a")) as container:
        assert [s.type for s in container.streams] == ["audio"]
    out = tmp_path / "out"
    status, lines, errors = run_cli(
        str(src), str(out), "--checkpoint", ckpt, "--config", TINY, "--window_batch", "1",
        capsys=capsys,
    )  # fmt: skip
    assert status == 2
    warnings, error = errors[:-1], errors[-1]
    assert all(w.startswith("warning: skipped: ") for w in warnings) and len(warnings) == 4, errors
    names = ("anim.gif", "song.m4a", "notes.txt", "voice.mp4")
    named = {name: [w for w in warnings if f"{src / name}" in w] for name in names}
    assert all(len(found) == 1 for found in named.values()), errors
    assert f"{src / 'anim.gif'}: not a video file this reads (.gif;" in named["anim.gif"][0]
    assert f"{src / 'song.m4a'}: an audio file (.m4a), not a video" in named["song.m4a"][0]
    assert f"{src / 'notes.txt'}: not a video file this reads (.txt;" in named["notes.txt"][0]
    assert "no video stream" in named["voice.mp4"][0]
    assert not any(".DS_Store" in line for line in errors)
    assert error.startswith("error: 4 of 5 files could not be used (warnings above); 1 written to")
    recon, fps = read_video(out / "clip.mp4")  # the one video was reconstructed
    assert recon.shape == (16, 32, 32, 3) and fps == 16
    assert sorted(p.name for p in out.rglob("*")) == ["clip.mp4"]
    assert sum("PSNR" in line for line in lines) == 1


def test_a_folder_of_no_videos_is_one_error(ckpt, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_gif(src / "anim.gif")
    status, _, errors = run_cli(str(src), str(tmp_path / "out"), "--checkpoint", ckpt,
                                "--config", TINY, capsys=capsys)  # fmt: skip
    assert status == 2 and len(errors) == 1 and errors[0].startswith("error: No video files")
    assert "1 other file(s) there are not videos" in errors[0]
    assert not (tmp_path / "out").exists()


def test_resample_is_sample_and_hold():
    frames = [(k / 24, np.array(k)) for k in range(24)]  # 1 s at 24 fps
    picked = [int(f) for f in resample(iter(frames), 16.0, 24.0)]
    assert picked == [int(np.floor(k * 24 / 16 + 1e-9)) for k in range(16)]
    frames = [(k / 8, np.array(k)) for k in range(4)]  # 0.5 s at 8 fps
    assert [int(f) for f in resample(iter(frames), 16.0, 8.0)] == [0, 0, 1, 1, 2, 2, 3, 3]


def _zero_frames(path: pathlib.Path) -> pathlib.Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=16)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b"\x00" * 1000) and p, "is not a readable video"),
        (_zero_frames, "has no video frames"),
        (lambda p: write_video(p, pattern(4, 24, 40)), "at least 32 px"),
    ],
    ids=["not-a-video", "zero-frames", "too-small"],
)
def test_bad_input_one_error_line_and_no_output(ckpt, tmp_path, capsys, make, match):
    source = make(tmp_path / "in.mp4")
    out = tmp_path / "out.mp4"
    status, _, errors = run_cli(str(source), str(out), "--checkpoint", ckpt, "--config", TINY,
                                capsys=capsys)  # fmt: skip
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: ") and match in errors[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_truncated_file_keeps_what_decodes(ckpt, tmp_path, capsys):
    full = write_video(tmp_path / "full.mp4", pattern(40), movflags="+faststart")
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])  # the index survives, the frames do not
    out = tmp_path / "out.mp4"
    status, _, errors = run_cli(str(cut), str(out), "--checkpoint", ckpt, "--config", TINY,
                                "--keep_fps", "--window_batch", "1", capsys=capsys)  # fmt: skip
    assert status == 0 and len(errors) == 1 and errors[0].startswith("warning: ")
    recon, _ = read_video(out)
    kept = len(recon)
    assert 0 < kept < 40 and f"decoded {kept} of 40 frames; {40 - kept} lost" in errors[0]


def test_interrupted_run_leaves_no_output(ckpt, tmp_path):
    # long enough that the run is still going when SIGINT lands (the partial file can appear
    # with the first window written, and the rest of a short video then takes under 50 ms)
    source = write_video(tmp_path / "in.mp4", pattern(256))
    out = tmp_path / "out.mp4"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "reducio_jax", "reconstruct", str(source), str(out),
           "--checkpoint", ckpt, "--config", TINY, "--window_batch", "1", "--noprogress"]  # fmt: skip
    # A shell that runs pytest in the background hands its children SIGINT ignored; Ctrl-C
    # reaches a foreground command with the default disposition, so the child gets that.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)  # fmt: skip
    partial = tmp_path / ".out.partial.mp4"
    deadline = time.monotonic() + 240
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists(), "the run never started writing"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr.decode()[-3000:]
    assert stderr.decode().strip().splitlines()[-1].startswith("error: interrupted")
    assert not out.exists() and leftovers(tmp_path) == []
