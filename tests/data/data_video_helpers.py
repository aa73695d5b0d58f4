"""Tiny test videos made with PyAV: frame i is uniform grey 10 + 6 i ("index" videos) or a
horizontal ramp 4 x ("ramp" videos), so tests can read back which frames/pixels were taken.

(A uniquely named module rather than conftest.py, which other test folders also have.)"""

from __future__ import annotations

import pathlib

import av
import numpy as np

H, W = 32, 48
_CODECS = {".mp4": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}
_OPTIONS = {
    "libx264": {"qp": "0", "preset": "ultrafast", "g": "8"},
    "mpeg4": {"qmin": "1", "qmax": "1"},
    "libvpx-vp9": {"lossless": "1", "deadline": "realtime", "cpu-used": "8"},
}


def frame_values(num: int, kind: str = "index", h: int = H, w: int = W) -> np.ndarray:
    """(num, h, w, 3) uint8 frames written by :func:`write_video`."""
    if kind == "index":
        v = (10 + 6 * np.arange(num)).astype(np.uint8)
        return np.broadcast_to(v[:, None, None, None], (num, h, w, 3)).copy()
    ramp = (4 * np.arange(w)).astype(np.uint8)
    return np.broadcast_to(ramp[None, None, :, None], (num, h, w, 3)).copy()


def write_video(
    path: pathlib.Path, num: int, fps: int, kind: str = "index", h: int = H, w: int = W
) -> pathlib.Path:
    codec = _CODECS[path.suffix]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = _OPTIONS[codec]
        for f in frame_values(num, kind, h, w):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


def frame_ids(clip: np.ndarray) -> list[int]:
    """Index of the source frame in each output frame of an "index" clip (T, H, W, 3)."""
    return [int(round((float(f.mean()) - 10) / 6)) for f in clip]
