"""`python -m reducio_jax COMMAND`: the command list, each command's --help, bad input in one
line with exit status 2, the `--config` flag (every form `load_config` reads, with overrides)
and the `reducio-jax` console script."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
import yaml
from absl import flags
from helpers import run_probe

from reducio_jax import cli
from reducio_jax.cli import shared_flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _python(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def _one_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_top_level_help_lists_every_command():
    result = _python("-m", "reducio_jax", "--help")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.split("commands:\n")[1].splitlines()[:8]]
    assert listed == list(cli.COMMANDS)
    assert set(listed) == {
        "train", "eval", "convert", "encode", "decode", "export", "reconstruct", "compile"
    }  # fmt: skip


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_command_help_lists_its_flags(capsys, command):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m reducio_jax {command} ")
    defined = flags.FlagValues()
    importlib.import_module(f"reducio_jax.cli.{command}").define(defined, ["x"])
    for name in defined:
        spelled = f"--[no]{name}" if defined[name].boolean else f"--{name}"
        assert f"  {spelled}\n" in out, name
        assert defined[name].help.split()[0] in out


def test_unknown_command_is_one_line(capsys):
    line = _one_error(capsys, ["trian", "--config", TINY])
    assert "unknown command 'trian'" in line and "train" in line


def test_unknown_command_exit_status():
    result = _python("-m", "reducio_jax", "frobnicate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.splitlines() if line.startswith("error: unknown command")
    ]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["encode", "--num_clips", "abc"], "--num_clips=abc"),
        (["eval", "--resolution", "64x"], "'64x' is not N or HxW"),
        (["decode", "--devices", "0"], "--devices=0"),
        (["export", "--step=1.5"], "--step=1.5"),
        (["encode", "--frames", "8"], "Unknown command line flag 'frames'"),
        (["train", "--config", TINY, "--config.data.fps=fast"], "--config.data.fps=fast"),
        (["train", "--config", "missing.py"], "config file missing.py does not exist"),
        (["encode", "--data", "synthetic"], "--checkpoint, --out are required"),
        (["reconstruct", "only_input.mp4", "--checkpoint", TINY], "INPUT and OUTPUT"),
    ],
)
def test_bad_flag_value_is_one_line(capsys, argv, expected):
    assert expected in _one_error(capsys, argv)


def test_old_progress_spelling_still_parses(capsys):
    """`--no_progress` (the old spelling) means `--noprogress`: parsing goes on to the next
    problem, the missing required flags."""
    assert "are required" in _one_error(capsys, ["encode", "--no_progress"])


def test_scripts_take_the_same_flags():
    result = _python("eval.py", "--num_clips", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: flag --num_clips=x: invalid literal for int() with base 10: 'x'"
    ]


def _parse_config(argv: list[str]):
    fv = flags.FlagValues()
    shared_flags.define_config(fv, ["prog", *argv])
    fv(["prog", *argv])
    return fv["config"].value


def test_config_flag_reads_python_yaml_and_json_with_overrides(tmp_path, fixtures_dir):
    official = json.loads((fixtures_dir / "configs.json").read_text())["tiny"]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": {"params": official}}))
    (tmp_path / "tiny.json").write_text(json.dumps(official))
    from_py = _parse_config(["--config", TINY])
    for path in (tmp_path / "tiny.yaml", tmp_path / "tiny.json"):
        cfg = _parse_config(["--config", str(path), "--config.model.embed_dim=8"])
        assert cfg.model.embed_dim == 8 and official["embed_dim"] != 8
        assert cfg.model.ddconfig.to_dict() == from_py.model.ddconfig.to_dict()


def test_config_file_argument(tmp_path):
    """`FILE.py:ARG` calls get_config("ARG"), as config_flags does."""
    path = tmp_path / "sized.py"
    path.write_text(
        "from reducio_jax.config import get_default_config\n"
        "def get_config(size='32'):\n"
        "    cfg = get_default_config()\n"
        "    cfg.data.resolution = int(size)\n"
        "    return cfg\n"
    )
    assert _parse_config(["--config", f"{path}:96"]).data.resolution == 96
    assert _parse_config(["--config", str(path)]).data.resolution == 32


def test_console_script_runs_the_same_main():
    """pyproject.toml's `reducio-jax` entry point resolves and runs `python -m reducio_jax`."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, attr = scripts["reducio-jax"].split(":")
    assert getattr(importlib.import_module(module), attr) is cli.console_script
    launcher = (
        f"import sys; from {module} import {attr}; sys.argv = ['reducio-jax', *sys.argv[1:]]; "
        f"{attr}()"
    )
    help_text = _python("-c", launcher, "--help")
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: reducio-jax COMMAND")
    unknown = _python("-c", launcher, "frobnicate")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown command")


def _documented_commands() -> list[list[str]]:
    """Every command line in the code blocks of README.md and docs/*.md that runs one of the
    commands (continuation lines joined, `[...]` optional parts kept, comments dropped)."""
    import re
    import shlex

    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks, inside = [""], False
        for line in doc.read_text().splitlines(keepends=True):
            if line.startswith("```"):
                inside = not inside
                blocks.append("")
            elif inside:
                blocks[-1] += line
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                if not re.match(
                    r"python (train|eval|convert_torch_weights)\.py|python -m reducio_jax ", line
                ):
                    continue
                words = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
                if words[:2] in (["python", "train.py"], ["python", "eval.py"]):
                    found.append([words[1].removesuffix(".py"), *words[2:]])
                elif words[:2] == ["python", "convert_torch_weights.py"]:
                    found.append(["convert", *words[2:]])
                elif words[:3] == ["python", "-m", "reducio_jax"]:
                    found.append(words[3:])
    return found


def test_documented_commands_parse():
    """The commands README.md and docs/ show are commands with flags that exist and parse."""
    documented = _documented_commands()
    assert {argv[0] for argv in documented} >= {"train", "eval", "convert", "encode", "decode"}
    for command, *args in documented:
        if command == "--help" or "--help" in args:
            continue
        assert command in cli.COMMANDS, command
        fv = flags.FlagValues()
        argv = [command, *[cli.OLD_SPELLINGS.get(a, a) for a in args]]
        importlib.import_module(f"reducio_jax.cli.{command}").define(fv, argv)
        fv(argv)  # raises on an unknown flag or a bad value


# Runs a command on bad input (it stops inside the command), then one computation, and prints
# how many heaps glibc holds: 1 when the command set one heap before JAX started.
HEAPS_AFTER_COMMAND = """
import sys
import jax.numpy as jnp
from reducio_jax.cli import run_command
from reducio_jax.programs import allocator
assert run_command(sys.argv[1], ["only-one-argument"], "probe") == 2
jnp.ones((512, 512)).sum().block_until_ready()
print(allocator.heap_count())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_info")
@pytest.mark.parametrize("command,one_heap", [("reconstruct", True), ("train", False)])
def test_inference_commands_share_one_heap(command, one_heap):
    heaps = int(run_probe(HEAPS_AFTER_COMMAND, command, REDUCIO_JAX_MALLOC="1"))
    assert (heaps == 1) == one_heap
