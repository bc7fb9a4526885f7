"""Attention kernels for gemma3-jax and their pure-jnp oracle."""

from pallas_kernels.reference import reference_attention, reference_mask
from pallas_kernels.segments import key_intervals, run_ends, segment_ids_from_image_mask

__all__ = [
    "key_intervals",
    "reference_attention",
    "reference_mask",
    "run_ends",
    "segment_ids_from_image_mask",
]
