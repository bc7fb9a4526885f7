"""The user-facing generator: prompts (+ images) in, text out, with streaming and timings.

    gen = Generator.from_pretrained("path/to/gemma-3-4b-it")          # or None: the default 270M
    out = gen.generate(["Describe <start_of_image>."], images=[["cat.png"]], max_new_tokens=64)
    out.texts, out.token_ids, out.timings
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma3_jax.model.kv_cache import cache_nbytes, check_fits
from gemma3_jax.checkpoints.checkpoint import DEFAULT_CACHE_LENGTH, Checkpoint, _check_int, check_generation_args, check_memory
from gemma3_jax.runtime.compile_cache import enable_compilation_cache
from gemma3_jax.runtime.engine import Engine, Timings
from gemma3_jax.checkpoints.loading import load_pretrained
from gemma3_jax.checkpoints.quantized import effective_mode, stored_mode
from gemma3_jax.model.gemma3 import Gemma3
from gemma3_jax.model.pixels import PixelLevels
from gemma3_jax.model.kernels import Kernels, platform
from gemma3_jax.model.quant import check_mode
from gemma3_jax.model.sharding import check_splits, describe_plan, make_mesh, memory_plan
from gemma3_jax.preprocessing.tokenizer import StreamDecoder

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]  # the tokens each text was decoded from (up to the one completing a stop string)
    prompt_tokens: list[int]
    timings: Timings
    cache_bytes: int  # keys + values held: full length on global layers, window-sized rings on sliding ones


def default_dtype() -> str:
    """bfloat16 on an accelerator; float32 on a CPU, where bfloat16 matmuls are emulated and slow."""
    return "float32" if platform() == "cpu" else "bfloat16"


def resolve_dtype(name: str | None):
    if name is None:
        name = default_dtype()
    if not isinstance(name, str):
        raise TypeError(f"dtype must be a name ({', '.join(DTYPES)}) or None, got {name!r}")
    if name == "float16":
        raise ValueError("dtype float16 is refused: Gemma-3 activations overflow float16; use bfloat16 or float32")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def print_plan(cfg, dtype, tensor_parallel, batch: int, cache_length: int, quantize: str | None, show: bool):
    """Check the devices and the quantization mode, then print the per-device memory plan (split or quantized
    weights) before the weights load; returns the mesh to load onto (or 1)."""
    check_mode(quantize)
    if tensor_parallel == 1 and quantize is None:
        return tensor_parallel
    mesh = None
    if tensor_parallel != 1:
        mesh = make_mesh(tensor_parallel) if isinstance(tensor_parallel, int) else tensor_parallel
        check_splits(cfg, mesh.size, quantize)
    n = 1 if mesh is None else mesh.size
    if show:
        plan = memory_plan(cfg, dtype, n, batch, cache_length, quantize)
        note = ""
        if quantize is not None:
            whole = memory_plan(cfg, dtype, n, batch, cache_length)["weights"]
            note = f" ({quantize} weights; {jnp.dtype(dtype).name} would be {whole / 2**30:.2f} GiB)"
        print(describe_plan(plan, n) + note, file=sys.stderr)
    return 1 if mesh is None else mesh


class Generator:
    def __init__(self, model: Gemma3, checkpoint: Checkpoint, *, cache_length: int = DEFAULT_CACHE_LENGTH,
                 chunk: int = 32):
        self.model = model
        self.checkpoint = checkpoint
        self.engine = Engine(model, cache_length=cache_length, chunk=chunk)
        self.load_s = 0.0

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def processor(self):
        return self.checkpoint.processor

    @property
    def defaults(self) -> dict:
        """generation_config.json's sampling defaults and eos ids."""
        return self.checkpoint.defaults

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        dtype: str | None = None,
        cache_length: int | None = None,
        attention: str | Kernels = "auto",
        progress: bool = True,
        chunk: int = 32,
        compilation_cache: bool = True,
        tensor_parallel: int = 1,
        quantize: str | None = None,
    ) -> Generator:
        """``model``: a checkpoint directory, a .gguf file, or None for the default 270M. ``dtype=None``: float32 on
        a CPU, bfloat16 on an accelerator. ``cache_length=None``: 4096, or the model's positions if fewer; it is
        checked against the config and the device's memory before the weights load. ``compilation_cache``: JAX's
        persistent compilation cache (``gemma3_jax.runtime.compile_cache``). ``tensor_parallel``: the text decoder
        split over that many devices (``gemma3_jax.model.sharding``). ``quantize``: "int8", "fp8" or "int4" weights for
        the text decoder's products (``gemma3_jax.model.quant``), None for the model dtype."""
        t = time.perf_counter()
        checkpoint = Checkpoint.open(model, progress=progress, quantize=quantize, dtype=resolve_dtype(dtype))
        return cls.from_checkpoint(checkpoint, dtype=dtype, cache_length=cache_length,
                                   attention=attention, progress=progress, chunk=chunk,
                                   compilation_cache=compilation_cache, started=t, tensor_parallel=tensor_parallel,
                                   quantize=quantize)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, dtype: str | None = None, cache_length: int | None = None,
                        attention: str | Kernels = "auto", progress: bool = True, chunk: int = 32,
                        compilation_cache: bool = True, started: float | None = None,
                        tensor_parallel: int = 1, quantize: str | None = None) -> Generator:
        """The weights of an opened checkpoint loaded: what from_pretrained does after opening it."""
        t = time.perf_counter() if started is None else started
        dtype = resolve_dtype(dtype)
        _check_int("chunk", chunk, 1, 1024)
        cache_length = checkpoint.cache_length(cache_length, dtype)
        if compilation_cache:
            enable_compilation_cache()
        quantize = effective_mode(checkpoint.path, stored_mode(checkpoint.path), quantize)
        tensor_parallel = print_plan(checkpoint.cfg, dtype, tensor_parallel, 1, cache_length, quantize, progress)
        net = load_pretrained(checkpoint.path, dtype=dtype, attention=attention, progress=progress,
                              tensor_parallel=tensor_parallel, quantize=quantize)
        gen = cls(net, checkpoint, cache_length=cache_length, chunk=chunk)
        gen.load_s = time.perf_counter() - t
        return gen

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Any]] | None = None, *,
                     chat: bool | None = None, system: str | None = None) -> tuple[list[list[int]], np.ndarray | None]:
        """Token ids per prompt and pixel values (``Checkpoint.build_inputs``)."""
        return self.checkpoint.build_inputs(prompts, images, chat=chat, system=system)

    # ---- generation ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: str | Sequence[str] = (),
        chat: bool | None = None,
        system: str | None = None,
        stream: Callable[[int, str], None] | None = None,
    ) -> GenerationResult:
        """Generate for a prompt or a batch of prompts. ``stream(row, text_delta)`` is called as text arrives.
        ``chat=None``: the checkpoint's chat template wraps each prompt if it has one; raw text otherwise."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else prompts
        if single and images is not None:  # one prompt's images: a list of them, or a single one
            if not isinstance(images, (list, tuple)):
                images = [[images]]
            elif len(images) == 0 or not isinstance(images[0], (list, tuple)):
                images = [list(images)]
        # the images as uint8 levels: a quarter of float32's bytes to check and copy, the same values on the device
        ids, pixels = self.checkpoint.build_inputs(prompts, images, chat=chat, system=system, levels=True)
        return self.generate_from_inputs(ids, pixels, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_k=top_k, top_p=top_p, seed=seed, stop=stop, stream=stream)

    def generate_from_inputs(
        self,
        ids: list[list[int]],
        pixels: np.ndarray | PixelLevels | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: str | Sequence[str] = (),
        stream: Callable[[int, str], None] | None = None,
    ) -> GenerationResult:
        """``generate`` on prompts already built by ``build_inputs``."""
        max_new_tokens, seed, stop = check_generation_args(max_new_tokens, seed, stop)
        if stream is not None and not callable(stream):
            raise TypeError(f"stream must be a callable (row, text) or None, got {type(stream).__name__}")
        params = self.checkpoint.sampling_params(temperature, top_k, top_p)
        for row, p in enumerate(ids):
            check_fits(len(p), max_new_tokens, self.engine.cache_length, f"prompt {row}")
        check_memory(self.model.cfg, self.model.dtype, len(ids), self.engine.cache_length, weights_loaded=True)
        stop_ids = self.checkpoint.stop_ids
        timings = Timings()
        tokens: list[list[int]] = [[] for _ in ids]
        finished = [False] * len(ids)
        shown = [""] * len(ids)
        # Text per chunk only for a stream or stop strings, decoded incrementally (a row's whole text again after
        # every chunk cost ~0.17 s of host time per 4,096-token row); the final texts are decoded whole below.
        texts_as_they_come = stream is not None or bool(stop)
        decoders = [StreamDecoder(self.tokenizer) for _ in ids]

        def show(row: int, text: str) -> None:
            if stream is not None and text.startswith(shown[row]) and len(text) > len(shown[row]):
                stream(row, text[len(shown[row]) :])
                shown[row] = text

        for chunk in self.engine.generate_ids(ids, pixels, max_new_tokens=max_new_tokens, params=params,
                                              stop_ids=stop_ids, seed=seed, timings=timings,
                                              streaming=stream is not None):
            for row, new in enumerate(chunk.tolist()):
                if finished[row]:
                    continue
                start = len(tokens[row])
                for t in new:
                    tokens[row].append(t)
                    if t in stop_ids:
                        finished[row] = True
                        break
                if len(tokens[row]) >= max_new_tokens:
                    finished[row] = True
                if not texts_as_they_come:
                    continue
                dec = decoders[row]
                dec.push(tokens[row][start:])
                text = dec.text + dec.pending  # everything so far; ``pending`` may end in a split character
                cut = first_stop(text, stop)
                if cut is not None:
                    text, finished[row] = text[:cut], True
                show(row, text if finished[row] else dec.text)
            if all(finished):
                break
        texts = []
        for row in range(len(ids)):
            text = self._text(tokens[row])
            cut = first_stop(text, stop)
            if cut is not None:
                text, tokens[row] = text[:cut], self._through_stop(tokens[row], cut, stop)
            texts.append(text)
            show(row, texts[-1])  # the rest of a row's text, if what was shown is a prefix of it
        cache_bytes = cache_nbytes(self.model.cfg.text, len(ids), self.engine.cache_length, self.model.dtype)
        return GenerationResult(texts, tokens, [len(i) for i in ids], timings, cache_bytes)

    def _through_stop(self, ids: list[int], cut: int, stops: Sequence[str]) -> list[int]:
        """The shortest prefix of ``ids`` whose text holds the stop string found at ``cut``: the tokens emitted."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if first_stop(self._text(ids[:mid]), stops) == cut:
                hi = mid
            else:
                lo = mid + 1
        return ids[:lo]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest of ``stops`` starts in ``text`` (None: none does)."""
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
