"""The training run: set-up (mesh, checkpoints, data, state, compiled step), then one loop.

`run(cfg, workdir, resume=..., init_from=..., lpips_weights=...)` trains from the state's step
to `cfg.train.num_steps`. Metrics are fetched one step late (the next step is already queued)
except before a checkpoint, so a NaN/inf is always caught before any state that contains it
is saved; the run then stops with `NonFiniteLossError` naming the step and the last good
checkpoint. On SIGTERM (`reducio_jax.runs.preemption`) the step in flight finishes, a checkpoint of
that step is written and committed on every process, and `run` raises `Preempted`; `--resume`
continues the same loss curve. A data pipeline that fails (e.g. a decode worker process that
died) also gets a checkpoint of the last finished step before the run stops.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from reducio_jax import losses
from reducio_jax import sharding as shard_lib
from reducio_jax.config import derived, frame_size
from reducio_jax.data import make_loader
from reducio_jax.data.errors import DataError
from reducio_jax.data.skips import SKIPPED_FILE
from reducio_jax.programs import serialized, store
from reducio_jax.runs.preemption import Preempted, StopOnSigterm
from reducio_jax.storage import checkpoints
from reducio_jax.storage.paths import Path, PathLike, as_path, make_dirs
from reducio_jax.train import state as state_lib
from reducio_jax.train.checkpoint import restore_step, save_step
from reducio_jax.train.errors import NonFiniteLossError, RunFailure, TrainingError
from reducio_jax.train.monitor import Monitor, step_flops
from reducio_jax.train.state import TrainState
from reducio_jax.train.step import batch_spec, jit_first_clip, jit_reconstruct, jit_train_step
from reducio_jax.train.weights import load_init_weights, load_lpips_weights

log = logging.getLogger(__name__)
LOOP_ONLY_KEYS = (
    "num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "preview_every",
    "workdir", "async_checkpointing", "lpips_weights", "seed", "compiled_step",
)  # fmt: skip
PROGRAM_DATA_KEYS = ("batch_size", "num_frames", "resolution")  # the rest is the loader's
_COMPILED: dict[Any, Any] = {}  # compiled steps and helpers of this process, keyed by program


@dataclasses.dataclass
class RunResult:
    workdir: Path
    start_step: int
    end_step: int
    seconds: float  # loop wall time (compilation excluded)
    logs: list[dict[str, float]]  # window means, one per log point
    checkpoint: Path | None
    preview: Path | None
    preview_l1: list[tuple[int, float]]  # (step, L1 of the fixed preview clip's reconstruction)


def check_config(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Fails early, in one line, on a batch or clip shape the model or the mesh cannot take."""
    sizes = derived(cfg)
    if int(cfg.data.num_frames) != sizes.num_frames:
        raise TrainingError(
            f"data.num_frames {cfg.data.num_frames} must equal the model's temp_res "
            f"{sizes.num_frames}"
        )
    factor = sizes.spatial_factor
    res = cfg.data.resolution
    if any(s % factor for s in frame_size(res)):
        raise TrainingError(f"data.resolution {res} must be a multiple of {factor} for this model")
    shards = shard_lib.num_batch_shards(mesh)
    accum = int(cfg.train.grad_accum_steps)
    batch = int(cfg.data.batch_size)
    if accum < 1 or batch % accum or (batch // accum) % shards:
        raise TrainingError(
            f"data.batch_size {batch} must split into train.grad_accum_steps {accum} micro-batches "
            f"each divisible by the {shards} batch shards of mesh {dict(mesh.shape)}"
        )


# ------------------------------------------------------------------------------------ set-up
def resume_point(ckpt: checkpoints.RunCheckpoints, workdir: Path, resume: bool):
    """The step to resume from (None: a fresh run); refuses to overwrite an existing run."""
    if ckpt.incomplete:
        log.warning(
            "Ignoring (and deleting) interrupted, uncommitted checkpoint save(s) in %s: %s",
            ckpt.directory,
            ", ".join(ckpt.incomplete),
        )
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise TrainingError(
            f"{workdir} already has checkpoints (latest step {latest}): pass --resume to "
            "continue that run, or choose another --workdir"
        )
    return latest if resume else None


def open_loader(cfg: ml_collections.ConfigDict, mesh: Mesh, factory: Callable | None) -> Iterator:
    try:
        return (factory or make_loader)(cfg.data, mesh=mesh, train=True)
    except (DataError, ValueError) as err:
        raise TrainingError(f"data: {err}") from err


def fresh_start(
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    init_from: str | None,
    lpips_path: str | None,
) -> tuple[TrainState, nnx.State | None, dict]:
    """(state, LPIPS state or None, config item) of a new run: from `init_from` (and
    `lpips_path` for LPIPS) or random."""
    weights = load_init_weights(init_from, cfg, mesh) if init_from else None
    lpips = weights.lpips if weights is not None else None
    if lpips is None and lpips_path:
        lpips = load_lpips_weights(lpips_path, cfg, mesh)
    if lpips is None and float(cfg.loss.perceptual_weight) > 0:
        log.warning(
            "No LPIPS weights (no --init_from with loss.perceptual_loss.* keys, no "
            "--lpips_weights): training with perceptual_weight 0 instead of %s.",
            cfg.loss.perceptual_weight,
        )
    logvar = weights.logvar if weights is not None else None
    logvar = float(cfg.loss.logvar_init) if logvar is None else logvar
    config = checkpoints.config_item(cfg, logvar=logvar, init_from=init_from)
    if weights is None:
        return state_lib.init_state(cfg, mesh), None if lpips is None else nnx.state(lpips), config
    log.info("Initialised from %s.", init_from)
    state = state_lib.state_from_modules(cfg, mesh, weights.vae, weights.discriminator)
    return state, None if lpips is None else nnx.state(lpips), config


def resumed_start(
    cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    ckpt: checkpoints.RunCheckpoints,
    step: int,
    loader: Iterator,
) -> tuple[TrainState, nnx.State | None, dict]:
    """(state, LPIPS state or None, config item) of the checkpoint of `step`; the loader's
    position is restored in place. Refuses a config whose model block differs."""
    try:
        saved = checkpoints.read_config(ckpt.step_dir(step))
    except checkpoints.CheckpointError as err:
        raise TrainingError(f"--resume: {err}") from None
    now = json.loads(cfg.to_json_best_effort())
    if saved["config"].get("model") != now["model"]:
        raise TrainingError(
            f"the config's model block differs from the one {ckpt.directory.parent} was trained "
            "with; resume with the same config"
        )
    iterator = getattr(loader, "iterator", None)  # a Grain iterator (None: a test's loader)
    state, lpips = restore_step(ckpt, step, cfg, mesh, iterator)
    log.info(
        "Resumed from step %d (%s), the latest complete checkpoint.", step, ckpt.step_dir(step)
    )
    return state, lpips, dict(saved, config=now)


def compiled_step(
    cfg: ml_collections.ConfigDict,
    nets: state_lib.Networks,
    weights: losses.LossWeights,
    mesh: Mesh,
    state: TrainState,
) -> tuple[Any, float | None, str]:
    """(compiled train step, its FLOPs per device, program key): loaded from
    `train.compiled_step` when it names a file, else compiled once per process."""
    identity = step_identity(cfg, weights, mesh, nets.lpips is not None)
    key = program_key(identity, mesh)
    if cfg.train.get("compiled_step"):
        t0 = time.perf_counter()
        compiled = serialized.read(cfg.train.compiled_step, identity, list(mesh.devices.flat))
        log.info(
            "Loaded the train step from %s in %.1f s.",
            cfg.train.compiled_step, time.perf_counter() - t0,
        )  # fmt: skip
        return compiled, step_flops(compiled), key
    if key not in _COMPILED:
        t0 = time.perf_counter()
        devices = list(mesh.devices.flat)
        options = state_lib.step_compiler_options(cfg, devices[0].platform)
        programs = store.Store.current()
        name = _stored_name(key, options, state, nets, devices)
        compiled = None if programs is None else programs.load(name, devices)
        if compiled is None:
            shardings = state_lib.state_shardings(cfg, mesh)
            fn = jit_train_step(cfg, nets, weights, mesh, shardings)
            lowered = fn.lower(state, batch_spec(cfg.data, mesh), nets.lpips_state)
            compiled = lowered.compile(compiler_options=options or None)
            if programs is not None:
                programs.put(name, compiled)
            log.info("Compiled the train step in %.1f s.", time.perf_counter() - t0)
        else:
            log.info("Loaded the train step from %s in %.1f s.", programs.folder,
                     time.perf_counter() - t0)  # fmt: skip
        _COMPILED[key] = (compiled, step_flops(compiled))
    return (*_COMPILED[key], key)


def _stored_name(
    key: str, options: dict[str, Any], state: Any, nets: state_lib.Networks, devices: list
) -> str:
    """The train step's name in the program store (store.py): its key, its XLA options and
    the shapes, dtypes and shardings of the state and the LPIPS weights it is called with."""
    leaves = [
        (tuple(x.shape), str(x.dtype), store.describe(getattr(x, "sharding", None)))
        for x in jax.tree.leaves((state, nets.lpips_state))
    ]
    return store.key(store.describe(("train_step", key, sorted(options.items()), leaves)), devices)


def step_identity(
    cfg: ml_collections.ConfigDict, w: losses.LossWeights, mesh: Mesh, lpips: bool
) -> dict[str, Any]:
    """What one compiled train step is made of: the config less the loop's and the loader's
    own settings, the loss weights, the mesh's axes and whether LPIPS is in the loss."""
    d = json.loads(cfg.to_json_best_effort())
    for key in LOOP_ONLY_KEYS:
        d.get("train", {}).pop(key, None)
    d["data"] = {k: v for k, v in d.get("data", {}).items() if k in PROGRAM_DATA_KEYS}
    d.get("mesh", {}).pop("shape", None)  # as the devices resolve it, below
    return {"config": d, "loss_weights": repr(w), "mesh": dict(mesh.shape), "lpips": lpips}


def program_key(identity: dict[str, Any], mesh: Mesh) -> str:
    """The step's key in this process: its identity on these devices."""
    devices = [int(x.id) for x in np.asarray(mesh.devices).reshape(-1)]
    return json.dumps([identity, devices], sort_keys=True)


def cached(name: str, program: str, make: Callable[[], Any]) -> Any:
    """The jitted helper `name` of a program, made once per process."""
    if (name, program) not in _COMPILED:
        _COMPILED[name, program] = make()
    return _COMPILED[name, program]


class SkipList:
    """skipped.jsonl (process p > 0: skipped.p<p>.jsonl): the unreadable files this process's
    loader passed over, with the `data/*` counters; a resumed run continues its list."""

    def __init__(self, workdir: Path, loader: Iterator, resume: bool):
        p = jax.process_index()
        self.path = workdir / (SKIPPED_FILE if p == 0 else f"skipped.p{p}.jsonl")
        self.report = getattr(loader, "skip_report", None)  # None: a test's loader
        self.stats = getattr(loader, "stats", None)
        if self.report is not None and resume:
            self.report.load(self.path)
        self.written = -1

    def write(self, monitor: Monitor, step: int) -> None:
        if self.report is None or self.stats is None:
            return
        counts = self.stats()
        monitor.counters(
            step,
            {"skipped": counts["files_skipped"], "files_read": counts["files_read"],
             "skip_events": counts["skipped"]},
        )  # fmt: skip
        if len(self.report) != self.written:
            self.report.write(self.path)
            self.written = len(self.report)


# ------------------------------------------------------------------------------ loop helpers
def fetch(pending: tuple[int, Any] | None, last_good: Path | None) -> list[dict]:
    """The host metrics of the pending step ([] when none); stops on a non-finite value."""
    if pending is None:
        return []
    step, metrics = pending
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if host.pop("finite") != 1.0 or not all(math.isfinite(v) for v in host.values()):
        bad = ", ".join(f"{k}={v}" for k, v in host.items() if not math.isfinite(v))
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({bad or 'loss'}); stopped. Last good checkpoint: "
            f"{last_good if last_good else 'none (no checkpoint saved yet)'}"
        )
    return [host]


