"""gemma3-jax: Gemma-3 (SigLIP + projector + Gemma-3 decoder) in JAX/Flax NNX.

Layout: ``model`` (configs, layers, text decoder, vision tower, KV cache, and ``model.kernels``, the one module
that calls ``pallas_kernels``), ``checkpoints`` (safetensors, GGUF, ``Checkpoint``), ``preprocessing``
(tokenizer, chat templates, images) and ``runtime`` (engine, sampling, ``Generator``).
"""

import importlib

__all__ = ["CheckpointError", "Gemma3", "Gemma3Config", "Generator", "TextConfig", "VisionConfig", "load_pretrained"]

# Each name is imported when first asked for: importing the package itself loads no JAX, so a script can set up
# what must come first (its Ctrl-C handling, scripts/generate.py) from a module of the package.
_HOMES = {"CheckpointError": "checkpoints.loading", "load_pretrained": "checkpoints.loading",
          "Gemma3Config": "model.config", "TextConfig": "model.config", "VisionConfig": "model.config",
          "Gemma3": "model.gemma3", "Generator": "runtime.generator"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'gemma3_jax' has no attribute {name!r}")
