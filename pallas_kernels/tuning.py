"""Every kernel's launch settings in one place: the prefill attention table, the decode attention table, the
batch-1 matrix-vector (GEMV) settings, and the compiler-params glue.

The tables are keyed by padded head dim; entries were picked from measurements (benchmarks/attention.py,
benchmarks/gemv.py). Head dims that are not powers of two
use the entry of the next power of two (the kernels compute them in power-of-two column chunks).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    fast_exp2: bool = False  # ex2.approx.ftz inline asm (GPU only; interpret mode uses jnp.exp2)


# padded head dim -> config (GPU, bf16/fp16).
# D=256: 128x64, 8 warps, 2 stages is the fastest tile measured at every prompt length (3 stages at 128x64
# need 256 KiB of shared memory and do not launch), and fast_exp2 (ex2.approx.ftz inline asm instead of
# libdevice exp2f) is faster because the exponentials compete with the MMAs in each warpgroup.
# Smaller head dims: the same shape with 3 stages where the shared memory allows it (checked for correctness,
# speed not measured).
# D=72 (SigLIP), computed as 64 + 16 columns (80): 128x64, 4 warps, 3 stages, because eight warps starve at
# this head dim.
_TABLE: dict[int, KernelConfig] = {
    80: KernelConfig(128, 64, 4, 3, fast_exp2=True),
    16: KernelConfig(128, 64, 4, 3, fast_exp2=True),
    32: KernelConfig(128, 64, 4, 3, fast_exp2=True),
    64: KernelConfig(128, 64, 4, 3, fast_exp2=True),
    128: KernelConfig(128, 64, 8, 3, fast_exp2=True),
    256: KernelConfig(128, 64, 8, 2, fast_exp2=True),
}


def default_config(head_dim_padded: int, q_len: int, dtype_bytes: int = 2) -> KernelConfig:
    """The entry for ``head_dim_padded`` (a multiple of 16), else that of the next power of two."""
    d = min(max(head_dim_padded, 16), 256)
    cfg = _TABLE.get(d) or _TABLE[1 << (d - 1).bit_length()]
    if dtype_bytes == 4:  # fp32 tiles are twice as large: halve the key block
        cfg = dataclasses.replace(cfg, block_k=max(16, cfg.block_k // 2), num_stages=2)
    return cfg


TARGET_PROGRAMS = 264  # decode splits aim at ~2 waves of programs on a 132-SM GPU


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_k: int
    num_warps: int
    num_stages: int
    fast_exp2: bool = True  # ex2.approx.ftz (GPU only; interpret mode uses jnp.exp2)


# padded head dim -> decode attention config for 2-byte dtypes (fp32 halves block_k). Sized so 2 stages of the K
# and V tiles (2 * 2 * block_k * Hp * 2 bytes = 128 KiB at Hp = 256) fit in shared memory next to the [Gp, Hp]
# f32 accumulator, and close to the fastest block_k / splits / warps measured.
_DECODE_TABLE: dict[int, DecodeConfig] = {
    16: DecodeConfig(128, 4, 2),
    32: DecodeConfig(128, 4, 2),
    64: DecodeConfig(128, 4, 2),
    128: DecodeConfig(128, 4, 2),
    256: DecodeConfig(64, 4, 2),
}


def decode_config(head_dim_padded: int, dtype_bytes: int = 2) -> DecodeConfig:
    cfg = _DECODE_TABLE[min(max(head_dim_padded, 16), 256)]
    if dtype_bytes == 4:
        cfg = dataclasses.replace(cfg, block_k=max(16, cfg.block_k // 2))
    return cfg


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int
    splits: int
    num_warps: int


def gemv_qkv_config(weight_bytes: int = 2) -> GemvConfig:
    """Batch-1 decode's fused q|k|v product: a narrow output (Hq + 2 Hkv heads), so small blocks and no split.
    1-byte weights (int8 / fp8): 2 rows a program, 6.6 against 7.2 us with 4 (H100, 4B shapes, benchmarks/gemv.py)."""
    return GemvConfig(block_n=2 if weight_bytes == 1 else 4, splits=1, num_warps=4)


def gemv_mlp_configs(dim: int, hidden: int, weight_bytes: int = 2) -> tuple[GemvConfig, GemvConfig]:
    """Batch-1 decode's MLP: (gate|up with GELU-up as its epilogue, down as split-K partial sums). Down splits in
    four, not eight: residual_norm, one program per row, reads every partial sum. 1-byte weights want fewer warps
    a program (H100, 4B shapes, benchmarks/gemv.py --weights int8): gate|up 20.1 us with 2 warps against 26.3 with 8,
    down 12.3 us with 4 against 14.5."""
    splits = next(s for s in (4, 2, 1) if hidden % (16 * s) == 0)
    warps = (2, 4) if weight_bytes == 1 else (8, 8)
    return (GemvConfig(block_n=1, splits=1, num_warps=warps[0]),
            GemvConfig(2 if dim % 2 == 0 else 1, splits, num_warps=warps[1]))


class Int4Configs(NamedTuple):
    qkv: GemvConfig
    gate_up: GemvConfig
    down: GemvConfig
    lm_head: GemvConfig


def gemv_int4_configs(hidden: int) -> Int4Configs:
    """Batch-1 decode over 4-bit weights (``gemv_int4``), down split over K in up to four (each split a whole
    number of 32-input groups of its ``hidden`` inputs). The best of ``benchmarks.gemv --weights int4 --grid
    small`` (H100, 4B shapes): q|k|v 5.9 us, gate|up 18.1, down 11.0."""
    splits = next((s for s in (4, 2) if hidden % (32 * s) == 0), 1)
    return Int4Configs(qkv=GemvConfig(block_n=4, splits=1, num_warps=4),
                       gate_up=GemvConfig(block_n=4, splits=1, num_warps=4),
                       down=GemvConfig(block_n=8, splits=splits, num_warps=4),
                       lm_head=GemvConfig(block_n=8, splits=1, num_warps=4))


def compiler_params(num_warps: int | None, num_stages: int | None):
    """Triton compiler params across jax versions (CompilerParams in new jax, TritonCompilerParams before)."""
    from jax.experimental.pallas import triton as plgpu

    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)
