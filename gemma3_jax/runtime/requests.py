"""A request to a serving engine and the stream of its tokens: what ``BatchEngine`` (``runtime.batching``) and an
engine in a process of its own (``runtime.engine_process``) take and give back.

    stream = engine.submit(Request(prompt_ids, pixel_values, max_new_tokens=64))
    for tokens in stream:  # lists of new token ids as they come
        ...
    stream.finish_reason   # "stop", "length" or "cancelled"
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np

from gemma3_jax.model.pixels import PixelLevels
from gemma3_jax.runtime.sampling import SamplingParams


class QueueFull(RuntimeError):
    """``submit`` while ``max_queue`` requests already wait for a slot: try again later."""


class EngineClosed(RuntimeError):
    """The engine was closed (or its process is gone): it serves no more requests."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt as token ids (image tokens included) and its images [I, C, S, S] in the processor's float range,
    or as ``PixelLevels`` (uint8 levels and the processor's table: a quarter of the bytes to check, hash and copy).
    The engine reads ``pixel_values`` (without copying them) until the request's first token: keep them unchanged
    until then."""

    prompt: Sequence[int]
    pixel_values: np.ndarray | PixelLevels | None = None
    max_new_tokens: int = 64
    params: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: Sequence[int] = (1, 106)


class TokenStream:
    """A request's new tokens as they come, and how it ended, filled in by its engine under the engine's lock
    (``engine._cond``): a ``BatchEngine``, or one in another process (``runtime.engine_process``). Iterating
    yields lists of new token ids until the request finishes (reading drives the engine when no thread runs it)."""

    def __init__(self, engine, request_id: int):
        self.engine, self.id = engine, request_id
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.arrivals: list[tuple[float, int]] = []  # (time.perf_counter(), tokens) per delivery: latency stats
        self._listeners: list = []  # called (engine's lock held) when tokens arrive or the request ends

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.engine.cancel(self)

    def listen(self, fn) -> None:
        """Call ``fn()`` (on the engine's thread, quick and not blocking) whenever tokens arrive or the request ends,
        so a reader can wait for its own stream alone (e.g. an asyncio event) instead of on the engine's lock."""
        with self.engine._cond:
            self._listeners.append(fn)
            if self.done:
                fn()

    def unlisten(self, fn) -> None:
        with self.engine._cond:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def poll(self, seen: int) -> tuple[list[int], bool]:
        """(tokens after the first ``seen``, whether the request has ended) without waiting."""
        with self.engine._cond:
            return self.tokens[seen:], self.done

    def wait(self, seen: int) -> tuple[list[int], bool]:
        """As ``poll``, once there are tokens after the first ``seen`` or the request has ended. With no engine
        thread the reader steps the engine itself (one step at a time, whichever readers there are)."""
        while True:
            with self.engine._cond:
                while len(self.tokens) == seen and not self.done and self.engine._thread is not None:
                    self.engine._cond.wait()
                new, finished = self.tokens[seen:], self.done
            if new or finished:
                return new, finished
            if not self.engine.step() and not self.done:
                raise RuntimeError(f"request {self.id} is neither queued, running nor finished")

    def _notify(self) -> None:
        for fn in self._listeners:
            fn()

    def __iter__(self) -> Iterator[list[int]]:
        seen = 0
        while True:
            new, finished = self.wait(seen)
            seen += len(new)
            if new:
                yield new
            if finished and seen == len(self.tokens):
                return

    def result(self) -> list[int]:
        """Every new token, after the request finished."""
        for _ in self:
            pass
        return self.tokens
