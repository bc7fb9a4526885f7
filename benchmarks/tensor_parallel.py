"""Tensor parallelism on several GPUs of one host: numerics against one device, and speed per device count.

Sections (``--only``), each for N in ``--tp`` (at most the devices present):

- ``numerics``: the tiny multimodal model (float32; 8 query heads over 2 KV heads, a window of 16 its prompt crosses,
  two images) split over N: prefill and 12 decode steps' logits against one device, max error relative to the
  largest logit (target 1e-5); and the ``--model`` architecture with random bf16 weights: 64 greedy tokens after the
  1-image prompt, split against one device (identical).
- ``speed``: the ``--model`` architecture (random bf16 weights drawn in place on each N's devices): prefill latency
  of the 1-image prompt, the 8K prompt with 16 images and the ~32K prompt; decode tok/s at batch 1, 8, 32 after the
  1-image prompt; scaling efficiency speed(N) / (N x speed(1)) where N = 1 ran.
- ``allreduce``: GPU kernel time a decode step spends in collectives (NCCL kernels), per device, at batch 1 and 32.
- ``batching``: ``BatchEngine`` output tok/s at ``--slots`` slots on the continuous-batching mix.

    python -m benchmarks.tensor_parallel [--small] [--model 4b|27b] [--tp 1,2,4] [--only numerics,speed]

Writes --out, else $OUT/bench_tensor_parallel.json. NCCL_NVLS_ENABLE=0 stays set where the device notes say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import attempt, kernel_table, log, make_pixels, make_prompt, out_path, print_errors
from benchmarks.common import round_up, save_json, spec_of
from benchmarks.generate import time_decode, time_prefill
from benchmarks.random_init import random_model
from gemma3_jax.model.presets import preset
from gemma3_jax.model.sharding import make_mesh, tensor_parallel
from gemma3_jax.runtime.engine import Engine

SECTIONS = ("numerics", "speed", "allreduce", "batching")
COLLECTIVE = ("nccl", "allreduce", "all_reduce", "all-reduce", "reducescatter", "allgather")


def prompt_and_steps_logits(m, ids, px, steps: int = 12):
    """Prefill logits [L, V] of one prompt, then ``steps`` greedy decode steps' logits over a cache of it (the
    tiny model's window of 16 wraps), [L + steps, V]: what a split model must reproduce (jit it)."""
    from gemma3_jax.model import kv_cache as kvc
    from gemma3_jax.model.sharding import shard_cache

    hidden, kvs = m.forward(ids, px)
    prompt_logits = m.text.logits(hidden)[0]
    cache = kvc.init_cache(m.cfg.text, 1, 128, jnp.float32)
    length = jnp.asarray([ids.shape[1]])
    cache = kvc.KVCache(*(tuple(kvc.fill_layer(b, kv[j], length, m.cfg.text.is_sliding(i))
                                for i, (b, kv) in enumerate(zip(bufs, kvs))) for j, bufs in
                          enumerate((cache.k, cache.v))), length)
    cache = shard_cache(cache, m.kernels.mesh)

    def step(carry, _):  # a scan, not a Python loop: one decode step to compile, not ``steps`` of them
        token, cache = carry
        h, cache = m.text.decode_step(m.text.embed_tokens(token[:, None]), cache)
        out = m.text.logits(h)[0, 0]
        return (jnp.argmax(out)[None], cache), out

    _, steps_logits = jax.lax.scan(step, (jnp.argmax(prompt_logits[-1])[None], cache), None, length=steps)
    return jnp.concatenate([prompt_logits, steps_logits])


def tiny_logits(n: int) -> float:
    """Max |split - one device| / max |one device| of the tiny model's prefill and decode-step logits."""
    from benchmarks.common import small_config

    cfg = small_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_heads=8, num_kv_heads=2, head_dim=16))
    model = random_model(cfg, jnp.float32)
    rng = np.random.default_rng(0)
    ids = jnp.asarray([make_prompt(cfg, 60, 2, rng)], jnp.int32)
    px = jnp.asarray(make_pixels(cfg, 2, rng))
    run = jax.jit(prompt_and_steps_logits)
    want = np.asarray(run(model, ids, px))
    got = np.asarray(run(tensor_parallel(model, n), ids, px))
    return float(np.abs(got - want).max() / np.abs(want).max())


