"""Continuous batching: requests enter a queue, take a free slot, are prefilled in chunks between decode steps,
and leave their slot the moment they finish or are cancelled.

    engine = BatchEngine(model, max_batch=8, cache_length=4096, chunk_tokens=512)
    stream = engine.submit(Request(prompt_ids, pixel_values, max_new_tokens=64))
    for tokens in stream:  # lists of new token ids as they come (the engine runs while a stream is read)
        ...
    stream.finish_reason   # "stop", "length" or "cancelled"

One ``step`` admits queued requests into free slots (their images are encoded then, once per distinct image),
runs one prefill call (chunks of up to ``chunk_tokens`` tokens over up to ``prefill_rows`` prompts; a chunk never
ends inside an image), then a decode call over every slot: ``decode_steps`` steps, or ``interleave_steps`` while
prompts are waiting for prefill, so a long prompt does not stall the streams already decoding, or, while requests
queue for a slot, until the first slot reaches its token limit. ``start()`` runs
steps on a background thread instead of in the reader's.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import threading
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.gemma3 import Gemma3, check_inputs
from gemma3_jax.runtime.engine import StepWeights, VisionStep, compiled_step
from gemma3_jax.runtime.sampling import MAX_STOP_IDS, SamplingParams
from gemma3_jax.runtime.slots import RowSettings, SlotState, SlotSteps

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt as token ids (image tokens included) and its images [I, C, S, S] in the processor's float range."""

    prompt: Sequence[int]
    pixel_values: np.ndarray | None = None
    max_new_tokens: int = 64
    params: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: Sequence[int] = (1, 106)


class Stream:
    """A submitted request: its new tokens as they come, and how it ended. Iterating yields lists of new token
    ids until the request finishes (reading drives the engine when no background thread runs it)."""

    def __init__(self, engine: BatchEngine, request_id: int, request: Request, image_mask: np.ndarray):
        self.engine, self.id, self.request = engine, request_id, request
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.arrivals: list[tuple[float, int]] = []  # (time.perf_counter(), tokens) per delivery: latency stats
        self._image_mask = image_mask
        self._image_starts = np.flatnonzero(image_mask & ~np.r_[False, image_mask[:-1]])
        self._feats: list[jax.Array] = []  # one [T, D] per image, held until the prompt is prefilled
        self._slot: int | None = None
        self._prefilled = 0  # prompt positions already in the slot

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.engine.cancel(self)

    def __iter__(self) -> Iterator[list[int]]:
        seen = 0
        while True:
            with self.engine._cond:
                while len(self.tokens) == seen and not self.done:
                    if self.engine._thread is None:
                        break
                    self.engine._cond.wait()
                new, finished = self.tokens[seen:], self.done
            if new:
                seen += len(new)
                yield new
            if finished and seen == len(self.tokens):
                return
            if self.engine._thread is None and not new and not self.engine.step() and not self.done:
                raise RuntimeError(f"request {self.id} is neither queued, running nor finished")

    def result(self) -> list[int]:
        """Every new token, after the request finished."""
        for _ in self:
            pass
        return self.tokens


