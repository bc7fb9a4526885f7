"""KV cache, prefill and decode against full forwards and transformers' generate (float32, CPU)."""

from fixtures import hf_checkpoints as hfc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TOL, rel_err
from fixtures.hf_checkpoints import multimodal_batch

import gemma3_jax
from gemma3_jax.runtime.engine import Engine
from gemma3_jax.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def mm(tiny_mm):
    path, hf = tiny_mm
    return gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False), hf


@pytest.fixture(scope="module")
def mm_engine(mm):
    """One engine for the multimodal tests, so its compiled steps are reused."""
    return Engine(mm[0], cache_length=96, chunk=8)


def _prompts(ids, mask):
    return [list(map(int, row[: int(m.sum())])) for row, m in zip(ids, mask)]


def test_decode_logits_equal_full_forward(mm, mm_engine):
    """Teacher-forced decode past several sliding windows (window 8) equals the full forward at each position."""
    model, _ = mm
    ids, px, mask = multimodal_batch()
    prompts = _prompts(ids, mask)  # lengths 48 and 26
    steps = 20
    cache, _, logits0 = mm_engine.prefill(prompts, px)
    rng = np.random.default_rng(3)
    forced = rng.integers(3, hfc.BOI - 1, size=(2, steps)).astype(np.int32)
    full = [p + list(f) for p, f in zip(prompts, forced)]
    length = max(map(len, full))
    full_ids = np.zeros((2, length), np.int32)
    full_mask = np.zeros((2, length), np.int32)
    for r, row in enumerate(full):
        full_ids[r, : len(row)] = row
        full_mask[r, : len(row)] = 1
    ref = np.asarray(model(full_ids, px, full_mask))
    lens = [len(p) for p in prompts]
    worst = rel_err(logits0, np.stack([ref[r, lens[r] - 1] for r in range(2)]))
    step = jax.jit(lambda c, t: model.text.decode_step(model.text.embed_tokens(t[:, None]), c))
    for i in range(steps):
        hidden, cache = step(cache, jnp.asarray(forced[:, i]))
        got = np.asarray(model.text.logits(hidden))[:, 0]
        want = np.stack([ref[r, lens[r] + i] for r in range(2)])
        worst = max(worst, rel_err(got, want))
    print(f"\ndecode vs full forward, {steps} steps past the window: {worst:.2e}")
    assert worst <= TOL


def _hf_greedy(hf, prompt, pixels, n):
    t = torch.tensor([prompt])
    kw = {}
    if pixels is not None:
        kw = dict(pixel_values=torch.tensor(pixels), token_type_ids=(t == hfc.IMAGE_TOKEN).long())
    with torch.no_grad():
        out = hf.generate(input_ids=t, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_hf_generate_multimodal_batch(mm, mm_engine):
    """Two prompts of different lengths (4 images and 1 image) in one batch, 32 new tokens each."""
    _, hf = mm
    ids, px, mask = multimodal_batch()
    prompts = _prompts(ids, mask)
    ours = np.concatenate(list(mm_engine.generate_ids(prompts, px, max_new_tokens=32, stop_ids=())), axis=1)
    n0 = prompts[0].count(hfc.IMAGE_TOKEN) // hfc.MM_TOKENS
    for r, pixels in enumerate((px[:n0], px[n0:])):
        want = _hf_greedy(hf, prompts[r], pixels, 32)
        assert len(set(want)) > 3  # a continuation that moves, not one repeated token
        assert ours[r].tolist() == want, f"row {r}"


def test_text_only_greedy_and_stop_token(tiny_text):
    path, hf = tiny_text
    model = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
    prompt = [2, 17, 33, 5, 9, 100, 7, 250, 11]
    want = _hf_greedy(hf, prompt, None, 24)
    engine = Engine(model, cache_length=64, chunk=5)
    got = np.concatenate(list(engine.generate_ids([prompt], max_new_tokens=24, stop_ids=())), axis=1)[0]
    assert got.tolist() == want
    stop = want[6]  # stopping on a token ends that row right after it
    first = want.index(stop)
    got = np.concatenate(list(engine.generate_ids([prompt], max_new_tokens=24, stop_ids=(stop,))), axis=1)[0]
    assert got.tolist() == want[: first + 1]


def test_chunks_cover_exactly_the_new_tokens(tiny_text):
    """Chunks are queued ahead of reading: the last one still ends at max_new_tokens, with no empty chunk after it
    (10 steps after the prefill's token = two chunks of 5; 12 steps = 5 + 5 + 2)."""
    model = gemma3_jax.load_pretrained(tiny_text[0], dtype=jnp.float32, progress=False)
    engine = Engine(model, cache_length=64, chunk=5)
    for new, sizes in ((11, [1, 5, 5]), (13, [1, 5, 5, 2])):
        chunks = list(engine.generate_ids([[2, 17, 33, 5]], max_new_tokens=new, stop_ids=()))
        assert [c.shape[1] for c in chunks] == sizes


def test_sampling_is_seeded(mm_engine):
    engine = mm_engine
    ids, px, mask = multimodal_batch()
    prompts = _prompts(ids, mask)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)

    def run(seed):
        chunks = engine.generate_ids(prompts, px, max_new_tokens=16, params=params, stop_ids=(), seed=seed)
        return np.concatenate(list(chunks), axis=1)

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a != run(2**32 + 1)).any()  # jax.random.key keeps 32 bits: 2**32 + 1 was seed 1
    greedy = np.concatenate(list(engine.generate_ids(prompts, px, max_new_tokens=16, stop_ids=())), axis=1)
    assert (a != greedy).any()


