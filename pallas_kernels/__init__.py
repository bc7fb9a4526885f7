"""Attention kernels for gemma3-jax and their pure-jnp oracle."""

from pallas_kernels.attention import attention, image_span_attention
from pallas_kernels.decode_attention import cached_attention, decode_attention, decode_attention_reference
from pallas_kernels.reference import reference_attention, reference_mask
from pallas_kernels.segments import key_intervals, run_ends, segment_ids_from_image_mask

__all__ = [
    "attention",
    "cached_attention",
    "decode_attention",
    "decode_attention_reference",
    "image_span_attention",
    "key_intervals",
    "reference_attention",
    "reference_mask",
    "run_ends",
    "segment_ids_from_image_mask",
]
