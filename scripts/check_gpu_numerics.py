#!/usr/bin/env python3
"""On the GPU: the model through the compiled Pallas kernels (text and vision) against transformers.

A tiny random multimodal Gemma-3 (7 layers, window 8, 5 images over 2 rows, right padding) in float32:
max |dlogit| / max |logit| of our logits vs transformers' on the same GPU (no TF32 on either side), and
greedy generation (KV cache, donated buffers, on-device sampling) vs transformers' generate.
Prints one line per check; exits non-zero when a check fails.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import hf_checkpoints as hfc  # noqa: E402
from test_parity import multimodal_batch  # noqa: E402

import gemma3_jax  # noqa: E402
from gemma3_jax.engine import Engine  # noqa: E402


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}")
    ok = True
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        hf = hfc.make_multimodal(path, seed=0).to("cuda").eval()
        model = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
        assert model.attention == "auto" and jax.default_backend() == "gpu"
        ids, px, mask = multimodal_batch()
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
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
