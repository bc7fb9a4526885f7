"""The decode matrix-vector kernels against their references (interpret mode on CPU, compiled on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import summed_partials

from pallas_kernels.gemv import gemv, gemv_geglu
from pallas_kernels.reference import gemv_geglu_reference, gemv_reference

INTERPRET = jax.default_backend() != "gpu"


def _inputs(b, n, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k)) * k**-0.5, dtype)
    return x, w


@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("n,k,block_n,splits", [(64, 640, 2, 1), (48, 2560, 16, 4), (96, 320, 4, 2), (8, 48, 8, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemv(b, n, k, block_n, splits, dtype):
    """K as power-of-two pieces (640 = 512 + 128, 320 = 256 + 64, 48 split 3 ways = 16 each); partial sums when
    split; float32 products, so only the summation order and the final rounding differ from the reference."""
    x, w = _inputs(b, n, k, dtype, seed=n + k)
    got = gemv(x, w, block_n=block_n, splits=splits, interpret=INTERPRET)
    want = gemv_reference(x, w)
    got = summed_partials(got, splits, b, n, dtype)
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -7
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float32) / scale, np.asarray(want) / scale, atol=tol)


@pytest.mark.parametrize("b,f,k,block_n", [(1, 64, 640, 1), (2, 32, 48, 4), (8, 16, 2560, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemv_geglu(b, f, k, block_n, dtype):
    x, w = _inputs(b, 2 * f, k, dtype, seed=f)
    got = gemv_geglu(x, w, block_n=block_n, interpret=INTERPRET)
    want = gemv_geglu_reference(x, w)
    assert got.shape == (b, f) and got.dtype == dtype
    g, r = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    else:  # same roundings: equal but for one-ulp flips from the summation order (or native bf16 arithmetic)
        np.testing.assert_allclose(g, r, rtol=2 ** -6, atol=2 ** -7 * np.abs(r).max())
        # Both paths against float32 products without roundings: gate, up, gelu and the product are each rounded
        # once (eps/2), one of them amplified up to ~1.2x by gelu's relative slope, ~2.1 eps; allow 2.5 eps.
        eps = float(jnp.finfo(dtype).eps)
        r32 = np.asarray(gemv_geglu_reference(x.astype(jnp.float32), w.astype(jnp.float32)), np.float64)
        for name, y in (("kernel", g), ("reference", r)):
            err = np.abs(y - r32).max() / np.abs(r32).max()
            assert err <= 2.5 * eps, f"{name}: {err / eps:.2f} eps from float32"
    # the halves are not swapped: gelu acts on the gate (first) rows
    swapped = gemv_geglu_reference(x, jnp.concatenate([w[f:], w[:f]]))
    assert not np.allclose(np.asarray(swapped, np.float32), r)


def test_bad_inputs_name_the_value():
    x, w = _inputs(1, 64, 640, jnp.float32)
    with pytest.raises(ValueError, match="block_n must be"):
        gemv(x, w, block_n=3, interpret=True)
    with pytest.raises(ValueError, match="splits must divide"):
        gemv(x, w, splits=3, interpret=True)
    with pytest.raises(ValueError, match=r"x must be \[B, K\]"):
        gemv(x[:, :320], w, interpret=True)
    with pytest.raises(ValueError, match="gemv takes 1..16 rows"):
        gemv(jnp.zeros((17, 640)), w, interpret=True)
    with pytest.raises(ValueError, match="share a dtype"):
        gemv(x.astype(jnp.bfloat16), w, interpret=True)


# ---- 8-bit weights with a float32 scale per row ------------------------------------------------------------

WDTYPES = [jnp.int8, jnp.float8_e4m3fn]


def _quantized(n, k, wdtype, seed):
    """(q [N, K] in ``wdtype``, scale [N] f32). The scales are distinct and spread over three orders of magnitude
    (times 1 / the rms of a row's product with a unit-normal x, so the scaled products are ~0.01..10, where gelu is
    neither linear nor zero): a scale ignored, or taken from another row, moves the result far outside the
    tolerances below (each test checks that too)."""
    rng = np.random.default_rng(seed)
    if wdtype == jnp.int8:
        q = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    else:
        q = jnp.asarray(np.clip(rng.standard_normal((n, k)) * 64, -448, 448), jnp.float8_e4m3fn)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(q.astype(jnp.float32))) * k))
    scale = jnp.asarray(10.0 ** rng.uniform(-2, 1, n) / rms, jnp.float32)
    return q, scale


def _close(got, want, col_scale, tol):
    """Whether got and want agree to ``tol`` times the largest |want| once each column is divided by its scale
    (so columns with small scales count as much as those with large ones)."""
    g = np.asarray(got, np.float64) / np.asarray(col_scale, np.float64)
    r = np.asarray(want, np.float64) / np.asarray(col_scale, np.float64)
    return bool(np.all(np.abs(g - r) <= tol * np.abs(r).max()))


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n,k,block_n,splits", [(64, 640, 4, 1), (32, 2560, 8, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_gemv_quantized(b, n, k, block_n, splits, dtype, wdtype):
    """8-bit w converted to f32 exactly and the f32 sum scaled: against the dequantize-then-f32 product only the
    summation order, the scale's place (on the sum, not each weight) and the final rounding differ; the tolerance
    is the result's dtype (f32 partial sums when split, even for bf16 x)."""
    x, _ = _inputs(b, 1, k, dtype, seed=n + k)
    q, scale = _quantized(n, k, wdtype, seed=n + k + 1)
    got = gemv(x, q, scale, block_n=block_n, splits=splits, interpret=INTERPRET)
    want = gemv_reference(x, q, scale)
    got = summed_partials(got, splits, b, n, dtype)
    tol = 1e-5 if got.dtype == jnp.float32 else 2 ** -7
    assert _close(got, want, scale, tol)
    # the check sees a scale ignored or taken from the neighbouring row
    for wrong in (jnp.ones_like(scale), jnp.roll(scale, 1)):
        assert not _close(gemv_reference(x, q, wrong), want, scale, tol)


