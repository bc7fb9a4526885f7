"""Pallas (Triton) matrix-vector products for small-batch decode, with the layer's norms as their prologue.

    x_in = x + rmsnorm(delta, delta_weight)        (when ``delta`` is given: the residual add of a sub-block)
    y    = rmsnorm(x_in, norm_weight) @ W^T        (W [N, D], [out, in]; plain x_in @ W^T without norm_weight)
    geglu: W = [gate; up] stacked [2F, D]  ->  y = gelu_tanh(x_n @ gate^T) * (x_n @ up^T)   [B, F]

Why: a batch-1 decode step of the 4B model is ~2.6 ms of weight reads plus ~1 ms of ~20 tiny kernels per layer
(norms, residual adds, converts), each 1.3-1.7 us on the H100 (docs/benchmarks.md). Here every program
recomputes the norm statistics of the whole [B, D] input (a few KB from L2, cheap next to its slice of W), so
the norms and the residual add cost no launch of their own; program 0 also writes x_in for the next block.

Shapes: B <= 16 rows (padded to Bp = 16 rows inside the kernel for Triton's dot; never in memory), D a
multiple of 16, N (or F) a multiple of 16. Grid: N / block_n programs, each streaming block_n rows of W (two
row blocks, gate and up, for geglu) in block_k column chunks. Rounding follows transformers in low precision:
norms in float32 cast to the input dtype, the residual add rounded, products accumulated in float32 and
rounded once. Public pallas (pl) and pallas.triton APIs only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import DTYPES
from pallas_kernels.tuning import compiler_params

MAX_ROWS = 16


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# NOT YET TUNED: a starting point (see scripts/profile_generate.py, section "gemv").
DEFAULT_CONFIG = GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=3)


def _largest_pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def _rows(ref, k0, bk: int, b: int, bp: int):
    """Columns [k0, k0 + bk) of a [b, D] ref as a float32 [bp, bk] tile, rows >= b zero."""
    if b == bp:
        return ref[:, pl.ds(k0, bk)].astype(jnp.float32)
    rid = lax.broadcasted_iota(jnp.int32, (bp, bk), 0)
    tile = jnp.zeros((bp, bk), jnp.float32)
    for r in range(b):
        tile = jnp.where(rid == r, ref[pl.ds(r, 1), pl.ds(k0, bk)].astype(jnp.float32), tile)
    return tile


def _store_rows(ref, tile, col0, b: int, bp: int):
    """Rows < b of a [bp, w] tile into ref[:, col0:col0 + w] (ref has exactly b rows)."""
    w = tile.shape[1]
    if b == bp:
        ref[:, pl.ds(col0, w)] = tile.astype(ref.dtype)
        return
    rid = lax.broadcasted_iota(jnp.int32, (bp, w), 0)
    for r in range(b):
        row = jnp.sum(jnp.where(rid == r, tile, 0.0), axis=0, keepdims=True)  # [1, w]
        ref[pl.ds(r, 1), pl.ds(col0, w)] = row.astype(ref.dtype)


def _kernel(*refs, b, bp, d, bk, eps, has_delta, has_norm, geglu, precision):
    it = iter(refs)
    x_ref = next(it)
    delta_ref, dw_ref = (next(it), next(it)) if has_delta else (None, None)
    nw_ref = next(it) if has_norm else None
    w_ref = next(it)
    wu_ref = next(it) if geglu else None
    y_ref = next(it)
    xo_ref = next(it) if has_delta else None

    f32, dt = jnp.float32, x_ref.dtype
    rnd = lambda t: t.astype(dt).astype(f32)
    nk = d // bk
    zeros_b = jnp.zeros((bp,), f32)

    def inv_rms(ss):
        return lax.rsqrt(ss / d + eps)[:, None]  # [bp, 1]

    def chunk_start(kk):
        return pl.multiple_of(kk * bk, bk)

    if has_delta:
        def delta_ss(kk, ss):
            dl = _rows(delta_ref, chunk_start(kk), bk, b, bp)
            return ss + jnp.sum(dl * dl, axis=1)

        inv_d = inv_rms(lax.fori_loop(0, nk, delta_ss, zeros_b))

    def x_in(kk):
        k0 = chunk_start(kk)
        x = _rows(x_ref, k0, bk, b, bp)
        if has_delta:
            dl = _rows(delta_ref, k0, bk, b, bp)
            dw = dw_ref[pl.ds(k0, bk)].astype(f32)
            x = rnd(x + rnd(dl * inv_d * (1.0 + dw[None, :])))
        return x, k0

    if has_norm:
        first = pl.program_id(0) == 0

        def x_ss(kk, ss):
            x, k0 = x_in(kk)
            if has_delta:
                @pl.when(first)
                def _():
                    _store_rows(xo_ref, x, k0, b, bp)
            return ss + jnp.sum(x * x, axis=1)

        inv_x = inv_rms(lax.fori_loop(0, nk, x_ss, zeros_b))
    elif has_delta:  # x_in written by program 0 without a norm of its own
        @pl.when(pl.program_id(0) == 0)
        def _():
            def put(kk, c):
                x, k0 = x_in(kk)
                _store_rows(xo_ref, x, k0, b, bp)
                return c
            lax.fori_loop(0, nk, put, 0)

    dims = (((1,), (1,)), ((), ()))
    bn = w_ref.shape[0]

    def body(kk, accs):
        x, k0 = x_in(kk)
        if has_norm:
            nw = nw_ref[pl.ds(k0, bk)].astype(f32)
            x = x * inv_x * (1.0 + nw[None, :])
        xn = x.astype(w_ref.dtype)
        out = [acc + lax.dot_general(xn, ref[:, pl.ds(k0, bk)], dims, precision=precision,
                                     preferred_element_type=f32)
               for acc, ref in zip(accs, (w_ref, wu_ref) if geglu else (w_ref,))]
        return tuple(out)

    init = tuple(jnp.zeros((bp, bn), f32) for _ in range(2 if geglu else 1))
    accs = lax.fori_loop(0, nk, body, init)
    if geglu:
        gate, up = rnd(accs[0]), rnd(accs[1])
        y = rnd(jax.nn.gelu(gate, approximate=True)) * up
    else:
        y = accs[0]
    _store_rows(y_ref, y, 0, b, bp)


def _check(x, w, norm_weight, delta, delta_weight, geglu):
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x must be [B, D] and w [N, D]: got {x.shape=} {w.shape=}")
    b, d = x.shape
    n = w.shape[0]
    if not 1 <= b <= MAX_ROWS:
        raise ValueError(f"norm_gemv takes 1..{MAX_ROWS} rows: {x.shape=}")
    if w.shape[1] != d or d % 16:
        raise ValueError(f"w must be [N, D] with D = x's D, a multiple of 16: {x.shape=} {w.shape=}")
    if (n // 2 if geglu else n) % 16 or (geglu and n % 2):
        raise ValueError(f"output features must be a multiple of 16 (geglu: w is [2F, D]): {w.shape=} {geglu=}")
    if x.dtype not in DTYPES or w.dtype != x.dtype:
        raise ValueError(f"x and w must share a bf16/fp16/fp32 dtype: {x.dtype=} {w.dtype=}")
    for name, vec in (("norm_weight", norm_weight), ("delta_weight", delta_weight)):
        if vec is not None and vec.shape != (d,):
            raise ValueError(f"{name} must be [D] = [{d}]: got {vec.shape}")
    if (delta is None) != (delta_weight is None):
        raise ValueError("delta and delta_weight go together (x_in = x + rmsnorm(delta, delta_weight))")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(f"delta must match x: {delta.shape=} {delta.dtype=} {x.shape=} {x.dtype=}")


@functools.partial(
    jax.jit, static_argnames=("eps", "geglu", "interpret", "block_n", "block_k", "num_warps", "num_stages")
)
def norm_gemv(x, w, norm_weight=None, *, delta=None, delta_weight=None, eps=1e-6, geglu=False, interpret=False,
              block_n=None, block_k=None, num_warps=None, num_stages=None):
    """(y, x_in): y [B, N] (geglu: [B, N / 2]) in x's dtype; x_in is x itself when no ``delta`` is given."""
    _check(x, w, norm_weight, delta, delta_weight, geglu)
    b, d = x.shape
    n_out = w.shape[0] // 2 if geglu else w.shape[0]
    cfg = DEFAULT_CONFIG
    bn = _largest_pow2_divisor(n_out, block_n or cfg.block_n)
    bk = _largest_pow2_divisor(d, block_k or cfg.block_k)
    if bn < 16 or bk < 16:
        raise ValueError(f"no power-of-two block >= 16 divides the shapes: {n_out=} {d=} {bn=} {bk=}")
    has_delta, has_norm = delta is not None, norm_weight is not None
    full = lambda i: (0, 0)
    vec = pl.BlockSpec((d,), lambda i: (0,))
    args, specs = [x], [pl.BlockSpec((b, d), full)]
    if has_delta:
        args += [delta, delta_weight]
        specs += [pl.BlockSpec((b, d), full), vec]
    if has_norm:
        args.append(norm_weight)
        specs.append(vec)
    args.append(w)
    specs.append(pl.BlockSpec((bn, d), lambda i: (i, 0)))
    if geglu:  # the same weight again: its up rows
        up0 = n_out // bn
        args.append(w)
        specs.append(pl.BlockSpec((bn, d), lambda i: (i + up0, 0)))
    out_shape = [jax.ShapeDtypeStruct((b, n_out), x.dtype)]
    out_specs = [pl.BlockSpec((b, bn), lambda i: (0, i))]
    if has_delta:
        out_shape.append(jax.ShapeDtypeStruct((b, d), x.dtype))
        out_specs.append(pl.BlockSpec((b, d), full))
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, b=b, bp=MAX_ROWS, d=d, bk=bk, eps=float(eps), has_delta=has_delta,
                               has_norm=has_norm, geglu=geglu, precision=precision)
    outs = pl.pallas_call(
        kernel,
        grid=(n_out // bn,),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps or cfg.num_warps, num_stages or cfg.num_stages),
        interpret=interpret,
        name="norm_gemv_geglu" if geglu else "norm_gemv",
    )(*args)
    return outs[0], (outs[1] if has_delta else x)


def _rmsnorm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def norm_gemv_reference(x, w, norm_weight=None, *, delta=None, delta_weight=None, eps=1e-6, geglu=False):
    """Pure-jnp oracle of norm_gemv (same roundings, float32 products)."""
    _check(x, w, norm_weight, delta, delta_weight, geglu)
    x_in = x if delta is None else (x + _rmsnorm(delta, delta_weight, eps)).astype(x.dtype)
    xn = x_in if norm_weight is None else _rmsnorm(x_in, norm_weight, eps)
    y = jnp.einsum("bd,nd->bn", xn, w, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    y = y.astype(x.dtype)
    if geglu:
        gate, up = jnp.split(y, 2, axis=1)
        y = (jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(x.dtype) * up).astype(x.dtype)
    return y, x_in
