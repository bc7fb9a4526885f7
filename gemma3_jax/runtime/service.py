"""Requests as users write them, served together: the Python API a server stands on.

    service = Service.from_pretrained("path/to/gemma-3-4b-it", max_batch=16)
    stream = service.submit(messages=[{"role": "user", "content": [
        {"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]}], max_new_tokens=64)
    for delta in stream:            # or: async for delta in stream
        print(delta.text, end="")
    stream.finish_reason            # "stop", "length" or "cancelled"
    service.stats(); service.close()

A request is a raw ``prompt`` (completion), chat ``messages`` (the checkpoint's chat template), or ``token_ids``;
sampling settings default to the checkpoint's generation_config.json, as in ``Generator``. Every request is
checked at ``submit`` (ValueError/TypeError naming the value), before it queues. Steps run on a background thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma3_jax.checkpoints.checkpoint import Checkpoint, check_generation_args
from gemma3_jax.checkpoints.loading import load_pretrained
from gemma3_jax.checkpoints.quantized import effective_mode, stored_mode
from gemma3_jax.model.gemma3 import token_id_row
from gemma3_jax.model.pixels import PixelLevels
from gemma3_jax.preprocessing.tokenizer import StreamDecoder
from gemma3_jax.runtime.batching import BatchEngine, Stream
from gemma3_jax.runtime.compile_cache import enable_compilation_cache
from gemma3_jax.runtime.engine import STREAM_CHUNK_S
from gemma3_jax.runtime.generator import first_stop, print_plan, resolve_dtype
from gemma3_jax.runtime.requests import Request
from gemma3_jax.runtime.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Delta:
    """What a stream adds: ``text`` (may be empty while a character is split across tokens) and its tokens."""

    text: str
    token_ids: list[int]


class TextStream:
    """One request's text as it comes, with stop strings applied. Iterate (or ``async for``) for ``Delta``s; the
    readings share one place in the text, so each delta goes to one reader (a loop left early and ``result()``
    after it, or several readers at once, neither repeat nor lose text). Leaving a loop early leaves the request
    running (``result()`` still gives all of it): ``cancel()`` frees its slot; a cancelled asyncio task reading it
    cancels it."""

    def __init__(self, stream: Stream, service: Service, stop: tuple[str, ...], prompt_tokens: int):
        self._stream, self._service, self._stop = stream, service, stop
        self._decoder = StreamDecoder(service.checkpoint.tokenizer)
        self.prompt_tokens = prompt_tokens
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._lock = threading.Lock()  # held while a delta is taken, never while waiting for one

    @property
    def id(self) -> int:
        return self._stream.id

    @property
    def ttft_s(self) -> float | None:
        s = self._stream
        return None if s.first_token_at is None else s.first_token_at - s.submitted

    def inter_token_s(self) -> list[float]:
        """Seconds between tokens after the first (tokens delivered together share their delivery's gap)."""
        arrivals = self._stream.arrivals
        return [(t - prev) / n for (prev, _), (t, n) in zip(arrivals, arrivals[1:]) for _ in range(n)]

    def cancel(self) -> None:
        self._stream.cancel()

    def __iter__(self) -> Iterator[Delta]:
        while (delta := self._next()) is not None:
            yield delta

    async def __aiter__(self):
        """Deltas as the engine's thread delivers them: this stream's own event wakes the reader, so many streams
        read by one event loop neither hold a thread each nor all wake on every delivery."""
        if self._stream.engine._thread is None:  # no engine thread: reading drives the engine
            try:
                while (delta := await asyncio.to_thread(self._next)) is not None:
                    yield delta
            except asyncio.CancelledError:  # the reading task was cancelled: nobody reads this request any more
                self.cancel()
                raise
            return
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake():  # on the engine's thread
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop has closed: nobody reads any more
                pass

        self._stream.listen(wake)
        try:
            while True:
                with self._lock:  # never held across an await: poll does not wait
                    if self.finish_reason is not None:
                        return
                    tokens, ended = self._stream.poll(len(self.token_ids))
                    delta = self._take(tokens) if tokens else self._take(None) if ended else None
                if delta is None:
                    await ready.wait()
                    ready.clear()
                    continue
                yield delta
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self._stream.unlisten(wake)

    def result(self) -> str:
        """The whole text, after the request finished."""
        for _ in self:
            pass
        return self.text

    def _next(self) -> Delta | None:
        """The next delta, or None once finished (a blocking wait for the engine)."""
        while True:
            with self._lock:
                if self.finish_reason is not None:
                    return None
                seen = len(self.token_ids)
            tokens, ended = self._stream.wait(seen)
            with self._lock:
                if self.finish_reason is not None:
                    return None
                if len(self.token_ids) != seen:  # another reader took these meanwhile
                    continue
                return self._take(tokens if tokens else None)

    def _take(self, tokens: list[int] | None) -> Delta:
        """The delta of newly arrived ``tokens`` (None: the request ended), stop strings applied."""
        if tokens is None:  # the engine finished the request: the rest of the text, decoded whole
            return self._end(self._stream.finish_reason, self._full_text(self.token_ids))
        self.token_ids.extend(tokens)
        dec = self._decoder
        dec.push(tokens)
        text = dec.text + dec.pending
        cut = first_stop(text, self._stop)
        if cut is not None:
            self._stream.cancel()  # frees the slot now
            return self._end("stop", text[:cut])
        return self._delta(dec.text, tokens)

    def _delta(self, text: str, tokens: list[int]) -> Delta:
        new = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += new
        return Delta(new, tokens)

    def _end(self, reason: str, text: str) -> Delta:
        delta = self._delta(text, [])
        self.finish_reason = reason
        return delta

    def _full_text(self, ids: list[int]) -> str:
        return self._service.checkpoint.tokenizer.decode(ids, skip_special_tokens=True)


class Service:
    """A checkpoint's tokenizer, processor and chat template over a ``BatchEngine`` running on its own thread."""

    def __init__(self, engine: BatchEngine, checkpoint: Checkpoint, *, start: bool = True):
        self.engine, self.checkpoint = engine, checkpoint
        self.started = time.time()
        if start:
            engine.start()

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, *, dtype: str | None = None, max_batch: int = 8,
                        cache_length: int | None = None, memory_budget: int | None = None,
                        chunk_tokens: int = 512, step_tokens: int | None = None, max_queue: int | None = None,
                        attention: str = "auto", tensor_parallel: int = 1, quantize: str | None = None,
                        progress: bool = True, background_compile: bool = True,
                        compilation_cache: bool = True, verbose: bool = False,
                        engine_process: bool = False) -> Service:
        """``model``: a checkpoint directory, a .gguf file, or None for the default 270M; ``tensor_parallel`` and
        ``quantize`` as ``Generator.from_pretrained``; ``background_compile`` as ``BatchEngine``'s (a prompt
        chunk of a shape not compiled yet runs padded to one that is, instead of stalling every stream).
        ``engine_process``: load the weights and run the engine in a child process, warmed up before this returns
        (``runtime.engine_process``): this process's threads then never hold the GIL the engine's thread needs;
        this process keeps the tokenizer, processor and chat template, and never touches the accelerator."""
        if engine_process:
            from gemma3_jax.runtime.engine_process import RemoteEngine

            kwargs = {k: v for k, v in locals().items() if k not in ("cls", "engine_process", "RemoteEngine")}
            engine = RemoteEngine(kwargs)
            try:  # the directory the child resolved (a .gguf converted there once): read here, not converted again
                checkpoint = dataclasses.replace(Checkpoint.open(engine.checkpoint_path, progress=False),
                                                 name=engine.checkpoint_name)
            except BaseException:
                engine.close()
                raise
            return cls(engine, checkpoint, start=False)  # it runs already
        dtype = resolve_dtype(dtype)
        checkpoint = Checkpoint.open(model, progress=progress, quantize=quantize, dtype=dtype)
        if memory_budget is None:
            cache_length = checkpoint.cache_length(cache_length, dtype, batch=max_batch)
        if compilation_cache:
            enable_compilation_cache()
        quantize = effective_mode(checkpoint.path, stored_mode(checkpoint.path), quantize)
        tensor_parallel = print_plan(checkpoint.cfg, dtype, tensor_parallel, max_batch,
                                     cache_length or 0, quantize, progress)
        net = load_pretrained(checkpoint.path, dtype=dtype, attention=attention, progress=progress,
                              tensor_parallel=tensor_parallel, quantize=quantize)
        engine = BatchEngine(net, max_batch=max_batch, cache_length=cache_length, memory_budget=memory_budget,
                             chunk_tokens=chunk_tokens, step_tokens=step_tokens, max_queue=max_queue,
                             stream_s=STREAM_CHUNK_S, background_compile=background_compile, verbose=verbose)
        return cls(engine, checkpoint)

    def submit(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
               token_ids: Sequence[int] | None = None, images: Sequence[Any] | None = None,
               max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, stop: str | Sequence[str] = ()) -> TextStream:
        """Queue one request: exactly one of ``prompt`` (raw text; ``images`` go where its ``<start_of_image>``
        markers are, or first), ``messages`` (images inside them) or ``token_ids`` (with ``images`` as pixel values
        [I, 3, S, S] or ``PixelLevels``)."""
        given = [name for name, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages or token_ids, got {given or 'none'}")
        max_new_tokens, seed, stop = check_generation_args(max_new_tokens, seed, stop)
        params = self.checkpoint.sampling_params(temperature, top_k, top_p)
        ckpt = self.checkpoint
        if messages is not None:
            if images is not None:
                raise ValueError("with messages, images go inside them ({'type': 'image', 'image': ...})")
            ids, pixels = ckpt.build_chat(messages, levels=True)  # uint8 levels: a quarter of the bytes to move
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            if images is not None:  # a list of images, or a single one (as Generator.generate takes them): a
                # path is not split into characters, an array's rows are not taken for images
                images = list(images) if isinstance(images, (list, tuple)) else [images]
            ids, pixels = ckpt.build_inputs([prompt], None if images is None else [images], chat=False, levels=True)
            ids = ids[0]
        else:
            ids = [int(t) for t in token_id_row(token_ids, "token_ids")]
            pixels = None if images is None else images if isinstance(images, PixelLevels) else np.asarray(images)
        request = Request(ids, pixels, max_new_tokens=max_new_tokens, params=params, seed=seed,
                          stop_ids=tuple(ckpt.stop_ids))
        return TextStream(self.engine.submit(request), self, stop, len(ids))

    def warm_up(self, covers: bool | None = None) -> None:
        """Compile the shortest prompt's prefill, a chunk beside a decoding slot (a mixed step) and the decode
        steps now, greedy and sampled (each compiles apart: greedy steps skip the sampling), so the first requests
        do not wait: two requests run them, and a call they did not happen to make (whether the second is admitted
        while the first still decodes is a race) compiles without running. ``covers`` (default: with background
        compiles, off a CPU): also the largest prefill and mixed shapes (``BatchEngine.compile_covers``), which any
        other chunk's shape runs padded to until its own has compiled; on a CPU they take minutes to compile (the
        kernels are interpreted there)."""
        if not isinstance(self.engine, BatchEngine):  # an engine in its own process warmed up as it started
            return
        if covers is None:
            covers = self.engine.shapes.background and self.engine.platform != "cpu"
        bos = self.checkpoint.tokenizer.bos_id
        for params in (SamplingParams(), SamplingParams(temperature=1.0)):
            first = self.engine.submit(Request([bos, bos], max_new_tokens=8, params=params, stop_ids=()))
            next(iter(first))  # decoding
            second = self.engine.submit(Request([bos, bos], max_new_tokens=2, params=params, stop_ids=()))
            first.result()
            second.result()
            for kind in ("prefill", "mixed"):
                self.engine.compile_chunk(kind, params.greedy, 2)
            if covers:
                self.engine.compile_covers(params.greedy)

    def stats(self) -> dict:
        return dict(self.engine.stats(), model=self.checkpoint.name, uptime_s=time.time() - self.started)

    def close(self) -> None:
        """Stop the engine's threads (requests still running stay unfinished)."""
        self.engine.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
