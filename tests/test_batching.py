"""Continuous batching (``BatchEngine``): a request served among others gives exactly what it gives alone.

Float32 on the CPU, the tiny multimodal model (window 8, 4 tokens an image) and the real 270M. Chunk budgets are
small so prompts cross several chunks and decode interleaves with prefill; fewer slots than requests, so slots are
freed and reused while others run.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma3_jax
from fixtures.hf_checkpoints import IMAGE_TOKEN, MM_TOKENS, _row
from gemma3_jax.runtime.batching import BatchEngine, EngineClosed, FeatureCache, QueueFull, Request
from gemma3_jax.runtime.engine import Engine
from gemma3_jax.runtime.sampling import SamplingParams

CACHE = 96


@pytest.fixture(scope="module")
def model(tiny_mm):
    return gemma3_jax.load_pretrained(tiny_mm[0], dtype=jnp.float32, progress=False)


def request(pieces, data_seed, new=12, **kw):
    """A prompt of ``pieces`` (text lengths, "img", "boi", "eoi") with random tokens and images."""
    rng = np.random.default_rng(data_seed)
    ids = [2] + _row(pieces, CACHE, rng)
    n = sum(p == "img" for p in pieces)
    px = rng.standard_normal((n, 3, 28, 28)).astype(np.float32) if n else None
    return Request(ids, px, max_new_tokens=new, **{"stop_ids": (), **kw})


REQUESTS = [  # different lengths and image counts
    ([5, "img", 20], 1),
    ([3], 2),
    ([2, "img", 1, "img", 30], 3),
    ([40, "img"], 4),
    ([12, "boi", "img", "eoi", 6], 5),
]


def engine(model, **kw):
    return BatchEngine(model, **{**dict(max_batch=3, cache_length=CACHE, chunk_tokens=10, decode_steps=4,
                                        step_tokens=6), **kw})


@pytest.fixture(scope="module")
def solo(model):
    """An engine that serves one request at a time (reused, so its steps compile once)."""
    return engine(model)


def alone(solo, req: Request) -> list[int]:
    assert solo.stats()["active_slots"] == 0
    return solo.submit(req).result()


def test_batched_equals_alone_and_the_static_engine(model, solo):
    """Five requests on three slots, arriving at different steps, one cancelled midway: every finished one gets
    the tokens it gets alone, which are the static Engine's greedy tokens."""
    reqs = [request(p, s) for p, s in REQUESTS]
    static = Engine(model, cache_length=CACHE, chunk=8)
    want = []
    for r in reqs:
        out = np.concatenate(list(static.generate_ids([list(r.prompt)], r.pixel_values, max_new_tokens=12,
                                                      stop_ids=())), axis=1)
        want.append(out[0].tolist())
    assert [alone(solo, r) for r in reqs[:2]] == want[:2]

    eng = engine(model)
    streams = [eng.submit(reqs[0]), eng.submit(reqs[1])]
    stepping = time.perf_counter()
    eng.step()
    streams.append(eng.submit(reqs[2]))
    eng.step()
    eng.step()
    streams += [eng.submit(reqs[3]), eng.submit(reqs[4])]
    cancelled = eng.submit(request([20, "img", 9], 9, new=40))
    for _ in range(3):
        eng.step()
    cancelled.cancel()
    eng.run()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.tokens) < 40
    for s, w in zip(streams, want):
        assert s.finish_reason == "length"
        assert s.tokens == w, (s.id, s.tokens, w)
    stats = eng.stats()
    assert stats["active_slots"] == 0 and stats["queued"] == 0
    assert stats["length"] == 5 and stats["cancelled"] == 1
    assert stats["mixed_calls"] > 0 and stats["decode_calls"] > 0  # chunks rode on decode steps and ran alone
    gaps = stats["delivery_gaps"]  # each stream's deliveries after its first
    assert len(gaps["counts"]) == len(gaps["bounds"]) + 1 and gaps["sum"] > 0
    assert sum(gaps["counts"]) == sum(len(s.arrivals) - 1 for s in [*streams, cancelled] if s.arrivals) > 0
    # the stepping thread's time: on the host and waiting for results, nothing idle without a background thread,
    # and no more than the time the steps took
    spent = stats["thread_s"]
    assert spent["host"] > 0 and spent["waiting"] > 0 and spent["idle"] == 0, spent
    assert spent["host"] + spent["waiting"] <= time.perf_counter() - stepping
    assert 0 < stats["thread_cpu_s"] <= spent["host"] + spent["waiting"]  # one thread's CPU time within its steps


