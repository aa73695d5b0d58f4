"""The benchmark harness: each operation as one compiled program, timed and described.

An operation is built as a `Program` (a `jax.jit` function and its arguments) that calls the
package's public code: `ReducioVAE.encode` / `decode` / `reconstruct` nested in a `jax.jit`,
the training step of `reducio_jax.train.step.jit_train_step` (generator and discriminator
update, LPIPS on, a step past `disc_start` so the GAN term is on), and eval's per-clip metrics
(`reducio_jax.runs.evaluate.image_metrics` and `lpips_per_clip`). `measure` lowers and compiles it
(the compile time), runs it once (warm-up), then `repeats` times (steady state, median), and
reads the FLOPs and memory of the compiled program from XLA.

Weights are random but fixed (the model's own init, seed 0); inputs are fixed uniform noise.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not another installed copy

import proc_memory  # noqa: E402  (benchmarks/)

from reducio_jax.api import ReducioVAE, load_config  # noqa: E402
from reducio_jax.programs import allocator  # noqa: E402
from reducio_jax.train.monitor import peak_flops, step_flops  # noqa: E402

OPS = ("encode", "decode", "reconstruct", "train_step", "eval_metrics")
CONFIGS = ("tiny", "reducio_ft4", "reducio_ft2", "reducio_ft4_1024px")
DTYPES = ("float32", "bfloat16")


class BenchmarkError(ValueError):
    """Bad benchmark input (unknown op/config, impossible shape): exit status 2."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: an operation on one config, dtype and input shape."""

    op: str
    config: str
    dtype: str = "float32"
    batch: int = 1
    frames: int = 16
    resolution: int | None = None  # None: the config's data.resolution
    attention: str = "xla"  # "cudnn": cuDNN flash attention (cfg.model.attention_impl; GPU, bf16)

    def describe(self, cfg: ml_collections.ConfigDict | None = None) -> str:
        res = self.resolution if self.resolution is not None else "config"
        if cfg is not None:
            res = cfg.data.resolution
        attention = "" if self.attention == "xla" else f" attention={self.attention}"
        return f"{self.op} {self.config} {self.dtype} {self.batch}x{self.frames}x{res}x{res}{attention}"


@dataclasses.dataclass
class Program:
    """A jitted function, its first arguments, and how a call's output gives the next
    arguments (the train step donates its state: each call runs on the previous one's)."""

    jitted: Any
    args: tuple
    advance: Callable[[tuple, Any], tuple] = lambda args, out: args
    extra: dict = dataclasses.field(default_factory=dict)  # notes for the record


@dataclasses.dataclass
class Timing:
    trace_s: float
    compile_s: float
    first_run_s: float
    times_s: list[float]
    flops: float | None
    memory: dict[str, int] | None
    output: Any = None  # the last call's output
    peak: dict[str, int] | None = None  # `PeakMemory` of the runs

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


# -- environment ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!benchmarks/RESULTS.md",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _malloc() -> str:
    """How this process's threads allocate (reducio_jax/programs/allocator.py)."""
    if allocator.one_heap_shared():
        return "one heap for all threads, as the inference commands run"
    return "glibc per-thread arenas"


@functools.cache
def environment() -> dict[str, Any]:
    """Machine, device, versions, commit, XLA flags and date of this run."""
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc": _malloc(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- configs and inputs ---------------------------------------------------------------------------


def case_config(case: Case) -> ml_collections.ConfigDict:
    """The config of `case.config` with the case's dtype and input shape in its data block."""
    if case.config not in CONFIGS:
        raise BenchmarkError(f"unknown config {case.config!r}; choose one of {', '.join(CONFIGS)}")
    if case.dtype not in DTYPES:
        raise BenchmarkError(f"unknown dtype {case.dtype!r}; choose float32 or bfloat16")
    if case.op not in OPS:
        raise BenchmarkError(f"unknown op {case.op!r}; choose from {', '.join(OPS)}")
    cfg = load_config(ROOT / "configs" / f"{case.config}.py")
    cfg.model.dtype = case.dtype
    if case.attention not in ("xla", "cudnn"):
        raise BenchmarkError(f"unknown attention {case.attention!r}; choose xla or cudnn")
    cfg.model.attention_impl = "" if case.attention == "xla" else case.attention
    if case.resolution is not None:
        cfg.data.resolution = case.resolution
    cfg.data.num_frames = case.frames
    cfg.data.batch_size = case.batch
    factor = 2 ** cfg.model.ddconfig.get("f_s", len(cfg.model.ddconfig["ch_mult"]) - 1)
    if cfg.data.resolution % factor or case.batch < 1 or case.frames < 1:
        raise BenchmarkError(
            f"resolution {cfg.data.resolution} must be a multiple of {factor} for {case.config}, "
            "batch and frames at least 1"
        )
    return cfg


