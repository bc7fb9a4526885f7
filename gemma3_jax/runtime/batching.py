"""Continuous batching: requests enter a queue, take a free slot, are prefilled in chunks between decode steps,
and leave their slot the moment they finish or are cancelled.

    engine = BatchEngine(model, max_batch=8, cache_length=4096, chunk_tokens=512)
    stream = engine.submit(Request(prompt_ids, pixel_values, max_new_tokens=64))
    for tokens in stream:  # lists of new token ids as they come (the engine runs while a stream is read)
        ...
    stream.finish_reason   # "stop", "length" or "cancelled"

One ``step`` admits queued requests into free slots and dispatches one compiled call: while prompts wait for
prefill, their next chunks (a chunk never ends inside an image; a request's images are encoded when it is
admitted, once per distinct image, batched across the requests admitted together) together with one decode step of every decoding slot, in one pass over the weights, so
prompt chunks ride on the decode steps instead of stalling them; otherwise a run of up to ``decode_steps`` decode
steps, cut short when a slot frees while requests queue. Chunks carry up to ``step_tokens`` prompt tokens while
other slots decode, ``chunk_tokens`` when none does. A call's tokens are read after the next call is dispatched,
so the host's work overlaps the device's. ``start()`` runs steps on a background thread instead of in the
reader's.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import dataclasses
import itertools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.gemma3 import Gemma3, check_inputs, token_id_row
from gemma3_jax.model.pixels import PixelLevels, as_pixels
from gemma3_jax.runtime.compiled_shapes import COMPILE_THREAD, CompiledShapes
from gemma3_jax.runtime.engine import StepWeights, VisionStep, compiled_step
from gemma3_jax.runtime.features import FeatureCache, PendingKey
from gemma3_jax.runtime.requests import EngineClosed, QueueFull, Request, TokenStream
from gemma3_jax.runtime.sampling import MAX_STOP_IDS, SamplingParams, check_stop_ids, seed32
from gemma3_jax.runtime.slots import SlotState, SlotSteps, pack_rows, packed_width, unpack_rows

GAP_BOUNDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)  # seconds: the buckets of ``BatchEngine.delivery_gaps``
THREAD_STATES = ("idle", "waiting", "host")  # the keys of ``BatchEngine.thread_s``


class Stream(TokenStream):
    """A request submitted to a ``BatchEngine``: its tokens (``TokenStream``), and its prompt's and images' state
    while the engine admits and prefills it."""

    def __init__(self, engine: BatchEngine, request_id: int, request: Request, image_mask: np.ndarray,
                 runs: tuple[np.ndarray, np.ndarray]):
        super().__init__(engine, request_id)
        self.request = request
        self._image_mask = image_mask
        self._image_starts = image_starts(runs, engine._image_tokens)
        px = request.pixel_values  # checked
        self._images = ([] if px is None else [PixelLevels(px.levels[i], px.table) for i in range(len(px))]
                        if isinstance(px, PixelLevels) else list(np.asarray(px, np.float32)))
        # each image's fingerprint, and its key hashed on the cache's threads while the request waits
        prints_keys = [engine.features.fingerprint_and_key_later(im) for im in self._images]
        self._image_prints = [fp for fp, _ in prints_keys]
        self._image_keys = [key for _, key in prints_keys]
        self._feats: list[jax.Array] = []  # one [T, D] per image from admission until the prompt is prefilled
        self._slot: int | None = None
        self._prefilled = 0  # prompt positions already in the slot


@dataclasses.dataclass
class _Call:
    """A dispatched call's outputs (device arrays, read when delivered) and whom they go to."""

    decoding: list[tuple[Stream, int]]  # (stream, slot) of every slot that was decoding
    tokens: jax.Array | None  # [S, steps] decode tokens ([S]: a mixed call's one step)
    produced: jax.Array | None  # [S] tokens each slot produced (a mixed call: whether it produced one)
    kind: str = "decode"  # decode, mixed or prefill
    shape: tuple[int, ...] = ()  # (rows, padded tokens) of a prefill or mixed call
    rows: list[tuple[Stream, bool]] = dataclasses.field(default_factory=list)  # prefill rows, whether the prompt ended
    first: jax.Array | None = None  # [B] each prefill row's first token
    prompt_tokens: int = 0  # prompt tokens a prefill or mixed call carries (of rows x padded tokens)
    steps: int = 1  # the most tokens it gives a decoding slot
    dispatched: float = 0.0  # time.perf_counter() when the call was entered
    record: dict | None = None  # this call's entry in ``BatchEngine.calls`` when calls are recorded
    host_ms: dict = dataclasses.field(default_factory=dict)  # the host's time in each part of the dispatch

    def start_reads(self) -> None:
        """Queue the copies of what the host will read now, right behind the call."""
        for out in (self.first, self.tokens, self.produced):
            if out is not None:
                out.copy_to_host_async()


