"""The CPU forms of 3D convolutions equal `lax.conv_general_dilated`, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from reducio_jax.models import convolution

DN = ("NDHWC", "DHWIO", "NDHWC")
SAME = [(1, 1)] * 3
DOWN = [(0, 1)] * 3  # the Downsample convolution's asymmetric padding

CASES = [  # (input shape, kernel shape, strides, padding, the form the dispatcher picks)
    ((2, 5, 8, 6, 16), (3, 3, 3, 16, 12), (1, 1, 1), SAME, "temporal_taps"),
    ((1, 6, 11, 10, 12), (3, 3, 3, 12, 12), (2, 2, 2), DOWN, "temporal_taps"),
    ((1, 4, 9, 8, 256), (3, 3, 3, 256, 256), (2, 2, 2), DOWN, "patches_matmul"),  # 4x4 out
    ((1, 6, 9, 8, 12), (3, 3, 3, 12, 12), (2, 2, 2), DOWN, "temporal_taps"),  # small kernel
    ((1, 4, 8, 10, 12), (1, 3, 3, 12, 12), (1, 2, 2), [(0, 0), (0, 1), (0, 1)], "temporal_taps"),
    ((2, 4, 2, 2, 256), (3, 3, 3, 256, 256), (1, 1, 1), SAME, "patches_matmul"),  # latent level
    ((1, 4, 6, 6, 16), (1, 1, 1, 16, 24), (1, 1, 1), [(0, 0)] * 3, "matmul"),
    ((2, 5, 8, 6, 3), (3, 3, 3, 3, 16), (1, 1, 1), SAME, "taps_as_channels"),
    ((1, 3, 128, 128, 16), (3, 3, 3, 16, 12), (1, 1, 1), SAME, "taps_as_channels"),  # narrow
    ((2, 5, 8, 6, 16), (3, 3, 3, 16, 3), (1, 1, 1), SAME, "output_taps"),
    ((1, 4, 7, 6, 8), (1, 3, 3, 8, 3), (1, 1, 1), [(0, 0), (1, 1), (1, 1)], "output_taps"),
    ((1, 5, 6, 7, 8), (3, 2, 3, 8, 2), (1, 1, 1), [(2, 0), (0, 1), (1, 2)], "output_taps"),
]


def _inputs(x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[:-1])), jnp.float32)
    return x, w


def _spy(fn, name, calls):
    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("x_shape, w_shape, strides, padding, form", CASES)
def test_cpu_forms_match_xla(x_shape, w_shape, strides, padding, form, monkeypatch):
    x, w = _inputs(x_shape, w_shape)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)

    def ours(x, w):
        return convolution.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)

    chosen = []
    for name in ("temporal_taps", "taps_as_channels", "output_taps", "patches_matmul"):
        monkeypatch.setattr(convolution, name, _spy(getattr(convolution, name), name, chosen))
    np.testing.assert_allclose(ours(x, w), ref(x, w), atol=2e-5, rtol=1e-5)
    assert chosen == ([] if form == "matmul" else [form])
    # No 3D convolution is left in the CPU graph.
    convs = [
        e for e in jax.make_jaxpr(ours)(x, w).eqns if e.primitive.name == "conv_general_dilated"
    ]
    assert all(len(e.params["dimension_numbers"].lhs_spec) == 4 for e in convs)
    # Gradients with respect to both operands agree too.
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for got, want in zip(
        jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        # float32 sums over every position: the error grows with the gradient's scale
        scale = max(1.0, float(jnp.max(jnp.abs(want))))
        np.testing.assert_allclose(got, want, atol=5e-5 * scale, rtol=1e-4)


CHUNKED = [  # (input shape, kernel shape, padding, the form), stride 1
    ((1, 5, 8, 6, 16), (3, 3, 3, 16, 12), SAME, "temporal_taps"),
    ((1, 5, 8, 6, 16), (3, 3, 3, 16, 12), [(0, 0), (1, 1), (1, 1)], "temporal_taps"),
    ((1, 5, 128, 128, 16), (3, 3, 3, 16, 12), SAME, "taps_as_channels"),
    ((2, 5, 9, 6, 16), (3, 3, 3, 16, 3), SAME, "output_taps"),
    ((1, 5, 7, 6, 8), (3, 2, 3, 8, 2), [(2, 0), (0, 1), (1, 2)], "output_taps"),
]


@pytest.mark.parametrize("budget", [1, 2, 4])  # the chunk in frames (rows): 1, then overlapping
@pytest.mark.parametrize("x_shape, w_shape, padding, form", CHUNKED)
def test_chunked_forms_match_xla(x_shape, w_shape, padding, form, budget, monkeypatch):
    """A few output frames (rows) at a time, through one loop, the last chunk overlapping the
    one before: the same values and gradients as the whole convolution."""
    x, w = _inputs(x_shape, w_shape)
    itemsize, kt, c_out = 4, w_shape[0], w_shape[-1]
    frame = {
        "temporal_taps": x_shape[0] * x_shape[2] * x_shape[3] * c_out * kt * itemsize,
        "taps_as_channels": x_shape[0] * x_shape[2] * x_shape[3] * x_shape[-1] * kt * itemsize,
    }
    if form == "output_taps":
        (t_lo, t_hi), _, (w_lo, w_hi) = padding
        taps = int(np.prod(w_shape[:3])) * c_out
        row = x_shape[0] * (x_shape[1] + t_lo + t_hi) * (x_shape[3] + w_lo + w_hi) * taps * 4
        monkeypatch.setattr(convolution, "OUTPUT_TAPS_BAND_BYTES", budget * row)
    else:
        monkeypatch.setattr(convolution, "CHUNK_BYTES", budget * frame[form])
    loops = []
    monkeypatch.setattr(convolution, "chunked", _spy(convolution.chunked, "chunked", loops))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (1, 1, 1), padding, dimension_numbers=DN)

    def ours(x, w):
        return getattr(convolution, form)(x, w, (1, 1, 1), padding)

    if form == "output_taps":
        ours = lambda x, w: convolution.output_taps(x, w, padding)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), ref(x, w), atol=2e-5, rtol=1e-5)
    assert loops == ["chunked"]
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for got, want in zip(
        jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        scale = max(1.0, float(jnp.max(jnp.abs(want))))
        np.testing.assert_allclose(got, want, atol=5e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize(
    "x_shape, w_shape, strides, form",
    [
        ((2, 4, 4, 256), (3, 3, 256, 256), (1, 1), "patches_matmul"),  # VGG's last block at 32 px
        ((1, 5, 4, 256), (3, 3, 256, 256), (2, 2), "patches_matmul"),
        ((2, 8, 8, 16), (3, 3, 16, 16), (1, 1), "plain"),  # XLA's own convolution
    ],
)
def test_2d_forms_match_xla(x_shape, w_shape, strides, form, monkeypatch):
    x, w = _inputs(x_shape, w_shape)
    pads, dn = [(1, 1), (1, 1)], ("NHWC", "HWIO", "NHWC")

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dn)

    def ours(x, w):
        return convolution.conv_general_dilated(x, w, strides, pads, dimension_numbers=dn)

    chosen = []
    monkeypatch.setattr(
        convolution, "patches_matmul", _spy(convolution.patches_matmul, "patches_matmul", chosen)
    )
    np.testing.assert_allclose(ours(x, w), ref(x, w), atol=2e-5, rtol=1e-5)
    assert chosen == ([] if form == "plain" else [form])
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for got, want in zip(
        jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        scale = max(1.0, float(jnp.max(jnp.abs(want))))
        np.testing.assert_allclose(got, want, atol=5e-5 * scale, rtol=1e-4)


def test_switch_off_keeps_the_plain_convolution(monkeypatch):
    monkeypatch.setenv("REDUCIO_JAX_CPU_CONV", "0")
    x, w = _inputs((1, 4, 6, 6, 8), (3, 3, 3, 8, 8))
    jaxpr = jax.make_jaxpr(
        lambda x, w: convolution.conv_general_dilated(x, w, (1, 1, 1), SAME, dimension_numbers=DN)
    )(x, w)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(eqn.params["dimension_numbers"].lhs_spec) == 5


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (2, 1, 1), (2, 2)])
def test_upsampled_conv_matches_upsample_then_conv(factors):
    spatial = len(factors)
    x, w = _inputs((2, *(3, 4, 5)[:spatial], 6), (3,) * spatial + (6, 5))
    dims = DN if spatial == 3 else ("NHWC", "HWIO", "NHWC")

    def ref(x, w):
        for axis, factor in enumerate(factors, start=1):
            x = jnp.repeat(x, factor, axis=axis)
        return lax.conv_general_dilated(
            x, w, (1,) * spatial, [(1, 1)] * spatial, dimension_numbers=dims
        )

    def ours(x, w):
        return convolution.upsampled_conv(x, w, factors)

    assert convolution.phases_apply(factors, w.shape, (1, 64, 64, 6))  # >= 64x64 upsampled
    want = ref(x, w)
    assert want.shape == (2, *(s * f for s, f in zip((3, 4, 5)[:spatial], factors, strict=True)), 5)
    np.testing.assert_allclose(ours(x, w), want, atol=2e-5, rtol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for got, exp in zip(
        jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        np.testing.assert_allclose(got, exp, atol=5e-5, rtol=1e-4)


def test_upsampled_conv_is_cpu_only_and_switchable(monkeypatch):
    x_shape = (1, 4, 32, 32, 4)  # upsampled to 64x64
    assert convolution.phases_apply((1, 2, 2), (3, 3, 3, 4, 4), x_shape)
    assert not convolution.phases_apply((1, 1, 1), (3, 3, 3, 4, 4), x_shape)  # no upsampling
    assert not convolution.phases_apply((1, 3, 3), (3, 3, 3, 4, 4), x_shape)  # only 1 and 2
    assert not convolution.phases_apply((1, 2, 2), (3, 3, 3, 4, 4), (1, 4, 16, 16, 4))  # small
    monkeypatch.setenv("REDUCIO_JAX_CPU_CONV", "0")
    assert not convolution.phases_apply((1, 2, 2), (3, 3, 3, 4, 4), x_shape)


@pytest.mark.parametrize("banded", [False, True])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(
    "x_shape, kt, t_pad",
    [((2, 5, 8, 6, 16), 3, (1, 1)), ((1, 4, 7, 9, 8), 3, (2, 0)), ((1, 3, 6, 10, 8), 1, (0, 0))],
)
def test_winograd_matches_float64_convolution(x_shape, kt, t_pad, m, banded, monkeypatch):
    """Any frame size (tiles cut at the edges), causal or symmetric temporal padding, kt 1 or 3,
    whole or one band of tile rows at a time: the error is float32 rounding grown by the
    transforms, far below the parity tolerances."""
    if banded:  # the smallest band: one tile row
        monkeypatch.setattr(convolution, "WINOGRAD_BAND_BYTES", 1)
        assert convolution.winograd_band_rows(x_shape[:2], 4, 12 * kt, m) == 1
    x, w = _inputs(x_shape, (kt, 3, 3, x_shape[-1], 12))
    want = lax.conv_general_dilated(
        np.asarray(x, np.float64), np.asarray(w, np.float64), (1, 1, 1), [t_pad, (1, 1), (1, 1)],
        dimension_numbers=DN,
    )  # fmt: skip
    got = convolution.winograd(x, w, t_pad, m)
    bound = {2: 2e-6, 4: 2e-5}[m] * float(np.max(np.abs(want)))
    assert got.shape == want.shape
    assert float(np.max(np.abs(np.asarray(got, np.float64) - want))) < bound


def test_winograd_chosen_for_large_frames_with_direct_gradients(monkeypatch):
    x, w = _inputs((1, 3, 32, 32, 256), (3, 3, 3, 256, 32))
    chosen = []
    monkeypatch.setattr(
        convolution, "winograd_conv", _spy(convolution.winograd_conv, "winograd", chosen)
    )

    def ours(x, w):
        return convolution.conv_general_dilated(x, w, (1, 1, 1), SAME, dimension_numbers=DN)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (1, 1, 1), SAME, dimension_numbers=DN)

    np.testing.assert_allclose(ours(x, w), ref(x, w), atol=2e-4, rtol=1e-4)
    assert chosen == ["winograd"]
    # The gradients are the direct form's: as close to XLA's as the other forms'.
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for got, want in zip(
        jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w), strict=True
    ):
        np.testing.assert_allclose(got, want, atol=5e-4, rtol=1e-3)
    # Below the size gate (the test suite's and the demo's 32 px models) the direct forms stay.
    chosen.clear()
    ours(x[..., :64], w[:, :, :, :64])
    assert chosen == []


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("rows_per_band", [1, 2, 4])
def test_winograd_bands_between_the_edges_go_through_one_loop(m, rows_per_band, monkeypatch):
    """First band, the loop over the bands between, and a shorter last band: the result is the
    convolution's, and the program is as large for a frame 4x taller (its size, and XLA's
    compile of it, do not grow with the frame)."""
    kt, t_pad, tiles_w = 3, (1, 1), 3
    row_bytes = (m + 2) ** 2 * 1 * 5 * tiles_w * kt * 12 * 4
    monkeypatch.setattr(convolution, "WINOGRAD_BAND_BYTES", rows_per_band * row_bytes)
    sizes = {}
    for height in (23, 95):
        x, w = _inputs((1, 3, height, m * tiles_w - 1, 8), (kt, 3, 3, 8, 12))
        assert convolution.winograd_band_rows((1, 5), tiles_w, kt * 12, m) == rows_per_band
        want = lax.conv_general_dilated(
            np.asarray(x, np.float64), np.asarray(w, np.float64), (1, 1, 1),
            [t_pad, (1, 1), (1, 1)], dimension_numbers=DN,
        )  # fmt: skip
        got = convolution.winograd(x, w, t_pad, m)
        bound = {2: 2e-6, 4: 2e-5}[m] * float(np.max(np.abs(want)))
        assert float(np.max(np.abs(np.asarray(got, np.float64) - want))) < bound
        jaxpr = jax.make_jaxpr(lambda x, w: convolution.winograd(x, w, t_pad, m))(x, w)
        sizes[height] = len(str(jaxpr).splitlines())
    assert sizes[23] == sizes[95]
