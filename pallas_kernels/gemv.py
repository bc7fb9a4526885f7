"""Pallas (Triton) matrix-vector products for decode: y[B, N] = x[B, K] @ w[N, K]^T with B small.

Weights are [out, in] (transformers' layout), so each program streams ``block_n`` contiguous rows of w. A
program covers its whole share of K at once: the K range is cut into power-of-two pieces (2560 = 2048 + 512)
whose loads are all issued before the first product, so one memory latency per program, not one per chunk.
The products are f32 multiply-adds, no tensor cores: meant for batch 1, where the work is memory bound (at
larger batches the row-by-row products are slower than XLA's tensor-core GEMV).

- ``gemv``: with ``splits`` > 1 the K range is split over that many programs per row block and the f32
  partial sums [splits, B, N] are returned for the consumer to add (``residual_norm`` takes them), which
  saves the separate reduction kernel XLA's split-K GEMV runs.
- ``gemv_geglu``: the gate|up product of Gemma's MLP with its epilogue, ``gelu_tanh(gate) * up`` in the
  activation dtype: each program reads matching rows of the gate and up halves of w [2F, K] (two BlockSpecs on
  one array), so the MLP's elementwise kernel disappears. Roundings as transformers in bf16: gate and up
  rounded, gelu in f32 rounded, the product rounded.

Both also take 8-bit weights, int8 or float8_e4m3fn, with a float32 ``scale`` per row of w (``w ~= q * scale``):
decode is bound by the weight bytes read, which halve against bf16. The weights are loaded as stored and converted
to f32 in registers; each row's f32 sum is multiplied by its scale before the store (in ``gemv_geglu`` before the
roundings).

Public pallas (pl) API only; interpret mode on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import DTYPES
from pallas_kernels.residual_norm import pow2_pieces
from pallas_kernels.tuning import compiler_params

MAX_ROWS = 16  # batch rows per call: beyond this the product is not memory bound, use a matmul
QUANTIZED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))  # weight dtypes that come with a per-row scale


def gelu_tanh_f32(x):
    return jax.nn.gelu(x, approximate=True)


def _row_sums(x_ref, w_refs, *, pieces, rows):
    """For each w ref: [rows] of f32 [block_n] sums over this program's K range."""
    f32 = jnp.float32
    ws = [[w[:, pl.ds(o, s)] for o, s in pieces] for w in w_refs]  # every load issued first
    xs = [[x_ref[b, pl.ds(o, s)].astype(f32) for o, s in pieces] for b in range(rows)]
    out = []
    for w_pieces in ws:
        per_row = []
        for b in range(rows):
            acc = None
            for wp, xp in zip(w_pieces, xs[b]):
                t = jnp.sum(wp.astype(f32) * xp[None, :], axis=1)
                acc = t if acc is None else acc + t
            per_row.append(acc)
        out.append(per_row)
    return out


def _gemv_kernel(x_ref, w_ref, *refs, pieces, rows):
    """refs: (o_ref,), or (scale_ref, o_ref) for a quantized w."""
    *s_ref, o_ref = refs
    s = s_ref[0][...] if s_ref else None  # f32 [block_n], loaded before the sums: in flight with the weights
    (sums,) = _row_sums(x_ref, [w_ref], pieces=pieces, rows=rows)
    for b, acc in enumerate(sums):
        if s is not None:
            acc = acc * s
        o_ref[b, :] = acc.astype(o_ref.dtype)


def _geglu_kernel(x_ref, wg_ref, wu_ref, *refs, pieces, rows):
    """refs: (o_ref,), or (gate scale_ref, up scale_ref, o_ref) for a quantized w."""
    *s_refs, o_ref = refs
    f32, dt = jnp.float32, o_ref.dtype
    sg, su = (s_refs[0][...], s_refs[1][...]) if s_refs else (None, None)
    gates, ups = _row_sums(x_ref, [wg_ref, wu_ref], pieces=pieces, rows=rows)
    for b in range(rows):
        g, u = gates[b], ups[b]
        if sg is not None:  # the scales act on the f32 sums, before the roundings to the activation dtype
            g, u = g * sg, u * su
        g = g.astype(dt).astype(f32)
        u = u.astype(dt).astype(f32)
        act = gelu_tanh_f32(g).astype(dt).astype(f32)
        o_ref[b, :] = (act * u).astype(dt)


