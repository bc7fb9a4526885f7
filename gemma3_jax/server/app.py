"""An OpenAI-compatible HTTP server over a ``Service`` (FastAPI + uvicorn, the ``[serve]`` extra).

Routes: ``POST /v1/chat/completions`` (text and ``image_url`` parts), ``POST /v1/completions`` (raw prompts, for
base models), ``GET /v1/models``, ``GET /health`` and Prometheus text at ``GET /metrics``. Streaming answers are server-sent events ending in
``data: [DONE]``. Every error is OpenAI's error JSON with its HTTP status, and the server stays up after it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gemma3_jax.runtime.requests import QueueFull
from gemma3_jax.runtime.engine_process import EngineExited
from gemma3_jax.runtime.service import Service
from gemma3_jax.server import protocol as p

KNOWN_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def build_app(service: Service, *, model_name: str, api_key: str | None = None, media_dir: Path | None = None,
              max_body_bytes: int = 32 << 20, max_image_bytes: int = 16 << 20):
    """The ASGI app. ``api_key``: every /v1 route wants ``Authorization: Bearer <key>``. ``media_dir``: local image
    paths are read only under it. Bodies over ``max_body_bytes`` are a 413; a request the engine refuses because its
    queue is full (``BatchEngine(max_queue=...)``) a 503 with Retry-After."""
    app = FastAPI(title="gemma3-jax", docs_url=None, redoc_url=None)
    media_dir = None if media_dir is None else Path(media_dir).resolve()
    started = time.time()

    metrics = Metrics()
    app.add_middleware(_CountResponses, metrics=metrics)

    def error(e: p.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(p.APIError)
    async def api_error(request, e: p.APIError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(p.APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return error(p.bad(f"invalid request: {e.errors()[0].get('msg', e)}"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise p.APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                             code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise p.APIError(413, f"request body of {length} bytes is over the {max_body_bytes}-byte limit")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise p.APIError(413, f"request body of {len(raw)} bytes is over the {max_body_bytes}-byte limit")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise p.bad(f"the body is not valid JSON: {e}") from None
        except RecursionError:  # arrays or objects nested past the parser's depth: no request is built that way
            raise p.bad("the body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise p.bad("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise p.APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}",
                             "not_found_error", "model", "model_not_found")
        return body

    def submit(**kwargs):
        try:
            return service.submit(**kwargs)
        except QueueFull as e:
            raise p.APIError(503, f"the server is busy: {e}", "server_error", headers={"Retry-After": "1"}) from None
        except EngineExited as e:
            raise p.APIError(503, f"the server is stopping: {e}", "server_error") from None
        except (ValueError, TypeError) as e:
            raise p.bad(str(e).splitlines()[0]) from None

    async def streamed(request: Request, stream, body: dict, cid: str, kind: str, *, first, piece, last):
        """Server-sent events: ``first`` (or none), a ``piece(text)`` per delta, ``last(finish_reason)``, the usage
        when the client asked for it (``stream_options.include_usage``), then ``[DONE]``."""

        async def events():
            if first is not None:
                yield _sse(first)
            async for delta in stream:
                if delta.text:
                    yield _sse(piece(delta.text))
            yield _sse(last(stream.finish_reason))
            metrics.served(stream)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({"id": cid, "object": kind, "created": int(time.time()), "model": model_name,
                            "choices": [], "usage": p.usage(stream.prompt_tokens, len(stream.token_ids))})
            yield "data: [DONE]\n\n"

        if request.scope.get("http_version") == "1.0":
            # uvicorn frames a body of unknown length in chunks even for an HTTP/1.0 client, which reads the chunk
            # sizes as part of the events: such a client gets them all at once, with their length
            parts, gen = [], _cancel_on_exit(events(), stream)
            try:
                async for event in gen:
                    parts.append(event)
                    if await request.is_disconnected():
                        break
            finally:
                await gen.aclose()  # cancels a request left unfinished
            return Response("".join(parts), media_type="text/event-stream")
        return StreamingResponse(_cancel_on_exit(events(), stream), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        if not getattr(service.engine, "alive", True):  # an engine process that exited: the server is stopping
            return JSONResponse({"status": "engine exited", "model": model_name}, status_code=503)
        return {"status": "ok", "model": model_name, "uptime_s": time.time() - started}

    @app.get("/metrics")
    async def prometheus():
        try:  # a round trip to an engine in its own process: off the event loop
            stats = await asyncio.to_thread(service.engine.stats)
        except EngineExited as e:
            raise p.APIError(503, f"the server is stopping: {e}", "server_error") from None
        return PlainTextResponse(metrics.render(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "gemma3-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        kwargs = p.sampling(body, p.CHAT_FIELDS)
        messages = await asyncio.to_thread(p.chat_messages, body, media_dir, max_image_bytes)
        if service.checkpoint.chat_template is None:
            raise p.bad(f"{model_name} has no chat template (a base model): use /v1/completions with a prompt")
        stream = await asyncio.to_thread(submit, messages=messages, **kwargs)
        cid = p.completion_id("chatcmpl")
        if not body.get("stream"):
            text = await _collect(request, stream)
            _check_finished(stream)
            metrics.served(stream)
            return p.chat_response(cid, model_name, text, stream.finish_reason, stream.prompt_tokens,
                                   len(stream.token_ids))

        return await streamed(request, stream, body, cid, "chat.completion.chunk",
                              first=p.chat_chunk(cid, model_name, {"role": "assistant", "content": ""}),
                              piece=lambda text: p.chat_chunk(cid, model_name, {"content": text}),
                              last=lambda reason: p.chat_chunk(cid, model_name, {}, reason))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        kwargs = p.sampling(body, p.COMPLETION_FIELDS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            stream = await asyncio.to_thread(submit, prompt=prompt, **kwargs)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            stream = await asyncio.to_thread(submit, token_ids=prompt, **kwargs)
        else:
            raise p.bad("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
        cid = p.completion_id("cmpl")
        if not body.get("stream"):
            text = await _collect(request, stream)
            _check_finished(stream)
            metrics.served(stream)
            return p.completion_response(cid, model_name, text, stream.finish_reason, stream.prompt_tokens,
                                         len(stream.token_ids))

        return await streamed(request, stream, body, cid, "text_completion", first=None,
                              piece=lambda text: p.completion_response(cid, model_name, text, None, 0, chunk=True),
                              last=lambda reason: p.completion_response(cid, model_name, "", reason, 0, chunk=True))

    return app


class Metrics:
    """Prometheus text-format counters and histograms of what the server served."""

    TTFT = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    ITL = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = {"prompt": 0, "completion": 0}
        self.hist = {"ttft": [0] * (len(self.TTFT) + 1), "itl": [0] * (len(self.ITL) + 1)}
        self.sums = {"ttft": 0.0, "itl": 0.0}

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def _observe(self, name: str, bounds, value: float) -> None:
        self.hist[name][next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] += 1
        self.sums[name] += value

    def served(self, stream) -> None:
        """A finished request's tokens, time to first token and inter-token gaps."""
        self.tokens["prompt"] += stream.prompt_tokens
        self.tokens["completion"] += len(stream.token_ids)
        if stream.ttft_s is not None:
            self._observe("ttft", self.TTFT, stream.ttft_s)
        for gap in stream.inter_token_s():
            self._observe("itl", self.ITL, gap)

    def render(self, stats: dict) -> str:
        out = ["# TYPE gemma3_requests_total counter"]
        out += [f'gemma3_requests_total{{route="{r}",status="{c}"}} {n}' for (r, c), n in sorted(self.requests.items())]
        out.append("# TYPE gemma3_tokens_total counter")
        out += [f'gemma3_tokens_total{{kind="{k}"}} {n}' for k, n in self.tokens.items()]
        for name, value in (("queued_requests", stats["queued"]), ("active_slots", stats["active_slots"]),
                            ("max_slots", stats["max_batch"]), ("decode_tokens_per_second", stats["decode_tok_per_s"]),
                            ("cache_positions_held", stats["cache_positions_held"])):
            out += [f"# TYPE gemma3_{name} gauge", f"gemma3_{name} {value}"]
        # a step shape compiled while serving stalls every stream for the compile, unless it compiled in the
        # background (a call padded to a compiled shape meanwhile): worth watching
        for kind, prefix in (("compiles", "compiles_"), ("background_compiles", "background_compiles_")):
            out.append(f"# TYPE gemma3_{kind}_total counter")
            out += [f'gemma3_{kind}_total{{step="{k[len(prefix):]}"}} {v}'
                    for k, v in sorted(stats.items()) if k.startswith(prefix)]
        out += ["# TYPE gemma3_padded_calls_total counter", f"gemma3_padded_calls_total {stats['padded_calls']}"]
        for name, bounds, what in (("ttft", self.TTFT, "time_to_first_token_seconds"),
                                   ("itl", self.ITL, "inter_token_seconds")):
            out += _histogram(f"gemma3_{what}", bounds, self.hist[name], self.sums[name])
        # the engine's own gaps between deliveries to decoding streams (what the HTTP layer adds is the rest)
        gaps = stats["delivery_gaps"]
        out += _histogram("gemma3_engine_delivery_gap_seconds", gaps["bounds"], gaps["counts"], gaps["sum"])
        # the engine thread's time: with no work, waiting for the device, or on the host (dispatching, handing tokens
        # over, waiting for the GIL): host time that grows under load means the device waits for the host
        out.append("# TYPE gemma3_engine_thread_seconds_total counter")
        out += [f'gemma3_engine_thread_seconds_total{{state="{k}"}} {v}' for k, v in stats["thread_s"].items()]
        out.append("# TYPE gemma3_engine_thread_cpu_seconds_total counter")  # of its steps: host minus this waited
        out.append(f"gemma3_engine_thread_cpu_seconds_total {stats['thread_cpu_s']}")
        return "\n".join(out) + "\n"


