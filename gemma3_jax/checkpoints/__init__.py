"""Reading checkpoints: Hugging Face safetensors directories (``loading``, ``weight_files``), GGUF files converted
to them (``gguf``, cached by ``store``), and ``Checkpoint``, everything but the weights."""
