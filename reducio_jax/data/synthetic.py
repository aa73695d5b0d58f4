"""Synthetic clips: textured shapes moving over a textured background, with camera motion.

Each clip is a pure function of ``(seed, index)``: the same index always gives the same
pixels, whatever process or worker renders it. The camera pans and zooms (no rotation),
so world coordinates are separable per row / column; the background is a sum of oriented
sinusoids rendered as one small matrix product per channel, and shapes are drawn only
inside their bounding boxes.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class _Shape:
    cy: float  # world position at t=0 and velocity per frame (frame-height units)
    cx: float
    vy: float
    vx: float
    ry: float  # half extent; a disc when ``disc`` (radius ry)
    rx: float
    disc: bool
    freq: float  # stripe texture
    angle: float
    color_a: np.ndarray  # (3,)
    color_b: np.ndarray  # (3,)


def synthetic_clip(
    index: int, *, seed: int = 0, num_frames: int = 16, height: int = 256, width: int = 256
) -> np.ndarray:
    """Renders clip ``index``: (T, H, W, 3) uint8."""
    rng = np.random.default_rng([seed, index])
    scale = float(min(height, width))
    pan = rng.normal(0.0, 0.012, size=2)  # world units per frame
    zoom = rng.uniform(-0.01, 0.01)  # per frame
    waves = _waves(rng)  # (3, K, 4)
    shapes = [_shape(rng) for _ in range(int(rng.integers(2, 5)))]
    ys = (np.arange(height, dtype=np.float32) - height / 2) / scale  # (H,)
    xs = (np.arange(width, dtype=np.float32) - width / 2) / scale  # (W,)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        z = 1.0 + zoom * t
        wy = ys * z + height / 2 / scale + pan[0] * t  # (H,) world y of each row
        wx = xs * z + width / 2 / scale + pan[1] * t  # (W,) world x of each column
        img = _background(waves, wy, wx)  # (H, W, 3) float32 in ~[0, 1]
        for s in shapes:
            _draw(img, s, wy, wx, t)
        out[t] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _waves(rng: np.random.Generator) -> np.ndarray:
    """(3, K=3, 4): per channel, rows (amplitude, frequency, angle, phase) of a constant
    (the base colour, as ``base * sin(pi / 2)``), a coarse and a fine sinusoid."""
    base = rng.uniform(0.2, 0.8, size=3)
    rows = []
    for c in range(3):
        ch = [(base[c], 0.0, 0.0, np.pi / 2)]  # base * sin(pi/2) = base
        for lo, hi, amp in ((4, 16, 0.15), (40, 90, 0.05)):
            ch.append((amp, rng.uniform(lo, hi), rng.uniform(0, np.pi), rng.uniform(0, 6.3)))
        rows.append(ch)
    return np.asarray(rows, np.float32)  # (3, 3, 4)


def _background(waves: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """sum_k amp_k sin(fx_k x + fy_k y + p_k) = sum_k amp_k (sin a cos b + cos a sin b)."""
    amp, freq, angle, phase = np.moveaxis(waves, -1, 0)  # each (3, K)
    a = (freq * np.cos(angle))[..., None] * wx + phase[..., None]  # (3, K, W)
    b = (freq * np.sin(angle))[..., None] * wy  # (3, K, H)
    rows = np.concatenate([np.cos(b), np.sin(b)], axis=1) * np.tile(amp, 2)[..., None]
    cols = np.concatenate([np.sin(a), np.cos(a)], axis=1)  # (3, 2K, W)
    img = np.einsum("ckh,ckw->hwc", rows, cols)  # (H, W, 3)
    return img.astype(np.float32, copy=False)


def _shape(rng: np.random.Generator) -> _Shape:
    cy, cx = rng.uniform(0.2, 0.8, size=2)
    vy, vx = rng.normal(0.0, 0.015, size=2)
    radius = rng.uniform(0.08, 0.22)
    disc = bool(rng.random() < 0.5)
    rx = radius if disc else radius * rng.uniform(0.5, 1.5)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(20, 60)
    color_a, color_b = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    return _Shape(cy, cx, vy, vx, radius, rx, disc, freq, angle, color_a, color_b)


def _draw(img: np.ndarray, s: _Shape, wy: np.ndarray, wx: np.ndarray, t: int) -> None:
    """Paints striped shape ``s`` at frame ``t`` into ``img`` (H, W, 3), in place."""
    cy, cx = s.cy + s.vy * t, s.cx + s.vx * t
    rows = np.nonzero(np.abs(wy - cy) < s.ry)[0]
    cols = np.nonzero(np.abs(wx - cx) < s.rx)[0]
    if rows.size == 0 or cols.size == 0:
        return
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    dy, dx = (wy[r0:r1] - cy)[:, None], (wx[c0:c1] - cx)[None, :]  # (h, 1), (1, w)
    mask = dy**2 + dx**2 < s.ry**2 if s.disc else np.ones((r1 - r0, c1 - c0), bool)
    phase = s.freq * (dx * np.cos(s.angle) + dy * np.sin(s.angle))  # (h, w)
    stripes = (0.5 + 0.5 * np.sin(phase))[..., None]  # (h, w, 1)
    tex = s.color_a + (s.color_b - s.color_a) * stripes  # (h, w, 3)
    region = img[r0:r1, c0:c1]
    np.copyto(region, tex.astype(np.float32), where=mask[..., None])
