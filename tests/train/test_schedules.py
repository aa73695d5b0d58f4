"""The optax schedules against the reference LambdaLinearScheduler / WarmupLR formulas."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reducio_jax.train import schedules


def ref_lambda_linear(n: int, warm, lengths, f_start, f_max, f_min) -> float:
    """The reference's per-step multiplier, written out in plain Python."""
    cum = [0] + list(itertools.accumulate(lengths))
    cycle = next(i for i, end in enumerate(cum[1:]) if n <= end)
    n = n - cum[cycle]
    if n < warm[cycle]:
        return (f_max[cycle] - f_start[cycle]) / warm[cycle] * n + f_start[cycle]
    return f_min[cycle] + (f_max[cycle] - f_min[cycle]) * (lengths[cycle] - n) / lengths[cycle]


def ref_warmup(n: int, factor: float, start: int, iters: int) -> float:
    if n < start:
        return factor
    if n < iters + start:
        alpha = float(n - start + 1) / iters
        return factor * (1 - alpha) + alpha
    return 1.0


LAMBDA_CASES = [
    dict(warm_up_steps=[0], cycle_lengths=[1_000_000], f_start=[1.0], f_max=[1.0], f_min=[0.01]),
    dict(warm_up_steps=[10], cycle_lengths=[100], f_start=[1e-6], f_max=[1.0], f_min=[0.1]),
    dict(
        warm_up_steps=[5, 3],
        cycle_lengths=[20, 30],
        f_start=[0.0, 0.2],
        f_max=[1.0, 0.8],
        f_min=[0.5, 0.1],
    ),
]


@pytest.mark.parametrize("cfg", LAMBDA_CASES)
def test_lambda_linear_matches_reference(cfg):
    total = sum(cfg["cycle_lengths"])
    steps = sorted({*range(0, min(total, 120) + 1), total // 2, total - 1, total})
    factor = jax.jit(jax.vmap(schedules.lambda_linear_factor(cfg)))
    got = np.asarray(factor(jnp.asarray(steps)))
    args = [cfg[k] for k in ("warm_up_steps", "cycle_lengths", "f_start", "f_max", "f_min")]
    want = np.array([ref_lambda_linear(n, *args) for n in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_lambda_linear_holds_after_last_cycle():
    cfg = LAMBDA_CASES[1]
    factor = schedules.lambda_linear_factor(cfg)
    np.testing.assert_allclose(float(factor(10_000)), cfg["f_min"][0], rtol=1e-6)


@pytest.mark.parametrize("factor,start,iters", [(0.1, 5000, 1000), (1 / 3, 1, 500), (0.5, 0, 7)])
def test_warmup_matches_reference(factor, start, iters):
    cfg = dict(
        warmup_factor=factor, warmup_start_iters=start, warmup_iters=iters, warmup_method="linear"
    )
    steps = sorted({0, 1, 2, start - 1, start, start + 1, start + iters // 2, start + iters - 1,
                    start + iters, start + iters + 1, 100_000} - {-1})  # fmt: skip
    got = np.asarray(jax.vmap(schedules.warmup_factor(cfg))(jnp.asarray(steps)))
    want = np.array([ref_warmup(n, factor, start, iters) for n in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_learning_rates_from_config():
    import configs.tiny as tiny

    cfg = tiny.get_config()
    lr_vae = schedules.vae_schedule(cfg.optim)
    lr_disc = schedules.disc_schedule(cfg.optim, cfg.loss)
    base = cfg.optim.base_learning_rate
    np.testing.assert_allclose(float(lr_vae(0)), base * 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(lr_vae(500_000)), base * (0.01 + 0.99 * 0.5), rtol=1e-6)
    d = cfg.loss.disc_loss_scale * base
    np.testing.assert_allclose(float(lr_disc(0)), d * 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(lr_disc(5499)), d * (0.1 * 0.5 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(float(lr_disc(7000)), d, rtol=1e-6)
