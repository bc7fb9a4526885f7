"""O(S) mask metadata for the Gemma-3 image-span mask.

The mask is carried as per-token *segment ids*: -1 for text, k >= 0 for the k-th image of a row.
For that mask family every query's allowed keys form one interval ``[k_start(i), k_end(i))``:

    k_end(i)   = min(kv_length, max(i + 1, end of the image run that holds i))
    k_start(i) = max(0, i - W + 1)          (0 without a sliding window)

An id names ONE contiguous span: transformers numbers images by runs of image tokens, and so does
``segment_ids_from_image_mask``. ``key_intervals`` refuses concrete ids where an id names two separate runs
(ValueError naming the id and both runs); traced ids are the caller's contract (under it each run would act as
its own image, which differs from the reference's id-equality rule).

Everything here is O(S) in memory; nothing of size [S, S] is ever built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from pallas_kernels import checks

TEXT_SEGMENT = -1


def segment_ids_from_image_mask(is_image: Bool[Array, "B S"]) -> Int[Array, "B S"]:
    """Segment ids as transformers builds them: a new image starts wherever a run of image tokens starts.

    Images are numbered 0, 1, ... per row; text tokens get -1. ``is_image`` [B, S] is bool (or integer 0/1).
    """
    if not hasattr(is_image, "dtype"):
        is_image = np.asarray(is_image)
    if not (jnp.issubdtype(is_image.dtype, jnp.bool_) or jnp.issubdtype(is_image.dtype, jnp.integer)):
        raise TypeError(f"is_image must be a bool (or integer 0/1) array, got dtype {is_image.dtype}")
    if is_image.ndim != 2:
        raise ValueError(f"is_image must be [B, S]: got is_image.shape={tuple(is_image.shape)}")
    is_image = jnp.asarray(is_image, dtype=bool)
    prev = jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    starts = is_image & ~prev
    group = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1
    return jnp.where(is_image, group, TEXT_SEGMENT).astype(jnp.int32)


def run_ends(segment_ids: Int[Array, "B S"]) -> Int[Array, "B S"]:
    """For each position, one past the last index of the run of equal ids that holds it (exclusive end).

    Computed with a reverse cumulative min over "run boundary" positions: O(S).
    """
    segment_ids = checks.int_array("segment_ids", segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, S]: got segment_ids.shape={segment_ids.shape}")
    segment_ids = segment_ids.astype(jnp.int32)
    _, s = segment_ids.shape
    idx = jnp.arange(s, dtype=jnp.int32)
    # boundary[j] is True when position j is the last of its run.
    nxt = jnp.pad(segment_ids, ((0, 0), (0, 1)), constant_values=jnp.iinfo(jnp.int32).min)[:, 1:]
    is_last = segment_ids != nxt
    cand = jnp.where(is_last, idx[None, :] + 1, s)
    return jax.lax.cummin(cand, axis=1, reverse=True).astype(jnp.int32)


def key_intervals(
    segment_ids: Int[Array, "B Sk"],
    *,
    q_len: int | None = None,
    sliding_window: int | None = None,
    kv_lengths: Int[Array, "B"] | None = None,
    causal: bool = True,
    q_offset: Int[Array, "B"] | None = None,
    kv_start: Int[Array, "B"] | None = None,
) -> tuple[Int[Array, "B Sq"], Int[Array, "B Sq"]]:
    """Per-query allowed key interval ``[k_start, k_end)``; query t of row b sits at key position
    ``q_offset[b] + t`` (default: the last ``q_len`` positions, ``Sk - q_len``).

    Each maximal run of one non-negative id is one image (transformers builds ids that way). Keys before
    ``kv_start[b]`` (default 0) or at/after ``kv_lengths[b]`` (default Sk) are never attended: with a query offset
    the keys of a prompt's earlier chunks can sit in front of its queries (chunked prefill), and a ring buffer laid
    out in position order can hold positions before the prompt's start. A row whose interval is empty
    (k_start >= k_end) attends to nothing. With ``causal=False`` every query sees keys ``[kv_start, kv_length)``
    (the SigLIP encoder). segment_ids [B, Sk]; kv_lengths, q_offset, kv_start [B] integer arrays in [0, Sk]; an id
    names one contiguous span (see the module doc).
    """
    segment_ids = checks.int_array("segment_ids", segment_ids)
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, Sk]: got segment_ids.shape={segment_ids.shape}")
    checks.segments_contiguous(segment_ids)
    segment_ids = segment_ids.astype(jnp.int32)
    b, sk = segment_ids.shape
    sq = sk if q_len is None else checks.static_int("q_len", q_len)
    if not 0 < sq <= sk:
        raise ValueError(f"need 0 < q_len <= Sk, got {q_len=} {sk=}")
    checks.static_int("sliding_window", sliding_window)
    checks.flag("causal", causal)

    def row_ints(name, x, default):
        if x is None:
            return jnp.full((b,), default, jnp.int32)
        x = checks.int_array(name, x, (b,), "[B]")
        checks.lengths_in_range(name, x, sk)
        return jnp.asarray(x, jnp.int32)

    kv_len = row_ints("kv_lengths", kv_lengths, sk)
    first = row_ints("q_offset", q_offset, sk - sq)
    kv_lo = row_ints("kv_start", kv_start, 0)
    pos = first[:, None] + jnp.arange(sq, dtype=jnp.int32)[None, :]  # [B, Sq] key position of each query
    if causal:
        at = jnp.clip(pos, 0, sk - 1)  # padded queries past Sk read the last key's id (their rows are dropped)
        seg_q = jnp.take_along_axis(segment_ids, at, axis=1)
        ends = jnp.take_along_axis(run_ends(segment_ids), at, axis=1)
        k_end = jnp.where(seg_q >= 0, jnp.maximum(pos + 1, ends), pos + 1)
    else:
        k_end = jnp.full((b, sq), sk, jnp.int32)
    k_end = jnp.minimum(k_end, kv_len[:, None])
    k_start = jnp.broadcast_to(kv_lo[:, None], (b, sq))
    if sliding_window is not None:
        k_start = jnp.maximum(k_start, pos - sliding_window + 1)
    return k_start.astype(jnp.int32), k_end.astype(jnp.int32)
