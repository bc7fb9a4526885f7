#!/usr/bin/env python3
"""Serve Gemma-3 over the OpenAI chat-completions protocol (needs the [serve] extra: pip install -e ".[serve]").

    python scripts/serve.py --model path/to/gemma-3-4b-it --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

Without --model it serves the default model (the real Gemma-3 270M, a base model: /v1/completions). The server
compiles its first steps before /health answers; it listens on 127.0.0.1 unless --host says otherwise. A bad
flag prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory or .gguf file (default: the real Gemma-3 270M)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", help="the model id clients name (default: the checkpoint's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="prompt tokens per prefill chunk (default: 512)")
    p.add_argument("--step-tokens", type=int, help="prompt tokens a step carries beside decoding requests "
                   "(default: 256, or --chunk-tokens if fewer)")
    p.add_argument("--cache-length", type=int, help="KV cache positions per request (default: 4096, or the "
                   "model's positions if fewer)")
    p.add_argument("--dtype", help="bfloat16 or float32 (default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="split the text decoder over N "
                   "devices (default: 1)")
    p.add_argument("--quantize", metavar="MODE", help="int8 or fp8: the text decoder's weights in 8 bits with a scale "
                   "per output channel, half the bytes a decode step reads; int4: 4 bits with a scale per 32 "
                   "inputs, a .gguf's Q4_0 weights as stored (default: the --dtype weights, or the mode a checkpoint written by scripts/quantize.py "
                   "stores)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: none)")
    p.add_argument("--allowed-local-media", metavar="DIR", help="image paths are read only under DIR "
                   "(default: local paths refused; data: URLs always work, remote URLs never)")
    p.add_argument("--no-background-compile", action="store_true",
                   help="compile each new prompt-chunk shape when it first comes, every stream waiting meanwhile "
                        "(default: compile the largest at start, run a new shape padded to one of them while it "
                        "compiles in the background; a longer start)")
    p.add_argument("--no-engine-process", action="store_true",
                   help="run the engine on a thread of the server's process (default: a process of its own, so the "
                        "server's request threads never hold the GIL the engine needs; slower under load, for "
                        "comparison)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503 (default: 256)")
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, help="larger request bodies get a 413 "
                   "(default: 32 MiB)")
    p.add_argument("--max-image-bytes", type=int, default=16 << 20, help="larger images get a 413 (default: 16 MiB)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gemma3_jax.runtime.interrupts import Interrupts  # no JAX: before it, whose gc callback can drop a Ctrl-C

    interrupts = Interrupts().install()  # the signals until uvicorn takes them over, honoured before it serves
    try:
        import uvicorn

        from gemma3_jax.server.app import build_app
    except ImportError as e:
        print(f"error: the server needs the [serve] extra (pip install -e '.[serve]'): {e}", file=sys.stderr)
        return 2
    from gemma3_jax.runtime.engine_process import SWITCH_INTERVAL_S, EngineExited
    from gemma3_jax.runtime.service import Service

    interrupts.check()  # a Ctrl-C dropped while importing: before anything loads

    try:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        # checked here too, not only by the engine: refused before the weights load and the engine's process starts
        for flag in ("max_queue", "max_body_bytes", "max_image_bytes", "max_batch", "chunk_tokens", "step_tokens",
                     "cache_length"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
        listener = listen(args.host, args.port)  # before the weights load: a port in use is one line, at once
        media = None
        if args.allowed_local_media is not None:
            media = Path(args.allowed_local_media)
            if not media.is_dir():
                raise ValueError(f"--allowed-local-media {media} is not a directory")
        service = Service.from_pretrained(args.model, dtype=args.dtype, max_batch=args.max_batch,
                                          cache_length=args.cache_length, chunk_tokens=args.chunk_tokens,
                                          step_tokens=args.step_tokens, max_queue=args.max_queue,
                                          tensor_parallel=args.tensor_parallel, quantize=args.quantize,
                                          background_compile=not args.no_background_compile, verbose=True,
                                          engine_process=not args.no_engine_process)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EngineExited as e:  # the engine's process crashed while loading or compiling
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = args.served_model_name or (Path(args.model).name if args.model else "gemma-3-270m")
    if args.no_engine_process:
        print("compiling the first steps ...", file=sys.stderr, flush=True)
        service.warm_up()
        # The engine's thread wakes when a device call finishes and must dispatch the next at once; while the event
        # loop holds the GIL it would wait up to Python's default switch interval (5 ms) for it.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = build_app(service, model_name=name, api_key=args.api_key, media_dir=media,
                    max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)

    original = server.startup
    exit_code = 0

    async def startup(sockets=None):
        nonlocal exit_code
        await original(sockets)  # uvicorn's own handlers are in place from here on
        if interrupts.signals:  # a stop asked for while starting (or a Ctrl-C dropped before): serve nothing
            server.should_exit = True
            if signal.SIGINT in interrupts.signals:
                print("error: interrupted", file=sys.stderr, flush=True)
                exit_code = 130
            return
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        print(f"serving {name} at http://{args.host}:{port}/v1", file=sys.stderr, flush=True)

    server.startup = startup

    def engine_exited(code):  # on the engine's reply thread: stop serving, exit non-zero
        nonlocal exit_code
        print(f"error: the engine process exited (code {code}); stopping", file=sys.stderr, flush=True)
        exit_code = 1
        server.should_exit = True

    if not args.no_engine_process:
        service.engine.on_exit = engine_exited
    # uvicorn handles SIGTERM / Ctrl-C (stop accepting, let running requests finish, bounded), then raises the
    # signal again for the handler it found: this one, so a clean stop exits 0. Until uvicorn installs its own,
    # this one keeps the signal for startup (a handler that did nothing lost a stop there: the server served on).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, interrupts.keep)
    try:
        server.run(sockets=[listener])
    finally:  # whatever ends serving, the engine (and its process) stops: an engine process left behind hangs exit
        service.close()
    if server.force_exit and exit_code == 0:  # a second Ctrl-C: uvicorn cut the running requests off
        print("error: stopped by a second interrupt before the running requests finished", file=sys.stderr)
        exit_code = 130
    return exit_code


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), bound here so a port in use or a host that is not this machine's is an
    ``OSError`` naming them before anything loads (uvicorn's own bind failure came only after, and did not exit)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(False)
    return sock


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while loading or compiling (the engine's process is stopped at once)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
