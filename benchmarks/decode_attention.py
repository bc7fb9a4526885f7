"""The fused decode attention kernel alone, at the shapes continuous batching gives it (GPU).

Gemma-3-4B's decode attention (8 query heads over 4 kv heads of 256) over slots whose lengths differ, as in the
offline mix of ``benchmarks.batching``: a sliding layer's ring buffer of 1,024 slots and a global layer's buffer of
4,096, each row at its own position. Each timing runs COPIES calls over distinct caches in one jitted call (so the
keys come from HBM, not the L2), and reports microseconds a call from the profiler's kernel durations (the kernel
and its split combine) and TB/s of the K/V bytes the rows hold. Every config is first checked against the float32
reference (a row that fails is an error, not a timing).

    python -m benchmarks.decode_attention [--cases ...] [--quick] [--out PATH]

Writes --out, else $OUT/bench_decode_attention.json, else ./bench_decode_attention.json.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import attempt, out_path, save_json, time_jax, traced
from gemma3_jax.runtime.engine import default_compiler_options
from pallas_kernels.common import interpret_mode
from pallas_kernels.decode_attention import choose_splits
from pallas_kernels.decode_fused import decode_attention_fused
from pallas_kernels.reference import decode_attention_fused_reference
from pallas_kernels.tuning import decode_config

COPIES = 8
N, K, H = 8, 4, 256
# name -> (batch, buffer slots, ring, lowest and highest position): positions drawn uniformly per row
CASES = {
    "ring_b32_mix": (32, 1024, True, 600, 2500),  # the offline mix's sliding layers: most rows hold the full window
    "ring_b32_short": (32, 1024, True, 300, 900),  # 512-token prompts a few hundred steps in
    "global_b32_mix": (32, 4096, False, 400, 2500),  # the offline mix's global layers
    "global_b32_8k": (32, 8192, False, 8000, 8000),  # long contexts (3.0 TB/s on the H100 in 2026-11)
    "global_b8_mix": (8, 4096, False, 400, 2500),
    "global_b1_short": (1, 4096, False, 600, 600),
}


def configs(quick: bool):
    grid = itertools.product((None, 4, 8, 16), ((64, 4, 2), (32, 4, 2), (64, 4, 3)))
    out = [dict(num_splits=s, block_k=bk, num_warps=w, num_stages=st) for s, (bk, w, st) in grid]
    return [dict()] + (out[:2] if quick else out)  # dict(): the defaults the model runs


def inputs(case: str, seed: int = 0):
    b, s, ring, lo, hi = CASES[case]
    rng = np.random.default_rng(seed)
    pos = jnp.asarray(rng.integers(lo, hi + 1, size=b), jnp.int32)
    if interpret_mode():  # a CPU check of the script: a smaller buffer and positions within it
        s, pos = 64, jnp.asarray(rng.integers(1, 60, size=b), jnp.int32)
    key = jax.random.key(seed)
    f = lambda i, shape: (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(jnp.bfloat16)
    qkv = f(0, (b, N + 2 * K, H))
    small = dict(q_norm=f(1, (H,)) * 0.1, k_norm=f(2, (H,)) * 0.1)
    angle = jnp.arange(H // 2, dtype=jnp.float32)[None, :] * pos[:, None].astype(jnp.float32) * 1e-3
    cos = jnp.concatenate([jnp.cos(angle)] * 2, axis=1).astype(jnp.bfloat16)
    sin = jnp.concatenate([jnp.sin(angle)] * 2, axis=1).astype(jnp.bfloat16)
    caches = [(f(10 + 2 * i, (b, s, K, H)), f(11 + 2 * i, (b, s, K, H))) for i in range(COPIES)]
    held = np.minimum(np.asarray(pos), s)  # older slots a row holds, + its new token
    kv_bytes = float((held + 1).sum()) * K * H * 2 * 2
    return dict(qkv=qkv, cos=cos, sin=sin, pos=pos, ring=ring, caches=caches, kv_bytes=kv_bytes, **small)


def run_case(case: str, quick: bool, opts) -> dict:
    x = inputs(case)
    b, s = x["caches"][0][0].shape[:2]
    scale, eps = H ** -0.5, 1e-6
    bk0 = decode_config(H).block_k
    res = {"case": case, "b": b, "slots": s, "ring": x["ring"], "pos": np.asarray(x["pos"]).tolist(),
           "kv_mb": round(x["kv_bytes"] / 1e6, 3), "default_splits": choose_splits(b, K, -(-s // bk0)), "rows": []}

    def call(kc, vc, cfg):
        return decode_attention_fused(x["qkv"], x["q_norm"], x["k_norm"], x["cos"], x["sin"], kc, vc, x["pos"],
                                      ring=x["ring"], scale=scale, eps=eps, interpret=interpret_mode(), **cfg)

    want = decode_attention_fused_reference(x["qkv"], x["q_norm"], x["k_norm"], x["cos"], x["sin"],
                                            *x["caches"][0], x["pos"], ring=x["ring"], scale=scale, eps=eps)[0]
    want = want.astype(jnp.float32)
    for cfg in configs(quick):
        label = " ".join(f"{k}={v}" for k, v in cfg.items()) or "default"
        with attempt(res, f"{case} {label}"):
            got = call(*x["caches"][0], cfg)[0].astype(jnp.float32)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            if not err <= 2e-2:
                raise AssertionError(f"{case} {label}: compiled vs reference {err:.2e} > 2e-2")
            # the caches are not donated here, so the written token costs a copy: time only the attention output
            fn = jax.jit(lambda caches: [call(kc, vc, cfg)[0] for kc, vc in caches]).lower(x["caches"]).compile(opts)
            wall_us = time_jax(fn, x["caches"], iters=10, reps=5) * 1e3 / COPIES
            kernels = traced(fn, (x["caches"],), COPIES)
            ours = [k for k in kernels["top"] if "decode" in k["name"]]
            us = sum(k["us_per_step"] for k in ours) or wall_us  # no GPU kernels in the trace on a CPU
            tb_s = x["kv_bytes"] / us / 1e6
            res["rows"].append({"config": label, **cfg, "us": round(us, 2), "wall_us": round(wall_us, 2),
                                "tb_s": round(tb_s, 3), "err": err,
                                "kernels": [(k["name"][:60], round(k["us_per_step"], 2)) for k in kernels["top"][:5]]})
            print(f"{case:16s} {label:48s} {us:8.2f} us {tb_s:5.2f} TB/s (wall {wall_us:.2f} us)", flush=True)
    rows = res["rows"]
    if rows:
        best = min(rows, key=lambda r: r["us"])
        print(f"{case:16s} best {best['config']} {best['us']} us vs default {rows[0]['us']} us", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configs only (CPU check of the script)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=out_path("bench_decode_attention.json", fallback_dir="."))
    args = ap.parse_args()
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
    opts = default_compiler_options("decode", jax.default_backend())
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "copies": COPIES, "cases": []}
    for case in args.cases.split(","):
        out["cases"].append(run_case(case, args.quick, opts))
        save_json(args.out, out)


if __name__ == "__main__":
    main()