def _check(x, w, scale, block_n, splits, rows_w):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [B, K] and w [N, K]: {x.shape=} {w.shape=}")
    if scale is None:
        if w.dtype in QUANTIZED:
            raise ValueError(f"a quantized w needs its per-row scale: {w.dtype=} and scale=None")
        if x.dtype != w.dtype or x.dtype not in DTYPES:
            raise ValueError(f"x and w must share a dtype in bf16/fp16/fp32: {x.dtype=} {w.dtype=}")
    else:
        if w.dtype not in QUANTIZED:
            raise ValueError(f"with a scale, w must be int8 or float8_e4m3fn: {w.dtype=}")
        if x.dtype not in DTYPES:
            raise ValueError(f"x must be bf16/fp16/fp32: {x.dtype=}")
        if scale.shape != (w.shape[0],) or scale.dtype != jnp.float32:
            raise ValueError(f"scale must be float32 [N] with N = w.shape[0]: {scale.shape=} {scale.dtype=} "
                             f"{w.shape=}")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows: {x.shape=}")
    k = x.shape[1]
    if block_n & (block_n - 1) or rows_w % block_n:
        raise ValueError(f"block_n must be a power of two dividing the rows: {block_n=} rows={rows_w}")
    if splits < 1 or k % splits or (k // splits) % 16:
        raise ValueError(f"splits must divide K into multiples of 16: {splits=} {k=}")


def split_output(b: int, n: int, block_n: int, splits: int, dtype):
    """(out_shape, out_spec) of a product over a (row block, K split) grid: [B, N] in ``dtype``, or with
    ``splits`` > 1 the f32 partial sums [splits, B, N] for the consumer to add."""
    if splits > 1:
        return (jax.ShapeDtypeStruct((splits, b, n), jnp.float32),
                pl.BlockSpec((None, b, block_n), lambda i, s: (s, 0, i)))
    return jax.ShapeDtypeStruct((b, n), dtype), pl.BlockSpec((b, block_n), lambda i, s: (0, i))


@functools.partial(jax.jit, static_argnames=("block_n", "splits", "num_warps", "interpret"))
def gemv(x, w, scale=None, *, block_n=8, splits=1, num_warps=4, interpret=False):
    """x [B, K] @ w [N, K]^T: [B, N] in x's dtype (``splits`` = 1) or f32 partial sums [splits, B, N].

    ``scale`` [N] float32 with an int8 / float8_e4m3fn ``w``: the product with ``w * scale[:, None]`` (each partial
    sum scaled, so the partials still add up to the product)."""
    _check(x, w, scale, block_n, splits, w.shape[0])
    (b, k), n = x.shape, w.shape[0]
    ks = k // splits
    out_shape, out_spec = split_output(b, n, block_n, splits, x.dtype)
    return pl.pallas_call(
        functools.partial(_gemv_kernel, pieces=pow2_pieces(ks), rows=b),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((b, ks), lambda i, s: (0, s)), pl.BlockSpec((block_n, ks), lambda i, s: (i, s))]
        + ([] if scale is None else [pl.BlockSpec((block_n,), lambda i, s: (i,))]),
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="gemv",
    )(x, w, *([] if scale is None else [scale]))


@functools.partial(jax.jit, static_argnames=("block_n", "num_warps", "interpret"))
def gemv_geglu(x, w_gate_up, scale=None, *, block_n=4, num_warps=4, interpret=False):
    """gelu_tanh(x @ w_gate^T) * (x @ w_up^T) [B, F] with w_gate_up [2F, K] = gate rows then up rows.

    ``scale`` [2F] float32 with an int8 / float8_e4m3fn ``w_gate_up``: each row's sum times its scale."""
    _check(x, w_gate_up, scale, block_n, 1, w_gate_up.shape[0] // 2)
    (b, k), f = x.shape, w_gate_up.shape[0] // 2
    if w_gate_up.shape[0] != 2 * f:
        raise ValueError(f"w_gate_up must have an even number of rows: {w_gate_up.shape=}")
    up_block = f // block_n
    return pl.pallas_call(
        functools.partial(_geglu_kernel, pieces=pow2_pieces(k), rows=b),
        grid=(f // block_n,),
        in_specs=[pl.BlockSpec((b, k), lambda i: (0, 0)),
                  pl.BlockSpec((block_n, k), lambda i: (i, 0)),
                  pl.BlockSpec((block_n, k), lambda i: (i + up_block, 0))]
        + ([] if scale is None else [pl.BlockSpec((block_n,), lambda i: (i,)),
                                     pl.BlockSpec((block_n,), lambda i: (i + up_block,))]),
        out_specs=pl.BlockSpec((b, block_n), lambda i: (0, i)),
        out_shape=jax.ShapeDtypeStruct((b, f), x.dtype),
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="gemv_geglu",
    )(x, w_gate_up, w_gate_up, *([] if scale is None else [scale, scale]))
