"""The memory planner (`reducio_jax/programs/planner.py`): the window batch and tiling chosen from the
compiled program's own memory analysis, rounded to the devices of a mesh, and `reconstruct`
and `encode --whole_videos` under a real address-space limit (`ulimit -v`, set with
`resource.setrlimit` in the child) completing where a fixed batch of 4 does not fit, or ending
in one `error:` line (and no output, no store) when one window does not fit at all.

Every byte count below comes from the program's memory analysis (`ReducioVAE.footprint`) or
from the child process itself; none is a constant of this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import TINY, max_err, pattern, read_video, recipe_checkpoint, run_probe, write_video

from configs import tiny
from reducio_jax import ReducioVAE
from reducio_jax.errors import InputError
from reducio_jax.latents import LatentStore
from reducio_jax.latents.videos import encode_windows
from reducio_jax.models.tiling import TileConfig
from reducio_jax.programs.budget import RESERVE, gib, parse_size, process_status
from reducio_jax.programs.planner import (
    SKIP_OVER,
    OutOfMemory,
    Plan,
    Request,
    plan_batch,
    plan_windows_batch,
    replan_if_short,
    untiled_estimate,
)
from reducio_jax.runs.runtime import load_vae, local_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(fixtures_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("memory") / "tiny.ckpt"
    return str(recipe_checkpoint(fixtures_dir, "tiny", path))


@pytest.fixture(scope="module")
def vae() -> ReducioVAE:
    return ReducioVAE.from_config(tiny.get_config())


def resident(vae: ReducioVAE) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(vae.model)))


def request(vae: ReducioVAE, frame: tuple[int, int], room: int, cap: int = 4) -> Request:
    fallback = TileConfig(256, 0.25, vae.spatial_factor)  # tiny.py's tile size
    return Request(
        programs=vae.programs,
        op="reconstruct",
        frame=frame,
        available=(room, "the test's budget"),
        cap=cap,
        tiles=None,
        fallback=fallback,
        estimate=False,
    )


def test_parse_size():
    assert parse_size("8GB") == 8 * 2**30 and parse_size("512M") == 512 * 2**20
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("1000") == 1000
    for bad in ("", "8 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError, match="--max_memory"):
            parse_size(bad)


def test_batch_from_the_programs_memory_analysis(vae):
    one = vae.footprint("reconstruct", 1, (64, 64), None).need(resident(vae))
    plan = plan_windows_batch(request(vae, (64, 64), int(2.5 * one)))
    two = vae.footprint("reconstruct", 2, (64, 64), None).need(resident(vae))
    assert plan.window_batch == 2 and plan.need == two <= 2.5 * one and not plan.tiled
    assert plan_windows_batch(request(vae, (64, 64), 100 * one, cap=3)).window_batch == 3
    assert plan_windows_batch(request(vae, (64, 64), one)).window_batch == 1
    with pytest.raises(OutOfMemory, match=f"one 64x64 window needs {gib(one)}"):
        plan_windows_batch(request(vae, (64, 64), one - 1))


def test_tiles_when_one_window_does_not_fit(vae):
    frame = (64, 704)  # wider than one 320 px tile window: three tiles, two of one shape
    whole = vae.footprint("reconstruct", 1, frame, None).need(resident(vae))
    big = TileConfig(256, 0.25, vae.spatial_factor, max_batch=1, wide=True)  # tiny.py's tiles
    small = dataclasses.replace(big, sample_size=128)  # 160 px tiles every 128 px
    need_big, need_small = (
        vae.footprint("reconstruct", 1, frame, t).need(resident(vae)) for t in (big, small)
    )
    assert need_small < need_big < whole
    plan = plan_windows_batch(request(vae, frame, (need_big + whole) // 2))
    assert plan.tiled and plan.window_batch == 1 and plan.tiles == big and plan.need == need_big
    plan = plan_windows_batch(request(vae, frame, (need_small + need_big) // 2))
    assert plan.tiles == small and plan.need == need_small
    with pytest.raises(OutOfMemory, match=f"one 160 px tile of one window needs {gib(need_small)}"):
        plan_windows_batch(request(vae, frame, need_small - 1))


def test_a_large_frame_is_estimated_before_it_is_compiled_whole():
    """Over `PROBE_AREAS` tiles, the whole window's need is extrapolated from untiled programs
    of one and two tiles' area; far over the room, the planner tiles without compiling the
    whole window (for ft4 at 720p that compile alone took more than 25 minutes)."""
    vae = ReducioVAE.from_config(tiny.get_config())  # its own compile cache
    frame = (160, 160)  # 6.25 tiles of 64 px
    req = dataclasses.replace(
        request(vae, frame, 0),
        fallback=TileConfig(64, 0.25, vae.spatial_factor),
        estimate=True,
    )
    estimate = untiled_estimate(req)
    probed = {key[2] for key in vae.programs.measured()}
    assert probed == {(64, 64), (96, 96)}  # one and two tiles' area, multiples of 32
    whole_key = ("reconstruct", 1, frame, None)
    plan = plan_windows_batch(dataclasses.replace(req, available=(estimate // 2, "test")))
    assert plan.tiled and whole_key not in vae.programs.measured()
    with pytest.raises(OutOfMemory, match=r"a whole 160x160 window: about"):
        plan_windows_batch(dataclasses.replace(req, available=(1, "test")))
    assert whole_key not in vae.programs.measured()
    room = 2 * estimate  # the estimate is under the room: the whole window is compiled
    plan = plan_windows_batch(dataclasses.replace(req, available=(room, "test"), cap=1))
    whole = vae.footprint(*whole_key).need(resident(vae))
    assert not plan.tiled and plan.need == whole
    assert whole / SKIP_OVER < estimate < whole * SKIP_OVER
    assert untiled_estimate(dataclasses.replace(req, frame=(128, 128))) is None  # 4 tiles


def test_a_plan_short_of_memory_after_its_compiles_is_made_again(vae):
    """What the compiles kept is seen after planning: a plan whose need no longer fits the
    memory left is made again (here: tiles instead of the whole window), or fails cleanly."""
    frame = (64, 704)
    whole = vae.footprint("reconstruct", 1, frame, None).need(resident(vae))
    req = request(vae, frame, 2 * whole, cap=1)
    plan = plan_windows_batch(req)
    assert not plan.tiled and replan_if_short(plan, req, (whole, "now")) is plan
    again = replan_if_short(plan, req, (whole - 1, "the memory left"))
    assert again.tiled and again.need < whole and again.source == "the memory left"
    with pytest.raises(OutOfMemory, match="the memory left"):
        replan_if_short(plan, req, (1, "the memory left"))


def test_tiles_in_a_loop_match_all_at_once(vae):
    """One tile a step (`max_batch`, a lax.scan over tiles of one shape) computes what all tiles
    at once do (the tiled path the parity fixtures check)."""
    video = jnp.asarray(pattern(16, 96, 160), jnp.float32)[None] / 127.5 - 1.0
    tiles = TileConfig(64, 0.5, vae.spatial_factor)  # 96 px tiles every 64 px: two of 96x96
    all_at_once = vae.reconstruct(video, plan=_plan(tiles))
    looped = vae.reconstruct(video, plan=_plan(dataclasses.replace(tiles, max_batch=1)))
    assert max_err(looped, all_at_once) < 1e-4


def _plan(tiles: TileConfig) -> Plan:
    return Plan(1, tiles, 0, 0, "test", (0, 0), 0)


def test_a_program_holds_only_the_parameters_it_takes(vae):
    """An encode takes the encoder's parameters only (XLA drops the unused arguments), so the
    decoder's, held anyway, are not subtracted from what it needs."""
    footprint = vae.footprint("encode", 1, (32, 32), None)
    video = 16 * 32 * 32 * 3 * 4
    assert footprint.inputs == video and footprint.argument - video < resident(vae)
    assert footprint.need(resident(vae)) == footprint.need(footprint.argument - video) > 0


