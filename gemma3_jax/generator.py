"""The user-facing generator: prompts (+ images) in, text out, with streaming and timings.

    gen = Generator.from_pretrained("path/to/gemma-3-4b-it")          # or None: the default 270M
    out = gen.generate(["Describe <start_of_image>."], images=[["cat.png"]], max_new_tokens=64)
    out.texts, out.token_ids, out.timings
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma3_jax.cache import cache_nbytes
from gemma3_jax.engine import Engine, Timings
from gemma3_jax.loading import load_pretrained
from gemma3_jax.model import Gemma3
from gemma3_jax.processor import BOI, Processor, render_chat
from gemma3_jax.sampling import SamplingParams, generation_defaults
from gemma3_jax.tokenizer import StreamDecoder, Tokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
END_OF_TURN = "<end_of_turn>"


@dataclasses.dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    prompt_tokens: list[int]
    timings: Timings
    cache_bytes: int  # keys + values held: full length on global layers, window-sized rings on sliding ones


def resolve_dtype(name: str):
    if name == "float16":
        raise ValueError("dtype float16 is refused: Gemma-3 activations overflow float16; use bfloat16 or float32")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_checkpoint(model: str | Path | None, progress: bool = True) -> Path:
    """A checkpoint directory: as given, converted once from a .gguf file, or the default 270M."""
    from gemma3_jax import gguf

    if model is None:
        return gguf.default_checkpoint(progress=progress)
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        out = gguf.cache_root() / f"{path.stem}-{path.stat().st_size}"
        return out if (out / "config.json").is_file() else gguf.convert_gguf(path, out, progress=progress)
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} is neither a checkpoint directory nor a .gguf file")
    return path


class Generator:
    def __init__(
        self,
        model: Gemma3,
        tokenizer: Tokenizer,
        processor: Processor | None = None,
        *,
        cache_length: int = 4096,
        chunk: int = 32,
        defaults: dict[str, Any] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.engine = Engine(model, cache_length=cache_length, chunk=chunk)
        self.defaults = dict(defaults or {})
        self.load_s = 0.0

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        dtype: str = "bfloat16",
        cache_length: int = 4096,
        attention: str = "auto",
        progress: bool = True,
        chunk: int = 32,
    ) -> Generator:
        t = time.perf_counter()
        dtype = resolve_dtype(dtype)
        path = resolve_checkpoint(model, progress=progress)
        net = load_pretrained(path, dtype=dtype, attention=attention, progress=progress)
        tokenizer = Tokenizer.from_checkpoint(path)
        processor = Processor.from_pretrained(path) if net.cfg.is_multimodal else None
        gen = cls(net, tokenizer, processor, cache_length=cache_length, chunk=chunk, defaults=generation_defaults(path))
        gen.load_s = time.perf_counter() - t
        return gen

    # ---- prompts ---------------------------------------------------------------------------------
    def build_inputs(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        chat: bool = True,
        system: str | None = None,
    ) -> tuple[list[list[int]], np.ndarray | None]:
        """Token ids per prompt and pixel values. In chat mode images without ``<start_of_image>`` markers go
        before the prompt's text in the user turn; raw mode needs the markers in the text."""
        images = [list(i) for i in images] if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if not p.strip() and not images[i]:
                raise ValueError(f"prompt {i} is empty")
        if any(images) and self.processor is None:
            raise ValueError("images given to a text-only model (its config has no vision_config)")
        texts = []
        for p, imgs in zip(prompts, images):
            if chat:
                content = [{"type": "image"} for _ in range(len(imgs) if BOI not in p else 0)]
                content.append({"type": "text", "text": p})
                messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
                messages.append({"role": "user", "content": content})
                template = self.tokenizer.chat_template or (self.processor.chat_template if self.processor else None)
                texts.append(render_chat(messages, template, add_generation_prompt=True))
            else:
                if system:
                    raise ValueError("--system needs chat mode (it has no place in a raw prompt)")
                texts.append(p)
        if self.processor is not None:
            return self.processor(texts, images, tokenizer=self.tokenizer, add_bos=None)
        return [self.tokenizer.encode(t, add_bos=not t.startswith("<bos>")) for t in texts], None

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
        stop: Sequence[str] = (),
        chat: bool = True,
        system: str | None = None,
        stream: Callable[[int, str], None] | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts. ``stream(row, text_delta)`` is called as text arrives."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if single and images is not None and (len(images) == 0 or not isinstance(images[0], (list, tuple))):
            images = [list(images)]
        d = self.defaults
        params = SamplingParams(
            temperature=float(d.get("temperature", 0.0) if temperature is None else temperature),
            top_k=int(d.get("top_k", 0) if top_k is None else top_k),
            top_p=float(d.get("top_p", 1.0) if top_p is None else top_p),
        )
        stop_ids = sorted({*d.get("eos_token_id", ()), self.tokenizer.eos_id, *self._ids_of((END_OF_TURN,))})
        ids, pixels = self.build_inputs(prompts, images, chat=chat, system=system)
        timings = Timings()
        tokens: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        shown = [""] * len(prompts)
        # Text per chunk only for a stream or stop strings, decoded incrementally (a row's whole text again after
        # every chunk cost ~0.17 s of host time per 4,096-token row); the final texts are decoded whole below.
        texts_as_they_come = stream is not None or any(stop)
        decoders = [StreamDecoder(self.tokenizer) for _ in prompts]

        def show(row: int, text: str) -> None:
            if stream is not None and text.startswith(shown[row]) and len(text) > len(shown[row]):
                stream(row, text[len(shown[row]) :])
                shown[row] = text

        for chunk in self.engine.generate_ids(
            ids, pixels, max_new_tokens=max_new_tokens, params=params, stop_ids=stop_ids, seed=seed, timings=timings
        ):
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
                cut = _first_stop(text, stop)
                if cut is not None:
                    text, finished[row] = text[:cut], True
                show(row, text if finished[row] else dec.text)
            if all(finished):
                break
        texts = []
        for row in range(len(prompts)):
            text = self._text(tokens[row])
            cut = _first_stop(text, stop)
            texts.append(text if cut is None else text[:cut])
            show(row, texts[-1])  # the rest of a row's text, if what was shown is a prefix of it
        cache_bytes = cache_nbytes(self.model.cfg.text, len(prompts), self.engine.cache_length, self.model.dtype)
        return GenerationResult(texts, tokens, [len(i) for i in ids], timings, cache_bytes)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _ids_of(self, pieces) -> list[int]:
        return [i for i in (self.tokenizer.token_id(p) for p in pieces) if i is not None]


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
