"""Pallas (Triton) flash-decoding: one query token per row over a KV cache buffer.

q [B, N, H]; k, v [B, S, K, H] (cache layout of gemma3_jax/model/kv_cache.py); row b attends the slots s < lengths[b].
Slot order does not matter (softmax is permutation invariant), so a sliding-window ring buffer of W slots
after writing position pos is simply lengths = min(pos + 1, W), a full buffer lengths = pos + 1.

Design (decode is memory bound: each K/V byte is read once):
- Grid (B, K, splits). A program takes the G = N // K query heads of one kv head (padded with zero rows to
  Gp = max(16, next_pow2(G)) for Triton's dot) and one contiguous run of whole key blocks of its row.
- Splits divide each row's *valid* blocks ceil(lengths[b] / block_k) (computed outside, O(B * splits)), so
  all splits get work whatever the length; programs with an empty range load no K/V and write m = -inf,
  l = 0, acc = 0. Each program writes its unnormalised partial (acc [Gp, Hp], m [Gp], l [Gp], log2 units);
  the log-sum-exp combine across splits runs in jnp (O(B * N * splits * H)).
- Only a program's last block is masked (slot >= its block start and < lengths[b]). The cache's last block
  may stick out of the buffer when S % block_k != 0: its load is shifted back to start at S - block_k and
  the overlap (already seen by the block before) is masked, so the cache is never padded or copied along S.
  The head dim is padded to a power of two (a copy of K/V) only when H is not one (H = 72, say).

Public pallas (pl) and pallas.triton APIs only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import checks
from pallas_kernels.common import LOG2E, ex2_approx, next_pow2
from pallas_kernels.tuning import TARGET_PROGRAMS, compiler_params, decode_config

def _kernel(meta_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block_k, qk_scale, precision, fast_exp2):
    """One program: Gp query rows (the heads of one kv head) x key blocks [lo, hi) of one row.

    Online softmax in log2 units, p = exp2(s * qk_scale - m), qk_scale = scale * log2(e).
    """
    exp2 = ex2_approx if fast_exp2 else jnp.exp2
    lo, hi, length = meta_ref[0], meta_ref[1], meta_ref[2]
    slots = k_ref.shape[0]
    q = q_ref[...]
    gp, d = q.shape
    f32 = jnp.float32
    init = (jnp.zeros((gp, d), f32), jnp.full((gp,), -jnp.inf, f32), jnp.zeros((gp,), f32))
    dims_qk = (((1,), (1,)), ((), ()))
    dims_pv = (((1,), (0,)), ((), ()))

    def step(kb, carry, masked):
        acc, m, l = carry
        start = kb * block_k
        if masked:  # the cache's last block may stick out: load [S - block_k, S), mask what came before start
            load_at = jnp.minimum(start, slots - block_k)
        else:
            load_at = pl.multiple_of(start, block_k)
        k = k_ref[pl.ds(load_at, block_k), :]
        v = v_ref[pl.ds(load_at, block_k), :]
        s = lax.dot_general(q, k, dims_qk, precision=precision, preferred_element_type=f32)  # [Gp, block_k]
        if masked:
            col = load_at + jnp.arange(block_k, dtype=jnp.int32)
            s = jnp.where(((col >= start) & (col < length))[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * qk_scale)
        # A block always holds a valid slot (start < length), but guard anyway: a row whose max is still -inf
        # subtracts 0, so exp2(-inf) = 0 and never NaN (as in attention.py).
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = exp2(m - m_use)
        p = exp2(s * qk_scale - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, dims_pv, precision=precision, preferred_element_type=f32)
        return acc * alpha[:, None] + pv, m_new, l

    last = jnp.maximum(hi - 1, lo)  # hi <= lo: both loops are empty, no K/V is loaded
    carry = lax.fori_loop(lo, last, functools.partial(step, masked=False), init)
    acc, m, l = lax.fori_loop(last, hi, functools.partial(step, masked=True), carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def check_decode_args(q, k, v, lengths, scale):
    """Trace-time checks (pallas_kernels/checks.py): shapes and dtypes always, lengths' values when concrete."""
    q, k, v = checks.qkv_arrays(q, k, v, q_rank=3)
    b, n, h = q.shape
    bk_, s, kh, hk = k.shape
    if bk_ != b:
        raise ValueError(f"k's batch must equal q's (batch/head-dim mismatch): {q.shape=} {k.shape=}")
    if hk != h:
        raise ValueError(f"k's head dim must equal q's (batch/head-dim mismatch): {q.shape=} {k.shape=}")
    if kh == 0 or n % kh:
        raise ValueError(f"N (query heads) must be a multiple of K (kv heads): {q.shape=} {k.shape=}")
    if s < 1:
        raise ValueError(f"the cache needs at least one slot: {k.shape=}")
    if not 0 < h <= 256:
        raise ValueError(f"head dim must be in 1..256: {q.shape=}")
    if not hasattr(lengths, "shape") or tuple(lengths.shape) != (b,):
        shape = tuple(getattr(lengths, "shape", np.shape(lengths)))
        raise ValueError(f"lengths must be an integer [B] array: lengths.shape={shape} {q.shape=}")
    checks.lengths_in_range("lengths", checks.int_array("lengths", lengths, (b,), "[B]"), s)
    checks.positive_number("scale", scale)