def input_video(batch: int, frames: int, resolution: int, seed: int = 0) -> np.ndarray:
    """Fixed clips (B, T, H, W, 3) float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    shape = (batch, frames, resolution, resolution, 3)
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


# -- programs -------------------------------------------------------------------------------------


def _api(graph: nnx.GraphDef, cfg: ml_collections.ConfigDict):
    return lambda state: ReducioVAE(nnx.merge(graph, state), cfg)


_MODELS: dict[str, ReducioVAE] = {}  # randomly initialised models of this process, by config


def random_vae(cfg: ml_collections.ConfigDict) -> ReducioVAE:
    """The model of `cfg.model` with its own init (seed 0), built once per process. The init
    runs as one program compiled without the expensive LLVM passes (twice as fast as eager
    on a CPU, where it dominates the quick suite's set-up)."""
    from reducio_jax.models import build_vae
    from reducio_jax.train.state import FAST_COMPILE

    key = cfg.model.to_json_best_effort(sort_keys=True)
    if key not in _MODELS:
        make = functools.partial(build_vae, cfg.model, seed=0)
        with nnx.use_eager_sharding(False):
            graph = nnx.graphdef(nnx.eval_shape(make))
            state = jax.jit(lambda: nnx.state(make()), compiler_options=FAST_COMPILE)()
        _MODELS[key] = ReducioVAE(nnx.merge(graph, state), cfg)
    return _MODELS[key]


def vae_program(
    op: str, cfg: ml_collections.ConfigDict, video: np.ndarray, vae: ReducioVAE | None = None
) -> Program:
    """encode / decode / reconstruct through the public `ReducioVAE` methods (nested in a jit),
    on `vae` or a randomly initialised one."""
    from reducio_jax.models import content_frame_index

    vae = vae or random_vae(cfg)
    graph, state = nnx.split(vae.model)
    api = _api(graph, cfg)
    video = jnp.asarray(video)
    if op == "encode":
        return Program(jax.jit(lambda s, v: api(s).encode(v)), (state, video))
    if op == "reconstruct":
        return Program(jax.jit(lambda s, v: api(s).reconstruct(v)), (state, video))
    latent_spec = jax.eval_shape(lambda s, v: api(s).latent(api(s).encode(v)), state, video)
    latent = jax.random.normal(jax.random.key(1), latent_spec.shape, latent_spec.dtype)
    frame = video[:, content_frame_index(video.shape[1])]  # (B, H, W, 3)
    return Program(jax.jit(lambda s, z, f: api(s).decode(z, f)), (state, latent, frame))


def train_program(cfg: ml_collections.ConfigDict, video: np.ndarray) -> Program:
    """The full GAN training step (donated state, LPIPS on) on one device, at step disc_start."""
    from reducio_jax import losses
    from reducio_jax.sharding import make_mesh
    from reducio_jax.train import state as state_lib
    from reducio_jax.train.step import jit_train_step

    mesh = make_mesh(cfg.mesh, jax.local_devices()[:1])
    with nnx.use_eager_sharding(False):
        lpips_graph, lpips_state = nnx.split(state_lib.make_lpips(cfg))
    weights = losses.LossWeights.from_config(
        cfg.loss, perceptual_weight=float(cfg.loss.perceptual_weight)
    )
    vae_graph, disc_graph = state_lib.graphdefs(cfg)
    nets = state_lib.Networks(vae_graph, disc_graph, lpips_graph, lpips_state)
    shardings = state_lib.state_shardings(cfg, mesh)
    step = jit_train_step(cfg, nets, weights, mesh, shardings)
    # the VAE of the other ops (built once), a fresh discriminator, fresh optimizer states
    with nnx.use_eager_sharding(False):
        state = state_lib.state_from_modules(cfg, mesh, random_vae(cfg).model, None)
    first = jax.device_put(jnp.asarray(weights.disc_start, jnp.int32), shardings.step)
    state = state.replace(step=first)  # the GAN term is on from disc_start
    batch = {
        "video": jnp.asarray(video),
        "index": jnp.arange(video.shape[0], dtype=jnp.int32),
    }
    return Program(
        step,
        (state, batch, lpips_state),
        advance=lambda args, out: (out[0], *args[1:]),
        extra={
            "disc_start": int(weights.disc_start),
            "perceptual_weight": weights.perceptual_weight,
            "remat": bool(cfg.model.remat),
        },
    )


def eval_program(video: np.ndarray) -> Program:
    """eval.py's per-clip metrics (PSNR, SSIM, LPIPS in float32, as eval.py) of a clip and a
    perturbed copy standing in for its reconstruction."""
    from reducio_jax.models import build_lpips
    from reducio_jax.runs.evaluate import image_metrics, lpips_per_clip

    with nnx.use_eager_sharding(False):
        graph, lpips_state = nnx.split(build_lpips())
    noise = np.random.default_rng(2).normal(0.0, 0.05, video.shape).astype(np.float32)
    recon = np.clip(0.9 * video + noise, -1.0, 1.0)

    def metrics(state, video, recon):
        values = dict(image_metrics(video, recon))
        values["lpips"] = lpips_per_clip(nnx.merge(graph, state), video, recon)
        return values  # each (B,)

    args = (lpips_state, jnp.asarray(video), jnp.asarray(recon))
    return Program(jax.jit(metrics), args, extra={"lpips_dtype": "float32"})


def build_program(case: Case, cfg: ml_collections.ConfigDict) -> Program:
    video = input_video(case.batch, case.frames, int(cfg.data.resolution))
    if case.op == "train_step":
        return train_program(cfg, video)
    if case.op == "eval_metrics":
        return eval_program(video)
    return vae_program(case.op, cfg, video)


# -- timing ---------------------------------------------------------------------------------------


def memory_of(compiled: Any) -> dict[str, int] | None:
    """Bytes of the compiled program (XLA's memory analysis), with its peak estimate."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {f.removesuffix("_size_in_bytes"): int(getattr(m, f, 0) or 0) for f in fields}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


class PeakMemory:
    """The peak memory of a block of runs. On the CPU: the process's resident set above its
    size at the start (the kernel's VmHWM, reset at the start through /proc/self/clear_refs
    after malloc_trim hands freed heap memory back, so that reused heap counts again), and the
    process's peak RSS since it started. On accelerators: the device's peak bytes in use."""

    def __enter__(self) -> PeakMemory:
        self.device = jax.devices()[0]
        self.base = proc_memory.reset_peak() if self.device.platform == "cpu" else None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.platform == "cpu":
            hwm = proc_memory.status_bytes("VmHWM")
            self.result = {
                "rss_above_start": None if hwm is None or self.base is None else hwm - self.base,
                "process_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        else:
            stats = self.device.memory_stats() or {}
            self.result = {"device_peak_in_use": stats.get("peak_bytes_in_use")}


def measure(
    program: Program, repeats: int, compiler_options: dict | None = None, *, warmup: bool = True
) -> Timing:
    """Lower + compile, one warm-up call, then `repeats` timed calls (each synchronised), their
    peak memory measured (`PeakMemory`).
        Without `warmup` the first call is the only one (the quick suite: `times_s` holds it).
        `compiler_options`: XLA options for the compile."""
    t0 = time.perf_counter()
    lowered = program.jitted.lower(*program.args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    t2 = time.perf_counter()
    args = program.args
    with PeakMemory() as peak:
        t3 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        first = time.perf_counter() - t3
        times = [] if warmup else [first]
        repeats = repeats if warmup else 0
        for _ in range(repeats):
            args = program.advance(args, out)
            t = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t)
    program.args = program.advance(args, out)  # donated inputs are gone; keep live ones
    flops, memory = step_flops(compiled), memory_of(compiled)
    return Timing(t1 - t0, t2 - t1, first, times, flops, memory, out, peak.result)


def case_fields(case: Case, cfg: ml_collections.ConfigDict) -> dict:
    """What a record says of the case it measured (or skipped)."""
    return {
        "op": case.op,
        "config": case.config,
        "dtype": case.dtype,
        "batch": case.batch,
        "frames": case.frames,
        "resolution": int(cfg.data.resolution),
        "attention": case.attention,
    }


def record(case: Case, cfg: ml_collections.ConfigDict, timing: Timing, extra: dict) -> dict:
    """The JSON record of one measurement."""
    env = environment()
    median = timing.median_s
    peak = peak_flops(env["device_kind"]) if env["backend"] != "cpu" else None
    achieved = timing.flops / median if timing.flops else None
    return {
        **case_fields(case, cfg),
        "trace_s": round(timing.trace_s, 3),
        "compile_s": round(timing.compile_s, 3),
        "first_run_s": round(timing.first_run_s, 4),
        "times_s": [round(t, 4) for t in timing.times_s],
        "median_s": round(median, 4),
        "clips_per_s": round(case.batch / median, 4),
        "flops": timing.flops,
        "flop_per_s": achieved,
        "peak_flop_per_s": peak,  # bf16 dense peak of the device kind (None: unknown, CPUs)
        "mfu": achieved / peak if achieved and peak else None,
        "memory_bytes": timing.memory,
        "peak_bytes": timing.peak,
        **extra,
        "env": env,
    }


def run_case(
    case: Case, repeats: int, compiler_options: dict | None = None, *, warmup: bool = True
) -> dict:
    cfg = case_config(case)
    t = time.perf_counter()
    program = build_program(case, cfg)
    build_s = time.perf_counter() - t
    timing = measure(program, repeats, compiler_options, warmup=warmup)
    extra = {"build_s": round(build_s, 3), **program.extra}
    if compiler_options:
        extra["compiler_options"] = compiler_options
    return record(case, cfg, timing, extra)
