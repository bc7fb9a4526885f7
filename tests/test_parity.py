"""Whole-model logits against transformers (float32, CPU), tiny random checkpoints.

Tolerance: max |dlogit| <= 1e-4 * max |logit| over the valid (non-padded) positions.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TOL, rel_err
from fixtures import hf_checkpoints as hfc
from fixtures.hf_checkpoints import multimodal_batch

import gemma3_jax
from gemma3_jax.model.kernels import AttentionBatch, with_kernels

I, B_, E_ = hfc.IMAGE_TOKEN, hfc.BOI, hfc.EOI
T = hfc.MM_TOKENS


def hf_logits(model, ids, pixels=None, mask=None):
    kw = {}
    if pixels is not None:
        kw = dict(pixel_values=torch.tensor(pixels), token_type_ids=torch.tensor(ids == I).long())
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask), **kw
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def mm_pair(tiny_mm):
    path, hf = tiny_mm
    return gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False), hf


def test_multimodal_logits_match_transformers(mm_pair):
    ours_model, hf = mm_pair
    ids, pixels, mask = multimodal_batch()
    assert ids.shape[1] > hfc.text_config()["sliding_window"]
    ref = hf_logits(hf, ids, pixels, mask)
    ours = np.asarray(ours_model(ids, pixels, mask))
    assert ours.shape == ref.shape == (2, ids.shape[1], hfc.VOCAB)
    err = rel_err(ours, ref, mask.astype(bool))
    print(f"\ntiny multimodal (5 images, window 8, right padding): max|dlogit|/max|logit| = {err:.2e}")
    assert err <= TOL


def test_image_longer_than_window(tmp_path):
    """Sliding window 3 < 4 soft tokens per image: the window cuts into the image's bidirectional block."""
    hf = hfc.make_multimodal(tmp_path, seed=3, text=dict(sliding_window=3))
    ours_model = gemma3_jax.load_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    ids, pixels, mask = multimodal_batch(seed=5)
    err = rel_err(ours_model(ids, pixels, mask), hf_logits(hf, ids, pixels, mask), mask.astype(bool))
    print(f"\ntiny multimodal, window 3 < image: {err:.2e}")
    assert err <= TOL


def test_image_mask_matters(mm_pair):
    """With causal-only attention the logits at image positions and after leave the tolerance."""
    model, hf = mm_pair
    ids, pixels, mask = multimodal_batch()
    ref = hf_logits(hf, ids, pixels, mask)
    ids_j, px_j, kv = model.check_inputs(ids, pixels, mask)
    x = model.embed(ids_j, px_j)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    causal_only = jnp.full(ids.shape, -1, jnp.int32)
    hidden, _ = with_kernels(model.text, "reference")(x, AttentionBatch(pos, causal_only, kv))
    logits = np.asarray(model.text.logits(hidden))
    first_image = int(np.argmax(ids[1] == I))
    before = rel_err(logits[1, :first_image], ref[1, :first_image])
    after = rel_err(logits[1, first_image : mask[1].sum()], ref[1, first_image : mask[1].sum()])
    print(f"\ncausal-only: before the image {before:.2e}, from the image on {after:.2e}")
    assert before <= TOL  # nothing differs before the first image
    assert after > 100 * TOL


def test_text_only_logits_match_transformers(tiny_text):
    path, hf = tiny_text
    model = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
    rng = np.random.default_rng(7)
    ids = rng.integers(0, hfc.VOCAB, size=(3, 40))
    mask = np.ones_like(ids)
    mask[1, 33:] = 0
    mask[2, 9:] = 0
    ref = hf_logits(hf, ids, None, mask)
    err = rel_err(model(ids, attention_mask=mask), ref, mask.astype(bool))
    print(f"\ntiny text-only (window 8, 40 tokens, padding): {err:.2e}")
    assert err <= TOL
    err_nomask = rel_err(model(ids[:1]), hf_logits(hf, ids[:1]))
    assert err_nomask <= TOL