@pytest.mark.parametrize("b,f,k,block_n", [(1, 32, 640, 4), (3, 16, 2560, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("wdtype", WDTYPES)
def test_gemv_geglu_quantized(b, f, k, block_n, dtype, wdtype):
    """Gate and up rows each times their own scale before today's roundings; compared as ``test_gemv_geglu``
    compares, with each column divided by its gate and up scales."""
    x, _ = _inputs(b, 1, k, dtype, seed=f)
    q, scale = _quantized(2 * f, k, wdtype, seed=f + 1)
    got = gemv_geglu(x, q, scale, block_n=block_n, interpret=INTERPRET)
    want = gemv_geglu_reference(x, q, scale)
    assert got.shape == (b, f) and got.dtype == dtype
    col = scale[:f] * scale[f:]
    g = np.asarray(got, np.float32) / np.asarray(col)
    r = np.asarray(want, np.float32) / np.asarray(col)
    if dtype == jnp.float32:
        rtol, atol = 1e-5, 1e-5
    else:  # same roundings: equal but for one-ulp flips from the summation order and the scale's place
        rtol, atol = 2 ** -6, 2 ** -7
    np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * np.abs(r).max())
    # the check sees a scale ignored, the up rows given the gate rows' scales, or a row's scale off by one row
    for wrong in (jnp.ones_like(scale), jnp.concatenate([scale[:f], scale[:f]]), jnp.roll(scale, 1)):
        w = np.asarray(gemv_geglu_reference(x, q, wrong), np.float32) / np.asarray(col)
        assert not np.allclose(w, r, rtol=rtol, atol=atol * np.abs(r).max())


def test_bad_quantized_inputs_name_the_value():
    x, _ = _inputs(1, 1, 640, jnp.bfloat16)
    q, scale = _quantized(64, 640, jnp.int8, seed=0)
    for fn in (gemv, gemv_geglu):
        with pytest.raises(ValueError, match="quantized w needs its per-row scale"):
            fn(x, q, interpret=True)
        with pytest.raises(ValueError, match="quantized w needs its per-row scale"):
            fn(x, q.astype(jnp.float8_e4m3fn), interpret=True)
        with pytest.raises(ValueError, match=r"scale must be float32 \[N\]"):
            fn(x, q, scale[:32], interpret=True)
        with pytest.raises(ValueError, match=r"scale must be float32 \[N\]"):
            fn(x, q, scale[None], interpret=True)
        with pytest.raises(ValueError, match=r"scale must be float32 \[N\]"):
            fn(x, q, scale.astype(jnp.bfloat16), interpret=True)
        with pytest.raises(ValueError, match="with a scale, w must be int8 or float8_e4m3fn"):
            fn(x, q.astype(jnp.bfloat16), scale, interpret=True)
        with pytest.raises(ValueError, match="x must be bf16/fp16/fp32"):
            fn(x.astype(jnp.int8), q, scale, interpret=True)
