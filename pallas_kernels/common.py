"""Small pieces both kernels use: dtypes, power-of-two rounding, a fast exp2 for Triton."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def interpret_mode() -> bool:
    """Whether the kernels run in Pallas interpret mode here: everywhere but on a GPU (how CI tests them)."""
    return jax.default_backend() != "gpu"


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def ex2_approx(x):
    """exp2 as one MUFU.EX2 (ex2.approx.ftz.f32), skipping libdevice's subnormal handling (GPU only)."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )[0]