def test_batch_on_a_mesh_of_cpu_devices(ckpt):
    """On a mesh the planner measures the program of the windows split over its devices, the
    one the run then calls (no second compile); CPU devices share the host's memory, so a
    call needs every device's share; when one window a device does not fit, it fails."""
    mesh = local_mesh(2)
    vae = load_vae(ckpt, TINY, mesh)
    held = resident(vae)
    split = {b: vae.programs.footprint("encode", b, (64, 64), None, mesh=mesh) for b in (2, 4)}
    video = 16 * 64 * 64 * 3 * 4  # one window's float32 bytes
    assert split[2].inputs == video and split[2].devices == 2  # a device's window, two devices
    plan = plan_batch(vae.programs, mesh, 64, 64, op="encode", count=3)  # 1 a device on the CPU
    assert plan.window_batch == 2 and plan.need == split[2].need(held)
    compiles = vae.programs.compiles
    windows = pattern(16, 64, 64)[None].repeat(2, axis=0)  # (2, T, H, W, 3) uint8
    encode_windows(vae, windows, mesh, plan.window_batch, plan)
    assert vae.programs.compiles == compiles  # the planner's executable ran
    fixed = plan_batch(vae.programs, mesh, 64, 64, op="encode", batch=4, flag="--batch_size")
    assert fixed.window_batch == 4 and fixed.need == split[4].need(held)
    room = process_status("VmRSS") + RESERVE + split[2].need(held) // 2
    with pytest.raises(OutOfMemory, match="one 64x64 window on each of 2 devices needs"):
        plan_batch(vae.programs, mesh, 64, 64, op="encode", max_memory=room)
    with pytest.raises(InputError, match="--batch_size 3 must be a positive multiple of the 2"):
        plan_batch(vae.programs, mesh, 64, 64, op="decode", batch=3, flag="--batch_size")


