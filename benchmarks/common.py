"""What the benchmarks share: timing, recording an error and going on, logging and JSON output, GPU kernel tables
from a profiler trace, and the prompts they time (Gemma-3-4B's shapes, or a tiny config for CPU checks)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from collections import defaultdict

START = time.time()  # log lines show seconds since this module was imported (about process start)

# Grow device memory as used instead of taking most of it at start: some benchmarks run torch in the same process,
# and peak-memory figures then reflect what was used. Read when JAX starts its backend, so set before any device use.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemma3_jax.model.config import GLOBAL, SLIDING, Gemma3Config, TextConfig, VisionConfig  # noqa: E402
from gemma3_jax.model.pixels import PixelLevels  # noqa: E402
from gemma3_jax.model.presets import preset  # noqa: E402
from gemma3_jax.preprocessing.processor import Processor  # noqa: E402



# ---- timing -------------------------------------------------------------------------------------
def time_jax(fn, *args, iters=10, reps=7, warmup=3, min_rep_ms=None) -> float:
    """Median over ``reps`` of the mean time of ``iters`` back-to-back calls until the last output is ready (ms).

    ``iters=1, warmup=1``: the latency of one call until ready. ``min_rep_ms``: more calls per rep where one call
    is short, so each rep lasts at least that long (2K-token attention calls take ~0.07 ms: ten of them were
    noise-bound, +-15% between rounds)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if min_rep_ms:
        per_call = (time.perf_counter() - t0) / warmup * 1e3  # an overestimate (one sync per call)
        iters = max(iters, math.ceil(min_rep_ms / max(per_call, 1e-3)))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(ts)


