"""Pallas (Triton) matrix-vector products for decode over 4-bit weights with a float32 scale per group of 32 inputs
(``model.quant``'s "int4", GGUF Q4_0's grouping): y[B, N] = x[B, K] @ (q * scale)[N, K]^T, B small.

The weights go in as int32 words [N, K / 8] (``words``: eight 4-bit values, input 8j + i in bits 4i..4i+3, the
two's-complement nibbles an int4 array holds), so a program's loads are whole words. Each nibble becomes a float
without an integer-to-float conversion (a quarter-rate instruction, which already limits the 1-byte kernels): its
sign bit flipped (v + 8, in 0..15) and OR-ed into the mantissa of 2^23 gives the float 2^23 + v + 8 exactly, from
which one subtraction leaves v. Each nibble position i multiplies the inputs 8j + i, so x is split into its eight
strided parts once per program. A group's sum (4 words) is multiplied by its scale, then the groups are added:
the product of the dequantized weights in float32, without their rounding to the activation dtype.

- ``gemv4``: with ``splits`` > 1 the K range is split over that many programs per row block and the f32 partial
  sums [splits, B, N] are returned for ``residual_norm`` to add, as ``gemv.gemv`` does.
- ``gemv4_geglu``: gate|up [2F, K] with ``gelu_tanh(gate) * up``, the roundings of ``gemv.gemv_geglu``.

Public pallas (pl) API only; interpret mode on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import DTYPES
from pallas_kernels.gemv import MAX_ROWS, gelu_tanh_f32, split_output
from pallas_kernels.residual_norm import pow2_pieces
from pallas_kernels.tuning import compiler_params

GROUP = 32  # inputs per scale
NIBBLES = 8  # 4-bit values per int32 word
WORDS_PER_GROUP = GROUP // NIBBLES
SIGN_FLIP = -0x77777778  # 0x88888888 as int32: each nibble's top bit flipped, v -> v + 8
TWO_23 = 0x4B000000  # float32 bits of 2^23, whose mantissa holds an integer 0..2^23-1 exactly
OFFSET = float(2**23 + 8)


def words(w: jax.Array) -> jax.Array:
    """An int4 [N, K] array as int32 words [N, K / 8] (input 8j + i in bits 4i..4i+3)."""
    n, k = w.shape
    if w.dtype != jnp.int4 or k % NIBBLES:
        raise ValueError(f"w must be int4 [N, K] with K a multiple of {NIBBLES}: {w.shape=} {w.dtype=}")
    return lax.bitcast_convert_type(w.reshape(n, k // NIBBLES, NIBBLES), jnp.int32)


def _strided(x):
    """x [8m] -> the eight [m] parts x[i::8]."""
    m = x.shape[0] // NIBBLES
    return [p.reshape(m) for p in jnp.split(x.reshape(m, NIBBLES), NIBBLES, axis=1)]


def _sums(x_ref, w_refs, s_refs, *, pieces, rows):
    """For each (w, scale) ref pair: [rows] of f32 [block_n] sums over this program's K range."""
    f32 = jnp.float32
    ws = [[w[:, pl.ds(o, m)] for o, m in pieces] for w in w_refs]  # every load issued first
    ss = [[s[:, pl.ds(o // WORDS_PER_GROUP, m // WORDS_PER_GROUP)] for o, m in pieces] for s in s_refs]
    xs = [[_strided(x_ref[b, pl.ds(o * NIBBLES, m * NIBBLES)].astype(f32)) for o, m in pieces] for b in range(rows)]
    out = []
    for w_pieces, s_pieces in zip(ws, ss):
        accs = [None] * rows
        for j, (wp, sp) in enumerate(zip(w_pieces, s_pieces)):
            flipped = wp ^ SIGN_FLIP
            parts = [None] * rows
            for i in range(NIBBLES):
                nib = (flipped >> (4 * i)) & 15 if i else flipped & 15
                v = lax.bitcast_convert_type(nib | TWO_23, f32) - OFFSET  # exact: the nibble's value
                for b in range(rows):
                    t = v * xs[b][j][i][None, :]
                    parts[b] = t if parts[b] is None else parts[b] + t
            bn, m = wp.shape
            for b in range(rows):
                per_group = jnp.sum(parts[b].reshape(bn, m // WORDS_PER_GROUP, WORDS_PER_GROUP), axis=2)
                t = jnp.sum(per_group * sp, axis=1)
                accs[b] = t if accs[b] is None else accs[b] + t
        out.append(accs)
    return out


def _gemv4_kernel(x_ref, w_ref, s_ref, o_ref, *, pieces, rows):
    (sums,) = _sums(x_ref, [w_ref], [s_ref], pieces=pieces, rows=rows)
    for b, acc in enumerate(sums):
        o_ref[b, :] = acc.astype(o_ref.dtype)


def _geglu4_kernel(x_ref, wg_ref, wu_ref, sg_ref, su_ref, o_ref, *, pieces, rows):
    f32, dt = jnp.float32, o_ref.dtype
    gates, ups = _sums(x_ref, [wg_ref, wu_ref], [sg_ref, su_ref], pieces=pieces, rows=rows)
    for b in range(rows):
        g = gates[b].astype(dt).astype(f32)
        u = ups[b].astype(dt).astype(f32)
        act = gelu_tanh_f32(g).astype(dt).astype(f32)
        o_ref[b, :] = (act * u).astype(dt)


def _check(x, w, scale, block_n, splits, rows_w):
    if x.ndim != 2 or x.dtype not in DTYPES:
        raise ValueError(f"x must be [B, K] in bf16/fp16/fp32: {x.shape=} {x.dtype=}")
    if w.ndim != 2 or w.dtype != jnp.int32 or w.shape[1] * NIBBLES != x.shape[1]:
        raise ValueError(f"w must be int32 words [N, K / 8] (gemv_int4.words): {w.shape=} {w.dtype=} {x.shape=}")
    k = x.shape[1]
    if scale.shape != (w.shape[0], k // GROUP) or scale.dtype != jnp.float32:
        raise ValueError(f"scale must be float32 [N, K / {GROUP}]: {scale.shape=} {scale.dtype=} {w.shape=}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv4 takes 1..{MAX_ROWS} rows: {x.shape=}")
    if block_n & (block_n - 1) or rows_w % block_n:
        raise ValueError(f"block_n must be a power of two dividing the rows: {block_n=} rows={rows_w}")
    if splits < 1 or k % splits or (k // splits) % GROUP:
        raise ValueError(f"splits must divide K into multiples of {GROUP}: {splits=} {k=}")


@functools.partial(jax.jit, static_argnames=("block_n", "splits", "num_warps", "interpret"))
def gemv4(x, w, scale, *, block_n=8, splits=1, num_warps=4, interpret=False):
    """x [B, K] @ dequantized w^T: [B, N] in x's dtype (``splits`` = 1) or f32 partial sums [splits, B, N].
    w: int32 words [N, K / 8] (``words``), scale [N, K / 32] float32."""
    _check(x, w, scale, block_n, splits, w.shape[0])
    (b, k), n = x.shape, w.shape[0]
    ks = k // splits
    out_shape, out_spec = split_output(b, n, block_n, splits, x.dtype)
    return pl.pallas_call(
        functools.partial(_gemv4_kernel, pieces=pow2_pieces(ks // NIBBLES), rows=b),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((b, ks), lambda i, s: (0, s)),
                  pl.BlockSpec((block_n, ks // NIBBLES), lambda i, s: (i, s)),
                  pl.BlockSpec((block_n, ks // GROUP), lambda i, s: (i, s))],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="gemv4",
    )(x, w, scale)


@functools.partial(jax.jit, static_argnames=("block_n", "num_warps", "interpret"))
def gemv4_geglu(x, w_gate_up, scale, *, block_n=4, num_warps=4, interpret=False):
    """gelu_tanh(x @ gate^T) * (x @ up^T) [B, F] with w_gate_up int32 words [2F, K / 8] (gate rows then up rows)
    and scale [2F, K / 32]."""
    f = w_gate_up.shape[0] // 2
    _check(x, w_gate_up, scale, block_n, 1, f)
    if w_gate_up.shape[0] != 2 * f:
        raise ValueError(f"w_gate_up must have an even number of rows: {w_gate_up.shape=}")
    (b, k), up_block = x.shape, f // block_n
    rows_w = lambda off: pl.BlockSpec((block_n, k // NIBBLES), lambda i: (i + off, 0))  # noqa: E731
    rows_s = lambda off: pl.BlockSpec((block_n, k // GROUP), lambda i: (i + off, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_geglu4_kernel, pieces=pow2_pieces(k // NIBBLES), rows=b),
        grid=(f // block_n,),
        in_specs=[pl.BlockSpec((b, k), lambda i: (0, 0)), rows_w(0), rows_w(up_block), rows_s(0), rows_s(up_block)],
        out_specs=pl.BlockSpec((b, block_n), lambda i: (0, i)),
        out_shape=jax.ShapeDtypeStruct((b, f), x.dtype),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="gemv4_geglu",
    )(x, w_gate_up, w_gate_up, scale, scale)
