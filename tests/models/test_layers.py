"""GroupNorm: its three formulations (the CPU's channel sums and grouped reduction, the GPU/TPU
`group_norm_lean` with its own backward pass) against a float64 NumPy GroupNorm, and their
gradients against each other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reducio_jax.models import layers
from reducio_jax.models.layers import GroupNorm

SHAPE = (2, 3, 5, 4, 64)  # (B, T, H, W, C), 32 groups of 2 channels


def _numpy_group_norm(x, scale, bias, groups, eps, silu):
    b, c = x.shape[0], x.shape[-1]
    grouped = x.astype(np.float64).reshape(b, -1, groups, c // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = grouped.var(axis=(1, 3), keepdims=True)
    out = ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias
    return out / (1 + np.exp(-out)) if silu else out


def _norm():
    rng = np.random.default_rng(1)
    with nnx.use_eager_sharding(False):
        norm = GroupNorm(SHAPE[-1], rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, SHAPE[-1]), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(size=SHAPE[-1]), jnp.float32)
    x = jnp.asarray(rng.normal(2.0, 3.0, SHAPE), jnp.float32)  # mean far from 0
    return norm, x


def _use_form(form, monkeypatch):
    """ "sums": the CPU's channel-sum form (at any size); "grouped": the CPU's grouped
    reduction (at any size); "lean": the accelerators' form (CPU forms switched off)."""
    monkeypatch.setenv("REDUCIO_JAX_CPU_CONV", "0" if form == "lean" else "1")
    monkeypatch.setattr(layers, "CHANNEL_SUMS_MIN_SIZE", 0 if form == "sums" else 1 << 60)


@pytest.mark.parametrize("form", ["sums", "grouped", "lean"])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_numpy(form, silu, monkeypatch):
    _use_form(form, monkeypatch)
    norm, x = _norm()
    want = _numpy_group_norm(
        np.asarray(x), np.asarray(norm.scale[...]), np.asarray(norm.bias[...]), 32, 1e-6, silu
    )
    np.testing.assert_allclose(norm(x, silu=silu), want, atol=2e-5, rtol=1e-5)


def test_group_norm_forms_have_the_same_gradients(monkeypatch):
    norm, x = _norm()
    cot = jnp.cos(x)

    graphdef, params = nnx.split(norm)

    def grads():
        def loss(x, params):
            return jnp.sum(nnx.merge(graphdef, params)(x, silu=True) * cot)

        dx, dparams = jax.grad(loss, (0, 1))(x, params)
        return [dx, dparams["scale"][...], dparams["bias"][...]]

    _use_form("sums", monkeypatch)
    cpu = grads()
    for form in ("grouped", "lean"):
        _use_form(form, monkeypatch)
        for got, want in zip(grads(), cpu, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=form)


def test_lean_form_is_what_an_accelerator_program_traces(monkeypatch):
    """Traced for a TPU on this CPU host (the `compile` command's case), GroupNorm takes the
    lean form (its forward and backward outputs are materialised behind optimization
    barriers, which no CPU form has)."""
    monkeypatch.setenv("REDUCIO_JAX_CPU_CONV", "1")
    norm, x = _norm()
    graphdef, params = nnx.split(norm)

    def loss(x):
        return jnp.sum(nnx.merge(graphdef, params)(x, silu=True))

    from reducio_jax.models.convolution import traced_for

    with traced_for("tpu"):
        tpu = str(jax.make_jaxpr(jax.grad(loss))(x))
    cpu = str(jax.make_jaxpr(jax.grad(loss))(x))
    assert tpu.count("optimization_barrier") == 2 and "optimization_barrier" not in cpu