def greedy(model, spec, rng_seed: int = 0, new: int = 64) -> list[int]:
    rng = np.random.default_rng(rng_seed)
    n, imgs = spec.short
    prompt = make_prompt(spec.cfg, n, imgs, rng)
    eng = Engine(model, cache_length=round_up(n + new))
    chunks = eng.generate_ids([prompt], make_pixels(spec.cfg, imgs, rng), max_new_tokens=new, stop_ids=())
    return np.concatenate([np.asarray(c) for c in chunks], axis=1)[0].tolist()


def section_numerics(args, spec, res) -> None:
    out = res.setdefault("numerics", {})
    for n in args.tp:
        if n > 1:
            with attempt(res, f"numerics tiny N={n}"):
                out[f"tiny_logits_rel_err_n{n}"] = tiny_logits(n)
                log(f"tiny float32 logits, N={n} vs 1: {out[f'tiny_logits_rel_err_n{n}']:.2e} (target 1e-5)")
    model = random_model(spec.cfg, jnp.bfloat16)
    one = greedy(model, spec)
    for n in args.tp:
        if n > 1:
            with attempt(res, f"numerics greedy N={n}"):
                got = greedy(tensor_parallel(model, n), spec)
                first = next((i for i, (a, b) in enumerate(zip(got, one)) if a != b), None)
                out[f"greedy_identical_n{n}"] = got == one
                out[f"greedy_first_difference_n{n}"] = first
                log(f"{len(one)} greedy tokens, N={n} vs 1: {'identical' if got == one else f'differ at {first}'}")
    del model
    gc.collect()


def section_speed(args, spec, res) -> None:
    rows = res.setdefault("speed", {})
    for n in args.tp:
        with attempt(res, f"speed N={n}"):
            t = time.perf_counter()
            model = random_model(spec.cfg, jnp.bfloat16, mesh=None if n == 1 else make_mesh(n))
            jax.block_until_ready(jax.tree.leaves(model))
            row = rows.setdefault(str(n), {"weights_drawn_s": time.perf_counter() - t})
            rng = np.random.default_rng(0)
            for label, (tokens, imgs) in (("short", spec.short), ("mid", spec.mid), ("long", spec.long)):
                with attempt(res, f"speed N={n} prefill {label}"):
                    eng = Engine(model, cache_length=round_up(tokens + 8))
                    row[f"prefill_{label}"] = time_prefill(eng, make_prompt(spec.cfg, tokens, imgs, rng),
                                                           make_pixels(spec.cfg, imgs, rng), args.runs)
                    log(f"N={n} prefill {label} ({tokens} tokens, {imgs} images): "
                        f"{row[f'prefill_{label}']['median_s'] * 1e3:.2f} ms")
                    del eng
                save_json(args.out, res)
            tokens, imgs = spec.short
            for b in spec.batches:
                with attempt(res, f"speed N={n} decode b{b}"):
                    eng = Engine(model, cache_length=round_up(tokens + args.new))
                    prompts = [make_prompt(spec.cfg, tokens, imgs, rng) for _ in range(b)]
                    row[f"decode_b{b}"] = time_decode(eng, prompts, make_pixels(spec.cfg, imgs * b, rng), args.new,
                                                      args.decode_runs)
                    log(f"N={n} decode batch {b}: {row[f'decode_b{b}']['tok_per_s']:.1f} tok/s")
                    del eng
                save_json(args.out, res)
            del model
            gc.collect()
    one = rows.get("1")
    if one:  # scaling efficiency against N = 1 of the same run
        for n, row in rows.items():
            for key, r in list(row.items()):
                if isinstance(r, dict) and key in one:
                    base = one[key]
                    speedup = (base["median_s"] / r["median_s"]) if "median_s" in r else r["tok_per_s"] / base["tok_per_s"]
                    r["speedup_vs_1"], r["efficiency"] = speedup, speedup / int(n)