def host_time(fn, *args, runs: int = 20) -> float:
    """Median time the host spends in ``fn(*args)`` before it returns (ms; the call itself is asynchronous, and
    its outputs are waited for outside the clock)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn(*args)
        times.append((time.perf_counter() - t) * 1e3)
        jax.block_until_ready(out)
    return statistics.median(times)


# ---- ceilings -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ceilings:
    """What the GPU does at best, measured in the run that uses it (floors are fractions of these)."""

    bandwidth: float  # bytes/s: the faster of a sum over a 2 GiB bf16 array (read) and an add to it (read + write)
    flops: float  # bf16 FLOP/s: an 8192^3 matmul
    measured: bool  # False: nominal values (a CPU run checks code paths, not speed)


def measure_ceilings() -> Ceilings:
    """The copy bandwidth and bf16 matmul rate of the default device; nominal H200 figures on a CPU."""
    if jax.default_backend() == "cpu":
        return Ceilings(4.3e12, 790e12, measured=False)
    import jax.numpy as jnp

    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    bump = jax.jit(lambda a: a + jnp.bfloat16(1))
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    # decode reads its weights: the read-only rate is its ceiling (the add read + wrote 3.2 TB/s on an H200 whose
    # copy engine moves 4.3)
    bandwidth = max(2 * x.nbytes / (time_jax(bump, x, iters=5) * 1e-3), x.nbytes / (time_jax(total, x, iters=5) * 1e-3))
    del x
    n = 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda u, v: u @ v)
    flops = 2 * n**3 / (time_jax(matmul, a, a, iters=10) * 1e-3)
    return Ceilings(bandwidth, flops, measured=True)


# ---- errors, logs, results ----------------------------------------------------------------------
@dataclasses.dataclass
class Attempt:
    error: str | None = None  # "ExceptionType: message" (first 200 characters) when the measurement failed


@contextlib.contextmanager
def attempt(res: dict, label: str):
    """One measurement: an exception is recorded under ``res["errors"]`` (with its traceback) and printed, and the
    run goes on. Yields an ``Attempt`` whose ``error`` is set when the block failed (to mark a result row)."""
    outcome = Attempt()
    try:
        yield outcome
    except Exception as e:  # noqa: BLE001 (one failing measurement is data too)
        outcome.error = f"{type(e).__name__}: {str(e)[:200]}"
        res.setdefault("errors", []).append(f"{label}: {traceback.format_exc()[-1500:]}")
        traceback.print_exc()


def print_errors(res: dict) -> None:
    """The last line of each error ``attempt`` recorded."""
    for e in res.get("errors", []):
        print("ERROR:", e.strip().splitlines()[-1])


def log(msg: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {msg}", flush=True)


def out_path(name: str, given: str | None = None, fallback_dir: str | None = None) -> str | None:
    """Where a benchmark writes its JSON: ``given`` (its --out), else ``$OUT/name`` (the device tool's folder),
    else ``fallback_dir/name``; None (no file) without a fallback."""
    if given:
        return given
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], name)
    return os.path.join(fallback_dir, name) if fallback_dir is not None else None


def save_json(path: str | None, obj) -> None:
    """Write the results so far (a run killed at its time limit still leaves its finished parts); None: nothing."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(obj, fh, indent=1, default=str)


# ---- GPU kernel time from a profiler trace ------------------------------------------------------
def trace_events(logdir: str) -> tuple[list[dict], dict[int, str], set[int]] | None:
    """(events, process name by pid, the GPU's pids) of the perfetto trace JAX wrote under ``logdir``; None without
    one."""
    files = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return None
    with gzip.open(files[0], "rt") as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pnames = {e["pid"]: e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, pnames, {pid for pid, n in pnames.items() if "GPU" in n or "gpu" in n}


def kernel_table(logdir: str, steps: int, top: int = 40) -> dict:
    """GPU kernel time per kernel name from the perfetto trace JAX wrote under ``logdir``."""
    found = trace_events(logdir)
    if found is None:
        return {"error": f"no perfetto trace under {logdir}: {glob.glob(os.path.join(logdir, '**'), recursive=True)[:20]}"}
    events, pnames, gpu = found
    per = defaultdict(lambda: [0.0, 0, set()])
    modules = defaultdict(lambda: [0.0, 0])  # XLA module (a compiled call) -> kernel time, launches
    first, last = float("inf"), 0.0
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            module = e.get("args", {}).get("hlo_module", "?")
            r = per[e["name"]]
            r[0] += e.get("dur", 0.0)
            r[1] += 1
            r[2].add(module)
            m = modules[module]
            m[0] += e.get("dur", 0.0)
            m[1] += 1
            first, last = min(first, e["ts"]), max(last, e["ts"] + e.get("dur", 0.0))
    total = sum(v[0] for v in per.values())
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    # span: first kernel start to last kernel end on the GPU (span - total = gaps between kernels)
    return dict(total_us_per_step=total / steps, span_us_per_step=(last - first) / steps if per else 0.0,
                launches_per_step=sum(v[1] for v in per.values()) / steps, processes=sorted(set(pnames.values()))[:10],
                modules={m: dict(us_per_step=v[0] / steps, calls_per_step=v[1] / steps) for m, v in modules.items()},
                top=[dict(name=n[:120], us_per_step=v[0] / steps, calls_per_step=v[1] / steps,
                          modules=sorted(v[2])[:4]) for n, v in rows])


def host_table(logdir: str, top: int = 30) -> list[dict]:
    """Host-side time per event name (threads of the CPU: JAX's dispatch, XLA's thunks and command buffer updates,
    CUDA API calls) from the perfetto trace under ``logdir``, the longest first."""
    found = trace_events(logdir)
    if found is None:
        return []
    events, _, gpu = found
    per = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu:
            r = per[e["name"]]
            r[0] += e.get("dur", 0.0)
            r[1] += 1
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return [dict(name=n[:120], us=round(v[0], 1), calls=v[1]) for n, v in rows]


def timeline(logdir: str, anchor: str | None = None, min_us: float = 100.0, host_rows: int = 60) -> list[dict]:
    """In time order, ms after the first event named ``anchor`` (e.g. a ``jax.profiler.TraceAnnotation``; else the
    trace's first event): the GPU's first kernel, every start of another XLA module on it and every idle gap of at
    least ``min_us`` between its kernels, and the first ``host_rows`` of the host's events of at least that, so it
    shows what the GPU waited for."""
    found = trace_events(logdir)
    if found is None:
        return []
    events, _, gpu = found
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        return []
    named = [e["ts"] for e in spans if e["name"] == anchor]
    origin = min(named) if named else min(e["ts"] for e in spans)
    row = lambda ts, dur, what, name, tid=None: dict(at_ms=round((ts - origin) / 1e3, 3), ms=round(dur / 1e3, 3),
                                                     what=what, name=name[:100], tid=tid)
    kernels = sorted((e for e in spans if e.get("pid") in gpu and e["ts"] >= origin), key=lambda e: e["ts"])
    rows = []
    end, module = None, None
    for e in kernels:
        mod = e.get("args", {}).get("hlo_module")
        if end is not None and e["ts"] - end >= min_us:
            rows.append(row(end, e["ts"] - end, "gpu idle", "until " + e["name"]))
        if end is None or mod != module:
            rows.append(row(e["ts"], 0.0, "gpu", f"{mod or '?'} starts: {e['name']}"))
            module = mod
        end = e["ts"] + e.get("dur", 0.0) if end is None else max(end, e["ts"] + e.get("dur", 0.0))
    if end is not None:
        rows.append(row(end, 0.0, "gpu", "last kernel ends"))
    host = sorted((e for e in spans if e.get("pid") not in gpu and e["ts"] >= origin and e.get("dur", 0.0) >= min_us),
                  key=lambda e: e["ts"])[:host_rows]
    rows += [row(e["ts"], e.get("dur", 0.0), "host", e["name"], e.get("tid")) for e in host]
    return sorted(rows, key=lambda r: r["at_ms"])


def traced(fn, args, steps: int, top: int = 40) -> dict:
    """Kernel table of one call of ``fn(*args)`` (after a warm-up call), per step (``steps`` steps a call)."""
    with tempfile.TemporaryDirectory() as logdir:
        jax.block_until_ready(fn(*args))
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        return kernel_table(logdir, steps, top)


# ---- prompts ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """The model config and the prompts a run times."""

    cfg: Gemma3Config
    short: tuple[int, int]  # (tokens, images) of the 1-image prompt
    multi: tuple[int, int]
    mid: tuple[int, int]  # ~8K tokens, 16 images
    long: tuple[int, int]
    new: int  # new tokens after the short prompt
    long_new: int
    batches: tuple[int, ...]
    peer_batches: tuple[int, ...]


def small_config() -> Gemma3Config:
    """A tiny multimodal config (7 layers, one global): every code path in seconds on a CPU."""
    layers = 7
    text = TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
                      num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                      layer_types=tuple(SLIDING if (i + 1) % 6 else GLOBAL for i in range(layers)),
                      max_position_embeddings=2048)
    vision = VisionConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, image_size=28, patch_size=7)
    return Gemma3Config(text, vision, mm_tokens_per_image=4, image_token_id=500, boi_token_id=498, eoi_token_id=499)