def test_background_compile_runs_covering_shapes(model, solo):
    """With background compiles and the largest shapes compiled ahead, calls whose own shape is not compiled run
    padded to a compiled one (more rows, tokens and image features, all masked) while theirs compiles on another
    thread: every request still gets the tokens it gets alone, and the shapes compiled meanwhile are then used."""
    reqs = [request(p, s) for p, s in REQUESTS]
    want = [alone(solo, r) for r in reqs]
    eng = engine(model, background_compile=True)
    eng.compile_covers(greedy_only=True)
    stats = eng.stats()
    assert stats["compiles_prefill"] == stats["compiles_mixed"] == 1

    def inline():  # prefill, mixed and embed compiles that held up a step
        st = eng.stats()
        return sum(st.get(f"compiles_{k}", 0) - st.get(f"background_compiles_{k}", 0)
                   for k in ("prefill", "mixed", "embed"))

    covers = inline()
    streams = [eng.submit(r) for r in reqs]
    eng.run()
    assert [s.tokens for s in streams] == want
    assert eng.shapes.padded_calls > 0 and inline() == covers
    eng.shapes.wait()
    assert eng.shapes.errors == [] and eng.stats()["background_compiles_mixed"] > 0
    ready = eng.shapes.ready(("mixed", True, False))
    assert len(ready) > 1 and (3, 32) in ready  # the cover (all 3 slots, 32 tokens) and shapes met since
    # prefill calls of first chunks ran on the general shapes while their own (``fresh``) compiled in the background
    assert eng.shapes.ready(("prefill", True, True)) and eng.stats()["background_compiles_prefill"] > 0
    before = eng.shapes.padded_calls
    streams = [eng.submit(r) for r in reqs]  # the same again: most of their shapes are compiled now
    eng.run()
    assert [s.tokens for s in streams] == want
    assert eng.shapes.padded_calls - before < before / 4 and inline() == covers
    eng.close()


def test_compiled_shapes_pick():
    """The smallest compiled shape that covers a new one on every axis, the new one compiled in the background;
    none covering, or background off: the shape itself (compiled by the caller)."""
    from gemma3_jax.runtime.compiled_shapes import CompiledShapes

    done = []
    shapes = CompiledShapes(background=True)
    assert shapes.pick("g", (2, 64), lambda: done.append(1)) == (2, 64) and not done  # nothing covers it
    for c in [(4, 64), (2, 128), (8, 256)]:
        shapes.mark("g", c)
    assert shapes.pick("g", (2, 64), lambda: done.append((2, 64))) == (2, 128)  # 256 padded tokens < 4 x 64
    assert shapes.pick("g", (8, 512), lambda: done.append(2)) == (8, 512)  # nothing covers it
    shapes.wait()
    assert done == [(2, 64)] and (2, 64) in shapes.ready("g")
    assert shapes.pick("g", (2, 64), lambda: done.append(3)) == (2, 64) and shapes.padded_calls == 1
    assert shapes.pick("g", (1, 8), lambda: 1 / 0) == (2, 64)  # a failed compile is kept as text
    shapes.wait()
    assert "ZeroDivisionError" in shapes.errors[0] and (1, 8) not in shapes.ready("g")
    assert shapes.pick("g", (1, 8), lambda: 1 / 0) == (1, 8)  # and the shape is then the caller's to compile
    assert shapes.covered("g", (2, 100)) and not shapes.covered("g", (16, 8)) and not shapes.covered("h", (1, 1))
    shapes.later("h", (1, 8), lambda: done.append(4))  # compiled for later calls, nothing run padded meanwhile
    shapes.later("g", (2, 64), lambda: 1 / 0)  # ready already: nothing
    shapes.wait()
    assert done[-1] == 4 and shapes.ready("h") == {(1, 8)} and shapes.padded_calls == 2
    off = CompiledShapes(background=False)
    off.mark("g", (8, 256))
    assert off.pick("g", (2, 64), lambda: 1 / 0) == (2, 64)
    off.later("g", (2, 64), lambda: 1 / 0)  # no background compiles: nothing
    assert off.ready("g") == {(8, 256)}
    shapes.close()
    assert shapes.pick("g", (2, 32), lambda: 1 / 0) == (2, 32)  # closed: nothing more in the background
    shapes.wait()


