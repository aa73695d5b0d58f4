"""Videos of any length as overlapping fixed-length windows, and the temporal cross-fade.

The model sees clips of exactly `window` frames (16). A video of `N` frames is cut into
windows starting every `stride = window - overlap` frames (0, stride, 2 stride, ...) while they
fit; when the last of them stops short of the end, one more window is aligned to the end
(start `N - window`). A video shorter than one window is padded to `window` frames by
repeating its last frame (`pad_frames`) and cropped back afterwards.

Stitching (`Stitcher`, `stitch`) follows the spatial tiling of `models/tiling.py` in time:
where window k - 1 and window k overlap, the last `overlap` frames of window k - 1 are
cross-faded into the frames of window k at the same times with the tiling's linear ramp
(`ramp`: window k's weight i / overlap for the i-th frame of the fade). Frames of window k
earlier than the fade (only the end-aligned window has any) are dropped. The plan is stable
as frames arrive: the regular starts never depend on `N`, and the fade always spans
`overlap` frames (the end-aligned window overlaps its predecessor by at least that much),
so a stream can be stitched window by window, holding back only the last `overlap` frames.

Arrays are (B, T, ...) with time on axis 1; numpy or jax (the result follows the input).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

TIME_AXIS = 1


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Where the windows of an `num_frames`-frame video start (all frames inside one window)."""

    num_frames: int  # frames of the video (before padding)
    window: int  # frames per window (the model's clip length)
    overlap: int  # frames shared by neighbouring regular windows (the fade length)
    starts: tuple[int, ...]  # first frame of each window, increasing

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    @property
    def padded_frames(self) -> int:
        """Frames the windows cover: `num_frames`, or one window for a shorter video."""
        return max(self.num_frames, self.window)


def check_overlap(window: int, overlap: int) -> None:
    if window < 1:
        raise ValueError(f"window must be at least 1 frame, got {window}")
    if not 0 <= overlap <= window // 2:
        raise ValueError(
            f"overlap {overlap} must be between 0 and half the window ({window // 2} frames)"
        )


def regular_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """0, stride, 2 stride, ... for every window that fits in `max(num_frames, window)`."""
    check_overlap(window, overlap)
    return list(range(0, max(num_frames, window) - window + 1, window - overlap))


def end_start(num_frames: int, window: int, last_regular: int) -> int | None:
    """Start of the end-aligned window, or None when the last regular one already ends there."""
    if last_regular + window >= num_frames:
        return None
    return num_frames - window


def plan_windows(num_frames: int, window: int = 16, overlap: int = 4) -> WindowPlan:
    """The windows of a video of `num_frames >= 1` frames."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    starts = regular_starts(num_frames, window, overlap)
    last = end_start(num_frames, window, starts[-1])
    if last is not None:
        starts.append(last)
    return WindowPlan(num_frames, window, overlap, tuple(starts))


def pad_frames(video, num_frames: int):
    """(B, T, ...) -> (B, num_frames, ...) by repeating the last frame (T <= num_frames)."""
    xp = _namespace(video)
    missing = num_frames - video.shape[TIME_AXIS]
    if missing <= 0:
        return video
    edge = xp.repeat(video[:, -1:], missing, axis=TIME_AXIS)
    return xp.concatenate([video, edge], axis=TIME_AXIS)


def cut_windows(video, plan: WindowPlan):
    """(B, N, ...) -> (B, K, window, ...): the plan's windows (short videos padded first)."""
    xp = _namespace(video)
    video = pad_frames(video, plan.window)
    return xp.stack([video[:, s : s + plan.window] for s in plan.starts], axis=1)


def ramp(extent: int) -> np.ndarray:
    """The later window's weights over a fade of `extent` frames: i / extent (as tiling's blend)."""
    return np.arange(extent, dtype=np.float32) / max(extent, 1)


def cross_fade(tail, head):
    """Fades `tail` (B, e, ...) of the earlier window into `head` (B, e, ...) of the later one."""
    xp = _namespace(tail, head)
    shape = [1] * head.ndim
    shape[TIME_AXIS] = head.shape[TIME_AXIS]
    weight = xp.asarray(ramp(head.shape[TIME_AXIS]).reshape(shape))
    mixed = tail.astype(np.float32) * (1 - weight) + head.astype(np.float32) * weight
    return mixed.astype(head.dtype)


