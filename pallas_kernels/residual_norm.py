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

``prefetch``: at batch 1 this kernel is a few programs waiting on memory latency while the GPU's bandwidth idles,
and the product after it streams its weight from memory. Extra programs read row windows of that weight (kept
in L2 with an evict-last hint) and store only a checksum each, so the product finds those rows in L2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

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


PREFETCH_TILE_BYTES = 16384  # a prefetch program's rows: the tile stays in registers (~32 per thread at 4 warps)


def prefetch_plan(w_shape, itemsize: int, windows) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(rows a prefetch program reads, (first block, blocks) per row window): windows (start, rows) of a weight
    [N, K], each rounded out to whole tiles and kept inside the weight."""
    n, k = w_shape
    rows = max(1, min(n, 1 << max(0, (PREFETCH_TILE_BYTES // max(1, k * itemsize)).bit_length() - 1)))
    while n % rows:
        rows //= 2
    plan = []
    for start, count in windows:
        first, last = max(0, start) // rows, min(n, start + count)
        if last > first * rows:
            plan.append((first, -(-last // rows) - first))
    return rows, tuple(plan)


def _prefetch(w_ref, pf_ref, pieces):
    """Read this program's rows of the next product's weight into L2; the checksum makes the loads observable."""
    total = None
    for o, s in pieces:
        t = plgpu.load(w_ref.at[:, pl.ds(o, s)], eviction_policy="evict_last").astype(jnp.float32).sum()
        total = t if total is None else total + t
    pf_ref[...] = jnp.full(pf_ref.shape, total, jnp.float32)


def _kernel(x_ref, delta_ref, wpost_ref, wnext_ref, *refs, pieces, d, eps, splits, rows, pf_pieces):
    if pf_pieces is None:
        _residual_norm(x_ref, delta_ref, wpost_ref, wnext_ref, *refs, pieces=pieces, d=d, eps=eps, splits=splits)
        return
    pf_w, xo_ref, xn_ref, pf_ref = refs
    i = pl.program_id(0)

    @pl.when(i < rows)
    def _():
        _residual_norm(x_ref, delta_ref, wpost_ref, wnext_ref, xo_ref, xn_ref, pieces=pieces, d=d, eps=eps,
                       splits=splits)

    @pl.when(i >= rows)
    def _():
        _prefetch(pf_w, pf_ref, pf_pieces)


def _residual_norm(x_ref, delta_ref, wpost_ref, wnext_ref, xo_ref, xn_ref, *, pieces, d, eps, splits):
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


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps", "prefetch_rows", "checksums"))
def residual_norm(x, delta, post_weight, next_weight, *, eps, interpret=False, num_warps=4, prefetch=None,
                  prefetch_rows=(), checksums=False):
    """(x_new, x_n), both shaped and typed like x [..., D]; delta like x, or f32 partials [S, ...x's shape].

    ``prefetch`` [N, K] with ``prefetch_rows`` ((start, rows), ...): those rows of the next product's weight are
    read into L2 by programs of their own (see the module doc); ``checksums``: also return each program's sum of
    what it read, [programs] f32 (for tests)."""
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
    n_rows = rows.shape[0]
    last = n_rows - 1  # prefetch programs (ids past the rows) keep the row blocks' indices in range
    row = pl.BlockSpec((None, d), lambda i: (jnp.minimum(i, last), 0))
    vec = pl.BlockSpec((d,), lambda i: (0,))
    if splits:
        delta_spec = pl.BlockSpec((splits, None, d), lambda i: (0, jnp.minimum(i, last), 0))
        delta = delta.reshape(splits, -1, d)
    else:
        delta_spec, delta = row, delta.reshape(-1, d)
    in_specs, out_specs = [row, delta_spec, vec, vec], [row, row]
    out_shape, args = [jax.ShapeDtypeStruct(rows.shape, x.dtype)] * 2, [rows, delta, post_weight, next_weight]
    plan, pf_pieces, programs = (), None, n_rows
    if prefetch is not None and prefetch_rows:
        if prefetch.ndim != 2:
            raise ValueError(f"prefetch must be a weight [N, K]: {prefetch.shape=}")
        tile, plan = prefetch_plan(prefetch.shape, prefetch.dtype.itemsize, prefetch_rows)
    if plan:
        blocks = sum(c for _, c in plan)
        pf_pieces, programs = pow2_pieces(prefetch.shape[1]), n_rows + blocks

        def pf_block(i):  # prefetch program j reads block j of the windows laid end to end
            j = jnp.maximum(i - n_rows, 0)
            block, start = plan[0][0] + j, 0
            for first, count in plan:
                block = jnp.where((j >= start) & (j < start + count), first + j - start, block)
                start += count
            return block, 0

        in_specs.append(pl.BlockSpec((tile, prefetch.shape[1]), pf_block))
        out_specs.append(pl.BlockSpec((None, 16), lambda i: (jnp.maximum(i - n_rows, 0), 0)))
        out_shape.append(jax.ShapeDtypeStruct((blocks, 16), jnp.float32))
        args.append(prefetch)
    outs = pl.pallas_call(
        functools.partial(_kernel, pieces=pow2_pieces(d), d=d, eps=float(eps), splits=splits, rows=n_rows,
                          pf_pieces=pf_pieces),
        grid=(programs,),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret,
        name="residual_norm_prefetch" if plan else "residual_norm",  # told apart in traces
    )(*args)
    x_new, x_n = outs[0].reshape(x.shape), outs[1].reshape(x.shape)
    if checksums:
        return x_new, x_n, (outs[2][:, 0] if plan else jnp.zeros((0,), jnp.float32))
    return x_new, x_n