def test_stream_s_bounds_a_decode_call(model, solo):
    """With ``stream_s`` a decode call runs as many steps as take about that long at the latest step time, so a
    reader gets tokens at least that often (Service streams with 0.1 s); the tokens do not change."""
    reqs = [request(p, s, new=20) for p, s in REQUESTS[:3]]
    eng = engine(model, stream_s=1e-9, record_calls=True)
    streams = [eng.submit(r) for r in reqs]
    eng.run()
    steps = [c["steps"] for c in eng.calls if c["kind"] == "decode"]
    # the second call is queued before the first is read; a call may stop at once when a slot freed in the last
    assert steps[:2] == [4, 4] and set(steps[2:]) <= {0, 1} and steps.count(1) > 4, steps
    assert [s.tokens for s in streams] == [alone(solo, r) for r in reqs]
    assert engine(model, stream_s=3600.0)._decode_limit() == 4
    for bad in (0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="stream_s"):
            engine(model, stream_s=bad)


def test_no_decode_call_after_the_last_token_is_in_flight(model, solo):
    """A decode call is dispatched before the previous call is read, except when that call brings every stream to
    its token limit: one more would run no step on the GPU, in the way of the next request. A guess that falls
    short (a stop id ends no stream here: it is one row among others) still finishes every stream."""
    want = {n: alone(solo, request([5], 9, new=n)) for n in (1, 5, 6)}
    for n, calls in ((1, 0), (5, 1), (6, 2)):  # decode_steps 4: the first token comes with the prefill
        before = solo.counters["decode_calls"]
        assert alone(solo, request([5], 9, new=n)) == want[n] and len(want[n]) == n
        assert solo.counters["decode_calls"] - before == calls, n
    with_stop = request([5], 9, new=6, stop_ids=(want[6][2],))  # ends after 3 tokens, in the first decode call
    assert alone(solo, with_stop) == want[6][:3]


def test_cancel_in_queue_and_mid_prefill_frees_the_slot(model, solo):
    eng = engine(model, max_batch=1, chunk_tokens=4)
    long = eng.submit(request([60], 11, new=30))
    queued = eng.submit(request([4], 12))
    eng.step()  # the long prompt's first chunk
    queued.cancel()
    long.cancel()
    assert queued.done and queued.tokens == []
    after = eng.submit(request([5, "img", 20], 1))
    eng.run()
    assert long.finish_reason == "cancelled" and long.tokens == []
    assert after.tokens == alone(solo, request([5, "img", 20], 1))


def test_stop_ids_and_first_token_stop(model, solo):
    ref = alone(solo, request([5, "img", 20], 1))
    stop = ref[3]
    got = alone(solo, request([5, "img", 20], 1, stop_ids=(stop,)))
    assert got == ref[: ref.index(stop) + 1]
    one = solo.submit(request([5, "img", 20], 1, new=1))
    assert one.result() == ref[:1] and one.finish_reason == "length"
    first = solo.submit(request([5, "img", 20], 1, stop_ids=(ref[0],)))
    assert first.result() == ref[:1] and first.finish_reason == "stop"


def test_sampling_is_reproducible_per_request(model, solo):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    mine = request([3, "img", 10], 21, new=16, params=params, seed=7)
    by_itself = alone(solo, mine)
    eng = engine(model)
    others = [eng.submit(request([9], 22, new=10, params=params, seed=1)),
              eng.submit(request([30, "img"], 23, new=5))]
    got = eng.submit(mine)
    eng.run()
    assert got.tokens == by_itself and all(o.done for o in others)
    assert alone(solo, request([3, "img", 10], 21, new=16, params=params, seed=8)) != by_itself
    # a seed past 32 bits is a seed of its own (its low 32 bits alone were kept before: 2**32 + 7 sampled as 7)
    assert alone(solo, request([3, "img", 10], 21, new=16, params=params, seed=2**32 + 7)) != by_itself


