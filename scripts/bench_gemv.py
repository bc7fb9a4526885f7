"""Decode-time matrix-vector products of the 4B model: pallas_kernels.norm_gemv against XLA (GPU).

Each case runs over COPIES distinct weight matrices in one jitted call (so the weights come from HBM, not the
50 MB L2), and reports microseconds per product and TB/s of weight bytes. The XLA version is what the model's
jnp path compiles to under decode's default options (RMSNorms, residual add, einsum, GeGLU in XLA).

    python scripts/bench_gemv.py [--quick] [--out bench_gemv.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import time_jax
from bench_generate import attempt

from pallas_kernels.norm_gemv import norm_gemv, norm_gemv_reference

COPIES = 8
D, F, QKV = 2560, 10240, 16 * 256
# name -> (weight [N, in], has norm, has residual delta, geglu)
CASES = {
    "qkv": ((QKV, D), True, True, False),
    "gate_up": ((2 * F, D), True, True, True),
    "down": ((D, F), False, False, False),
    "o_proj": ((D, 8 * 256), False, False, False),
}


def xla_version(x, w, nw, delta, dw, geglu):
    """The model's jnp decode path for one product (RMSNorm etc. in XLA, default matmul precision)."""
    def rms(v, wt):
        vf = v.astype(jnp.float32)
        vf = vf * jax.lax.rsqrt(jnp.mean(vf * vf, axis=-1, keepdims=True) + 1e-6)
        return (vf * (1.0 + wt.astype(jnp.float32))).astype(v.dtype)

    x_in = x if delta is None else x + rms(delta, dw)
    xn = x_in if nw is None else rms(x_in, nw)
    y = jnp.einsum("bd,nd->bn", xn, w)
    if geglu:
        gate, up = jnp.split(y, 2, axis=1)
        y = jax.nn.gelu(gate, approximate=True) * up
    return y, x_in


def run_case(name, b, configs, key):
    (n, d), has_norm, has_delta, geglu = CASES[name]
    ks = jax.random.split(key, 4)
    ws = [jax.random.normal(jax.random.fold_in(ks[0], i), (n, d), jnp.bfloat16) * 0.02 for i in range(COPIES)]
    x = jax.random.normal(ks[1], (b, d), jnp.bfloat16)
    delta = jax.random.normal(ks[2], (b, d), jnp.bfloat16) if has_delta else None
    nw = jax.random.normal(ks[3], (d,), jnp.bfloat16) * 0.1 if has_norm else None
    dw = nw if has_delta else None
    gbytes = n * d * 2 * COPIES / 1e9
    res = {"b": b, "n": n, "d": d, "weight_mb": n * d * 2 / 1e6, "rows": []}

    def many(fn):
        @jax.jit
        def f(ws, x, delta):
            outs = [fn(x, w, delta) for w in ws]
            return sum(jnp.sum(o[0].astype(jnp.float32)) for o in outs)
        return f

    def record(label, fn, **extra):
        with attempt(res, label):
            ms = time_jax(many(fn), ws, x, delta, iters=10, reps=5)
            us = ms * 1e3 / COPIES
            row = {"impl": label, "us": round(us, 2), "tb_s": round(gbytes / ms, 3), **extra}
            res["rows"].append(row)
            print(f"{name} b={b} {label:40s} {us:8.2f} us  {gbytes / ms:5.2f} TB/s", flush=True)

    # correctness of the compiled kernel vs the jnp oracle first (a wrong row is not a result)
    with attempt(res, "check"):
        y, xi = norm_gemv(x, ws[0], nw, delta=delta, delta_weight=dw, geglu=geglu)
        yr, xr = norm_gemv_reference(x, ws[0], nw, delta=delta, delta_weight=dw, geglu=geglu)
        err = float(jnp.linalg.norm((y - yr).astype(jnp.float32)) / jnp.linalg.norm(yr.astype(jnp.float32)))
        err_x = float(jnp.max(jnp.abs((xi - xr).astype(jnp.float32))))
        res["rel_err"], res["x_in_max_abs_err"] = err, err_x
        if not err_x <= 1e-2:
            raise AssertionError(f"{name} b={b}: x_in differs by {err_x:.2e}")
        print(f"{name} b={b} compiled vs oracle rel err {err:.2e}", flush=True)
        if not err <= 1e-2:
            raise AssertionError(f"{name} b={b}: rel err {err:.2e} > 1e-2")

    record("xla", lambda x, w, dl: xla_version(x, w, nw, dl, dw, geglu))
    for bn, bk, (warps, stages) in configs:
        record(f"pallas bn{bn} bk{bk} w{warps} s{stages}",
               lambda x, w, dl, bn=bn, bk=bk, warps=warps, stages=stages: norm_gemv(
                   x, w, nw, delta=dl, delta_weight=dw, geglu=geglu, block_n=bn, block_k=bk,
                   num_warps=warps, num_stages=stages),
               block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few configs only")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default="bench_gemv.json")
    args = ap.parse_args()
    if args.quick:
        configs = [(32, 256, (4, 3)), (64, 256, (4, 4))]
    else:
        configs = list(itertools.product((16, 32, 64), (256, 512), ((4, 3), (4, 4), (8, 4))))
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "copies": COPIES, "cases": []}
    key = jax.random.key(0)
    for name in args.cases.split(","):
        for b in map(int, args.batches.split(",")):
            out["cases"].append({"name": name, **run_case(name, b, configs, key)})
            Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
