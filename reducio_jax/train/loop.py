"""The training run: set-up (mesh, weights, data, compiled step), the loop, checkpoints, logs.

`run(cfg, workdir, resume=..., init_from=..., lpips_weights=...)` trains from the state's step
to `cfg.train.num_steps`. Metrics are fetched one step late (the next step is already queued)
except before a checkpoint, so a NaN/inf is always caught before any state that contains it
is saved; the run then stops with `NonFiniteLossError` naming the step and the last good
checkpoint. On SIGTERM (`reducio_jax.preemption`) the step in flight finishes, a checkpoint of
that step is written and committed on every process, and `run` raises `Preempted`; `--resume`
continues the same loss curve. A data pipeline that fails (e.g. a decode worker process that
died) also gets a checkpoint of the last finished step before the run stops.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from reducio_jax import checkpoints, losses
from reducio_jax import sharding as shard_lib
from reducio_jax.config import derived
from reducio_jax.data import make_loader
from reducio_jax.data.errors import DataError
from reducio_jax.data.skips import SKIPPED_FILE
from reducio_jax.preemption import Preempted, StopOnSigterm
from reducio_jax.train import state as state_lib
from reducio_jax.train.checkpoint import restore_step, save_step
from reducio_jax.train.errors import NonFiniteLossError, TrainingError
from reducio_jax.train.monitor import Monitor, step_flops
from reducio_jax.train.step import batch_spec, jit_first_clip, jit_reconstruct, jit_train_step
from reducio_jax.train.weights import load_init_weights, load_lpips_weights

log = logging.getLogger(__name__)
LOOP_ONLY_KEYS = (
    "num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "preview_every",
    "workdir", "async_checkpointing", "lpips_weights",
)  # fmt: skip
_COMPILED: dict[str, Any] = {}  # compiled steps of this process, keyed by program


@dataclasses.dataclass
class RunResult:
    workdir: pathlib.Path
    start_step: int
    end_step: int
    seconds: float  # loop wall time (compilation excluded)
    logs: list[dict[str, float]]  # window means, one per log point
    checkpoint: pathlib.Path | None
    preview: pathlib.Path | None
    preview_l1: list[tuple[int, float]]  # (step, L1 of the fixed preview clip's reconstruction)


def _program_key(
    cfg: ml_collections.ConfigDict, w: losses.LossWeights, mesh: Any, lpips: bool
) -> str:
    d = json.loads(cfg.to_json_best_effort())
    for key in LOOP_ONLY_KEYS:
        d.get("train", {}).pop(key, None)
    devices = [int(x.id) for x in np.asarray(mesh.devices).reshape(-1)]
    return json.dumps([d, repr(w), dict(mesh.shape), devices, lpips], sort_keys=True)


def check_config(cfg: ml_collections.ConfigDict, mesh: Any) -> None:
    """Fails early, in one line, on a batch or clip shape the model or the mesh cannot take."""
    sizes = derived(cfg)
    if int(cfg.data.num_frames) != sizes.num_frames:
        raise TrainingError(
            f"data.num_frames {cfg.data.num_frames} must equal the model's temp_res "
            f"{sizes.num_frames}"
        )
    factor = sizes.spatial_factor
    res = cfg.data.resolution
    hw = (res, res) if isinstance(res, int) else tuple(res)
    if any(int(s) % factor for s in hw):
        raise TrainingError(f"data.resolution {res} must be a multiple of {factor} for this model")
    shards = shard_lib.num_batch_shards(mesh)
    accum = int(cfg.train.grad_accum_steps)
    batch = int(cfg.data.batch_size)
    if accum < 1 or batch % accum or (batch // accum) % shards:
        raise TrainingError(
            f"data.batch_size {batch} must split into train.grad_accum_steps {accum} micro-batches "
            f"each divisible by the {shards} batch shards of mesh {dict(mesh.shape)}"
        )


class Trainer:
    """One run in `workdir`; construct, then `run()`."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        workdir: str | pathlib.Path,
        *,
        resume: bool = False,
        init_from: str | None = None,
        lpips_weights: str | None = None,
        progress: bool = True,
        loader_factory: Callable[..., Iterator] | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.cfg = cfg
        self.workdir = pathlib.Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.is_main = jax.process_index() == 0
        self.progress = progress and self.is_main
        self.mesh = shard_lib.make_mesh(cfg.mesh, devices)
        check_config(cfg, self.mesh)
        self.ckpt = checkpoints.RunCheckpoints(
            self.workdir / "checkpoints",
            keep=int(cfg.train.keep_checkpoints),
            async_save=bool(cfg.train.async_checkpointing),
            cleanup=True,
        )
        try:
            self._set_up(resume, init_from, lpips_weights, loader_factory)
        except BaseException:
            self.ckpt.close()  # lets Orbax's background clean-up finish before the process exits
            raise
        log.info("Set-up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in self.setup_seconds.items()))

    # ---------------------------------------------------------------- set-up
    def _set_up(self, resume, init_from, lpips_weights, loader_factory) -> None:
        """Everything after the checkpointer: resume point, data, state, monitor, compile."""
        if self.ckpt.incomplete:
            log.warning(
                "Ignoring (and deleting) interrupted, uncommitted checkpoint save(s) in %s: %s",
                self.ckpt.directory,
                ", ".join(self.ckpt.incomplete),
            )
        latest = self.ckpt.latest_step()
        if latest is not None and not resume:
            raise TrainingError(
                f"{self.workdir} already has checkpoints (latest step {latest}): pass --resume to "
                "continue that run, or choose another --workdir"
            )
        self.resume_step = latest if resume else None
        self.last_saved: int | None = latest
        t0 = time.perf_counter()
        self.loader = self._make_loader(loader_factory)
        self._init_skips(resume)
        t1 = time.perf_counter()
        self._init_state(init_from, lpips_weights)
        t2 = time.perf_counter()
        self.monitor = Monitor(
            self.workdir, enabled=self.is_main, device_kind=jax.devices()[0].device_kind
        )
        self._compile()
        self.setup_seconds = {
            "data": t1 - t0,
            "state": t2 - t1,
            "compile": time.perf_counter() - t2,
        }

    def _make_loader(self, factory: Callable[..., Iterator] | None) -> Iterator:
        make = factory or make_loader
        try:
            return make(self.cfg.data, mesh=self.mesh, train=True)
        except (DataError, ValueError) as err:
            raise TrainingError(f"data: {err}") from err

    def _init_skips(self, resume: bool) -> None:
        """skipped.jsonl (process p > 0: skipped.p<p>.jsonl) lists this process's unreadable
        files; a resumed run starts from the list it left."""
        p = jax.process_index()
        self.skipped_path = self.workdir / (SKIPPED_FILE if p == 0 else f"skipped.p{p}.jsonl")
        self.skips = getattr(self.loader, "skip_report", None)
        if self.skips is not None and resume:
            self.skips.load(self.skipped_path)
        self._skips_written = -1

    def _data_counts(self) -> None:
        """TensorBoard `data/*` counters and skipped.jsonl, at each log point."""
        stats = getattr(self.loader, "stats", None)
        if self.skips is None or stats is None:
            return
        counts = stats()
        self.monitor.counters(
            self.step,
            {"skipped": counts["files_skipped"], "files_read": counts["files_read"],
             "skip_events": counts["skipped"]},
        )  # fmt: skip
        if len(self.skips) != self._skips_written:
            self.skips.write(self.skipped_path)
            self._skips_written = len(self.skips)

    def _init_state(self, init_from: str | None, lpips_path: str | None) -> None:
        """The train state, LPIPS and the run's config item: from the resumed step, else from
        `init_from` / `lpips_path`, else random."""
        cfg = self.cfg
        if self.resume_step is not None:
            self.config_item = self._resumed_config()
            iterator = getattr(self.loader, "iterator", None)
            self.state, lpips_state = restore_step(
                self.ckpt, self.resume_step, cfg, self.mesh, iterator
            )
            log.info(
                "Resumed from step %d (%s), the latest complete checkpoint.",
                self.resume_step,
                self.ckpt.step_dir(self.resume_step),
            )
        else:
            weights = load_init_weights(init_from, cfg, self.mesh) if init_from else None
            lpips_state = self._lpips(weights, lpips_path or cfg.train.get("lpips_weights"))
            logvar = weights.logvar if weights is not None else None
            self.config_item = checkpoints.config_item(
                cfg,
                logvar=cfg.loss.logvar_init if logvar is None else logvar,
                init_from=init_from,
            )
            if weights is not None:
                self.state = state_lib.state_from_modules(
                    cfg, self.mesh, weights.vae, weights.discriminator
                )
                log.info("Initialised from %s.", init_from)
            else:
                self.state = state_lib.init_state(cfg, self.mesh)
        perceptual = float(cfg.loss.perceptual_weight) if lpips_state is not None else 0.0
        self.weights = losses.LossWeights.from_config(
            cfg.loss, logvar=self.config_item["logvar"], perceptual_weight=perceptual
        )
        vae_graph, disc_graph = state_lib.graphdefs(cfg)
        lpips_graph = state_lib.lpips_graph(cfg) if lpips_state is not None else None
        self.nets = state_lib.Networks(vae_graph, disc_graph, lpips_graph, lpips_state)
        self.state_shardings = state_lib.state_shardings(cfg, self.mesh)

    def _resumed_config(self) -> dict:
        """The config item of the resumed step (logvar, init_from), checked against `cfg`."""
        try:
            item = checkpoints.read_config(self.ckpt.step_dir(self.resume_step))
        except checkpoints.CheckpointError as err:
            raise TrainingError(f"--resume: {err}") from None
        now = json.loads(self.cfg.to_json_best_effort())
        if item["config"].get("model") != now["model"]:
            raise TrainingError(
                f"the config's model block differs from the one {self.workdir} was trained with; "
                "resume with the same config"
            )
        return dict(item, config=now)

    def _lpips(self, weights: Any, path: str | None) -> Any:
        """The frozen LPIPS state of a new run (None: no perceptual loss)."""
        module = weights.lpips if weights is not None else None
        if module is None and path:
            module = load_lpips_weights(path, self.cfg, self.mesh)
        if module is None:
            if float(self.cfg.loss.perceptual_weight) > 0:
                log.warning(
                    "No LPIPS weights (no --init_from with loss.perceptual_loss.* keys, no "
                    "--lpips_weights): training with perceptual_weight 0 instead of %s.",
                    self.cfg.loss.perceptual_weight,
                )
            return None
        return nnx.state(module)

    def _compile(self) -> None:
        cfg = self.cfg
        batch = batch_spec(cfg.data, self.mesh)
        key = self._program = _program_key(
            cfg, self.weights, self.mesh, self.nets.lpips is not None
        )
        if key not in _COMPILED:
            t0 = time.perf_counter()
            fn = jit_train_step(cfg, self.nets, self.weights, self.mesh, self.state_shardings)
            options = state_lib.FAST_COMPILE if cfg.train.get("fast_compile", False) else None
            lowered = fn.lower(self.state, batch, self.nets.lpips_state)
            compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
            _COMPILED[key] = (compiled, step_flops(compiled), time.perf_counter() - t0)
            log.info("Compiled the train step in %.1f s.", _COMPILED[key][2])
        self.step_fn, self.monitor.flops_per_step, self.compile_seconds = _COMPILED[key]

    # ---------------------------------------------------------------- loop
    def run(self) -> RunResult:
        cfg = self.cfg.train
        num_steps, start = int(cfg.num_steps), int(jax.device_get(self.state.step))
        self.step, self.window, self.logs = start, [], []
        self._pending, self._preview_path, self._clip = None, None, None
        self.preview_l1: list[tuple[int, float]] = []
        self._describe(start, num_steps)
        bar = tqdm(
            total=num_steps,
            initial=start,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        t_start = self._t_window = time.perf_counter()
        with StopOnSigterm() as stop:
            stopped = self._loop(bar, num_steps, stop)
            self._finish(bar)
        if stopped:
            raise Preempted(
                f"SIGTERM: stopped at step {self.step}; checkpoint {self._checkpoint_path()} "
                "is committed; run the same command with --resume to continue"
            )
        return RunResult(
            workdir=self.workdir, start_step=start, end_step=self.step,
            seconds=time.perf_counter() - t_start, logs=self.logs,
            checkpoint=self._checkpoint_path(), preview=self._preview_path,
            preview_l1=self.preview_l1,
        )  # fmt: skip

    def _loop(self, bar: tqdm, num_steps: int, stop: StopOnSigterm) -> bool:
        """Steps until `num_steps` (False) or a stop request (True, after the step in flight)."""
        cfg = self.cfg.train
        try:
            while self.step < num_steps:
                batch = self._next_batch(bar, stop)
                if batch is None:
                    return True  # SIGTERM also ended the decode workers
                if self._clip is None and int(cfg.preview_every) > 0:
                    first_clip = self._cached("first_clip", lambda: jit_first_clip(self.mesh))
                    self._clip = first_clip(batch["video"])  # (1, T, H, W, 3), replicated
                    if self.step == 0:
                        self._preview()  # the untrained reconstruction
                self.state, metrics = self.step_fn(self.state, batch, self.nets.lpips_state)
                self._drain()
                self._pending = (self.step, metrics)
                self.step += 1
                bar.update(1)
                self._periodic(bar, num_steps)
                if stop.should_stop(self.step):
                    log.warning("Stopping at step %d (SIGTERM): saving a checkpoint.", self.step)
                    return True
        except KeyboardInterrupt:
            log.warning("Interrupted at step %d: saving a checkpoint.", self.step)
            self._finish(bar)
            raise
        except NonFiniteLossError:
            bar.close()
            self.ckpt.wait()
            raise
        return False

    def _next_batch(self, bar: tqdm, stop: StopOnSigterm) -> dict | None:
        """The next batch; a failing data pipeline checkpoints the last step (single process),
        then stops. None: the pipeline failed after a SIGTERM (a scheduler signals the decode
        workers too)."""
        try:
            batch = next(self.loader)
        except DataError as err:
            if stop.signal_received:
                log.warning("Data pipeline ended after SIGTERM (%s).", err)
                return None
            if jax.process_count() > 1:  # the other processes are not saving: no collective
                raise TrainingError(f"data: {err}") from err
            log.error("Data pipeline failed at step %d: saving a checkpoint.", self.step)
            self._finish(bar)
            raise TrainingError(
                f"data: {err}; checkpoint {self._checkpoint_path()} is committed: fix the "
                "cause, then rerun with --resume"
            ) from err
        return {"video": batch["video"], "index": batch["index"]}

    def _periodic(self, bar: tqdm, num_steps: int) -> None:
        cfg = self.cfg.train
        at = lambda every: every > 0 and self.step % int(every) == 0  # noqa: E731
        save = at(cfg.checkpoint_every)
        if at(cfg.log_every) or save:
            self._drain()
        if at(cfg.log_every):
            self._write_window(bar)
        if save:
            self._save()
        if at(cfg.preview_every) and self.step < num_steps:
            self._preview()

    def _finish(self, bar: tqdm) -> None:
        self._drain()
        self._write_window(bar)
        if self.last_saved != self.step:
            self._save()
        if self._clip is not None:
            self._preview()
        bar.close()
        self.ckpt.close()
        self.monitor.close()
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()

    def _drain(self) -> None:
        """Fetches the pending step's metrics; stops on a non-finite value."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if host.pop("finite") != 1.0 or not all(math.isfinite(v) for v in host.values()):
            bad = ", ".join(f"{k}={v}" for k, v in host.items() if not math.isfinite(v))
            good = self._checkpoint_path()
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({bad or 'loss'}); stopped. Last good checkpoint: "
                f"{good if good else 'none (no checkpoint saved yet)'}"
            )
        self.window.append(host)

    def _write_window(self, bar: tqdm) -> None:
        if not self.window:
            return
        now = time.perf_counter()
        clips = len(self.window) * int(self.cfg.data.batch_size)
        means = self.monitor.scalars(self.step, self.window, now - self._t_window, clips)
        self._data_counts()
        self.logs.append({"step": self.step, **means})
        bar.set_postfix(l1=f"{means['l1']:.4f}", loss=f"{means['total_loss_ae']:.4f}",
                        clips_s=f"{means['clips_per_second']:.2f}")  # fmt: skip
        self.window, self._t_window = [], now

    def _save(self) -> None:
        data_state = None
        if hasattr(self.loader, "get_state"):
            try:
                data_state = self.loader.get_state()
            except Exception as err:
                log.warning("No data-iterator state in checkpoint %d (%s).", self.step, err)
        save_step(
            self.ckpt,
            self.step,
            self.state,
            config=self.config_item,
            lpips_state=self.nets.lpips_state,
            data_state=data_state,
        )
        self.last_saved = self.step

    def _checkpoint_path(self) -> pathlib.Path | None:
        return None if self.last_saved is None else self.ckpt.step_dir(self.last_saved)

    def _cached(self, name: str, make: Callable[[], Any]) -> Any:
        """The jitted function `name` of this run's program, made once per process."""
        key = (name, self._program)
        if key not in _COMPILED:
            _COMPILED[key] = make()
        return _COMPILED[key]

    def _preview(self) -> None:
        """Reconstructs the fixed preview clip (this invocation's first) from the posterior
        mean; writes the preview and records its L1."""
        reconstruct = self._cached("reconstruct", lambda: jit_reconstruct(self.nets, self.mesh))
        recon = reconstruct(self.state.vae_params, self.state.vae_buffers, self._clip)
        clip, recon = np.asarray(self._clip[0]), np.asarray(recon[0])  # (T, H, W, 3)
        l1 = float(np.mean(np.abs(clip - recon)))
        self.preview_l1.append((self.step, l1))
        path = self.monitor.preview(self.step, clip, recon, l1)
        self._preview_path = path or self._preview_path

    def _describe(self, start: int, num_steps: int) -> None:
        if not self.is_main:
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


def run(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, **kwargs: Any) -> RunResult:
    """Trains `cfg` in `workdir` (see `Trainer` for the keyword arguments)."""
    return Trainer(cfg, workdir, **kwargs).run()
