"""scripts/serve.py as users run it: a subprocess on 127.0.0.1 (torch and transformers not importable there), driven
by the official ``openai`` client and by raw HTTP, on a checkpoint with Hugging Face's file layout."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fixtures import real_layout as rl

ROOT = Path(__file__).parents[1]
KEY = "sk-test-key"
NEW = 10

# One xdist worker runs the tests of the module's server: started on each worker, it compiled twice (~100 s each).
# (Per test: a test with two groups gets a group of its own, which would move the real-270M test off its worker.)
on_server_worker = pytest.mark.xdist_group("tiny_server")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    images = rl.write_images(root, seed=1)
    return dict(it=rl.write_checkpoint(root / "gemma-3-4b-it", "it"), images=images, root=root)


@pytest.fixture(scope="module")
def server(files):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(files["it"]), "--port", "0",
         "--dtype", "float32", "--cache-length", "256", "--max-batch", "4", "--chunk-tokens", "32",
         "--api-key", KEY, "--served-model-name", "tiny-it", "--max-body-bytes", str(4 << 20),
         "--max-image-bytes", "100000"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url, lines = None, []
    deadline = time.time() + 300
    while url is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"serving tiny-it at (http://127\.0\.0\.1:\d+)/v1", line)
        url = m and m.group(1)
    assert url, "".join(lines)[-3000:]
    yield url
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    rest = proc.stderr.read()
    assert "Traceback" not in "".join(lines) + rest, rest[-3000:]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def generator(files):
    from gemma3_jax.runtime.generator import Generator

    return Generator.from_pretrained(files["it"], dtype="float32", cache_length=256, progress=False,
                                     compilation_cache=False)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_chat(files, text="Compare these."):
    return [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": data_url(p)}} for p in files["images"]),
        {"type": "text", "text": text}]}]


@on_server_worker
def test_chat_with_two_base64_images(client, files, generator):
    out = client.chat.completions.create(model="tiny-it", messages=image_chat(files), max_tokens=NEW, temperature=0)
    want = generator.generate("Compare these.", images=[files["images"]], max_new_tokens=NEW, temperature=0)
    assert out.choices[0].message.content == want.texts[0]
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == want.prompt_tokens[0]
    assert out.usage.completion_tokens == len(want.token_ids[0])


@on_server_worker
def test_streaming_equals_the_whole_answer(client, files):
    kw = dict(model="tiny-it", messages=image_chat(files, "Stream it."), max_tokens=NEW, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


@on_server_worker
def test_completions_and_models(client, generator):
    out = client.completions.create(model="tiny-it", prompt="Once upon a time", max_tokens=NEW, temperature=0)
    want = generator.generate("Once upon a time", max_new_tokens=NEW, temperature=0, chat=False)
    assert out.choices[0].text == want.texts[0]
    assert [m.id for m in client.models.list().data] == ["tiny-it"]


@on_server_worker
def test_an_http_1_0_client_reads_the_stream(server, client):
    """HTTP/1.0 has no chunked framing (uvicorn used it anyway, its chunk sizes landing in the events): such a client
    gets the events at once with their length, the same text as a whole answer."""
    import socket
    from urllib.parse import urlsplit

    body = json.dumps({"prompt": "Once upon a time", "max_tokens": NEW, "temperature": 0, "stream": True}).encode()
    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        raw = b""
        while chunk := sock.recv(1 << 16):
            raw += chunk
    head, _, events = raw.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().lower().split("\r\n")[1:])
    assert b" 200 " in head.split(b"\r\n")[0] and "transfer-encoding" not in headers, head
    assert int(headers["content-length"]) == len(events) and events.endswith(b"data: [DONE]\n\n"), events[-200:]
    parts = [json.loads(e[6:]) for e in events.decode().split("\n\n") if e and e != "data: [DONE]"]
    whole = client.completions.create(model="tiny-it", prompt="Once upon a time", max_tokens=NEW, temperature=0)
    assert "".join(e["choices"][0]["text"] for e in parts) == whole.choices[0].text
    assert parts[-1]["choices"][0]["finish_reason"] == whole.choices[0].finish_reason


@on_server_worker
def test_cancelled_stream_then_a_request_completes(server, client):
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Tell me a long story", "max_tokens": 200, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    out = client.completions.create(model="tiny-it", prompt="Hello", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def post(server, path, body=None, raw=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{server}{path}", content=raw, headers=headers, timeout=60)
    return httpx.post(f"{server}{path}", json=body, headers=headers, timeout=60)


CHAT = "/v1/chat/completions"
TEXT = [{"role": "user", "content": "hi"}]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixel data: PIL checks the pixel count when it opens one."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("path, body, status, match", [
    pytest.param(CHAT, b"{not json", 400, "not valid JSON", id="malformed_json"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "not valid base64",
        id="bad_base64"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}]}]},
        400, "not a readable image", id="unreadable_image"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, 400, "not fetched",
        id="remote_url"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, "local image paths are off",
        id="local_path"),
    pytest.param(CHAT, {"messages": TEXT, "n": 2}, 400, "'n' must be 1", id="n_2"),
    pytest.param(CHAT, {"messages": TEXT, "n": True}, 400, "'n' must be 1", id="n_true"),
    pytest.param(CHAT, {"messages": TEXT, "presence_penalty": 0.5}, 400, "'presence_penalty' is not supported",
                 id="presence_penalty"),
    pytest.param(CHAT, {"messages": TEXT, "response_format": {"type": "json_object"}}, 400,
                 "'response_format' is not supported", id="json_mode"),
    pytest.param(CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply", id="deep_json"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(png_header(20000, 20000)).decode()}}]}]}, 413,
        "too many pixels", id="pixel_bomb"),
    pytest.param(CHAT, {"messages": TEXT, "max_tokens": 5000}, 400, "exceeds the cache length", id="beyond_cache"),
    pytest.param(CHAT, {"messages": TEXT, "temperature": "hot"}, 400, "'temperature' must be a number",
                 id="bad_temperature"),
    pytest.param(CHAT, {"messages": TEXT, "frobnicate": 1}, 400, "unknown field 'frobnicate'", id="unknown_field"),
    pytest.param(CHAT, {"messages": []}, 400, "non-empty list", id="no_messages"),
    pytest.param(CHAT, {"messages": TEXT, "model": "gpt-4"}, 404, "does not exist", id="unknown_model"),
    pytest.param("/v1/nothing", {}, 404, "Not Found", id="unknown_route"),
    pytest.param("/v1/completions", {"prompt": {"a": 1}}, 400, "'prompt' must be", id="bad_prompt"),
    pytest.param("/v1/completions", {"prompt": "<start_of_image> what is it?"}, 400, "image", id="marker_no_image"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(bytes(200_000)).decode()}}]}]}, 413, "over the",
        id="image_over_limit"),
])
@on_server_worker
def test_errors_are_openai_json_and_the_server_stays_up(server, path, body, status, match):
    r = post(server, path, raw=body) if isinstance(body, bytes) else post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert re.search(match, err["message"]), err
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"


@on_server_worker
def test_a_top_k_past_int32_samples_as_all_and_the_engine_serves_on(server):
    """A top_k past the vocabulary keeps every token; one past int32 ended the engine's thread (every later request
    hung) before."""
    for top_k in (10**30, 0):
        r = post(server, CHAT, {"messages": TEXT, "max_tokens": 2, "temperature": 1.0, "top_k": top_k, "seed": 1})
        assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_local_image_paths_no_file_can_have_are_400(tmp_path):
    from gemma3_jax.server import protocol as p

    for url, match in (("a\x00.png", "no image at 'a\\x00.png'"), ("\udcff.png", "no image at '\\udcff.png'"),
                       ("", "'' is outside")):
        with pytest.raises(p.APIError, match=re.escape(match)) as e:
            p.load_image(url, tmp_path, 1 << 20, "messages[0].content[0]")
        assert e.value.status == 400
        e.value.message.encode()  # the message goes out as JSON text: no lone surrogate left in it


@on_server_worker
def test_api_key_is_required(server):
    assert post(server, CHAT, {"messages": TEXT}, key=None).status_code == 401
    r = post(server, CHAT, {"messages": TEXT}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@on_server_worker
def test_body_over_the_limit_is_413(server):
    huge = {"messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    r = post(server, CHAT, raw=json.dumps(huge).encode())
    assert r.status_code == 413 and "over the" in r.json()["error"]["message"]


@on_server_worker
def test_metrics_count_what_was_served(server, client):
    def scrape():
        text = httpx.get(f"{server}/metrics", timeout=10).text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    before = scrape()
    client.completions.create(model="tiny-it", prompt="Count me", max_tokens=4, temperature=0)
    after = scrape()
    key = 'gemma3_requests_total{route="/v1/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after['gemma3_tokens_total{kind="completion"}'] - before['gemma3_tokens_total{kind="completion"}'] >= 1
    assert after["gemma3_time_to_first_token_seconds_count"] == before["gemma3_time_to_first_token_seconds_count"] + 1
    assert after["gemma3_max_slots"] == 4 and "gemma3_queued_requests" in after
    assert after['gemma3_time_to_first_token_seconds_bucket{le="+Inf"}'] == after[
        "gemma3_time_to_first_token_seconds_count"]
    assert after['gemma3_compiles_total{step="decode"}'] >= 1  # compiled at start-up (warm_up) or since
    assert after["gemma3_padded_calls_total"] >= 0  # calls padded to a compiled shape while theirs compiled
    gaps = "gemma3_engine_delivery_gap_seconds"  # the engine's side of the chunk gaps (counted in test_batching)
    assert after[f'{gaps}_bucket{{le="+Inf"}}'] == after[f"{gaps}_count"] and f"{gaps}_sum" in after
    thread = 'gemma3_engine_thread_seconds_total{{state="{}"}}'.format  # where the engine thread's time went
    assert after[thread("host")] > before[thread("host")] and after[thread("waiting")] > before[thread("waiting")]
    assert after[thread("idle")] >= before[thread("idle")] > 0  # it waited for this request
    cpu = "gemma3_engine_thread_cpu_seconds_total"
    assert before[cpu] < after[cpu] <= after[thread("host")] + after[thread("waiting")]


def start_server(model: Path, *flags: str):
    """scripts/serve.py on 127.0.0.1 in a torch-free subprocess: (process, base URL)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(model), "--port", "0",
                             "--dtype", "float32", *flags], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    lines, deadline = [], time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("".join(lines)[-3000:])


