"""The model: configs and presets, the text decoder, the vision tower, the KV cache layout, and the one module
that calls the Pallas kernels (``kernels``)."""
