"""O(S) per-query-block key ranges for the image-span attention kernel.

Every query's allowed keys form one interval ``[k_start, k_end)`` (see ``segments.key_intervals``). For a
block of ``block_q`` queries the kernel needs only four numbers, in units of key blocks:

    lo    first key block any row of the block can touch   (min k_start // block_k)
    f_lo  first key block that is allowed for *every* row    (ceil(max k_start / block_k))
    f_hi  one past the last such block                       (min k_end // block_k)
    hi    one past the last key block any row can touch      (ceil(max k_end / block_k))

with lo <= f_lo <= f_hi <= hi. Blocks in [lo, f_lo) and [f_hi, hi) are partly masked (element mask
applied), blocks in [f_lo, f_hi) are fully allowed (no mask), keys outside [lo, hi) are never read.
Rows with an empty interval (or padding rows past Sq) are left out of the four numbers; the kernel
writes zeros for them. Nothing here has more than O(Sq) elements.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

_BIG = jnp.iinfo(jnp.int32).max // 2


def block_ranges(
    k_start: Int[Array, "B Sq"], k_end: Int[Array, "B Sq"], *, block_q: int, block_k: int
) -> Int[Array, "B nq 4"]:
    """[B, nq, 4] int32 (lo, f_lo, f_hi, hi) in key-block units; Sq may be any length (padded here)."""
    b, sq = k_start.shape
    nq = -(-sq // block_q)
    pad = nq * block_q - sq
    ks = jnp.pad(k_start, ((0, 0), (0, pad))).reshape(b, nq, block_q)
    ke = jnp.pad(k_end, ((0, 0), (0, pad))).reshape(b, nq, block_q)  # padded rows: empty [0, 0)
    valid = ke > ks
    any_valid = jnp.any(valid, axis=-1)
    lo_key = jnp.min(jnp.where(valid, ks, _BIG), axis=-1)
    hi_key = jnp.max(jnp.where(valid, ke, 0), axis=-1)
    max_ks = jnp.max(jnp.where(valid, ks, 0), axis=-1)
    min_ke = jnp.min(jnp.where(valid, ke, _BIG), axis=-1)
    lo = jnp.where(any_valid, lo_key // block_k, 0)
    hi = jnp.where(any_valid, -(-hi_key // block_k), 0)
    f_lo = jnp.clip(-(-max_ks // block_k), lo, hi)
    f_hi = jnp.clip(min_ke // block_k, f_lo, hi)
    return jnp.stack([lo, f_lo, f_hi, hi], axis=-1).astype(jnp.int32)


def count_allowed_pairs(k_start: Int[Array, "B Sq"], k_end: Int[Array, "B Sq"]) -> int:
    """Number of allowed (query, key) pairs, summed over the batch (host int64, for effective FLOP/s)."""
    ks = np.asarray(k_start, np.int64)
    ke = np.asarray(k_end, np.int64)
    return int(np.maximum(ke - ks, 0).sum())


def count_blocks(ranges: Int[Array, "B nq 4"]) -> dict[str, int]:
    """Key blocks visited: masked (partial) and unmasked (full), for the notes."""
    lo, f_lo, f_hi, hi = (ranges[..., i] for i in range(4))
    return {
        "partial": int(jnp.sum((f_lo - lo) + (hi - f_hi))),
        "full": int(jnp.sum(f_hi - f_lo)),
    }
