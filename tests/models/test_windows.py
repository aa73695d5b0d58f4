"""Window planning and temporal stitching (pure numpy / jax, no model)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from reducio_jax.models.tiling import blend
from reducio_jax.models.windows import (
    Stitcher,
    WindowCutter,
    cut_windows,
    pad_frames,
    pad_spatial,
    plan_windows,
    ramp,
    stitch,
)


@pytest.mark.parametrize("num_frames", [1, 5, 15, 16, 17, 27, 28, 29, 40, 64, 100])
@pytest.mark.parametrize("overlap", [0, 1, 4, 8])
def test_plan_covers_every_frame_and_ends_at_the_end(num_frames, overlap):
    plan = plan_windows(num_frames, 16, overlap)
    starts = plan.starts
    assert starts[0] == 0
    assert starts[-1] + 16 == max(num_frames, 16)  # the last window is aligned to the end
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + 16 - b >= overlap  # neighbours share at least the fade
    regular = [s for s in starts if s % (16 - overlap) == 0]
    assert regular == list(range(0, len(regular) * (16 - overlap), 16 - overlap))
    assert len(starts) - len(regular) <= 1


def test_plan_of_one_window():
    assert plan_windows(16).starts == (0,)
    assert plan_windows(3).starts == (0,) and plan_windows(3).padded_frames == 16
    assert plan_windows(64, 16, 4).starts == (0, 12, 24, 36, 48)
    assert plan_windows(30, 16, 4).starts == (0, 12, 14)


@pytest.mark.parametrize("overlap", [-1, 9])
def test_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(40, 16, overlap)


def test_zero_frames_is_an_error():
    with pytest.raises(ValueError, match="at least one frame"):
        plan_windows(0)


def test_ramp_is_the_tiling_blend():
    a = np.random.default_rng(0).normal(size=(2, 16, 3)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(2, 16, 3)).astype(np.float32)
    ours = stitch(np.stack([a, b], axis=1), plan_windows(28, 16, 4))  # starts 0, 12
    tiled = np.asarray(blend(jnp.asarray(a), jnp.asarray(b), 4, axis=1))  # fades b[:4]
    np.testing.assert_allclose(ours[:, 12:], tiled, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ours[:, :12], a[:, :12])
    assert ramp(4).tolist() == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("num_frames", [3, 16, 29, 64])
def test_windows_of_a_video_stitch_back_to_it(num_frames):
    video = np.random.default_rng(2).normal(size=(2, num_frames, 4, 3)).astype(np.float32)
    plan = plan_windows(num_frames, 16, 4)
    windows = cut_windows(video, plan)
    assert windows.shape == (2, len(plan.starts), 16, 4, 3)
    np.testing.assert_allclose(stitch(windows, plan), video, rtol=0, atol=1e-6)


def test_fade_weights_frame_by_frame():
    # Window 0 is all zeros, window 1 all ones: the result is window 1's weight per frame.
    plan = plan_windows(30, 16, 4)  # starts 0, 12, 14 (end-aligned)
    windows = np.stack([np.full((1, 16, 1), k, np.float32) for k in (0, 1, 2)], axis=1)
    out = stitch(windows, plan)[0, :, 0]
    expected = np.zeros(30, np.float32)
    expected[12:16] = ramp(4)  # 0 -> 1 over the last 4 frames of window 0
    expected[16:24] = 1
    expected[24:28] = 1 + ramp(4)  # 1 -> 2 over the last 4 frames of window 1
    expected[28:] = 2
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_streaming_equals_whole_and_holds_only_the_overlap():
    video = np.random.default_rng(3).normal(size=(1, 41, 2)).astype(np.float32)
    plan = plan_windows(41, 16, 4)
    windows = cut_windows(video, plan) * 0.5
    stitcher, parts = Stitcher(4), []
    for k, start in enumerate(plan.starts):
        parts.append(stitcher.add(start, windows[:, k]))
        assert stitcher.held.shape[1] <= 4
    parts.append(stitcher.finish(41))
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), stitch(windows, plan))


@pytest.mark.parametrize("num_frames", [1, 5, 16, 17, 28, 30, 40, 64])
@pytest.mark.parametrize("overlap", [0, 4, 8])
def test_cutting_a_stream_gives_the_plans_windows(num_frames, overlap):
    """Frames pushed one by one come out as the windows of `plan_windows`, in order, each as
    soon as its last frame is there, with at most one window of frames held."""
    video = np.arange(num_frames, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    cutter = WindowCutter(16, overlap)
    cut = []
    for t, frame in enumerate(video):
        for start, frames in cutter.push(frame):
            assert start + 16 == t + 1  # emitted with its last frame
            cut.append((start, frames))
        assert len(cutter.recent) <= 16
    cut += cutter.finish()
    plan = plan_windows(num_frames, 16, overlap)
    assert cutter.num_frames == num_frames
    assert tuple(s for s, _ in cut) == plan.starts
    expected = cut_windows(video[None], plan)[0]  # (K, 16, 2)
    np.testing.assert_array_equal(np.stack([f for _, f in cut]), expected)


def test_cutting_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one frame"):
        WindowCutter(16, 4).finish()


def test_jax_arrays_stay_jax():
    video = jnp.ones((1, 20, 2))
    out = stitch(cut_windows(video, plan_windows(20)), plan_windows(20))
    assert isinstance(out, jnp.ndarray) and out.shape == (1, 20, 2)


def test_pad_frames_repeats_the_last_frame():
    video = np.arange(3, dtype=np.float32).reshape(1, 3, 1)
    assert pad_frames(video, 6)[0, :, 0].tolist() == [0, 1, 2, 2, 2, 2]


def test_pad_spatial_reflects_and_rejects_small_frames():
    video = np.random.default_rng(4).normal(size=(1, 2, 40, 33, 3)).astype(np.float32)
    padded = pad_spatial(video, 32)
    assert padded.shape == (1, 2, 64, 64, 3)
    np.testing.assert_array_equal(padded[:, :, :40, :33], video)
    np.testing.assert_array_equal(padded[:, :, 40, :33], video[:, :, 38])  # reflect, not edge
    square = video[:, :, :32, :32]
    np.testing.assert_array_equal(pad_spatial(square, 32), square)  # nothing to pad
    with pytest.raises(ValueError, match="below 32 px"):
        pad_spatial(video[:, :, :31], 32)


def test_stitcher_rejects_windows_out_of_plan():
    frames = np.zeros((1, 16, 2), np.float32)
    with pytest.raises(ValueError, match="first window must start at frame 0"):
        Stitcher(4).add(3, frames)
    stitcher = Stitcher(4)
    stitcher.add(0, frames)  # holds frames 12..15
    with pytest.raises(ValueError, match="does not cover the fade"):
        stitcher.add(13, frames)  # a gap: the fade at 12 is not in this window
    with pytest.raises(ValueError, match="no window"):
        Stitcher(4).finish(16)
