"""Where a prefill call's GPU time goes, by kind of kernel (Gemma-3-4B shapes, random bf16 weights).

Times the Engine's prefill of the benchmarks' prompts (1 image, 8 images, the 8K prompt with 16 images) as
``benchmarks.generate`` does, then traces one call and sums the GPU kernel time per category: SigLIP attention (our
``packed_self_attention``), text attention (``image_span_attention``), cuBLAS GEMMs, XLA fusions, the rest
(copies, memsets). Writes ``trace_prefill.json`` under $OUT when set.

    python -m benchmarks.trace_prefill [--prompts short,multi,8k] [--small]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import make_pixels, make_prompt, out_path, round_up, save_json, spec_of, traced
from benchmarks.generate import time_prefill
from benchmarks.random_init import random_model
from gemma3_jax.runtime.engine import Engine

CATEGORIES = (  # (name, regex on the kernel name): the first match wins
    ("siglip_attention", r"packed_self_attention"),
    ("text_attention", r"image_span_attention"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|sm90_|cublas"),
    ("xla_fusion", r"fusion|wrapped_"),
)


def by_category(rows: list[dict]) -> dict[str, float]:
    """Kernel time (ms) per category from a kernel table's rows (us per call)."""
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        cat = next((c for c, rx in CATEGORIES if re.search(rx, r["name"])), "other")
        out[cat] += r["us_per_step"] / 1e3
    return dict(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default="multi", help="comma list of short, multi, 8k")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="tiny config (CPU check of the code path)")
    args = ap.parse_args()
    spec = spec_of(args.small)
    model = random_model(spec.cfg, jnp.bfloat16)
    rng = np.random.default_rng(0)
    res: dict = dict(jax=jax.__version__, device=str(jax.devices()[0]))
    print(f"jax {jax.__version__} on {jax.devices()[0]}", flush=True)
    for name, (n, imgs) in (("short", spec.short), ("multi", spec.multi), ("8k", spec.mid)):
        if name not in args.prompts.split(","):
            continue
        prompt, px = make_prompt(spec.cfg, n, imgs, rng), make_pixels(spec.cfg, imgs, rng)
        # cache lengths as benchmarks.generate's: the 1-image prompt leaves room for its new tokens
        eng = Engine(model, cache_length=round_up(n + (spec.new if name == "short" else 1)))
        r = time_prefill(eng, prompt, px, args.runs)
        print(f"{name} ({n} tokens, {imgs} images): {r['median_s'] * 1e3:.2f} ms (min {r['min_s'] * 1e3:.2f}, "
              f"bucket {r['bucket']})", flush=True)
        k = traced(lambda: eng.prefill([prompt], px), (), 1, top=10_000)
        if k.get("top"):  # empty off a GPU
            r["kernels_ms"] = k["total_us_per_step"] / 1e3
            r["by_category_ms"] = by_category(k["top"])
            r["top"] = k["top"][:40]
            print(f"  kernels {r['kernels_ms']:.2f} ms: " + ", ".join(
                f"{c} {t:.2f}" for c, t in sorted(r["by_category_ms"].items(), key=lambda kv: -kv[1])))
            for row in k["top"][:25]:
                print(f"    {row['us_per_step'] / 1e3:8.3f} ms x{row['calls_per_step']:<4.0f} {row['name']}")
        else:
            print(f"  no GPU kernels traced ({jax.default_backend()}): {k.get('error', '')}"[:300])
        res[name] = r
        save_json(out_path("trace_prefill.json"), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
