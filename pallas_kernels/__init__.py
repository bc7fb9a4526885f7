"""Pallas (Triton) kernels for Gemma-3 and their pure-jnp oracles (``reference``).

The model calls them through one module, ``gemma3_jax.model.kernels``; launch settings live in ``tuning``."""

from pallas_kernels.attention import image_span_attention, packed_self_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.decode_fused import decode_attention_fused
from pallas_kernels.gemv import gemv, gemv_geglu
from pallas_kernels.gemv_int4 import gemv4, gemv4_geglu
from pallas_kernels.reference import (
    decode_attention_fused_reference,
    decode_attention_reference,
    gemv_geglu_reference,
    gemv_reference,
    reference_attention,
    reference_mask,
    residual_norm_reference,
)
from pallas_kernels.residual_norm import residual_norm
from pallas_kernels.segments import key_intervals, run_ends, segment_ids_from_image_mask

__all__ = [
    "decode_attention",
    "decode_attention_fused",
    "decode_attention_fused_reference",
    "decode_attention_reference",
    "gemv",
    "gemv4",
    "gemv4_geglu",
    "gemv_geglu",
    "gemv_geglu_reference",
    "gemv_reference",
    "image_span_attention",
    "key_intervals",
    "packed_self_attention",
    "reference_attention",
    "reference_mask",
    "residual_norm",
    "residual_norm_reference",
    "run_ends",
    "segment_ids_from_image_mask",
]
