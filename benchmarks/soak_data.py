"""Soak test of the folder pipeline (not run in CI): memory, file descriptors, throughput.

Writes a folder of mixed videos (readable ones in several codecs / pixel formats / sizes /
rotations / frame rates, and hostile ones: empty, text, truncated, all frames corrupt, too
short), then reads it with ``make_host_dataset`` in train mode (random starts and crops,
endless epochs) with ``--workers`` Grain decode processes for ``--minutes``. Every
``--every`` seconds it samples the RSS and open file descriptors of the main process and of
its worker processes, and the clips/s since the previous sample; at the end it compares the
descriptors open before the iterator was made (after a first, warm-up iterator was made and
closed: imports and pools open some for good) with those after it was closed.

    python benchmarks/soak_data.py --files 300 --workers 8 --minutes 10 --out soak.json
    python benchmarks/soak_data.py --files 60 --minutes 1 --out /tmp/soak.json   # a quick look

See docs/data.md ("Soak test") for the procedure and measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time
from fractions import Fraction
from typing import Any

import av
import numpy as np
import psutil

from reducio_jax.data import get_config, make_host_dataset
from reducio_jax.data.synthetic import synthetic_clip

# (name, codec, pix_fmt, (H, W), extra): readable kinds, cycled
GOOD = (
    ("h264", "libx264", "yuv420p", (120, 160), {}),
    ("yuv444", "libx264", "yuv444p", (143, 177), {}),
    ("tenbit", "libx264", "yuv420p10le", (120, 160), {}),
    ("gray", "ffv1", "gray", (120, 160), {}),
    ("rotated", "libx264", "yuv420p", (120, 160), {"rotation": 90}),
    ("vfr", "ffv1", "yuv420p", (120, 160), {"vfr": True}),
)
BAD = ("empty", "text", "truncated", "corrupt", "short")
EXT = {"libx264": ".mp4", "ffv1": ".mkv"}


def write_video(path: pathlib.Path, seed: int, codec: str, pix_fmt: str, size, frames: int,
                rotation: int | None = None, vfr: bool = False, faststart: bool = False) -> None:  # fmt: skip
    h, w = size
    clip = synthetic_clip(seed, seed=7, num_frames=frames, height=h + h % 2, width=w + w % 2)
    options = {"movflags": "faststart"} if faststart else {}
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            s.options = {"preset": "ultrafast", "g": "30"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        if vfr:
            s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for f in clip:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")
            if vfr:
                frame.pts, frame.time_base = t, Fraction(1, 1000)
                t += int(rng.integers(20, 70))
            c.mux(s.encode(frame))
        c.mux(s.encode())


def write_folder(folder: pathlib.Path, count: int, bad_fraction: float) -> dict[str, int]:
    """`count` files, `bad_fraction` of them hostile; returns counts by kind."""
    kinds: dict[str, int] = {}
    step = max(1, round(1 / bad_fraction)) if bad_fraction > 0 else 0  # every step-th is bad
    for i in range(count):
        if step and i % step == 0:
            kind = BAD[(i // step) % len(BAD)]
            _write_bad(folder / f"{i:04d}_{kind}.mp4", i, kind)
        else:
            kind, codec, pix_fmt, size, extra = GOOD[i % len(GOOD)]
            write_video(folder / f"{i:04d}_{kind}{EXT[codec]}", i, codec, pix_fmt, size, 40,
                        **extra)  # fmt: skip
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _write_bad(path: pathlib.Path, seed: int, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a video\n" * 40)
    elif kind == "short":
        write_video(path, seed, "libx264", "yuv420p", (120, 160), 6)
    else:
        write_video(path, seed, "libx264", "yuv420p", (120, 160), 40, faststart=True)
        data = bytearray(path.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 3]  # the header stays, the tail is gone
        else:  # corrupt: every compressed frame overwritten
            start = data.find(b"mdat") + 4
            data[start:] = b"\0" * (len(data) - start)
        path.write_bytes(bytes(data))


def fd_targets() -> dict[str, str]:
    """This process's open descriptors -> what they point at."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def sample(main: psutil.Process) -> dict[str, Any]:
    kids = [k for k in main.children(recursive=True) if k.is_running()]
    rss = {"main": main.memory_info().rss}
    fds = {"main": main.num_fds()}
    for k in kids:
        try:
            rss[k.pid], fds[k.pid] = k.memory_info().rss, k.num_fds()
        except psutil.NoSuchProcess:
            pass
    return {
        "rss_main_mb": rss["main"] / 2**20,
        "rss_total_mb": sum(rss.values()) / 2**20,
        "fds_main": fds["main"],
        "fds_total": sum(fds.values()),
        "processes": len(rss),
    }


