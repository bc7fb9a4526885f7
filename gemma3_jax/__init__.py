"""gemma3-jax: Gemma-3 (SigLIP + projector + Gemma-3 decoder) in JAX/Flax NNX.

Layout: ``model`` (configs, layers, text decoder, vision tower, KV cache, and ``model.kernels``, the one module
that calls ``pallas_kernels``), ``checkpoints`` (safetensors, GGUF, ``Checkpoint``), ``preprocessing``
(tokenizer, chat templates, images) and ``runtime`` (engine, sampling, ``Generator``).
"""

from gemma3_jax.checkpoints.loading import CheckpointError, load_pretrained
from gemma3_jax.model.config import Gemma3Config, TextConfig, VisionConfig
from gemma3_jax.model.gemma3 import Gemma3

__all__ = ["CheckpointError", "Gemma3", "Gemma3Config", "Generator", "TextConfig", "VisionConfig", "load_pretrained"]


def __getattr__(name: str):
    # Generator pulls in the tokenizer, chat templates and the image processor: imported when first asked for.
    if name == "Generator":
        from gemma3_jax.runtime.generator import Generator

        return Generator
    raise AttributeError(f"module 'gemma3_jax' has no attribute {name!r}")
