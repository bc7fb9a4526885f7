"""Small building blocks shared by the text decoder and the vision tower.

Parameters start as zeros of the right shape and dtype: real values come from a checkpoint
(``gemma3_jax.checkpoints.loading``), and models are built under ``nnx.eval_shape`` so nothing is allocated twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from gemma3_jax.model import quant
from gemma3_jax.model.config import RopeConfig


def param(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def params_by_path(module: nnx.Module) -> dict[str, nnx.Param]:
    """Every parameter of ``module`` by its dotted path (e.g. 'text.layers.0.mlp.down')."""
    return {".".join(map(str, path)): n for path, n in nnx.iter_graph(module) if isinstance(n, nnx.Param)}


def value(p: nnx.Param | None) -> Array | None:
    """A parameter's array, or None for an absent one (an unquantized weight's scale)."""
    return None if p is None else p[...]


def gelu_tanh(x: Array) -> Array:
    """gelu with the tanh approximation (transformers' ``gelu_pytorch_tanh``), computed in float32 and rounded
    once to x's dtype as torch does for bf16/fp16 inputs, because evaluated in bf16 op by op many of a bf16 MLP's
    outputs differ from transformers'. The text MLP uses it; the
    vision tower keeps XLA's bf16 form, which a GPU runs inside cuBLAS's epilogue (see vision.VisionMLP)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: ``x / rms(x) * (1 + w)`` computed in float32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = param((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (SigLIP), statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.scale = param((dim,), dtype)
        self.bias = param((dim,), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class GeGLU(nnx.Module):
    """Gemma MLP: ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int, dtype, groups: int = 1, quantize: str | None = None):
        # [2F, D], [out, in]: gate rows then up rows, in ``groups`` groups (one per tensor-parallel device, each
        # with its gate rows then its up rows); scales per output channel when quantized (``quant``)
        self.gate_up, self.gate_up_scale = quant.weight((2 * hidden, dim), dtype, quantize, 1)
        self.down, self.down_scale = quant.weight((dim, hidden), dtype, quantize, 1)  # [D, F]
        self.hidden, self.groups = hidden, groups

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        h = quant.einsum("BTD,FD->BTF", x, self.gate_up[...], value(self.gate_up_scale))  # both halves at once
        h = h.reshape(*h.shape[:-1], self.groups, 2, self.hidden // self.groups)
        gate, up = (h[..., i, :].reshape(*h.shape[:-3], self.hidden) for i in (0, 1))
        return quant.einsum("BTF,DF->BTD", gelu_tanh(gate) * up, self.down[...], value(self.down_scale))


def rope_cos_sin(
    positions: Int[Array, "B T"], head_dim: int, rope: RopeConfig, dtype
) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """cos and sin of the rotary angles, computed in float32 and cast to ``dtype`` as transformers does."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / rope.factor  # linear scaling; factor 1 for the default rope
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: Float[Array, "B T N H"], cos: Array, sin: Array) -> Float[Array, "B T N H"]:
    """Rotate-half RoPE; cos/sin [B, T, H] broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
