"""End-to-end generation benchmark: our Engine (Gemma-3-4B shapes, random bf16 weights) vs transformers.

Ours: prefill latency (1 image + 64 text = 323 tokens, 8 images = 2353 tokens, 8192 tokens with 16 images,
a ~32K prompt of text and 16 images), decode tokens/s after a 1-image prompt at batch 1/8/32 (256 new tokens) and at batch 1 after the
32K prompt (128 new tokens), compile times (Engine Timings.compile_s), the start of a second process with
JAX's persistent compilation cache (process start -> first token), peak device memory.
Peer: transformers Gemma3ForConditionalGeneration, same config, bf16, sdpa, random init on the device (with
``--quantize int8|fp8`` its text Linear layers quantized by torchao's weight-only int8 / float8 configs);
prefill latency (forward with a cache, logits_to_keep=1) and decode tok/s with generate(cache_implementation=
"static") at batch 1 and 8 (transformers' own auto-compile of the decode step is on unless --peer-compile off).

Timing: prefill = median over runs after a warm-up of the compiled call until every output is ready (ours:
Timings.prefill_s + the wait for the cache; peer: CUDA events), and for ours also the wall time of the whole
Engine.prefill call (input checks, padding and the host-to-device copies included); decode = the decode loop only (ours:
Timings.decode_s, i.e. the decode chunks and their host copies; peer: from the first logits-processor call,
after the prefill, synchronized, to the end of generate). Floors (METHOD.md): decode step = max(bytes read
(text weights incl. the tied lm_head + the KV cache held at mid-generation) / bandwidth, FLOP / matmul rate);
prefill = max(FLOP (2*params*tokens for text layers and vision tower, + attention pairs) / matmul rate,
weight bytes / bandwidth), counted on the real prompt tokens (not our padded bucket). The bandwidth and the bf16
matmul rate are measured at the start of the same run (``common.measure_ceilings``).

    python -m benchmarks.generate [--small] [--only prefill,decode,long,compile,peer] [--out PATH]

Writes --out, else $OUT/bench_generate.json (kept as docs/bench_generate_<gpu>.json), else no file.
"""

from __future__ import annotations

import time

T_PROC0 = time.time()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import Ceilings, Spec, attempt, log, make_pixels, make_prompt  # noqa: E402
from benchmarks.common import measure_ceilings, out_path, print_errors, round_up, save_json, spec_of  # noqa: E402
from benchmarks.random_init import random_model  # noqa: E402
from gemma3_jax.model.config import GLOBAL, SLIDING, Gemma3Config  # noqa: E402
from gemma3_jax.model.quant import bytes_per_weight, quantize_model, weight_bytes  # noqa: E402
from gemma3_jax.runtime.engine import Engine, Timings, bucket_length  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository root: where ``python -m benchmarks.generate`` runs
SECTIONS = ("prefill", "decode", "long", "compile", "peer")
OUT_PATH: str | None = None  # the JSON, written after every measurement (main sets it)


# ---- floors -------------------------------------------------------------------------------------
def counts(cfg: Gemma3Config) -> dict:
    t, v = cfg.text, cfg.vision
    d, f = t.hidden_size, t.intermediate_size
    layer = d * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + t.num_heads * t.head_dim * d + 3 * d * f + 6 * d
    e = v.hidden_size
    vlayer = 4 * e * e + 4 * e + 2 * e * v.intermediate_size + v.intermediate_size + e + 4 * e
    return dict(text_layers=layer * t.num_layers + d, embed=t.vocab_size * d,
                vision=vlayer * v.num_layers + v.num_channels * v.patch_size**2 * e + 2 * e
                + v.patches_per_side**2 * e, projector=e * d + e)