@pytest.mark.slow
@pytest.mark.xdist_group("real_270m")  # one worker converts the real model
def test_eight_concurrent_clients_on_the_real_270m(real_270m):
    """Eight clients at once on four slots: each gets exactly the greedy text the offline Generator gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from gemma3_jax.runtime.generator import Generator

    path = real_270m[0]
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
               "The quick brown fox", "import numpy as np\n", "Water boils at", "My favourite colour is"]
    gen = Generator.from_pretrained(path, dtype="float32", cache_length=128, progress=False, compilation_cache=False)
    want = [gen.generate(p, max_new_tokens=12, temperature=0, chat=False).texts[0] for p in prompts]
    proc, url = start_server(path, "--cache-length", "128", "--max-batch", "4", "--chunk-tokens", "8",
                             "--no-background-compile")
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)

        def ask(prompt):
            return client.completions.create(model=path.name, prompt=prompt, max_tokens=12, temperature=0)

        with ThreadPoolExecutor(8) as pool:
            got = [r.choices[0].text for r in pool.map(ask, prompts)]
        assert got == want
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


@on_server_worker
def test_more_image_markers_than_images_is_400(server, files):
    """A text part that writes the image marker itself asks for more images than the message carries."""
    parts = [{"type": "image_url", "image_url": {"url": data_url(files["images"][0])}},
             {"type": "text", "text": "and this one: <start_of_image>"}]
    r = post(server, CHAT, {"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert r.status_code == 400 and "image" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_full_queue_is_503_with_retry_after(files):
    """One slot, one waiting request: the rest of a burst is refused at once with Retry-After, and every accepted
    request completes. (The engine on a thread of the server's process here: the other servers run it in a process
    of its own.)"""
    from concurrent.futures import ThreadPoolExecutor

    proc, url = start_server(files["it"], "--max-batch", "1", "--max-queue", "1", "--cache-length", "256",
                             "--chunk-tokens", "32", "--no-background-compile", "--no-engine-process")
    try:
        def one(i):
            return post(url, "/v1/completions", {"prompt": f"story {i}", "max_tokens": 200, "temperature": 0},
                        key=None)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        busy = [r for r in answers if r.status_code == 503]
        done = [r for r in answers if r.status_code == 200]
        assert busy and len(busy) + len(done) == 8, [r.status_code for r in answers]
        assert all(r.headers.get("retry-after") == "1" and "busy" in r.json()["error"]["message"] for r in busy)
        assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in done)
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_sigterm_lets_a_running_stream_finish_then_exits_0(files):
    proc, url = start_server(files["it"], "--cache-length", "256", "--chunk-tokens", "32", "--max-batch", "4",
                             "--no-background-compile")  # the module server's shapes: compiled once
    try:
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "A long story", "max_tokens": 120,
                                                                 "temperature": 0, "stream": True}, timeout=120) as r:
            lines = r.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            proc.terminate()  # SIGTERM while the stream runs
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finish[-1] == "length", finish[-3:]
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):  # no longer admitting
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


def engine_process_of(server: subprocess.Popen) -> int:
    """The pid of a server's engine process (its spawned child; the other child is multiprocessing's tracker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server.pid and b"spawn_main" in cmdline:
            return int(stat.parent.name)
    raise AssertionError(f"server {server.pid} has no engine process")