class Stitcher:
    """Joins window outputs as they arrive; `add` returns frames that are final, in order.

    Feed windows in start order (the starts of a `WindowPlan`), then call `finish` with the
    video's length: it returns the held-back frames cropped to that length. Holds at most
    `overlap` frames between calls. (For a video shorter than one window, `add` also returns
    frames of the padding: crop to the video's length.)
    """

    def __init__(self, overlap: int):
        self.overlap = overlap
        self.held = None  # (B, e, ...): the last window's frames still to fade into the next
        self.held_start = 0  # the time of held[:, 0]: frames before it were returned

    def add(self, start: int, frames):
        """Window output (B, window, ...) starting at frame `start` -> the next final frames."""
        xp = _namespace(frames)
        if self.held is None:
            if start != self.held_start:
                raise ValueError(f"the first window must start at frame 0, not {start}")
            fresh = frames
        else:
            fade = self.held.shape[TIME_AXIS]
            offset = self.held_start - start  # the window's frame at the fade's first time
            if not 0 <= offset <= frames.shape[TIME_AXIS] - fade:
                raise ValueError(f"window at {start} does not cover the fade at {self.held_start}")
            faded = cross_fade(self.held, frames[:, offset : offset + fade])
            fresh = xp.concatenate([faded, frames[:, offset + fade :]], axis=TIME_AXIS)
        length = fresh.shape[TIME_AXIS]
        keep = min(self.overlap, length)
        self.held = fresh[:, length - keep :]
        self.held_start += length - keep
        return fresh[:, : length - keep]

    def finish(self, num_frames: int):
        """The held-back frames up to `num_frames` (the padding of a short video dropped)."""
        if self.held is None:
            raise ValueError("no window was added")
        rest = self.held[:, : max(0, num_frames - self.held_start)]
        self.held = None
        return rest


class WindowCutter:
    """Cuts a stream of frames into the windows of `plan_windows`, holding at most one window.

    `push(frame)` returns the windows that are complete with that frame, `finish()` the rest
    (the end-aligned window, or the padded single window of a short video); each as
    (start, frames (window, ...)). Afterwards `num_frames` is the video's length and the
    starts are exactly `plan_windows(num_frames, window, overlap).starts`.
    """

    def __init__(self, window: int, overlap: int):
        check_overlap(window, overlap)
        self.window, self.overlap = window, overlap
        self.recent: list = []  # the last `window` frames
        self.num_frames = 0
        self.next_start = 0  # the next regular window's start
        self.last_start: int | None = None  # the start of the last window returned

    def push(self, frame) -> list[tuple[int, np.ndarray]]:
        """One frame (...) -> the windows it completes (none or one)."""
        self.recent.append(frame)
        del self.recent[: -self.window]
        self.num_frames += 1
        if self.num_frames != self.next_start + self.window:
            return []
        start = self.next_start
        self.next_start += self.window - self.overlap
        return [self._take(start)]

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """The windows left once every frame was pushed."""
        if self.num_frames == 0:
            raise ValueError("a video needs at least one frame, got 0")
        if self.num_frames < self.window:  # one window, the last frame repeated
            padded = pad_frames(np.stack(self.recent)[None], self.window)[0]
            self.last_start = 0
            return [(0, padded)]
        last = end_start(self.num_frames, self.window, self.last_start)
        return [] if last is None else [self._take(last)]

    def _take(self, start: int) -> tuple[int, np.ndarray]:
        self.last_start = start
        return start, np.stack(self.recent)


def stitch(windows, plan: WindowPlan):
    """(B, K, window, ...) window outputs of `plan` -> (B, N, ...) video."""
    xp = _namespace(windows)
    stitcher = Stitcher(plan.overlap)
    parts = [stitcher.add(s, windows[:, k]) for k, s in enumerate(plan.starts)]
    parts.append(stitcher.finish(plan.num_frames))
    video = xp.concatenate(parts, axis=TIME_AXIS)
    return video[:, : plan.num_frames]


def pad_size(size: int, multiple: int) -> int:
    """Pixels to add so that `size` becomes a multiple of `multiple`."""
    return (-size) % multiple


def pad_spatial(video, multiple: int):
    """(B, T, H, W, C) -> reflect-padded at the bottom and right to multiples of `multiple`.

    Needs H, W >= `multiple` (a reflection cannot be longer than the frame); crop back with
    `[:, :, :H, :W]`.
    """
    xp = _namespace(video)
    h, w = video.shape[2], video.shape[3]
    if min(h, w) < multiple:
        raise ValueError(
            f"frame size {h}x{w} is below {multiple} px; the model needs at least that"
        )
    widths = [(0, 0), (0, 0), (0, pad_size(h, multiple)), (0, pad_size(w, multiple)), (0, 0)]
    if widths[2][1] == 0 and widths[3][1] == 0:
        return video
    return xp.pad(video, widths, mode="reflect")


def pad_rows(x, rows: int):
    """(n, ...) -> (rows, ...) by repeating the last row (a batch padded to its compiled size);
    numpy in, numpy out."""
    if x.shape[0] == rows:
        return x
    xp = _namespace(x)
    return xp.concatenate([x, xp.repeat(x[-1:], rows - x.shape[0], axis=0)])


def _namespace(*arrays):
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


__all__ = [
    "Stitcher",
    "pad_rows",
    "WindowCutter",
    "WindowPlan",
    "check_overlap",
    "cross_fade",
    "cut_windows",
    "end_start",
    "pad_frames",
    "pad_size",
    "pad_spatial",
    "plan_windows",
    "ramp",
    "regular_starts",
    "stitch",
]
