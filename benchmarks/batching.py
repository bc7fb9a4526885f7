"""Continuous batching on one GPU: BatchEngine throughput and latency against the static Engine and transformers.

Gemma-3-4B shapes, random bf16 weights. Sections (``--only``):

- ``static``: the static Engine's decode rate at batch ``--max-batch`` after a 1-image prompt (the ceiling a
  continuous batch is compared with, measured in the same run).
- ``offline``: ``--requests`` requests (half text-only of 200-2,000 tokens, half with 1-2 images and 64-600
  tokens of text; 128-512 new tokens each, eos ignored) submitted at once to ``max_batch`` slots: output tok/s,
  TTFT and inter-token latency p50/p99, mean slot occupancy.
- ``long``: ``max_batch - 1`` streams decoding when a ~32K-token prompt arrives: their inter-token p50 before it
  and p99 while it is prefilled, and its TTFT.
- ``ttft``: a lone 1-image prompt (323 tokens) on an idle engine running on its own thread: submit to the first
  token read by the submitting thread; then stepped by hand to time each call, traced against the static
  Engine's prefill kernel by kernel, and a host profile; with ``--ttft-options``, the lone TTFT and the static
  prefill's wall again under each named set of XLA options (``named_options``).
- ``profile``: ``max_batch - 1`` streams decoding while a 2,000-token prompt is prefilled beside them: wall time
  per engine step, and the GPU kernels of a few steps from a profiler trace (per mixed call, per decode step), at
  each ``--profile-step-tokens``; the HLO copies of cache-sized buffers in the compiled mixed call.
- ``peer``: transformers' continuous batching (``generate_batch``) on text-only requests of the same kind, against
  ours on the same requests.

Every section runs once to compile, then is timed. Inter-token latency: a stream's tokens arrive per decode call,
so each token of a delivery is counted at (delivery gap / tokens delivered).

    python -m benchmarks.batching [--small] [--only static,offline,long,ttft,peer] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import cProfile
import gc
import gzip
import io
import json
import math
import os
import pstats
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import (attempt, host_table, kernel_table, log, make_levels, make_pixels, make_prompt,
                               out_path, print_errors, round_up, save_json, timeline)
from benchmarks.common import spec_of
from benchmarks.generate import time_decode, time_prefill
from benchmarks.random_init import random_model
from gemma3_jax.model.pixels import PixelLevels
from gemma3_jax.model.quant import weight_bytes
from gemma3_jax.runtime import engine as engine_module
from gemma3_jax.runtime.batching import BatchEngine, Request
from gemma3_jax.runtime.engine import DECODE_COMMAND_BUFFERS, Engine, default_compiler_options
from gemma3_jax.runtime.engine_process import SWITCH_INTERVAL_S

SECTIONS = ("static", "offline", "long", "ttft", "profile", "peer")


def workload(cfg, n: int, rng, small: bool) -> list[Request]:
    """``n`` requests: even ones text-only, odd ones with 1-2 images; lengths as in the module doc (tiny: /10)."""
    scale = 10 if small else 1
    per_image = cfg.mm_tokens_per_image + 2
    out = []
    for i in range(n):
        new = int(rng.integers(128, 513)) // scale
        if i % 2 == 0 or not cfg.is_multimodal:
            tokens, images = int(rng.integers(200, 2001)) // scale, 0
        else:
            images = int(rng.integers(1, 3))
            tokens = int(rng.integers(64, 601)) // scale + images * per_image
        out.append(Request(make_prompt(cfg, tokens, images, rng), make_pixels(cfg, images, rng),
                           max_new_tokens=max(new, 2), stop_ids=()))
    return out


def serve(engine: BatchEngine, requests: list[Request], trace: tuple[int, int] | None = None) -> dict:
    """Submit every request at once, run to completion; throughput and latency figures. ``trace`` = (first
    step, steps): the GPU's kernels over those engine steps (how busy the GPU was)."""
    t0 = time.perf_counter()
    streams = [engine.submit(r) for r in requests]
    submit_s = time.perf_counter() - t0
    traced = None
    if trace is None:
        engine.run()
    else:
        with tempfile.TemporaryDirectory() as logdir:
            i, more = 0, True
            while more:
                if i == trace[0]:
                    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
                    t_trace = time.perf_counter()
                more = engine.step()
                i += 1
                if traced is None and i > trace[0] and (i == trace[0] + trace[1] or not more):
                    jax.block_until_ready(engine.cache)
                    wall_trace = time.perf_counter() - t_trace
                    jax.profiler.stop_trace()
                    traced = dict(steps=i - trace[0], wall_ms=wall_trace * 1e3,
                                  kernels=kernel_table(logdir, i - trace[0], top=12))
    wall = time.perf_counter() - t0
    out = dict(summary(streams, wall), submit_s=submit_s, **occupancy(engine))
    if traced is not None:
        out["traced"] = traced
    return out


def occupancy(engine: BatchEngine) -> dict:
    c = engine.counters
    return dict(mean_decoding_slots=c["decode_tokens"] / max(c["decode_steps"], 1), decode_calls=c["decode_calls"],
                mixed_calls=c["mixed_calls"], prefill_calls=c["prefill_calls"],
                compiles={k: v for k, v in c.items() if k.startswith("compiles_")})


