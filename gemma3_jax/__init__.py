"""gemma3-jax: Gemma-3 (SigLIP + projector + Gemma-3 decoder) in JAX/Flax NNX."""

from gemma3_jax.config import Gemma3Config, TextConfig, VisionConfig
from gemma3_jax.loading import CheckpointError, load_pretrained
from gemma3_jax.model import Gemma3

__all__ = ["CheckpointError", "Gemma3", "Gemma3Config", "TextConfig", "VisionConfig", "load_pretrained"]
