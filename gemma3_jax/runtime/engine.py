"""Jit-compiled prefill and decode over a KV cache, on token ids.

- ``prefill``: a batch of prompts right-padded to a bucket length (a small fixed set, so compiles are
  reused), images through the vision tower (a call of its own, queued before the text decoder's), attention
  with the image-span mask; fills the caches and returns only the last-token logits and a first sampled token.
- ``decode``: up to ``chunk`` steps per host call in a ``lax.while_loop`` with on-device sampling and stop
  detection; the cache is donated into the step (no copy per step). Streaming hands back chunk by chunk, and
  the next chunk is queued before the last one's tokens are read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.gemma3 import NUMERICS_OPTIONS, Gemma3, check_inputs, decoder_forward, token_id_row
from gemma3_jax.runtime.sampling import MAX_STOP_IDS, SamplingParams, check_stop_ids, sample, seed32

# Prompt lengths are padded up to one of these (each is compiled once). Up to 256 tokens a prefill's GEMMs read
# their weights in the same time however many rows they have (they are memory bound there), so coarse
# steps cost nothing there: 32, 48, 64, 96, 128, 192, 256. Above, padded rows are computed, so buckets step by an
# eighth of a power of two: at most 12.5% waste (323 tokens -> 352, 2353 -> 2560), at the price of up to eight
# compiles per doubling of the prompt length instead of two.
BUCKETS = tuple(sorted({32, 48, 64, 96, 128, 192} | {2**i * k // 8 for i in range(8, 17) for k in range(8, 16)}
                       | {2**17}))  # ... 131072
STREAM_CHUNK_S = 0.1  # a streamed chunk grows while it takes less than this: text flows instead of bursting
# The decode chunk's while loop (condition included) as a CUDA graph; Pallas kernels are custom calls.
DECODE_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
                          "xla_gpu_graph_min_graph_size": 1}


def default_compiler_options(step: str, platform: str, quantized: bool = False) -> dict[str, bool | str | int]:
    """XLA options for the compiled ``step`` ("vision", "prefill" or "decode") on ``platform`` (``Kernels.platform``).

    On a GPU, vision and prefill run their GEMMs in cuBLAS (``xla_gpu_enable_triton_gemm=false``), which is at
    least as fast as XLA's Triton GEMM fusions for these large products; decode keeps XLA's Triton GEMMs, whose
    matrix-vector products stream the weights faster than cuBLAS's. Decode also runs its while loop as one CUDA
    graph with conditional nodes (``DECODE_COMMAND_BUFFERS``), because XLA otherwise copies the loop condition to
    the host every step and the GPU waits for the next launch. Every step rounds each low-precision op as
    transformers does (NUMERICS_OPTIONS). ``quantized``: the step's weights are 8- or 4-bit, and its GEMMs stay
    XLA's Triton fusions, which convert the weights as they load them (cuBLAS would take a converted copy)."""
    opts = dict(NUMERICS_OPTIONS)
    if platform == "gpu" and (step == "vision" or (step == "prefill" and not quantized)):
        opts["xla_gpu_enable_triton_gemm"] = False
    if platform == "gpu" and step == "decode":
        opts.update(DECODE_COMMAND_BUFFERS)
    return opts


def compiled_step(cache: dict, name: str, make, static_key, args, *, platform: str,
                  compiler_options: dict | None, donate=()) -> tuple[jax.stages.Compiled, bool]:
    """``make()`` jit-compiled for ``args`` (the step's options: ``default_compiler_options(name)`` unless
    ``compiler_options``), kept in ``cache`` by name, static settings and argument shapes; (compiled, whether it
    was compiled now). args[0] is the model's weights, fixed for a cache, so its shapes are not part of the key."""
    shapes = tuple((x.shape, x.dtype) if hasattr(x, "shape") else x for x in jax.tree.leaves(args[1:]))
    key = (name, static_key, shapes)
    if key in cache:
        return cache[key], False
    quantized = any(jnp.dtype(x.dtype) in _NARROW for x in jax.tree.leaves(args[0]) if hasattr(x, "dtype"))
    opts = default_compiler_options(name, platform, quantized) if compiler_options is None else compiler_options
    fn = jax.jit(make(), donate_argnums=donate, compiler_options=opts or None)
    compiled = fn.lower(*args).compile()
    cache[key] = _ThroughJit(fn, compiled) if any(map(_split_sub_byte, jax.tree.leaves(args))) else compiled
    return cache[key], True