def gaps(stream, since: float = -1.0, until: float = float("inf")) -> list[float]:
    """Inter-token latencies (s) of the tokens a stream received in (since, until]."""
    out, prev = [], stream.arrivals[0][0] if stream.arrivals else None
    for t, n in stream.arrivals[1:]:
        if since < t <= until:
            out += [(t - prev) / n] * n
        prev = t
    return out


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summary(streams, wall: float) -> dict:
    tokens = sum(len(s.tokens) for s in streams)
    ttft = [s.first_token_at - s.submitted for s in streams]
    itl = [g for s in streams for g in gaps(s)]
    return dict(requests=len(streams), output_tokens=tokens, wall_s=wall, tok_per_s=tokens / wall,
                ttft_p50_ms=pct(ttft, 50) * 1e3, ttft_p99_ms=pct(ttft, 99) * 1e3,
                itl_p50_ms=pct(itl, 50) * 1e3, itl_p99_ms=pct(itl, 99) * 1e3)


def make_engine(model, args, cache_length: int, record_calls: bool = False, options: dict | None = None) -> BatchEngine:
    return BatchEngine(model, max_batch=args.max_batch, cache_length=cache_length, chunk_tokens=args.chunk_tokens,
                       prefill_rows=args.prefill_rows, decode_steps=args.decode_steps,
                       step_tokens=args.step_tokens, record_calls=record_calls, verbose=True,
                       compiler_options=options)


def named_options(name: str, platform: str) -> dict | None:
    """XLA options for every compiled call by name: ``default`` (each step's own), ``graphs`` (every call one CUDA
    graph, loops included), ``nocb`` (no command buffers at all: every kernel launched by XLA's thunks),
    ``vision_nocb`` (each step's own, the vision call's without command buffers: ``step_options``)."""
    if name in ("default", "vision_nocb"):
        return None
    base = default_compiler_options("prefill", platform)
    if name == "graphs":
        return {**base, **DECODE_COMMAND_BUFFERS}
    if name == "nocb":
        return {**base, "xla_gpu_enable_command_buffer": ""}
    raise ValueError(f"unknown compiler options {name!r}: default, graphs, nocb or vision_nocb")


@contextlib.contextmanager
def step_options(name: str):
    """For ``vision_nocb``: while in the block, steps compiled with their default options get the vision call's
    without command buffers, so its kernels are launched one by one (the first at once) instead of as a graph that
    may first be updated for new pixel buffers."""
    if name != "vision_nocb":
        yield
        return
    original = engine_module.default_compiler_options

    def options(step: str, *args, **kw) -> dict:
        opts = original(step, *args, **kw)
        return {**opts, "xla_gpu_enable_command_buffer": ""} if step == "vision" else opts

    engine_module.default_compiler_options = options
    try:
        yield
    finally:
        engine_module.default_compiler_options = original


# A lone request meets an idle engine: the last one's tail (a decode call dispatched before its final token was
# known, still on the GPU when that token is read) is over before the next is submitted.
IDLE_S = 0.01


def lone_ttfts(eng: BatchEngine, req: Request, runs: int, submits: list | None = None) -> list[float]:
    """Seconds from submit to the first token read on this thread, the engine stepping on its own (first: compiles);
    each ``submit``'s own seconds go to ``submits``."""
    eng.start()
    out = [lone_ttft(eng, req, submits) for _ in range(runs)]
    eng.stop()
    return out


def lone_ttft(eng: BatchEngine, req: Request, submits: list | None = None, parts: list | None = None,
              idle_s: float = IDLE_S, early_reads: bool = True) -> float:
    """One lone request's TTFT (s), submitted ``idle_s`` after the last one ended (``early_reads``: the engine's
    setting of that name for this request). With the engine's calls recorded,
    ``parts`` gets where it went (ms after submit): when the engine's thread took the request up, its host time
    until the vision call was dispatched and until the prefill call was, when the first token was ready and how
    long the reader then took to have it."""
    eng.features.clear()  # a new image each time: encoded, not cached (its hashing threads stay)
    if eng.calls is not None:
        eng.calls.clear()
    eng.early_reads = early_reads
    time.sleep(idle_s)
    t = time.perf_counter()
    s = eng.submit(req)
    if submits is not None:
        submits.append(time.perf_counter() - t)
    next(iter(s))
    out = time.perf_counter() - t
    s.result()
    first = next((c for c in list(eng.calls or []) if c["kind"] == "prefill" and "ready" in c), None)
    if parts is not None and first is not None:
        ready = (first["ready"] - t) * 1e3
        parts.append(dict(taken_up=(first["start"] - t) * 1e3, **first["host_ms"], dispatch=first["dispatch_ms"],
                          ready=ready, to_reader=out * 1e3 - ready))
    return out