def test_a_killed_engine_process_ends_the_stream_and_the_server_exits_1(files):
    """The engine's process dies mid-stream: the client's stream ends (finish_reason "error", then [DONE]) instead
    of hanging, and the server says so in one line and exits 1, for a supervisor to restart it."""
    proc, url = start_server(files["it"], "--cache-length", "256", "--chunk-tokens", "32", "--max-batch", "4",
                             "--no-background-compile")  # the module server's shapes: compiled once
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "A long story", "max_tokens": 120,
                                                                 "temperature": 0, "stream": True}, timeout=120) as r:
            lines = r.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]
            os.kill(engine_process_of(proc), 9)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "error", events[-3:]
        assert proc.wait(timeout=60) == 1
        rest = proc.stderr.read()
        assert "error: the engine process exited (code -9)" in rest and "Traceback" not in rest, rest[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_count_responses_counts_each_status_and_an_escaping_exception_as_500():
    """The request counter sees each response's status as it starts; an exception that escapes the app (answered
    500 by the error middleware outside it) is a 500; other scopes (lifespan) pass through uncounted."""
    import asyncio

    from gemma3_jax.server.app import Metrics, _CountResponses

    metrics, sent = Metrics(), []

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def boom(scope, receive, send):
        raise RuntimeError("boom")

    async def send(message):
        sent.append(message)

    asyncio.run(_CountResponses(ok, metrics)({"type": "http", "path": "/health"}, None, send))
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(_CountResponses(boom, metrics)({"type": "http", "path": "/nowhere"}, None, send))
    asyncio.run(_CountResponses(ok, metrics)({"type": "lifespan"}, None, send))
    assert metrics.requests == {("/health", 201): 1, ("other", 500): 1}
    assert len(sent) == 4


@pytest.mark.parametrize("flags, match", [
    (["--model", "/nonexistent/gemma"], "neither a checkpoint directory nor a .gguf"),  # refused in the engine process
    (["--tensor-parallel", "64"], "needs 64 devices"),  # the engine process counts the devices
    (["--dtype", "float16"], "float16 is refused"),
    (["--port", "70000"], "--port must be in"),  # refused before anything starts
])
def test_bad_flags_end_in_one_line_and_exit_2(files, flags, match):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu")
    args = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(files["it"]), *flags]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and match in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("flag", ["--max-batch", "--chunk-tokens", "--step-tokens"])