def test_sampled_rows_do_not_depend_on_each_other(monkeypatch):
    """sample_rows draws a row from lax.top_k's first candidates when its top-k or nucleus fits in them, and sorts
    the vocabulary only when some row's does not: a row's draw is the same alone, beside a row that forces the
    sort, and with a cap as large as the vocabulary (the full sort's order); top_k 1 and a tiny top_p are greedy."""
    from gemma3_jax.runtime import sampling

    v, rng = 1000, np.random.default_rng(0)
    peaked = rng.standard_normal(v) * 6  # a few candidates hold most of the mass
    flat = rng.standard_normal(v) * 0.1  # a nucleus of 0.99 needs most of the vocabulary
    rows = [(peaked, 1.0, 50, 0.9), (peaked, 0.7, 0, 0.5), (flat, 1.0, 0, 0.99), (flat, 0.8, 0, 1.0),
            (peaked, 1.0, 1, 1.0), (peaked, 2.0, 0, 1e-6), (peaked, 0.0, 0, 1.0)]
    draw = jax.jit(sampling.sample_rows)

    def sample(which, seed):
        logits = jnp.asarray(np.stack([rows[i][0] for i in which]), jnp.float32)
        keys = jax.random.split(jax.random.key(seed), len(which))
        t, k, p = (jnp.asarray([rows[i][j] for i in which]) for j in (1, 2, 3))
        return np.asarray(draw(logits, keys, t.astype(jnp.float32), k.astype(jnp.int32), p.astype(jnp.float32)))

    together = np.stack([sample(range(len(rows)), seed) for seed in range(40)])
    assert len(set(together[:, 0])) > 1 and len(set(together[:, 3])) > 1  # sampled, not argmax
    assert (together[:, 4] == peaked.argmax()).all() and (together[:, 5] == peaked.argmax()).all()
    assert (together[:, 6] == peaked.argmax()).all()
    for seed in range(40):
        keys = jax.random.split(jax.random.key(seed), len(rows))
        for i in (0, 1, 3):  # rows that fit: alone (no sort runs) as beside row 2 (which sorts)
            logits = jnp.asarray(rows[i][0][None], jnp.float32)
            alone = draw(logits, keys[i: i + 1], *(jnp.asarray([rows[i][j]], d) for j, d in
                                                  ((1, jnp.float32), (2, jnp.int32), (3, jnp.float32))))
            assert int(alone[0]) == together[seed, i], (seed, i)
    monkeypatch.setattr(sampling, "TOP_CAP", v)  # candidates in the full sort's order
    draw = jax.jit(sampling.sample_rows)
    assert (np.stack([sample(range(len(rows)), seed) for seed in range(40)]) == together).all()


def test_top_k_by_blocks_equals_lax_top_k():
    """sampling.top_k_by_blocks looks only in the blocks with the largest maxima, and gives lax.top_k's values (bit
    for bit) and ids: ties (many here: small integers) in its order, -inf, NaN of either sign, -0.0 beside +0.0, and
    a last block of padding included; blocks just past 2k (the smallest row that takes the block path) too."""
    from gemma3_jax.runtime import sampling

    rng = np.random.default_rng(0)
    for v, k, block in ((1000, 7, 8), (1000, 40, 4), (997, 16, 16), (4099, 128, 8), (1000, 62, 8), (300, 5, 64)):
        x = rng.integers(-20, 20, (8, v)).astype(np.float32)
        x[1] = -np.inf
        x[2, ::3] = -np.inf
        x[3, :] = 5.0
        x[4, -3:] = 100.0  # the best values in the padded last block
        x[5, rng.integers(0, v, 30)] = np.nan
        x[5, rng.integers(0, v, 30)] = -np.float32(np.nan)  # a NaN with its sign bit set
        x[6] = np.where(rng.random(v) < 0.5, np.float32(0.0), np.float32(-0.0))
        x[7, : v - 3] = -np.float32(np.nan)  # below -inf in lax.top_k's order, still above the padding
        want = jax.lax.top_k(jnp.asarray(x), k)
        got = jax.jit(sampling.top_k_by_blocks, static_argnums=(1, 2))(jnp.asarray(x), k, block)
        np.testing.assert_array_equal(np.asarray(got[0]).view(np.int32), np.asarray(want[0]).view(np.int32))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_images_are_encoded_once(model, solo):
    """A multi-turn chat resends its image: the second request takes the cached features (and gets the same
    tokens as with a fresh encode); two copies of one image in a request are one encode."""
    eng = engine(model)
    first = request([5, "img", 20], 1)
    eng.submit(first).result()
    assert eng.features.encodes == 1
    again = Request(list(first.prompt) + [7, 8, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 9],
                    np.concatenate([first.pixel_values, first.pixel_values]), max_new_tokens=8, stop_ids=())
    got = eng.submit(again).result()
    assert eng.features.encodes == 1 and eng.features.hits >= 1
    assert got == alone(solo, again)
    eng.features.clear()  # forgotten: encoded again
    eng.submit(first).result()
    assert eng.features.encodes == 2 and eng.features.nbytes > 0