def interleaved_ttfts(eng: BatchEngine, cases: dict[str, tuple], rounds: int) -> dict[str, dict]:
    """``lone_ttfts`` of several cases, (request, Python switch interval[, idle seconds before[, early_reads]]),
    taken in turn, round after round, so a drift of the machine (clocks, other load) falls on every case alike: per
    case the median and min TTFT and submit (ms), the first two rounds (compiles, warm-up) left out."""
    old = sys.getswitchinterval()
    times: dict[str, list[float]] = {name: [] for name in cases}
    submits: dict[str, list[float]] = {name: [] for name in cases}
    parts: dict[str, list[dict]] = {name: [] for name in cases}
    eng.start()
    try:
        for _ in range(rounds + 2):
            for name, (req, interval, *other) in cases.items():
                sys.setswitchinterval(interval)
                times[name].append(lone_ttft(eng, req, submits[name], parts[name], *other))
    finally:
        sys.setswitchinterval(old)
        eng.stop()
    ms = lambda xs: [x * 1e3 for x in xs[2:]]
    median_parts = lambda ps: {k: round(statistics.median(p.get(k, 0.0) for p in ps), 3) for k in ps[0]} if ps else {}
    return {name: dict(ttft_ms=statistics.median(ms(times[name])), ttft_min_ms=min(ms(times[name])),
                       ttft_p90_ms=float(np.percentile(ms(times[name]), 90)),
                       submit_ms=statistics.median(ms(submits[name])), switch_interval_s=cases[name][1],
                       runs=rounds, parts_ms=median_parts(parts[name][2:])) for name in cases}


def submit_parts(cfg, eng: BatchEngine, req: Request) -> dict:
    """Host milliseconds (median of 20) of what ``submit`` does with a request's image, one part at a time."""
    from gemma3_jax.model.gemma3 import check_inputs

    px, ids = req.pixel_values, np.asarray(req.prompt)[None]
    image = PixelLevels(px.levels[0], px.table) if isinstance(px, PixelLevels) else px[0]
    values = px.levels if isinstance(px, PixelLevels) else px

    def ms(fn) -> float:
        times = []
        for _ in range(21):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
            if hasattr(out, "result"):
                out.result()
        return round(statistics.median(times[1:]) * 1e3, 3)

    return dict(check_inputs=ms(lambda: check_inputs(cfg, ids, px, to_device=False)),
                isfinite=ms(lambda: np.isfinite(values).all()),
                fingerprint=ms(lambda: eng.features.fingerprint(image)),
                key_later=ms(lambda: eng.features.key_later(image)), key=ms(lambda: eng.features.key(image)),
                device_put_ready=ms(lambda: jax.block_until_ready(jax.device_put(px))),  # the engine's copy, waited
                submit_and_cancel=ms(lambda: submit_and_cancel(eng, req)))  # the whole, with its parts' caches warm


def submit_and_cancel(eng: BatchEngine, req: Request):
    """Submit ``req`` to an engine that is not stepping and take it back; its image's pending key (to wait for)."""
    s = eng.submit(req)
    eng.cancel(s)
    return s._image_keys[0] if s._image_keys else None


def profile_text(profiler: cProfile.Profile, order: str, lines: int) -> str:
    """A cProfile run's top ``lines`` functions by ``order``, as pstats prints them."""
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats(order).print_stats(lines)
    return buf.getvalue()


def call_breakdown(calls: list[dict]) -> dict:
    """Where a run's wall time went, from ``BatchEngine.calls``: per kind and shape of call, how many, the host's
    dispatch time, and the device time estimated as (this call ready) - (previous call ready or this call
    dispatched, whichever is later) - exact while the host waits on every call, an upper bound otherwise."""
    calls = [c for c in calls if "ready" in c]
    out: dict = {}
    prev_ready = None
    for c in calls:
        dispatched = c["start"] + c["dispatch_ms"] / 1e3
        begin = dispatched if prev_ready is None else max(prev_ready, dispatched)
        key = f"{c['kind']} {'x'.join(map(str, c['shape']))}".strip() + (" +vision" if c["images"] else "")
        e = out.setdefault(key, dict(calls=0, steps=0, images=0, dispatch_ms=0.0, wait_ms=0.0, device_ms=0.0,
                                     idle_before_ms=0.0, prompt_tokens=0, padded_tokens=0))
        e["calls"] += 1
        e["prompt_tokens"] += c.get("prompt_tokens", 0)
        e["padded_tokens"] += math.prod(c["shape"]) if c["shape"] else 0
        e["steps"] += c["steps"]
        e["images"] += c["images"]
        e["dispatch_ms"] += c["dispatch_ms"]
        parts = e.setdefault("host_ms", {})  # the dispatch by part: encode, pack or flags, feats, embed, call
        for part, ms in c.get("host_ms", {}).items():
            parts[part] = parts.get(part, 0.0) + ms
        e["wait_ms"] += c["wait_ms"]
        e["device_ms"] += (c["ready"] - begin) * 1e3
        if prev_ready is not None:  # the device had nothing queued between the previous call and this one
            e["idle_before_ms"] += max(0.0, c["start"] - prev_ready) * 1e3
        prev_ready = c["ready"]
    for e in out.values():
        e["device_ms_per_call"] = e["device_ms"] / e["calls"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["device_ms"]))


def workload_ceiling(cfg, requests: list[Request], slots: int, weights: int, static_context: int,
                     static_new: int) -> dict:
    """What the KV cache alone costs this workload: bytes a decode step reads (text weights + each slot's keys
    and values at its context) averaged over the workload's tokens with ``slots`` slots full, against the static
    batch's step (contexts ``static_context`` .. + ``static_new``). Their ratio bounds offline / static before any
    prefill work, if both steps ran at the same bandwidth."""
    from gemma3_jax.model.kv_cache import cache_nbytes

    def kv(contexts) -> float:
        """Keys and values one slot reads at each of ``contexts`` (a cache as long as the context), summed."""
        lengths, counts = np.unique(np.concatenate(contexts), return_counts=True)
        return float(sum(cache_nbytes(cfg.text, 1, int(n), jnp.bfloat16) * c for n, c in zip(lengths, counts)))

    tokens = sum(r.max_new_tokens for r in requests)
    kv_total = kv([len(r.prompt) + np.arange(r.max_new_tokens) for r in requests])
    static_step = weights + kv([static_context + np.arange(static_new)]) / static_new * slots
    step = weights + slots * kv_total / tokens
    return dict(weight_bytes=weights, static_step_bytes=static_step, workload_step_bytes=step,
                offline_over_static_cap=static_step / step, output_tokens=tokens,
                prompt_tokens=sum(len(r.prompt) for r in requests))