def test_engine_sizes_are_refused_in_one_line(files, flag):
    """Refused in the engine's process, a zero size was followed by multiprocessing's warning of leaked
    semaphores (two more lines)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(files["it"]), flag, "0"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {flag} must be >= 1, got 0", r.stderr[-2000:]


def test_a_port_in_use_is_one_line_before_anything_loads(files):
    """uvicorn's own bind failure came after the weights loaded and the process never exited (SIGTERM is the
    server's own there): the port is bound first now."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        test_bad_flags_end_in_one_line_and_exit_2(files, ["--port", str(port), "--no-engine-process"],
                                                  f"cannot listen on 127.0.0.1:{port}")


def test_ctrl_c_while_the_engine_starts_is_one_line(files):
    """Ctrl-C while the engine's process compiles: one line and status 130 (a KeyboardInterrupt traceback before,
    then a wait for the child to finish starting, then the child's BrokenPipeError traceback)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(files["it"]),
                             "--port", "0", "--dtype", "float32", "--cache-length", "256", "--max-batch", "2",
                             "--chunk-tokens", "32"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "compiling the first steps" in line:  # the engine's process, warming up
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert rest.strip() == "error: interrupted" and "Traceback" not in rest, rest


# serve.py run with uvicorn.Server.run wrapped so that a signal (argv[1]) arrives just before uvicorn installs its
# handlers
_STOP_BEFORE_UVICORN = """
import os, runpy, signal, sys
import uvicorn
run = uvicorn.Server.run
def interrupted_run(self, *args, **kwargs):
    os.kill(os.getpid(), getattr(signal, SIG))
    return run(self, *args, **kwargs)