# -- the command under a real limit ---------------------------------------------------------------

VMSIZE = (
    "import sys, jax\n"
    "from reducio_jax.runs.runtime import load_vae\n"
    "from reducio_jax.programs.budget import process_status\n"
    "load_vae(sys.argv[1], sys.argv[2], None)\n"
    "print(process_status('VmSize'))\n"
)


def run_limited(limit: int, *args: str, command="reconstruct") -> subprocess.CompletedProcess:
    """`python -m reducio_jax COMMAND ...` with its address space limited to `limit`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "reducio_jax", command, *args, "--noprogress"]
    set_limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # noqa: E731
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=set_limit
    )


def test_reconstruct_under_an_address_space_limit(ckpt, tmp_path):
    source = write_video(tmp_path / "in.mp4", pattern(52, 128, 128))  # four windows
    model = ReducioVAE.from_torch_checkpoint(ckpt, tiny.get_config())
    one, four = (
        model.footprint("reconstruct", b, (128, 128), None).need(resident(model)) for b in (1, 4)
    )
    base = int(run_probe(VMSIZE, ckpt, TINY))  # the process's size once the model is loaded
    limit = base + RESERVE + int(1.5 * one)
    assert four > limit - base - RESERVE  # a fixed batch of 4 does not fit the planner's room
    out = tmp_path / "out.mp4"
    done = run_limited(limit, str(source), str(out), "--checkpoint", ckpt, "--config", TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 window(s) a call" in done.stdout and read_video(out)[0].shape == (52, 128, 128, 3)
    fixed = run_limited(
        limit, str(source), str(tmp_path / "fixed.mp4"), "--checkpoint", ckpt, "--config", TINY,
        "--window_batch", "4",
    )  # fmt: skip
    _assert_one_error(fixed, "--window_batch 4 needs", tmp_path / "fixed.mp4")
    small = run_limited(
        base + RESERVE + one // 4, str(source), str(tmp_path / "small.mp4"),
        "--checkpoint", ckpt, "--config", TINY,
    )  # fmt: skip
    _assert_one_error(small, f"one 128x128 window needs {gib(one)}", tmp_path / "small.mp4")


def _assert_one_error(done: subprocess.CompletedProcess, match: str, out=None) -> None:
    """Exit 2 with one `error:` line holding `match`, and no `out` (nor a partial file)."""
    errors = done.stderr.splitlines()
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("error: ") and match in errors[0] and "leaves" in errors[0]
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(".*partial*"))


ENCODE_VMSIZE = (
    "import sys, jax\n"
    "from reducio_jax.latents.videos import as_path, probe\n"
    "from reducio_jax.runs.runtime import load_vae, local_mesh\n"
    "from reducio_jax.programs.budget import process_status\n"
    "load_vae(sys.argv[1], sys.argv[2], local_mesh())\n"
    "probe(as_path(sys.argv[3]))\n"
    "print(process_status('VmSize'))\n"
)


def test_encode_whole_videos_under_an_address_space_limit(ckpt, tmp_path):
    """The default window batch completes where a fixed 4 does not fit; a limit under one
    window fails before the store is created, or (--overwrite) touched."""
    folder = tmp_path / "videos"
    folder.mkdir()
    source = write_video(folder / "in.mp4", pattern(52, 64, 64))  # four windows
    model = ReducioVAE.from_torch_checkpoint(ckpt, tiny.get_config())
    one, four = (model.footprint("encode", b, (64, 64), None).need(resident(model)) for b in (1, 4))
    base = int(run_probe(ENCODE_VMSIZE, ckpt, TINY, str(source), XLA_FLAGS=""))
    limit = base + RESERVE + (one + four) // 2  # more than one window, less than four
    flags = ["--checkpoint", ckpt, "--config", TINY, "--data", str(folder), "--whole_videos"]
    store = tmp_path / "store"
    done = run_limited(limit, *flags, "--out", str(store), command="encode")
    assert done.returncode == 0, done.stderr[-2000:]
    (memory,) = json.loads(done.stdout.splitlines()[-1])["memory"]
    assert memory["size"] == [64, 64] and 1 <= memory["window_batch"] < 4
    ((shard, video),) = LatentStore(store).videos()
    assert len(video["starts"]) == 4 and video["num_frames"] == 52
    fixed = run_limited(
        limit, *flags, "--out", str(tmp_path / "fixed"), "--window_batch", "4", command="encode"
    )
    _assert_one_error(fixed, "--window_batch 4 needs", tmp_path / "fixed")
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    small = run_limited(
        base + RESERVE + one // 4, *flags, "--out", str(store), "--overwrite", command="encode"
    )
    _assert_one_error(small, f"in.mp4: not enough memory: one 64x64 window needs {gib(one)}")
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before  # not touched
