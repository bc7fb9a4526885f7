"""Chunked prefill into cache rows (``TextModel.prefill_chunk``) equals the one-shot forward, float32 on the CPU.

A chunk attends to the keys its slot already holds plus its own; chunk ends snap to image ends (``chunk_end``).
Every position's logits of every chunk are compared with the full forward's, so an error at any chunk edge shows.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma3_jax
from fixtures.hf_checkpoints import IMAGE_TOKEN, MM_TOKENS, _row
from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.gemma3 import embed_with_features

CHUNK_TOL = 1e-5  # relative to the largest logit (float32)
SLOTS, CACHE = 3, 128


@pytest.fixture(scope="module")
def model(tiny_mm):
    return gemma3_jax.load_pretrained(tiny_mm[0], dtype=jnp.float32, progress=False)


@pytest.fixture(scope="module")
def steps(model):
    text, cfg = model.text, model.cfg

    @jax.jit
    def features(px):
        return model.image_features(px)

    @functools.partial(jax.jit, static_argnames="fresh")
    def chunk_call(cache, ids, feats, chunk, fresh=False):
        hidden, cache = text.prefill_chunk(embed_with_features(cfg, text.embedding(), ids, feats), cache, chunk,
                                           fresh)
        return text.logits(hidden), cache

    @jax.jit
    def full(ids, px):
        hidden, _ = model.forward(ids, px)
        return model.text.logits(hidden)

    return features, chunk_call, full


def prompt(pieces, seed=0):
    rng = np.random.default_rng(seed)
    ids = [2] + _row(pieces, 400, rng)
    n_images = sum(p == "img" for p in pieces)
    return np.array(ids, np.int32), rng.standard_normal((n_images, 3, 28, 28)).astype(np.float32)


def chunked_logits(model, steps, ids, px, ends, slot=1, pad_to=None, fresh_first=True):
    """Logits of every position, the prompt prefilled chunk by chunk into ``slot`` of a fresh cache; the first
    chunk as the engine runs a prefill call of first chunks (``fresh``) unless ``fresh_first`` is False."""
    features, chunk_call, _ = steps
    feats = None if px is None or len(px) == 0 else features(jnp.asarray(px))
    is_image = ids == IMAGE_TOKEN
    cache = kvc.init_cache(model.cfg.text, SLOTS, CACHE, jnp.float32)
    out, start, image = [], 0, 0
    for end in ends:
        n = end - start
        t = pad_to or max(8, 1 << (n - 1).bit_length())  # few compiled shapes
        chunk_ids = np.zeros((1, t), np.int32)
        chunk_ids[0, :n] = ids[start:end]
        seg = np.full((1, t), -1, np.int32)
        runs = np.asarray(kvc_segments(is_image[start:end]))
        seg[0, :n] = runs
        k = int(is_image[start:end].sum()) // MM_TOKENS
        chunk_feats = feats[image:image + k] if k else None
        image += k
        chunk = kvc.PromptChunk(jnp.asarray([slot]), jnp.asarray([start]), jnp.asarray([n]), jnp.asarray(seg))
        logits, cache = chunk_call(cache, jnp.asarray(chunk_ids), chunk_feats, chunk, fresh=fresh_first and start == 0)
        out.append(np.asarray(logits)[0, :n])
        start = end
    assert int(cache.lengths[slot]) == len(ids) and int(cache.lengths.sum()) == len(ids)
    return np.concatenate(out)


def kvc_segments(mask):
    """Segment ids of one chunk's image flags (each run of image tokens one image)."""
    starts = mask & ~np.r_[False, mask[:-1]]
    return np.where(mask, np.cumsum(starts) - 1, -1)


def edges(ids, budget):
    mask, out, start = ids == IMAGE_TOKEN, [], 0
    while start < len(ids):
        start = kvc.chunk_end(mask, start, budget)
        out.append(start)
    return out