def _histogram(name: str, bounds, counts, total_sum: float) -> list[str]:
    """Prometheus histogram lines from per-bucket counts (the last bucket: above every bound)."""
    out, total = [f"# TYPE {name} histogram"], 0
    for b, n in zip([*bounds, "+Inf"], counts):
        total += n
        out.append(f'{name}_bucket{{le="{b}"}} {total}')
    return out + [f"{name}_sum {total_sum}", f"{name}_count {total}"]


class _CountResponses:
    """Counts each response by route and status as it starts (an exception that escapes the app: a 500). A plain
    ASGI middleware: Starlette's BaseHTTPMiddleware (what ``@app.middleware`` builds) passes every streamed event
    through a memory stream and another task (what that costs: docs/benchmarks.md)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        started = False

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.count(route, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # the outer error middleware answers it with a 500
                self.metrics.count(route, 500)
            raise


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(request, stream) -> str:
    """The whole text; a client that goes away cancels the request."""
    try:
        async for _ in stream:
            if await request.is_disconnected():
                stream.cancel()
                break
    except asyncio.CancelledError:
        stream.cancel()
        raise
    return stream.text


def _check_finished(stream) -> None:
    if stream.finish_reason == "error":
        raise p.APIError(503, "the engine process exited while this request ran; the server is stopping",
                         "server_error")


async def _cancel_on_exit(events, stream):
    """Server-sent events; when the client disconnects (the generator is closed early) the request is cancelled."""
    try:
        async for event in events:
            yield event
    finally:
        if stream.finish_reason is None:
            stream.cancel()