def prefill_floor(cfg: Gemma3Config, n_tokens: int, n_images: int, ceil: Ceilings) -> dict:
    c, t, v = counts(cfg), cfg.text, cfg.vision
    flop = 2 * c["text_layers"] * n_tokens + 2 * c["embed"]  # layers over every token, lm_head on the last
    for i in range(t.num_layers):
        w = t.sliding_window if t.is_sliding(i) else n_tokens
        pairs = sum(min(p + 1, w) for p in range(0, n_tokens, 64)) * 64 if n_tokens > 4096 else \
            sum(min(p + 1, w) for p in range(n_tokens))
        flop += 4 * t.num_heads * t.head_dim * pairs
    patches = v.patches_per_side**2
    flop += n_images * (2 * c["vision"] * patches + 4 * v.hidden_size * patches**2 * v.num_layers
                        + 2 * c["projector"] * cfg.mm_tokens_per_image)
    weight_bytes = 2 * sum(c.values())
    s = max(flop / ceil.flops, weight_bytes / ceil.bandwidth)
    return dict(flop=flop, floor_s=s)


def decode_floor(cfg: Gemma3Config, batch: int, context: int, ceil: Ceilings, weight_size: float = 2) -> dict:
    """One step at ``context`` held positions per row: text weights (``weight_size`` bytes each, scales included:
    2 for bf16, ``quant.bytes_per_weight`` quantized) + tied lm_head + KV read once."""
    c, t = counts(cfg), cfg.text
    weights = round(weight_size * (c["text_layers"] + c["embed"]))
    kv = sum(batch * min(context, t.sliding_window if t.is_sliding(i) else context) * t.num_kv_heads * t.head_dim * 4
             for i in range(t.num_layers))
    flop = 2 * (c["text_layers"] + c["embed"]) * batch + kv  # ~2 FLOP per KV element read (q.k, p.v)
    step = max((weights + kv) / ceil.bandwidth, flop / ceil.flops)
    return dict(weight_bytes=weights, kv_bytes=kv, floor_step_s=step, floor_tok_per_s=batch / step)