def section_offline(model, cfg, args, res, rng):
    reqs = workload(cfg, args.requests, rng, args.small)
    eng = None
    for option in args.offline_options:  # the first is "offline", any other "offline_<option>"
        eng = offline_run(model, cfg, args, res, reqs, option)
    return eng


def offline_run(model, cfg, args, res, reqs, option: str):
    length = round_up(max(len(r.prompt) + r.max_new_tokens for r in reqs))
    eng = make_engine(model, args, length, record_calls=True, options=named_options(option, model.kernels.platform))
    key = "offline" if option == args.offline_options[0] else f"offline_{option}"
    t = time.perf_counter()
    serve(eng, reqs[: 2 * args.max_batch])  # compiles the shapes the workload uses
    res[f"{key}_warmup_s"] = time.perf_counter() - t
    res[f"{key}_warmup_compiles"] = {k: v for k, v in eng.counters.items() if k.startswith("compiles_")}
    eng.counters.clear()
    eng.calls.clear()
    profiler = None
    if args.host_profile:  # where the host's time goes (Python functions; a compiled call is one builtin)
        profiler = cProfile.Profile()
        profiler.enable()
    # a profiler trace slows every later call of the process (mixed calls 10 -> 19 ms on the H100), so it is
    # opt-in, and the run's throughput is then not the figure to report
    r = serve(eng, reqs, trace=(300, 60) if args.offline_trace and not args.small else None)
    if profiler is not None:
        profiler.disable()
        for order in ("tottime", "cumulative"):
            log(f"host profile by {order}:\n" + profile_text(profiler, order, 30)[-9000:])
    r["cache_length"], r["cache_gib"] = length, eng.cache_bytes / 2**30
    r["calls"] = call_breakdown(eng.calls)
    save_gz(f"{key}_calls.json.gz", json.dumps(eng.calls))  # every call's record, for a timeline
    spec = spec_of(args.small)
    r["ceiling"] = workload_ceiling(cfg, reqs, args.max_batch, weight_bytes(model.text), spec.short[0], spec.new)
    r["options"] = option
    res[key] = r
    log(f"offline ({option} options) {r['requests']} requests: {r['tok_per_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
        f"inter-token p50/p99 {r['itl_p50_ms']:.2f}/{r['itl_p99_ms']:.2f} ms, "
        f"{r['mean_decoding_slots']:.1f} of {args.max_batch} slots decoding; a full decode step reads "
        f"{r['ceiling']['workload_step_bytes'] / 1e9:.2f} GB here vs {r['ceiling']['static_step_bytes'] / 1e9:.2f} GB "
        f"in the static batch: offline/static <= {r['ceiling']['offline_over_static_cap']:.2f} before prefill work")
    prompt = sum(e["prompt_tokens"] for e in r["calls"].values())
    padded = sum(e["padded_tokens"] for e in r["calls"].values())
    r["prefill_padding"] = dict(prompt_tokens=prompt, padded_tokens=padded, padded_over_prompt=padded / max(prompt, 1))
    log(f"    prefill rows padded: {padded:,} token slots for {prompt:,} prompt tokens ({padded / max(prompt, 1):.3f}x)")
    host = sum(e["dispatch_ms"] for e in r["calls"].values())
    log(f"    wall {r['wall_s']:.1f} s (submitting {r['submit_s']:.2f} s); host dispatch {host / 1e3:.1f} s; per kind "
        f"of call (device time estimated):")
    if "traced" in r:
        k = r["traced"]["kernels"]
        log(f"    traced {r['traced']['steps']} engine steps: wall {r['traced']['wall_ms'] / r['traced']['steps']:.2f} ms, "
            f"GPU kernels {k.get('total_us_per_step', 0) / 1e3:.2f} ms, span {k.get('span_us_per_step', 0) / 1e3:.2f} ms "
            f"a step")
    for key, e in r["calls"].items():
        log(f"    {key:28s} x{e['calls']:5d}  device {e['device_ms'] / 1e3:6.2f} s "
            f"({e['device_ms_per_call']:7.2f} ms a call, {e['steps']} steps, {e['images']} images)  "
            f"dispatch {e['dispatch_ms']:8.1f} ms  idle before {e['idle_before_ms']:7.1f} ms")
        parts = ", ".join(f"{k} {v / e['calls']:.2f}" for k, v in e.get("host_ms", {}).items())
        log(f"        host ms a call by part: {parts}")
    return eng


