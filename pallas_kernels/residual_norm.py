"""Pallas (Triton) residual add between two Gemma RMSNorms, for decode: one kernel instead of ~4 XLA ones.

    x_new = x + rmsnorm(delta, post_weight)        (the sub-block's output norm and the residual add)
    x_n   = rmsnorm(x_new, next_weight)            (the next sub-block's input norm)

``delta`` may also come as float32 partial sums [S, ..., D] of a split-K product (``pallas_kernels.gemv``):
they are added here and rounded to x's dtype first, which is what the product's own reduction would have done.

Gemma RMSNorm: ``y = x / rms(x) * (1 + w)`` in float32, cast to the input dtype; the residual add is rounded
to the input dtype, as transformers does in bf16. One program per row keeps the whole row in registers: D is
loaded as power-of-two pieces (2560 = 2048 + 512), so every load is issued at once and there is one memory
latency per kernel, not one per chunk. Meant for decode (B small, D up to a few thousand); rows are
independent, so any B works. Public pallas (pl) and pallas.triton APIs only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import DTYPES
from pallas_kernels.tuning import compiler_params

MAX_DIM = 16384


def pow2_pieces(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, size) power-of-two pieces covering [0, d), largest first: 2560 -> ((0, 2048), (2048, 512))."""
    pieces, off = [], 0
    for bit in reversed(range(d.bit_length())):
        if d & (1 << bit):
            pieces.append((off, 1 << bit))
            off += 1 << bit
    return tuple(pieces)


def _kernel(x_ref, delta_ref, wpost_ref, wnext_ref, xo_ref, xn_ref, *, pieces, d, eps, splits):
    f32, dt = jnp.float32, x_ref.dtype
    rnd = lambda t: t.astype(dt).astype(f32)  # noqa: E731  (round to the activation dtype)

    def load(ref):
        return [ref[pl.ds(o, s)].astype(f32) for o, s in pieces]

    x, w_post, w_next = load(x_ref), load(wpost_ref), load(wnext_ref)
    if splits:  # f32 partial sums [S, D]: add them, round once
        parts = [[delta_ref[i, pl.ds(o, s)] for o, s in pieces] for i in range(splits)]
        delta = []
        for j in range(len(pieces)):
            total = parts[0][j]
            for p in parts[1:]:
                total = total + p[j]
            delta.append(rnd(total))
    else:
        delta = load(delta_ref)

    def inv_rms(parts):
        total = parts[0].sum()
        for t in parts[1:]:
            total = total + t.sum()
        return lax.rsqrt(total / d + eps)

    inv_d = inv_rms([t * t for t in delta])
    x_new = [rnd(a + rnd(b * inv_d * (1.0 + w))) for a, b, w in zip(x, delta, w_post)]
    inv_x = inv_rms([t * t for t in x_new])
    for (o, s), t, w in zip(pieces, x_new, w_next):
        xo_ref[pl.ds(o, s)] = t.astype(dt)
        xn_ref[pl.ds(o, s)] = (t * inv_x * (1.0 + w)).astype(dt)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps"))
def residual_norm(x, delta, post_weight, next_weight, *, eps, interpret=False, num_warps=4):
    """(x_new, x_n), both shaped and typed like x [..., D]; delta like x, or f32 partials [S, ...x's shape]."""
    splits = delta.shape[0] if delta.ndim == x.ndim + 1 else 0
    if splits and (delta.shape[1:] != x.shape or delta.dtype != jnp.float32):
        raise ValueError(f"partial sums must be float32 [S, *x.shape]: {x.shape=} {delta.shape=} {delta.dtype=}")
    if not splits and (x.shape != delta.shape or x.dtype != delta.dtype):
        raise ValueError(f"x and delta must match: {x.shape=} {x.dtype=} {delta.shape=} {delta.dtype=}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be bf16/fp16/fp32: {x.dtype=}")
    d = x.shape[-1]
    if not 0 < d <= MAX_DIM:
        raise ValueError(f"the feature dim must be in 1..{MAX_DIM}: {x.shape=}")
    for name, w in (("post_weight", post_weight), ("next_weight", next_weight)):
        if w.shape != (d,):
            raise ValueError(f"{name} must be [D] = [{d}]: got {w.shape}")
    rows = x.reshape(-1, d)
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
    vec = pl.BlockSpec((d,), lambda i: (0,))
    if splits:
        delta_spec, delta = pl.BlockSpec((splits, None, d), lambda i: (0, i, 0)), delta.reshape(splits, -1, d)
    else:
        delta_spec, delta = row, delta.reshape(-1, d)
    x_new, x_n = pl.pallas_call(
        functools.partial(_kernel, pieces=pow2_pieces(d), d=d, eps=float(eps), splits=splits),
        grid=(rows.shape[0],),
        in_specs=[row, delta_spec, vec, vec],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct(rows.shape, x.dtype)] * 2,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="residual_norm",
    )(rows, delta, post_weight, next_weight)
    return x_new.reshape(x.shape), x_n.reshape(x.shape)
