"""What 8-bit and 4-bit weights cost in quality, on the one real checkpoint: Gemma-3 270M (the default GGUF model).

Teacher-forced over the first ``--tokens`` tokens of each of eight texts (four of this repository's: markdown with
tables and numbers, and code; four of English prose: the GPL-3 and Apache-2.0 licences, two sections of the Python
reference), each mode's next-token predictions against the unquantized model in the same dtype: top-1
agreement (pooled over every position of every text) and perplexity of the text itself (pooled). Modes: the model
as loaded ("none"), and ``quantize`` "int8", "fp8" and "int4" (``gemma3_jax.model.quant``), quantized from the weights in
``--dtype``. float32 (on a CPU) shows the quantization's effect alone; bfloat16 is how a GPU runs it.

    python -m benchmarks.quant_quality [--dtype float32|bfloat16] [--modes none,int8,fp8,int4] [--tokens 768]

Writes quant_quality.json under $OUT when set (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import log, out_path, save_json
from gemma3_jax.checkpoints.checkpoint import Checkpoint
from gemma3_jax.checkpoints.loading import load_pretrained
from gemma3_jax.model.quant import weight_bytes

ROOT = Path(__file__).resolve().parents[1]
REPO_TEXTS = ("README.md", "docs/benchmarks.md", "docs/kernel_notes.md", "gemma3_jax/runtime/engine.py")
LICENCES = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")
TOPICS = ("assignment", "compound")  # sections of pydoc_data.topics (the Python reference)


def texts() -> dict[str, str]:
    import pydoc_data.topics

    out = {name: (ROOT / name).read_text() for name in REPO_TEXTS}
    out.update({Path(p).name: Path(p).read_text() for p in LICENCES if Path(p).exists()})
    out.update({f"python-{t}": pydoc_data.topics.topics[t] for t in TOPICS})
    return out


def predictions(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 next token at each position, log-probability of the actual next token) of one sequence."""
    logits = model(np.asarray([ids], np.int32))[0].astype(jnp.float32)  # the model's own compiled forward
    logp = jax.nn.log_softmax(logits[:-1], axis=-1)
    target = jnp.asarray(ids[1:])
    return np.asarray(logits.argmax(-1)), np.asarray(jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the Gemma-3 270M GGUF)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--modes", default="none,int8,fp8,int4,bfloat16",
                    help="quantize modes, 'none', and 'bfloat16' (unquantized in bfloat16: for scale, how much "
                    "bfloat16 rounding alone moves the top-1 token against a float32 run)")
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    ckpt = Checkpoint.open(args.model, progress=False)
    seqs = {}
    for name, text in texts().items():
        ids = ckpt.tokenizer.encode(text, add_bos=True)[: args.tokens]
        if len(ids) < args.tokens:
            raise ValueError(f"{name} holds only {len(ids)} tokens, {args.tokens} asked")
        seqs[name] = ids
    dtype = jnp.dtype(args.dtype)
    res: dict = dict(jax=jax.__version__, device=str(jax.devices()[0]), dtype=args.dtype, tokens=args.tokens,
                     texts=list(seqs), modes={})
    log(f"jax {jax.__version__} on {res['device']}, {len(seqs)} texts x {args.tokens} tokens, compute {args.dtype}")
    base: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for mode in modes:
        if mode == "bfloat16":
            model = load_pretrained(ckpt.path, dtype=jnp.bfloat16, progress=False)
        else:
            model = load_pretrained(ckpt.path, dtype=dtype, progress=False, quantize=None if mode == "none" else mode)
        got = {name: predictions(model, ids) for name, ids in seqs.items()}
        if mode == "none" or not base:
            base = got
        per = {}
        for name in seqs:
            top, logp = got[name]
            per[name] = dict(top1_agreement=float((top == base[name][0]).mean()), nll=float(-logp.mean()))
        top = np.concatenate([got[n][0] for n in seqs])
        ref = np.concatenate([base[n][0] for n in seqs])
        nll = np.concatenate([-got[n][1] for n in seqs])
        r = dict(top1_agreement=float((top == ref).mean()), differ=int((top != ref).sum()),
                 perplexity=float(np.exp(nll.mean())), per_text=per,
                 weight_bytes=weight_bytes(model.text))
        res["modes"][mode] = r
        log(f"{mode}: top-1 agreement with the unquantized model {r['top1_agreement'] * 100:.2f}% ({r['differ']} of "
            f"{len(top)} differ), perplexity {r['perplexity']:.3f}, text weights {r['weight_bytes'] / 2**20:.1f} MiB")
        del model
    if "none" in res["modes"]:
        for mode, r in res["modes"].items():
            r["perplexity_change"] = r["perplexity"] / res["modes"]["none"]["perplexity"] - 1
    save_json(out_path("quant_quality.json", args.out), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
