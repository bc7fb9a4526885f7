"""Pure-jnp reference attention: the oracle the Pallas kernel is tested against.

This is the one place in the project where an [Sq, Sk] mask is built. It follows the mask rule word for
word, as transformers 5.x builds it:

  global layers:  key j is allowed for query i iff  j <= i  or  (seg[i] == seg[j] and seg[i] >= 0)
  sliding layers: additionally                       j > i - sliding_window
  padding:        keys at j >= kv_lengths[b] are never attended

Queries are the last Sq of the Sk positions. A row with no allowed key returns zeros. The rule compares ids, so
an id in two separate runs would join them; the kernels take one contiguous span per id and refuse such ids
(checks.segments_contiguous), so this oracle checks dtypes and shapes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from pallas_kernels import checks


def reference_mask(
    segment_ids: Int[Array, "B Sk"],
    *,
    q_len: int | None = None,
    sliding_window: int | None = None,
    kv_lengths: Int[Array, "B"] | None = None,
    causal: bool = True,
) -> Bool[Array, "B Sq Sk"]:
    """The dense boolean mask (True = attend). segment_ids and kv_lengths must be integer arrays."""
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
    i = jnp.arange(sk - sq, sk)[:, None]  # absolute query positions
    j = jnp.arange(sk)[None, :]
    seg_q = segment_ids[:, sk - sq :, None]
    seg_k = segment_ids[:, None, :]
    if causal:
        allowed = (j <= i)[None] | ((seg_q == seg_k) & (seg_q >= 0))
    else:
        allowed = jnp.ones((b, sq, sk), bool)
    if sliding_window is not None:
        allowed &= (j > i - sliding_window)[None]
    if kv_lengths is not None:
        allowed &= j[None] < jnp.asarray(kv_lengths)[:, None, None]
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
        segment_ids, q_len=sq, sliding_window=sliding_window, kv_lengths=kv_lengths, causal=causal
    )[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, vf, precision=precision)
    return out.reshape(b, sq, hq, d).astype(q.dtype)
