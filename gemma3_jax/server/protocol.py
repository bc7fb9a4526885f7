"""The OpenAI chat-completions and completions protocol: request bodies checked and turned into ``Service.submit``
arguments, and the response objects. No web framework here: ``app.py`` serves these.

A bad request is an ``APIError`` with the HTTP status and OpenAI's error fields; its message names the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import uuid
from pathlib import Path
from typing import Any

# Fields a client may send that change nothing here (OpenAI's own defaults, or bookkeeping).
IGNORED = {"model", "stream", "stream_options", "n", "user", "logprobs", "top_logprobs", "frequency_penalty",
           "presence_penalty", "logit_bias", "response_format", "metadata", "store", "service_tier",
           "parallel_tool_calls", "echo", "best_of", "suffix"}
CHAT_FIELDS = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
COMPLETION_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
DEFAULT_MAX_TOKENS = 256
# accepted fields this server cannot honour: only their "off" values pass, any other is refused, not ignored
NOT_SUPPORTED = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
                 "response_format": ({"type": "text"},), "best_of": (1,), "suffix": ("",)}


class APIError(Exception):
    """An error the client caused (or must wait out): HTTP ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _number(body: dict, name: str, kind, low=None, high=None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise bad(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"'{name}' must be in [{low}, {'inf' if high is None else high}], got {value!r}", name)
    return value


def sampling(body: dict, known: set[str]) -> dict:
    """``Service.submit`` keyword arguments from a request body's common fields."""
    unknown = sorted(set(body) - known - IGNORED)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}", unknown[0])
    for name, off in NOT_SUPPORTED.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or value not in off):
            raise bad(f"'{name}' is not supported (only {off[0]!r} or leaving it out), got {str(value)[:80]}", name)
    n = body.get("n", 1)
    if isinstance(n, bool) or n != 1:
        raise bad(f"'n' must be 1 (one choice per request), got {n!r}", "n")
    for flag in ("stream", "echo"):
        if body.get(flag) not in (None, True, False):
            raise bad(f"'{flag}' must be true or false, got {body[flag]!r}", flag)
    if body.get("echo"):
        raise bad("'echo' is not supported", "echo")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise bad("log probabilities are not supported", "logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad(f"'{name}' must be an integer >= 1, got {max_tokens!r}", name)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise bad("'stop' must be a string or a list of up to 4 strings", "stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return dict(max_new_tokens=max_tokens, temperature=_number(body, "temperature", (int, float), 0, 2),
                top_p=_number(body, "top_p", (int, float), 0, 1), top_k=_number(body, "top_k", int, 0),
                seed=_number(body, "seed", int, 0, 2**63 - 1) or 0, stop=stop)


def chat_messages(body: dict, media_dir: Path | None, max_image_bytes: int) -> list[dict]:
    """The request's messages in ``Service`` form: text parts as they are, ``image_url`` parts as images."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role must be system, user or assistant, got {role!r}", "messages")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": "system" if role == "developer" else role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"messages[{i}].content must be a string or a list of parts", "messages")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise bad(f"messages[{i}].content[{j}].image_url must hold a 'url' string", "messages")
                parts.append({"type": "image", "image": load_image(url, media_dir, max_image_bytes, f"messages[{i}]"
                                                                    f".content[{j}]")})
            else:
                raise bad(f"messages[{i}].content[{j}] must be a text or image_url part, got {str(part)[:80]}",
                          "messages")
        out.append({"role": "system" if role == "developer" else role, "content": parts})
    return out


def load_image(url: str, media_dir: Path | None, max_bytes: int, where: str):
    """A PIL image from a ``data:image/...;base64,`` URL or, under ``media_dir`` only, a ``file://`` URL or path.
    Remote URLs are never fetched."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
            raise bad(f"{where}: a data URL must be data:image/<type>;base64,<data>", "messages")
        if len(data) * 3 // 4 > max_bytes:
            raise APIError(413, f"{where}: image of ~{len(data) * 3 // 4} bytes is over the {max_bytes}-byte limit",
                           param="messages")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{where}: the data URL is not valid base64", "messages") from None
        source: Any = io.BytesIO(raw)
        name = "the data URL"
    elif url.startswith(("http://", "https://", "ftp://")):
        raise bad(f"{where}: remote image URLs are not fetched; send the image as a data:image/...;base64 URL",
                  "messages")
    else:
        path = Path(url.removeprefix("file://"))
        if media_dir is None:
            raise bad(f"{where}: local image paths are off (the server was started without --allowed-local-media)",
                      "messages")
        shown = ascii(url)  # quoted and escaped: a path may hold NUL, lone surrogates or nothing at all
        try:
            path = path.resolve(strict=True)
        except (OSError, ValueError):  # ValueError: NUL or a lone surrogate, which no file name holds
            raise bad(f"{where}: no image at {shown}", "messages") from None
        if not url or not path.is_relative_to(media_dir):
            raise bad(f"{where}: {shown} is outside the allowed media directory", "messages")
        if path.stat().st_size > max_bytes:
            raise APIError(413, f"{where}: {shown} is over the {max_bytes}-byte image limit", param="messages")
        source, name = path, shown
    try:
        image = Image.open(source)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise bad(f"{where}: {name} is not a readable image ({type(e).__name__})", "messages") from None
    except Image.DecompressionBombError:  # its pixel count, not its bytes, is over PIL's limit
        raise APIError(413, f"{where}: {name} has too many pixels to decode (over PIL's limit of "
                       f"{Image.MAX_IMAGE_PIXELS * 2})", param="messages") from None
    return image


def completion_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str:
    """OpenAI's reason for an engine's: a stop id, a stop string or a cancel all stop; "error" (the engine's process
    exited mid-request: streamed answers end with it, others are a 503) stays, for a client to tell."""
    return reason if reason in ("length", "error") else "stop"


def chat_response(cid: str, model: str, text: str, reason: str, prompt_tokens: int, tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(reason), "logprobs": None}],
            "usage": usage(prompt_tokens, tokens)}


def chat_chunk(cid: str, model: str, delta: dict, reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason and finish_reason(reason),
                         "logprobs": None}]}


def completion_response(cid: str, model: str, text: str, reason: str | None, prompt_tokens: int,
                        tokens: int | None = None, chunk: bool = False) -> dict:
    out = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": reason and finish_reason(reason),
                        "logprobs": None}]}
    if not chunk:
        out["usage"] = usage(prompt_tokens, tokens or 0)
    return out