def test_cache_bytes(mm):
    """Global layers hold the full length, sliding layers a ring of window slots; the count matches the buffers."""
    from gemma3_jax.model.kv_cache import cache_nbytes, init_cache

    cfg = mm[0].cfg.text  # 7 layers: 6 sliding (window 8), 1 global
    cache = init_cache(cfg, 2, 96, jnp.float32)
    assert [k.shape[1] for k in cache.k] == [8, 8, 8, 8, 8, 96, 8]
    assert cache.nbytes == cache_nbytes(cfg, 2, 96, jnp.float32) == 2 * 2 * 2 * 32 * 4 * (6 * 8 + 96)


def test_engine_rejects_bad_requests(mm):
    model, _ = mm
    engine = Engine(model, cache_length=32)
    with pytest.raises(ValueError, match="exceeds the cache length 32"):
        list(engine.generate_ids([[2] * 20], max_new_tokens=20))
    with pytest.raises(ValueError, match="empty prompt"):
        list(engine.generate_ids([[]], max_new_tokens=4))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=1.0, top_p=0.0)
    # prompt rows that are not int ids: refused naming the row (a float was truncated into the padded ids before)
    for rows, error, match in (([[2, 3.7]], TypeError, "prompt 0 must be a list of int token ids"),
                               ([[2], "abc"], TypeError, "prompt 1 must be a list of int token ids"),
                               ([[2], [[2, 3]]], TypeError, "prompt 1 must be a list of int token ids"),
                               ([], ValueError, "no prompts: the list of prompts is empty")):
        with pytest.raises(error, match=match):
            next(engine.generate_ids(rows, max_new_tokens=2))
    with pytest.raises(ValueError, match=r"temperature must be finite \(in float32\)"):
        SamplingParams(temperature=1e39)  # a Python float, but inf in the float32 the steps divide in
    assert SamplingParams(temperature=1.0, top_k=10**30).top_k == 2**31 - 1  # every token either way; int32 holds it
    # refused before the prompt is prefilled (at the generator's first step), naming the argument
    with pytest.raises(TypeError, match="stop_ids must be a sequence of token ids"):
        next(engine.generate_ids([[2, 3]], max_new_tokens=4, stop_ids="ab"))
    with pytest.raises(ValueError, match=r"stop_ids must lie in \[0, "):
        next(engine.generate_ids([[2, 3]], max_new_tokens=4, stop_ids=(2**40,)))


