"""Which attention implementation the model runs.

``impl``: "reference" is the pure-jnp oracle (builds an [S, S] mask: tests and small inputs only).
"""

from __future__ import annotations

from pallas_kernels.reference import reference_attention

IMPLS = ("reference",)


def attend(q, k, v, segment_ids, *, sliding_window=None, kv_lengths=None, scale=None, causal=True, impl="reference"):
    """Attention with the image-span mask: q [B, Sq, N, H], k/v [B, Sk, K, H] -> [B, Sq, N, H]."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl=}; expected one of {IMPLS}")
    return reference_attention(
        q, k, v, segment_ids, sliding_window=sliding_window, kv_lengths=kv_lengths, scale=scale, causal=causal
    )
