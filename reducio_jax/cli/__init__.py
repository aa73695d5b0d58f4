"""`python -m reducio_jax COMMAND [flags]` (or `reducio-jax COMMAND ...`): one command line.

    train        train or fine-tune (python train.py ...)
    eval         PSNR / SSIM / LPIPS / rFVD of reconstructions (python eval.py ...)
    convert      released torch checkpoint -> pretrained directory (convert_torch_weights.py)
    encode       videos -> latent store
    decode       latent store -> mp4 videos
    export       training run -> pretrained directory
    reconstruct  a video file of any length and size (or a folder) -> its reconstruction
    compile      compile a program for a TPU topology here: per-chip memory, FLOPs, batch that fits

Every command takes absl flags (`--flag=value` or `--flag value`, booleans `--flag` /
`--noflag`), `--config` is an `ml_collections` config flag (`--config.KEY=VALUE` overrides),
and `COMMAND --help` lists the command's flags. Exit status: 0 done, 2 bad input, 1 the run
failed (one `error: ...` line on stderr for both; compile: 1 = does not fit), 130 Ctrl-C, 143
SIGTERM (train, encode and eval stop after the step in flight; rerun the same command to
continue).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from absl import flags

from reducio_jax.cli import shared_flags
from reducio_jax.errors import BAD_INPUT, INTERRUPTED, error_line, exit_status
from reducio_jax.programs import allocator, cache
from reducio_jax.storage import paths

# command -> one line; each is the module reducio_jax.cli.<command> (imported when run).
COMMANDS = {
    "train": "train or fine-tune Reducio-VAE (also: python train.py)",
    "eval": "PSNR, SSIM, LPIPS and rFVD of reconstructions (also: python eval.py)",
    "convert": "released torch checkpoint -> pretrained directory (convert_torch_weights.py)",
    "encode": "videos -> latent store (Zarr via TensorStore), resumable",
    "decode": "latent store -> mp4 videos",
    "export": "training run checkpoint -> pretrained directory",
    "reconstruct": "a video file of any length and size (or a folder) -> its reconstruction",
    "compile": "compile for a TPU topology on this host: per-chip memory, FLOPs, batch that fits",
}
# Commands that run one compiled program many times: all threads share one heap, set before
# JAX starts (faster runs, slower compiles; reducio_jax/programs/allocator.py).
ONE_HEAP_COMMANDS = ("eval", "encode", "decode", "reconstruct")
HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort", "-?")
# Older spellings, still accepted: the flag they mean.
OLD_SPELLINGS = {"--no_progress": "--noprogress", "--vae-only": "--vae_only"}


def usage(prog: str) -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return (
        f"usage: {prog} COMMAND [flags]   ({prog} COMMAND --help lists its flags)\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n" + __doc__.split("\n\n", 2)[2]
    )


def command_help(prog: str, module: ModuleType, fv: flags.FlagValues) -> str:
    """The command's usage line, description and every flag with its default."""
    lines = [f"usage: {prog} {module.USAGE}", "", module.__doc__.strip(), "", "flags:"]
    for name in fv:
        flag = fv[name]
        if name != flag.name:  # a short name
            continue
        spelled = f"--[no]{name}" if flag.boolean else f"--{name}"
        default = "" if flag.default is None else f" (default: {_shown(flag.default)})"
        text = f"{flag.help}{default}"
        lines.append(f"  {spelled}")
        lines.append(textwrap.fill(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def run_command(command: str, args: Sequence[str], prog: str) -> int:
    """Defines the command's flags, parses `args`, runs it; returns the exit status. `prog`:
    how the command was called (`python -m reducio_jax train`, `python train.py`)."""
    module = importlib.import_module(f"reducio_jax.cli.{command}")
    args = [OLD_SPELLINGS.get(a, a) for a in args]
    argv = [prog, *args]
    fv = flags.FlagValues()
    module.define(fv, argv)
    shared_flags.define_compilation_cache(fv)
    if any(a in HELP_FLAGS for a in args):
        print(command_help(prog, module, fv))
        return 0
    try:
        positional = fv(argv)[1:]
    except Exception as err:  # flag values and --config overrides are input
        print(error_line(err, named=False), file=sys.stderr, flush=True)
        return BAD_INPUT
    if command in ONE_HEAP_COMMANDS:
        allocator.share_one_heap()
    default_sigint = signal.getsignal(signal.SIGINT)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and default_sigint is signal.default_int_handler:  # Ctrl-C: also noted
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        cache.use_compilation_cache(fv["compilation_cache"].value)
        with cache.CompileCount() as compiles:
            status = module.run(fv, positional)
        if "progress" in fv and fv["progress"].value:  # beside the progress bars, on stderr
            print(compiles.describe(), file=sys.stderr, flush=True)
        return status
    except KeyboardInterrupt as stop:  # a command may say what it kept: "...; MESSAGE"
        print("; ".join(["error: interrupted", *map(str, stop.args)]), file=sys.stderr)
        return INTERRUPTED
    except Exception as err:  # one line, the status of its kind (errors.py)
        if os.environ.get("REDUCIO_JAX_TRACEBACK") and exit_status(err) != BAD_INPUT:
            raise  # the full traceback of an unexpected failure, for a bug report
        print(error_line(err), file=sys.stderr, flush=True)
        return exit_status(err)
    finally:
        if main_thread and signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, default_sigint)
        paths.clear_interrupt()


def _on_sigint(signum: int, frame: Any) -> None:
    """Python's KeyboardInterrupt, noted first: raised inside a garbage-collection callback,
    Python prints and drops it, and the command would go on to publish its output."""
    paths.note_interrupt()
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, prog: str = "python -m reducio_jax") -> int:
    """`python -m reducio_jax COMMAND ...`; `argv` without the program name."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and (args[0] in HELP_FLAGS or args[0] == "help"):
        print(usage(prog))
        return 0
    if not args or args[0] not in COMMANDS:
        given = f"unknown command '{args[0]}'" if args else "no command given"
        print(
            f"error: {given}; the commands are {', '.join(COMMANDS)} (see {prog} --help)",
            file=sys.stderr,
        )
        return BAD_INPUT
    return run_command(args[0], args[1:], f"{prog} {args[0]}")


def script(command: str) -> None:
    """`python train.py ...` and friends: the same as `python -m reducio_jax COMMAND ...`."""
    sys.exit(run_command(command, sys.argv[1:], f"python {os.path.basename(sys.argv[0])}"))


def console_script() -> None:
    """The `reducio-jax` console script."""
    sys.exit(main(prog="reducio-jax"))


__all__ = ["COMMANDS", "console_script", "main", "run_command", "script"]
