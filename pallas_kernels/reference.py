"""The pure-jnp oracles every Pallas kernel of this package is tested against, one per kernel, named after it
(``reference_attention`` for image_span_attention and packed_self_attention, ``<kernel>_reference`` for the
others). They take the kernels' arguments, checked by the kernels' own argument checks where those exist.

This is the one place in the project where an [Sq, Sk] mask is built. It follows the mask rule word for
word, as transformers 5.x builds it:

  global layers:  key j is allowed for query i iff  j <= i  or  (seg[i] == seg[j] and seg[i] >= 0)
  sliding layers: additionally                       j > i - sliding_window
  padding:        keys at j >= kv_lengths[b] are never attended

Queries are the last Sq of the Sk positions unless q_offset places them (chunked prefill). A row with no allowed
key returns zeros. The rule compares ids, so
an id in two separate runs would join them; the kernels take one contiguous span per id and refuse such ids
(checks.segments_contiguous), so this oracle checks dtypes and shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import checks
from pallas_kernels.decode_attention import check_decode_args
from pallas_kernels.decode_fused import check_fused_args
from pallas_kernels.gemv import gelu_tanh_f32


def reference_mask(
    segment_ids: Int[Array, "B Sk"],
    *,
    q_len: int | None = None,
    sliding_window: int | None = None,
    kv_lengths: Int[Array, "B"] | None = None,
    causal: bool = True,
    q_offset: Int[Array, "B"] | None = None,
    kv_start: Int[Array, "B"] | None = None,
) -> Bool[Array, "B Sq Sk"]:
    """The dense boolean mask (True = attend). segment_ids, kv_lengths, q_offset and kv_start must be integer
    arrays. Query t of row b is key position q_offset[b] + t (default Sk - Sq: the last Sq); keys before
    kv_start[b] are never attended."""
    segment_ids = checks.int_array("segment_ids", segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, Sk]: got segment_ids.shape={segment_ids.shape}")
    b, sk = segment_ids.shape
    sq = sk if q_len is None else checks.static_int("q_len", q_len)
    if sq > sk:
        raise ValueError(f"q_len must be <= Sk: {q_len=} segment_ids.shape={segment_ids.shape}")
    checks.static_int("sliding_window", sliding_window)
    if kv_lengths is not None:
        kv_lengths = checks.int_array("kv_lengths", kv_lengths, (b,), "[B]")
    first = jnp.full((b,), sk - sq) if q_offset is None else checks.int_array("q_offset", q_offset, (b,), "[B]")
    i = (jnp.asarray(first)[:, None] + jnp.arange(sq)[None, :])[:, :, None]  # [B, Sq, 1] query positions
    j = jnp.arange(sk)[None, None, :]
    seg_q = jnp.take_along_axis(segment_ids, jnp.clip(i[:, :, 0], 0, sk - 1), axis=1)[:, :, None]
    seg_k = segment_ids[:, None, :]
    if causal:
        allowed = (j <= i) | ((seg_q == seg_k) & (seg_q >= 0))
    else:
        allowed = jnp.ones((b, sq, sk), bool)
    if sliding_window is not None:
        allowed &= j > i - sliding_window
    if kv_lengths is not None:
        allowed &= j < jnp.asarray(kv_lengths)[:, None, None]
    if kv_start is not None:
        allowed &= j >= jnp.asarray(checks.int_array("kv_start", kv_start, (b,), "[B]"))[:, None, None]
    return allowed


def reference_attention(
    q: Float[Array, "B Sq Hq D"],
    k: Float[Array, "B Sk Hkv D"],
    v: Float[Array, "B Sk Hkv D"],
    segment_ids: Int[Array, "B Sk"] | None = None,
    *,
    sliding_window: int | None = None,
    kv_lengths: Int[Array, "B"] | None = None,
    scale: float | None = None,
    causal: bool = True,
    precision=jax.lax.Precision.HIGHEST,
    q_offset: Int[Array, "B"] | None = None,
    kv_start: Int[Array, "B"] | None = None,
) -> Float[Array, "B Sq Hq D"]:
    """Softmax attention in float32 with the image-span mask; output in q's dtype."""
    q, k, v = checks.qkv_arrays(q, k, v, q_rank=4)
    b, sq, hq, d = q.shape
    _, sk, hkv, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k's batch and head dim must equal q's: {q.shape=} {k.shape=}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"Hq must be a multiple of Hkv, got {q.shape=} {k.shape=}")
    if not 0 < sq <= sk:
        raise ValueError(f"need 0 < Sq <= Sk (queries are the last Sq keys): {q.shape=} {k.shape=}")
    if segment_ids is not None:
        checks.int_array("segment_ids", segment_ids, (b, sk), "[B, Sk] (batch and key length of k)")
    checks.positive_number("scale", scale, allow_none=True)
    if segment_ids is None:
        segment_ids = jnp.full((b, sk), -1, jnp.int32)
    scale = d**-0.5 if scale is None else scale
    g = hq // hkv
    qf = q.astype(jnp.float32).reshape(b, sq, hkv, g, d)
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qf, kf, precision=precision) * scale
    mask = reference_mask(
        segment_ids, q_len=sq, sliding_window=sliding_window, kv_lengths=kv_lengths, causal=causal,
        q_offset=q_offset, kv_start=kv_start,
    )[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, vf, precision=precision)
    return out.reshape(b, sq, hq, d).astype(q.dtype)


