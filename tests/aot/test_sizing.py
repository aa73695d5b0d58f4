"""The ahead-of-time compile for a TPU topology (reducio_jax/aot/sizing.py, `python -m reducio_jax
compile`): the training step of a cut-down model compiled by libtpu's compile-only client for
a v5e:2x2 slice on this CPU host (one compile, through the command), and its encoder for the
batch search. Skipped only where
libtpu is not installed (`pip install -e ".[tpu]"`; CI installs it). The TPU compiler's time
grows with the number of distinct operations, so the micro model trains without LPIPS."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import pathlib
import pickle

import jax
import pytest

from reducio_jax import cli
from reducio_jax.aot import sizing, topologies
from reducio_jax.cli.compile import format_record
from reducio_jax.config import load_config
from reducio_jax.errors import InputError
from reducio_jax.programs import serialized

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed (pip install -e ".[tpu]")',
)
pytestmark = pytest.mark.xdist_group("aot")  # one worker: the module's compiles are shared
TOPOLOGY = "v5e:2x2"
MICRO = "tests/train/micro_config.py"


def _config(fsdp: int):
    cfg = load_config(MICRO)
    cfg.loss.perceptual_weight = 0.0
    cfg.mesh.shape = {"data": -1, "fsdp": fsdp}
    return cfg


@pytest.fixture(scope="module")
def devices():
    return topologies.tpu_devices(TOPOLOGY)


@pytest.fixture(scope="module")
def fsdp_command(tmp_path_factory) -> tuple[int, dict, pathlib.Path]:
    """The same on data=2 x fsdp=2, through the command: (exit status, its JSON record, the
    serialized step)."""
    out = tmp_path_factory.mktemp("aot")
    argv = ["compile", "--topology", TOPOLOGY, "--config", MICRO, "--fsdp", "2"]
    argv += ["--config.loss.perceptual_weight=0.0", "--json", str(out / "record.json")]
    status = cli.main([*argv, "--serialize", str(out / "step.bin")])
    return status, json.loads((out / "record.json").read_text())[0], out / "step.bin"


@needs_libtpu
def test_the_command_compiles_the_train_step_for_the_tpu(fsdp_command):
    status, r, _ = fsdp_command
    assert status == 0 and r["fits"] and not r["error"], r["error"]
    assert r["device_kind"] == "TPU v5 lite" and r["num_chips"] == 4
    assert r["mesh"] == {"data": 2, "fsdp": 2}
    assert r["program"] == "train_step" and r["batch_per_chip"] == 1
    assert r["hbm_bytes"] == topologies.HBM_BYTES["TPU v5 lite"]
    assert 0 < r["temp_bytes"] < r["total_bytes"] <= r["hbm_bytes"]
    assert r["flops_per_chip"] > 0 and r["compile_seconds"] > 0


@needs_libtpu
def test_the_serialized_tpu_step_names_its_chips(fsdp_command):
    """The TPU executable is written with its versions and chips; loading it on this host's
    CPUs is refused naming the platform, not attempted (tests/train/test_compiled_step.py
    loads a CPU one and trains with it)."""
    _, _, step = fsdp_command
    stored = pickle.loads(step.read_bytes())["environment"]
    assert stored["platform"] == "tpu" and stored["device_kind"] == "TPU v5 lite"
    assert stored["devices"] == 4 and stored["libtpu"] == importlib.metadata.version("libtpu")
    with pytest.raises(InputError, match="platform: 'tpu' in the file, 'cpu' here"):
        serialized.read(step, {}, jax.devices("cpu")[:4])


@needs_libtpu
def test_state_bytes_per_chip_shrink_with_fsdp(fsdp_command):
    """fsdp=2 halves every parameter and Adam moment whose sharded axis 2 divides; what the
    rules leave replicated (norm scales, the 3-channel convolutions' odd axes) stays whole.
    The compiler's own per-device arguments are that state and one clip, nothing more: read
    from the same step compiled for 4 CPU devices (the TPU's figures carry its layouts'
    padding; a CPU compile is a sixth of the TPU's time)."""
    _, fsdp, _ = fsdp_command
    cfg = _config(2)
    state = sizing.state_lib.abstract_state(cfg)
    full = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert full / 2 <= fsdp["state_bytes"] < 0.6 * full
    devices = topologies.cpu_devices("cpu:4")
    cpu = sizing.compile_program(cfg, "train_step", devices, topology="cpu:4")
    assert cpu.fits and cpu.mesh == {"data": 2, "fsdp": 2}
    assert cpu.state_bytes == fsdp["state_bytes"]
    clip = cfg.data.num_frames * cfg.data.resolution**2 * 3 * 4  # one float32 clip a device
    extra = cpu.argument_bytes - cpu.state_bytes
    assert 0 <= extra <= clip + 4096, (extra, clip)


@needs_libtpu
def test_find_batch_returns_a_batch_that_fits_and_the_next_does_not(devices):
    """On the encoder (a forward program: two quick compiles), judged against a limit between
    its totals at batch 1 and batch 2."""
    made: dict[int, sizing.CompileRecord] = {}

    def compile_at(batch: int) -> sizing.CompileRecord:
        if batch not in made:
            made[batch] = sizing.compile_program(
                _config(1), "encode", devices, batch_per_chip=batch, topology=TOPOLOGY
            )
        return made[batch]

    one, two = compile_at(1), compile_at(2)
    assert one.fits and not one.error and two.total_bytes > one.total_bytes
    assert one.device_kind == "TPU v5 lite" and one.num_chips == 4 and one.mesh["data"] == 4
    assert one.hbm_bytes == topologies.HBM_BYTES["TPU v5 lite"] and one.compile_seconds > 0
    assert "fits: total" in format_record(one)
    limit = (one.total_bytes + two.total_bytes) // 2
    best, tried = sizing.find_batch(lambda b: sizing.with_limit(compile_at(b), limit))
    by_batch = {r.batch_per_chip: r for r in tried}
    assert best == 1 and by_batch[1].fits and by_batch[1].total_bytes <= limit
    assert not by_batch[2].fits and by_batch[2].hbm_bytes == limit
    assert sizing.find_batch(lambda b: sizing.with_limit(compile_at(b), one.total_bytes - 1))[0] == 0


@needs_libtpu
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--topology", "v9x:2x2"], "is not GEN:AxB"),
        (["--topology", "v5e:3x3"], "libtpu cannot build topology"),
        (["--topology", TOPOLOGY, "--fsdp", "3"], "mesh shape"),
        (["--topology", TOPOLOGY, "--headroom", "1.5"], "--headroom"),
        (["--topology", TOPOLOGY, "--tile_batch", "2"], "--tile_batch 2"),
    ],
)
def test_bad_input_is_one_error_line(args, fragment, capsys):
    assert cli.main(["compile", *args, "--config", MICRO]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@needs_libtpu
def test_the_configs_tpu_options_reach_the_tpu_compiler(devices):
    """`train.tpu_compiler_options` go to the TPU compile of the step: a value libtpu refuses
    is an input error that names it (one `error:` line from the command). The CPU train tests
    run the same configs, whose TPU-only options the CPU compiler would refuse: they never
    reach it."""
    cfg = _config(1)
    cfg.train.tpu_compiler_options = {"xla_tpu_scheduler_percent_shared_memory_limit": "lots"}
    with pytest.raises(InputError, match="tpu_compiler_options.*lots"):
        sizing.compile_program(cfg, "train_step", devices, topology=TOPOLOGY)


def test_tile_batch_bounds_a_tiled_program():
    """`tile_batch` lowers a tiled reconstruct as the memory planner runs it, that many tiles
    of a shape at a time: fewer temporaries than all tiles at once (compiled here for this
    host's CPU, which needs no libtpu)."""
    from reducio_jax.sharding import make_mesh

    cfg = load_config(MICRO)  # the cut-down model: a quarter of the tiny one's compile
    cfg.model.use_tiling, cfg.model.tile_sample_min_size = True, 16
    cfg.data.resolution, cfg.data.batch_size, cfg.mesh.shape = 32, 1, {"data": 1}  # 2x2 tiles
    mesh = make_mesh(cfg.mesh, jax.devices("cpu")[:1])
    temps = {
        n: sizing._lower_inference(cfg, mesh, "reconstruct", n).compile().memory_analysis()
        for n in (None, 1)
    }
    assert 0 < temps[1].temp_size_in_bytes < temps[None].temp_size_in_bytes