def decode_attention(
    q, k, v, lengths, *, scale, interpret=False, block_k=None, num_splits=None, num_warps=None, num_stages=None,
    fast_exp2=None,
):
    """q [B, N, H], k/v [B, S, K, H] of q's dtype (bf16/fp16/fp32, N a multiple of K), lengths [B] integer in
    [0, S] -> [B, N, H] in q's dtype; rows with length 0 are zeros. Bad arguments raise a TypeError (dtype or
    kind) or ValueError (shape or value) naming the argument; lengths' values are checked when concrete."""
    check_decode_args(q, k, v, lengths, scale)
    checks.static_int("block_k", block_k, minimum=16, pow2=True)  # Triton's dot needs >= 16 keys per tile
    checks.static_int("num_splits", num_splits)
    checks.static_int("num_warps", num_warps)
    checks.static_int("num_stages", num_stages)
    checks.flag("interpret", interpret)
    return _decode_attention(q, k, v, lengths, scale=float(scale), interpret=bool(interpret), block_k=block_k,
                             num_splits=num_splits, num_warps=num_warps, num_stages=num_stages, fast_exp2=fast_exp2)


@functools.partial(
    jax.jit, static_argnames=("scale", "interpret", "block_k", "num_splits", "num_warps", "num_stages", "fast_exp2")
)
def _decode_attention(q, k, v, lengths, *, scale, interpret, block_k, num_splits, num_warps, num_stages, fast_exp2):
    """decode_attention after its argument checks."""
    b, n, h = q.shape
    _, s, kh, _ = k.shape
    g = n // kh
    gp, hp = max(16, next_pow2(g)), max(16, next_pow2(h))
    cfg = decode_config(hp, jnp.dtype(q.dtype).itemsize)
    fast = (cfg.fast_exp2 if fast_exp2 is None else bool(fast_exp2)) and not interpret
    lengths = jnp.clip(jnp.asarray(lengths, jnp.int32), 0, s)  # never read past the buffer

    if s < 16:  # a block must fit in the buffer; only tiny caches are padded (cheap)
        k = jnp.pad(k, ((0, 0), (0, 16 - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 16 - s), (0, 0), (0, 0)))
    slots = k.shape[1]
    bk = min(block_k or cfg.block_k, 1 << (slots.bit_length() - 1))  # power of two <= slots
    splits = choose_splits(b, kh, -(-slots // bk), num_splits)

    meta = split_ranges(lengths, splits, bk)

    q4 = q.reshape(b, kh, g, h)
    if (gp, hp) != (g, h):
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, gp - g), (0, hp - h)))
    if hp != h:  # non-power-of-two head dim (72): Triton needs power-of-two tiles, so K/V are copied once here
        k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, hp - h)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, hp - h)))

    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, block_k=bk, qk_scale=float(scale) * LOG2E, precision=precision,
                               fast_exp2=fast)
    f32 = jnp.float32
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda bb, hh, sp: (bb, sp, 0)),
            pl.BlockSpec((None, None, gp, hp), lambda bb, hh, sp: (bb, hh, 0, 0)),
            pl.BlockSpec((None, slots, None, hp), lambda bb, hh, sp: (bb, 0, hh, 0)),
            pl.BlockSpec((None, slots, None, hp), lambda bb, hh, sp: (bb, 0, hh, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, hp), lambda bb, hh, sp: (bb, hh, sp, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bb, hh, sp: (bb, hh, sp, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bb, hh, sp: (bb, hh, sp, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, splits, gp, hp), f32),
            jax.ShapeDtypeStruct((b, kh, splits, gp), f32),
            jax.ShapeDtypeStruct((b, kh, splits, gp), f32),
        ],
        compiler_params=compiler_params(num_warps or cfg.num_warps, num_stages or cfg.num_stages),
        interpret=interpret,
        name="decode_attention",
    )(meta, q4, k, v)

    return combine_splits(acc, m, l, g, h, q.dtype, interpret)


