"""Benchmark the image-span Pallas attention kernel against its peers on one GPU.

Gemma-3-4B attention shapes: B=1, Hq=8, Hkv=4, D=256, bf16; layout repeating [256 text][256 image];
full mask and sliding window 1024. Effective TFLOP/s = 4*D*Hq*(allowed (i, j) pairs) / time, with the
pairs counted in O(S) from the per-query key intervals.

Every timed kernel is checked on query slices against a float32 reference (reference_attention with
Sq < Sk chunk semantics: the last 256 queries of the whole sequence and of a prefix ending at S/2);
error > 2e-2 (or NaN) marks the row FAILED.

    python -m benchmarks.attention [--out PATH] [--sizes 2048,8192] [--configs 128x64w8s2E,...]
                                   [--peers cudnn,xla,flex,tokamax_triton,tokamax_mosaic]

Writes --out, else $OUT/bench_attention.json, else ./bench_attention.json (kept as docs/bench_attention_<gpu>.json).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import attempt, out_path, save_json, time_jax
from pallas_kernels.attention import image_span_attention
from pallas_kernels.block_ranges import block_ranges, count_allowed_pairs, count_blocks
from pallas_kernels.common import interpret_mode
from pallas_kernels.reference import reference_attention, reference_mask
from pallas_kernels.segments import key_intervals, segment_ids_from_image_mask
from pallas_kernels.tuning import default_config

B, HQ, HKV, D = 1, 8, 4, 256
PERIOD = 256
CHECK_ROWS = 256
FAIL_ERR = 2e-2
MIN_REP_MS = 25.0  # each timed rep of the JAX implementations lasts at least this long (flex: do_bench's 300 ms)


def layout(s: int) -> jax.Array:
    pos = np.arange(s)
    return segment_ids_from_image_mask(jnp.asarray(((pos // PERIOD) % 2 == 1)[None]))


def parse_config(txt: str) -> dict:
    # "128x64w8s2[E]" -> block_q=128 block_k=64 num_warps=8 num_stages=2 (E: ex2.approx inline asm)
    fast = txt.endswith("E")
    bq, rest = txt.rstrip("E").split("x")
    bk, rest = rest.split("w")
    nw, ns = rest.split("s")
    return dict(block_q=int(bq), block_k=int(bk), num_warps=int(nw), num_stages=int(ns), fast_exp2=fast)


class Case:
    def __init__(self, s: int, window: int | None, key):
        self.s, self.window = s, window
        kq, kk, kv = jax.random.split(key, 3)
        self.q = jax.random.normal(kq, (B, s, HQ, D), jnp.bfloat16)
        self.k = jax.random.normal(kk, (B, s, HKV, D), jnp.bfloat16)
        self.v = jax.random.normal(kv, (B, s, HKV, D), jnp.bfloat16)
        self.seg = layout(s)
        self.ks, self.ke = key_intervals(self.seg, sliding_window=window)
        self.pairs = count_allowed_pairs(self.ks, self.ke)
        self.flops = 4 * D * HQ * B * self.pairs
        # reference slices: (query rows [e-256, e) of the prefix of length e), float32 on upcast inputs
        self.slices = []
        for end in sorted({s, max(512, (s // 2) // 512 * 512)}):
            ref = reference_attention(
                self.q[:, end - CHECK_ROWS : end].astype(jnp.float32),
                self.k[:, :end].astype(jnp.float32),
                self.v[:, :end].astype(jnp.float32),
                self.seg[:, :end],
                sliding_window=window,
            )
            self.slices.append((end, np.asarray(ref, np.float32)))

    def error(self, out) -> float:
        """max over slices of ||out - ref|| / ||ref|| (out: [B, S, HQ, D], numpy or jax)."""
        out = np.asarray(jnp.asarray(out, jnp.float32)) if not isinstance(out, np.ndarray) else out
        errs = []
        for end, ref in self.slices:
            got = out[:, end - CHECK_ROWS : end].astype(np.float32)
            if not np.all(np.isfinite(got)):
                return float("nan")
            errs.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
        return max(errs)


def row(results, name, case: Case, ms, err, flops=None, note=""):
    flops = case.flops if flops is None else flops
    tflops = flops / (ms * 1e-3) / 1e12 if ms else None
    failed = err is not None and not (err <= FAIL_ERR)
    r = dict(impl=name, S=case.s, window=case.window, ms=ms, tflops=tflops, err=err,
             status="FAILED" if failed else "ok", note=note)
    results.append(r)
    w = "-" if case.window is None else case.window
    print(f"{name:34s} S={case.s:6d} w={w!s:5s} {ms if ms else float('nan'):9.3f} ms "
          f"{tflops if tflops else float('nan'):7.1f} TFLOP/s err={err if err is not None else float('nan'):.2e} "
          f"{r['status']} {note}", flush=True)
    return r


def bench_ours(doc, case, cfg_txt):
    cfg = parse_config(cfg_txt) if cfg_txt != "default" else {}
    interp = interpret_mode()  # CPU smoke runs only
    fn = jax.jit(lambda q, k, v, seg: image_span_attention(q, k, v, seg, sliding_window=case.window,
                                                         interpret=interp, **cfg))
    name = f"ours[{cfg_txt}]"
    with attempt(doc, f"{name} S={case.s} w={case.window}") as run:  # one config failing to compile is data too
        out = fn(case.q, case.k, case.v, case.seg)
        err = case.error(out)
        ms = time_jax(fn, case.q, case.k, case.v, case.seg, min_rep_ms=MIN_REP_MS)
        dflt = default_config(D, case.s)
        blocks = count_blocks(block_ranges(case.ks, case.ke, block_q=cfg.get("block_q", dflt.block_q),
                                           block_k=cfg.get("block_k", dflt.block_k)))
        row(doc["results"], name, case, ms, err, note=f"blocks={blocks}")
    if run.error:
        row(doc["results"], name, case, None, None, note=f"ERROR {run.error}")


def bench_chunks(doc, specs: str, configs: str) -> None:
    """Prompt chunks as the batching engine runs them: Sq queries at the end of Sk keys (B rows, text and images
    in the usual layout), each config; TFLOP/s over the allowed pairs, error against the float32 reference."""
    interp = interpret_mode()
    for spec in specs.split(","):
        sq, sk, b, wtxt = spec.split(":")
        sq, sk, b = int(sq), int(sk), int(b)
        window = None if wtxt == "none" else int(wtxt)
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(sq + sk), 3)
        q = jax.random.normal(kq, (b, sq, HQ, D), jnp.bfloat16)
        k = jax.random.normal(kk, (b, sk, HKV, D), jnp.bfloat16)
        v = jax.random.normal(kv, (b, sk, HKV, D), jnp.bfloat16)
        seg = jnp.broadcast_to(layout(sk), (b, sk))
        ks, ke = key_intervals(seg, q_len=sq, sliding_window=window)
        flops = 4 * D * HQ * count_allowed_pairs(ks, ke)
        ref = np.asarray(reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                             seg, sliding_window=window))
        for cfg_txt in configs.split(","):
            cfg = parse_config(cfg_txt) if cfg_txt != "default" else {}
            fn = jax.jit(lambda q, k, v, seg: image_span_attention(q, k, v, seg, sliding_window=window,
                                                                 interpret=interp, **cfg))
            name = f"chunk {sq}x{sk} B={b} w={window} ours[{cfg_txt}]"
            with attempt(doc, name) as run:
                out = np.asarray(fn(q, k, v, seg), np.float32)
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                ms = time_jax(fn, q, k, v, seg, min_rep_ms=MIN_REP_MS)
                tf = flops / (ms * 1e-3) / 1e12
                doc["chunks"].append(dict(sq=sq, sk=sk, b=b, window=window, config=cfg_txt, ms=ms, tflops=tf,
                                          err=err, status="ok" if err <= FAIL_ERR else "FAILED"))
                print(f"{name:60s} {ms * 1e3:8.1f} us {tf:6.1f} TFLOP/s err={err:.1e}", flush=True)
            if run.error:
                doc["chunks"].append(dict(sq=sq, sk=sk, b=b, window=window, config=cfg_txt, error=run.error))


def causal_pairs(s, window):
    i = np.arange(s)
    lo = np.zeros(s) if window is None else np.maximum(i - window + 1, 0)
    return int((i + 1 - lo).sum())


def bench_cudnn(results, case):
    kw = {} if case.window is None else {"local_window_size": (case.window - 1, 0)}
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn", **kw))
    ms = time_jax(fn, case.q, case.k, case.v, min_rep_ms=MIN_REP_MS)
    own = 4 * D * HQ * B * causal_pairs(case.s, case.window)
    row(results, "cudnn causal-only (wrong mask)", case, ms, None,
        note=f"own-mask TFLOP/s={own / (ms * 1e-3) / 1e12:.1f}")


def bench_xla(results, case):
    mask = reference_mask(case.seg, sliding_window=case.window)[:, None]  # [B,1,S,S] (peer only)
    fn = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla"))
    out = fn(case.q, case.k, case.v, mask)
    err = case.error(out)
    ms = time_jax(fn, case.q, case.k, case.v, mask, iters=3, reps=5)
    row(results, "xla dense mask", case, ms, err)


def bench_flex(results, case, state):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    if "flex" not in state:
        state["flex"] = torch.compile(flex_attention, dynamic=False)
    flex = state["flex"]
    jax.block_until_ready((case.q, case.k, case.v, case.ks, case.ke))
    t = lambda x: torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous()
    q, k, v = t(case.q), t(case.k), t(case.v)
    ks_t = torch.from_dlpack(case.ks[0]).to(torch.int32)
    ke_t = torch.from_dlpack(case.ke[0]).to(torch.int32)

    def make_mod(ks_, ke_):
        def mask_mod(b, h, qi, kj):
            return (kj >= ks_[qi]) & (kj < ke_[qi])
        return mask_mod

    bm = create_block_mask(make_mod(ks_t, ke_t), None, None, case.s, case.s, device="cuda")
    fn = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)
    out = fn()
    torch.cuda.synchronize()
    err = case.error(out.permute(0, 2, 1, 3).float().cpu().numpy())
    ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
    row(results, "torch flex_attention", case, ms, err)


def bench_tokamax(results, case, kind):
    from tokamax._src.ops.attention import base, pallas_mosaic_gpu, pallas_triton

    op = (pallas_mosaic_gpu.PallasMosaicGpuFlashAttention() if kind == "mosaic"
          else pallas_triton.PallasTritonFlashAttention())
    ks, ke = case.ks[0], case.ke[0]
    fn = jax.jit(lambda q, k, v, a, b: op(q, k, v, mask=base.Mask(k_start=a[None, None], k_end=b[None, None]),
                                        logits_scale=D**-0.5))
    out = fn(case.q, case.k, case.v, ks, ke)
    err = case.error(out)
    ms = time_jax(fn, case.q, case.k, case.v, ks, ke, min_rep_ms=MIN_REP_MS)
    row(results, f"tokamax pallas-{kind}", case, ms, err)


def extra_checks(doc, flags: str = ""):
    """Compiled-kernel correctness on other shapes/dtypes (SigLIP D=72 bidirectional, fp32, fp16, GQA 8)."""
    cases = [
        dict(b=2, s=1000, sq=1000, hq=16, hkv=16, d=72, dtype=jnp.bfloat16, causal=False, window=None),
        dict(b=1, s=777, sq=300, hq=8, hkv=1, d=128, dtype=jnp.float16, causal=True, window=None),
        dict(b=2, s=1500, sq=1500, hq=4, hkv=2, d=64, dtype=jnp.float32, causal=True, window=128),
        dict(b=1, s=2048, sq=2048, hq=8, hkv=4, d=256, dtype=jnp.float32, causal=True, window=None),
    ]
    for i, c in enumerate(cases):
        key = jax.random.PRNGKey(100 + i)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (c["b"], c["sq"], c["hq"], c["d"]), c["dtype"])
        k = jax.random.normal(kk, (c["b"], c["s"], c["hkv"], c["d"]), c["dtype"])
        v = jax.random.normal(kv, (c["b"], c["s"], c["hkv"], c["d"]), c["dtype"])
        pos = np.arange(c["s"])
        seg = segment_ids_from_image_mask(jnp.asarray(np.stack([(pos // (100 + 37 * j)) % 2 == 1
                                                                for j in range(c["b"])])))
        kvl = jnp.asarray([c["s"] - 17 * j for j in range(c["b"])], jnp.int32)
        kw = dict(sliding_window=c["window"], kv_lengths=kvl, causal=c["causal"])
        fl = {}
        if flags:
            fl = dict(fast_exp2="E" in flags)
        desc = {k_: str(v_) for k_, v_ in c.items()} | {"flags": flags or "default"}
        with attempt(doc, f"check {desc}") as run:
            out = image_span_attention(q, k, v, seg, **kw, **fl)
            ref = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), seg, **kw)
            err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            tol = 1e-4 if c["dtype"] == jnp.float32 else FAIL_ERR
            ok = bool(np.isfinite(err) and err <= tol)
        if run.error:
            err, ok = f"ERROR {run.error}", False
        doc["results"].append(dict(impl="check", case=desc, err=err, status="ok" if ok else "FAILED"))
        print(f"check {desc} err={err} {'ok' if ok else 'FAILED'}", flush=True)


def meta_bytes(s: int, block_q: int = 128) -> dict:
    """Mask metadata the kernel reads at length s: segment ids, per-row k_start/k_end, per-block ranges."""
    return {"S": s, "segment_ids": 4 * s, "row_intervals": 8 * s, "block_ranges": 16 * (-(-s // block_q)),
            "dense_bool_mask_would_be": s * s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=out_path("bench_attention.json", fallback_dir="."))
    ap.add_argument("--sizes", default="2048,8192,16384,32768")
    ap.add_argument("--windows", default="none,1024")
    ap.add_argument("--configs", default="default")
    ap.add_argument("--peers", default="cudnn,xla,flex,tokamax_triton,tokamax_mosaic")
    ap.add_argument("--checks", action="store_true", help="compiled correctness on other shapes/dtypes")
    ap.add_argument("--check-flags", default="", help="comma list of kernel flag sets for --checks, e.g. LE,L")
    ap.add_argument("--xla-max", type=int, default=8192)
    ap.add_argument("--chunks", default="", help="only prompt-chunk cases Sq:Sk:B:window, comma-separated, e.g. "
                    "256:1280:1:1024,256:3072:1:none (each of --configs; no peers)")
    args = ap.parse_args()

    info = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for mod in ("torch", "triton", "tokamax"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({type(e).__name__})"
    print(info, flush=True)
    mb = meta_bytes(131072)
    print("mask metadata at 128K:", mb, flush=True)
    results: list = []
    doc = {"info": info, "meta_bytes_128k": mb, "results": results}  # the JSON; attempt adds "errors"
    state: dict = {}
    peers = [p for p in args.peers.split(",") if p]
    if args.chunks:
        doc["chunks"] = []
        bench_chunks(doc, args.chunks, args.configs)
        save_json(args.out, doc)
        return 1 if any(c.get("status") == "FAILED" for c in doc["chunks"]) else 0
    if args.checks:
        for flags in args.check_flags.split(","):
            extra_checks(doc, flags)
    for s in [int(x) for x in args.sizes.split(",")]:
        for wtxt in args.windows.split(","):
            window = None if wtxt == "none" else int(wtxt)
            case = Case(s, window, jax.random.PRNGKey(s + (window or 0)))
            for cfg in args.configs.split(","):
                bench_ours(doc, case, cfg)
            for p in peers:
                if p == "xla" and s > args.xla_max:
                    continue
                with attempt(doc, f"{p} S={s} w={window}") as run:
                    if p == "cudnn":
                        bench_cudnn(results, case)
                    elif p == "xla":
                        bench_xla(results, case)
                    elif p == "flex":
                        bench_flex(results, case, state)
                    elif p.startswith("tokamax_"):
                        bench_tokamax(results, case, p.split("_")[1])
                if run.error:
                    row(results, p, case, None, None, note=f"ERROR {run.error}")
            save_json(args.out, doc)
    print("\nSUMMARY")
    for r in results:
        if r.get("ms"):
            print(f"{r['impl']:34s} S={r['S']:6d} w={r['window']!s:5s} {r['ms']:8.3f} ms "
                  f"{r['tflops']:6.1f} TF err={r['err'] if r['err'] is not None else float('nan'):.1e} {r['status']}")
    failed = [r for r in results if r["status"] == "FAILED" and r["impl"].startswith(("ours", "check"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