def test_an_image_encoded_one_step_is_cached_for_the_next(model):
    """The features of a step's new images are cached once the step's call is dispatched (their keys are read
    then): a request with the same image admitted at the next step, the first still running, takes them."""
    eng = engine(model)
    first = request([5, "img", 20], 1)
    a = eng.submit(first)
    eng.step()  # admits and encodes a, dispatches its prefill
    assert eng.features.encodes == 1 and not a.done
    b = eng.submit(Request(first.prompt, first.pixel_values.copy(), max_new_tokens=3, stop_ids=()))
    eng.run()
    assert eng.features.encodes == 1 and eng.features.hits == 1
    assert a.finish_reason == b.finish_reason == "length"


def test_image_key_is_the_content():
    """The feature cache's key hashes pieces of the image on several threads: equal for equal content and shape
    (whatever the array), different for one changed value, another shape of the same bytes or another dtype."""
    cache = FeatureCache(1 << 20, hash_threads=3)
    image = np.random.default_rng(0).random((3, 448, 448), np.float32)  # 2.4 MB: split into 3 pieces
    changed = image.copy()
    changed[2, -1, -1] += 1e-3
    key = cache.key(image)
    assert key == cache.key(np.asfortranarray(image)) == FeatureCache(1 << 20, hash_threads=1).key(image.copy())
    assert len({key, cache.key(changed), cache.key(image.reshape(3, -1)), cache.key(image.astype(np.float64)),
                cache.key(image[:1])}) == 5
    big = np.random.default_rng(1).random((3, 896, 896), np.float32)  # 10 pieces over 1-16 threads
    assert len({FeatureCache(1 << 20, hash_threads=t).key(big) for t in (1, 3, 4, 16)}) == 1


def test_images_alike_in_their_fingerprint_are_told_apart(model, solo, monkeypatch):
    """A fingerprint reads a sample of an image's values: two images that differ only between the samples share
    one and are still encoded apart (their keys decide), within one call and across calls. A new image goes to the
    vision tower before its key is read."""
    from gemma3_jax.runtime import features

    monkeypatch.setattr(features, "_PRINT_VALUES", 64)  # every 36th value of a tiny image
    a = request([5, "img", 20], 11)
    px = a.pixel_values.copy()
    px.reshape(-1)[1] += 1.0
    b = Request(a.prompt, px, max_new_tokens=a.max_new_tokens, stop_ids=())
    eng = engine(model)
    fc = eng.features
    assert fc.fingerprint(a.pixel_values[0]) == fc.fingerprint(px[0]) and fc.key(a.pixel_values[0]) != fc.key(px[0])
    keys_read, encode = [], eng._encode
    eng._encode = lambda images, *more: (keys_read.append(lone._image_keys[0]._key), encode(images, *more))[1]
    lone = eng.submit(request([3, "img", 4], 12))
    lone.result()
    assert keys_read == [None] and fc.encodes == 1
    eng._encode = encode
    both = [eng.submit(a), eng.submit(b)]  # admitted together: one vision call
    eng.run()
    assert fc.encodes == 3
    again = eng.submit(b)
    eng.run()
    assert fc.encodes == 3 and fc.hits == 1
    assert both[0].tokens == alone(solo, a) and both[1].tokens == again.tokens == alone(solo, b)