def data_state(loader: Iterator, step: int) -> Any | None:
    """The loader's position for a checkpoint (None: it has none)."""
    if not hasattr(loader, "get_state"):
        return None
    try:
        return loader.get_state()
    except Exception as err:
        log.warning("No data-iterator state in checkpoint %d (%s).", step, err)
        return None


def preview(
    reconstruct: Callable, state: TrainState, clip: jax.Array, monitor: Monitor, step: int
) -> tuple[float, Path | None]:
    """Reconstructs the preview clip from the posterior mean, writes the preview: (L1, png)."""
    recon = reconstruct(state.vae_params, state.vae_buffers, clip)
    clip, recon = np.asarray(clip[0]), np.asarray(recon[0])  # (T, H, W, 3)
    l1 = float(np.mean(np.abs(clip - recon)))
    return l1, monitor.preview(step, clip, recon, l1)


class Trainer:
    """One run in `workdir`: the constructor sets it up, `run()` is the loop."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        workdir: PathLike,
        *,
        resume: bool = False,
        init_from: str | None = None,
        lpips_weights: str | None = None,
        progress: bool = True,
        loader_factory: Callable[..., Iterator] | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.cfg = cfg
        self.workdir = as_path(workdir)
        make_dirs(self.workdir)  # a bucket must exist
        self.progress = progress and jax.process_index() == 0
        self.mesh = shard_lib.make_mesh(cfg.mesh, devices)
        check_config(cfg, self.mesh)
        self.ckpt = checkpoints.RunCheckpoints(
            self.workdir / "checkpoints",
            keep=int(cfg.train.keep_checkpoints),
            async_save=bool(cfg.train.async_checkpointing),
            cleanup=True,
        )
        try:
            t0 = time.perf_counter()
            self.resume_step = resume_point(self.ckpt, self.workdir, resume)
            self.loader = open_loader(cfg, self.mesh, loader_factory)
            self.skips = SkipList(self.workdir, self.loader, resume)
            t1 = time.perf_counter()
            if self.resume_step is None:
                lpips_path = lpips_weights or cfg.train.get("lpips_weights") or None
                start = fresh_start(cfg, self.mesh, init_from, lpips_path)
            else:
                start = resumed_start(cfg, self.mesh, self.ckpt, self.resume_step, self.loader)
            self.state, lpips_state, self.config_item = start
            perceptual = float(cfg.loss.perceptual_weight) if lpips_state is not None else 0.0
            self.weights = losses.LossWeights.from_config(
                cfg.loss, logvar=self.config_item["logvar"], perceptual_weight=perceptual
            )
            lpips_graph = state_lib.lpips_graph(cfg) if lpips_state is not None else None
            self.nets = state_lib.Networks(*state_lib.graphdefs(cfg), lpips_graph, lpips_state)
            t2 = time.perf_counter()
            self.step_fn, flops_per_step, self.program = compiled_step(
                cfg, self.nets, self.weights, self.mesh, self.state
            )
            self.monitor = Monitor(
                self.workdir, enabled=jax.process_index() == 0,
                device_kind=jax.devices()[0].device_kind, flops_per_step=flops_per_step,
            )  # fmt: skip
        except BaseException:
            self.ckpt.close()  # lets Orbax's background clean-up finish before the process exits
            raise
        log.info(
            "Set-up: data %.1f s, state %.1f s, compile %.1f s",
            t1 - t0, t2 - t1, time.perf_counter() - t2,
        )  # fmt: skip

    def run(self) -> RunResult:
        """Steps until `train.num_steps`, a SIGTERM, Ctrl-C or a failed data pipeline; each way
        ends with the last metrics, a checkpoint of the last step and a last preview."""
        every = self.cfg.train  # periods: log_every, checkpoint_every, preview_every
        num_steps = int(every.num_steps)
        state, lpips_state = self.state, self.nets.lpips_state
        step = start = int(jax.device_get(state.step))
        last_saved = self.resume_step  # the newest committed checkpoint's step
        logs, window, preview_l1 = [], [], []  # log points; metrics since the last; previews
        pending = None  # (step, metrics) of the last step run, fetched one step late
        clip = None  # the fixed preview clip (1, T, H, W, 3): this invocation's first
        previews: list[Path | None] = []  # the preview images written (None: process > 0)
        preempted = interrupted = False
        data_failure: DataError | None = None
        first_clip = cached("first_clip", self.program, lambda: jit_first_clip(self.mesh))
        reconstruct = cached(
            "reconstruct", self.program, lambda: jit_reconstruct(self.nets, self.mesh)
        )

        def at(period: int) -> bool:
            return int(period) > 0 and step % int(period) == 0

        def last_good() -> Path | None:
            return None if last_saved is None else self.ckpt.step_dir(last_saved)

        def save() -> None:
            data = data_state(self.loader, step)
            save_step(self.ckpt, step, state, config=self.config_item,
                      lpips_state=lpips_state, data_state=data)  # fmt: skip

        def write_preview() -> None:
            l1, png = preview(reconstruct, state, clip, self.monitor, step)
            preview_l1.append((step, l1))
            previews.append(png)

        def write_logs() -> None:
            if not window:
                return
            clips = len(window) * int(self.cfg.data.batch_size)
            means = self.monitor.scalars(step, window, time.perf_counter() - t_window, clips)
            self.skips.write(self.monitor, step)
            logs.append({"step": step, **means})
            bar.set_postfix(l1=f"{means['l1']:.4f}", loss=f"{means['total_loss_ae']:.4f}",
                            clips_s=f"{means['clips_per_second']:.2f}")  # fmt: skip

        self._describe(start, num_steps)
        bar = tqdm(total=num_steps, initial=start, disable=not self.progress, unit="step",
                   dynamic_ncols=True)  # fmt: skip
        t_start = t_window = time.perf_counter()
        try:
            with StopOnSigterm() as stop:
                try:
                    while step < num_steps:
                        try:
                            batch = next(self.loader)
                        except DataError as err:
                            preempted = stop.signal_received  # it reached the decode workers too
                            if not preempted and jax.process_count() > 1:
                                raise RunFailure(f"data: {err}") from err  # nobody else saves
                            log.warning("Data pipeline ended at step %d (%s).", step, err)
                            data_failure = None if preempted else err
                            break
                        if clip is None and int(every.preview_every) > 0:
                            clip = first_clip(batch["video"])  # (1, T, H, W, 3), replicated
                            if step == 0:
                                write_preview()  # the untrained reconstruction

                        batch = {"video": batch["video"], "index": batch["index"]}
                        state, metrics = self.step_fn(state, batch, lpips_state)
                        window += fetch(pending, last_good())  # the step before, while this runs
                        pending = (step, metrics)
                        step += 1
                        bar.update(1)

                        if at(every.log_every) or at(every.checkpoint_every):
                            window += fetch(pending, last_good())  # a NaN is never saved
                            pending = None
                        if at(every.log_every):
                            write_logs()
                            window, t_window = [], time.perf_counter()
                        if at(every.checkpoint_every):
                            save()
                            last_saved = step
                        if at(every.preview_every) and step < num_steps:
                            write_preview()
                        if stop.should_stop(step):
                            log.warning("Stopping at step %d (SIGTERM): saving a checkpoint.", step)
                            preempted = True
                            break
                except KeyboardInterrupt:
                    log.warning("Interrupted at step %d: saving a checkpoint.", step)
                    interrupted = True

                # every way out: the last metrics, a checkpoint of the last step, a preview
                window += fetch(pending, last_good())
                write_logs()
                if last_saved != step:
                    save()
                    last_saved = step
                if clip is not None:
                    write_preview()
                bar.close()
                self.ckpt.close()  # waits for the last save to commit, still under StopOnSigterm
                self.monitor.close()
                if hasattr(self.loader, "close"):
                    self.loader.close()
        except NonFiniteLossError:
            bar.close()
            self.ckpt.wait()
            raise
        self.state = state
        if interrupted:
            raise KeyboardInterrupt
        if preempted:
            raise Preempted(
                f"SIGTERM: stopped at step {step}; checkpoint {last_good()} is committed; run "
                "the same command with --resume to continue"
            )
        if data_failure is not None:
            raise RunFailure(
                f"data: {data_failure}; checkpoint {last_good()} is committed: fix the cause, "
                "then rerun with --resume"
            ) from data_failure
        return RunResult(
            workdir=self.workdir, start_step=start, end_step=step,
            seconds=time.perf_counter() - t_start, logs=logs, checkpoint=last_good(),
            preview=next((p for p in reversed(previews) if p), None), preview_l1=preview_l1,
        )  # fmt: skip

    def _describe(self, start: int, num_steps: int) -> None:
        if jax.process_index() != 0:
            return
        n_vae = state_lib.param_count(self.state.vae_params)
        n_disc = state_lib.param_count(self.state.disc_params)
        flops = self.monitor.flops_per_step
        log.info(
            "Training steps %d -> %d on %d %s device(s), %d process(es), mesh %s; batch %d x %d "
            "frames at %s px, %d micro-batch(es); VAE %.2fM / D %.2fM params; LPIPS %s; "
            "step %.1f GFLOP/device; workdir %s",
            start, num_steps, self.mesh.size, jax.devices()[0].platform, jax.process_count(),
            dict(self.mesh.shape), self.cfg.data.batch_size, self.cfg.data.num_frames,
            self.cfg.data.resolution, self.cfg.train.grad_accum_steps, n_vae / 1e6, n_disc / 1e6,
            "on" if self.nets.lpips is not None else "off", (flops or 0) / 1e9, self.workdir,
        )  # fmt: skip
        self.monitor.text("config", "```\n" + str(self.cfg) + "\n```")


def run(cfg: ml_collections.ConfigDict, workdir: PathLike, **kwargs: Any) -> RunResult:
    """Trains `cfg` in `workdir` (see `Trainer` for the keyword arguments)."""
    return Trainer(cfg, workdir, **kwargs).run()
