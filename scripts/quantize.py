#!/usr/bin/env python3
"""Write a quantized copy of a Gemma-3 checkpoint, which then loads without quantizing and from fewer bytes.

    python scripts/quantize.py --model path/to/gemma-3-4b-it --quantize int8 --out path/to/gemma-3-4b-it-int8
    python scripts/generate.py --model path/to/gemma-3-4b-it-int8 --prompt "..."

The text decoder's product weights (q|k|v, o, gate|up, down, the tied embedding) are stored as
``load_pretrained(..., quantize=MODE)`` makes them from the weights rounded to --dtype, with their scales; every
other tensor and file (tokenizer, processor, chat template, generation config) is copied. From a .gguf file (the
default model is one), int4 keeps every Q4_0 tensor's values and scales exactly, as Google's QAT checkpoints ship
them; other tensors are dequantized first. The layout is described in gemma3_jax/checkpoints/quantized.py. A bad
input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Hugging Face checkpoint directory or .gguf file (default: the real Gemma-3 270M)")
    p.add_argument("--quantize", required=True, metavar="MODE", help="int8, fp8 or int4")
    p.add_argument("--out", required=True, metavar="DIR", help="the new checkpoint directory (must not exist)")
    p.add_argument("--dtype", default="bfloat16", help="the weights are rounded to this dtype before quantizing, as "
                   "loading with --dtype does (bfloat16 or float32; default: bfloat16)")
    args = p.parse_args(argv)
    from gemma3_jax.runtime.interrupts import Interrupts  # no JAX: before it, whose gc callback can drop a Ctrl-C

    interrupts = Interrupts().install()
    from gemma3_jax.checkpoints.gguf import packaged_gguf
    from gemma3_jax.checkpoints.quantized import quantize_checkpoint, quantize_gguf

    try:
        interrupts.check()  # a Ctrl-C dropped while importing: before anything is written
        t = time.perf_counter()
        if args.model == "":
            raise ValueError("the model path is empty")
        src = Path(args.model).expanduser() if args.model is not None else packaged_gguf()
        dest = Path(args.out).expanduser()
        if src.is_file():  # a .gguf file
            out = quantize_gguf(src, dest, args.quantize, args.dtype)
        else:
            out = quantize_checkpoint(src, dest, args.quantize, args.dtype)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    size = lambda d: d.stat().st_size if d.is_file() else sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    print(f"{out}: {args.quantize} weights, {size(out) / 2**20:.1f} MiB of tensors ({size(src) / 2**20:.1f} MiB "
          f"before), in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while Python imports what main imports
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
