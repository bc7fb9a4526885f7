#!/usr/bin/env python3
"""Draw Gemma-3's attention mask (allowed = 1) for a prompt with two images: a global and a sliding layer.

    python scripts/plot_mask.py                      # writes docs/mask.png
    python scripts/plot_mask.py --out /tmp/mask.png --window 16 --image-tokens 12

The mask comes from ``pallas_kernels.reference_mask`` on segment ids built by
``segment_ids_from_image_mask``; ``plot_masks`` is reused by notebooks/quickstart.ipynb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pallas_kernels import reference_mask, segment_ids_from_image_mask  # noqa: E402

ALLOWED, MASKED = "#1f3b73", "#f3f3f3"
IMAGE_COLORS = ["#e8832a", "#2ca05a", "#9467bd", "#d62728", "#17becf", "#bcbd22"]


def spans(segment_ids, kv_length: int) -> list[tuple[int, int, str, str]]:
    """Maximal runs [start, end) labelled "text", "image k" or "pad", with their band colour."""
    seg = np.asarray(segment_ids)

    def label(p):
        if p >= kv_length:
            return "pad", "#b22222"
        return ("text", "#9a9a9a") if seg[p] < 0 else (f"image {seg[p]}", IMAGE_COLORS[seg[p] % 6])

    out, start = [], 0
    for p in range(1, len(seg) + 1):
        if p == len(seg) or label(p) != label(start):
            out.append((start, p, *label(start)))
            start = p
    return out


def _panel(ax, mask, runs, title, window=None):
    s = mask.shape[0]
    ax.imshow(mask, cmap=matplotlib.colors.ListedColormap([MASKED, ALLOWED]), vmin=0, vmax=1,
              interpolation="nearest", extent=(-0.5, s - 0.5, s - 0.5, -0.5))
    band = max(1.5, s / 40)
    for a, b, _, color in runs:  # colored bands above (keys) and left of (queries) the mask
        ax.add_patch(plt.Rectangle((a - 0.5, -0.5 - band), b - a, band, color=color, clip_on=False))
        ax.add_patch(plt.Rectangle((-0.5 - band, a - 0.5), band, b - a, color=color, clip_on=False))
        if a:
            for line in (ax.axvline, ax.axhline):
                line(a - 0.5, color="#bbbbbb" if color == "#9a9a9a" else color, lw=0.6, alpha=0.7)
    if window is not None:
        ax.plot([-0.5, s - window - 0.5], [window - 0.5, s - 0.5], ls="--", lw=1, color="#d62728",
                label=f"j = i - {window} (window edge)")
        ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ticks = [(a + b - 1) / 2 for a, b, *_ in runs]
    labels = [name for _, _, name, _ in runs]
    narrow = min(b - a for a, b, *_ in runs) < s / 25  # rotate key labels only when spans are narrow
    ax.set_xticks(ticks, labels, rotation=90 if narrow else 0, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.xaxis.tick_top()
    for tl_x, tl_y, (_, _, _, color) in zip(ax.get_xticklabels(), ax.get_yticklabels(), runs):
        tl_x.set_color(color if color != "#9a9a9a" else "#555555")
        tl_y.set_color(color if color != "#9a9a9a" else "#555555")
    ax.tick_params(length=0, pad=2 + 220 * band / s)  # clear the bands (~330 pt wide axes)
    ax.set_xlim(-0.5 - band, s - 0.5)
    ax.set_ylim(s - 0.5, -0.5 - band)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(title, fontsize=10, pad=8 + (40 if narrow else 12))


def plot_masks(segment_ids, sliding_window: int, kv_length: int | None = None, title: str | None = None):
    """Figure with the global-layer and sliding-layer masks of one row (segment_ids [S], -1 = text)."""
    seg = np.asarray(segment_ids, np.int32).reshape(-1)
    s = len(seg)
    kv = s if kv_length is None else int(kv_length)
    runs = spans(seg, kv)
    kw = dict(kv_lengths=np.array([kv]))
    glob = np.asarray(reference_mask(seg[None], **kw)[0])
    slid = np.asarray(reference_mask(seg[None], sliding_window=sliding_window, **kw)[0])
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.1), constrained_layout=True)
    _panel(axes[0], glob, runs, "global layer: j <= i or same image")
    _panel(axes[1], slid, runs, f"sliding layer (window {sliding_window}): also j > i - {sliding_window}",
           window=sliding_window)
    fig.suptitle(title or f"Gemma-3 attention mask, {s} tokens (dark = allowed = 1)", fontsize=12)
    return fig


def demo_segment_ids(image_tokens: int = 12, pad: int = 4):
    """~80 tokens: text, image 0, text, image 1, text, then `pad` right-padding positions."""
    layout = [(10, False), (image_tokens, True), (18, False), (image_tokens, True), (28 - pad, False)]
    is_image = np.concatenate([np.full(n, img) for n, img in layout] + [np.zeros(pad, bool)])
    return np.asarray(segment_ids_from_image_mask(is_image[None]))[0], len(is_image) - pad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "mask.png"))
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--image-tokens", type=int, default=12)
    p.add_argument("--pad", type=int, default=4, help="right-padding positions (keys never attended)")
    args = p.parse_args(argv)
    plt.switch_backend("Agg")  # headless; importers (the notebook) keep their own backend
    seg, kv = demo_segment_ids(args.image_tokens, args.pad)
    fig = plot_masks(seg, args.window, kv_length=kv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
