"""Running the model: the KV-cache engine (compiled prefill and decode), sampling, the compile cache, and
``Generator``, the text-and-images-in, text-out API."""
