"""Reducio-VAE training losses: reconstruction + LPIPS, KL, brightness penalty, adaptive GAN.

A JAX port of the reference `LPIPSWithDiscriminator` (3D discriminator only). Videos are
channels-last (B, T, H, W, 3) in [-1, 1]. Everything here is a pure function; the networks
come in as callables, so the same code serves the training step and the parity test:

* `generator_grads(forward, params, x, lpips_fn, disc_fn, last_layer_grad, step, w)` ->
  gradients of the total generator loss with the adaptive GAN weight (the reference's
  `torch.autograd.grad` of nll and g on the decoder's last conv kernel) and every logged part;
* `discriminator_loss(logits_real, logits_fake, step, w)` -> the hinge (or vanilla) D loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from reducio_jax.models.convolution import target_platform

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The scalar settings of the loss: a config's `loss` block (defaults and meanings in
    `reducio_jax.config.get_default_config`), with `logvar` from its `logvar_init`."""

    kl_weight: float
    disc_weight: float
    rec_weight: float
    perceptual_weight: float
    penalty_weight: float
    penalty_radius: float
    disc_start: int
    disc_factor: float
    disc_loss: str
    use_adaptive_gan: bool
    loss_norm: str
    logvar: float
    warm_d_weight_steps: int
    perceptual_chunk: int = 0

    @classmethod
    def from_config(cls, loss_cfg: Mapping[str, Any], **overrides: Any) -> LossWeights:
        """From a config `loss` block; `overrides` (e.g. perceptual_weight=0.0) win."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: loss_cfg[k] for k in names if k in loss_cfg}
        if "logvar_init" in loss_cfg:
            values.setdefault("logvar", float(loss_cfg["logvar_init"]))
        values.update(overrides)
        weights = cls(**values)
        if weights.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(
                f"loss.disc_loss must be 'hinge' or 'vanilla', not {weights.disc_loss!r}"
            )
        if weights.loss_norm not in ("l1", "l2"):
            raise ValueError(f"loss.loss_norm must be 'l1' or 'l2', not {weights.loss_norm!r}")
        return weights


def disc_factor_at(step: Array | int, w: LossWeights) -> Array:
    """`disc_factor` from `disc_start` on, 0 before (the reference's `adopt_weight`)."""
    return jnp.where(jnp.asarray(step) < w.disc_start, 0.0, w.disc_factor).astype(jnp.float32)


def perceptual_per_frame(
    lpips_fn: Callable[[Array, Array], Array], x: Array, recon: Array, chunk: int = 0
) -> Array:
    """LPIPS of every frame pair: (B, T, H, W, 3) x2 -> (B, T).

    `chunk` > 0 on GPU/TPU: `chunk` frames of every clip at a time, each piece recomputed in
    the backward pass, so the VGG activations of B * chunk frames are alive at a time instead
    of those of all B * T frames (the released models at 256 px: 5.5 GiB per clip kept for the
    backward pass otherwise). The loop runs over the frame axis, so a batch sharded over
    devices stays sharded: each device computes its own clips' pieces (a loop over the batch
    axis would gather the global batch onto every device and compute all of it there). The
    CPU takes all frames at once (XLA:CPU runs convolutions inside a loop several times
    slower)."""
    b, t = x.shape[:2]
    if chunk <= 0 or chunk >= t or target_platform() == "cpu":
        frames = lambda v: v.reshape(b * t, *v.shape[2:])  # noqa: E731  (B*T, H, W, 3)
        return lpips_fn(frames(x), frames(recon)).astype(jnp.float32).reshape(b, t)
    pieces = -(-t // chunk)

    def split(v: Array) -> Array:  # (B, T, H, W, 3) -> (pieces, B * chunk, H, W, 3)
        v = jnp.concatenate([v, jnp.repeat(v[:, -1:], pieces * chunk - t, axis=1)], axis=1)
        v = v.reshape(b, pieces, chunk, *v.shape[2:]).swapaxes(0, 1)  # (pieces, B, chunk, ...)
        return v.reshape(pieces, b * chunk, *v.shape[3:])

    piece = jax.checkpoint(lambda pair: lpips_fn(*pair).astype(jnp.float32))
    per_frame = jax.lax.map(piece, (split(x), split(recon)))  # (pieces, B * chunk)
    per_frame = per_frame.reshape(pieces, b, chunk).swapaxes(0, 1)  # (B, pieces, chunk)
    return per_frame.reshape(b, pieces * chunk)[:, :t]


def reconstruction_terms(
    x: Array, recon: Array, p_frames: Array | None, w: LossWeights
) -> tuple[Array, Array, Array]:
    """(nll_loss, rec_loss, p_loss) scalars; `p_frames` (B, T) is the unweighted LPIPS or None.

    l1: per pixel `|x - recon| + perceptual_weight * LPIPS(frame)`, divided by exp(logvar) plus
    logvar, then averaged (the LPIPS of a frame is broadcast over its pixels and channels).
    """
    x, recon = x.astype(jnp.float32), recon.astype(jnp.float32)
    p = jnp.zeros(x.shape[:2], jnp.float32) if p_frames is None else w.perceptual_weight * p_frames
    if w.loss_norm == "l1":
        rec = jnp.abs(x - recon) + p[:, :, None, None, None]  # (B, T, H, W, C)
        rec_loss = jnp.mean(rec)
    else:
        rec_loss = jnp.mean(jnp.square(recon - x)) + jnp.mean(p)
    # mean(rec / e^lv + lv) == mean(rec) / e^lv + lv for the scalar logvar
    nll_loss = rec_loss / jnp.exp(w.logvar) + w.logvar
    return nll_loss, rec_loss, jnp.mean(p)


def penalty_loss(recon: Array, w: LossWeights) -> Array:
    """Brightness penalty: mean(relu(recon - mean_hw - radius * std_hw)) * penalty_weight.

    Statistics per (sample, frame, channel) over H and W; std unbiased (torch's default).
    """
    r = recon.astype(jnp.float32)  # (B, T, H, W, C)
    mean = jnp.mean(r, axis=(2, 3), keepdims=True)
    std = jnp.std(r, axis=(2, 3), keepdims=True, ddof=1)
    return jnp.mean(jax.nn.relu(r - mean - w.penalty_radius * std)) * w.penalty_weight


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    real = jnp.mean(jax.nn.softplus(-logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.softplus(logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def discriminator_loss(
    logits_real: Array, logits_fake: Array, step: Array | int, w: LossWeights
) -> tuple[Array, dict[str, Array]]:
    """disc_factor(step) * hinge/vanilla loss, and its logged parts."""
    fn = hinge_d_loss if w.disc_loss == "hinge" else vanilla_d_loss
    d_loss = disc_factor_at(step, w) * fn(logits_real, logits_fake)
    logs = {
        "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
        "logits_fake": jnp.mean(logits_fake.astype(jnp.float32)),
        "disc_loss": d_loss,
    }
    return d_loss, logs


def adaptive_weight(nll_grad: Array, g_grad: Array, w: LossWeights) -> Array:
    """|grad nll| / (|grad g| + 1e-4), clipped to [0, 1e4], times disc_weight (no gradient)."""
    ratio = jnp.linalg.norm(nll_grad.astype(jnp.float32)) / (
        jnp.linalg.norm(g_grad.astype(jnp.float32)) + 1e-4
    )
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * w.disc_weight)


def _fixed_gan_weight(step: Array, w: LossWeights) -> Array:
    """The non-adaptive weight, with the reference's optional linear warm-up after disc_start."""
    if w.warm_d_weight_steps <= 0:
        return jnp.asarray(w.disc_weight, jnp.float32)
    since = (step - w.disc_start).astype(jnp.float32)
    warm = (since + 1.0) / (w.warm_d_weight_steps + 1) * w.disc_weight
    return jnp.where(since < w.warm_d_weight_steps, warm, w.disc_weight).astype(jnp.float32)


def generator_grads(
    forward: Callable[[Any], tuple[tuple[Array, Array], Array]],
    params: Any,
    x: Array,
    lpips_fn: Callable[[Array, Array], Array] | None,
    disc_fn: Callable[[Array], tuple[Array, Any]],
    last_layer_grad: Callable[[Array, Array], Array],
    step: Array | int,
    w: LossWeights,
) -> tuple[Any, dict[str, Array], tuple[Array, Any]]:
    """Gradients of the generator loss with the adaptive GAN weight.

    forward(params) -> ((recon (B, T, H, W, 3), kl (B,)), features): the VAE, where
    `features` is the input of its last layer; `disc_fn(recon) -> (logits, disc_aux)`;
    `last_layer_grad(features, d_recon)` -> gradient of the last layer's kernel for a
    cotangent on `recon`. The loss is `rec_weight * nll + kl_weight * kl + penalty +
    d_weight * disc_factor * g` with `d_weight` from the last-layer gradients of nll and g, as
    the reference's `calculate_adaptive_weight`. Each network's backward runs once: the loss
    heads (LPIPS, D, penalty) are differentiated with respect to the reconstruction, then one
    VAE backward takes their weighted sum. Returns (grads, logs, (recon, disc_aux)).
    """
    step = jnp.asarray(step)
    (recon, kl), vae_pull, features = jax.vjp(forward, params, has_aux=True)

    def nll_fn(r: Array) -> tuple[Array, dict[str, Array]]:
        p_frames = None
        if lpips_fn is not None and w.perceptual_weight > 0:
            p_frames = perceptual_per_frame(lpips_fn, x, r, w.perceptual_chunk)  # (B, T)
        nll, rec, p = reconstruction_terms(x, r, p_frames, w)
        return nll, {"rec_loss": rec, "p_loss": p}

    def g_fn(r: Array) -> tuple[Array, Any]:
        logits, disc_aux = disc_fn(r)
        return -jnp.mean(logits.astype(jnp.float32)), disc_aux

    nll_loss, nll_pull, extra = jax.vjp(nll_fn, recon, has_aux=True)
    g_loss, g_pull, disc_aux = jax.vjp(g_fn, recon, has_aux=True)
    pen_loss, pen_pull = jax.vjp(lambda r: penalty_loss(r, w), recon)
    one = jnp.ones((), jnp.float32)
    d_nll, d_g, d_pen = nll_pull(one)[0], g_pull(one)[0], pen_pull(one)[0]
    nll_grad = last_layer_grad(features, d_nll)
    g_grad = last_layer_grad(features, d_g)
    d_weight = (
        adaptive_weight(nll_grad, g_grad, w) if w.use_adaptive_gan else _fixed_gan_weight(step, w)
    )
    factor = disc_factor_at(step, w)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    d_recon = w.rec_weight * f32(d_nll) + (d_weight * factor) * f32(d_g) + f32(d_pen)
    kl_loss = jnp.mean(kl.astype(jnp.float32))
    kl_cot = jnp.full(kl.shape, w.kl_weight / kl.shape[0], kl.dtype)  # d(kl_weight * mean) / d kl
    grads = vae_pull((d_recon.astype(recon.dtype), kl_cot))[0]
    total = w.rec_weight * nll_loss + w.kl_weight * kl_loss + d_weight * factor * g_loss + pen_loss
    logs = {
        "nll_loss": nll_loss,
        "g_loss": g_loss,
        "kl_loss": kl_loss,
        "penalty_loss": pen_loss,
        **extra,
        "total_loss_ae": total,
        "d_weight": d_weight,
        "disc_factor": factor,
        "nll_grads": jnp.linalg.norm(nll_grad.astype(jnp.float32)),
        "g_grads": jnp.linalg.norm(g_grad.astype(jnp.float32)),
        "weighted_g_loss": d_weight * factor * g_loss,
        "weighted_kl_loss": w.kl_weight * kl_loss,
    }
    return grads, logs, (recon, disc_aux)