def test_row_inputs_travel_as_one_array():
    """pack_rows / unpack_rows: a call's per-row inputs in one int32 array come back bit for bit (the uint32 seed
    above 2**31, float settings by their bits)."""
    from gemma3_jax.runtime.sampling import MAX_STOP_IDS
    from gemma3_jax.runtime.slots import pack_rows, unpack_rows

    rng = np.random.default_rng(1)
    b, t = 3, 5
    given = dict(slot=np.array([2, 0, 8], np.int32), start=np.array([0, 17, 3], np.int32),
                 length=np.array([5, 2, 0], np.int32), last=np.array([True, False, True]),
                 max_new=np.array([1, 64, 9], np.int32), seed=np.array([0, 2**32 - 1, 2**31 + 5], np.uint32),
                 stops=rng.integers(-1, 300, (b, MAX_STOP_IDS)).astype(np.int32),
                 temperature=np.array([0.0, 0.7, 1e-3], np.float32), top_k=np.array([0, 40, 1], np.int32),
                 top_p=np.array([1.0, 0.9, 0.25], np.float32))
    ids, seg = rng.integers(0, 1000, (b, t)).astype(np.int32), rng.integers(-1, 2, (b, t)).astype(np.int32)
    got_ids, chunk, row = jax.jit(unpack_rows)(jnp.asarray(pack_rows(ids, seg, **given)))
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(chunk.segment_ids, seg)
    for name in ("slot", "start", "length"):
        np.testing.assert_array_equal(getattr(chunk, name), given[name])
    for name in ("last", "max_new", "seed", "stops", "temperature", "top_k", "top_p"):
        np.testing.assert_array_equal(getattr(row, name), given[name])
        assert getattr(row, name).dtype == jnp.asarray(given[name]).dtype, name


def test_refused_at_submission(model):
    eng = engine(model)
    with pytest.raises(ValueError, match="exceeds the cache length 96"):
        eng.submit(request([80], 1, new=20))
    with pytest.raises(ValueError, match="image tokens"):
        eng.submit(Request([2, IMAGE_TOKEN] * MM_TOKENS, None))
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.submit(Request([2, 3], max_new_tokens=0))
    with pytest.raises(TypeError, match="Request"):
        eng.submit([2, 3])
    # stop ids go to the device as int32: a string or an id past the vocabulary is refused here, not in the loop
    for stop, error, match in (("ab", TypeError, "stop_ids must be a sequence of token ids"),
                               (None, TypeError, "stop_ids must be a sequence of token ids"),
                               ((2**70,), ValueError, r"stop_ids must lie in \[0, \d+\)"),
                               ((-1,), ValueError, r"stop_ids must lie in \[0, \d+\)"),
                               (tuple(range(9)), ValueError, "at most 8 stop token ids")):
        with pytest.raises(error, match=match):
            eng.submit(Request([2, 3], max_new_tokens=2, stop_ids=stop))
    # the prompt's ids: the same check (and message) as Service's token_ids and Engine's prompt rows
    for prompt, error, match in (([[2, 3], [4]], TypeError, "prompt must be a list of int token ids"),
                                 ([2, 3.7], TypeError, "prompt must be a list of int token ids, got shape"),
                                 ([True, False], TypeError, "prompt must be a list of int token ids"),
                                 ("ab", TypeError, "prompt must be a list of int token ids, got str"),
                                 ([], ValueError, "empty prompt")):
        with pytest.raises(error, match=match):
            eng.submit(Request(prompt))
    kept = eng.submit(Request([2, 3], max_new_tokens=2, stop_ids=(t for t in np.array([1, 7]))))  # as checked
    assert kept.request.stop_ids == (1, 7)
    eng.cancel(kept)
    kept = eng.submit(Request([2, 3], max_new_tokens=2, stop_ids=np.array([1, 7])))
    assert kept.request.stop_ids == (1, 7)
    eng.cancel(kept)
    with pytest.raises(TypeError, match="pixel_values must be a float array, got dtype <U"):
        eng.submit(Request([2, IMAGE_TOKEN] * MM_TOKENS, np.array(["x"])))
    size = model.cfg.vision.image_size  # NaN pixels gave NaN image features and a wrong answer, silently
    with pytest.raises(ValueError, match="pixel_values hold NaN or infinite values"):
        eng.submit(Request([2] + [IMAGE_TOKEN] * MM_TOKENS, np.full((1, 3, size, size), np.nan, np.float32)))
    with pytest.raises(ValueError, match="max_batch"):
        BatchEngine(model, max_batch=0)
    assert eng.stats()["queued"] == 0
    bounded = engine(model, max_queue=1)
    bounded.submit(request([3], 1))
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        bounded.submit(request([3], 2))
    assert bounded.stats()["queued"] == 1 and bounded.stats()["refused"] == 1


