"""The decode matrix-vector kernels against their references (interpret mode on CPU, compiled on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
