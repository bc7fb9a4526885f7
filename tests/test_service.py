"""The serving API (``Service``): chat messages with images, raw prompts and token ids on the continuous-batching
engine, on checkpoints with Hugging Face's file layout (fixtures/real_layout.py), float32 on the CPU."""

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures import real_layout as rl
from gemma3_jax.runtime.generator import Generator
from gemma3_jax.runtime.service import Service

ROOT = Path(__file__).parents[1]
NEW = 12
SETTINGS = dict(dtype="float32", max_batch=3, cache_length=256, chunk_tokens=32, progress=False,
                compilation_cache=False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    images = rl.write_images(root, seed=0)
    return dict(it=rl.write_checkpoint(root / "it", "it"), base=rl.write_checkpoint(root / "base", "base"),
                images=images, root=root)


@pytest.fixture(scope="module")
def service(ckpts):
    with Service.from_pretrained(ckpts["it"], **SETTINGS) as s:
        yield s


@pytest.fixture(scope="module")
def generator(ckpts):
    return Generator.from_pretrained(ckpts["it"], dtype="float32", cache_length=256, progress=False,
                                     compilation_cache=False)


def user(text, images=()):
    return [{"role": "user", "content": [*({"type": "image", "image": str(i)} for i in images),
                                         {"type": "text", "text": text}]}]


def test_chat_with_two_images_equals_the_generator(service, generator, ckpts):
    imgs = ckpts["images"]
    want = generator.generate("Compare these.", images=[imgs], max_new_tokens=NEW, temperature=0)
    stream = service.submit(messages=user("Compare these.", imgs), max_new_tokens=NEW, temperature=0)
    deltas = list(stream)
    assert stream.token_ids == want.token_ids[0]
    assert stream.text == want.texts[0] == "".join(d.text for d in deltas)
    assert stream.finish_reason in ("stop", "length") and stream.prompt_tokens == want.prompt_tokens[0]


def test_concurrent_async_streams(service, generator, ckpts):
    """Three requests at once (text, one image, a raw prompt) read with ``async for``: each gets its text alone."""
    imgs = ckpts["images"]
    want = [generator.generate("Hello there", max_new_tokens=NEW, temperature=0).texts[0],
            generator.generate("One picture", images=[imgs[:1]], max_new_tokens=NEW, temperature=0).texts[0],
            generator.generate("Once upon a time", max_new_tokens=NEW, temperature=0, chat=False).texts[0]]

    async def read(stream):
        return "".join([d.text async for d in stream])

    async def main():
        streams = [service.submit(messages=user("Hello there"), max_new_tokens=NEW, temperature=0),
                   service.submit(messages=user("One picture", imgs[:1]), max_new_tokens=NEW, temperature=0),
                   service.submit(prompt="Once upon a time", max_new_tokens=NEW, temperature=0)]
        return await asyncio.gather(*(read(s) for s in streams))

    assert asyncio.run(main()) == want


def test_many_async_readers_hold_no_thread_each(service):
    """Sixteen streams read with ``async for`` on one event loop: each wakes on its own stream's deliveries (no
    thread waits per stream), and each gets the text it gets read alone."""
    import threading

    prompts = [f"Count to {i}." for i in range(16)]
    want = [service.submit(prompt=p, max_new_tokens=NEW, temperature=0).result() for p in prompts]
    peak = []

    async def read(stream):
        text = ""
        async for d in stream:
            text += d.text
            peak.append(threading.active_count())
        return text

    async def main():
        streams = [service.submit(prompt=p, max_new_tokens=NEW, temperature=0) for p in prompts]
        return await asyncio.gather(*(read(s) for s in streams))

    before = threading.active_count()
    assert asyncio.run(main()) == want
    assert max(peak) <= before + 2, (before, max(peak))


def test_stop_string_ends_the_text_and_frees_the_slot(service):
    full = service.submit(prompt="Once upon a time", max_new_tokens=NEW, temperature=0).result()
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    stream = service.submit(prompt="Once upon a time", max_new_tokens=200, temperature=0, stop=[stop])
    assert stream.result() == full[: full.find(stop)]
    assert stream.finish_reason == "stop"
    deadline = time.time() + 30
    while service.stats()["active_slots"] and time.time() < deadline:  # freed at the engine's next step
        time.sleep(0.01)
    # the engine was still producing the stream's 200 tokens: the stop string cancelled it
    assert service.stats()["active_slots"] == 0 and service.stats().get("cancelled", 0) >= 1


def test_readings_share_one_place_in_the_text(service):
    """A loop left early and ``result()`` after it, two ``async for`` readers of one stream, two threads: every
    token once, the text whole (``result()`` after a loop repeated the text from its start; two async readers each
    took every token)."""
    import threading

    ask = dict(prompt="Once upon a time", max_new_tokens=40, temperature=0)
    whole = service.submit(**ask)
    whole.result()

    def check(stream, deltas):
        assert stream.text == whole.text and stream.token_ids == whole.token_ids
        assert sorted(t for d in deltas for t in d.token_ids) == sorted(whole.token_ids)

    stream = service.submit(**ask)
    it = iter(stream)
    early = [next(it), next(it)]
    del it  # the loop left: the request goes on
    assert stream.result() == whole.text and stream.token_ids == whole.token_ids
    assert "".join(d.text for d in early) == whole.text[: len("".join(d.text for d in early))]

    async def two_readers(stream):
        async def read():
            return [d async for d in stream]
        a, b = await asyncio.gather(read(), read())
        return a + b

    stream = service.submit(**ask)
    check(stream, asyncio.run(two_readers(stream)))

    stream, got = service.submit(**ask), [[], []]
    threads = [threading.Thread(target=lambda i=i: got[i].extend(stream)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    check(stream, got[0] + got[1])


def test_a_cancelled_reading_task_cancels_its_request(service):
    """The asyncio task reading a stream is cancelled (a timeout, a client gone): the request is cancelled and its
    slot freed at the next step (it ran on to max_new_tokens before)."""
    async def main():
        stream = service.submit(prompt="A long story", max_new_tokens=200, temperature=0)

        async def read():
            async for _ in stream:
                pass

        task = asyncio.create_task(read())
        while not stream.token_ids:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return stream

    stream = asyncio.run(main())
    stream.result()
    assert stream.finish_reason == "cancelled" and len(stream.token_ids) < 200
    deadline = time.time() + 30
    while service.stats()["active_slots"] and time.time() < deadline:
        time.sleep(0.01)
    assert service.stats()["active_slots"] == 0


def test_resent_image_is_not_encoded_again(service, ckpts):
    from PIL import Image

    img = ckpts["root"] / "c.png"  # an image no other test sent
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(img)
    before = service.engine.features.encodes
    first = service.submit(messages=user("Describe.", [img]), max_new_tokens=4, temperature=0)
    reply = first.result()
    turn2 = user("Describe.", [img]) + [{"role": "assistant", "content": reply},
                                        {"role": "user", "content": "And now?"}]
    service.submit(messages=turn2, max_new_tokens=4, temperature=0).result()
    assert service.engine.features.encodes - before == 1


def test_token_ids_and_cancel(service):
    stream = service.submit(token_ids=[2, 100, 101, 102], max_new_tokens=200, temperature=0)
    it = iter(stream)
    next(it)
    stream.cancel()
    list(it)
    assert stream.finish_reason == "cancelled"


@pytest.mark.parametrize("kwargs, error, match", [
    pytest.param(dict(), ValueError, "exactly one of prompt, messages or token_ids", id="no_prompt"),
    pytest.param(dict(prompt="a", messages=[]), ValueError, "exactly one", id="two_prompts"),
    pytest.param(dict(prompt=3), TypeError, "prompt must be a str", id="prompt_not_str"),
    pytest.param(dict(messages="hi"), TypeError, "messages must be a list", id="messages_str"),
    pytest.param(dict(messages=[{"role": "user", "content": [{"type": "image"}]}]), ValueError, "needs 'image'",
                 id="image_item_without_image"),
    pytest.param(dict(messages=[{"role": "user", "content": "x"}], images=[]), ValueError, "images go inside them",
                 id="images_beside_messages"),
    pytest.param(dict(prompt="x", max_new_tokens=0), ValueError, "max_new_tokens", id="zero_new_tokens"),
    pytest.param(dict(prompt="x", max_new_tokens=10_000), ValueError, "exceeds the cache length 256",
                 id="beyond_the_cache"),
    pytest.param(dict(prompt="x", temperature=-1), ValueError, "temperature", id="negative_temperature"),
    pytest.param(dict(prompt="x", stop=3), TypeError, "stop", id="stop_not_str"),
    pytest.param(dict(token_ids="abc"), TypeError, "token_ids", id="token_ids_str"),
    pytest.param(dict(token_ids=[2, 1.7]), TypeError, "token_ids must be a list of int token ids, got shape", id="token_id_float"),
    pytest.param(dict(token_ids=[[2, 3], [4]]), TypeError, "token_ids must be a list of int token ids", id="token_ids_ragged"),
    pytest.param(dict(token_ids=[2, 2**70]), TypeError, "token_ids must be a list of int token ids", id="token_id_huge"),
    pytest.param(dict(token_ids=[2, 10**9]), ValueError, "out of range", id="token_id_out_of_range"),
])
def test_bad_requests_are_refused_at_submit(service, kwargs, error, match):
    with pytest.raises(error, match=match):
        service.submit(**kwargs)
    assert service.engine.stats()["queued"] == 0


def test_a_single_image_is_one_image(service, ckpts):
    """``images=`` a path, a PIL image or an array is that one image, as Generator.generate takes them (a path was
    split into characters, an [H, W, 3] array taken as H grayscale images)."""
    from PIL import Image

    path = ckpts["images"][0]
    want = service.submit(prompt="What is it?", images=[path], max_new_tokens=3, temperature=0).result()
    for single in (str(path), Image.open(path), np.asarray(Image.open(path).convert("RGB"))):
        assert service.submit(prompt="What is it?", images=single, max_new_tokens=3, temperature=0).result() == want


def test_base_model_refuses_messages(ckpts):
    with Service.from_pretrained(ckpts["base"], **SETTINGS) as base:
        with pytest.raises(ValueError, match="no chat template"):
            base.submit(messages=user("hi"))
        assert base.submit(prompt="Once", max_new_tokens=3, temperature=0).result() is not None


def test_service_runs_without_torch(ckpts, generator):
    """The user path in a fresh process where torch and transformers cannot be imported."""
    script = textwrap.dedent(f"""
        from gemma3_jax.runtime.service import Service
        with Service.from_pretrained({str(ckpts['it'])!r}, dtype="float32", max_batch=2, cache_length=256,
                                     chunk_tokens=32, progress=False, compilation_cache=False) as s:
            msgs = [{{"role": "user", "content": [{{"type": "image", "image": {str(ckpts['images'][0])!r}}},
                                                {{"type": "text", "text": "What is it?"}}]}}]
            print(repr(s.submit(messages=msgs, max_new_tokens={NEW}, temperature=0).result()))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    want = generator.generate("What is it?", images=[ckpts["images"][:1]], max_new_tokens=NEW, temperature=0)
    assert proc.stdout.strip() == repr(want.texts[0])


def test_warm_up_compiles_greedy_and_sampled_steps(ckpts):
    """After warm_up, a short greedy or sampled request compiles nothing (OpenAI clients sample by default: a
    sampled step compiled on first use would stall every stream while it compiles)."""
    with Service.from_pretrained(ckpts["it"], **dict(SETTINGS, max_batch=2, cache_length=64)) as s:
        s.warm_up()
        compiled = {k: v for k, v in s.engine.counters.items() if k.startswith("compiles_")}
        assert compiled.get("compiles_decode") == 2  # greedy and sampled
        assert compiled.get("compiles_prefill") == compiled.get("compiles_mixed") == 2  # whatever the race
        for temperature in (0.0, 1.0):
            first = s.submit(token_ids=[2, 2], max_new_tokens=6, temperature=temperature)
            next(iter(first))
            second = s.submit(token_ids=[2, 2], max_new_tokens=2, temperature=temperature)
            first.result(), second.result()
        assert {k: v for k, v in s.engine.counters.items() if k.startswith("compiles_")} == compiled
