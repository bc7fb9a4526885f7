#!/usr/bin/env python3
"""Plot docs/bench_attention_h200.json: effective TFLOP/s vs sequence length, full mask and window 1024.

    python scripts/plot_benchmarks.py                 # writes docs/attention_bench.png
    python scripts/plot_benchmarks.py --json other.json --out /tmp/bench.png

``plot_benchmarks`` is reused by notebooks/quickstart.ipynb.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
CEILING = "cudnn causal-only (wrong mask)"
# impl name in the JSON -> (legend label, colour, marker), in legend order
STYLE = {
    "ours[default]": ("ours (Pallas-Triton)", "#1f3b73", "o"),
    "tokamax pallas-mosaic": ("tokamax Mosaic-GPU", "#e8832a", "s"),
    "torch flex_attention": ("FlexAttention", "#2ca05a", "^"),
    "tokamax pallas-triton": ("tokamax Pallas-Triton", "#9467bd", "v"),
    "xla dense mask": ("XLA dense [S,S] mask", "#8c564b", "D"),
    CEILING: ("cuDNN causal-only (ceiling: wrong mask)", "#777777", "x"),
}


def load(path=ROOT / "docs" / "bench_attention_h200.json") -> dict:
    return json.loads(Path(path).read_text())


def plot_benchmarks(bench: dict | str | Path | None = None):
    """Two panels (full image-span mask, sliding window 1024) of effective TFLOP/s per implementation."""
    bench = load(bench) if isinstance(bench, (str, Path)) else (bench or load())
    rows = [r for r in bench["results"] if r.get("impl") != "check" and r.get("status") == "ok"]
    windows = sorted({r["window"] for r in rows}, key=lambda w: (w is not None, w or 0))
    impls = list(STYLE) + sorted({r["impl"] for r in rows} - set(STYLE))
    sizes = sorted({r["S"] for r in rows})
    fig, axes = plt.subplots(1, len(windows), figsize=(6 * len(windows), 4.6), sharey=True, constrained_layout=True)
    for ax, window in zip(list(axes) if len(windows) > 1 else [axes], windows):
        for impl in impls:
            pts = sorted((r["S"], r["tflops"]) for r in rows if r["impl"] == impl and r["window"] == window)
            if not pts:
                continue
            label, color, marker = STYLE.get(impl, (impl, None, "."))
            ceiling = impl == CEILING
            ax.plot(*zip(*pts), label=label, color=color, marker=marker, ls="--" if ceiling else "-",
                    lw=1.2 if ceiling else (2.4 if impl == "ours[default]" else 1.5), ms=5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{s // 1024}K" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("sequence length S (prefill, B=1)")
        ax.set_title("full image-span mask" if window is None else f"sliding window {window}")
        ax.grid(alpha=0.3)
    first = list(axes)[0] if len(windows) > 1 else axes
    first.set_ylabel("effective TFLOP/s (allowed pairs only)")
    first.set_ylim(bottom=0)
    first.legend(fontsize=8, loc="upper left")
    info = bench.get("info", {})
    fig.suptitle(f"Gemma-3-4B attention (Hq=8, Hkv=4, D=256, bf16) on {info.get('device', '?')}, "
                 f"jax {info.get('jax', '?')}, {info.get('date', '')}", fontsize=11)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=str(ROOT / "docs" / "bench_attention_h200.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "attention_bench.png"))
    args = p.parse_args(argv)
    plt.switch_backend("Agg")  # headless; importers (the notebook) keep their own backend
    fig = plot_benchmarks(args.json)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