class FeatureCache:
    """Image features by content hash, least recently used first out, at most ``max_bytes`` held."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict[bytes, jax.Array] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = self.encodes = 0

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        image = np.ascontiguousarray(image)
        return hashlib.sha256(str((image.shape, image.dtype.str)).encode() + image.tobytes()).digest()

    def get(self, key: bytes) -> jax.Array | None:
        feats = self._items.get(key)
        if feats is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return feats

    def put(self, key: bytes, feats: jax.Array) -> None:
        self.encodes += 1
        size = feats.size * feats.dtype.itemsize
        if size > self.max_bytes:
            return
        self._items[key] = feats
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.size * old.dtype.itemsize


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


class BatchEngine:
    """``max_batch`` slots over one KV cache of ``cache_length`` positions per slot (or the longest that fits in
    ``memory_budget`` bytes). See the module doc for one step."""

    def __init__(self, model: Gemma3, *, max_batch: int = 8, cache_length: int | None = 4096,
                 memory_budget: int | None = None, chunk_tokens: int = 512, prefill_rows: int = 4,
                 decode_steps: int = 32, interleave_steps: int = 4, feature_cache_bytes: int = 256 << 20,
                 compiler_options: dict | None = None, verbose: bool = False):
        for name, v in (("max_batch", max_batch), ("chunk_tokens", chunk_tokens), ("prefill_rows", prefill_rows),
                        ("decode_steps", decode_steps), ("interleave_steps", interleave_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.cfg, self.dtype = model.cfg, model.dtype
        if memory_budget is not None:
            if cache_length is not None and cache_length != 4096:
                raise ValueError("give cache_length or memory_budget, not both")
            cache_length = self._length_for(memory_budget, max_batch)
        if isinstance(cache_length, bool) or not isinstance(cache_length, int) or cache_length < 1:
            raise ValueError(f"cache_length must be an int >= 1, got {cache_length!r}")
        self.max_batch, self.cache_length = max_batch, cache_length
        self.chunk_tokens, self.prefill_rows = chunk_tokens, min(prefill_rows, max_batch)
        self.decode_steps, self.interleave_steps = decode_steps, min(interleave_steps, decode_steps)
        self.platform = model.kernels.platform
        self.compiler_options = compiler_options
        self._text = StepWeights.of(model.text)
        self._vision = StepWeights.of(VisionStep(model.vision, model.projector)) if self.cfg.is_multimodal else None
        self._steps = SlotSteps(self.cfg, self.cfg.text.pad_token_id)
        self._compiled: dict = {}
        self._donate = self.platform != "cpu"
        self.cache = kvc.init_cache(self.cfg.text, max_batch, cache_length, self.dtype)
        self.state = SlotState.empty(max_batch)
        self.features = FeatureCache(feature_cache_bytes)
        self._queue: collections.deque[Stream] = collections.deque()
        self._slots: list[Stream | None] = [None] * max_batch
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._cancelled: list[Stream] = []
        self.counters = collections.Counter()
        self._window: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)  # (time, decode tokens)
        if verbose:
            print(self.memory_plan())

    # ---- sizes ---------------------------------------------------------------------------------
    def _length_for(self, budget: int, slots: int) -> int:
        """The longest cache (a multiple of 128 positions) whose keys and values for ``slots`` fit ``budget``."""
        length = 0
        while kvc.cache_nbytes(self.cfg.text, slots, length + 128, self.dtype) <= budget:
            length += 128
        if length == 0:
            need = kvc.cache_nbytes(self.cfg.text, slots, 128, self.dtype)
            raise ValueError(f"memory_budget {budget} bytes holds no 128-position cache for {slots} slots "
                             f"(needs {need} bytes)")
        return length

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    def memory_plan(self) -> str:
        return (f"KV cache: {self.max_batch} slots x {self.cache_length} positions = "
                f"{self.cache_bytes / 2**30:.2f} GiB ({self.dtype.name}; sliding layers hold "
                f"{min(self.cfg.text.sliding_window, self.cache_length)} positions a slot)")

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, request: Request) -> Stream:
        """Queue a request; it is refused here (ValueError/TypeError) if it can never be served."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes a Request, got {type(request).__name__}")
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or len(prompt) == 0:
            raise ValueError(f"prompt must be a non-empty list of token ids, got shape {prompt.shape}")
        n = request.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
        if not isinstance(request.params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(request.params).__name__}")
        if len(request.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(request.stop_ids)}")
        if isinstance(request.seed, bool) or not isinstance(request.seed, int):
            raise TypeError(f"seed must be an int, got {request.seed!r}")
        kvc.check_fits(len(prompt), n, self.cache_length)
        ids, px, _ = check_inputs(self.cfg, prompt[None], request.pixel_values)  # token range, image count
        image_mask = np.asarray(ids)[0] == self.cfg.image_token_id
        with self._cond:
            stream = Stream(self, next(self._ids), request, image_mask)
            self._queue.append(stream)
            self.counters["submitted"] += 1
            self._cond.notify_all()
        return stream

    def cancel(self, stream: Stream) -> None:
        """Stop a request: it leaves the queue or frees its slot at the next step boundary."""
        with self._cond:
            if stream.done:
                return
            if stream in self._queue:
                self._queue.remove(stream)
                self._finish(stream, "cancelled")
            else:
                self._cancelled.append(stream)
            self._cond.notify_all()

    def _finish(self, stream: Stream, reason: str) -> None:
        stream.finish_reason = reason
        stream._feats = []
        if stream._slot is not None:
            self._slots[stream._slot] = None
            stream._slot = None
        self.counters[reason] += 1

    # ---- compiled steps ------------------------------------------------------------------------
    def _compile(self, name: str, fn, args, static, donate=()):
        # the embedding call is a prefill step for XLA's options
        compiled, new = compiled_step(self._compiled, "prefill" if name == "embed" else name, lambda: fn,
                                      (name, static), args, platform=self.platform,
                                      compiler_options=self.compiler_options,
                                      donate=donate if self._donate else ())
        if new:
            self.counters[f"compiles_{name}"] += 1
        return compiled

    def _encode(self, images: list[np.ndarray]) -> list[jax.Array]:
        """Features [T, D] of each image, in one vision call padded to a power of two of images."""
        vw = self._vision
        n = len(images)
        px = np.zeros((_pow2(n), *images[0].shape), np.float32)
        px[:n] = np.stack(images)

        def vision(rest, groups, pixel_values):
            step = vw.merge(rest, groups)
            return step.projector(step.vision(pixel_values))

        args = (vw.rest, vw.groups, jnp.asarray(px))
        feats = self._compile("vision", vision, args, None)(*args)
        return [feats[i] for i in range(n)]

    def _chunk_bucket(self, n: int) -> int:
        """A prefill call's padded length: a sixteenth, a quarter or all of ``chunk_tokens`` (multiples of 32), so
        each shape compiles once; an image longer than the budget gets a power of two."""
        for b in sorted({-(-max(self.chunk_tokens // d, 1) // 32) * 32 for d in (16, 4, 1)}):
            if n <= b:
                return b
        return _pow2(n)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, prefill one chunk call, decode; returns whether there was any work."""
        with self._cond:
            for stream in self._cancelled:
                if not stream.done:
                    if stream._slot is not None:
                        self.state = self.state._replace(active=self.state.active.at[stream._slot].set(False))
                    self._finish(stream, "cancelled")
            if self._cancelled:
                self._cancelled.clear()
                self._cond.notify_all()  # readers of a cancelled stream wait for its end
            admitted = self._admit()
            prefilling = [s for s in self._slots if s is not None and s._prefilled < len(s.request.prompt)]
            decoding = [s for s in self._slots if s is not None and s._prefilled == len(s.request.prompt)
                        and not s.done]
        if admitted:
            self._encode_images(admitted)
        if not prefilling and not decoding:
            return False
        if prefilling:
            self._prefill(prefilling)
        with self._cond:
            decoding = [s for s in self._slots if s is not None and s._prefilled == len(s.request.prompt)]
            limit = self.decode_steps
            if any(s is not None and s._prefilled < len(s.request.prompt) for s in self._slots):
                limit = self.interleave_steps  # a prompt is waiting for its next chunk
            elif self._queue and decoding:  # stop when the first slot frees, so the queue moves at once
                limit = min(limit, min(s.request.max_new_tokens - len(s.tokens) for s in decoding))
        if decoding:
            self._decode(decoding, max(limit, 1))
        return True

    def _admit(self) -> list[Stream]:
        admitted = []
        for slot in range(self.max_batch):
            if not self._queue:
                break
            if self._slots[slot] is None:
                stream = self._queue.popleft()
                stream._slot = slot
                self._slots[slot] = stream
                admitted.append(stream)
        return admitted

    def _encode_images(self, streams: list[Stream]) -> None:
        """Every admitted request's image features: from the cache, else encoded together in one call."""
        found: dict[bytes, jax.Array] = {}
        todo: dict[bytes, np.ndarray] = {}
        keys = []
        for s in streams:
            images = [] if s.request.pixel_values is None else list(np.asarray(s.request.pixel_values, np.float32))
            keys.append([FeatureCache.key(im) for im in images])
            for k, im in zip(keys[-1], images):
                if k in found or k in todo:
                    continue
                feats = self.features.get(k)
                if feats is None:
                    todo[k] = im
                else:
                    found[k] = feats
        if todo:
            for k, feats in zip(todo, self._encode(list(todo.values()))):
                self.features.put(k, feats)
                found[k] = feats
        for s, ks in zip(streams, keys):
            s._feats = [found[k] for k in ks]

    def _prefill(self, prefilling: list[Stream]) -> None:
        budget, rows = self.chunk_tokens, []
        for s in prefilling:
            if len(rows) == self.prefill_rows or budget <= 0:
                break
            start = s._prefilled
            end = kvc.chunk_end(s._image_mask, start, budget)
            if rows and end - start > budget:  # an image longer than what is left: first in the next call
                continue
            rows.append((s, start, end))
            budget -= end - start
        b = _pow2(len(rows)) if len(rows) <= self.prefill_rows else len(rows)
        b = min(b, self.max_batch)
        t = self._chunk_bucket(max(e - st for _, st, e in rows))
        ids = np.full((b, t), self.cfg.text.pad_token_id, np.int32)
        seg = np.full((b, t), -1, np.int32)
        slot = np.full((b,), self.max_batch, np.int32)
        start = np.zeros((b,), np.int32)
        length = np.zeros((b,), np.int32)
        last = np.zeros((b,), bool)
        max_new = np.ones((b,), np.int32)
        stops = np.full((b, MAX_STOP_IDS), -1, np.int32)
        temp, top_k, top_p = np.zeros((b,), np.float32), np.zeros((b,), np.int32), np.ones((b,), np.float32)
        seeds = np.zeros((b,), np.uint32)
        feats = []
        for r, (s, st, e) in enumerate(rows):
            req = s.request
            ids[r, : e - st] = np.asarray(req.prompt[st:e])
            mask = s._image_mask[st:e]
            seg[r, : e - st] = np.where(mask, np.cumsum(mask & ~np.r_[False, mask[:-1]]) - 1, -1)
            slot[r], start[r], length[r] = s._slot, st, e - st
            last[r] = e == len(req.prompt)
            max_new[r] = req.max_new_tokens
            stops[r, : len(req.stop_ids)] = req.stop_ids
            temp[r], top_k[r], top_p[r] = req.params.temperature, req.params.top_k, req.params.top_p
            seeds[r] = req.seed & 0xFFFFFFFF
            first = int(np.searchsorted(s._image_starts, st))
            feats += s._feats[first: int(np.searchsorted(s._image_starts, e))]
        feat_arg = None
        if feats:
            n_img = _pow2(len(feats))
            feat_arg = jnp.stack(feats + [jnp.zeros_like(feats[0])] * (n_img - len(feats)))
        chunk = kvc.PromptChunk(jnp.asarray(slot), jnp.asarray(start), jnp.asarray(length), jnp.asarray(seg))
        row = RowSettings(jnp.asarray(last), jnp.asarray(max_new), jnp.asarray(seeds),
                          jnp.asarray(stops), jnp.asarray(temp), jnp.asarray(top_k), jnp.asarray(top_p))
        greedy_only = all(s.request.params.greedy for s, _, _ in rows)
        steps, tw = self._steps, self._text

        def embed(weights, ids, feats):
            return steps.embed(tw.merge_flat(weights), ids, feats)

        def prefill(weights, cache, state, embeddings, chunk, row):
            return steps.prefill(tw.merge_flat(weights), cache, state, embeddings, chunk, row, greedy_only)

        args = (tw.flat, jnp.asarray(ids), feat_arg)
        embeddings = self._compile("embed", embed, args, None)(*args)
        args = (tw.flat, self.cache, self.state, embeddings, chunk, row)
        fn = self._compile("prefill", prefill, args, greedy_only, donate=(1, 2))
        self.cache, self.state, token = fn(*args)
        token = np.asarray(token)
        now = time.perf_counter()
        with self._cond:
            for r, (s, st, e) in enumerate(rows):
                s._prefilled = e
                self.counters["prefill_tokens"] += e - st
                if last[r]:
                    s._feats = []
                    s.first_token_at = now
                    self._push(s, [int(token[r])])
            self._cond.notify_all()

    def _decode(self, decoding: list[Stream], limit: int) -> None:
        steps, tw, n = self._steps, self._text, self.decode_steps
        greedy_only = all(s.request.params.greedy for s in self._slots if s is not None)

        def decode(weights, cache, state, limit):
            return steps.decode(tw.merge_flat(weights), cache, state, limit, n, greedy_only)

        args = (tw.flat, self.cache, self.state, jnp.int32(limit))
        fn = self._compile("decode", decode, args, greedy_only, donate=(1, 2))
        self.cache, self.state, out, produced = fn(*args)
        out, produced = np.asarray(out), np.asarray(produced)
        with self._cond:
            total = 0
            for s in decoding:
                if s.done or s._slot is None:
                    continue
                k = int(produced[s._slot])
                total += k
                self._push(s, out[s._slot, :k].tolist())
            self.counters["decode_tokens"] += total
            self.counters["decode_calls"] += 1
            self.counters["decoding_slots"] += len(decoding)  # / decode_calls: mean slot occupancy
            self._window.append((time.perf_counter(), total))
            self._cond.notify_all()

    def _push(self, stream: Stream, tokens: list[int]) -> None:
        """New tokens of a stream; finishes it on a stop id or its token limit (as the device did)."""
        if stream.done:
            return
        stream.tokens.extend(tokens)
        if tokens:
            stream.arrivals.append((time.perf_counter(), len(tokens)))
        req = stream.request
        if stream.tokens and stream.tokens[-1] in req.stop_ids:
            self._finish(stream, "stop")
        elif len(stream.tokens) >= req.max_new_tokens:
            self._finish(stream, "length")

    # ---- running -------------------------------------------------------------------------------
    def run(self) -> None:
        """Step until every submitted request finished (no background thread)."""
        while self.step():
            pass

    def start(self) -> None:
        """Run steps on a background thread (readers then wait instead of stepping)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="gemma3-batching", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread.join()
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and not self._cancelled and \
                        all(s is None for s in self._slots):
                    self._cond.wait()
                if self._stop:
                    return
            self.step()

    def stats(self) -> dict:
        with self._cond:
            active = [s for s in self._slots if s is not None]
            held = sum(s._prefilled + max(len(s.tokens) - 1, 0) for s in active)
            window = list(self._window)
        rate = 0.0
        if len(window) >= 2 and window[-1][0] > window[0][0]:
            rate = sum(n for _, n in window[1:]) / (window[-1][0] - window[0][0])
        return dict(queued=len(self._queue), active_slots=len(active), max_batch=self.max_batch,
                    cache_positions_held=held, cache_positions=self.max_batch * self.cache_length,
                    cache_bytes=self.cache_bytes, decode_tok_per_s=rate,
                    feature_cache=dict(bytes=self.features.nbytes, hits=self.features.hits,
                                       encodes=self.features.encodes),
                    **dict(self.counters))