def spec_of(small: bool) -> Spec:
    """Gemma-3-4B with the 1-image (323 tokens), 8-image, 8K and ~32K prompts; ``small``: the tiny config."""
    if small:
        return Spec(small_config(), (15, 1), (81, 8), (240, 16), (480, 16), new=24, long_new=16,
                    batches=(1, 8, 32),
                    peer_batches=(1, 8))
    return Spec(preset("gemma3_4b"), (323, 1), (2353, 8), (8192, 16), (32640, 16), new=256, long_new=128,
                batches=(1, 8, 32),
                peer_batches=(1, 8))


def round_up(n: int, m: int = 128) -> int:
    return -(-n // m) * m


def make_prompt(cfg: Gemma3Config, n_tokens: int, n_images: int, rng) -> list[int]:
    """bos, then text chunks with images (boi, T image tokens, eoi) spread evenly between them."""
    per_image = cfg.mm_tokens_per_image + 2
    n_text = n_tokens - 1 - n_images * per_image
    assert n_text >= 0, (n_tokens, n_images)
    hi = min(cfg.text.vocab_size, cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id)
    text = rng.integers(10, hi, n_text).tolist()
    cuts = np.linspace(0, n_text, n_images + 2).astype(int)
    out = [cfg.text.bos_token_id]
    for i in range(n_images + 1):
        out += text[cuts[i]:cuts[i + 1]]
        if i < n_images:
            out += [cfg.boi_token_id] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [cfg.eoi_token_id]
    assert len(out) == n_tokens
    return out


def make_levels(cfg: Gemma3Config, n: int, rng) -> PixelLevels | None:
    """``n`` random images as uint8 levels with Gemma-3's processor table (how Service and the server send them)."""
    if n == 0:
        return None
    v = cfg.vision
    return PixelLevels(rng.integers(0, 256, (n, v.num_channels, v.image_size, v.image_size), dtype=np.uint8),
                       Processor().pixel_table)


def make_pixels(cfg: Gemma3Config, n: int, rng) -> np.ndarray | None:
    """``n`` random images in [-1, 1] (what the processor hands the model), float32; None for none."""
    if n == 0:
        return None
    v = cfg.vision
    return rng.uniform(-1, 1, (n, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