def split_ranges(lengths, splits: int, block_k: int, extra=None):
    """[B, splits, 4] int32 per (row, split): key-block range [lo, hi) = this split's share of the row's
    ceil(lengths / block_k) valid blocks, the row's length, and ``extra`` [B] (0 when None)."""
    row_blocks = -(-lengths // block_k)  # [B]
    per = -(-row_blocks // splits)
    lo = jnp.minimum(jnp.arange(splits, dtype=jnp.int32)[None, :] * per[:, None], row_blocks[:, None])
    hi = jnp.minimum(lo + per[:, None], row_blocks[:, None])
    extra = jnp.zeros_like(lo) if extra is None else jnp.broadcast_to(extra[:, None], lo.shape)
    return jnp.stack([lo, hi, jnp.broadcast_to(lengths[:, None], lo.shape), extra], axis=-1)


def choose_splits(b: int, kh: int, n_blocks: int, num_splits: int | None = None) -> int:
    """Splits per (row, kv head), a power of two (the combine loads all of them at once): the largest one
    <= min(~2 waves of programs, blocks in the buffer), or ``num_splits`` rounded up to one."""
    if num_splits:
        return next_pow2(min(num_splits, n_blocks))
    want = max(1, min(-(-TARGET_PROGRAMS // (b * kh)), n_blocks))
    return 1 << (want.bit_length() - 1)


def combine_row(m, l, acc):
    """Log-sum-exp of one query row's split partials m, l [P] (log2 units) and acc [P, H] f32 -> [H] f32.

    Empty splits (m = -inf, l = 0) weigh nothing; a row with no key at all comes out as exact zeros."""
    m_max = jnp.max(m)
    w = jnp.exp2(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))  # empty splits: exp2(-inf) = 0, never NaN
    l_sum = jnp.sum(w * l)
    return jnp.sum(acc * w[:, None], axis=0) / jnp.where(l_sum == 0.0, 1.0, l_sum)  # no key: exact zeros


def _combine_kernel(acc_ref, m_ref, l_ref, o_ref):
    """One query row of one (row, kv head): log-sum-exp over all splits at once (one load of each)."""
    out = combine_row(m_ref[...], l_ref[...], acc_ref[...].astype(jnp.float32))
    o_ref[...] = out.astype(o_ref.dtype)


def combine_splits(acc, m, l, g: int, h: int, dtype, interpret: bool = False):
    """Log-sum-exp combine of per-split partials acc [B, K, P, G', H'], m and l [B, K, P, G'] (G' >= g rows
    per kv head, of which the first g are real; m in log2 units; empty splits have m = -inf, l = 0, acc = 0)
    -> [B, K * g, h] in ``dtype``; rows with no key are exact zeros.

    One small Pallas kernel, a program per query row (grid B x K x g), P a power of two: in jnp the combine
    is several XLA kernels per layer."""
    b, kh, splits, _, hp = acc.shape
    if splits & (splits - 1):
        raise ValueError(f"the number of splits must be a power of two: {acc.shape=}")
    out = pl.pallas_call(
        _combine_kernel,
        grid=(b, kh, g),
        in_specs=[
            pl.BlockSpec((None, None, splits, None, hp), lambda bb, hh, r: (bb, hh, 0, r, 0)),
            pl.BlockSpec((None, None, splits, None), lambda bb, hh, r: (bb, hh, 0, r)),
            pl.BlockSpec((None, None, splits, None), lambda bb, hh, r: (bb, hh, 0, r)),
        ],
        out_specs=pl.BlockSpec((None, None, hp), lambda bb, hh, r: (bb, hh * g + r, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kh * g, hp), dtype),
        compiler_params=compiler_params(4, 1),
        interpret=interpret,
        name="decode_combine",
    )(acc, m, l)
    return out if hp == h else out[..., :h]
