"""The reference's learning-rate schedules as optax schedules (step count -> learning rate).

`lambda_linear_schedule` is the VAE's `LambdaLinearScheduler` (cycles, each a linear warm-up
from f_start to f_max, then a linear decay from f_max towards f_min over the cycle length);
`warmup_schedule` is the discriminator's `WarmupLR` (a constant factor until
`warmup_start_iters`, then a linear ramp to 1 over `warmup_iters`). Both multiply a base
learning rate; the count is the number of optimizer updates done so far (the reference's
`LambdaLR` steps once per training step, so step s trains with factor f(s)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax


def _lists(cfg: Mapping[str, Any], *names: str) -> list[np.ndarray]:
    values = [np.asarray(cfg[n], np.float64).reshape(-1) for n in names]
    if len({v.size for v in values}) != 1:
        raise ValueError(f"scheduler lists {names} must have equal lengths")
    return values


def lambda_linear_factor(cfg: Mapping[str, Any]) -> optax.Schedule:
    """The LambdaLinearScheduler multiplier f(n).

    Cycle i covers counts (cum[i], cum[i+1]] (the reference's `n <= cum` test, so the first
    cycle also holds n = 0). Past the last cycle the reference fails; here the factor stays at
    the last cycle's end value (f_min).
    """
    warm, lengths, f_start, f_max, f_min = _lists(
        cfg, "warm_up_steps", "cycle_lengths", "f_start", "f_max", "f_min"
    )
    ends = np.cumsum(lengths)  # cum[1:]
    starts = np.concatenate([[0.0], ends[:-1]])

    def factor(count: jnp.ndarray) -> jnp.ndarray:
        n = jnp.asarray(count, jnp.float32)
        cycle = jnp.minimum(
            jnp.searchsorted(jnp.asarray(ends, jnp.float32), n, side="left"), ends.size - 1
        )
        pick = lambda a: jnp.asarray(a, jnp.float32)[cycle]  # noqa: E731
        local = jnp.minimum(n - pick(starts), pick(lengths))
        w = pick(warm)
        ramp = (pick(f_max) - pick(f_start)) / jnp.maximum(w, 1.0) * local + pick(f_start)
        decay = pick(f_min) + (pick(f_max) - pick(f_min)) * (pick(lengths) - local) / pick(lengths)
        return jnp.where(local < w, ramp, decay)

    return factor


def warmup_factor(cfg: Mapping[str, Any]) -> optax.Schedule:
    """The WarmupLR multiplier: warmup_factor before warmup_start_iters, then a linear ramp."""
    f0 = float(cfg["warmup_factor"])
    start = float(cfg["warmup_start_iters"])
    iters = float(cfg["warmup_iters"])
    method = cfg["warmup_method"]
    if method not in ("linear", "constant"):
        raise ValueError(
            f"scheduler_disc.warmup_method must be 'linear' or 'constant', not {method!r}"
        )

    def factor(count: jnp.ndarray) -> jnp.ndarray:
        n = jnp.asarray(count, jnp.float32)
        alpha = (n - start + 1.0) / max(iters, 1.0)
        ramp = f0 * (1.0 - alpha) + alpha if method == "linear" else jnp.full_like(n, f0)
        return jnp.where(n < start, f0, jnp.where(n < start + iters, ramp, 1.0))

    return factor


def vae_schedule(optim_cfg: Mapping[str, Any]) -> optax.Schedule:
    """Learning rate of the VAE: base_learning_rate * LambdaLinearScheduler."""
    base, factor = (
        float(optim_cfg["base_learning_rate"]),
        lambda_linear_factor(optim_cfg["scheduler"]),
    )
    return lambda count: base * factor(count)


def disc_schedule(optim_cfg: Mapping[str, Any], loss_cfg: Mapping[str, Any]) -> optax.Schedule:
    """Learning rate of the discriminator: disc_loss_scale * base_learning_rate * WarmupLR."""
    base = float(loss_cfg["disc_loss_scale"]) * float(optim_cfg["base_learning_rate"])
    factor = warmup_factor(optim_cfg["scheduler_disc"])
    return lambda count: base * factor(count)
