"""The CPU's chunked attention equals `jax.nn.dot_product_attention`, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reducio_jax.models import attention


def _qkv(n: int, m: int, heads: int, dim: int):
    keys = jax.random.split(jax.random.key(0), 3)
    return [
        jax.random.normal(key, (2, length, heads * dim), jnp.float32)
        for key, length in zip(keys, (n, m, m), strict=True)
    ]


def _spy_chunked(monkeypatch) -> list[int]:
    """The chunk sizes `multi_head_attention` calls `chunked_attention` with, in order."""
    calls = []
    real = attention.chunked_attention
    monkeypatch.setattr(attention, "chunked_attention", lambda *a: calls.append(a[-1]) or real(*a))
    return calls


def _reference(q, k, v, heads):
    split = lambda t: t.reshape(*t.shape[:2], heads, -1)  # noqa: E731
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    return out.reshape(q.shape)


@pytest.mark.parametrize("n, chunk", [(37, 8), (16, 16), (5, 8)])  # ragged, exact, one chunk
def test_chunked_attention_matches_dot_product_attention(n, chunk, monkeypatch):
    monkeypatch.setattr(attention, "CPU_QUERY_CHUNK", chunk)
    monkeypatch.setattr(attention, "CPU_CHUNKED_MIN_LOGITS", 0)
    q, k, v = _qkv(n, m=11, heads=2, dim=8)

    def ours(q, k, v):
        return attention.multi_head_attention(q, k, v, num_heads=2, fp32=True)

    calls = _spy_chunked(monkeypatch)
    np.testing.assert_allclose(ours(q, k, v), _reference(q, k, v, 2), atol=1e-5, rtol=1e-5)
    assert calls == [chunk]
    loss = lambda f: lambda *t: jnp.sum(jnp.sin(f(*t)))  # noqa: E731
    got = jax.grad(loss(ours), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda *t: _reference(*t, 2)), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "switch, min_logits, chunked", [("1", 12, True), ("0", 12, False), ("1", 13, False)]
)
def test_chunked_on_cpu_for_large_logits_unless_switched_off(
    switch, min_logits, chunked, monkeypatch
):
    monkeypatch.setenv("REDUCIO_JAX_CPU_CONV", switch)
    monkeypatch.setattr(attention, "CPU_CHUNKED_MIN_LOGITS", min_logits)
    q, k, v = _qkv(4, m=3, heads=1, dim=4)  # 12 logits per sample and head
    calls = _spy_chunked(monkeypatch)
    out = attention.multi_head_attention(q, k, v, num_heads=1, fp32=True)
    np.testing.assert_allclose(out, _reference(q, k, v, 1), atol=1e-5, rtol=1e-5)
    assert calls == ([attention.CPU_QUERY_CHUNK] if chunked else [])


def test_accelerators_chunk_and_recompute_large_attention(monkeypatch):
    """Traced for a TPU (the `compile` command's case on this host), attention with at least
    ACCEL_CHUNKED_MIN_LOGITS logits per head runs in recomputed query chunks: the same values
    and gradients as one dot_product_attention, and a remat in the program."""
    from reducio_jax.models.convolution import traced_for

    monkeypatch.setattr(attention, "ACCEL_CHUNKED_MIN_LOGITS", 37 * 11)
    monkeypatch.setattr(attention, "ACCEL_CHUNK_LOGITS", 8 * 11)  # chunks of 128 queries min
    q, k, v = _qkv(300, m=11, heads=2, dim=8)

    def ours(q, k, v):
        return attention.multi_head_attention(q, k, v, num_heads=2, fp32=True)

    loss = lambda f: lambda *t: jnp.sum(jnp.sin(f(*t)))  # noqa: E731
    with traced_for("tpu"):
        out = jax.jit(ours)(q, k, v)
        got = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
        program = str(jax.make_jaxpr(jax.grad(loss(ours), (0, 1, 2)))(q, k, v))
    np.testing.assert_allclose(out, _reference(q, k, v, 2), atol=1e-5, rtol=1e-5)
    want = jax.grad(loss(lambda *t: _reference(*t, 2)), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    assert "remat" in program or "checkpoint" in program
    assert "while" in program or "scan" in program  # 300 queries in chunks of 128