_NARROW = tuple(jnp.dtype(t) for t in (jnp.int8, jnp.float8_e4m3fn, jnp.int4))  # quantized weights' storage


def _split_sub_byte(x) -> bool:
    """An array of 4-bit values over several devices: JAX reports it in a layout of one value a byte, which a
    compiled executable's call refuses (it was compiled for packed values), while a jit call of the same step
    takes it."""
    return isinstance(x, jax.Array) and x.dtype.itemsize == 1 and x.dtype.name in ("int4", "uint4") \
        and len(x.sharding.device_set) > 1


@dataclasses.dataclass(frozen=True)
class _ThroughJit:
    """A compiled step called through its jit function (``_split_sub_byte``), the compiled object kept for its HLO."""

    fn: Callable
    compiled: jax.stages.Compiled

    def __call__(self, *args):
        return self.fn(*args)

    def as_text(self) -> str:
        return self.compiled.as_text()


def _key(k):
    """The name or index a pytree path entry stands for (DictKey.key, SequenceKey.idx, GetAttrKey.name)."""
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


def _is_norm_weight(path, leaf) -> bool:
    """A 1-D leaf of a norm (RMSNorm weight, LayerNorm scale/bias): consumed only by XLA fusions in prefill."""
    return getattr(leaf, "ndim", 0) == 1 and any("norm" in str(_key(k)) for k in path)


@dataclasses.dataclass(frozen=True)
class PackedWeights:
    """The model's many small norm vectors packed into one array per layer (and dtype), and how to unpack them.

    Every array argument of a compiled call costs host time before the GPU starts, so fewer arguments start the
    prefill sooner. Prefill's norms are consumed by XLA fusions, which read their
    slice of the packed array in place; decode keeps the plain list (its norms go into Pallas kernels, for which
    XLA would copy each slice out)."""

    rest: tuple[int, ...]  # indices (in the flat weight list) passed as they are
    small: tuple[tuple[int, int, int, tuple[int, ...]], ...]  # (index, group, offset, shape) per packed leaf

    @classmethod
    def plan(cls, state) -> tuple[PackedWeights, list, list]:
        """One group per layer (and dtype): one array for every norm of the model would save no more time and
        makes XLA's compile much slower."""
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        group_of: dict = {}  # (path up to the layer index, dtype) -> group number
        offsets: list[int] = []
        rest, small = [], []
        for i, (path, x) in enumerate(leaves):
            if not _is_norm_weight(path, x):
                rest.append(i)
                continue
            # the group: the path up to the layer index (e.g. text/layers/3), or the top-level module
            layer = next((j for j, k in enumerate(path) if isinstance(_key(k), int)), 0)
            g = group_of.setdefault((tuple(str(k) for k in path[: layer + 1]), jnp.dtype(x.dtype)), len(group_of))
            if g == len(offsets):
                offsets.append(0)
            small.append((i, g, offsets[g], tuple(x.shape)))
            offsets[g] += x.size
        flat = [x for _, x in leaves]
        groups = [jnp.concatenate([flat[i].reshape(-1) for i, gg, _, _ in small if gg == g]) for g in range(len(offsets))]
        return cls(tuple(rest), tuple(small)), [flat[i] for i in rest], groups

    def unpack(self, rest: Sequence, groups: Sequence) -> list:
        """The flat weight list again (inside a trace: the packed leaves become slices of their group)."""
        out: list = [None] * (len(self.rest) + len(self.small))
        for i, x in zip(self.rest, rest):
            out[i] = x
        for i, g, off, shape in self.small:
            n = int(np.prod(shape))
            out[i] = jax.lax.slice(groups[g], (off,), (off + n,)).reshape(shape)
        return out


class VisionStep(nnx.Module):
    """The vision tower and projector as one module: the weights of the Engine's vision call."""

    def __init__(self, vision, projector):
        self.vision, self.projector = vision, projector


