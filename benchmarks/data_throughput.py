"""Data-loader throughput: clips/s of the host pipeline by source and Grain worker count.

Writes generated test videos (synthetic content, H.264, 30 fps, keyframe every second) to a
temporary folder unless ``--videos`` is given, then times ``make_host_dataset`` (train
mode: random start, random crop, 16 frames at 16 fps) for the folder source with 0, 1, 2
workers, plus the TFDS source (the same videos packed once) and the synthetic source.

    python benchmarks/data_throughput.py --out results.json           # ~3 minutes
    python benchmarks/data_throughput.py --quick --out /tmp/quick.json  # seconds

"startup_s" is the time to the first batch (worker start-up included); "clips_per_s" is
the steady-state rate over the following batches.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time
from typing import Any

import av
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from reducio_jax.data import build_tfds_dataset, get_config, make_host_dataset
from reducio_jax.data.synthetic import synthetic_clip


def write_videos(folder: pathlib.Path, count: int, size: tuple[int, int], frames: int) -> None:
    """``count`` H.264 files of ``frames`` frames at 30 fps, ``size`` = (H, W)."""
    h, w = size
    for i in range(count):
        # Render at half size (cheaper), play forwards then backwards, upscale on encode.
        clip = synthetic_clip(i, seed=123, num_frames=frames // 2, height=h // 2, width=w // 2)
        clip = np.concatenate([clip, clip[::-1]])  # (frames, h/2, w/2, 3)
        with av.open(str(folder / f"video_{i:03d}.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=30)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.options = {"preset": "veryfast", "crf": "23", "g": "30"}
            for f in clip:
                frame = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(w, h, "yuv420p")
                c.mux(s.encode(frame))
            c.mux(s.encode())


def measure(cfg: Any, batches: int) -> dict[str, float]:
    """Time to first batch, then clips/s over ``batches`` further batches."""
    t0 = time.perf_counter()
    it = iter(make_host_dataset(cfg, train=True))
    next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t1
    close = getattr(it, "close", None)
    if close is not None:
        close()
    clips = batches * cfg.batch_size
    return {"startup_s": t1 - t0, "clips_per_s": clips / dt, "clips": clips, "seconds": dt}


def machine() -> dict[str, Any]:
    model = ""
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "av": av.__version__,
        "grain": getattr(grain, "__version__", "0.2.x"),
    }


def run(args: argparse.Namespace, folder: pathlib.Path, tmp: pathlib.Path) -> list[dict]:
    cfg = get_config()
    cfg.update(source="folder", path=str(folder), resolution=args.resolution, shuffle=True)
    cfg.update(batch_size=args.batch_size, num_frames=16, fps=16, seed=0)
    rows = []
    for workers in args.workers:
        cfg.num_workers = workers
        rows.append({"source": "folder", "workers": workers, **measure(cfg, args.batches)})
        print_row(rows[-1])
    build_tfds_dataset(
        folder, tmp / "tfds", name="bench_videos", num_frames=16, resolution=args.resolution
    )
    cfg.update(source="tfds", path=str(tmp / "tfds"), tfds_name="bench_videos", num_workers=0)
    rows.append({"source": "tfds", "workers": 0, **measure(cfg, args.batches)})
    print_row(rows[-1])
    cfg.update(source="synthetic", synthetic_size=64)
    rows.append({"source": "synthetic", "workers": 0, **measure(cfg, args.batches)})
    print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    print(
        f"| {r['source']:9s} | {r['workers']:7d} | {r['clips_per_s']:10.2f} | {r['startup_s']:9.2f} |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="tiny run (small videos, 2 batches)")
    ap.add_argument("--videos", type=pathlib.Path, help="use this folder instead of generating")
    ap.add_argument("--source-size", default="360x640", help="generated video size HxW")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=16, help="timed batches of 8 clips")
    args = ap.parse_args()
    tfds.disable_progress_bar()
    args.resolution = 64 if args.quick else 256
    args.batch_size, args.batches = (2, 2) if args.quick else (8, args.batches)
    size = (96, 128) if args.quick else tuple(int(x) for x in args.source_size.split("x"))
    count, frames = (3, 48) if args.quick else (8, 96)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        folder = args.videos
        if folder is None:
            folder = tmp / "videos"
            folder.mkdir()
            t = time.perf_counter()
            write_videos(folder, count, size, frames)
            print(
                f"wrote {count} videos {size[0]}x{size[1]}, {frames} frames at 30 fps "
                f"in {time.perf_counter() - t:.1f}s"
            )
        print(
            f"clips of 16x{args.resolution}x{args.resolution}, batch {args.batch_size}, "
            f"{args.batches} timed batches"
        )
        print("| source    | workers | clips/s    | startup s |")
        print("|-----------|---------|------------|-----------|")
        rows = run(args, folder, tmp)
    result = {
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "timed_batches": args.batches,
            "videos": str(args.videos or f"generated {count} x {size} x {frames}f"),
        },
        "results": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
