"""The decode residual-add + RMSNorm kernel against its jnp oracle (interpret mode on CPU, compiled on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import residual_norm_reference
from pallas_kernels.residual_norm import pow2_pieces, residual_norm

INTERPRET = jax.default_backend() != "gpu"


def test_pieces_cover_the_dim():
    for d in (1, 7, 48, 1152, 2560, 640):
        pieces = pow2_pieces(d)
        assert sum(s for _, s in pieces) == d and all(s & (s - 1) == 0 for _, s in pieces)
        assert [o for o, _ in pieces] == [sum(s for _, s in pieces[:i]) for i in range(len(pieces))]


@pytest.mark.parametrize("shape", [(1, 1, 2560), (3, 1, 48), (2, 7), (5, 1, 640)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    mk = lambda *s: jnp.asarray(rng.standard_normal(s) * 3.0, jnp.float32).astype(dtype)  # noqa: E731
    d = shape[-1]
    x, delta, w1, w2 = mk(*shape), mk(*shape), mk(d) * 0.1, mk(d) * 0.1
    got = residual_norm(x, delta, w1, w2, eps=1e-6, interpret=INTERPRET)
    want = residual_norm_reference(x, delta, w1, w2, eps=1e-6)
    for g, w in zip(got, want):
        assert g.shape == x.shape and g.dtype == x.dtype
        # float32: summation order only; bf16: equal up to a rare one-ulp rounding flip
        tol = 1e-6 if dtype == jnp.float32 else 2 ** -7
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_bad_shapes_name_the_value():
    x = jnp.zeros((2, 16))
    with pytest.raises(ValueError, match="next_weight must be"):
        residual_norm(x, x, jnp.zeros(16), jnp.zeros(8), eps=1e-6, interpret=True)
    with pytest.raises(ValueError, match="x and delta must match"):
        residual_norm(x, jnp.zeros((2, 8)), jnp.zeros(16), jnp.zeros(16), eps=1e-6, interpret=True)


@pytest.mark.parametrize("splits", [2, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_partial_sums_as_delta(splits, dtype):
    """delta as f32 partial sums [S, B, 1, D] of a split-K product: added and rounded in the kernel."""
    rng = np.random.default_rng(splits)
    shape = (2, 1, 640)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    parts = jnp.asarray(rng.standard_normal((splits, *shape)), jnp.float32)
    w1, w2 = (jnp.asarray(rng.standard_normal(640) * 0.1, dtype) for _ in range(2))
    got = residual_norm(x, parts, w1, w2, eps=1e-6, interpret=INTERPRET)
    want = residual_norm_reference(x, parts.sum(0).astype(dtype), w1, w2, eps=1e-6)
    tol = 1e-6 if dtype == jnp.float32 else 2 ** -7
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="partial sums must be float32"):
        residual_norm(x, parts.astype(jnp.bfloat16), w1, w2, eps=1e-6, interpret=True)
