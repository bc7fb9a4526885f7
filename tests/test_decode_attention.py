"""Tests of the Pallas flash-decoding kernel (interpret mode on CPU, compiled on a GPU) against the jnp oracle,
an independent float64 numpy computation, and, through the model's kernel boundary (gemma3_jax.model.kernels), a
float64 oracle that reads the positions a ring or full cache buffer holds explicitly.

Lengths are traced, so each shape/static-arg combination compiles once; shapes are kept small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_norm as rel
from gemma3_jax.model.kernels import Kernels
from gemma3_jax.model.kv_cache import ring_positions, write_step
from pallas_kernels import decode_attention, decode_attention_reference

F32_TOL, LOWP_TOL = 1e-5, 1e-2
INTERPRET = jax.default_backend() != "gpu"


def inputs(seed, b, s, kh, g, h, dtype, q_mult=1.0):
    rng = np.random.default_rng(seed)
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 1.5, jnp.float32).astype(dtype)  # noqa: E731
    return mk(b, kh * g, h) * q_mult, mk(b, s, kh, h), mk(b, s, kh, h), rng


def numpy_f64(q, k, v, lengths, scale):
    """Independent oracle: plain float64 numpy, one (row, head) at a time."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    b, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, n, h))
    for bi in range(b):
        ln = int(lengths[bi])
        for hi in range(n):
            if ln == 0:
                continue
            kk, vv = k[bi, :ln, hi // g], v[bi, :ln, hi // g]
            logits = kk @ q[bi, hi] * scale
            p = np.exp(logits - logits.max())
            out[bi, hi] = p @ vv / p.sum()
    return out


def tol(dtype):
    return F32_TOL if jnp.dtype(dtype) == jnp.float32 else LOWP_TOL


@pytest.mark.parametrize(
    "kh,g,h,dtype,s,block_k,splits",
    [
        (4, 1, 64, jnp.float32, 100, 16, None),  # GQA 1
        (2, 2, 72, jnp.float32, 77, 16, 3),  # GQA 2, head dim 72 (padded), S % block_k != 0
        (2, 4, 128, jnp.bfloat16, 50, 32, None),  # GQA 4
        (1, 8, 256, jnp.bfloat16, 70, None, None),  # GQA 8, default block_k
        (2, 8, 256, jnp.float32, 45, None, 2),  # fp32 default block_k at H=256
        (1, 4, 64, jnp.float16, 33, 16, None),
    ],
)
def test_matches_reference_and_float64(kh, g, h, dtype, s, block_k, splits):
    q, k, v, rng = inputs(0, 6, s, kh, g, h, dtype)
    lengths = np.array([0, 1, s, s - 1, *rng.integers(2, s - 1, size=2)], np.int32)
    scale = h**-0.5
    out = decode_attention(q, k, v, jnp.asarray(lengths), scale=scale, interpret=INTERPRET, block_k=block_k,
                           num_splits=splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, decode_attention_reference(q, k, v, jnp.asarray(lengths), scale=scale)) <= tol(dtype)
    assert rel(out, numpy_f64(q, k, v, lengths, scale)) <= tol(dtype)
    assert np.all(np.asarray(out[0], np.float32) == 0.0)  # length 0: exact zeros


@pytest.mark.parametrize("q_mult", [1.0, 30.0])  # 30: huge logits, near one-hot softmax across splits
def test_num_splits_agree(q_mult):
    s, h = 200, 64
    q, k, v, _ = inputs(1, 4, s, 2, 4, h, jnp.float32, q_mult)
    lengths = jnp.asarray([s, 1, 0, 123], jnp.int32)
    ref = decode_attention_reference(q, k, v, lengths, scale=h**-0.5)
    outs = [decode_attention(q, k, v, lengths, scale=h**-0.5, interpret=INTERPRET, block_k=16, num_splits=n)
            for n in (1, 3, 64, None)]  # 64 > 13 blocks: clamped to one block per split
    for o in outs:
        assert rel(o, ref) <= F32_TOL
        assert rel(o, outs[0]) <= 1e-6
        assert np.all(np.asarray(o[2]) == 0.0)


def test_all_rows_empty_and_tiny_cache():
    q, k, v, _ = inputs(2, 3, 5, 1, 2, 64, jnp.float32)  # S = 5 < 16: padded to one 16-slot block
    out = decode_attention(q, k, v, jnp.zeros((3,), jnp.int32), scale=0.125, interpret=INTERPRET)
    assert np.all(np.asarray(out) == 0.0)
    lengths = jnp.asarray([5, 1, 3], jnp.int32)
    out = decode_attention(q, k, v, lengths, scale=0.125, interpret=INTERPRET)
    assert rel(out, numpy_f64(q, k, v, np.asarray(lengths), 0.125)) <= F32_TOL


def held_positions_f64(q, k, v, pos, ring: bool, scale):
    """Oracle after write_step: float64 softmax over the slots whose held position (read from the ring layout
    explicitly, or the slot index of a full buffer) is in [0, pos]."""
    s = k.shape[1]
    held = np.asarray(ring_positions(pos, s)) if ring else np.broadcast_to(np.arange(s), (len(pos), s))
    valid = (held >= 0) & (held <= np.asarray(pos)[:, None])
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[2]
    logits = np.einsum("bkgh,bskh->bkgs", q.reshape(q.shape[0], k.shape[2], g, -1), k) * scale
    logits = np.where(valid[:, None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out = np.einsum("bkgs,bskh->bkgh", p / p.sum(-1, keepdims=True), v)
    return out.reshape(q.shape)


@pytest.mark.parametrize("implementation", ["pallas", "reference"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ring_buffer_holds_the_window(implementation, dtype):
    """The kernel boundary's cached_attention needs no slot order: lengths = min(pos + 1, W) over a ring."""
    w, kh, g, h = 24, 2, 2, 64  # W not a multiple of block_k
    pos = jnp.asarray([0, 5, 23, 24, 40, 100], jnp.int32)  # pos < W and pos >= W (wrapped)
    q, k, v, _ = inputs(3, 6, w, kh, g, h, dtype)  # random slots: stale/unwritten ones must be ignored
    _, new_k, new_v, _ = inputs(4, 6, 1, kh, 1, h, dtype)  # the token written at pos
    k = write_step(k, new_k[:, 0], pos, ring=True)
    v = write_step(v, new_v[:, 0], pos, ring=True)
    out = Kernels.resolve(implementation).cached_attention(q, k, v, pos, scale=h**-0.5)
    assert rel(out, held_positions_f64(q, k, v, pos, True, h**-0.5)) <= tol(dtype)


@pytest.mark.parametrize("implementation", ["pallas", "reference"])
def test_full_buffer_holds_every_position(implementation):
    c, kh, g, h = 40, 1, 4, 128
    pos = jnp.asarray([0, 7, 39, 20, 16], jnp.int32)
    q, k, v, _ = inputs(5, 5, c, kh, g, h, jnp.float32)
    out = Kernels.resolve(implementation).cached_attention(q, k, v, pos, scale=h**-0.5)
    assert rel(out, held_positions_f64(q, k, v, pos, False, h**-0.5)) <= F32_TOL


def _bad(b=2, n=4, s=20, kh=2, h=64, dtype=jnp.float32):
    return jnp.ones((b, n, h), dtype), jnp.ones((b, s, kh, h), dtype), jnp.ones((b, s, kh, h), dtype)


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: (jnp.ones((2, 1, 4, 64)), *_bad()[1:], jnp.ones(2, jnp.int32)), {}, r"q.shape=\(2, 1, 4, 64\)"),
        (lambda: (*_bad()[:2], jnp.ones((2, 21, 2, 64)), jnp.ones(2, jnp.int32)), {}, "k and v shapes differ"),
        (lambda: (*_bad(n=3), jnp.ones(2, jnp.int32)), {}, r"multiple of K .*q.shape=\(2, 3, 64\)"),
        (lambda: (*_bad(h=320), jnp.ones(2, jnp.int32)), {}, r"head dim must be in 1..256: q.shape=\(2, 4, 320\)"),
        (lambda: (*_bad(dtype=jnp.int32), jnp.ones(2, jnp.int32)), {}, "bf16/fp16/fp32"),
        (lambda: (_bad()[0].astype(jnp.bfloat16), *_bad()[1:], jnp.ones(2, jnp.int32)), {}, "dtypes must match"),
        (lambda: (*_bad(), jnp.ones(3, jnp.int32)), {}, r"lengths must be .*\(3,\)"),
        (lambda: (_bad(b=3)[0], *_bad()[1:], jnp.ones(3, jnp.int32)), {}, "batch/head-dim mismatch"),
        (lambda: (*_bad(), jnp.ones(2, jnp.int32)), {"block_k": 24}, "block_k=24"),
        (lambda: (*_bad(), jnp.ones(2, jnp.int32)), {"num_splits": 0}, "num_splits=0"),
    ],
)
def test_value_errors(make, kwargs, match):
    """Shape and value errors (float lengths are a TypeError: tests/test_kernel_args.py)."""
    q, k, v, lengths = make()
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, lengths, scale=0.125, interpret=True, **kwargs)
    if not kwargs:
        with pytest.raises(ValueError, match=match):
            decode_attention_reference(q, k, v, lengths, scale=0.125)
