"""Batch-1 decode under variants of the kernel settings (``Kernels`` fields), interleaved in one process (GPU).

Timings of the same code differ between processes and machines by a few percent, more than the changes these
settings make, so every variant runs over one random 4B model (and its quantized copies) in alternating rounds.
Each variant gets its own Engine; the prefill calls they share compile once (a persistent compilation cache).
Reports ms per decode step (256 new tokens after the 1-image prompt, median of 2 runs a round) per round.

    python -m benchmarks.decode_variants [--modes bf16,int8] [--variants default,combine,combine_prefetch_6m]
        [--rounds 2] [--small] [--out PATH]

Writes --out, else $OUT/decode_variants.json, else ./decode_variants.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import make_pixels, make_prompt, out_path, round_up, save_json, spec_of
from benchmarks.generate import time_decode
from benchmarks.random_init import random_model
from gemma3_jax.model.kernels import Kernels, with_kernels
from gemma3_jax.model.quant import quantize_model
from gemma3_jax.runtime.engine import Engine

VARIANTS = {  # name -> Kernels fields changed from the library's defaults
    "default": {},
    "separate_combine": {"combine_max_splits": 0},  # the attention combine as its own kernel, XLA's output product
    "combine": {"combine_max_splits": 16},  # the combine inside the output product (gemv.combine_gemv)
    "prefetch_3m": {"prefetch_bytes": 3 << 20},
    "prefetch_6m": {"prefetch_bytes": 6 << 20},
    "prefetch_12m": {"prefetch_bytes": 12 << 20},
    "combine_prefetch_6m": {"combine_max_splits": 16, "prefetch_bytes": 6 << 20},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="bf16,int8", help="bf16 and/or quantize modes (int8, fp8)")
    ap.add_argument("--variants", default="default,combine,combine_prefetch_6m", help=f"of {list(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="tiny config (CPU check of the script)")
    ap.add_argument("--out", default=out_path("decode_variants.json", fallback_dir="."))
    args = ap.parse_args()
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jaxcache_variants_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    spec = spec_of(args.small)
    rng = np.random.default_rng(0)
    prompt = make_prompt(spec.cfg, *spec.short, rng)
    px = make_pixels(spec.cfg, spec.short[1], rng)
    base = random_model(spec.cfg, jnp.bfloat16)
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__, "new_tokens": spec.new, "step_ms": {}}
    for mode in args.modes.split(","):
        model = base if mode == "bf16" else quantize_model(base, mode)
        engines = {name: Engine(with_kernels(model, dataclasses.replace(Kernels.resolve("auto"), **VARIANTS[name])),
                                cache_length=round_up(spec.short[0] + spec.new)) for name in names}
        for rnd in range(args.rounds):
            for name in names:
                r = time_decode(engines[name], [prompt], px, spec.new, 2)
                res["step_ms"].setdefault(f"{mode} {name}", []).append(round(r["step_ms"], 4))
                save_json(args.out, res)
                print(f"{time.strftime('%H:%M:%S')} {mode:5s} {name:18s} round {rnd}: {r['tok_per_s']:8.1f} tok/s "
                      f"{r['step_ms']:.4f} ms a step", flush=True)
        del engines, model


if __name__ == "__main__":
    main()
