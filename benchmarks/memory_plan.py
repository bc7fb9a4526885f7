"""What each device holds for Gemma-3 4B / 12B / 27B split over N devices (``gemma3_jax.model.sharding``), computed
from the configs: bf16 weights + KV cache per device at 8K / 32K / 128K tokens, and the smallest N that fits an
80 GB (H100) and a 141 GB (H200) GPU with a tenth kept free for activations and compiled code. Prints the
markdown table of docs/tensor_parallel.md.

With ``--quantize int8`` (or fp8) the text weights count one byte each plus their float32 scales.

    python -m benchmarks.memory_plan [--batch 1] [--quantize int8]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from gemma3_jax.model.presets import preset
from gemma3_jax.model.sharding import memory_plan

SIZES = ("gemma3_4b", "gemma3_12b", "gemma3_27b")
CONTEXTS = (8192, 32768, 131072)
DEVICES = (1, 2, 4, 8)
GPUS = (("H100 80 GB", 80e9), ("H200 141 GB", 141e9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="sequences held in the KV cache")
    ap.add_argument("--quantize", default=None, help="int8 or fp8 text weights (gemma3_jax.model.quant)")
    args = ap.parse_args()
    print("| model | context | " + " | ".join(f"N={n} (GiB/device)" for n in DEVICES) + " | " +
          " | ".join(f"smallest N, {g}" for g, _ in GPUS) + " |")
    print("|---" * (2 + len(DEVICES) + len(GPUS)) + "|")
    for name in SIZES:
        cfg = preset(name)
        for ctx in CONTEXTS:
            plans = {n: memory_plan(cfg, jnp.bfloat16, n, args.batch, ctx, args.quantize) for n in DEVICES}
            cells = [f"{p['weights'] / 2**30:.1f} + {p['kv_cache'] / 2**30:.1f}" for p in plans.values()]
            fits = [next((str(n) for n, p in plans.items() if p["total"] <= 0.9 * cap), "> 8") for _, cap in GPUS]
            print(f"| {name[7:].upper()} | {ctx // 1024}K | " + " | ".join(cells) + " | " + " | ".join(fits) + " |")


if __name__ == "__main__":
    main()
