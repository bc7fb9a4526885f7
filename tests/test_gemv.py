"""The decode matrix-vector kernels against their references (interpret mode on CPU, compiled on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_norm

from pallas_kernels.decode_attention import combine_splits
from pallas_kernels.decode_fused import decode_attention_fused
from pallas_kernels.gemv import combine_gemv, gemv, gemv_geglu
from pallas_kernels.reference import combine_gemv_reference, gemv_geglu_reference, gemv_reference

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
    if splits > 1:
        assert got.shape == (splits, b, n) and got.dtype == jnp.float32
        got = got.sum(0)
    else:
        assert got.shape == (b, n) and got.dtype == dtype
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
    if splits > 1:
        assert got.shape == (splits, b, n) and got.dtype == jnp.float32
        got = got.sum(0)
    else:
        assert got.shape == (b, n) and got.dtype == dtype
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


# ---- the attention output's product from the split partials --------------------------------------------------


def _partials(b, kh, g, h, s, dtype, splits, seed):
    """(acc, m, l) of the fused decode kernel over random caches, with rows at different positions: some splits
    of the short rows hold no key (m = -inf), as in a decode step early in a long buffer."""
    rng = np.random.default_rng(seed)
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    pos = jnp.asarray(rng.integers(0, s, b), jnp.int32).at[0].set(2)
    angles = pos[:, None].astype(jnp.float32) * jnp.linspace(0.0, 1.0, h)[None]
    (acc, m, l), _, _ = decode_attention_fused(
        mk(b, kh * g + 2 * kh, h), mk(h) * 0.2, mk(h) * 0.2, jnp.cos(angles).astype(dtype),
        jnp.sin(angles).astype(dtype), mk(b, s, kh, h), mk(b, s, kh, h), pos, ring=False, scale=h**-0.5, eps=1e-6,
        interpret=INTERPRET, block_k=16, num_splits=splits, combine=False)
    return acc, m, l


@pytest.mark.parametrize("b,kh,g,h,d,block_n,splits", [(1, 4, 2, 32, 64, 8, 4), (2, 1, 4, 64, 48, 16, 2),
                                                       (1, 2, 1, 128, 32, 4, 8)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_combine_gemv(b, kh, g, h, d, block_n, splits, dtype):
    """The partials' sum over kv heads equals the separate combine's output (rounded to the dtype) times w: f32
    products, so only the summation order differs (the combine's own rounding is the same)."""
    acc, m, l = _partials(b, kh, g, h, 64, dtype, splits, seed=d + g)
    assert bool(jnp.any(m == -jnp.inf)), "no empty split: the case does not test them"
    _, w = _inputs(1, d, kh * g * h, dtype, seed=d)
    got = combine_gemv(acc, m, l, w, dtype=dtype, block_n=block_n, interpret=INTERPRET)
    assert got.shape == (kh, b, d) and got.dtype == jnp.float32
    out = combine_splits(acc, m, l, g, h, dtype, interpret=INTERPRET).reshape(b, kh * g * h)
    want = gemv_reference(out, w)
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -8  # bf16: one ulp of an output element moved by the sum order
    assert rel_norm(got.sum(0), want) <= tol
    assert rel_norm(combine_gemv_reference(acc, m, l, w, dtype=dtype), want) <= tol
    # a head multiplied by another head's columns is seen
    assert rel_norm(gemv_reference(out, jnp.roll(w, h, axis=1)), want) > 0.1


@pytest.mark.parametrize("wdtype", WDTYPES)
def test_combine_gemv_quantized(wdtype):
    acc, m, l = _partials(1, 4, 2, 32, 64, jnp.bfloat16, 4, seed=3)
    q, scale = _quantized(32, 4 * 2 * 32, wdtype, seed=4)
    got = combine_gemv(acc, m, l, q, scale, dtype=jnp.bfloat16, block_n=8, interpret=INTERPRET).sum(0)
    want = combine_gemv_reference(acc, m, l, q, scale, dtype=jnp.bfloat16)
    assert _close(got, want, scale, 1e-5)
    for wrong in (jnp.ones_like(scale), jnp.roll(scale, 1)):
        assert not _close(combine_gemv_reference(acc, m, l, q, wrong, dtype=jnp.bfloat16), want, scale, 1e-5)


def test_combine_gemv_bad_inputs_name_the_value():
    acc, m, l = _partials(1, 2, 2, 32, 32, jnp.float32, 2, seed=0)
    _, w = _inputs(1, 16, 2 * 2 * 32, jnp.float32)
    with pytest.raises(ValueError, match=r"acc must be f32 \[B, K, P, G, H\]"):
        combine_gemv(acc, m[..., :1], l, w, dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"x must be \[B, K\] and w \[N, K\]"):
        combine_gemv(acc, m, l, w[:, :64], dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="share a dtype"):
        combine_gemv(acc, m, l, w, dtype=jnp.bfloat16, interpret=True)
