"""Text and images in: the tokenizer, chat templates, and the image processor."""