# ---- decode: one query per row over a KV cache buffer ------------------------------------------------------

def decode_attention_reference(q, k, v, lengths, *, scale):
    """Pure-jnp oracle: float32 softmax over slots s < lengths[b]; rows with length 0 are zeros."""
    check_decode_args(q, k, v, lengths, scale)
    b, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    hi = lax.Precision.HIGHEST
    qg = q.reshape(b, kh, n // kh, h).astype(jnp.float32)
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, k.astype(jnp.float32), precision=hi) * scale
    valid = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(m == -jnp.inf, 0.0, m))
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bskh->bkgh", p, v.astype(jnp.float32), precision=hi) / jnp.where(l == 0.0, 1.0, l)
    return out.reshape(b, n, h).astype(q.dtype)


def decode_attention_fused_reference(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, *, ring, scale, eps):
    """The same step from jnp pieces: norms and RoPE with the kernel's roundings, write, float32 attention."""
    check_fused_args(qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, ring, scale, eps)
    b, m, h = qkv.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    n = m - 2 * kh
    dt, f32 = qkv.dtype, jnp.float32
    rnd = lambda t: t.astype(dt).astype(f32)

    def norm_rope(x, w):  # [B, R, H]
        xf = x.astype(f32)
        xf = rnd(xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * (1.0 + w.astype(f32)))
        rot = jnp.concatenate([-xf[..., h // 2:], xf[..., : h // 2]], axis=-1)
        c, sn = cos.astype(f32)[:, None, :], sin.astype(f32)[:, None, :]
        return rnd(rnd(xf * c) + rnd(rot * sn)).astype(dt)

    q = norm_rope(qkv[:, :n], q_norm)
    k_new = norm_rope(qkv[:, n: n + kh], k_norm)
    v_new = qkv[:, n + kh:]
    pos = jnp.asarray(pos, jnp.int32)
    idx = pos % s if ring else pos
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, idx].set(k_new, mode="drop")
    v_cache = v_cache.at[rows, idx].set(v_new, mode="drop")
    out = decode_attention_reference(q, k_cache, v_cache, jnp.minimum(pos + 1, s), scale=scale)
    return out, k_cache, v_cache


# ---- batch-1 matrix-vector products and the residual add with its norms -------------------------------------

def gemv_reference(x, w, scale=None):
    """f32 products of the inputs, [B, N] f32; with ``scale`` [N], w (int8 / float8_e4m3fn) is dequantized to
    f32 ``w * scale[:, None]`` first; with ``scale`` [N, K / G] (int4), each group of G inputs by its scale."""
    wf = w.astype(jnp.float32)
    if scale is not None and scale.ndim == 2:
        n, k = w.shape
        wf = (wf.reshape(n, scale.shape[1], k // scale.shape[1]) * scale.astype(jnp.float32)[..., None]).reshape(n, k)
    elif scale is not None:
        wf = wf * scale.astype(jnp.float32)[:, None]
    return jnp.einsum("BK,NK->BN", x.astype(jnp.float32), wf, precision=jax.lax.Precision.HIGHEST)


def gemv_geglu_reference(x, w_gate_up, scale=None):
    """The same roundings as ``gemv_geglu`` around f32 products (of the dequantized weight with ``scale``)."""
    dt, f32 = x.dtype, jnp.float32
    f = w_gate_up.shape[0] // 2
    y = gemv_reference(x, w_gate_up, scale).astype(dt).astype(f32)
    act = gelu_tanh_f32(y[:, :f]).astype(dt).astype(f32)
    return (act * y[:, f:]).astype(dt)


def residual_norm_reference(x, delta, post_weight, next_weight, *, eps):
    """Pure-jnp oracle with the same roundings."""
    if delta.ndim == x.ndim + 1:
        delta = delta.sum(0).astype(x.dtype)

    def rms(v, w):
        vf = v.astype(jnp.float32)
        vf = vf * lax.rsqrt(jnp.mean(vf * vf, axis=-1, keepdims=True) + eps)
        return (vf * (1.0 + w.astype(jnp.float32))).astype(v.dtype)

    x_new = (x + rms(delta, post_weight)).astype(x.dtype)
    return x_new, rms(x_new, next_weight)