def soak(folder: pathlib.Path, workers: int, minutes: float, every: float, batch: int) -> dict:
    cfg = get_config()
    cfg.update(source="folder", path=str(folder), num_frames=16, fps=16, resolution=64,
               batch_size=batch, num_workers=workers)  # fmt: skip
    main = psutil.Process()
    fds_start = main.num_fds()
    warm = iter(make_host_dataset(cfg, train=True))  # a first lifecycle: imports, pools, ...
    next(warm)
    warm.close()
    del warm
    time.sleep(2)
    fds_before = main.num_fds()  # what a second lifecycle must come back to
    targets_before = fd_targets()
    it = iter(make_host_dataset(cfg, train=True))
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    samples, clips, skips, skipped_files = [], 0, 0, set()
    start = last = time.perf_counter()
    last_clips = 0
    while time.perf_counter() - start < minutes * 60:
        b = next(it)
        clips += len(b["index"])
        skips += int(b["skipped"].sum())
        skipped_files.update(int(i) for i in b["skipped_index"][b["skipped_index"] >= 0])
        now = time.perf_counter()
        if now - last >= every:
            row = sample(main)
            row.update(t_s=round(now - start, 1), clips=clips,
                       clips_per_s=(clips - last_clips) / (now - last))  # fmt: skip
            samples.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)  # fmt: skip
            last, last_clips = now, clips
    seconds = time.perf_counter() - start
    del b  # a batch's arrays live in shared memory: holding one holds its descriptors
    it.close()
    del it
    for _ in range(30):  # let the workers exit
        if not [k for k in main.children() if "resource_tracker" not in " ".join(k.cmdline())]:
            break
        time.sleep(1)
    new_fds = {k: v for k, v in fd_targets().items() if k not in targets_before}
    return {
        "startup_s": startup,
        "seconds": seconds,
        "clips": clips,
        "clips_per_s": clips / seconds,
        "skip_events": skips,
        "distinct_files_skipped": len(skipped_files),
        "fds_at_start": fds_start,
        "fds_before": fds_before,
        "fds_after_close": main.num_fds(),
        "fds_new_after_close": sorted(new_fds.values()),
        "children_after_close": len(main.children(recursive=True)),
        "samples": samples,
    }


def summary(result: dict) -> dict:
    s = result["samples"]
    if not s:
        return {}
    later = s[len(s) // 2 :]
    return {
        "rss_total_mb_first_last_max": [s[0]["rss_total_mb"], s[-1]["rss_total_mb"],
                                        max(r["rss_total_mb"] for r in s)],
        "rss_main_mb_first_last": [s[0]["rss_main_mb"], s[-1]["rss_main_mb"]],
        "fds_total_first_last_max": [s[0]["fds_total"], s[-1]["fds_total"],
                                     max(r["fds_total"] for r in s)],
        "clips_per_s_second_half": float(np.mean([r["clips_per_s"] for r in later])),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--bad_fraction", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--folder", help="reuse (or create) this folder of test videos")
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        kinds = None
        if not any(folder.iterdir()):
            t = time.perf_counter()
            kinds = write_folder(folder, args.files, args.bad_fraction)
            print(f"wrote {args.files} files in {time.perf_counter() - t:.0f} s: {kinds}")
        result = soak(folder, args.workers, args.minutes, args.every, args.batch)
    result.update(
        files=args.files, kinds=kinds, workers=args.workers, minutes=args.minutes,
        summary=summary(result), machine={
            "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "pyav": av.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "load_avg": os.getloadavg(),
        },
    )  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
