"""Where the time of a prefill and a decode step goes (Gemma-3-4B shapes, random bf16 weights, GPU).

Sections (``--only``):
- ``gemv``: the decode matmuls alone (34 layers of q/k/v/o/gate/up/down + the tied lm_head, no attention),
  64 steps in one ``fori_loop``, batch 1: separate vs fused projections (q|k|v and gate|up as one matrix),
  [in, out] vs [out, in] weight layout, XLA's default options vs ``xla_gpu_enable_triton_gemm=false``.
  Bytes = every weight read once per step.
- ``decode``: the Engine's decode chunk at batch 1 (after the 1-image prompt) and at batch 32 over an 8K
  cache (filled with random keys/values, no prefill), each with one choice of kernels (``--decode-modes``,
  ``decode_kernels``): the fused Pallas step (the model's path on a GPU), the Pallas decode attention kernel
  after XLA's norms/RoPE/cache writes, XLA's attention over the cache, no attention (the step without it: an
  ablation), or every decode op as the reference; compiler options as above. Also a perfetto trace of one
  chunk: kernel time by kernel name.
- ``prefill``: the 1-image prompt through the Engine, the vision tower alone, the text forward alone at
  323 tokens padded to 384 and to 512, and SigLIP's attention alone (our kernel at D=72, padded to 128)
  next to cuDNN.

    python -m benchmarks.profile_generate [--only gemv,decode,prefill] [--small]

Writes ``profile_generate.json`` under $OUT when set.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.attention import parse_config
from benchmarks.common import attempt, measure_ceilings, host_time, log, make_pixels, make_prompt, out_path, print_errors
from benchmarks.common import round_up, save_json, spec_of, time_jax, traced
from benchmarks.random_init import random_model
from gemma3_jax.model.quant import quantize_model
from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.kernels import Kernels, with_kernels
from gemma3_jax.runtime.engine import Engine, default_compiler_options
from gemma3_jax.runtime.sampling import SamplingParams
from pallas_kernels.common import interpret_mode
from pallas_kernels.reference import decode_attention_reference

NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}
OPTIONS = {  # XLA compiler options tried on the prefill parts
    "default": None,
    "no_triton_gemm": NO_TRITON_GEMM,
    "command_buffers_off": {"xla_gpu_enable_command_buffer": ""},
    "graph_min_size_1": {"xla_gpu_graph_min_graph_size": 1},
    "command_buffers_all": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
                            "xla_gpu_graph_min_graph_size": 1},
    "cublaslt": {**NO_TRITON_GEMM, "xla_gpu_enable_cublaslt": True},  # bias/GELU as GEMM epilogues
}
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}
DECODE_OPTIONS = {  # tried on the decode chunk; each is added to the library's decode defaults, which run the
    # while loop as one CUDA graph (engine.DECODE_COMMAND_BUFFERS)
    "default": None,
    "no_command_buffers": NO_COMMAND_BUFFERS,  # the decode default before 2026-11-24 10:40: host reads cond per step
    "fixed_trip": NO_COMMAND_BUFFERS,  # no early stop: a known trip count, so the host need not read the condition
    "fixed_trip_cmdbuf": None,
}
RESULTS: dict = {}


def save() -> None:
    save_json(out_path("profile_generate.json"), RESULTS)


def fusion_bodies(compiled, names, lines: int = 14) -> dict:
    """The optimized-HLO fusion instruction and the first lines of the computation it calls, per kernel name
    from a trace (loop_reduce_fusion_33 -> %loop_reduce_fusion.33): what a small kernel actually computes."""
    import re

    text = compiled.as_text()
    out = {}
    for name in names:
        hlo = re.sub(r"_(\d+)$", r".\1", name)
        m = re.search(rf"^\s*(ROOT )?%?{re.escape(hlo)} = .*$", text, re.M)
        if not m:
            continue
        inst = m.group(0).strip()
        body = []
        c = re.search(r"calls=%?([\w.\-]+)", inst)
        if c:
            b = re.search(rf"^%?{re.escape(c.group(1))} .*?\{{\n(.*?)^\}}", text, re.M | re.S)
            body = b.group(1).strip().splitlines()[:lines] if b else []
        out[name] = [inst[:400], *[ln.strip()[:240] for ln in body]]
    return out


# ---- launch cost of a kernel --------------------------------------------------------------------
def launch_section(cfg, small: bool) -> None:
    """64 dependent tiny kernels in one jitted call: Pallas (residual_norm) vs the same ops fused by XLA.
    Host time per call, one call until ready, and back to back: what a kernel launch costs on each path."""
    from pallas_kernels.reference import residual_norm_reference
    from pallas_kernels.residual_norm import residual_norm

    d = cfg.text.hidden_size
    key = jax.random.key(5)
    x, delta = (jax.random.normal(jax.random.fold_in(key, i), (1, d), jnp.bfloat16) for i in range(2))
    w = jax.random.normal(key, (d,), jnp.bfloat16) * 0.1
    interpret = interpret_mode()

    def chain(step):
        def f(x, delta):
            for _ in range(64):
                x, delta = step(x, delta)
            return x
        return jax.jit(f).lower(x, delta).compile()

    impls = {"pallas residual_norm": lambda a, b: residual_norm(a, b, w, w, eps=1e-6, interpret=interpret),
             "xla residual+norm": lambda a, b: residual_norm_reference(a, b, w, w, eps=1e-6)}
    for label, step in impls.items():
        with attempt(RESULTS, f"launch {label}"):
            c = chain(step)
            r = dict(host_ms=host_time(c, x, delta), one_call_ms=time_jax(c, x, delta, iters=1, reps=10, warmup=1),
                     back_to_back_ms=time_jax(c, x, delta, iters=10, reps=5),
                     xla_flags=os.environ.get("XLA_FLAGS", ""))
            RESULTS.setdefault("launch", {})[label] = r
            log(f"launch x64 {label}: host {r['host_ms']:.3f} ms/call, one call {r['one_call_ms']:.3f} ms, "
                f"back to back {r['back_to_back_ms']:.3f} ms (XLA_FLAGS={r['xla_flags']!r})")
    save()


# ---- matmuls of a decode step -------------------------------------------------------------------
def gemv_section(cfg, small: bool) -> None:
    t = cfg.text
    d, f, qd, kd = t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    steps = 8 if small else 64
    key = jax.random.key(0)
    draw = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.bfloat16) * 0.02, static_argnums=1)

    def weights(fused: bool, transposed: bool):
        shapes = ([(d, qd + 2 * kd)] if fused else [(d, qd), (d, kd), (d, kd)]) + [(qd, d)]
        shapes += [(d, 2 * f)] if fused else [(d, f), (d, f)]
        shapes += [(f, d)]
        shapes = [s[::-1] if transposed else s for s in shapes]
        layers = [[draw(jax.random.fold_in(key, 100 * i + j), s) for j, s in enumerate(shapes)]
                  for i in range(t.num_layers)]
        lm = draw(jax.random.fold_in(key, 99), (t.vocab_size, d))
        return layers, lm

    def mm(x, w, transposed):
        return jnp.einsum("bi,oi->bo", x, w) if transposed else x @ w

    def make(fused: bool, transposed: bool):
        def step(x, layers, lm):
            for ws in layers:
                if fused:
                    qkv = mm(x, ws[0], transposed)
                    q, kv = qkv[:, :qd], qkv[:, qd:]
                    o, gu, down = ws[1], ws[2], ws[3]
                    g_u = mm(x, gu, transposed)
                    g, u = g_u[:, :f], g_u[:, f:]
                else:
                    q = mm(x, ws[0], transposed)
                    kv = mm(x, ws[1], transposed) + mm(x, ws[2], transposed)
                    o, down = ws[3], ws[6]
                    g, u = mm(x, ws[4], transposed), mm(x, ws[5], transposed)
                x = x + mm(q, o, transposed) + 1e-3 * jnp.sum(kv, axis=1, keepdims=True).astype(x.dtype)
                x = x + mm(jax.nn.gelu(g) * u, down, transposed)
            logits = jnp.einsum("bd,vd->bv", x, lm, preferred_element_type=jnp.float32)
            return x + 1e-3 * logits[:, :d].astype(x.dtype)

        def run(x, layers, lm):
            return jax.lax.fori_loop(0, steps, lambda i, x: step(x, layers, lm), x)

        return run

    nbytes = None
    for fused in (False, True):
        for transposed in (False, True):
            layers, lm = weights(fused, transposed)
            nbytes = sum(w.size * 2 for ws in layers for w in ws) + lm.size * 2
            x = jax.random.normal(key, (1, d), jnp.bfloat16)
            for name, opts in (("default", None), ("no_triton_gemm", NO_TRITON_GEMM)):
                label = f"{'fused' if fused else 'separate'} {'[out,in]' if transposed else '[in,out]'} {name}"
                with attempt(RESULTS, f"gemv {label}"):
                    c = jax.jit(make(fused, transposed)).lower(x, layers, lm).compile(opts)
                    s = time_jax(c, x, layers, lm, iters=1, reps=5, warmup=1) / 1e3 / steps
                    RESULTS.setdefault("gemv", {})[label] = dict(step_ms=s * 1e3, tb_per_s=nbytes / s / 1e12)
                    log(f"gemv {label}: {s * 1e3:.3f} ms/step, {nbytes / s / 1e12:.2f} TB/s")
                save()
            del layers, lm
    RESULTS["gemv_bytes"] = nbytes
    ceil = measure_ceilings()
    RESULTS["ceilings"] = dataclasses.asdict(ceil)
    log(f"gemv floor at {ceil.bandwidth / 1e12:.2f} TB/s: {nbytes / ceil.bandwidth * 1e3:.3f} ms/step")


# ---- a decode step ------------------------------------------------------------------------------
def random_cache(cfg, batch: int, cache_length: int, held: int, dtype):
    """A cache with ``held`` random positions per row (what a prefill of ``held`` tokens leaves)."""
    t = cfg.text
    ks, vs = [], []
    key = jax.random.key(1)
    for i in range(t.num_layers):
        shape = (batch, kvc.layer_slots(t, i, cache_length), t.num_kv_heads, t.head_dim)
        ks.append(jax.random.normal(jax.random.fold_in(key, 2 * i), shape, dtype))
        vs.append(jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape, dtype))
    return kvc.KVCache(tuple(ks), tuple(vs), jnp.full((batch,), held, jnp.int32))


@dataclasses.dataclass(frozen=True)
class CacheAttentionAblation(Kernels):
    """Kernels whose attention over the KV cache is replaced, all else as ``Kernels`` (profiling only):
    ``cache_attention`` "xla" = the reference (XLA's einsums) between the Pallas decode kernels, "none" = no
    attention at all (the query is passed on: the step without it)."""

    cache_attention: str = "xla"

    def cached_attention(self, q, k_buf, v_buf, pos, *, scale):
        if self.cache_attention == "none":
            return q
        lengths = jnp.minimum(pos + 1, k_buf.shape[1])
        return decode_attention_reference(q, k_buf, v_buf, lengths, scale=scale)


def decode_kernels(mode: str) -> Kernels:
    """The kernels of one decode mode (``DECODE_MODES``):

    - "fused": the model's path on a GPU: q/k norms, RoPE, cache write and attention in one Pallas kernel;
    - "pallas": XLA's norms, RoPE and cache writes, then the Pallas decode attention kernel;
    - "xla": as "pallas" with XLA's attention over the cache (the other decode kernels stay Pallas);
    - "none": as "pallas" with no attention over the cache (an ablation: the step without it);
    - "reference": every decode op as the reference (XLA), the attention included."""
    base = Kernels.resolve("pallas")
    if mode == "fused":
        return base
    if mode == "pallas":
        return dataclasses.replace(base, fuse_decode=False)
    if mode == "reference":
        return dataclasses.replace(base, decode="reference")
    if mode in ("xla", "none"):
        return CacheAttentionAblation(**{**dataclasses.asdict(base), "fuse_decode": False}, cache_attention=mode)
    raise ValueError(f"unknown decode mode {mode!r}; choose from {DECODE_MODES + ('reference',)}")


def log_kernels(k: dict, n: int = 30) -> None:
    if "top" not in k:
        log(f"  kernels: {k}")
        return
    log(f"  kernels: {k['total_us_per_step']:.0f} us/step in total, first start to last end "
        f"{k.get('span_us_per_step', 0):.0f} us, {k.get('launches_per_step', 0):.0f} launches; top:")
    for row in k["top"][:n]:
        log(f"    {row['us_per_step']:8.1f} us x{row['calls_per_step']:.0f}  {row['name']}")


DECODE_MODES = ("fused", "pallas", "xla", "none")  # the default --decode-modes ("reference" on request)


def decode_section(cfg, small: bool, model, modes=DECODE_MODES, options=("default",), only=None) -> None:
    spec = spec_of(small)
    rng = np.random.default_rng(0)
    chunk = 32
    cases = [("b1_short", 1, round_up(spec.short[0] + spec.new), spec.short[0]),
             ("b8_short", 8, round_up(spec.short[0] + spec.new), spec.short[0]),
             ("b32_8k", 32, round_up(8192 + 2 * chunk) if not small else 512, 8192 if not small else 400)]
    cases = [c for c in cases if only is None or c[0] in only]
    for name, batch, cache_length, held in cases:
        cache0 = random_cache(cfg, batch, cache_length, held, model.dtype)
        token = jnp.asarray(rng.integers(10, 1000, batch), jnp.int32)
        done = jnp.zeros((batch,), bool)
        remaining = jnp.full((batch,), 10**6, jnp.int32)
        stops = jnp.full((8,), -1, jnp.int32)
        for opts_name in options:
            for mode in modes:
                label = f"{name} {mode} {opts_name}"
                with attempt(RESULTS, f"decode {label}"):
                    eng = Engine(with_kernels(model, decode_kernels(mode)), cache_length=cache_length, chunk=chunk)
                    fixed = opts_name.startswith("fixed_trip")
                    opts = {**default_compiler_options("decode", eng.platform), **(DECODE_OPTIONS[opts_name] or {})}
                    fn = jax.jit(eng.decode_fn(SamplingParams(), fixed_steps=fixed))
                    args = (eng.weights, cache0, token, done, remaining, jax.random.key(0), stops, jnp.int32(chunk))
                    t = time.perf_counter()
                    c = fn.lower(*args).compile(opts)
                    compile_s = time.perf_counter() - t
                    s = time_jax(c, *args, iters=1, reps=5, warmup=1) / 1e3 / chunk
                    r = dict(step_ms=s * 1e3, tok_per_s=batch / s, compile_s=compile_s, cache_gib=cache0.nbytes / 2**30)
                    if mode in ("fused", "pallas"):
                        r["kernels"] = traced(c, args, chunk)
                        small_ones = [k["name"] for k in r["kernels"].get("top", [])[:14] if k["us_per_step"] < 120]
                        r["fusions"] = fusion_bodies(c, small_ones)
                        r["host_ms_per_call"] = host_time(c, *args)
                    RESULTS.setdefault("decode", {})[label] = r
                    log(f"decode {label}: {s * 1e3:.3f} ms/step, {batch / s:.0f} tok/s (compile {compile_s:.1f} s)")
                    if "kernels" in r:
                        log_kernels(r["kernels"])
                        log(f"  host time per call (dispatch of {chunk} steps): {r['host_ms_per_call']:.2f} ms")
                        for fusion, body in r["fusions"].items():  # not ``name``: the case's, used next mode
                            log(f"  {fusion}:\n      " + "\n      ".join(body))
                save()
        del cache0


# ---- prefill ------------------------------------------------------------------------------------
def prefill_section(cfg, small: bool, model, prefill_options=("default",), vision_sweep=True) -> None:
    spec = spec_of(small)
    rng = np.random.default_rng(0)
    n, imgs = spec.short
    prompt = make_prompt(cfg, n, imgs, rng)
    px = make_pixels(cfg, imgs, rng)
    for opts_name in ("library defaults", *prefill_options):
        opts = None if opts_name == "library defaults" else (OPTIONS[opts_name] or {})
        with attempt(RESULTS, f"prefill engine {opts_name}"):
            eng = Engine(model, cache_length=round_up(n + spec.new), compiler_options=opts)
            eng.prefill([prompt], px)  # compile
            s = time_jax(lambda: eng.prefill([prompt], px), iters=1, reps=5, warmup=1) / 1e3
            r = RESULTS.setdefault("prefill", {})[f"engine short {opts_name}"] = dict(ms=s * 1e3)
            log(f"prefill engine {n} tok {imgs} img ({opts_name}): {s * 1e3:.2f} ms")
            if opts_name == "library defaults":  # host time of each compiled call vs a call that does nothing
                for call in eng.prefill_calls([prompt], px):  # the vision call, then the text call ("prefill")
                    args, n_arrays = call.args, call.weight_arrays
                    null = jax.jit(lambda ws, *rest: ws[0].ravel()[0]).lower(*args).compile()
                    r[call.name] = dict(host_ms=host_time(call.fn, *args), null_host_ms=host_time(null, *args),
                                        null_ms=time_jax(null, *args, iters=1, reps=10, warmup=1),
                                        n_weight_arrays=n_arrays)
                    log(f"  {call.name} call: host time {r[call.name]['host_ms']:.2f} ms; a do-nothing call with the "
                        f"same {n_arrays} weight arrays: host {r[call.name]['null_host_ms']:.2f} ms, until ready "
                        f"{r[call.name]['null_ms']:.2f} ms")
        save()
    graphdef, state = nnx.split(model)

    def vision(state, px):
        return nnx.merge(graphdef, state).image_features(px)

    def text(state, ids):
        m = nnx.merge(graphdef, state)
        hidden, kvs = m.forward(ids)
        return hidden[:, -1], kvs

    pxj = jnp.asarray(px, model.dtype)
    parts = [("vision tower + projector, 1 image", vision, (state, pxj))]
    for length in (n, 384, 512) if not small else (n, 32):
        ids = jnp.asarray(rng.integers(10, 1000, (1, length)), jnp.int32)
        parts.append((f"text forward {length} tok", text, (state, ids)))
    for opts_name in prefill_options:
        opts = OPTIONS[opts_name]
        for label, fn, args in parts if opts_name == "default" else [p for p in parts if "384" in p[0] or "vision" in p[0]]:
            with attempt(RESULTS, f"prefill {label}"):
                c = jax.jit(fn).lower(*args).compile(opts)
                s = time_jax(c, *args, iters=1, reps=5, warmup=1) / 1e3
                r = RESULTS.setdefault("prefill", {})[f"{label} {opts_name}"] = dict(ms=s * 1e3)
                r["back_to_back_ms"] = time_jax(c, *args, iters=5, reps=5)
                log(f"prefill part {label} ({opts_name}): {s * 1e3:.2f} ms one call, "
                    f"{r['back_to_back_ms']:.2f} ms back to back")
                if opts_name == "default" and ("384" in label or "vision" in label):
                    r["kernels"] = traced(c, args, 1)
                    log_kernels(r["kernels"], 8)
                    small_kernels = [k["name"] for k in r["kernels"]["top"]
                                     if "fusion" in k["name"] or "wrapped" in k["name"]][:16]
                    r["fusions"] = fusion_bodies(c, small_kernels, lines=30)
                if "384" in label and opts is None:  # jax.jit's C++ dispatch instead of the Compiled object's
                    f = jax.jit(fn)
                    r["jit_ms"] = time_jax(f, *args, iters=1, reps=5, warmup=1)
                    log(f"  same through jax.jit: {r['jit_ms']:.2f} ms one call")
            save()
    if not vision_sweep:
        return
    # SigLIP attention alone: 16 heads, D=72, 4096 patches, bidirectional.
    v = cfg.vision
    from pallas_kernels import image_span_attention

    s_len, heads, hd = v.patches_per_side**2, v.num_heads, v.hidden_size // v.num_heads
    key = jax.random.key(3)
    q, k, vv = (jax.random.normal(jax.random.fold_in(key, i), (1, s_len, heads, hd), model.dtype) for i in range(3))
    flop = 4 * s_len * s_len * heads * hd
    interpret = interpret_mode()

    def ours(**kw):
        return jax.jit(lambda q, k, v: image_span_attention(q, k, v, causal=False, interpret=interpret, **kw))

    def padded128(q, k, v):  # the layout before column chunks: D=72 zero-padded to 128
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 128 - hd)))  # noqa: E731
        return image_span_attention(pad(q), pad(k), pad(v), causal=False, scale=hd**-0.5, interpret=interpret)

    impls = [("ours", ours()), ("ours padded to 128", jax.jit(padded128))]
    for cfg_txt in ("128x128w4s2", "128x64w4s3", "128x64w4s2", "64x64w4s3", "64x128w4s2", "128x32w4s3",
                    "64x32w4s3", "128x64w8s2"):
        tiles = parse_config(cfg_txt)
        del tiles["fast_exp2"]  # the tuning table's choice, as the model runs
        impls.append((f"ours {cfg_txt}", ours(**tiles)))
    if jax.default_backend() == "gpu":
        impls.append(("cudnn", jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))))
        impls.append(("xla", jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))))
    for label, fn in impls:
        with attempt(RESULTS, f"vision attention {label}"):
            s = time_jax(fn, q, k, vv, iters=20, reps=5) / 1e3
            if label != "ours padded to 128":
                ref = jax.nn.dot_product_attention(q[:, :512].astype(jnp.float32), k.astype(jnp.float32),
                                                   vv.astype(jnp.float32))
                got = fn(q, k, vv)[:, :512].astype(jnp.float32)
                err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
                if not err < 2e-2:
                    raise AssertionError(f"vision attention {label}: relative error {err:.2e} vs float32")
            RESULTS.setdefault("vision_attention", {})[label] = dict(ms=s * 1e3, tflops=flop / s / 1e12)
            log(f"vision attention {label}: {s * 1e3:.3f} ms per layer, {flop / s / 1e12:.0f} TFLOP/s (D={hd})")
    save()


def decode_kernel_section(cfg, small: bool) -> None:
    """The decode kernel alone at the batch-32 / 8K cache shapes of one global and one ring layer: a sweep."""
    from pallas_kernels.decode_attention import decode_attention

    t = cfg.text
    b, held = (32, 8192) if not small else (4, 300)
    key = jax.random.key(5)
    interpret = interpret_mode()
    for name, slots in (("global", held + 64), ("ring", min(t.sliding_window, held))):
        k, v = (jax.random.normal(jax.random.fold_in(key, i), (b, slots, t.num_kv_heads, t.head_dim), jnp.bfloat16)
                for i in range(2))
        q = jax.random.normal(jax.random.fold_in(key, 2), (b, t.num_heads, t.head_dim), jnp.bfloat16)
        lengths = jnp.full((b,), min(held + 1, slots), jnp.int32)
        nbytes = 2 * b * int(lengths[0]) * t.num_kv_heads * t.head_dim * 2
        for bk, splits, warps, stages in ((None, None, None, None), (32, None, 4, 2), (64, 8, 4, 2), (64, 16, 4, 2),
                                          (32, 16, 4, 3), (64, None, 8, 2), (32, 32, 4, 2), (128, 16, 8, 2),
                                          (64, 32, 4, 3)):
            label = f"{name} bk{bk} splits{splits} w{warps} s{stages}"
            with attempt(RESULTS, f"decode kernel {label}"):
                fn = jax.jit(lambda q, k, v, n, bk=bk, splits=splits, warps=warps, stages=stages: decode_attention(
                    q, k, v, n, scale=0.0625, interpret=interpret, block_k=bk, num_splits=splits, num_warps=warps,
                    num_stages=stages))
                sec = time_jax(fn, q, k, v, lengths, iters=20, reps=5) / 1e3
                RESULTS.setdefault("decode_kernel", {})[label] = dict(us=sec * 1e6, tb_per_s=nbytes / sec / 1e12)
                log(f"decode kernel {label}: {sec * 1e6:.1f} us, {nbytes / sec / 1e12:.2f} TB/s of K/V")
        save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="gemv,decode,prefill")
    ap.add_argument("--small", action="store_true",
                    help="tiny config (CPU check of every code path; there the fused and pallas decode modes run the "
                         "interpreted kernels: --decode-cases b1_short keeps it to minutes)")
    ap.add_argument("--prefill-options", default="default", help=f"comma list of {list(OPTIONS)}")
    ap.add_argument("--no-vision-sweep", action="store_true")
    ap.add_argument("--decode-modes", default=",".join(DECODE_MODES), help="comma list of decode modes")
    ap.add_argument("--decode-options", default="default", help=f"comma list of {list(DECODE_OPTIONS)}")
    ap.add_argument("--decode-cases", default=None, help="comma list of b1_short,b8_short,b32_8k (default all)")
    ap.add_argument("--quantize", default=None, help="decode, prefill: the text weights quantized (int8, fp8, int4)")
    args = ap.parse_args()
    sections = [s for s in args.only.split(",") if s]
    spec = spec_of(args.small)
    RESULTS.update(jax=jax.__version__, device=str(jax.devices()[0]), sections=sections)
    log(f"jax {jax.__version__} on {jax.devices()[0]}")
    if "decode_kernel" in sections:
        decode_kernel_section(spec.cfg, args.small)
    if "launch" in sections:
        launch_section(spec.cfg, args.small)
    if "gemv" in sections:
        gemv_section(spec.cfg, args.small)
    if {"decode", "prefill"} & set(sections):
        model = random_model(spec.cfg, jnp.bfloat16)
        if args.quantize:
            model = quantize_model(model, args.quantize)
            RESULTS["quantize"] = args.quantize
        if "decode" in sections:
            decode_section(spec.cfg, args.small, model, args.decode_modes.split(","), args.decode_options.split(","),
                           args.decode_cases.split(",") if args.decode_cases else None)
        if "prefill" in sections:
            prefill_section(spec.cfg, args.small, model, args.prefill_options.split(","), not args.no_vision_sweep)
    print_errors(RESULTS)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
