"""Decode-time matrix-vector products of the 4B model: pallas_kernels.gemv against XLA (GPU).

Each timing runs COPIES products over distinct weight matrices in one jitted call (so the weights come from
HBM, not the 50 MB L2) and returns every output (no reduction kernels added); it reports microseconds per
product from the profiler's kernel durations (``kernel_us``: GPU time only; small products are host-bound
when timed by wall clock, which is also reported) and TB/s of weight bytes from kernel time. XLA's version is what the model compiled before: the einsum (XLA's split-K
Triton GEMV or cuBLAS, with its reduction kernel) and, for gate|up, the separate GELU·up kernel. Every Pallas
config is first checked against its f32 reference (a row that fails is an error, not a timing).

    python -m benchmarks.gemv [--batches 1,8] [--cases qkv,o,gate_up,down] [--weights bf16,int8,fp8] [--quick]
        [--grid full|small] [--out PATH]

``--weights int8`` / ``fp8``: the same products over 1-byte weights with a float32 scale per row (``model.quant``),
XLA's side being the model's product for them (``quant.einsum``: the weight converted to bf16 in the product).
``--weights int4``: 4-bit weights with a scale per 32 inputs, Pallas's side ``gemv_int4`` (XLA's: the weight
dequantized to bf16, then the product).
``--grid small``: fewer configs a case.

Writes --out, else $OUT/bench_gemv.json, else ./bench_gemv.json.
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

from benchmarks.common import attempt, out_path, save_json, time_jax, traced
from gemma3_jax.model import quant
from gemma3_jax.model.layers import gelu_tanh
from gemma3_jax.runtime.engine import default_compiler_options
from pallas_kernels.common import interpret_mode
from pallas_kernels.gemv import gemv, gemv_geglu
from pallas_kernels.gemv_int4 import gemv4, gemv4_geglu, words
from pallas_kernels.reference import gemv_geglu_reference, gemv_reference

COPIES = 8
D, F, QKV, O_IN = 2560, 10240, 16 * 256, 8 * 256
CASES = {"qkv": (QKV, D), "o": (D, O_IN), "gate_up": (2 * F, D), "down": (D, F),  # name -> w [N, K]
         "lm_head": (262_144, D)}  # not in the default --cases (8 copies of the table)


def xla_product(name, x, w, scale=None):
    y = quant.einsum("BK,NK->BN", x, w, scale)
    if name == "gate_up":
        y = gelu_tanh(y[:, :F]) * y[:, F:]
    return y


def configs(name, b, quick, one_byte, grid="full"):
    # 1-byte rows: twice the rows a program for the same bytes in flight, so the grids reach further
    if grid == "small":
        if name == "gate_up":
            return [dict(block_n=bn, num_warps=nw) for bn, nw in itertools.product((1, 2, 4), (2, 4, 8))]
        splits = (2, 4) if name == "down" else (1,) if name == "lm_head" else (1, 2)
        return [dict(block_n=bn, splits=s, num_warps=nw)
                for bn, s, nw in itertools.product((2, 4, 8), splits, (4, 8) if name == "down" else (4,))]
    if name == "gate_up":
        grid = itertools.product((1, 2, 4, 8) if one_byte else (1, 2, 4), (2, 4, 8))
        return [dict(block_n=bn, num_warps=nw) for bn, nw in grid] if not quick else [dict(block_n=4, num_warps=4)]
    splits = {"qkv": (1, 2, 4), "o": (1, 2, 4), "lm_head": (1,), "down": (2, 4, 8, 16) if one_byte else (4, 8, 16)}[name]
    grid = itertools.product((2, 4, 8, 16, 32) if one_byte else (2, 4, 8, 16), splits, (4, 8))
    out = [dict(block_n=bn, splits=s, num_warps=nw) for bn, s, nw in grid]
    return out if not quick else out[:3]


def run_case(name, b, quick, opts, weights="bf16", grid="full"):
    n, k = CASES[name]
    key = jax.random.key(0)
    ws = [(jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
          for i in range(COPIES)]
    # (w, scale) pairs: bf16 without a scale, or quantized per row (the scales' bytes are counted too)
    ws = [(w, None) if weights == "bf16" else quant.quantize(w, weights, 1) for w in ws]
    x = jax.random.normal(jax.random.fold_in(key, 99), (b, k), jnp.bfloat16)
    one_byte = weights != "bf16"  # int4 takes the 1-byte grids: its rows are shorter still
    scale_bytes = 0 if weights == "bf16" else ws[0][1].size * 4
    mbytes = (n * k * quant.BITS.get(weights, 16) / 8 + scale_bytes) / 1e6
    gbytes = mbytes * COPIES / 1e3
    res = {"name": name, "b": b, "n": n, "k": k, "weights": weights, "weight_mb": round(mbytes, 3), "rows": []}

    def record(label, product, **cfg):
        with attempt(res, f"{name} b{b} {label}"):
            if cfg:  # a wrong kernel is not a result
                got = product(x, *ws[0])
                got = got.sum(0) if got.ndim == 3 else got.astype(jnp.float32)
                want = (gemv_geglu_reference(x, *ws[0]).astype(jnp.float32) if name == "gate_up"
                        else gemv_reference(x, *ws[0]))
                err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                if not err <= 1e-2:
                    raise AssertionError(f"{name} b{b} {cfg}: compiled vs reference {err:.2e} > 1e-2")
            fn = jax.jit(lambda ws, x: [product(x, *w) for w in ws]).lower(ws, x).compile(opts)
            wall_us = time_jax(fn, ws, x, iters=20, reps=5) * 1e3 / COPIES
            kernels = traced(fn, (ws, x), COPIES)
            us = kernels["total_us_per_step"] or wall_us  # no GPU kernels in the trace on a CPU
            res["rows"].append({"impl": label, "us": round(us, 2), "wall_us": round(wall_us, 2),
                                "tb_s": round(gbytes / COPIES / us * 1e3, 3), **cfg,
                                "kernels": [(k_["name"], round(k_["us_per_step"], 2)) for k_ in kernels["top"][:4]]})
            print(f"{name:8s} {weights:4s} b={b} {label:44s} {us:8.2f} us  {gbytes / COPIES / us * 1e3:5.2f} TB/s  "
                  f"(wall {wall_us:.2f} us)", flush=True)

    record("xla", lambda x, w, s: xla_product(name, x, w, s))
    for cfg in configs(name, b, quick, one_byte, grid):
        label = "pallas " + " ".join(f"{k_}={v}" for k_, v in cfg.items())
        if weights == "int4":  # the int4 array's words: a bitcast, inside the timed call as in the model
            kernel = gemv4_geglu if name == "gate_up" else gemv4
            record(label, lambda x, w, s, c=cfg, f=kernel: f(x, words(w), s, **c, interpret=interpret_mode()), **cfg)
        elif name == "gate_up":
            record(label, lambda x, w, s, c=cfg: gemv_geglu(x, w, s, **c, interpret=interpret_mode()), **cfg)
        else:
            record(label, lambda x, w, s, c=cfg: gemv(x, w, s, **c, interpret=interpret_mode()), **cfg)
    best = min((r for r in res["rows"] if r["impl"] != "xla"), key=lambda r: r["us"], default=None)
    if best:
        print(f"{name:8s} {weights:4s} b={b} best {best['impl']} {best['us']} us vs xla "
              f"{next(r['us'] for r in res['rows'] if r['impl'] == 'xla')} us", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configs only (CPU check of the script)")
    ap.add_argument("--cases", default="qkv,o,gate_up,down", help=f"of {list(CASES)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--weights", default="bf16", help="comma list of bf16, int8, fp8")
    ap.add_argument("--grid", default="full", choices=("full", "small"))
    ap.add_argument("--out", default=out_path("bench_gemv.json", fallback_dir="."))
    args = ap.parse_args()
    opts = default_compiler_options("decode", jax.default_backend())  # as the model's decode step compiles
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "copies": COPIES, "cases": []}
    for weights in args.weights.split(","):
        if weights not in ("bf16", "int8", "fp8", "int4"):
            ap.error(f"--weights takes bf16, int8, fp8 and int4, got {weights!r}")
        for name in args.cases.split(","):
            for b in map(int, args.batches.split(",")):
                out["cases"].append(run_case(name, b, args.quick, opts, weights, args.grid))
                save_json(args.out, out)


if __name__ == "__main__":
    main()
