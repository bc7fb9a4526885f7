"""The 4-bit matrix-vector kernels (pallas_kernels/gemv_int4.py) against the product of the dequantized weights in
float32, in interpret mode on the CPU (lowered for CUDA in test_gpu_lowering.py, compiled on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import summed_partials

from gemma3_jax.model import quant
from pallas_kernels.gemv_int4 import gemv4, gemv4_geglu, words
from pallas_kernels.reference import gemv_geglu_reference, gemv_reference

INTERPRET = jax.default_backend() != "gpu"


def inputs(b, n, k, dtype, seed, full_range=False):
    """x [b, k]; q int4 [n, k] (every level -8..7 with ``full_range``, as a Q4_0 file holds; else quantized
    normals, -7..7) and scales [n, k / 32] that differ from group to group."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, k)), jnp.float32).astype(dtype)
    if full_range:
        q = jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int4)
        scale = jnp.asarray(rng.uniform(0.001, 0.01, (n, k // 32)), jnp.float32)
    else:
        w = rng.standard_normal((n, k)) * rng.uniform(0.1, 2.0, (n, k // 32)).repeat(32, axis=1)
        q, scale = quant.quantize(jnp.asarray(w, jnp.float32), "int4", 1)
    return x, q, scale


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_words_hold_eight_inputs_low_nibble_first():
    q = jnp.asarray([[1, -2, 3, -8, 7, 0, -1, 4]], jnp.int4)
    word = int(np.asarray(words(q))[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 15 for i in range(8)] == [1, 14, 3, 8, 7, 0, 15, 4]


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n,k,block_n,splits", [(64, 640, 8, 1), (32, 2560, 16, 4), (16, 96, 4, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemv4(b, n, k, block_n, splits, dtype):
    """Only the summation order and the final rounding (to x's dtype; f32 partial sums when split) differ from
    the float32 product of the dequantized weight."""
    x, q, scale = inputs(b, n, k, dtype, seed=n + k + b, full_range=splits == 3)
    got = gemv4(x, words(q), scale, block_n=block_n, splits=splits, interpret=INTERPRET)
    want = gemv_reference(x, q, scale)
    got = summed_partials(got, splits, b, n, dtype)
    tol = 1e-5 if got.dtype == jnp.float32 else 2**-7
    assert rel(got, want) <= tol
    # the check sees a group's scale taken from its neighbour, and the nibbles of a word taken in reverse
    assert rel(gemv_reference(x, q, jnp.roll(scale, 1, axis=1)), want) > tol
    flipped = q.reshape(n, k // 8, 8)[..., ::-1].reshape(n, k)
    assert rel(gemv_reference(x, flipped, scale), want) > tol


@pytest.mark.parametrize("b,f,k,block_n", [(1, 32, 640, 4), (3, 16, 2560, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemv4_geglu(b, f, k, block_n, dtype):
    """gelu(gate) * up with the roundings of gemv_geglu, over the gate rows then the up rows of one weight."""
    x, q, scale = inputs(b, 2 * f, k, dtype, seed=f + b)
    got = gemv4_geglu(x, words(q), scale, block_n=block_n, interpret=INTERPRET)
    want = gemv_geglu_reference(x, q, scale)
    assert got.shape == (b, f) and got.dtype == dtype
    # bf16: the same roundings, so equal but for one-ulp flips where the summation order moves a rounding
    assert rel(got, want) <= (1e-5 if dtype == jnp.float32 else 2**-6)
    swapped = jnp.concatenate([scale[f:], scale[:f]])  # the up rows given the gate rows' scales
    assert rel(gemv_geglu_reference(x, q, swapped), want) > 2**-6


def test_bad_inputs_name_the_value():
    x, q, scale = inputs(1, 64, 640, jnp.bfloat16, seed=0)
    w = words(q)
    cases = [
        (dict(x=x, w=q, scale=scale), "int32 words"),  # the int4 array itself, not its words
        (dict(x=x[:, :320], w=w, scale=scale), "int32 words"),
        (dict(x=x, w=w, scale=scale[:, :10]), "scale must be float32"),
        (dict(x=x, w=w, scale=scale.astype(jnp.bfloat16)), "scale must be float32"),
        (dict(x=x.astype(jnp.int32), w=w, scale=scale), "x must be"),
        (dict(x=jnp.zeros((17, 640), jnp.bfloat16), w=w, scale=scale), "1..16 rows"),
        (dict(x=x, w=w, scale=scale, block_n=6), "block_n must be a power of two"),
        (dict(x=x, w=w, scale=scale, splits=3), "multiples of 32"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            gemv4(**kw, interpret=True)
    with pytest.raises(ValueError, match="even number of rows"):
        gemv4_geglu(x, w[:63], scale[:63], block_n=1, interpret=True)
    with pytest.raises(ValueError, match="int4"):
        words(jnp.zeros((4, 12), jnp.int4))