def section_allreduce(args, spec, res) -> None:
    out = res.setdefault("allreduce", {})
    tokens, imgs = spec.short
    steps = 32
    for n in args.tp:
        if n == 1:
            continue
        with attempt(res, f"allreduce N={n}"):
            model = random_model(spec.cfg, jnp.bfloat16, mesh=make_mesh(n))
            rng = np.random.default_rng(0)
            for b in (1, 32):
                eng = Engine(model, cache_length=round_up(tokens + steps + 8), chunk=steps)
                prompts = [make_prompt(spec.cfg, tokens, imgs, rng) for _ in range(b)]
                px = make_pixels(spec.cfg, imgs * b, rng)

                def run(eng=eng):
                    return [np.asarray(c) for c in eng.generate_ids(prompts, px, max_new_tokens=steps + 1,
                                                                    stop_ids=())]

                run()
                import tempfile

                with tempfile.TemporaryDirectory() as logdir:
                    with jax.profiler.trace(logdir, create_perfetto_trace=True):
                        run()
                    table = kernel_table(logdir, steps * n, top=400)  # every device's kernels: per device-step
                coll = [r for r in table.get("top", []) if any(c in r["name"].lower() for c in COLLECTIVE)]
                out[f"n{n}_b{b}"] = dict(kernels_us_per_step=table.get("total_us_per_step"),
                                         collective_us_per_step=sum(r["us_per_step"] for r in coll),
                                         collective_kernels=coll[:8], error=table.get("error"))
                log(f"N={n} batch {b}: collectives {out[f'n{n}_b{b}']['collective_us_per_step']:.1f} us of "
                    f"{out[f'n{n}_b{b}']['kernels_us_per_step'] or 0:.1f} us of kernels a device-step "
                    f"(prefill included)")
                del eng
            del model
            gc.collect()
        save_json(args.out, res)


def section_batching(args, spec, res) -> None:
    from benchmarks.batching import serve, workload
    from gemma3_jax.runtime.batching import BatchEngine

    out = res.setdefault("batching", {})
    for n in args.tp:
        with attempt(res, f"batching N={n}"):
            model = random_model(spec.cfg, jnp.bfloat16, mesh=None if n == 1 else make_mesh(n))
            reqs = workload(spec.cfg, args.requests, np.random.default_rng(0), args.small)
            eng = BatchEngine(model, max_batch=args.slots, cache_length=256 if args.small else 4096,
                              chunk_tokens=64 if args.small else 2048)
            serve(eng, reqs[: max(4, len(reqs) // 8)])  # compiles the shapes
            r = serve(eng, reqs)
            out[str(n)] = dict(slots=args.slots, **r)
            log(f"N={n} BatchEngine {args.slots} slots: {r['tok_per_s']:.0f} tok/s")
            del eng, model
            gc.collect()
        save_json(args.out, res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the tiny config (CPU check of every code path)")
    ap.add_argument("--model", choices=("4b", "27b"), default="4b")
    ap.add_argument("--tp", default="1,2,4", help="device counts, comma list (those above the devices are skipped)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--decode-runs", type=int, default=2)
    ap.add_argument("--new", type=int, default=128, help="new tokens a decode timing generates")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {SECTIONS}")
    devices = len(jax.devices())
    args.tp = [n for n in map(int, args.tp.split(",")) if n <= devices]
    args.out = out_path("bench_tensor_parallel.json", args.out)
    spec = spec_of(args.small)
    if not args.small and args.model == "27b":
        spec = dataclasses.replace(spec, cfg=preset("gemma3_27b"))
    if args.small:
        args.requests, args.slots, args.new = min(args.requests, 16), min(args.slots, 8), min(args.new, 16)
    res = dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__, model="small" if args.small else args.model,
               tp=args.tp, args=vars(args))
    log(f"{devices} devices ({jax.devices()[0].device_kind}); N in {args.tp}; sections {sorted(sections)}")
    for name, fn in (("numerics", section_numerics), ("speed", section_speed), ("allreduce", section_allreduce),
                     ("batching", section_batching)):
        if name in sections:
            fn(args, spec, res)
            save_json(args.out, res)
    print_errors(res)
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
