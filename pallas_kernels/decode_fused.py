"""Pallas (Triton) decode attention fused with the rest of a layer's attention step, one token per row.

From the layer's raw projection qkv [B, N + 2K, H] (q heads, then k heads, then v heads) at position ``pos``:

    q = rope(rmsnorm(q_raw, q_norm)),  k = rope(rmsnorm(k_raw, k_norm)),  v = v_raw
    k, v are written into the cache buffers [B, S, K, H] at slot pos (global) or pos % S (ring), in place
    out = softmax(q k^T * scale) v over the cache's held older positions and the new token itself

Why: in XLA these are several small kernels per layer (q/k norms, RoPE, converts, two cache writes, padding the
query rows), whose launches are a visible share of a batch-1 decode step's time per layer. Norms and RoPE round
to the activation dtype where transformers' eager bf16 code does.

Design, on top of pallas_kernels/decode_attention.py (same grid (B, K, splits), same split of each row's
valid key blocks, same log-sum-exp combine in jnp):
- Older slots held: n_old = min(pos, S). A ring buffer with pos >= S holds S older slots, of which slot
  pos % S (position pos - S, just outside the window) is excluded: the mask is col < n_old and col != excl.
- The new token never has to be read back: split 0 adds it to its softmax from registers and writes it to
  the cache. The slot it writes is masked in every program, so whether another program reads the old or
  the new value there does not matter.
- Head dims are powers of two (32..256), computed as two halves, which is also how RoPE's rotate-half pairs
  columns: no register permutation is needed.
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
from pallas_kernels.common import DTYPES, LOG2E, ex2_approx, next_pow2
from pallas_kernels.decode_attention import (
    choose_splits,
    combine_splits,
    split_ranges,
)
from pallas_kernels.tuning import compiler_params, decode_config

_META = 8  # per (row, split): lo, hi, n_old, excluded slot, write slot, 3 unused (a power of two)


def _kernel(meta_ref, qkv_ref, qn_ref, kn_ref, cos_ref, sin_ref, kc_ref, vc_ref,
            acc_ref, m_ref, l_ref, kc_out, vc_out, *, g, gp, n, k_heads, block_k, qk_scale, eps, precision,
            fast_exp2):
    exp2 = ex2_approx if fast_exp2 else jnp.exp2
    lo, hi, n_old, excl, slot = (meta_ref[i] for i in range(5))
    hh, split = pl.program_id(1), pl.program_id(2)
    slots, h = kc_ref.shape
    half = h // 2
    f32, dt = jnp.float32, qkv_ref.dtype
    rnd = lambda t: t.astype(dt).astype(f32)
    lo_cols, hi_cols = pl.ds(0, half), pl.ds(half, half)

    cos_a, cos_b = cos_ref[lo_cols].astype(f32)[None, :], cos_ref[hi_cols].astype(f32)[None, :]
    sin_a, sin_b = sin_ref[lo_cols].astype(f32)[None, :], sin_ref[hi_cols].astype(f32)[None, :]

    def norm_rope(xa, xb, w_ref):
        """[r, half] halves: Gemma RMSNorm over the whole head, then rotate-half RoPE (x*cos + rot(x)*sin)."""
        inv = lax.rsqrt((jnp.sum(xa * xa, axis=1) + jnp.sum(xb * xb, axis=1)) / h + eps)[:, None]
        xa = rnd(xa * inv * (1.0 + w_ref[lo_cols].astype(f32))[None, :])
        xb = rnd(xb * inv * (1.0 + w_ref[hi_cols].astype(f32))[None, :])
        return rnd(rnd(xa * cos_a) - rnd(xb * sin_a)), rnd(rnd(xb * cos_b) + rnd(xa * sin_b))

    def row(r, cols):
        return qkv_ref[pl.ds(r, 1), cols].astype(f32)  # [1, half]

    # This kv head's g query heads as [gp, half] tiles (rows >= g zero: Triton's dot needs 16 rows).
    rid = lax.broadcasted_iota(jnp.int32, (gp, half), 0)
    qa = qb = jnp.zeros((gp, half), f32)
    for r in range(g):
        qa = jnp.where(rid == r, row(hh * g + r, lo_cols), qa)
        qb = jnp.where(rid == r, row(hh * g + r, hi_cols), qb)
    qa, qb = norm_rope(qa, qb, qn_ref)
    ka_new, kb_new = norm_rope(row(n + hh, lo_cols), row(n + hh, hi_cols), kn_ref)  # [1, half]
    va_new, vb_new = row(n + k_heads + hh, lo_cols), row(n + k_heads + hh, hi_cols)

    @pl.when((split == 0) & (slot < slots))
    def _write():
        at = pl.ds(slot, 1)
        kc_out[at, lo_cols] = ka_new.astype(kc_out.dtype)
        kc_out[at, hi_cols] = kb_new.astype(kc_out.dtype)
        vc_out[at, lo_cols] = va_new.astype(vc_out.dtype)
        vc_out[at, hi_cols] = vb_new.astype(vc_out.dtype)

    q_a, q_b = qa.astype(kc_ref.dtype), qb.astype(kc_ref.dtype)
    dims_qk = (((1,), (1,)), ((), ()))
    dims_pv = (((1,), (0,)), ((), ()))

    def dot(a, b, dims):
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)

    def step(kb, carry):
        acc_a, acc_b, m, l = carry
        start = kb * block_k
        at = pl.ds(jnp.minimum(start, slots - block_k), block_k)  # the last block may stick out: shift back
        s = dot(q_a, kc_ref[at, lo_cols], dims_qk) + dot(q_b, kc_ref[at, hi_cols], dims_qk)  # [gp, block_k]
        col = jnp.minimum(start, slots - block_k) + jnp.arange(block_k, dtype=jnp.int32)
        ok = (col >= start) & (col < n_old) & (col != excl)
        s = jnp.where(ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * qk_scale)
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # never -inf - -inf
        alpha = exp2(m - m_use)
        p = exp2(s * qk_scale - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        p = p.astype(vc_ref.dtype)
        acc_a = acc_a * alpha[:, None] + dot(p, vc_ref[at, lo_cols], dims_pv)
        acc_b = acc_b * alpha[:, None] + dot(p, vc_ref[at, hi_cols], dims_pv)
        return acc_a, acc_b, m_new, l

    init = (jnp.zeros((gp, half), f32), jnp.zeros((gp, half), f32), jnp.full((gp,), -jnp.inf, f32),
            jnp.zeros((gp,), f32))
    acc_a, acc_b, m, l = lax.fori_loop(lo, hi, step, init)

    # Split 0 adds the new token (always allowed: j = i) from registers.
    s_new = (jnp.sum(qa * ka_new, axis=1) + jnp.sum(qb * kb_new, axis=1)) * qk_scale  # [gp]
    m2 = jnp.maximum(m, s_new)
    alpha, p = exp2(m - m2), exp2(s_new - m2)
    first = split == 0
    acc_a = jnp.where(first, acc_a * alpha[:, None] + p[:, None] * va_new, acc_a)
    acc_b = jnp.where(first, acc_b * alpha[:, None] + p[:, None] * vb_new, acc_b)
    m, l = jnp.where(first, m2, m), jnp.where(first, l * alpha + p, l)
    # Only the g real rows go out ([g, H] partials, not [gp, H]: 8x fewer bytes for the combine at G = 2).
    rid1 = lax.broadcasted_iota(jnp.int32, (gp,), 0)
    for r in range(g):
        pick = rid == r
        acc_ref[pl.ds(r, 1), lo_cols] = jnp.sum(jnp.where(pick, acc_a, 0.0), axis=0, keepdims=True)
        acc_ref[pl.ds(r, 1), hi_cols] = jnp.sum(jnp.where(pick, acc_b, 0.0), axis=0, keepdims=True)
        m_ref[pl.ds(r, 1)] = jnp.max(jnp.where(rid1 == r, m, -jnp.inf), keepdims=True)
        l_ref[pl.ds(r, 1)] = jnp.sum(jnp.where(rid1 == r, l, 0.0), keepdims=True)


def supports_head_dim(h: int) -> bool:
    """Head dims this kernel takes: powers of two 32..256 (two power-of-two halves >= 16 for Triton's dot)."""
    return 32 <= h <= 256 and not h & (h - 1)


def check_fused_args(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, ring, scale, eps):
    """Trace-time checks (pallas_kernels/checks.py): shapes, dtypes and static values always, pos when concrete."""
    for name, x in (("qkv", qkv), ("q_norm", q_norm), ("k_norm", k_norm), ("cos", cos), ("sin", sin),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a float dtype, got {x.dtype}")
    if qkv.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"qkv must be [B, N+2K, H] and k/v caches [B, S, K, H]: {qkv.shape=} {k_cache.shape=} "
                         f"{v_cache.shape=}")
    b, m, h = qkv.shape
    kb, s, kh, hk = k_cache.shape
    n = m - 2 * kh
    if kb != b or hk != h or n < kh or n % kh:
        raise ValueError(f"qkv rows must be N query heads (a multiple of K) + 2K: {qkv.shape=} {k_cache.shape=}")
    if not supports_head_dim(h):
        raise ValueError(f"the fused decode kernel takes power-of-two head dims 32..256: {qkv.shape=}")
    for name, x, want in (("q_norm", q_norm, (h,)), ("k_norm", k_norm, (h,)), ("cos", cos, (b, h)),
                          ("sin", sin, (b, h))):
        if tuple(jnp.shape(x)) != want:
            raise ValueError(f"{name} must have shape {want}: got {name}.shape={jnp.shape(x)}")
    if qkv.dtype not in DTYPES or k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype:
        raise ValueError(f"qkv and caches must share a bf16/fp16/fp32 dtype: {qkv.dtype=} {k_cache.dtype=} "
                         f"{v_cache.dtype=}")
    if not hasattr(pos, "shape") or tuple(pos.shape) != (b,):
        raise ValueError(f"pos must have shape {(b,)}: got pos.shape={tuple(jnp.shape(pos))}")
    pos = checks.int_array("pos", pos, (b,), "[B]")
    ring = checks.flag("ring", ring)
    checks.positive_number("scale", scale)
    checks.positive_number("eps", eps)
    if checks.is_concrete(pos):  # a global buffer must have room for the token (the engine checks it on the host)
        vals = np.asarray(pos)
        bad = (vals < 0) if ring else (vals < 0) | (vals >= s)
        if bad.any():
            where = "[0, inf)" if ring else f"[0, {s}) (a global cache of {s} slots)"
            raise ValueError(f"pos must lie in {where}: got {vals.tolist()} (row {int(np.argmax(bad))})")


def decode_attention_fused(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, *, ring, scale, eps,
                           interpret=False, block_k=None, num_splits=None, num_warps=None, num_stages=None,
                           fast_exp2=None):
    """-> (out [B, N, H] in qkv's dtype, k_cache, v_cache with the new token written). See the module doc.

    pos [B] integer. A global buffer (ring=False) must have room, pos < S: refused (ValueError) when pos is
    concrete; traced, the engine checks it on the host and a token beyond it is not stored. Bad arguments raise
    a TypeError (dtype or kind) or ValueError (shape or value) naming the argument."""
    check_fused_args(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, ring, scale, eps)
    checks.static_int("block_k", block_k, minimum=16, pow2=True)  # Triton's dot needs >= 16 keys per tile
    checks.static_int("num_splits", num_splits)
    checks.static_int("num_warps", num_warps)
    checks.static_int("num_stages", num_stages)
    checks.flag("interpret", interpret)
    return _decode_attention_fused(
        qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, ring=bool(ring), scale=float(scale), eps=float(eps),
        interpret=bool(interpret), block_k=block_k, num_splits=num_splits, num_warps=num_warps,
        num_stages=num_stages, fast_exp2=fast_exp2)


@functools.partial(
    jax.jit,
    static_argnames=("ring", "scale", "eps", "interpret", "block_k", "num_splits", "num_warps", "num_stages",
                     "fast_exp2"),
)
def _decode_attention_fused(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, *, ring, scale, eps, interpret,
                            block_k, num_splits, num_warps, num_stages, fast_exp2):
    """decode_attention_fused after its argument checks."""
    b, m, h = qkv.shape
    _, s, kh, _ = k_cache.shape
    n = m - 2 * kh
    g = n // kh
    gp = max(16, next_pow2(g))
    cfg = decode_config(h, jnp.dtype(qkv.dtype).itemsize)
    fast = (cfg.fast_exp2 if fast_exp2 is None else bool(fast_exp2)) and not interpret
    pos = jnp.asarray(pos, jnp.int32)

    n_old = jnp.minimum(pos, s)  # a global buffer without room (pos >= S, outside the contract) attends S + 1
    excl = jnp.where(pos >= s, pos % s, -1) if ring else jnp.full_like(pos, -1)
    slot = pos % s if ring else pos  # >= s (no room): not written

    padded = max(16, s)  # a block must fit in the buffer; only tiny caches (< 16 slots) are padded
    if padded != s:
        k_cache = jnp.pad(k_cache, ((0, 0), (0, padded - s), (0, 0), (0, 0)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, padded - s), (0, 0), (0, 0)))
        slot = jnp.where(slot < s, slot, padded)  # keep "no room" out of the padding
    bk = min(block_k or cfg.block_k, 1 << (padded.bit_length() - 1))
    splits = choose_splits(b, kh, -(-padded // bk), num_splits)
    meta = split_ranges(n_old, splits, bk, excl)
    meta = jnp.concatenate([meta, jnp.broadcast_to(slot[:, None, None], (b, splits, 1)),
                            jnp.zeros((b, splits, _META - 5), jnp.int32)], axis=-1)

    precision = lax.Precision.HIGHEST if qkv.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, g=g, gp=gp, n=n, k_heads=kh, block_k=bk, qk_scale=float(scale) * LOG2E,
                               eps=float(eps), precision=precision, fast_exp2=fast)
    f32 = jnp.float32
    cache_spec = pl.BlockSpec((None, padded, None, h), lambda bb, hh, sp: (bb, 0, hh, 0))
    vec = pl.BlockSpec((h,), lambda bb, hh, sp: (0,))
    per_row = pl.BlockSpec((None, h), lambda bb, hh, sp: (bb, 0))
    acc, m_, l_, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(b, kh, splits),
        in_specs=[
            pl.BlockSpec((None, None, _META), lambda bb, hh, sp: (bb, sp, 0)),
            pl.BlockSpec((None, m, h), lambda bb, hh, sp: (bb, 0, 0)),
            vec, vec, per_row, per_row, cache_spec, cache_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, g, h), lambda bb, hh, sp: (bb, hh, sp, 0, 0)),
            pl.BlockSpec((None, None, None, g), lambda bb, hh, sp: (bb, hh, sp, 0)),
            pl.BlockSpec((None, None, None, g), lambda bb, hh, sp: (bb, hh, sp, 0)),
            cache_spec, cache_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, splits, g, h), f32),
            jax.ShapeDtypeStruct((b, kh, splits, g), f32),
            jax.ShapeDtypeStruct((b, kh, splits, g), f32),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ],
        input_output_aliases={6: 3, 7: 4},
        compiler_params=compiler_params(num_warps or cfg.num_warps, num_stages or cfg.num_stages),
        interpret=interpret,
        name="decode_attention_fused",
    )(meta, qkv, q_norm, k_norm, cos, sin, k_cache, v_cache)
    if padded != s:
        k_cache, v_cache = k_cache[:, :s], v_cache[:, :s]
    return combine_splits(acc, m_, l_, g, h, qkv.dtype, interpret), k_cache, v_cache