def test_packed_norm_weights_unpack_to_the_same_leaves(mm, mm_engine):
    """Prefill receives the norm vectors packed one array per layer; unpacking gives back every leaf exactly,
    in order, and only 1-D norm leaves were packed."""
    from flax import nnx

    from gemma3_jax.runtime.engine import PackedWeights

    _, state = nnx.split(mm[0])
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    packing, rest, groups = PackedWeights.plan(state)
    out = packing.unpack(rest, groups)
    assert len(out) == len(leaves)
    for (path, x), y in zip(leaves, out):
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    packed = {i for i, *_ in packing.small}
    assert packed and all(leaves[i][1].ndim == 1 and "norm" in jax.tree_util.keystr(leaves[i][0]) for i in packed)
    n_layers = len(mm[0].text.layers) + len(mm[0].vision.layers)
    assert n_layers < len(groups) < len(packed)  # one group per layer (+ the top-level norms), not one per vector
    # prefill's two calls take the text and the vision weights apart, with the norms packed
    text, vision = mm_engine._text_weights, mm_engine._vision_weights
    assert text.num_arrays + vision.num_arrays < len(leaves)
    assert len(text.rest) + len(vision.rest) + len(text.packing.small) + len(vision.packing.small) == len(leaves)
    # decode takes the text decoder's weights as they are, and only those
    assert len(mm_engine.weights) == len(text.rest) + len(text.packing.small) == len(jax.tree.leaves(nnx.split(
        mm[0].text)[1]))


def test_prefill_runs_the_vision_tower_as_a_call_of_its_own(mm):
    """Prefill is two compiled calls, the vision tower (with the projector) and the text decoder, given disjoint
    shares of the weights; a prompt without images compiles and runs no vision call. Both give the full
    forward's last-token logits."""
    model = mm[0]
    engine = Engine(model, cache_length=64)
    text, vision = engine._text_weights, engine._vision_weights
    assert not {id(x) for x in text.rest} & {id(x) for x in vision.rest}
    prompt = [2, 17, 33, 5, 9, 100]
    _, _, logits = engine.prefill([prompt])
    assert [key[0] for key in engine._compiled] == ["prefill"]
    assert rel_err(logits[0], model(np.array([prompt]))[0, -1]) <= TOL
    ids, px, mask = multimodal_batch()
    prompts = _prompts(ids, mask)
    _, _, logits = engine.prefill(prompts, px)
    assert sorted(key[0] for key in engine._compiled) == ["prefill", "prefill", "vision"]
    full = model(ids, px, mask)
    for row, p in enumerate(prompts):
        assert rel_err(logits[row], full[row, len(p) - 1]) <= TOL
    # the same calls, one at a time (what a profiler times): the text call already holds the vision call's output
    calls = engine.prefill_calls(prompts, px)
    assert [c.name for c in calls] == ["vision", "prefill"]
    assert (calls[0].weight_arrays, calls[1].weight_arrays) == (vision.num_arrays, text.num_arrays)
    np.testing.assert_array_equal(calls[1]()[2], logits)
    assert [c.name for c in engine.prefill_calls([prompt])] == ["prefill"]


def test_decode_fn_fixed_steps(tiny_text):
    """``decode_fn(fixed_steps=True)`` runs ``chunk`` steps whatever the limit and the rows' state; the default stops
    at the limit."""
    model = gemma3_jax.load_pretrained(tiny_text[0], dtype=jnp.float32, progress=False)
    engine = Engine(model, cache_length=64, chunk=6)
    cache, token, _ = engine.prefill([[2, 17, 33]], max_new_tokens=10)
    done, remaining = jnp.zeros((1,), bool), jnp.full((1,), 10, jnp.int32)
    stops = jnp.full((8,), -1, jnp.int32)
    for fixed, want in ((False, 2), (True, 6)):
        fn = jax.jit(engine.decode_fn(SamplingParams(), fixed_steps=fixed))
        n = fn(engine.weights, cache, token, done, remaining, jax.random.key(0), stops, jnp.int32(2))[-1]
        assert int(n) == want


def test_buckets_bound_the_padding():
    """Prompt buckets: multiples of 16, coarse up to 256 tokens, then at most 12.5% of a prompt is padding; the
    cache length caps them."""
    from gemma3_jax.runtime.engine import BUCKETS, bucket_length

    assert list(BUCKETS) == sorted(set(BUCKETS)) and all(b % 16 == 0 for b in BUCKETS)
    assert [bucket_length(n, 10**9) for n in (1, 33, 200, 257, 323, 2353)] == [32, 48, 256, 288, 352, 2560]
    for n in range(257, BUCKETS[-1] + 1, 97):
        assert n <= bucket_length(n, 10**9) <= 1.125 * n
    assert bucket_length(300, 320) == 320 and bucket_length(BUCKETS[-1] + 5, BUCKETS[-1] + 100) == BUCKETS[-1] + 100