# ---- ours ---------------------------------------------------------------------------------------
def peak_mem() -> int | None:
    try:
        return int((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"))
    except Exception:  # CPU: no memory stats
        return None


def time_prefill(engine: Engine, prompt, px, runs: int) -> dict:
    first = Timings()
    t = time.perf_counter()
    out = engine.prefill([prompt], px, timings=first)
    jax.block_until_ready(out)
    first_wall = time.perf_counter() - t
    del out
    device, wall = [], []
    for i in range(runs + 1):  # one more warm-up run, not counted
        tm = Timings()
        t0 = time.perf_counter()
        out = engine.prefill([prompt], px, timings=tm)
        t1 = time.perf_counter()
        jax.block_until_ready(out)  # Timings waits on the token only; the cache may still be in flight
        t2 = time.perf_counter()
        del out
        if i:
            device.append(tm.prefill_s + (t2 - t1))
            wall.append(t2 - t0)
    return dict(compile_s=first.compile_s, first_call_s=first_wall, median_s=statistics.median(device),
                min_s=min(device), wall_median_s=statistics.median(wall), runs=runs,
                bucket=bucket_length(len(prompt), engine.cache_length), cache_length=engine.cache_length)


def run_generate(engine: Engine, prompts, px, new: int) -> tuple[Timings, float, int]:
    tm = Timings()
    it = engine.generate_ids(prompts, px, max_new_tokens=new, stop_ids=(), timings=tm)
    next(it)
    prefill_compile = tm.compile_s
    n = 1 + sum(chunk.shape[1] for chunk in it)
    assert n == new, f"generated {n} tokens, expected {new}"
    return tm, prefill_compile, n


def time_decode(engine: Engine, prompts, px, new: int, runs: int) -> dict:
    t = time.perf_counter()
    warm, prefill_compile, _ = run_generate(engine, prompts, px, new)  # compiles (or reuses) prefill and decode
    first_wall = time.perf_counter() - t
    rates, steps = [], []
    for _ in range(runs):
        tm, _, _ = run_generate(engine, prompts, px, new)
        rates.append(tm.decode_tok_per_s)
        steps.append(tm.decode_s / (new - 1))
    return dict(batch=len(prompts), new_tokens=new, tok_per_s=statistics.median(rates),
                step_ms=statistics.median(steps) * 1e3, prefill_compile_s=prefill_compile,
                decode_compile_s=warm.compile_s - prefill_compile, first_call_s=first_wall, runs=runs,
                cache_length=engine.cache_length)


def second_start(args, cache_dir: str, small: bool, cold: bool = False) -> dict:
    """A fresh process: build the model, engine, 1-image prompt; process start -> first token (and chunk)."""
    cmd = [sys.executable, "-m", "benchmarks.generate", "--second-start", "--cache-dir", cache_dir]
    if small:
        cmd.append("--small")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.second_start_timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SECOND_START ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"second start failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    r = json.loads(lines[-1][len("SECOND_START "):])
    r["first_token_s"] = r.pop("first_token_at") - t0
    r["first_chunk_s"] = r.pop("first_chunk_at") - t0
    r["cold"] = cold
    return r


def second_start_child(args) -> None:
    spec = spec_of(args.small)
    model = random_model(spec.cfg, jnp.bfloat16)
    jax.block_until_ready(nnx.state(model))
    t_model = time.time()
    rng = np.random.default_rng(0)
    prompt = make_prompt(spec.cfg, *spec.short, rng)
    px = make_pixels(spec.cfg, spec.short[1], rng)
    engine = Engine(model, cache_length=round_up(spec.short[0] + spec.new))
    tm = Timings()
    it = engine.generate_ids([prompt], px, max_new_tokens=spec.new, stop_ids=(), timings=tm)
    next(it)
    t_first = time.time()
    compile_prefill = tm.compile_s
    next(it)
    t_chunk = time.time()
    print("SECOND_START " + json.dumps(dict(
        first_token_at=t_first, first_chunk_at=t_chunk, model_ready_s=t_model - T_PROC0,
        imports_s=T_IMPORTS - T_PROC0, prefill_compile_s=compile_prefill,
        decode_compile_s=tm.compile_s - compile_prefill)), flush=True)


def bench_ours(args, spec: Spec, sections: set[str], res: dict, cache_dir: str | None, ceil: Ceilings) -> None:
    cfg = spec.cfg
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    model = random_model(cfg, jnp.bfloat16)
    if args.quantize:
        model = quantize_model(model, args.quantize)
    jax.block_until_ready(nnx.state(model))
    res["init_s"] = time.perf_counter() - t
    res["quantize"], res["text_weight_bytes"] = args.quantize, weight_bytes(model.text)
    weight_size = bytes_per_weight(args.quantize) if args.quantize else 2  # bytes a text weight, for the floors
    log(f"random model ready in {res['init_s']:.1f} s")
    runs = args.runs

    short_prompt = make_prompt(cfg, *spec.short, rng)
    short_px = make_pixels(cfg, spec.short[1], rng)
    short_engine = Engine(model, cache_length=round_up(spec.short[0] + spec.new))
    if "prefill" in sections:
        for name, (n, imgs), eng in (("short", spec.short, short_engine), ("multi", spec.multi, None),
                                     ("8k", spec.mid, None)):
            with attempt(res, f"prefill {name}"):
                prompt = short_prompt if name == "short" else make_prompt(cfg, n, imgs, rng)
                px = short_px if name == "short" else make_pixels(cfg, imgs, rng)
                eng = eng or Engine(model, cache_length=round_up(n + 1))
                r = time_prefill(eng, prompt, px, runs)
                r.update(tokens=n, images=imgs, **prefill_floor(cfg, n, imgs, ceil))
                res.setdefault("prefill", {})[name] = r
                save_json(OUT_PATH, res)
                log(f"prefill {name} {n} tok: {r['median_s'] * 1e3:.2f} ms, wall {r['wall_median_s'] * 1e3:.2f} ms "
                    f"(bucket {r['bucket']}, compile {r['compile_s']:.1f} s)")
    if "decode" in sections or "compile" in sections:
        batches = spec.batches if "decode" in sections else (1,)
        for b in batches:
            with attempt(res, f"decode b{b}"):
                prompts = [make_prompt(cfg, *spec.short, rng) for _ in range(b)]
                px = make_pixels(cfg, spec.short[1] * b, rng)
                r = time_decode(short_engine, prompts, px, spec.new, args.decode_runs)
                r.update(decode_floor(cfg, b, spec.short[0] + spec.new // 2, ceil, weight_size),
                         prompt_tokens=spec.short[0])
                res.setdefault("decode", {})[f"b{b}"] = r
                save_json(OUT_PATH, res)
                log(f"decode b{b}: {r['tok_per_s']:.1f} tok/s ({r['step_ms']:.2f} ms/step, "
                    f"decode compile {r['decode_compile_s']:.1f} s)")
            if b == 1 and "compile" in sections and cache_dir:
                for cold in ((True, False) if args.cold_start else (False,)):
                    with attempt(res, "start"):
                        d = tempfile.mkdtemp(prefix="jaxcache_cold_") if cold else cache_dir
                        r = second_start(args, d, args.small, cold)
                        res.setdefault("start", {})["cold" if cold else "second"] = r
                        log(f"{'cold' if cold else 'second'} start: first token {r['first_token_s']:.1f} s "
                            f"(compile {r['prefill_compile_s']:.1f} s), first chunk {r['first_chunk_s']:.1f} s")
    if "long" in sections:
        with attempt(res, "long"):
            n, imgs = spec.long
            prompt = make_prompt(cfg, n, imgs, rng)
            px = make_pixels(cfg, imgs, rng)
            eng = Engine(model, cache_length=round_up(n + spec.long_new))
            r = time_prefill(eng, prompt, px, max(2, runs // 2))
            r.update(tokens=n, images=imgs, **prefill_floor(cfg, n, imgs, ceil))
            res.setdefault("prefill", {})["long"] = r
            log(f"prefill long {n} tok: {r['median_s'] * 1e3:.1f} ms (compile {r['compile_s']:.1f} s)")
            r = time_decode(eng, [prompt], px, spec.long_new, 1)
            r.update(decode_floor(cfg, 1, n + spec.long_new // 2, ceil, weight_size), prompt_tokens=n)
            res.setdefault("decode", {})["long_b1"] = r
            save_json(OUT_PATH, res)
            log(f"decode after {n} tok, b1: {r['tok_per_s']:.1f} tok/s")
            del eng
    res["peak_bytes"] = peak_mem()
    del short_engine, model
    gc.collect()


# ---- peer ---------------------------------------------------------------------------------------
def hf_config(cfg: Gemma3Config):
    from transformers import Gemma3Config as HFConfig

    t, v = cfg.text, cfg.vision
    rope = lambda r: {"rope_type": r.rope_type, "rope_theta": r.theta, **({"factor": r.factor} if r.rope_type == "linear" else {})}  # noqa: E731
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim, query_pre_attn_scalar=t.query_pre_attn_scalar, sliding_window=t.sliding_window,
                layer_types=list(t.layer_types), rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings,
                rope_parameters={GLOBAL: rope(t.rope_global), SLIDING: rope(t.rope_local)})
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                  vision_use_head=False)
    return HFConfig(text_config=text, vision_config=vision, mm_tokens_per_image=cfg.mm_tokens_per_image,
                    image_token_index=cfg.image_token_id, boi_token_index=cfg.boi_token_id,
                    eoi_token_index=cfg.eoi_token_id)


def torchao_version() -> str:
    import torchao

    return torchao.__version__


def bench_peer(args, spec: Spec, res: dict) -> None:
    import torch
    from transformers import Gemma3ForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    cfg = spec.cfg
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    peer = res.setdefault("peer", {})
    peer["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    t = time.perf_counter()
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU (the --small test): bf16 matmuls crawl there
    peer["dtype"] = str(dtype)
    with torch.device(dev):
        model = Gemma3ForConditionalGeneration._from_config(hf_config(cfg), dtype=dtype,
                                                            attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # never stop early: random weights
    model.generation_config.pad_token_id = cfg.text.pad_token_id
    if args.quantize:  # the peer with its own quantized weights: torchao weight-only, on the same layers as ours
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        configs = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}
        if args.quantize not in configs:
            raise ValueError(f"no torchao peer for --quantize {args.quantize}")
        text_only = lambda m, fqn: isinstance(m, torch.nn.Linear) and "vision" not in fqn and "projector" not in fqn
        quantize_(model, configs[args.quantize](), filter_fn=text_only)
        peer["quantize"] = f"torchao {torchao_version()} {configs[args.quantize].__name__}"
    peer["init_s"] = time.perf_counter() - t
    log(f"peer ready in {peer['init_s']:.1f} s on {peer['device']}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def inputs(n, imgs, batch, rng):
        ids = torch.tensor([make_prompt(cfg, n, imgs, rng) for _ in range(batch)], device=dev)
        px = make_pixels(cfg, imgs * batch, rng)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    token_type_ids=(ids == cfg.image_token_id).long(),
                    pixel_values=torch.tensor(px, device=dev, dtype=dtype))

    rng = np.random.default_rng(1)
    for name, (n, imgs) in (("short", spec.short), ("multi", spec.multi), ("8k", spec.mid)):
        with attempt(res, f"peer prefill {name}"):
            kw = inputs(n, imgs, 1, rng)
            times = []
            with torch.inference_mode():
                for i in range(args.runs + 2):  # two warm-ups
                    sync()
                    if cuda:
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                    t0 = time.perf_counter()
                    out = model(**kw, use_cache=True, logits_to_keep=1)
                    if cuda:
                        b.record()
                    sync()
                    dt = a.elapsed_time(b) / 1e3 if cuda else time.perf_counter() - t0
                    del out
                    if i >= 2:
                        times.append(dt)
            peer.setdefault("prefill", {})[name] = dict(median_s=statistics.median(times), tokens=n, images=imgs)
            save_json(OUT_PATH, res)
            log(f"peer prefill {name}: {statistics.median(times) * 1e3:.2f} ms")

    class Clock(LogitsProcessor):
        """Called once per step; the first call follows the prefill: synchronize and start the clock there."""

        def __init__(self):
            self.start = None

        def __call__(self, input_ids, scores):
            if self.start is None:
                sync()
                self.start = time.perf_counter()
            return scores

    def peer_decode(b: int, mode: str) -> dict:
        kw = inputs(*spec.short, b, rng)
        rates = []
        t = time.perf_counter()
        for i in range(1 + args.decode_runs):
            clock = Clock()
            with torch.inference_mode():
                out = model.generate(**kw, max_new_tokens=spec.new, do_sample=False, cache_implementation="static",
                                     logits_processor=LogitsProcessorList([clock]), disable_compile=mode == "off")
            sync()
            dt = time.perf_counter() - clock.start
            got = out.shape[1] - kw["input_ids"].shape[1]
            assert got == spec.new, f"peer generated {got} tokens, expected {spec.new}"
            if i == 0:
                warm = time.perf_counter() - t
            else:
                rates.append(b * (spec.new - 1) / dt)
        return dict(tok_per_s=statistics.median(rates), batch=b, first_call_s=warm, compile=mode,
                    auto_compiled=bool(cuda and mode == "auto"))

    for b in spec.peer_batches if not args.no_peer_decode else ():
        for mode in (args.peer_compile, "off") if args.peer_compile == "auto" else ("off",):
            with attempt(res, f"peer decode b{b} compile {mode}"):
                r = peer_decode(b, mode)
                peer.setdefault("decode", {})[f"b{b}"] = r
                save_json(OUT_PATH, res)
                log(f"peer decode b{b} (compile {mode}): {r['tok_per_s']:.1f} tok/s (first call {r['first_call_s']:.1f} s)")
                break
    if cuda:
        peer["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    model = None  # freed before ours runs (peer_decode reads it from this scope: not a del)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# ---- report -------------------------------------------------------------------------------------
def table(res: dict) -> str:
    rows = [("measure", "ours", "floor", "x floor (time)", "peer", "speedup vs peer")]
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    peer = res.get("peer", {})
    for name, r in res.get("prefill", {}).items():
        p = peer.get("prefill", {}).get(name, {}).get("median_s")
        rows.append((f"prefill {r['tokens']} tok {r['images']} img (bucket {r['bucket']}) ms", f(r["median_s"] * 1e3, ".2f"),
                     f(r["floor_s"] * 1e3, ".2f"), f(r["median_s"] / r["floor_s"], ".2f"),
                     f(p and p * 1e3, ".2f"), f(p and p / r["median_s"], ".2f")))
    for name, r in res.get("prefill", {}).items():  # what a caller waits for: host input checks and copies too
        rows.append((f"prefill {r['tokens']} tok {r['images']} img, wall (host input prep included) ms",
                     f(r["wall_median_s"] * 1e3, ".2f"), "", "", "", ""))
    for name, r in res.get("decode", {}).items():
        p = peer.get("decode", {}).get(name, {}).get("tok_per_s")
        label = f"decode b{r['batch']} after {r['prompt_tokens']} tok, {r['new_tokens']} new: tok/s"
        rows.append((label, f(r["tok_per_s"], ".1f"), f(r["floor_tok_per_s"], ".1f"),
                     f(r["floor_tok_per_s"] / r["tok_per_s"], ".2f"), f(p, ".1f"), f(p and r["tok_per_s"] / p, ".2f")))
    for kind, unit in (("prefill", "ms"), ("decode", "tok/s")):
        for name, r in peer.get(kind, {}).items():
            if name not in res.get(kind, {}):  # peer measured without ours (e.g. --only peer)
                v = r["median_s"] * 1e3 if kind == "prefill" else r["tok_per_s"]
                rows.append((f"peer-only {kind} {name} {unit}", "-", "-", "-", f(v, ".2f"), "-"))
    for name, r in res.get("prefill", {}).items():
        rows.append((f"compile prefill {name} (bucket {r['bucket']}) s", f(r["compile_s"], ".1f"), "", "", "", ""))
    for name, r in res.get("decode", {}).items():
        rows.append((f"compile decode {name} s", f(r["decode_compile_s"], ".1f"), "", "", "", ""))
    for name, r in res.get("start", {}).items():
        rows.append((f"{name} start -> first token (1 img) s", f(r["first_token_s"], ".1f"), "", "", "", ""))
    if res.get("peak_bytes") is not None:
        rows.append(("peak device memory GiB (ours)", f(res["peak_bytes"] / 2**30, ".1f"), "", "", "", ""))
    if peer.get("peak_bytes") is not None:
        rows.append(("peak device memory GiB (peer)", f(peer["peak_bytes"] / 2**30, ".1f"), "", "", "", ""))
    w = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny config (CPU test of every code path)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_generate.json)")
    ap.add_argument("--runs", type=int, default=5, help="timed prefill runs (median)")
    ap.add_argument("--decode-runs", type=int, default=2, help="timed generate runs per batch (median)")
    ap.add_argument("--peer-compile", choices=("auto", "off"), default="auto",
                    help="transformers' auto torch.compile of the static-cache decode step")
    ap.add_argument("--no-peer-decode", action="store_true", help="peer: prefill only")
    ap.add_argument("--quantize", default=None, help="int8, fp8 or int4: our model's text weights "
                    "quantized (gemma3_jax.model.quant); floors count the mode's bytes per weight with its scales")
    ap.add_argument("--cold-start", action="store_true", help="also time a start with an empty compilation cache")
    ap.add_argument("--second-start-timeout", type=int, default=300)
    ap.add_argument("--second-start", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")

    cache_dir = args.cache_dir
    if args.second_start or "compile" in sections:
        cache_dir = cache_dir or tempfile.mkdtemp(prefix="jaxcache_")
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.second_start:
        second_start_child(args)
        return 0

    global OUT_PATH
    OUT_PATH = out_path("bench_generate.json", args.out)
    spec = spec_of(args.small)
    res: dict = dict(small=args.small, sections=sorted(sections), jax=jax.__version__, backend=jax.default_backend(),
                     device=str(jax.devices()[0]))
    log(f"jax {jax.__version__} on {res['device']}; sections {sorted(sections)}")
    if sections - {"peer"}:
        ceil = measure_ceilings()  # before the model takes memory
        res["ceilings"] = dataclasses.asdict(ceil)
        log(f"ceilings: {ceil.bandwidth / 1e12:.2f} TB/s, {ceil.flops / 1e12:.0f} TFLOP/s"
            + ("" if ceil.measured else " (nominal: CPU run)"))
        bench_ours(args, spec, sections, res, cache_dir, ceil)
    if "peer" in sections:
        with attempt(res, "peer"):
            bench_peer(args, spec, res)
    res["wall_s"] = time.time() - T_PROC0
    save_json(OUT_PATH, res)
    out = OUT_PATH
    print_errors(res)
    print(table(res))
    print(f"wall {res['wall_s']:.0f} s" + (f"; JSON {out}" if out else ""))
    return 0


T_IMPORTS = time.time()

if __name__ == "__main__":
    sys.exit(main())