def check(model, steps, ids, px, ends, **kw):
    want = np.asarray(steps[2](jnp.asarray(ids[None]), None if px is None or len(px) == 0 else jnp.asarray(px)))[0]
    got = chunked_logits(model, steps, ids, px, ends, **kw)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= CHUNK_TOL, (ends, err)
    return err


# the tiny model: window 8, image = 4 tokens; positions below count the leading bos
IMAGE_AT_EDGE = ["boi", "img", "eoi", 9]  # image at positions 2..5: ends exactly at a chunk edge of 6
LAYOUTS = {
    "text only": [30],
    "image ends at an edge": [1, *IMAGE_AT_EDGE, 5],
    "image starts at a chunk start": [3, "img", 12],  # image at 4..7
    "two images one token apart": [2, "img", 1, "img", 10],
    "image longer than the budget": [5, "img", "img", 6],  # 8 image tokens in one run
    "past the window": [20, "img", 3, "boi", "img", "eoi", 25],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_budget_equals_one_shot(model, steps, layout):
    """Chunk budgets from 1 token up to the whole prompt, ends snapped to image ends."""
    ids, px = prompt(LAYOUTS[layout])
    for budget in range(1, len(ids) + 1):
        ends = edges(ids, budget)
        assert all(not (ids[e - 1] == IMAGE_TOKEN and e < len(ids) and ids[e] == IMAGE_TOKEN) for e in ends)
        check(model, steps, ids, px, ends)


def test_edges_at_image_boundaries(model, steps):
    """Hand-placed edges: an image ending exactly at one, the next image starting exactly at one."""
    ids, px = prompt([2, "img", "img", 3, "img", 20])  # images 3..6 and 7..10 adjacent = one run; 14..17
    assert ids[3] == IMAGE_TOKEN and ids[11] != IMAGE_TOKEN and ids[14] == IMAGE_TOKEN
    check(model, steps, ids, px, [3, 11, 14, 18, len(ids)])


def test_padded_chunks_and_other_slots(model, steps):
    """Chunks padded to a fixed length (what a compiled bucket does) into another slot give the same logits, the
    first chunk through either path."""
    ids, px = prompt(LAYOUTS["past the window"])
    for fresh_first in (True, False):
        check(model, steps, ids, px, edges(ids, 7), slot=2, pad_to=16, fresh_first=fresh_first)


@pytest.mark.parametrize("n", [5, 8, 13])  # within the window of 8, at it, past it
def test_fresh_chunks_leave_the_cache_as_the_general_path(model, steps, n):
    """First chunks through ``fresh`` (the chunk alone as context, written as one slab a row) leave every position
    a row holds as the general path does, other slots untouched, and a padding row (slot past the cache) writes
    nothing; the logits agree."""
    _, chunk_call, _ = steps
    ids = prompt([n - 1])[0]
    t = 8 if n <= 8 else 16  # one slab into the ring while the chunk fits it, the general write past it
    rows = np.zeros((2, t), np.int32)
    rows[0, :n] = ids
    chunk = kvc.PromptChunk(jnp.asarray([1, SLOTS]), jnp.asarray([0, 0]), jnp.asarray([n, 0]),
                            jnp.full((2, t), -1, jnp.int32))
    start = kvc.init_cache(model.cfg.text, SLOTS, CACHE, jnp.float32)
    start = start._replace(k=tuple(k + 1.0 for k in start.k), v=tuple(v - 1.0 for v in start.v))  # not zeros
    got_logits, got = chunk_call(start, jnp.asarray(rows), None, chunk, fresh=True)
    want_logits, want = chunk_call(start, jnp.asarray(rows), None, chunk, fresh=False)
    scale = float(np.abs(np.asarray(want_logits[0, :n])).max())
    assert np.abs(np.asarray(got_logits[0, :n]) - np.asarray(want_logits[0, :n])).max() <= CHUNK_TOL * scale
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    for g, w, s in zip(got.k + got.v, want.k + want.v, start.k + start.v):
        g, w, s = np.asarray(g), np.asarray(w), np.asarray(s)
        held = min(n, g.shape[1])  # a ring of W slots holds the last W positions
        slots = np.arange(n - held, n) % g.shape[1]
        assert np.abs(g[1, slots] - w[1, slots]).max() <= CHUNK_TOL * max(1.0, float(np.abs(w).max()))
        np.testing.assert_array_equal(g[[0, 2]], s[[0, 2]])


def test_chunk_end():
    mask = np.array([0, 1, 1, 1, 0, 1, 1, 0], bool)
    assert kvc.chunk_end(mask, 0, 2) == 4  # inside the first image: to its end
    assert kvc.chunk_end(mask, 0, 1) == 1  # ends right before an image
    assert kvc.chunk_end(mask, 4, 2) == 7
    assert kvc.chunk_end(mask, 5, 100) == 8
    with pytest.raises(ValueError, match="budget"):
        kvc.chunk_end(mask, 0, 0)


@pytest.mark.parametrize("decode", ["reference", "pallas"])
def test_mixed_step_equals_decode_then_chunk(model, steps, decode):
    """A decode token of every slot and a prompt chunk (with an image, past the window) in one pass equal the
    decode step and the chunk run apart: the serving engine's mixed call changes no number."""
    from gemma3_jax.model.kernels import Kernels, with_kernels

    features, chunk_call, _ = steps
    text = with_kernels(model.text, Kernels(prefill="pallas", decode=decode, interpret=True, platform="cpu"))
    cfg = model.cfg
    cache = kvc.init_cache(cfg.text, SLOTS, CACHE, jnp.float32)
    for slot, pieces in ((0, [6, "img", 9]), (2, [14])):  # two slots hold prompts and decode
        ids, px = prompt(pieces, seed=slot)
        feats = features(jnp.asarray(px)) if len(px) else None
        chunk = kvc.PromptChunk(jnp.asarray([slot]), jnp.asarray([0]), jnp.asarray([len(ids)]),
                                jnp.asarray(kvc_segments(ids == IMAGE_TOKEN))[None])
        cache = chunk_call(cache, jnp.asarray(ids[None]), feats, chunk)[1]
    ids, px = prompt([20, "img", 3], seed=5)  # slot 1: its second chunk, crossing the window, holds the image
    head, tail = ids[:21], ids[21:]
    chunk = kvc.PromptChunk(jnp.asarray([1]), jnp.asarray([0]), jnp.asarray([len(head)]),
                            jnp.full((1, len(head)), -1, jnp.int32))
    cache = chunk_call(cache, jnp.asarray(head[None]), None, chunk)[1]
    tail_emb = embed_with_features(cfg, text.embedding(), jnp.asarray(tail[None]), features(jnp.asarray(px)))
    chunk = kvc.PromptChunk(jnp.asarray([1]), jnp.asarray([len(head)]), jnp.asarray([len(tail)]),
                            jnp.asarray(kvc_segments(tail == IMAGE_TOKEN))[None])
    tokens = text.embed_tokens(jnp.asarray([[7], [0], [9]]))
    advance = jnp.asarray([True, False, True])

    hd, hc, mixed = jax.jit(text.mixed_step)(tokens, tail_emb, cache, chunk, advance)
    want_d, apart = jax.jit(text.decode_step)(tokens, cache)
    apart = apart._replace(lengths=jnp.where(advance, apart.lengths, cache.lengths))
    want_c, apart = jax.jit(text.prefill_chunk)(tail_emb, apart, chunk)
    scale = float(np.abs(np.asarray(want_c)).max())
    for got, want in ((hd[::2], want_d[::2]), (hc, want_c)):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= CHUNK_TOL * scale
    np.testing.assert_array_equal(np.asarray(mixed.lengths), [cache.lengths[0] + 1, len(ids), cache.lengths[2] + 1])
    for got, want in zip(mixed.k + mixed.v, apart.k + apart.v):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= CHUNK_TOL * scale
