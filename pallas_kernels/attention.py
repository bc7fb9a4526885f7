"""Pallas (Triton) flash attention with the Gemma-3 image-span mask, in O(S) mask memory.

Mask (see reference.py): key j is allowed for query i iff ``j <= i or seg[i] == seg[j] >= 0``, with a
sliding window also ``j > i - W``, and never for ``j >= kv_lengths[b]``. For every query the allowed keys
are one interval [k_start, k_end) (segments.key_intervals). Outside the kernel, in O(S), each query
block gets its key-block range split into partial / full / partial phases (block_ranges.py); the kernel
loops only over that range and applies the two-comparison element mask only on the partial blocks.

Public pallas (pl) and pallas.triton (plgpu) APIs only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import checks
from pallas_kernels.block_ranges import block_ranges
from pallas_kernels.common import DTYPES, LOG2E, ex2_approx, next_pow2
from pallas_kernels.segments import key_intervals
from pallas_kernels.tuning import compiler_params, default_config


def padded_head_dim(d: int) -> int:
    """The head dim rounded up to a multiple of 16: the width the kernel computes on (SigLIP's 72 -> 80)."""
    return -(-d // 16) * 16


def head_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) pieces of a head dim padded to a multiple of 16, each a power of two >= 16.

    Triton tiles have power-of-two sides and a dot needs >= 16 along the contraction, so D=72 is computed
    as 64 + 16 columns (80, 11% padding) instead of one 128-wide tile (78% padding): SigLIP's head dim.
    """
    rest, off, out = padded_head_dim(d), 0, []
    while rest:
        w = 1 << (rest.bit_length() - 1)
        out.append((off, w))
        off, rest = off + w, rest - w
    return tuple(out)


# The no-mask loop's fixed softmax offset: block 0's row max (log2 units) + FIXED_SHIFT, so block 0's largest
# probability is 2^-32. The result is exact (up to rounding, which is relative) while every row's sum l of
# probabilities lies in FIXED_L_RANGE and the accumulators are finite: then no probability exceeds 2^80 (no
# overflow), and only keys below ~2^-94 of the row's largest weight underflow. A row outside it (a key whose logit
# beats block 0's max by ~110 log2 units, inf/NaN inputs) sends its program through the online-softmax loop.
FIXED_SHIFT = 32.0
FIXED_L_RANGE = (2.0**-60, 2.0**80)


def _kernel(meta_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, o_ref, *, chunks, block_k, qk_scale, precision,
            fast_exp2, masks, fixed_offset, sum_column=None):
    """One program: block_q queries of one query head over the key blocks of their range.

    Online softmax in the log2 domain: p = exp2(s * qk_scale - m), with qk_scale = scale * log2(e) so the
    scale multiply fuses into the subtraction (one FMA per logit). Masked logits are -inf. The head dim is
    processed in ``chunks`` (head_chunks): logits sum over them, each has its own accumulator.

    ``masks=False`` (a caller whose rows all see every key: SigLIP without padding): no element mask, one loop
    with a static trip count. With ``fixed_offset`` (bf16/f32 probabilities: f32's exponent range) also no
    running max: the offset m is fixed after block 0 (FIXED_SHIFT), so the exponentials never wait for a
    row-max reduction and the accumulators are never rescaled; a program with a row
    outside FIXED_L_RANGE or a non-finite accumulator is recomputed with the online softmax. ``sum_column``
    (fixed offset only): the index of a column of v that holds ones, whose P @ V is then the row sum l (no sum of
    the probabilities per block).
    ``masks=True``: one loop over [lo, hi) whose partly masked blocks (outside [f_lo, f_hi)) take the element
    mask behind a branch: one software pipeline per program instead of three loops that each refill it (V's
    address comes from the same ``start`` as K's, because Triton compiles the other form to a slower kernel).
    """
    exp2 = ex2_approx if fast_exp2 else jnp.exp2
    block_q = q_ref.shape[0]
    lo, f_lo, f_hi, hi = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    ks = ks_ref[...]
    ke = ke_ref[...]
    qs = [q_ref[:, off : off + w] for off, w in chunks]
    f32 = jnp.float32
    init = (
        tuple(jnp.zeros((block_q, w), f32) for _, w in chunks),
        jnp.full((block_q,), -jnp.inf, f32),
        jnp.zeros((block_q,), f32),
    )
    dims_qk = (((1,), (1,)), ((), ()))
    dims_pv = (((1,), (0,)), ((), ()))

    def scores(start):  # [block_q, block_k] logits of the key block at ``start``, summed over the chunks
        s = None
        for qc, (off, w) in zip(qs, chunks):
            kc = k_ref[pl.ds(start, block_k), off : off + w]
            part = lax.dot_general(qc, kc, dims_qk, precision=precision, preferred_element_type=f32)
            s = part if s is None else s + part
        return s

    def products(p, start):  # P @ V per chunk
        out = []
        for off, w in chunks:
            vc = v_ref[pl.ds(start, block_k), off : off + w]
            out.append(lax.dot_general(p.astype(vc.dtype), vc, dims_pv, precision=precision,
                                       preferred_element_type=f32))
        return out

    def step(kb, carry):
        acc, m, l = carry
        start = pl.multiple_of(kb * block_k, block_k)
        s = scores(start)
        if masks:
            col = start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
            s = lax.cond((kb < f_lo) | (kb >= f_hi),
                         lambda t: jnp.where((col >= ks[:, None]) & (col < ke[:, None]), t, -jnp.inf), lambda t: t, s)
        m_cand = jnp.maximum(m, jnp.max(s, axis=1) * qk_scale)
        # A row with no allowed key so far keeps m = -inf: subtract 0 instead, so exp2(-inf) = 0 and never
        # NaN. (A finite mask value is not safe: s*scale - m of two huge equal numbers can round to +ulp,
        # which exp2 turns into inf.) Without masks every block holds a finite max.
        m_use = jnp.where(m_cand == -jnp.inf, 0.0, m_cand) if masks else m_cand
        alpha = exp2(m - m_use)
        p = exp2(s * qk_scale - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = tuple(a * alpha[:, None] + pv for a, pv in zip(acc, products(p, start)))
        return acc, m_cand, l

    def online(first, last):
        acc, _, l = lax.fori_loop(first, last, step, init)
        return acc, l

    nk = k_ref.shape[0] // block_k
    if not fixed_offset:
        acc, l = online(lo, hi) if masks else online(0, nk)
    else:
        s0 = scores(0)
        m = jnp.max(s0, axis=1) * qk_scale + FIXED_SHIFT
        p0 = exp2(s0 * qk_scale - m[:, None])

        def fixed_step(kb, carry):
            acc, l = carry
            start = pl.multiple_of(kb * block_k, block_k)
            p = exp2(scores(start) * qk_scale - m[:, None])
            return tuple(a + pv for a, pv in zip(acc, products(p, start))), (
                l if sum_column is not None else l + jnp.sum(p, axis=1))

        acc, l = lax.fori_loop(1, nk, fixed_step, (tuple(products(p0, 0)), jnp.sum(p0, axis=1)))
        if sum_column is not None:  # l = P @ (v's column of ones), read once at the end
            for a, (off, w) in zip(acc, chunks):  # the chunk holding the column (a trace-time search)
                if off <= sum_column < off + w:
                    col = jnp.arange(w, dtype=jnp.int32)[None, :] + off
                    l = jnp.sum(jnp.where(col == sum_column, a, 0.0), axis=1)
        bad = (l < FIXED_L_RANGE[0]) | ~(l <= FIXED_L_RANGE[1])  # ~(<=): NaN counts as bad
        for a in acc:  # a sum, not a max: Triton's max ignores NaN; an overflowing sum only costs a fallback
            bad = bad | ~(jnp.abs(jnp.sum(a, axis=1)) < jnp.inf)
        acc, l = lax.cond(jnp.sum(bad.astype(jnp.int32)) > 0, lambda: online(0, nk), lambda: (acc, l))
    inv = 1.0 / jnp.where(l == 0.0, 1.0, l)
    nonempty = (ke > ks)[:, None]
    for a, (off, w) in zip(acc, chunks):
        out = a * inv[:, None]
        o_ref[:, off : off + w] = (jnp.where(nonempty, out, 0.0) if masks else out).astype(o_ref.dtype)


def _check(q, k, v, segment_ids, kv_lengths, block_q=None, block_k=None, *, sliding_window=None, scale=None,
           causal=True, num_warps=None, num_stages=None, q_offset=None, kv_start=None):
    """Trace-time checks of image_span_attention's / attention's arguments (pallas_kernels/checks.py): shapes,
    dtypes and static values always, segment ids and kv_lengths' values when they are concrete."""
    q, k, v = checks.qkv_arrays(q, k, v, q_rank=4)
    b, sq, hq, d = q.shape
    bk_, sk, hkv, dk = k.shape
    if bk_ != b:
        raise ValueError(f"k's batch must equal q's: {q.shape=} {k.shape=}")
    if dk != d:
        raise ValueError(f"k's head dim must equal q's (head dims must be equal): {q.shape=} {k.shape=}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's heads (Hq) must be a multiple of k's heads (Hkv): {q.shape=} {k.shape=}")
    if not 0 < sq <= sk:
        raise ValueError(f"need 0 < Sq <= Sk (queries are the last Sq keys): {q.shape=} {k.shape=}")
    if not 0 < d <= 256:
        raise ValueError(f"head dim must be in 1..256: {q.shape=}")
    checks.segment_ids(segment_ids, b, sk)
    for name, x in (("kv_lengths", kv_lengths), ("q_offset", q_offset), ("kv_start", kv_start)):
        if x is not None:
            checks.lengths_in_range(name, checks.int_array(name, x, (b,), "[B]"), sk)
    checks.static_int("sliding_window", sliding_window)
    checks.positive_number("scale", scale, allow_none=True)
    checks.flag("causal", causal)
    _check_blocks(block_q, block_k)
    checks.static_int("num_warps", num_warps)
    checks.static_int("num_stages", num_stages)


def _check_blocks(block_q, block_k):
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        checks.static_int(name, val, minimum=16, pow2=True)  # Triton's dot needs >= 16 along each tile side


def _tiles(dp, sq, sk, dtype, block_q, block_k, num_warps, num_stages, fast_exp2, interpret):
    """(block_q, block_k, num_warps, num_stages, fast_exp2): the tuning table's entry, overridden by the
    caller's knobs, blocks no larger than the sequences need."""
    cfg = default_config(dp, sq, jnp.dtype(dtype).itemsize)
    bq = min(block_q or cfg.block_q, max(16, next_pow2(sq)))
    bk = min(block_k or cfg.block_k, max(16, next_pow2(sk)))
    fast = (cfg.fast_exp2 if fast_exp2 is None else bool(fast_exp2)) and not interpret
    return bq, bk, num_warps or cfg.num_warps, num_stages or cfg.num_stages, fast


def _launch(meta, ks, ke, q_in, k_in, v_in, *, q_spec, k_spec, v_spec, out_shape, chunks, block_q, block_k, scale,
            fast, masks, num_warps, num_stages, interpret, name, fixed_offset=False, sum_column=None):
    """The kernel over grid (query blocks, B, H), the longest rows (last query blocks) first.

    ``q_spec``/``k_spec``/``v_spec``: (block shape, index(i, b, h)) with i the query block being computed, so
    callers may read q, k and v from separate arrays or from one packed array. Output [B, Sq, H, Dp]."""
    nq, bq = meta.shape[1], block_q
    b, _, h, dp = out_shape.shape

    def spec(shape, index):
        return pl.BlockSpec(shape, lambda i, bb, hh: index(nq - 1 - i, bb, hh))

    precision = lax.Precision.HIGHEST if out_shape.dtype == jnp.float32 else None
    fixed = fixed_offset and not masks and out_shape.dtype != jnp.float16
    kernel = functools.partial(
        _kernel, chunks=chunks, block_k=block_k, qk_scale=scale * LOG2E, precision=precision, fast_exp2=fast,
        masks=masks, fixed_offset=fixed, sum_column=sum_column if fixed else None,
    )
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=[
            spec((None, None, 4), lambda i, bb, hh: (bb, i, 0)),
            spec((None, bq), lambda i, bb, hh: (bb, i)),
            spec((None, bq), lambda i, bb, hh: (bb, i)),
            spec(*q_spec),
            spec(*k_spec),
            spec(*v_spec),
        ],
        out_specs=spec((None, bq, None, dp), lambda i, bb, hh: (bb, i, hh, 0)),
        out_shape=out_shape,
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=name,
    )(meta, ks, ke, q_in, k_in, v_in)


def image_span_attention(
    q, k, v, segment_ids=None, *, sliding_window=None, kv_lengths=None, scale=None, causal=True,
    interpret=False, block_q=None, block_k=None, num_warps=None, num_stages=None, fast_exp2=None,
    q_offset=None, kv_start=None,
):
    """Masked flash attention. q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] of q's dtype (bf16/fp16/fp32), Hq a
    multiple of Hkv; segment_ids [B, Sk] integer: negative (-1) for text, k >= 0 for the k-th image of a row.

    An id names ONE contiguous span (one image, as transformers and ``segment_ids_from_image_mask`` number
    them); concrete ids with an id in two separate runs are refused (ValueError), traced ones are the caller's
    contract. kv_lengths [B] integer in [0, Sk]: keys at or past it are masked. sliding_window: None or an
    int >= 1. Returns [B, Sq, Hq, D] in q's dtype. Queries are the last Sq of the Sk positions, or, with
    q_offset [B] in [0, Sk], query t of row b is key position q_offset[b] + t (a prompt chunk after its earlier
    chunks' keys); kv_start [B] in [0, Sk]: keys before it are masked. Rows with no allowed key are zeros.
    ``causal=False``: bidirectional, only kv_lengths masks. Bad arguments raise a TypeError (dtype or kind) or
    ValueError (shape or value) naming the argument, before anything is traced.
    """
    _check(q, k, v, segment_ids, kv_lengths, block_q, block_k, sliding_window=sliding_window, scale=scale,
           causal=causal, num_warps=num_warps, num_stages=num_stages, q_offset=q_offset, kv_start=kv_start)
    checks.flag("interpret", interpret)
    return _image_span_attention(
        q, k, v, segment_ids, sliding_window=None if sliding_window is None else int(sliding_window),
        kv_lengths=kv_lengths, scale=None if scale is None else float(scale), causal=bool(causal),
        interpret=bool(interpret), block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
        fast_exp2=fast_exp2, q_offset=q_offset, kv_start=kv_start)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sliding_window", "scale", "causal", "interpret", "block_q", "block_k", "num_warps", "num_stages",
        "fast_exp2",
    ),
)
def _image_span_attention(
    q, k, v, segment_ids=None, *, sliding_window=None, kv_lengths=None, scale=None, causal=True,
    interpret=False, block_q=None, block_k=None, num_warps=None, num_stages=None, fast_exp2=None,
    q_offset=None, kv_start=None,
):
    """image_span_attention after its argument checks."""
    b, sq, hq, d = q.shape
    _, sk, hkv, _ = k.shape
    g = hq // hkv
    chunks = head_chunks(d)
    dp = padded_head_dim(d)
    bq, bk, nwarps, nstages, fast = _tiles(dp, sq, sk, q.dtype, block_q, block_k, num_warps, num_stages, fast_exp2,
                                           interpret)
    scale = d**-0.5 if scale is None else float(scale)

    if segment_ids is None:
        segment_ids = jnp.full((b, sk), -1, jnp.int32)
    ks, ke = key_intervals(
        jnp.asarray(segment_ids, jnp.int32), q_len=sq, sliding_window=sliding_window,
        kv_lengths=kv_lengths, causal=causal, q_offset=q_offset, kv_start=kv_start,
    )
    meta = block_ranges(ks, ke, block_q=bq, block_k=bk)  # [B, nq, 4]
    nq = meta.shape[1]
    sqp, skp = nq * bq, -(-sk // bk) * bk
    ks = jnp.pad(ks, ((0, 0), (0, sqp - sq)))
    ke = jnp.pad(ke, ((0, 0), (0, sqp - sq)))  # padding rows are empty -> zeros
    qp = jnp.pad(q, ((0, 0), (0, sqp - sq), (0, 0), (0, dp - d))) if (sqp, dp) != (sq, d) else q
    if (skp, dp) != (sk, d):
        k = jnp.pad(k, ((0, 0), (0, skp - sk), (0, 0), (0, dp - d)))
        v = jnp.pad(v, ((0, 0), (0, skp - sk), (0, 0), (0, dp - d)))

    kv_spec = ((None, skp, None, dp), lambda i, bb, h: (bb, 0, h // g, 0))
    out = _launch(
        meta, ks, ke, qp, k, v, q_spec=((None, bq, None, dp), lambda i, bb, h: (bb, i, h, 0)), k_spec=kv_spec,
        v_spec=kv_spec, out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype), chunks=chunks, block_q=bq, block_k=bk,
        scale=scale, fast=fast, masks=True, num_warps=nwarps, num_stages=nstages, interpret=interpret,
        name="image_span_attention",
    )
    return out[:, :sq, :, :d]


@functools.partial(jax.jit, static_argnames=("head_dim", "scale", "interpret", "block_q", "block_k", "num_warps",
                                             "num_stages", "fast_exp2", "fixed_offset", "ones_column"))
def packed_self_attention(
    qkv, *, head_dim, scale=None, interpret=False, block_q=None, block_k=None, num_warps=None, num_stages=None,
    fast_exp2=None, fixed_offset=True, ones_column=False,
):
    """Bidirectional attention without a mask (the SigLIP encoder) on q, k and v packed in one array.

    qkv [B, S, 3, H, Dp]: q, k, v of H heads, the head dim ``head_dim`` zero-padded to Dp = its multiple of 16
    (72 -> 80), as one projection writes them. Returns [B, S, H, Dp] in qkv's dtype; its padded columns hold
    P @ V of the padded columns (zeros when they are zero in v). The kernel reads q, k and v in place (three
    BlockSpecs on one array): no slicing or padding copies, each of which would be a copy per image.
    ``fixed_offset``: the softmax without a running max when the sequence is a multiple of
    the blocks (bf16/f32; see _kernel), else the online softmax. ``ones_column``: the caller promises v's padded
    column ``head_dim`` is exactly 1 for every key (a bias of 1 there, weights 0); its P @ V is then the softmax
    denominator and the kernel skips summing the probabilities (that output column is 1). A column of zeros
    instead (the bias without its 1) gives l = 0, which sends the programs through the online softmax: slower,
    still right. Any other value gives a wrong result without falling back."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, S, 3, H, Dp]: got {qkv.shape=}")
    b, s, _, h, dp = qkv.shape
    if padded_head_dim(head_dim) != dp:
        raise ValueError(f"the padded head dim must be {head_dim=} rounded up to a multiple of 16: {qkv.shape=}")
    if qkv.dtype not in DTYPES:
        raise ValueError(f"qkv must be bf16/fp16/fp32: {qkv.dtype=}")
    if not 0 < head_dim <= 256:
        raise ValueError(f"head dim must be in 1..256: {head_dim=}")
    if ones_column and dp == head_dim:
        raise ValueError(f"ones_column needs a padded column: {head_dim=} is a multiple of 16 ({qkv.shape=})")
    _check_blocks(block_q, block_k)
    bq, bk, nwarps, nstages, fast = _tiles(dp, s, s, qkv.dtype, block_q, block_k, num_warps, num_stages,
                                           fast_exp2, interpret)
    scale = head_dim**-0.5 if scale is None else float(scale)
    ks, ke = key_intervals(jnp.full((b, s), -1, jnp.int32), causal=False)
    meta = block_ranges(ks, ke, block_q=bq, block_k=bk)
    nq = meta.shape[1]
    sp = max(nq * bq, -(-s // bk) * bk)
    if sp != s:  # only sequences that are not a multiple of the blocks are copied
        qkv = jnp.pad(qkv, ((0, 0), (0, sp - s), (0, 0), (0, 0), (0, 0)))
        ks = jnp.pad(ks, ((0, 0), (0, sp - s)))
        ke = jnp.pad(ke, ((0, 0), (0, sp - s)))

    kv = (None, sp, None, None, dp)  # k and v of head h: slots 1 and 2 of the packed array, read in place
    out = _launch(
        meta, ks, ke, qkv, qkv, qkv, q_spec=((None, bq, None, None, dp), lambda i, bb, h: (bb, i, 0, h, 0)),
        k_spec=(kv, lambda i, bb, h: (bb, 0, 1, h, 0)), v_spec=(kv, lambda i, bb, h: (bb, 0, 2, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nq * bq, h, dp), qkv.dtype), chunks=head_chunks(head_dim),
        block_q=bq, block_k=bk, scale=scale, fast=fast, masks=sp != s, num_warps=nwarps,
        num_stages=nstages, interpret=interpret, name="packed_self_attention", fixed_offset=fixed_offset,
        sum_column=head_dim if ones_column else None,
    )
    return out if nq * bq == s else out[:, :s]
