"""Attention: the mid-block self-attention and the motion-to-content cross-attention fusion.

Both run `jax.nn.dot_product_attention` on `(batch, tokens, heads, head_dim)`. With
`fp32_attention` (the reference default) queries, keys and values are cast to float32 first;
`attention_impl="cudnn"` asks for cuDNN flash attention on NVIDIA GPUs (bf16/fp16 only).

On the CPU (chosen at trace time, off with `REDUCIO_JAX_CPU_CONV=0` like the convolution
forms), float32 attention with at least `CPU_CHUNKED_MIN_LOGITS` logits per sample and head
runs `chunked_attention` instead: `CPU_QUERY_CHUNK` queries at a time, each row's softmax
normalised after the values' matmul. The tiny model's fusion at 256 px has 65536 x 4096
queries x keys, 1 GiB of logits in one piece; in chunks of 8 MiB its forward ran 2.9 s -> 0.7 s
and its gradient 19 s -> 4.4 s (benchmarks/RESULTS.md).

On accelerators (GPU, TPU) attention with at least `ACCEL_CHUNKED_MIN_LOGITS` logits per
sample and head runs `chunked_attention` with each chunk rematerialised: the backward pass
recomputes a chunk's logits instead of keeping them. The released models' fusion at 256 px has
1.2 G float32 logits per clip; kept for the backward pass (the softmax and its exp) they were
9.1 GiB of the 21 GiB a v5e chip needed per clip for training (`python -m reducio_jax compile`,
docs/training.md); in chunks of `ACCEL_CHUNK_LOGITS` they are recomputed, only q, k and v stay.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from reducio_jax.models.convolution import cpu_forms_enabled
from reducio_jax.models.layers import Buffer, Dtype, GroupNorm, LayerNorm, dense

CPU_QUERY_CHUNK = 512  # queries per step of chunked_attention (logits of 512 x keys at a time)
# chunked_attention from this many logits per sample and head (16 MiB of float32); smaller
# attention keeps jax.nn.dot_product_attention, whose graph compiles faster
CPU_CHUNKED_MIN_LOGITS = 1 << 22
# GPU/TPU: chunked (and rematerialised) from this many logits per sample and head (64 MiB of
# float32), queries per chunk such that a chunk has at most ACCEL_CHUNK_LOGITS per sample and head
ACCEL_CHUNKED_MIN_LOGITS = 1 << 24
ACCEL_CHUNK_LOGITS = 1 << 22


def multi_head_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    num_heads: int,
    fp32: bool,
    implementation: str | None = None,
) -> jax.Array:
    """Softmax attention with scale 1/sqrt(head_dim). q: (B, N, D), k/v: (B, M, D) -> (B, N, D)."""
    out_dtype = q.dtype
    if fp32:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        implementation = None if implementation == "cudnn" else implementation
    split = lambda t: rearrange(t, "b n (h d) -> b n h d", h=num_heads)  # noqa: E731
    q, k, v = split(q), split(k), split(v)  # (B, N|M, heads, head_dim)
    logits = q.shape[1] * k.shape[1]  # per sample and head
    cpu = cpu_forms_enabled()
    if (
        implementation is None
        and q.dtype == jnp.float32
        and logits >= CPU_CHUNKED_MIN_LOGITS
        and cpu
    ):
        out = chunked_attention(q, k, v, CPU_QUERY_CHUNK)
    elif implementation is None and logits >= ACCEL_CHUNKED_MIN_LOGITS and not cpu:
        chunk = max(ACCEL_CHUNK_LOGITS // k.shape[1], 128)
        out = chunked_attention(q, k, v, chunk, remat=True)
    else:
        out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return rearrange(out, "b n h d -> b n (h d)").astype(out_dtype)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, each row divided by its weights' sum after the matmul with v.
    q: (B, N, H, D), k/v: (B, M, H, D) -> (B, N, H, D)."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q * (q.shape[-1] ** -0.5), k)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # (B, H, N, M)
    out = jnp.einsum("bhnm,bmhd->bnhd", weights, v)
    return out / jnp.moveaxis(jnp.sum(weights, axis=-1), 1, 2)[..., None]


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, chunk: int, *, remat: bool = False
) -> jax.Array:
    """`softmax_attention` over `chunk` queries at a time (zero-padded to a multiple); with
    `remat` each chunk's logits are recomputed in the backward pass instead of kept."""
    b, n, heads, dim = q.shape
    attend = jax.checkpoint(softmax_attention) if remat else softmax_attention
    if n <= chunk:
        return attend(q, k, v)
    chunks = -(-n // chunk)
    q = jnp.pad(q, ((0, 0), (0, chunks * chunk - n), (0, 0), (0, 0)))
    q = jnp.moveaxis(q.reshape(b, chunks, chunk, heads, dim), 1, 0)  # (chunks, B, chunk, H, D)
    out = jax.lax.map(lambda q_chunk: attend(q_chunk, k, v), q)
    return jnp.moveaxis(out, 0, 1).reshape(b, chunks * chunk, heads, dim)[:, :n]


def pad_to_multiple(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Zero-pads the H and W axes of `(B, [T,] H, W, C)` at the bottom/right to window multiples."""
    h, w = x.shape[-3], x.shape[-2]
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    if not (pad_h or pad_w):
        return x
    widths = [(0, 0)] * (x.ndim - 3) + [(0, pad_h), (0, pad_w), (0, 0)]
    return jnp.pad(x, widths)


def partition_windows(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """(B, [T,] H, W, C) with H, W window multiples -> (B * windows, [T *] wh * ww, C)."""
    if x.ndim == 4:
        return rearrange(x, "b (h wh) (w ww) c -> (b h w) (wh ww) c", wh=window[0], ww=window[1])
    return rearrange(x, "b t (h wh) (w ww) c -> (b h w) (t wh ww) c", wh=window[0], ww=window[1])


def merge_windows(x: jax.Array, window: tuple[int, int], shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `partition_windows` for a padded array of `shape` (B, [T,] Hp, Wp, C)."""
    nh, nw = shape[-3] // window[0], shape[-2] // window[1]
    if len(shape) == 4:
        return rearrange(x, "(b h w) (wh ww) c -> b (h wh) (w ww) c", h=nh, w=nw, wh=window[0])
    return rearrange(
        x, "(b h w) (t wh ww) c -> b t (h wh) (w ww) c", h=nh, w=nw, wh=window[0], ww=window[1]
    )


class SelfAttention(nnx.Module):
    """GroupNorm, then multi-head self-attention over all positions, residual.

    The reference's single-layer "memory-efficient" block: q/k/v/out are 1x1 convolutions (here
    dense layers over channels) and the channels are split into `num_heads` (8) heads. Frames
    larger than `window_size` positions attend within zero-padded windows, as the reference does.
    """

    def __init__(
        self,
        features: int,
        *,
        num_heads: int = 8,
        window_size: tuple[int, int] = (256, 256),
        fp32_attention: bool = True,
        attention_impl: str | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(features, **kw)
        self.q = dense(features, features, axes=("embed", "heads"), **kw)
        self.k = dense(features, features, axes=("embed", "heads"), **kw)
        self.v = dense(features, features, axes=("embed", "heads"), **kw)
        self.proj_out = dense(features, features, axes=("heads", "embed"), **kw)
        self.num_heads = num_heads
        self.window_size = tuple(window_size)
        self.fp32_attention = fp32_attention
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: (B, [T,] H, W, C)
        h = self.norm(x)
        height, width = x.shape[-3], x.shape[-2]
        windowed = height * width > self.window_size[0] * self.window_size[1]
        if windowed:
            h = pad_to_multiple(h, self.window_size)
            padded_shape = h.shape
            tokens = partition_windows(h, self.window_size)  # (B*nW, [T*]wh*ww, C)
        else:
            tokens = h.reshape(h.shape[0], -1, h.shape[-1])  # (B, [T*]H*W, C)
        out = multi_head_attention(
            self.q(tokens),
            self.k(tokens),
            self.v(tokens),
            num_heads=self.num_heads,
            fp32=self.fp32_attention,
            implementation=self.attention_impl,
        )
        if windowed:
            out = merge_windows(out, self.window_size, padded_shape)[..., :height, :width, :]
        out = self.proj_out(out.reshape(x.shape))
        return x + out


def sinusoid_table(length: int, dim: int) -> np.ndarray:
    """The fixed table: angle pos / 10000**(2*(j//2)/dim); sin on even j, cos on odd j."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    j = np.arange(dim)[None, :]
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle))


class CrossAttention(nnx.Module):
    """Multi-head attention from motion tokens (queries) to 2D content tokens (keys/values)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        *,
        heads: int,
        dim_head: int,
        window_size: tuple[int, int],
        fp32_attention: bool = True,
        attention_impl: str | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = dense(query_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_k = dense(context_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_v = dense(context_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_out = dense(inner, query_dim, axes=("heads", "embed"), **kw)
        self.heads = heads
        self.window_size = tuple(window_size)
        self.fp32_attention = fp32_attention
        self.attention_impl = attention_impl

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # x: (B, T, H, W, C) motion; context: (B, H', W', Cc) content -> (B, T*H*W, C)
        (b, t, height, width, _), (ctx_h, ctx_w) = x.shape, context.shape[1:3]
        ws = self.window_size
        windowed = ctx_h * ctx_w > ws[0] * ws[1] and height * width >= ws[0] * ws[1]
        if windowed:
            motion_ws = (math.ceil(ws[0] * height / ctx_h), math.ceil(ws[1] * width / ctx_w))
            context = partition_windows(pad_to_multiple(context, ws), ws)
            x = pad_to_multiple(x, motion_ws)
            padded_shape = x.shape
            x = partition_windows(x, motion_ws)  # (B*nW, T*mh*mw, C)
        else:
            x = x.reshape(b, -1, x.shape[-1])  # (B, T*H*W, C)
            context = context.reshape(b, -1, context.shape[-1])  # (B, H'*W', Cc)
        out = multi_head_attention(
            self.to_q(x),
            self.to_k(context),
            self.to_v(context),
            num_heads=self.heads,
            fp32=self.fp32_attention,
            implementation=self.attention_impl,
        )
        if windowed:
            out = merge_windows(out, motion_ws, padded_shape)[:, :, :height, :width]
            out = out.reshape(b, t * height * width, -1)
        return self.to_out(out)


class ContentFusion(nnx.Module):
    """Adds the temporal sinusoid embedding, then a residual cross-attention to the content.

    x: (B, T, H, W, C) motion features; context: (B, H', W', Cc) content features of the middle
    frame. Output has the shape of x. (The reference's `BasicTransformerBlock`, LayerNorm type.)
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        temporal_length: int,
        *,
        dim_head: int = 64,
        window_size: tuple[int, int] = (256, 256),
        fp32_attention: bool = True,
        attention_impl: str | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        heads = max(dim // dim_head, 1)
        self.attn = CrossAttention(
            dim,
            context_dim,
            heads=heads,
            dim_head=dim_head,
            window_size=window_size,
            fp32_attention=fp32_attention,
            attention_impl=attention_impl,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        table = sinusoid_table(temporal_length, dim).astype(np.float32)
        self.pos_embed = Buffer(jnp.asarray(table, param_dtype))  # (T, C)
        self.dtype = dtype

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        t = x.shape[1]
        if t != self.pos_embed.shape[0]:
            raise ValueError(
                f"ContentFusion: motion features have {t} frames but the temporal embedding was "
                f"built for {self.pos_embed.shape[0]}; use clips of the configured length (temp_res)"
            )
        x = (x + self.pos_embed[...][None, :, None, None, :]).astype(self.dtype)  # (B, T, H, W, C)
        out = self.attn(self.norm(x), context)  # (B, T*H*W, C)
        return x + out.reshape(x.shape)
