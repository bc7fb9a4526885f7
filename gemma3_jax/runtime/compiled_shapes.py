"""Which shapes of a call are compiled, and a compiled one that covers a shape still compiling elsewhere.

A BatchEngine call's shape (rows x padded tokens, images per call) follows what is queued at that moment, so a
server under changing load meets shapes its warm-up did not compile, and a 4B model's mixed call takes seconds to
compile, during which every stream waits. With ``background=True`` a call whose shape is not compiled yet runs
padded to the smallest compiled shape that covers it (padded rows, tokens and image features are what the
buckets already add: masked out, never read), while its own shape compiles on another thread for the calls after
it. Without, or when nothing compiled covers it, the shape compiles in the caller's thread as before.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

Shape = tuple[int, ...]
COMPILE_THREAD = "compile"  # the background thread's name prefix


class CompiledShapes:
    """Compiled shapes per group (a call kind with its static settings); ``pick`` chooses the shape to run."""

    def __init__(self, background: bool = False):
        self.background = background
        self._ready: dict[Hashable, set[Shape]] = defaultdict(set)
        self._pending: dict[tuple[Hashable, Shape], Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=COMPILE_THREAD) if background else None
        self.padded_calls = 0  # calls run at a covering shape while theirs compiled
        self.errors: list[str] = []  # background compiles that failed (the shape then compiles when next met)
        self._failed: set[tuple[Hashable, Shape]] = set()
        self._closed = False

    def mark(self, group: Hashable, shape: Shape) -> None:
        """``shape`` of ``group`` is compiled."""
        with self._lock:
            self._ready[group].add(tuple(shape))

    def ready(self, group: Hashable) -> set[Shape]:
        with self._lock:
            return set(self._ready[group])

    def pick(self, group: Hashable, shape: Shape, compile_shape: Callable[[], None]) -> Shape:
        """The shape to run ``shape`` at: itself when compiled (or with no background compiles, no compiled cover,
        after ``close``, or once its background compile failed); else the smallest compiled shape at least as
        large on every axis, ``compile_shape()`` (which compiles ``shape`` and returns once it is ready) then
        running on the background thread."""
        shape = tuple(shape)
        with self._lock:
            ready = self._ready[group]
            if shape in ready or not self.background or self._closed or (group, shape) in self._failed:
                return shape
            covers = self._covers(group, shape)
            if not covers:
                return shape
            if (group, shape) not in self._pending:
                self._pending[group, shape] = self._pool.submit(self._run, group, shape, compile_shape)
            self.padded_calls += 1
            return min(covers, key=lambda c: (math.prod(c), c))

    def _covers(self, group: Hashable, shape: Shape) -> list[Shape]:
        """The compiled shapes of ``group`` at least as large as ``shape`` on every axis (under the lock)."""
        return [c for c in self._ready[group] if len(c) == len(shape) and all(a >= b for a, b in zip(c, shape))]

    def covered(self, group: Hashable, shape: Shape) -> bool:
        """Whether ``shape`` of ``group`` or a compiled shape at least as large on every axis is ready."""
        with self._lock:
            return bool(self._covers(group, tuple(shape)))

    def later(self, group: Hashable, shape: Shape, compile_shape: Callable[[], None]) -> None:
        """Compile ``shape`` of ``group`` on the background thread for calls to come (nothing without background
        compiles, or when it is ready, queued or failed)."""
        shape = tuple(shape)
        with self._lock:
            if (not self.background or self._closed or shape in self._ready[group] or (group, shape) in self._pending
                    or (group, shape) in self._failed):
                return
            self._pending[group, shape] = self._pool.submit(self._run, group, shape, compile_shape)

    def _run(self, group: Hashable, shape: Shape, compile_shape: Callable[[], None]) -> None:
        try:
            compile_shape()
            self.mark(group, shape)
        except Exception as e:  # noqa: BLE001 - the engine goes on with the covering shape
            with self._lock:
                self._failed.add((group, shape))
                self.errors.append(f"{group} {shape}: {type(e).__name__}: {e}"[:500])
        finally:
            with self._lock:
                self._pending.pop((group, shape), None)

    def wait(self) -> None:
        """Until every background compile asked for so far has finished (or was cancelled by ``close``)."""
        with self._lock:
            futures = list(self._pending.values())
        for f in futures:
            if not f.cancelled():
                f.exception()

    def close(self) -> None:
        """No more background compiles: those queued are dropped, one running finishes."""
        with self._lock:
            self._closed = True
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pending = {k: f for k, f in self._pending.items() if not f.cancelled()}
