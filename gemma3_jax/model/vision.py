"""SigLIP vision tower and the Gemma-3 multimodal projector.

Shapes: I images, C channels, P patches per image, E vision hidden, N heads, H head dim, F MLP hidden,
T soft tokens per image, D text hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from gemma3_jax.model.config import Gemma3Config, VisionConfig
from gemma3_jax.model.kernels import Kernels, padded_head_dim
from gemma3_jax.model.layers import LayerNorm, RMSNorm, param
from gemma3_jax.model.pixels import PixelLevels, as_pixels


def patchify(pixels: Float[Array, "I C S S"], patch: int) -> Float[Array, "I P CPP"]:
    """[I, C, S, S] -> [I, P, C*p*p], patches row-major and features in Conv2d weight order (c, y, x)."""
    i, c, s, _ = pixels.shape
    g = s // patch
    x = pixels.reshape(i, c, g, patch, g, patch)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # [I, gy, gx, C, py, px]
    return x.reshape(i, g * g, c * patch * patch)


class VisionAttention(nnx.Module):
    """SigLIP self-attention. q, k and v are one weight [E, 3, N, Hp] with the head dim H zero-padded to Hp, a
    multiple of 16 (72 -> 80, done at load time): one product writes them in the layout the Pallas kernel reads
    in place, and the output projection [N, Hp, E] has zero rows for the padded columns, so no per-call
    padding, slicing or weight concatenation remains, each of which would be a copy per image. The Pallas path
    sets v's padded bias columns to 1, so P @ V there is the kernel's softmax denominator (``ones_column``): it
    relies on the padded weight columns of q|k|v and the padded rows of o_proj being zero, as loading and
    benchmarks/random_init.py make them."""

    def __init__(self, cfg: VisionConfig, dtype, kernels: Kernels):
        e, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        hp = padded_head_dim(h)
        self.qkv_proj, self.qkv_bias = param((e, 3, n, hp), dtype), param((3, n, hp), dtype)
        self.o_proj, self.o_bias = param((n, hp, e), dtype), param((e,), dtype)
        self.head_dim = h
        self.scale = h**-0.5
        self.kernels = kernels

    def __call__(self, x: Float[Array, "I P E"]) -> Float[Array, "I P E"]:
        # One [E, 3*N*Hp] product with a 1-D bias (K = 3: q, k, v), then a free reshape. Written as the 5-D einsum,
        # the bias broadcast over three output dims did not become cuBLAS's bias epilogue on the GPU.
        w, b = self.qkv_proj[...], self.qkv_bias[...]
        h = self.head_dim
        ones = self.kernels.ones_column(h, b.shape[-1])
        if ones:  # v's padded columns = 1 (their weights are 0): P @ V there is the kernel's softmax denominator
            b = b.at[2, :, h:].set(1)
        qkv = jnp.einsum("IPE,EF->IPF", x, w.reshape(w.shape[0], -1)) + b.reshape(-1)
        qkv = qkv.reshape(*x.shape[:2], *b.shape)
        out = self.kernels.vision_attention(qkv, head_dim=h, scale=self.scale, ones_column=ones)
        return jnp.einsum("IPNH,NHE->IPE", out, self.o_proj[...]) + self.o_bias[...]


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype):
        self.fc1, self.fc1_bias = param((cfg.hidden_size, cfg.intermediate_size), dtype), param(
            (cfg.intermediate_size,), dtype
        )
        self.fc2, self.fc2_bias = param((cfg.intermediate_size, cfg.hidden_size), dtype), param(
            (cfg.hidden_size,), dtype
        )

    def __call__(self, x: Float[Array, "I P E"]) -> Float[Array, "I P E"]:
        # gelu in the activation dtype, not layers.gelu_tanh's float32: on a GPU XLA then folds bias + gelu into
        # cuBLAS's GEMM epilogue (evaluated on the f32 accumulator, rounded once). The float32 form does not
        # match that pattern and would cost a separate kernel per image.
        h = jax.nn.gelu(jnp.einsum("IPE,EF->IPF", x, self.fc1[...]) + self.fc1_bias[...], approximate=True)
        return jnp.einsum("IPF,FE->IPE", h, self.fc2[...]) + self.fc2_bias[...]


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, dtype, kernels: Kernels):
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.attn = VisionAttention(cfg, dtype, kernels)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = VisionMLP(cfg, dtype)

    def __call__(self, x: Float[Array, "I P E"]) -> Float[Array, "I P E"]:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nnx.Module):
    """SigLIP: patch embedding (a strided conv as one matmul), positions, encoder, post-layernorm."""

    def __init__(self, cfg: VisionConfig, dtype, kernels: Kernels):
        self.cfg = cfg
        cpp = cfg.num_channels * cfg.patch_size**2
        self.patch_embed = param((cpp, cfg.hidden_size), dtype)  # [C*p*p, E]
        self.patch_bias = param((cfg.hidden_size,), dtype)
        self.pos_embed = param((cfg.patches_per_side**2, cfg.hidden_size), dtype)  # [P, E]
        self.layers = nnx.List([EncoderLayer(cfg, dtype, kernels) for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.kernels = kernels

    def __call__(self, pixels: Float[Array, "I C S S"] | PixelLevels) -> Float[Array, "I P E"]:
        w = self.patch_embed[...]
        pixels = self.kernels.split_images(as_pixels(pixels))  # under a mesh: each device its images, the layers follow
        patches = patchify(pixels.astype(w.dtype), self.cfg.patch_size)
        x = jnp.einsum("IPK,KE->IPE", patches, w) + self.patch_bias[...] + self.pos_embed[...]
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)


class Projector(nnx.Module):
    """Average-pool patches to ``mm_tokens_per_image``, soft-embedding RMSNorm, project to text hidden."""

    def __init__(self, cfg: Gemma3Config, dtype):
        v = cfg.vision
        self.patches_per_side = v.patches_per_side
        self.tokens_per_side = int(round(cfg.mm_tokens_per_image**0.5))
        self.norm = RMSNorm(v.hidden_size, v.layer_norm_eps, dtype)
        self.proj = param((v.hidden_size, cfg.text.hidden_size), dtype)  # [E, D]

    def __call__(self, x: Float[Array, "I P E"]) -> Float[Array, "I T D"]:
        i, _, e = x.shape
        g, t = self.patches_per_side, self.tokens_per_side
        k = g // t
        pooled = x.reshape(i, t, k, t, k, e).astype(jnp.float32).mean(axis=(2, 4)).astype(x.dtype)
        pooled = self.norm(pooled.reshape(i, t * t, e))
        return jnp.einsum("ITE,ED->ITD", pooled, self.proj[...])