@dataclasses.dataclass(frozen=True)
class StepWeights:
    """One compiled step's share of the model: a sub-module's weights as the step's arguments, as they are
    (``flat``, for decode) or with the norms packed (``rest`` + ``groups``, for prefill).

    Prefill runs as two calls, the vision tower (with the projector) and the text decoder, each taking only its
    own weights, so the GPU starts after the smaller vision call's host work and the text call's host work is
    done while the GPU runs the vision tower."""

    graphdef: nnx.GraphDef
    treedef: jax.tree_util.PyTreeDef
    flat: list
    packing: PackedWeights
    rest: list
    groups: list

    @classmethod
    def of(cls, module: nnx.Module) -> StepWeights:
        graphdef, state = nnx.split(module)
        flat, treedef = jax.tree.flatten(state)
        packing, rest, groups = PackedWeights.plan(state)
        return cls(graphdef, treedef, flat, packing, rest, groups)

    @property
    def num_arrays(self) -> int:
        return len(self.rest) + len(self.groups)

    def merge(self, rest, groups):
        """The module again from the packed weights, inside the step's trace."""
        return self.merge_flat(self.packing.unpack(rest, groups))

    def merge_flat(self, flat):
        """The module again from the weights as they are (``flat``), inside the step's trace."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, flat))


def bucket_length(n: int, cache_length: int) -> int:
    for b in BUCKETS:
        if b >= n:
            return min(b, cache_length)
    return cache_length


@dataclasses.dataclass
class Timings:
    compile_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def decode_tok_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


@dataclasses.dataclass(frozen=True)
class CompiledCall:
    """One compiled call of a step with its arguments (``Engine.prefill_calls``), to time or trace it alone."""

    name: str
    fn: jax.stages.Compiled
    args: tuple
    weight_arrays: int  # how many of the arguments' arrays are weights

    def __call__(self):
        return self.fn(*self.args)


class Engine:
    """Holds the model's state and its compiled steps (keyed by shapes and static settings).

    ``compiler_options``: XLA options for every compiled step instead of ``default_compiler_options(step)`` (an
    empty dict: XLA's own defaults)."""

    def __init__(
        self, model: Gemma3, cache_length: int = 4096, chunk: int = 32, compiler_options: dict | None = None
    ):
        # The weights travel as flat lists, because flattening an nnx.State on every call costs far more host time
        # than passing a list. The compiled steps rebuild the modules inside the trace. Decode needs
        # only the text decoder's weights (``self.weights``), prefill's vision call only the vision tower's.
        self._text_weights = StepWeights.of(model.text)
        self.weights = self._text_weights.flat
        self._vision_weights = StepWeights.of(VisionStep(model.vision, model.projector)) if model.cfg.is_multimodal \
            else None
        self.platform = model.kernels.platform
        self.compiler_options = compiler_options  # None: default_compiler_options(step) per step
        self.cfg = model.cfg
        self.dtype = model.dtype
        self.cache_length = int(cache_length)
        self.chunk = int(chunk)
        self._compiled: dict = {}
        self._limits: dict[int, jax.Array] = {}
        self._donate = self.platform != "cpu"  # a CPU does not donate buffers (XLA warns, then copies)

    # ---- compiled functions -------------------------------------------------------------------
    def _vision_fn(self):
        weights = self._vision_weights

        def vision(rest, groups, pixel_values):
            step = weights.merge(rest, groups)
            return step.projector(step.vision(pixel_values))  # [I, T, D]

        return vision

    def _prefill_fn(self, params: SamplingParams):
        weights, cfg, cache_length, dtype = self._text_weights, self.cfg, self.cache_length, self.dtype

        def prefill(rest, groups, input_ids, feats, lengths, key):
            text = weights.merge(rest, groups)
            b = input_ids.shape[0]
            hidden, kvs = decoder_forward(cfg, text, input_ids, feats, lengths)
            last = hidden[jnp.arange(b), lengths - 1][:, None]  # [B, 1, D]
            logits = text.logits(last)[:, 0].astype(jnp.float32)  # [B, V]: never [B, L, V]
            cache = kvc.init_cache(cfg.text, b, cache_length, dtype)
            ks, vs = [], []
            for i, (k, v) in enumerate(kvs):
                ring = cfg.text.is_sliding(i)
                ks.append(kvc.fill_layer(cache.k[i], k, lengths, ring))
                vs.append(kvc.fill_layer(cache.v[i], v, lengths, ring))
            token = sample(logits, key, params)
            return kvc.KVCache(tuple(ks), tuple(vs), lengths), token, logits

        return prefill

    def decode_fn(self, params: SamplingParams, fixed_steps: bool = False):
        """The decode chunk as a pure function of (weights, cache, token, done, remaining, key, stops, limit), which
        ``generate_ids`` compiles: up to ``limit`` (<= ``chunk``, a runtime value, so one compile serves every chunk
        size) steps, fewer once every row is done. ``fixed_steps``: always ``chunk`` steps, a trip count fixed at
        compile time (to measure the loop itself)."""
        text_weights = self._text_weights
        steps, pad = self.chunk, self.cfg.text.pad_token_id

        def decode(weights, cache, token, done, remaining, key, stops, limit):
            text = text_weights.merge_flat(weights)
            b = token.shape[0]

            def body(carry):
                cache, token, done, remaining, key, out, i = carry
                hidden, cache = text.decode_step(text.embed_tokens(token[:, None]), cache)
                logits = text.logits(hidden)[:, 0].astype(jnp.float32)
                key, sub = jax.random.split(key)
                nxt = jnp.where(done, pad, sample(logits, sub, params))
                remaining = remaining - (~done).astype(jnp.int32)
                done = done | jnp.isin(nxt, stops) | (remaining <= 0)
                out = out.at[:, i].set(nxt)
                return cache, nxt, done, remaining, key, out, i + 1

            def cond(carry):
                return carry[-1] < steps if fixed_steps else (carry[-1] < limit) & ~jnp.all(carry[2])

            out = jnp.full((b, steps), pad, jnp.int32)
            carry = (cache, token, done, remaining, key, out, jnp.int32(0))
            cache, token, done, remaining, key, out, n = jax.lax.while_loop(cond, body, carry)
            return cache, token, done, remaining, key, out, n

        return decode

    def _compiled_fn(self, name: str, make, static_key, args, timings: Timings, donate=()):
        """The compiled step for these static settings and argument shapes (compiled once, then reused)."""
        t = time.perf_counter()
        fn, new = compiled_step(self._compiled, name, make, static_key, args, platform=self.platform,
                                compiler_options=self.compiler_options, donate=donate if self._donate else ())
        if new:
            timings.compile_s += time.perf_counter() - t
        return fn

    def _limit(self, steps: int) -> jax.Array:
        """The decode call's step limit as a device scalar, made once per value (no transfer per chunk)."""
        if steps not in self._limits:
            self._limits[steps] = jnp.int32(steps)
        return self._limits[steps]

    # ---- host API ------------------------------------------------------------------------------
    def _prepare_prefill(self, prompts, pixel_values, params: SamplingParams, key, max_new_tokens: int,
                         timings: Timings):
        """Checks, pads to a bucket and compiles: (vision call or None, text call, its arguments; the text call's
        image features (args[3]) are the vision call's output shape until the vision call runs)."""
        if len(prompts) == 0:
            raise ValueError("no prompts: the list of prompts is empty")
        for row, p in enumerate(prompts):  # checked before the padded copy below, which would truncate 3.7 to 3
            token_id_row(p, f"prompt {row}")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if (lengths == 0).any():
            raise ValueError("empty prompt: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        kvc.check_fits(int(lengths.max()), max_new_tokens, self.cache_length)
        length = bucket_length(int(lengths.max()), self.cache_length)
        ids = np.full((len(prompts), length), self.cfg.text.pad_token_id, np.int32)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = p
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        ids_j, px_j, _ = check_inputs(self.cfg, ids, pixel_values, mask)  # no nnx.merge per call
        key = jax.random.key(0) if key is None else key
        vision, feats = None, None
        if px_j is not None:  # the text call is compiled for the vision call's output shape
            vw = self._vision_weights
            args = (vw.rest, vw.groups, px_j)
            fn = self._compiled_fn("vision", self._vision_fn, None, args, timings)
            vision, feats = CompiledCall("vision", fn, args, vw.num_arrays), fn.out_info
        tw = self._text_weights
        args = (tw.rest, tw.groups, ids_j, feats, jnp.asarray(lengths), key)
        fn = self._compiled_fn("prefill", lambda: self._prefill_fn(params), params, args, timings)
        return vision, CompiledCall("prefill", fn, args, tw.num_arrays)

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        pixel_values: np.ndarray | None = None,
        *,
        params: SamplingParams = SamplingParams(),
        key: jax.Array | None = None,
        max_new_tokens: int = 1,
        timings: Timings | None = None,
    ) -> tuple[kvc.KVCache, jax.Array, jax.Array]:
        """Right-pad to a bucket, run the compiled prefill: (cache, first sampled token [B], logits [B, V])."""
        timings = timings if timings is not None else Timings()
        vision, text = self._prepare_prefill(prompts, pixel_values, params, key, max_new_tokens, timings)
        args = text.args
        t = time.perf_counter()  # compiles are done: the clock counts the calls
        if vision is not None:  # queued: the text call's host work overlaps the vision tower on the device
            args = (*args[:3], vision(), *args[4:])
        cache, token, logits = text.fn(*args)
        token.block_until_ready()
        timings.prefill_s += time.perf_counter() - t
        return cache, token, logits

    def prefill_calls(self, prompts: Sequence[Sequence[int]], pixel_values: np.ndarray | None = None,
                      **kw) -> list[CompiledCall]:
        """The compiled calls ``prefill`` makes, in order, each with its arguments (the vision call is run once to
        give the text call its image features), so each can be timed or traced on its own. Arguments as for
        ``prefill``."""
        vision, text = self._prepare_prefill(prompts, pixel_values, kw.get("params", SamplingParams()),
                                             kw.get("key"), kw.get("max_new_tokens", 1), Timings())
        if vision is None:
            return [text]
        args = (*text.args[:3], vision(), *text.args[4:])
        return [vision, dataclasses.replace(text, args=args)]

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        pixel_values: np.ndarray | None = None,
        *,
        max_new_tokens: int = 64,
        params: SamplingParams = SamplingParams(),
        stop_ids: Sequence[int] = (1, 106),
        seed: int = 0,
        timings: Timings | None = None,
        streaming: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yields [B, n] int arrays of new tokens chunk by chunk (pad after a row stops).

        ``streaming``: a reader shows tokens as they come, so decode chunks start at one step and grow (doubling,
        up to ``chunk``) only while a chunk takes under ``STREAM_CHUNK_S``: text appears token by token on a slow
        device instead of in bursts of ``chunk``; the tokens are the same either way."""
        stop_ids = check_stop_ids(stop_ids, self.cfg.text.vocab_size)  # before any work (a generator: at first next)
        timings = timings if timings is not None else Timings()
        key, sub = jax.random.split(jax.random.key(seed32(seed)))
        cache, token, _ = self.prefill(
            prompts, pixel_values, params=params, key=sub, max_new_tokens=max_new_tokens, timings=timings
        )
        first = np.asarray(token)
        yield first[:, None]

        stops = np.full((MAX_STOP_IDS,), -1, np.int32)  # a fixed-size argument: no recompile per stop set
        stops[: len(stop_ids)] = stop_ids
        done = jnp.asarray(np.isin(first, stops[: len(stop_ids)]) | (max_new_tokens <= 1))
        remaining = jnp.full((len(prompts),), max_new_tokens - 1, jnp.int32)
        stops = jnp.asarray(stops)
        if bool(np.all(np.asarray(done))):
            return
        # Each chunk is queued before the previous one's tokens are read back, so the GPU does not wait for the
        # host between chunks; none is queued once the chunks so far cover every step a row may still take.
        state = (cache, token, done, remaining, key)
        limit = 1 if streaming else self.chunk
        fn = self._compiled_fn("decode", lambda: self.decode_fn(params),
                               params, (self.weights, *state, stops, self._limit(limit)), timings, donate=(1,))
        t = time.perf_counter()
        pending, queued = fn(self.weights, *state, stops, self._limit(limit)), limit
        step_s = 0.0  # seconds per step of the last chunk read back
        while pending is not None:
            cache, token, done, remaining, key, out, n = pending
            pending = None
            if queued < max_new_tokens - 1:
                if streaming and limit < self.chunk and 2 * limit * step_s <= STREAM_CHUNK_S:
                    limit *= 2
                pending = fn(self.weights, cache, token, done, remaining, key, stops, self._limit(limit))
                queued += limit
            n = int(n)
            out = np.asarray(out)[:, :n]
            if bool(np.all(np.asarray(done))):
                pending = None  # (a queued chunk finds every row done and runs no step)
            elapsed = time.perf_counter() - t
            step_s = elapsed / max(n, 1)
            timings.decode_s += elapsed
            timings.decode_tokens += n * len(prompts)
            yield out
            t = time.perf_counter()
