"""`python train.py --config configs/demo.py [--config.train.num_steps=50] [--workdir DIR]
[--resume] [--init_from CKPT_OR_DIR] [--lpips_weights FILE_OR_DIR]`.

Bad input (missing config file, bad override, unknown weights file, a workdir that already
holds a run without --resume, a non-finite loss) ends with one `error: ...` line on stderr and
exit status 2 (command line) or 1 (run), without a traceback.

SIGTERM (preemption) finishes the step in flight, commits a checkpoint of that step on every
process and exits with status 143 (128 + SIGTERM) after one `preempted: ...` line: rerun the
same command with --resume. Ctrl-C (SIGINT) also checkpoints, then exits with 130.
"""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a .py with get_config()).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: train.workdir or runs/<config name>)."
)
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
_INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Start from a released torch checkpoint (.ckpt/.pt/.safetensors) or a converted Orbax directory.",
)
_LPIPS = flags.DEFINE_string(
    "lpips_weights",
    None,
    "LPIPS weights: a torch file with loss.perceptual_loss.* keys or a converted directory.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() (auto-detected cluster: TPU pods, SLURM, ...).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (multi-process runs)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (off: --noprogress).")
_NO_PROGRESS = flags.DEFINE_bool(
    "no_progress", False, "No progress bar (the spelling of eval.py and python -m reducio_jax)."
)
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    "~/.cache/reducio_jax/xla",
    "JAX persistent compilation cache ('' = off; JAX_COMPILATION_CACHE_DIR wins): resumed and "
    "repeated runs skip compiling.",
)

log = logging.getLogger("reducio_jax.train")


def fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _config_path(argv: list[str]) -> str | None:
    """The --config value in argv (without config_flags' ':override' suffix)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports problems (missing/broken config, bad override) in one line."""
    path = _config_path(argv)
    if path is not None and not pathlib.Path(path).is_file():
        fail(f"config file {path} does not exist", 2)
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value  # loading errors of the config file surface here
    except flags.Error as err:
        fail(one_line(err), 2)
    except Exception as err:  # config files raise anything while loading
        fail(f"--config: {type(err).__name__}: {one_line(err)}", 2)
    if config is None:
        fail("--config is required (e.g. --config configs/demo.py)", 2)
    return rest


def one_line(err: BaseException) -> str:
    """An exception's message on one line (KeyError/AttributeError messages unquoted)."""
    text = err.args[0] if len(err.args) == 1 and isinstance(err.args[0], str) else str(err)
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr()'d message
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


def workdir_for(cfg, flag_value: str | None) -> pathlib.Path:
    if flag_value:
        return pathlib.Path(flag_value)
    if cfg.train.get("workdir"):
        return pathlib.Path(cfg.train.workdir)
    config_path = flags.FLAGS["config"].config_filename
    return pathlib.Path("runs") / pathlib.Path(config_path.split(":")[0]).stem


def init_compilation_cache() -> None:
    import jax

    if _CACHE.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))


def init_distributed() -> None:
    import jax

    explicit = _COORDINATOR.value is not None
    if explicit or _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    from reducio_jax.preemption import PREEMPTED_STATUS, Preempted
    from reducio_jax.train.errors import TrainingError

    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    init_distributed()
    init_compilation_cache()
    from reducio_jax.train.loop import run

    cfg = _CONFIG.value
    workdir = workdir_for(cfg, _WORKDIR.value)
    try:
        result = run(
            cfg, workdir, resume=_RESUME.value, init_from=_INIT_FROM.value,
            lpips_weights=_LPIPS.value, progress=_PROGRESS.value and not _NO_PROGRESS.value,
        )  # fmt: skip
    except TrainingError as err:
        fail(str(err), 1)
    except Preempted as stop:
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_STATUS)
    except KeyboardInterrupt:
        fail("interrupted; the state at the interruption was checkpointed in " + str(workdir), 130)
    summarize(result)


def summarize(result) -> None:
    """One line per process: steps, L1 and total loss of the first and last log, outputs."""
    import jax

    logs = result.logs
    losses = "no steps run"
    if logs:
        first, last = logs[0], logs[-1]
        losses = (
            f"L1 {first['l1']:.6f} -> {last['l1']:.6f}, total loss {first['total_loss_ae']:.6f} "
            f"-> {last['total_loss_ae']:.6f} (first -> last log)"
        )
    if result.preview_l1:
        (s0, a), (s1, b) = result.preview_l1[0], result.preview_l1[-1]
        losses += f"; preview-clip L1 {a:.4f} (step {s0}) -> {b:.4f} (step {s1})"
    prefix = ""
    if jax.process_count() > 1:
        prefix = f"[process {jax.process_index()}/{jax.process_count()}] "
    print(
        f"{prefix}done: steps {result.start_step} -> {result.end_step}; {losses}; "
        f"{result.seconds:.1f} s; checkpoint {result.checkpoint}; preview {result.preview}; "
        f"tensorboard {result.workdir / 'tensorboard'}",
        flush=True,
    )


def main() -> None:
    app.run(_main, flags_parser=parse_flags)