def image_runs(image_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of image tokens: two images side by side make one run (which transformers' mask
    treats as one span)."""
    starts = np.flatnonzero(image_mask & ~np.r_[False, image_mask[:-1]])
    ends = np.flatnonzero(image_mask & ~np.r_[image_mask[1:], False]) + 1
    return starts, ends


def image_starts(runs: tuple[np.ndarray, np.ndarray], tokens: int) -> np.ndarray:
    """The position of each image's first token, from ``image_runs``: image tokens come in runs of whole images
    (``tokens`` each)."""
    return np.concatenate([np.arange(a, b, max(tokens, 1)) for a, b in zip(*runs)] + [np.zeros(0, np.int64)])


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


class BatchEngine:
    """``max_batch`` slots over one KV cache of ``cache_length`` positions per slot (or the longest that fits in
    ``memory_budget`` bytes). See the module doc for one step. ``background_compile``: a prefill whose shape is
    not compiled yet runs padded to a compiled one that covers it while its own compiles on another thread
    (``CompiledShapes``; ``compile_covers`` compiles the largest ahead), instead of every stream waiting."""

    def __init__(self, model: Gemma3, *, max_batch: int = 8, cache_length: int | None = 4096,
                 memory_budget: int | None = None, chunk_tokens: int = 512, prefill_rows: int = 4,
                 decode_steps: int = 32, step_tokens: int | None = None, feature_cache_bytes: int = 256 << 20,
                 max_queue: int | None = None, stream_s: float | None = None, compiler_options: dict | None = None,
                 background_compile: bool = False, record_calls: bool = False, verbose: bool = False):
        for name, v in (("max_batch", max_batch), ("chunk_tokens", chunk_tokens), ("prefill_rows", prefill_rows),
                        ("decode_steps", decode_steps),
                        ("step_tokens", chunk_tokens if step_tokens is None else step_tokens)):
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
        self.decode_steps = decode_steps
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1):
            raise ValueError(f"max_queue must be None or an int >= 1, got {max_queue!r}")
        self.max_queue = max_queue
        if stream_s is not None and (isinstance(stream_s, bool) or not isinstance(stream_s, (int, float))
                                     or not 0 < stream_s < float("inf")):
            raise ValueError(f"stream_s must be None or a positive number of seconds, got {stream_s!r}")
        self.stream_s = stream_s
        self._step_s: float | None = None  # seconds a decode step took lately (streaming: how many fit stream_s)
        self._last_ready: float | None = None  # when the last read call had finished
        self.step_tokens = min(chunk_tokens, 256 if step_tokens is None else step_tokens)
        self.platform = model.kernels.platform
        self.compiler_options = compiler_options
        self._text = StepWeights.of(model.text)
        self._embedding = model.text.embedding()
        self._vision = StepWeights.of(VisionStep(model.vision, model.projector)) if self.cfg.is_multimodal else None
        self._steps = SlotSteps(self.cfg, self.cfg.text.pad_token_id)
        self._compiled: dict = {}
        self._donate = self.platform != "cpu"
        self.cache = kvc.init_cache(self.cfg.text, max_batch, cache_length, self.dtype)
        self.state = SlotState.empty(max_batch)
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        self._cache_spec, self._state_spec = jax.tree.map(spec, self.cache), jax.tree.map(spec, self.state)
        self._feat_shape = (self.cfg.mm_tokens_per_image, self.cfg.text.hidden_size)  # one image's features
        self._image_tokens = self.cfg.mm_tokens_per_image if self.cfg.is_multimodal else 0  # prompt tokens an image
        # one image's zero features, made once: they pad a call's features (an eager jnp.zeros per call is an XLA
        # computation dispatched on the engine's thread, ~4 ms a call profiled on an H100's host)
        self._zero_feat = jnp.zeros(self._feat_shape, self.dtype) if self._image_tokens else None
        self._zero_pixels: dict[tuple, jax.Array] = {}  # (shape, dtype or "levels") -> a zero image, padding calls
        self._tables: dict[bytes, jax.Array] = {}  # levels' tables on the device, by their bytes
        self._flags: tuple[np.ndarray, jax.Array] | None = None  # the last decode call's flags, host and device
        # shapes compiled ahead from specs: on one device only (specs would need each array's mesh placement)
        self.shapes = CompiledShapes(background_compile and model.kernels.shards == 1)
        self.features = FeatureCache(feature_cache_bytes)
        self._queue: collections.deque[Stream] = collections.deque()
        self._slots: list[Stream | None] = [None] * max_batch
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()  # one step at a time: readers step the engine when no thread runs it
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self._cancelled: list[Stream] = []
        self._pending: _Call | None = None  # the last dispatched call, its tokens not yet read
        # each call's outputs start their copies to the host as soon as it is dispatched, not when read (after the
        # next call is dispatched), so a first token reaches the host sooner (False: a benchmark's baseline)
        self.early_reads = True
        self.counters = collections.Counter()
        self._window: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)  # (time, decode tokens)
        # each stream's gaps between deliveries of its tokens, as the engine makes them (a reader's chunk gaps, before
        # whatever its transport adds); counts per GAP_BOUNDS bucket, the last above them all
        self.delivery_gaps = [0] * (len(GAP_BOUNDS) + 1)
        self._gap_sum = 0.0
        # where the stepping thread's time goes (THREAD_STATES): with no work, waiting for a call's results (the
        # device busy), or everything else: scheduling, dispatching, handing tokens over, and waiting for the GIL
        self.thread_s = dict.fromkeys(THREAD_STATES, 0.0)
        # the CPU seconds its steps used: host seconds well above them went to waiting for the GIL or inside calls
        # that block (an executable's launches, a copy)
        self.thread_cpu_s = 0.0
        # with record_calls, one dict per dispatched call (kind, shape, host times): where a benchmark's time went
        self.calls: list[dict] | None = [] if record_calls else None
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
        """Queue a request; it is refused here (ValueError/TypeError) if it can never be served, and with
        ``QueueFull`` while ``max_queue`` requests wait."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes a Request, got {type(request).__name__}")
        self._refuse_if_closed()
        prompt = token_id_row(request.prompt, "prompt")
        if len(prompt) == 0:
            raise ValueError("empty prompt: a request needs at least one token")
        n = request.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {n!r}")
        if not isinstance(request.params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(request.params).__name__}")
        # kept as checked: a generator given would be spent, and an array compared elementwise, later
        stop_ids = check_stop_ids(request.stop_ids, self.cfg.text.vocab_size)
        if type(request.stop_ids) is not tuple or stop_ids != request.stop_ids:
            request = dataclasses.replace(request, stop_ids=stop_ids)
        if isinstance(request.seed, bool) or not isinstance(request.seed, int):
            raise TypeError(f"seed must be an int, got {request.seed!r}")
        if not 0 <= request.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63), got {request.seed}")
        kvc.check_fits(len(prompt), n, self.cache_length)
        # token range, image count; nothing goes to the device here (the images do when their request is admitted)
        ids, pixels, _ = check_inputs(self.cfg, prompt[None], request.pixel_values, to_device=False)
        image_mask = ids[0] == self.cfg.image_token_id
        starts, ends = image_runs(image_mask)
        runs = ends - starts
        if self._image_tokens and (runs % self._image_tokens).any():
            # a chunk ends at a run's end: an image split over two runs could straddle two chunks
            odd = int(runs[runs % self._image_tokens != 0][0])
            raise ValueError(f"image tokens (id {self.cfg.image_token_id}) must come in whole images of "
                             f"{self._image_tokens}: the prompt has a run of {odd}")
        with self._cond:
            self._check_queue()  # before the images are hashed for a request that would be refused
        if pixels is not request.pixel_values:
            request = dataclasses.replace(request, pixel_values=pixels)
        stream = Stream(self, -1, request, image_mask, (starts, ends))
        with self._cond:
            self._refuse_if_closed()
            self._check_queue()
            stream.id = next(self._ids)
            self._queue.append(stream)
            self.counters["submitted"] += 1
            self._cond.notify_all()
        return stream

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise EngineClosed("the engine is closed: it serves no more requests")

    def _check_queue(self) -> None:
        if self.max_queue is not None and len(self._queue) >= self.max_queue:
            self.counters["refused"] += 1
            raise QueueFull(f"{len(self._queue)} requests are already waiting for a slot (max_queue)")

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
        stream._feats, stream._images = [], []
        stream._notify()
        if stream._slot is not None:
            self._slots[stream._slot] = None
            stream._slot = None
        self.counters[reason] += 1

    # ---- compiled steps ------------------------------------------------------------------------
    def compiled_steps(self) -> list[tuple[str, jax.stages.Compiled]]:
        """(name, compiled call) of every shape compiled so far (for profiling: ``as_text()`` is its HLO)."""
        return [(key[1][0], c) for key, c in list(self._compiled.items())]  # the compile thread may add one

    def _compile(self, name: str, fn, args, static, donate=()):
        # the embedding and mixed calls are prefill steps for XLA's options (cuBLAS for their GEMMs)
        kind = "prefill" if name in ("embed", "mixed") else name
        compiled, new = compiled_step(self._compiled, kind, lambda: fn,
                                      (name, static), args, platform=self.platform,
                                      compiler_options=self.compiler_options,
                                      donate=donate if self._donate else ())
        if new:
            with self._cond:
                self.counters[f"compiles_{name}"] += 1
                if threading.current_thread().name.startswith(COMPILE_THREAD):  # the others stalled a step
                    self.counters[f"background_compiles_{name}"] += 1
        return compiled

    def _encode(self, images: list[np.ndarray | PixelLevels], host_ms: dict | None = None) -> list[jax.Array]:
        """Features [T, D] of each image, in one vision call padded to a power of two of images. Each image goes to
        the device as it is (float32 pixels, or uint8 levels with their table, looked up there) and they are stacked
        there, and each image's features come out as an array of its own: a host-side stack copied ~10 MB an image
        on this thread, and slicing the features was an XLA call each."""
        vw = self._vision
        n = len(images)
        t0 = time.perf_counter()
        if len({isinstance(im, PixelLevels) for im in images}) > 1:  # levels beside float pixels: one kind a call
            images = [im.to_float() if isinstance(im, PixelLevels) else im for im in images]
        first = images[0]
        key = (first.shape, "levels" if isinstance(first, PixelLevels) else first.dtype)
        if key not in self._zero_pixels:  # padding images, made once (what they give is never read)
            zero = (PixelLevels(np.zeros(first.shape, np.uint8), np.zeros_like(first.table))
                    if isinstance(first, PixelLevels) else np.zeros(first.shape, first.dtype))
            self._zero_pixels[key] = jax.device_put(zero)
        if isinstance(first, PixelLevels):  # only the levels go over: a table is sent once (a transfer each costs)
            tables = [self._device_table(im.table) for im in images]
            pixels = [PixelLevels(lv, tb) for lv, tb in zip(jax.device_put([im.levels for im in images]), tables)]
        else:
            pixels = jax.device_put(images)  # returns while the copies run
        pixels += [self._zero_pixels[key]] * (_pow2(n) - n)

        def vision(rest, groups, *pixels):
            step = vw.merge(rest, groups)
            feats = step.projector(step.vision(jnp.stack([as_pixels(p) for p in pixels])))
            return tuple(feats[i] for i in range(len(pixels)))

        args = (vw.rest, vw.groups, *pixels)
        t1 = time.perf_counter()
        compiled = self._compile("vision", vision, args, None)
        t2 = time.perf_counter()
        feats = list(compiled(*args)[:n])
        if host_ms is not None:  # where the host's time before the vision tower runs goes (benchmarks.batching)
            host_ms.update(copy=(t1 - t0) * 1e3, lookup=(t2 - t1) * 1e3, vision=(time.perf_counter() - t2) * 1e3)
        return feats

    def _device_table(self, table: np.ndarray) -> jax.Array:
        """A levels' table on the device, by content (a server's requests share their processor's one)."""
        key = np.ascontiguousarray(table, np.float32).tobytes()
        if key not in self._tables:
            if len(self._tables) >= 16:  # callers with tables of their own: keep a few
                self._tables.clear()
            self._tables[key] = jax.device_put(np.asarray(table, np.float32))
        return self._tables[key]

    def _chunk_bucket(self, n: int, budget: int) -> int:
        """A prefill call's padded length for a longest chunk of ``n`` tokens under ``budget``, from a few lengths
        so each shape compiles once: beside decoding slots a quarter or all of ``step_tokens``; otherwise every
        sixteenth of ``chunk_tokens`` up to a quarter (a lone short prompt's first token waits on this call), half
        and all of it; multiples of 32. An image longer than the budget gets a power of two."""
        up = lambda v: -(-max(v, 1) // 32) * 32
        if budget == self.step_tokens and budget != self.chunk_tokens:
            buckets = sorted({up(budget // 4), up(budget)})
        else:
            small = up(budget // 16)
            buckets = sorted({*range(small, up(budget // 4) + 1, small), up(budget // 2), up(budget)})
        return next((b for b in buckets if n <= b), _pow2(n))

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, dispatch one call, read the previous call's tokens; returns whether there was any work."""
        with self._step_lock:
            return not self._closed and self._step()

    def _step(self) -> bool:
        began, waited, cpu = time.perf_counter(), self.thread_s["waiting"], time.thread_time()
        prefilling, decoding, queued = self._schedule()
        t0 = time.perf_counter()
        encodes = self.features.encodes
        encode_ms: dict = {}
        unkeyed = self._encode_admitted([s for s in prefilling if s._prefilled == 0 and s._image_keys and not s._feats],
                                        encode_ms)
        encoded = time.perf_counter()
        call = None
        if prefilling:
            call = self._prefill(prefilling, decoding)
        elif decoding and not self._pending_ends(decoding):
            call = self._decode(decoding, until_free=queued)
        if call is not None and self.early_reads:
            call.start_reads()
        for pending, feats, fp in unkeyed:  # the new images' keys were hashed while the call was dispatched
            self.features.put(pending.result(), feats, fp)
        if call is not None and self.calls is not None:
            call.record = dict(kind=call.kind, shape=call.shape, decoding=len(call.decoding),
                               prompt_tokens=call.prompt_tokens,
                               images=self.features.encodes - encodes, start=t0,
                               dispatch_ms=(time.perf_counter() - t0) * 1e3,
                               host_ms=dict(call.host_ms, encode=(encoded - t0) * 1e3,
                                            **{f"encode_{k}": v for k, v in encode_ms.items()}))
            self.calls.append(call.record)
        pending, self._pending = self._pending, call
        if pending is not None:
            self._deliver(pending)
        self.thread_s["host"] += time.perf_counter() - began - (self.thread_s["waiting"] - waited)
        self.thread_cpu_s += time.thread_time() - cpu
        return call is not None or pending is not None

    def _schedule(self) -> tuple[list[Stream], list[Stream], bool]:
        """Drop cancelled streams, admit queued ones into free slots; (prefilling, decoding, anything queued)."""
        with self._cond:
            for stream in self._cancelled:
                if not stream.done:
                    if stream._slot is not None:
                        self.state = self.state._replace(active=self.state.active.at[stream._slot].set(False))
                    self._finish(stream, "cancelled")
            if self._cancelled:
                self._cancelled.clear()
                self._cond.notify_all()  # readers of a cancelled stream wait for its end
            for slot in range(self.max_batch):
                if not self._queue:
                    break
                if self._slots[slot] is None:
                    stream = self._queue.popleft()
                    stream._slot = slot
                    self._slots[slot] = stream
            held = [s for s in self._slots if s is not None]
            prefilling = [s for s in held if s._prefilled < len(s.request.prompt)]
            decoding = [s for s in held if s._prefilled == len(s.request.prompt)]
            return prefilling, decoding, bool(self._queue)

    def _encode_admitted(self, streams: list[Stream], host_ms: dict | None = None
                         ) -> list[tuple[PendingKey, jax.Array, bytes]]:
        """The images of newly admitted requests: from the feature cache, the rest encoded together in one call.
        An image whose fingerprint the cache does not know (nor an earlier image of this call) is new for certain;
        the others wait for their keys. Returns (key, features, fingerprint) of each image encoded, for the caller
        to cache once it has dispatched its call (the key may still be hashing)."""
        fc = self.features
        todo: list[tuple[PendingKey, bytes, np.ndarray]] = []  # images to encode: key, fingerprint, pixels
        new_prints: dict[bytes, list[int]] = {}  # fingerprint -> their indexes in todo
        refs: list[list[int | jax.Array]] = []  # per stream, each image's index in todo or its cached features
        def encode(pending: PendingKey, fp: bytes, image: np.ndarray) -> int:
            new_prints.setdefault(fp, []).append(len(todo))
            todo.append((pending, fp, image))
            return len(todo) - 1

        for s in streams:
            out: list[int | jax.Array] = []
            for fp, pending, image in zip(s._image_prints, s._image_keys, s._images):
                if not fc.may_hold(fp) and fp not in new_prints:
                    out.append(encode(pending, fp, image))
                    continue
                key = pending.result()
                feats = fc.get(key)
                if feats is None:
                    same = [j for j in new_prints.get(fp, []) if todo[j][0].result() == key]
                    out.append(same[0] if same else encode(pending, fp, image))
                else:
                    out.append(feats)
            refs.append(out)
        encoded = self._encode([image for _, _, image in todo], host_ms) if todo else []
        for s, out in zip(streams, refs):
            s._feats = [encoded[r] if isinstance(r, int) else r for r in out]
        return [(pending, feats, fp) for (pending, fp, _), feats in zip(todo, encoded)]

    def _rows(self, prefilling: list[Stream], budget: int) -> list[tuple[Stream, int, int]]:
        """The prompts' next chunks in one call: up to ``prefill_rows`` rows and ``budget`` tokens, and no more
        padded tokens (rows x bucket) than the budget's own bucket or the first row's."""
        rows: list[tuple[Stream, int, int]] = []
        full = budget
        cap = self._chunk_bucket(budget, full)
        for s in prefilling:
            if len(rows) == self.prefill_rows or budget <= 0:
                break
            start = s._prefilled
            end = kvc.chunk_end(s._image_mask, start, budget)
            longest = max([end - start] + [e - st for _, st, e in rows])
            if rows and (end - start > budget or _pow2(len(rows) + 1) * self._chunk_bucket(longest, full) > cap):
                continue  # in a later call
            rows.append((s, start, end))
            cap = max(cap, self._chunk_bucket(end - start, full))
            budget -= end - start
        return rows

    def _prefill(self, prefilling: list[Stream], decoding: list[Stream]) -> _Call:
        """Dispatch the next chunks, with a decode step of every slot (``SlotSteps.mixed``) when any decodes."""
        t0 = time.perf_counter()
        budget = self.step_tokens if decoding else self.chunk_tokens
        rows = self._rows(prefilling, budget)
        streams = [s for s, _, _ in rows] + decoding
        greedy_only = all(s.request.params.greedy for s in streams)
        kind = "mixed" if decoding else "prefill"
        feats = []
        for s, st, e in rows:
            feats += s._feats[np.searchsorted(s._image_starts, st): np.searchsorted(s._image_starts, e)]
        nf = _pow2(len(feats)) if feats else 0
        b, t = min(_pow2(len(rows)), self.max_batch), self._chunk_bucket(max(e - st for _, st, e in rows), budget)
        # every chunk starts its prompt: a call of its own shapes that skips the empty context (``prefill_chunk``);
        # with background compiles, a compiled general shape serves until one that covers this is compiled (with
        # none either, this one is compiled now)
        fresh = kind == "prefill" and all(st == 0 for _, st, _ in rows)
        if (fresh and self.shapes.background and not self.shapes.covered((kind, greedy_only, True), (b, t))
                and self.shapes.covered((kind, greedy_only, False), (b, t))):
            self.shapes.later((kind, greedy_only, True), (b, t),
                              lambda b=b, t=t, nf=nf: self._compile_call(kind, greedy_only, b, t, nf, True, spec=True))
            fresh = False
        b, t = self.shapes.pick((kind, greedy_only, fresh), (b, t),  # the lambdas compile the shape asked for
                                lambda b=b, t=t, nf=nf: self._compile_call(kind, greedy_only, b, t, nf, fresh,
                                                                           spec=True))
        ids = np.full((b, t), self.cfg.text.pad_token_id, np.int32)
        seg = np.full((b, t), -1, np.int32)
        slot = np.full((b,), self.max_batch, np.int32)
        start, length = np.zeros((b,), np.int32), np.zeros((b,), np.int32)
        last, max_new = np.zeros((b,), bool), np.ones((b,), np.int32)
        stops = np.full((b, MAX_STOP_IDS), -1, np.int32)
        temp, top_k, top_p = np.zeros((b,), np.float32), np.zeros((b,), np.int32), np.ones((b,), np.float32)
        seeds = np.zeros((b,), np.uint32)
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
            seeds[r] = seed32(req.seed)
        # device_put copies the host array as it is; jnp.asarray dispatches an XLA conversion (~0.5 ms of host time)
        packed = jax.device_put(pack_rows(ids, seg, slot=slot, start=start, length=length, last=last,
                                          max_new=max_new, seed=seeds, stops=stops, temperature=temp, top_k=top_k,
                                          top_p=top_p))
        (nf,) = self.shapes.pick(("embed", b, t), (nf,),
                                 lambda b=b, t=t, nf=nf: self._compile_embed(b, t, nf, spec=True))
        feat_arg = None
        t1 = time.perf_counter()
        if nf:  # padded with zero features, which no image token reads; stacked in the call, not by an XLA call here
            feat_arg = tuple(feats + [self._zero_feat] * (nf - len(feats)))
        t2 = time.perf_counter()
        embeddings = self._compile_embed(b, t, nf, args=(self._embedding, packed, feat_arg))(
            self._embedding, packed, feat_arg)
        t3 = time.perf_counter()
        args = (self._text.flat, self.cache, self.state, embeddings, packed)
        fn = self._compile_call(kind, greedy_only, b, t, nf, fresh, args=args)
        if decoding:
            self.cache, self.state, tokens, produced, first = fn(*args)  # [S] each: shaped on the host when read
        else:
            self.cache, self.state, first = fn(*args)
            tokens = produced = None
        t4 = time.perf_counter()
        with self._cond:
            for s, st, e in rows:
                s._prefilled = e
                if e == len(s.request.prompt):
                    s._feats = []
                self.counters["prefill_tokens"] += e - st
            self.counters["mixed_calls" if decoding else "prefill_calls"] += 1
        return _Call([(s, s._slot) for s in decoding], tokens, produced, kind, (b, t),
                     [(s, bool(f)) for (s, _, _), f in zip(rows, last)], first, sum(e - st for _, st, e in rows),
                     host_ms=dict(pack=(t1 - t0) * 1e3, feats=(t2 - t1) * 1e3, embed=(t3 - t2) * 1e3,
                                  call=(t4 - t3) * 1e3))

    def _compile_embed(self, b: int, t: int, nf: int, args=None, spec: bool = False):
        """The embed call for ``b`` rows of ``t`` tokens with ``nf`` image features (0: none); ``spec``: from
        shapes alone (a compile ahead of its first call)."""
        if spec:
            feat = (jax.ShapeDtypeStruct(self._feat_shape, self.dtype),) * nf if nf else None
            args = (self._embedding, jax.ShapeDtypeStruct((b, packed_width(t)), jnp.int32), feat)
        steps = self._steps

        def embed(embedding, packed, feats):  # feats: a tuple of one array an image, or None
            return steps.embed(embedding, packed, None if feats is None else jnp.stack(feats))

        fn = self._compile("embed", embed, args, None)
        self.shapes.mark(("embed", b, t), (nf,))
        return fn

    def _compile_call(self, kind: str, greedy_only: bool, b: int, t: int, nf: int, fresh: bool = False, args=None,
                      spec: bool = False):
        """The prefill or mixed call for ``b`` rows of ``t`` tokens (``fresh``: a prefill whose chunks all start
        their prompts); ``spec``: from shapes alone, with its embed calls for ``nf`` features and for the most that
        fit (so a call padded to this shape has an embed too)."""
        steps, tw = self._steps, self._text
        if spec:
            tokens = self._image_tokens
            for n in {nf, _pow2(t // tokens + b)} if tokens else {nf}:
                self._compile_embed(b, t, n, spec=True)
            hidden = jax.ShapeDtypeStruct((b, t, self.cfg.text.hidden_size), self.dtype)
            args = (tw.flat, self._cache_spec, self._state_spec, hidden,
                    jax.ShapeDtypeStruct((b, packed_width(t)), jnp.int32))
        extra = dict(fresh=True) if fresh else {}

        def call(weights, cache, state, embeddings, packed):
            _, chunk, row = unpack_rows(packed)
            step = steps.mixed if kind == "mixed" else steps.prefill
            return step(tw.merge_flat(weights), cache, state, embeddings, chunk, row, greedy_only, **extra)

        fn = self._compile(kind, call, args, (greedy_only, fresh), donate=(1, 2))
        self.shapes.mark((kind, greedy_only, fresh), (b, t))
        return fn

    def compile_chunk(self, kind: str, greedy_only: bool, tokens: int, rows: int = 1) -> None:
        """Compile, without running it, the ``prefill`` or ``mixed`` call (a chunk beside decoding slots) that
        ``rows`` text chunks of ``tokens`` tokens, each a whole prompt, run as."""
        budget = self.step_tokens if kind == "mixed" else self.chunk_tokens
        # a short prompt's one chunk starts it: prefill calls of such chunks run the fresh variant
        self._compile_call(kind, greedy_only, min(_pow2(rows), self.max_batch), self._chunk_bucket(tokens, budget), 0,
                           kind == "prefill", spec=True)

    def compile_covers(self, greedy_only: bool) -> None:
        """Compile, without running them, the largest prefill and mixed shapes a chunk takes, and one row of a
        chunk that an image's end stretched past the budget: with background compiles, every later call then has
        a compiled shape to run at while its own compiles."""
        b = min(_pow2(self.prefill_rows), self.max_batch)
        tokens = self._image_tokens
        for kind, budget in (("prefill", self.chunk_tokens), ("mixed", self.step_tokens)):
            t = self._chunk_bucket(budget, budget)
            over = self._chunk_bucket(budget + tokens - 1, budget)  # a chunk ends at its last image's end, alone
            for rows, length in [(b, t)] + ([(1, over)] if over > t else []):
                self._compile_call(kind, greedy_only, rows, length, 0, spec=True)

    def _decode(self, decoding: list[Stream], until_free: bool) -> _Call:
        steps, tw, n = self._steps, self._text, self.decode_steps
        greedy_only = all(s.request.params.greedy for s in decoding)

        def decode(weights, cache, state, flags):
            return steps.decode(tw.merge_flat(weights), cache, state, flags, n, greedy_only)

        # dispatched before the previous call is read: a slot that call freed stops the run at once when requests
        # queue (until_free), so the next step admits one; otherwise the GPU goes on without waiting for the host
        t0 = time.perf_counter()
        flags = np.zeros((2 + self.max_batch,), np.int32)
        flags[0], flags[1] = until_free, self._decode_limit()
        flags[[2 + s._slot for s in decoding]] = 1
        if self._flags is None or not np.array_equal(self._flags[0], flags):
            # the same flags as the last decode call keep their device array: no copy, and an input at the same
            # address leaves the call's CUDA graph as it was recorded
            self._flags = (flags, jax.device_put(flags))
        args = (tw.flat, self.cache, self.state, self._flags[1])
        fn = self._compile("decode", decode, args, greedy_only, donate=(1, 2))
        # the device may start as soon as the call is entered, and JAX may return only after enqueueing every
        # kernel: after an idle engine (no earlier call still running) the step-time estimate (stream_s) counts
        # from here, so it does not run short
        dispatched = time.perf_counter()
        self.cache, self.state, tokens, produced = fn(*args)
        called = time.perf_counter()
        with self._cond:
            self.counters["decode_calls"] += 1
        return _Call([(s, s._slot) for s in decoding], tokens, produced, dispatched=dispatched, steps=int(flags[1]),
                     host_ms=dict(flags=(dispatched - t0) * 1e3, call=(called - dispatched) * 1e3))

    def _pending_ends(self, decoding: list[Stream]) -> bool:
        """Whether the call not yet read is expected to bring every decoding stream to its token limit: a decode
        call dispatched now would run no step, yet hold the GPU from a request arriving then. A wrong guess (a stop
        id, or a call stopped early for a queued request) costs one step's overlap: the stream still decodes after
        this step reads the pending call."""
        call = self._pending
        if call is None:
            return False
        expected = {id(s): 1 for s, last in call.rows if last}
        for s, _ in call.decoding:
            expected[id(s)] = expected.get(id(s), 0) + call.steps
        return all(len(s.tokens) + expected.get(id(s), 0) >= s.request.max_new_tokens for s in decoding)

    def _decode_limit(self) -> int:
        """Steps of the next decode call: ``decode_steps``, or with ``stream_s`` as many as take about that long at
        the latest step time (a stream's tokens come a call at a time: this bounds the gaps a reader sees)."""
        if self.stream_s is None or self._step_s is None:
            return self.decode_steps
        return max(1, int(min(self.stream_s / max(self._step_s, 1e-9), self.decode_steps)))

    def _deliver(self, call: _Call) -> None:
        """Read a dispatched call's tokens (waiting for it) and hand them to their streams."""
        t0 = time.perf_counter()
        first = None if call.first is None else np.asarray(call.first)
        tokens = None if call.tokens is None else np.asarray(call.tokens)
        if tokens is not None and tokens.ndim == 1:  # a mixed call's one step: [S] -> [S, 1]
            tokens = tokens[:, None]
        produced = None if call.produced is None else np.asarray(call.produced).astype(np.int32)
        now = time.perf_counter()
        self.thread_s["waiting"] += now - t0
        if call.kind == "decode" and produced is not None and produced.max(initial=0) > 0:
            # the device ran this call from when it was queued or the previous call ended, whichever was later
            began = call.dispatched if self._last_ready is None else max(call.dispatched, self._last_ready)
            step_s = (now - began) / int(produced.max())
            self._step_s = step_s if self._step_s is None else 0.5 * (self._step_s + step_s)
        self._last_ready = now
        if call.record is not None:  # the host waited wait_ms for the device to finish this call, until ready
            call.record.update(wait_ms=(now - t0) * 1e3, ready=now,
                               steps=0 if produced is None else int(produced.max(initial=0)))
        with self._cond:
            for r, (s, last) in enumerate(call.rows):
                if last and not s.done:
                    s.first_token_at = now
                    self._push(s, [int(first[r])])
            if tokens is not None:
                total = 0
                for s, slot in call.decoding:
                    k = int(produced[slot])
                    total += k
                    self._push(s, tokens[slot, :k].tolist())
                self.counters["decode_tokens"] += total
                self.counters["decode_steps"] += int(produced.max(initial=0))
                self._window.append((time.perf_counter(), total))
            self._cond.notify_all()

    def _push(self, stream: Stream, tokens: list[int]) -> None:
        """New tokens of a stream; finishes it on a stop id or its token limit (as the device did)."""
        if stream.done:
            return
        stream.tokens.extend(tokens)
        if tokens:
            now = time.perf_counter()
            if stream.arrivals:  # the gap this stream waited since its last tokens (a reader's chunk gap)
                gap = now - stream.arrivals[-1][0]
                self.delivery_gaps[bisect.bisect_left(GAP_BOUNDS, gap)] += 1
                self._gap_sum += gap
            stream.arrivals.append((now, len(tokens)))
            stream._notify()
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
        self._refuse_if_closed()
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="gemma3-batching", daemon=True)
        self._thread.start()
        # a program that ends without close(): the thread must not be inside a device call while the interpreter
        # goes down (that aborted the process)
        atexit.register(self.close)

    def stop(self) -> None:
        """Stop the background thread after its current step; readers then step the engine themselves."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        thread.join()
        with self._cond:
            self._thread = None
            self._cond.notify_all()  # readers waiting for the thread step the engine now
        atexit.unregister(self.close)

    def close(self) -> None:
        """Stop for good: the thread stops, requests still queued or running end as ``cancelled``, later ones are
        refused (``EngineClosed``), and the image-hashing and compiling threads end."""
        with self._cond:
            if self._closed:
                return
        self.stop()
        with self._step_lock:  # a reader's step finishes first
            with self._cond:
                self._closed = True
                for stream in [*self._queue, *(s for s in self._slots if s is not None)]:
                    self._finish(stream, "cancelled")
                self._queue.clear()
                self._cond.notify_all()
        self.features.close()
        self.shapes.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                t0 = time.perf_counter()
                while not self._stop and not self._queue and not self._cancelled and \
                        all(s is None for s in self._slots):
                    self._cond.wait()
                self.thread_s["idle"] += time.perf_counter() - t0
                if self._stop:
                    return
            self.step()

    def stats(self) -> dict:
        with self._cond:
            active = [s for s in self._slots if s is not None]
            held = sum(s._prefilled + max(len(s.tokens) - 1, 0) for s in active)
            window = list(self._window)
            gaps = dict(bounds=GAP_BOUNDS, counts=list(self.delivery_gaps), sum=self._gap_sum)
            counters = dict(self.counters)
            thread_s, thread_cpu_s = dict(self.thread_s), self.thread_cpu_s
        rate = 0.0
        if len(window) >= 2 and window[-1][0] > window[0][0]:
            rate = sum(n for _, n in window[1:]) / (window[-1][0] - window[0][0])
        return dict(queued=len(self._queue), active_slots=len(active), max_batch=self.max_batch,
                    cache_positions_held=held, cache_positions=self.max_batch * self.cache_length,
                    cache_bytes=self.cache_bytes, decode_tok_per_s=rate,
                    delivery_gaps=gaps, thread_s=thread_s, thread_cpu_s=thread_cpu_s,
                    padded_calls=self.shapes.padded_calls,
                    background_compile_errors=len(self.shapes.errors),
                    feature_cache=dict(bytes=self.features.nbytes, hits=self.features.hits,
                                       encodes=self.features.encodes),
                    **counters)
