"""The model's kept executables (`reducio_jax/programs/compiled.py`): the program the memory
planner measured and chose is the one that runs (no second compile), the candidates it
rejected and its probes are not kept, and inside a user's `jax.jit` the op's jit is used."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import tiny
from reducio_jax import ReducioVAE
from reducio_jax.programs import lowering
from reducio_jax.programs.budget import RESERVE, process_status
from reducio_jax.programs.compiled import input_key


@pytest.fixture()
def vae() -> ReducioVAE:
    return ReducioVAE.from_config(tiny.get_config())  # its own executables


def _video(height: int = 32, width: int = 32) -> jax.Array:
    return jnp.linspace(-1, 1, 16 * height * width * 3).reshape(1, 16, height, width, 3)


def test_the_planned_program_is_the_one_that_runs(vae):
    plan = vae.plan_memory(32, 32, cap=1)
    assert plan.window_batch == 1 and vae.programs.compiles == 1
    assert len(vae.programs.executables()) == 1
    recon = vae.reconstruct(_video(), plan=plan)
    assert recon.shape == (1, 16, 32, 32, 3)
    assert vae.programs.compiles == 1  # the planner's executable ran
    vae.reconstruct(_video())
    assert vae.programs.compiles == 1  # the same shapes and tiling: the same executable


def test_rejected_candidates_and_probes_are_not_kept(vae):
    one, two = (vae.footprint("encode", b, (32, 32), None) for b in (1, 2))
    fresh = ReducioVAE.from_config(tiny.get_config())
    resident = fresh.programs.resident
    room = (one.need(resident) + two.need(resident)) // 2  # one window fits, two do not
    limit = (process_status("VmRSS") or 0) + RESERVE + room
    plan = fresh.plan_memory(32, 32, op="encode", cap=2, max_memory=limit)
    assert plan.window_batch == 1
    kept = fresh.programs.executables()
    assert [(key[0], key[3][0][0][0]) for key in kept] == [("encode", 1)]  # 2 was dropped
    fresh.programs.footprint("encode", 1, (64, 64), None, keep=False)  # a probe
    # the memory-minded schedule of the kept program: measured, never run, so not kept
    fresh.programs.footprint("encode", 1, (32, 32), None, schedule="memory")
    assert fresh.programs.executables() == kept


def test_an_array_and_its_abstract_shape_share_one_executable(vae):
    video = _video()
    abstract = jax.ShapeDtypeStruct(video.shape, video.dtype)
    assert input_key("encode", None, (video,)) == input_key("encode", None, (abstract,))
    assert input_key("encode", None, (video,)) != input_key("encode", None, (video[:, :8],))


def test_inside_a_users_jit_the_ops_jit_is_used(vae):
    video = _video()
    outside = vae.reconstruct(video)
    inside = jax.jit(lambda v: vae.reconstruct(v))(video)
    assert jnp.allclose(inside, outside, atol=1e-5)
    assert vae.programs.compiles == 1  # the jit compiled its own program, not an executable


def test_the_kept_programs_are_traced_without_remat_a_users_grad_keeps_it(vae):
    """The model recomputes its blocks in a backward pass (`model.remat`, on in the released
    configs); the executables the methods keep have no backward pass, so they are traced
    without it (cheaper to lower, the same program). A user's `jax.grad` through the op's jit
    keeps it."""
    assert vae.config.model.remat
    graphdef, state = nnx.split(vae.model)
    video = _video()

    def primitives(forward: bool) -> set[str]:
        traced = lowering.JITS["encode"].trace(graphdef, state, video, tiles=None, forward=forward)
        return {str(eqn.primitive) for eqn in _equations(traced.jaxpr.jaxpr)}

    remat = "remat2"  # jax.checkpoint's primitive
    assert remat in primitives(False) and remat not in primitives(True)
    grad = jax.grad(lambda v: jnp.sum(vae.encode(v).mean))(video)  # through the op's jit
    assert grad.shape == video.shape and bool(jnp.all(jnp.isfinite(grad)))


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)