uvicorn.Server.run = interrupted_run
SIG, sys.argv = sys.argv[1], sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_between_the_engine_ready_and_serving_stops(files, sig):
    """A Ctrl-C (or a SIGTERM) after the engine is ready but before uvicorn's own handlers are in place: nothing is
    served; a Ctrl-C ends in one line and status 130, a SIGTERM in a clean exit 0, as once serving (the handler there
    did nothing before, and the server served on as if never stopped)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", _STOP_BEFORE_UVICORN, sig, str(ROOT / "scripts" / "serve.py"),
                           "--model", str(files["it"]), "--port", "0", "--dtype", "float32", "--cache-length", "256",
                           "--max-batch", "2", "--chunk-tokens", "32"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "serving" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if sig == "SIGINT":
        assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1] == "error: interrupted", proc.stderr
    else:
        assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr


# A script run with a Ctrl-C delivered inside a gc callback once JAX is imported: Python prints the callback's
# KeyboardInterrupt as "Exception ignored" and drops it, as it can any Ctrl-C while JAX's own gc callback runs.
_CTRL_C_IN_GC_CALLBACK = """
import gc, os, runpy, signal, sys
def callback(phase, info, fired=[]):
    if not fired and "jax" in sys.modules:
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)
        fired.append(True)  # the handler runs here, inside the callback
gc.callbacks.append(callback)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ... or with a Ctrl-C as JAX is first imported (by what the script's main imports)
_CTRL_C_IMPORTING_JAX = """
import os, runpy, signal, sys
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "jax":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Finder())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("when", ["gc_callback", "importing_jax"])
@pytest.mark.parametrize("script", ["generate.py", "serve.py", "quantize.py"])
def test_a_ctrl_c_while_a_script_starts_is_one_line(files, script, when, tmp_path):
    """The script stops with its one line and status 130 before loading or writing anything, no traceback: a Ctrl-C
    dropped in a gc callback was printed, then the text was generated to the end, the server started or the
    checkpoint was written; one while importing was a KeyboardInterrupt traceback and status -2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    more = {"generate.py": ["--prompt", "hello", "--max-new-tokens", "4", "--cache-length", "256"],
            "serve.py": ["--port", "0", "--cache-length", "256"],
            "quantize.py": ["--quantize", "int8", "--out", str(tmp_path / "int8")]}[script]
    driver = _CTRL_C_IN_GC_CALLBACK if when == "gc_callback" else _CTRL_C_IMPORTING_JAX
    proc = subprocess.run([sys.executable, "-c", driver, str(ROOT / "scripts" / script), "--model",
                           str(files["it"]), "--dtype", "float32", *more], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().endswith("interrupted") and not (tmp_path / "int8").exists(), proc.stderr