def section_long(model, cfg, args, res, rng):
    n_long, imgs = (480, 16) if args.small else (32640, 16)
    streams_n = args.max_batch - 1
    new = 400 if args.small else 512  # still decoding when the long prompt is done
    eng = make_engine(model, args, round_up(max(n_long + 2, 512 // (10 if args.small else 1) + new)))
    short = [Request(make_prompt(cfg, 512 // (10 if args.small else 1), 0, rng), max_new_tokens=new, stop_ids=())
             for _ in range(streams_n)]
    long = Request(make_prompt(cfg, n_long, imgs, rng), make_pixels(cfg, imgs, rng), max_new_tokens=2, stop_ids=())
    for warm in (True, False):
        eng.counters.clear()
        streams = [eng.submit(r) for r in short]
        while not all(s.tokens for s in streams):  # every stream decoding
            eng.step()
        eng.step()
        t_arrive = time.perf_counter()
        big = eng.submit(long)
        while not big.tokens:
            eng.step()
        t_first = time.perf_counter()
        eng.run()
        if warm:
            continue
        before = [g for s in streams for g in gaps(s, until=t_arrive)]
        during = [g for s in streams for g in gaps(s, since=t_arrive, until=t_first)]
        r = dict(streams=streams_n, long_tokens=n_long, long_images=imgs, long_ttft_ms=(t_first - t_arrive) * 1e3,
                 steady_itl_p50_ms=pct(before, 50) * 1e3, during_itl_p50_ms=pct(during, 50) * 1e3,
                 during_itl_p99_ms=pct(during, 99) * 1e3, **occupancy(eng))
        r["p99_over_steady_p50"] = r["during_itl_p99_ms"] / r["steady_itl_p50_ms"]
        res["long"] = r
        log(f"long prompt {n_long} tok among {streams_n} streams: TTFT {r['long_ttft_ms']:.0f} ms; their inter-token "
            f"p50 {r['steady_itl_p50_ms']:.2f} ms before, p99 {r['during_itl_p99_ms']:.2f} ms during "
            f"({r['p99_over_steady_p50']:.2f}x)")


def section_ttft(model, cfg, args, res, rng, spec):
    n, imgs = spec.short
    eng = make_engine(model, args, round_up(n + spec.new), record_calls=True)
    req = Request(make_prompt(cfg, n, imgs, rng), make_pixels(cfg, imgs, rng), max_new_tokens=2, stop_ids=())
    threaded = lone_ttfts(eng, req, 8)  # as a server runs it: steps on the engine's thread, read by this one
    times, first = [], []
    for i in range(6):  # stepped here, each call recorded
        eng.features.clear()
        eng.calls.clear()
        t = time.perf_counter()
        s = eng.submit(req)
        submitted = time.perf_counter()
        while not s.tokens:
            eng.step()
        times.append(time.perf_counter() - t)
        first.append(s.first_token_at - t)
        eng.run()
    calls = [dict(kind=c["kind"], shape=c["shape"], images=c["images"], at_ms=(c["start"] - t) * 1e3,
                  dispatch_ms=c["dispatch_ms"], host_ms=c["host_ms"], wait_ms=c.get("wait_ms"),
                  ready_ms=(c.get("ready", t) - t) * 1e3)
             for c in eng.calls]
    parts = submit_parts(cfg, eng, req)
    log(f"    submit's parts (ms, median of 20): {parts}")
    as_levels = dataclasses.replace(req, pixel_values=make_levels(cfg, imgs, rng))
    levels_parts = submit_parts(cfg, eng, as_levels)
    log(f"    the same with the image as uint8 levels: {levels_parts}")
    res["ttft"] = dict(tokens=n, images=imgs, ttft_ms=statistics.median(threaded[1:]) * 1e3,
                       ttft_min_ms=min(threaded[1:]) * 1e3, stepped_ms=statistics.median(times[1:]) * 1e3,
                       first_token_at_ms=statistics.median(first[1:]) * 1e3, first_ms=threaded[0] * 1e3,
                       last_submit_ms=(submitted - t) * 1e3, last_calls=calls, submit_parts_ms=parts,
                       levels_submit_parts_ms=levels_parts)
    log(f"    last request: submit {res['ttft']['last_submit_ms']:.2f} ms; calls (ms from submit): " + "; ".join(
        f"{c['kind']} {c['shape']} at {c['at_ms']:.2f} dispatch {c['dispatch_ms']:.2f} ready {c['ready_ms']:.2f}"
        for c in calls))
    # the GPU's kernels and the host's events; the last without Python's function events, which slow the host
    for key, one, python in (("traced", req, 1), ("levels_traced", as_levels, 1), ("levels_traced_no_python", as_levels, 0)):
        eng.features.clear()
        eng.submit(one).result()  # compiled and warm
        eng.run()  # and its last decode call read: the engine idle
        time.sleep(IDLE_S)
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = python
        with tempfile.TemporaryDirectory() as logdir:
            eng.features.clear()
            with jax.profiler.trace(logdir, create_perfetto_trace=True, profiler_options=options):
                t = time.perf_counter()
                with jax.profiler.TraceAnnotation("lone_submit"):
                    s = eng.submit(one)
                while not s.tokens:
                    eng.step()
                wall = time.perf_counter() - t
            res["ttft"][key] = dict(wall_ms=wall * 1e3, kernels=kernel_table(logdir, 1, top=40),
                                    host=host_table(logdir), timeline=timeline(logdir, "lone_submit"),
                                    calls=[dict(c) for c in eng.calls[-2:]])
            eng.run()
        log(f"{key}: host events (us x calls): " + "; ".join(f"{h['name'][:60]} {h['us']:.0f} x{h['calls']}"
                                                             for h in res["ttft"][key]["host"][:25]))
        log_timeline(key, res["ttft"][key]["timeline"])
        log(f"{key}: GPU us per XLA module: " + "; ".join(
            f"{m} {v['us_per_step']:.0f} x{v['calls_per_step']:.0f}"
            for m, v in res["ttft"][key]["kernels"].get("modules", {}).items()))
    static = Engine(model, cache_length=round_up(n + spec.new))  # the static prefill's kernels, to compare
    jax.block_until_ready(static.prefill([list(req.prompt)], req.pixel_values))
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t = time.perf_counter()
            with jax.profiler.TraceAnnotation("static_prefill"):
                jax.block_until_ready(static.prefill([list(req.prompt)], req.pixel_values))
            wall = time.perf_counter() - t
        res["ttft"]["static_traced"] = dict(wall_ms=wall * 1e3, kernels=kernel_table(logdir, 1, top=40),
                                            timeline=timeline(logdir, "static_prefill"))
    log_timeline("static prefill", res["ttft"]["static_traced"]["timeline"])
    del static
    ours = {r["name"]: r for r in res["ttft"]["traced"]["kernels"].get("top", [])}
    theirs = {r["name"]: r for r in res["ttft"]["static_traced"]["kernels"].get("top", [])}
    sk = res["ttft"]["static_traced"]["kernels"]
    log(f"static prefill traced: wall {wall * 1e3:.2f} ms, kernels {sk.get('total_us_per_step', 0) / 1e3:.2f} ms over "
        f"{sk.get('span_us_per_step', 0) / 1e3:.2f} ms, {sk.get('launches_per_step', 0):.0f} launches; per kernel "
        f"(lone request us x calls | static us x calls):")
    for name in sorted(set(ours) | set(theirs), key=lambda k: -max(ours.get(k, {}).get("us_per_step", 0),
                                                                      theirs.get(k, {}).get("us_per_step", 0))):
        a, b = ours.get(name, {}), theirs.get(name, {})
        log(f"    {a.get('us_per_step', 0):9.1f} x{a.get('calls_per_step', 0):4.0f} | {b.get('us_per_step', 0):9.1f} "
            f"x{b.get('calls_per_step', 0):4.0f}  {name[:90]}")
    eng.features.clear()  # where the host's time goes over one lone request (after the timed runs: it slows them)
    profiler = cProfile.Profile()
    profiler.enable()
    s = eng.submit(req)
    while not s.tokens:
        eng.step()
    profiler.disable()
    eng.run()
    log("lone request host profile by tottime:\n" + profile_text(profiler, "tottime", 25)[-6000:])
    k = res["ttft"]["traced"]["kernels"]
    log(f"lone {n}-token 1-image prompt: TTFT {res['ttft']['ttft_ms']:.2f} ms read on another thread (min "
        f"{res['ttft']['ttft_min_ms']:.2f}; stepped here: handed over at {res['ttft']['first_token_at_ms']:.2f} ms; "
        f"first, compiling: {threaded[0]:.1f} s); traced: kernels "
        f"{k.get('total_us_per_step', 0) / 1e3:.2f} ms over a span of {k.get('span_us_per_step', 0) / 1e3:.2f} ms")
    for row in k.get("top", [])[:10]:
        log(f"    {row['us_per_step']:9.1f} us x{row['calls_per_step']:.0f}  {row['name'][:100]}")
    del eng
    variants = res["ttft"]["options"] = {}
    for name in args.ttft_options:  # the same request under other XLA options: lone TTFT and the static prefill
        with step_options(name):  # vision_nocb: the vision call's own options changed, during this variant
            options = named_options(name, model.kernels.platform)
            eng = make_engine(model, args, round_up(n + spec.new), options=options, record_calls=True)
            # the image as float32 pixels and as uint8 levels (how Service and the server send it), each under Python's
            # default switch interval and under the one a server process sets (a reader woken by the first token waits
            # for the GIL up to that interval while the engine's thread dispatches the next call)
            lone = interleaved_ttfts(eng, dict(float_python=(req, 0.005), float_server=(req, SWITCH_INTERVAL_S),
                                               levels_python=(as_levels, 0.005),
                                               levels_server=(as_levels, SWITCH_INTERVAL_S),
                                           levels_server_back_to_back=(as_levels, SWITCH_INTERVAL_S, 0.0),
                                           levels_server_late_reads=(as_levels, SWITCH_INTERVAL_S, IDLE_S, False)),
                                      20)
            del eng
            static = Engine(model, cache_length=round_up(n + spec.new), compiler_options=options)
            walls = []
            for _ in range(10):
                t = time.perf_counter()
                jax.block_until_ready(static.prefill([list(req.prompt)], req.pixel_values))
                walls.append(time.perf_counter() - t)
            # the measure: the prefill without the host's input checks and copies (benchmarks.generate's)
            bare = time_prefill(static, list(req.prompt), req.pixel_values, 10)
            bare_levels = time_prefill(static, list(req.prompt), as_levels.pixel_values, 10)
            del static
            gc.collect()
            name = name if name not in variants else f"{name}_{len(variants)}"
            v = variants[name] = dict(lone=lone, ttft_ms=lone["float_python"]["ttft_ms"],
                                      ttft_min_ms=lone["float_python"]["ttft_min_ms"],
                                      submit_ms=lone["float_python"]["submit_ms"],
                                      levels_static_prefill_ms=bare_levels["median_s"] * 1e3,
                                      static_prefill_wall_ms=statistics.median(walls[2:]) * 1e3,
                                      static_prefill_wall_min_ms=min(walls[2:]) * 1e3,
                                      static_prefill_ms=bare["median_s"] * 1e3, static_prefill_min_ms=bare["min_s"] * 1e3)
            log(f"options {name}: lone TTFT {v['ttft_ms']:.2f} ms (min {v['ttft_min_ms']:.2f}; submit {v['submit_ms']:.2f}); "
                f"static Engine.prefill wall {v['static_prefill_wall_ms']:.2f} ms (min {v['static_prefill_wall_min_ms']:.2f}), "
                f"without host input prep {v['static_prefill_ms']:.2f} ms (min {v['static_prefill_min_ms']:.2f}): "
                f"TTFT / prefill {v['ttft_ms'] / v['static_prefill_ms']:.3f}")
            log(f"options {name}: the levels' prefill without host input prep {v['levels_static_prefill_ms']:.2f} ms")
            for case, c in lone.items():
                log(f"    {case}: lone TTFT {c['ttft_ms']:.2f} ms (min {c['ttft_min_ms']:.2f}, p90 {c['ttft_p90_ms']:.2f}; "
                    f"submit {c['submit_ms']:.2f}; {c['runs']} runs interleaved): TTFT / the float prefill's "
                    f"{c['ttft_ms'] / v['static_prefill_ms']:.3f}; median parts (ms after submit) {c['parts_ms']}")


def log_timeline(what: str, rows: list[dict]) -> None:
    log(f"{what}: timeline (ms after submit: host events and GPU gaps of 0.1 ms or more):\n" + "\n".join(
        f"    {r['at_ms']:8.3f} {r['ms']:7.3f} {r['what']:9} {r['tid'] or '':>8} {r['name']}" for r in rows))


def save_gz(name: str, text: str) -> None:
    """``text`` gzipped as ``name`` beside the JSON under $OUT (nothing without $OUT)."""
    if out_path("x") is not None:
        os.makedirs(os.path.dirname(out_path("x")), exist_ok=True)
        with gzip.open(out_path(name), "wt") as fh:
            fh.write(text)


def big_copies(hlo: str, min_bytes: int = 1 << 20) -> list[str]:
    """The copy instructions of an optimized HLO text that move at least ``min_bytes`` (shape and count)."""
    found: dict[str, int] = {}
    for m in re.finditer(r"= (bf16|f32|s32|f16)\[([0-9,]+)\]\{[^}]*\} copy\(", hlo):
        size = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4}[m.group(1)] * math.prod(int(d) for d in m.group(2).split(","))
        if size >= min_bytes:
            key = f"{m.group(1)}[{m.group(2)}]"
            found[key] = found.get(key, 0) + 1
    return [f"{n} x {k}" for k, n in sorted(found.items(), key=lambda kv: -kv[1])]


def section_profile(model, cfg, args, res, rng):
    """Steady mixed calls (decoding streams + one prompt's chunks) and steady decode calls: wall per step, GPU
    kernels per call from a trace."""
    streams_n, short = args.max_batch - 1, 512 // (10 if args.small else 1)
    new = 300 if args.small else 2000
    out = res.setdefault("profile", {})
    variants = [(st, opt) for st in args.profile_step_tokens for opt in args.profile_options]
    for step_tokens, option in variants:
        prompt_n = 12 * step_tokens  # enough chunks for the calls timed and traced
        options = None
        if option == "graphs":  # every call as one CUDA graph, the prefill options otherwise (mixed calls)
            options = {**default_compiler_options("prefill", model.kernels.platform), **DECODE_COMMAND_BUFFERS}
        eng = BatchEngine(model, max_batch=args.max_batch, cache_length=round_up(max(short + new, prompt_n + 2)),
                          chunk_tokens=args.chunk_tokens, prefill_rows=args.prefill_rows,
                          decode_steps=args.decode_steps, step_tokens=step_tokens, compiler_options=options)
        streams = [eng.submit(Request(make_prompt(cfg, short, 0, rng), max_new_tokens=new, stop_ids=()))
                   for _ in range(streams_n)]
        while not all(s.tokens for s in streams):
            eng.step()
        r = {}
        for phase in ("decode", "mixed"):
            if phase == "mixed":
                eng.submit(Request(make_prompt(cfg, prompt_n, 0, rng), max_new_tokens=2, stop_ids=()))
            counter = "mixed_calls" if phase == "mixed" else "decode_calls"
            eng.step()  # compiles
            walls = []
            for _ in range(4):
                before = eng.counters[counter]
                t = time.perf_counter()
                eng.step()
                if eng.counters[counter] > before:
                    walls.append(time.perf_counter() - t)
            with tempfile.TemporaryDirectory() as logdir:
                before = eng.counters[counter]
                with jax.profiler.trace(logdir, create_perfetto_trace=True):
                    for _ in range(3):
                        eng.step()
                    jax.block_until_ready(eng.cache)
                calls = eng.counters[counter] - before
                table = kernel_table(logdir, max(calls, 1), top=30)
            r[phase] = dict(wall_ms=[w * 1e3 for w in walls], traced_calls=calls, kernels=table)
            log(f"profile step_tokens {step_tokens} options {option} {phase}: wall/step {[round(w * 1e3, 2) for w in walls]} ms; "
                f"kernels {table.get('total_us_per_step', 0) / 1e3:.2f} ms, span "
                f"{table.get('span_us_per_step', 0) / 1e3:.2f} ms per call ({calls} calls traced)")
            for row in table.get("top", [])[:12]:
                log(f"    {row['us_per_step']:9.1f} us x{row['calls_per_step']:.0f}  {row['name'][:100]}")
        for name, c in eng.compiled_steps():
            if name == "mixed":
                hlo = c.as_text()
                r["mixed_big_copies"] = big_copies(hlo)
                if (step_tokens, option) == variants[0]:
                    save_gz(f"mixed_{step_tokens}.hlo.gz", hlo)
                log(f"    mixed call's copies of >= 1 MiB: {r['mixed_big_copies'][:8]}")
        out[f"{step_tokens}_{option}"] = r
        del eng
        gc.collect()


def section_peer(model, cfg, args, res, rng):
    """transformers' generate_batch on text-only requests, and ours on the same."""
    import torch
    from transformers import Gemma3ForCausalLM, GenerationConfig

    from benchmarks.generate import hf_config

    n, prompt_len, new = (8, 40, 8) if args.small else (args.peer_requests, 512, 128)
    prompts = [make_prompt(cfg, prompt_len, 0, rng) for _ in range(n)]
    reqs = [Request(p, max_new_tokens=new, stop_ids=()) for p in prompts]
    eng = make_engine(model, args, round_up(prompt_len + new))
    serve(eng, reqs)
    eng.counters.clear()
    ours = serve(eng, reqs)
    del eng
    gc.collect()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    text_cfg = hf_config(cfg).text_config
    hf = Gemma3ForCausalLM._from_config(text_cfg, attn_implementation="paged|sdpa", dtype=dtype).to(device).eval()
    gen = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate_batch(prompts[:2], generation_config=gen)  # warm-up
        t = time.perf_counter()
        out = hf.generate_batch(prompts, generation_config=gen)
        wall = time.perf_counter() - t
    tokens = sum(len(o.generated_tokens) for o in out.values())
    res["peer"] = dict(requests=n, prompt_tokens=prompt_len, new_tokens=new, ours_tok_per_s=ours["tok_per_s"],
                       peer_tok_per_s=tokens / wall, ratio=ours["tok_per_s"] / (tokens / wall))
    log(f"peer (transformers generate_batch, {n} x {prompt_len}+{new}): {tokens / wall:.0f} tok/s; ours "
        f"{ours['tok_per_s']:.0f} tok/s ({res['peer']['ratio']:.1f}x)")
    del hf
    gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny config (CPU check of every code path)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_batching.json)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--peer-requests", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--prefill-rows", type=int, default=4)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--step-tokens", type=int, default=256)
    ap.add_argument("--offline-trace", action="store_true", help="offline: GPU trace of steps 300-360 (slows the run)")
    ap.add_argument("--offline-options", type=lambda v: [x for x in v.split(",") if x], default=["default"],
                    help="offline: run it under each of these compiler options (default, graphs, nocb)")
    ap.add_argument("--host-profile", action="store_true", help="offline: cProfile the timed run (no GPU trace)")
    ap.add_argument("--profile-step-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[256, 1024])
    ap.add_argument("--profile-options", type=lambda v: v.split(","), default=["default"],
                    help="compiler options of the profiled engine: default, graphs (every call one CUDA graph)")
    ap.add_argument("--ttft-options", type=lambda v: [x for x in v.split(",") if x], default=[],
                    help="ttft: also time the lone request under these options (default, graphs, nocb, vision_nocb)")
    args = ap.parse_args()
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    if args.small:
        args.requests, args.max_batch, args.chunk_tokens = min(args.requests, 24), min(args.max_batch, 8), 64
    path = out_path("bench_batching.json", args.out)
    spec = spec_of(args.small)
    cfg = spec.cfg
    rng = np.random.default_rng(0)
    res: dict = dict(small=args.small, jax=jax.__version__, device=str(jax.devices()[0]), args=vars(args))
    model = random_model(cfg, jnp.bfloat16)
    jax.block_until_ready(nnx.state(model))
    log(f"jax {jax.__version__} on {res['device']}; sections {sorted(sections)}")
    if "static" in sections:
        with attempt(res, "static"):
            n, imgs = spec.short
            eng = Engine(model, cache_length=round_up(n + spec.new))
            prompts = [make_prompt(cfg, n, imgs, rng) for _ in range(args.max_batch)]
            r = time_decode(eng, prompts, make_pixels(cfg, imgs * args.max_batch, rng), spec.new, 2)
            res["static"] = r
            log(f"static Engine decode batch {args.max_batch}: {r['tok_per_s']:.0f} tok/s")
            del eng
        save_json(path, res)
    for name, fn in (("offline", lambda: section_offline(model, cfg, args, res, rng)),
                     ("long", lambda: section_long(model, cfg, args, res, rng)),
                     ("ttft", lambda: section_ttft(model, cfg, args, res, rng, spec)),
                     ("profile", lambda: section_profile(model, cfg, args, res, rng)),
                     ("peer", lambda: section_peer(model, cfg, args, res, rng))):
        if name in sections:
            with attempt(res, name):
                fn()
            gc.collect()
            save_json(path, res)
    if "static" in res and "offline" in res:
        res["offline_over_static"] = res["offline"]["tok_per_s"] / res["static"]["tok_per_s"]
        log(f"offline / static batch-{args.max_batch} decode: {res['offline_over_static']:.2f}")
    save_json(path, res)
    print_errors(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