def test_memory_budget_sizes_the_cache(model, capsys):
    per_slot_128 = BatchEngine(model, max_batch=2, cache_length=128).cache_bytes
    eng = BatchEngine(model, max_batch=2, cache_length=None, memory_budget=per_slot_128 * 3, verbose=True)
    assert eng.cache_length >= 384 and eng.cache_bytes <= per_slot_128 * 3
    assert "2 slots x" in capsys.readouterr().out
    with pytest.raises(ValueError, match="memory_budget"):
        BatchEngine(model, max_batch=2, cache_length=None, memory_budget=10)


def test_background_thread_serves_concurrent_readers(model, solo):
    import threading

    reqs = [request(p, s) for p, s in REQUESTS[:3]]
    want = [alone(solo, r) for r in reqs]
    eng = engine(model)
    eng.start()
    try:
        out = [None] * len(reqs)

        def read(i):
            out[i] = eng.submit(reqs[i]).result()

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert out == want
    finally:
        eng.stop()


def test_two_images_side_by_side_and_readers_without_a_thread(model, solo):
    """Two images whose tokens make one run (one span in transformers' mask) get the static Engine's tokens (the
    engine counted one image a run: the second image's features were left out); a run that is not whole images is
    refused; threads reading streams of an engine no thread runs step it one at a time, and each gets what its
    request gets alone (they stepped it at once before: too many tokens, another request's text, hangs)."""
    import threading

    side = request([3, "img", "img", 7], 6)
    static = Engine(model, cache_length=CACHE, chunk=8)
    want = np.concatenate(list(static.generate_ids([list(side.prompt)], side.pixel_values, max_new_tokens=12,
                                                   stop_ids=())), axis=1)[0].tolist()
    assert alone(solo, side) == want
    split = list(side.prompt)
    split.insert(4 + MM_TOKENS // 2, 5)  # a text token inside the first image
    with pytest.raises(ValueError, match=f"must come in whole images of {MM_TOKENS}: the prompt has a run of "
                                         f"{MM_TOKENS // 2}"):
        solo.submit(Request(split, side.pixel_values))

    reqs = [request(p, s) for p, s in REQUESTS[:3]]
    want = [alone(solo, r) for r in reqs]
    eng = engine(model)  # never started
    streams = [eng.submit(r) for r in reqs]
    out = [None] * len(streams)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, streams[i].result()))
               for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert out == want


def test_close_ends_the_readers_and_refuses_later_requests(model, solo):
    """``close()`` while a thread reads a running request: the reader ends (it waited for ever before) with
    ``cancelled``; later requests and ``start()`` are refused. ``stop()`` alone: the reader steps the engine and
    gets the whole answer."""
    import threading

    req = request([3], 2, new=60)
    want = alone(solo, req)
    for ending in ("stop", "close"):
        eng = engine(model)
        eng.start()
        stream = eng.submit(req)
        reader = threading.Thread(target=stream.result)
        reader.start()
        deadline = time.monotonic() + 300
        while not stream.tokens and time.monotonic() < deadline:
            time.sleep(0.01)
        getattr(eng, ending)()
        reader.join(timeout=300)
        assert not reader.is_alive()
        if ending == "stop":
            assert stream.tokens == want and stream.finish_reason == "length"
            eng.close()
            continue
        assert stream.finish_reason == "cancelled" and len(stream.tokens) < 60
        assert eng.stats()["active_slots"] == 0
        with pytest.raises(EngineClosed, match="the engine is closed"):
            eng.submit(req)
        with pytest.raises(EngineClosed):
            eng.start()
        eng.close()  # twice: nothing more


@pytest.mark.slow
@pytest.mark.xdist_group("real_270m")  # one worker converts the real model
def test_real_270m_batched_equals_alone(real_270m):
    """Eight prompts of real text on the real weights, four slots: token for token what the static engine gives."""
    path, _, tok = real_270m
    model = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
             "The quick brown fox", "import numpy as np\n", "Water boils at", "My favourite colour is"]
    prompts = [tok(t)["input_ids"] for t in texts]
    static = Engine(model, cache_length=128, chunk=8)
    want = [np.concatenate(list(static.generate_ids([p], max_new_tokens=10, stop_ids=())), axis=1)[0].tolist()
            for p in prompts]
    eng = BatchEngine(model, max_batch=4, cache_length=128, chunk_tokens=6, decode_steps=4, step_tokens=4)
    streams = [eng.submit(Request(p, max_new_tokens=10, stop_ids=())) for p in prompts]
    eng.run()
    assert [s.tokens for s in streams] == want
