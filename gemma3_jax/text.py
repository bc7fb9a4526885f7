"""The Gemma-3 text decoder.

Shapes: B batch, T tokens, D hidden, N query heads, K key/value heads, H head dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from gemma3_jax.attention import attend
from gemma3_jax.config import GLOBAL, SLIDING, TextConfig
from gemma3_jax.layers import GeGLU, RMSNorm, apply_rope, param, rope_cos_sin


class Attention(nnx.Module):
    """Grouped-query attention with q/k RMSNorm before RoPE and the image-span mask."""

    def __init__(self, cfg: TextConfig, layer: int, dtype):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param((d, n, h), dtype)
        self.k_proj = param((d, k, h), dtype)
        self.v_proj = param((d, k, h), dtype)
        self.o_proj = param((n, h, d), dtype)
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.scale = cfg.attn_scale

    def project_kv(self, x: Float[Array, "B T D"], cos: Array, sin: Array):
        """Keys (normed, rotated) and values of ``x``: what a KV cache stores."""
        k = self.k_norm(jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...]))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...])
        return apply_rope(k, cos, sin), v

    def __call__(
        self,
        x: Float[Array, "B T D"],
        cos: Array,
        sin: Array,
        segment_ids: Int[Array, "B T"],
        kv_lengths: Int[Array, "B"] | None,
        impl: str,
    ) -> Float[Array, "B T D"]:
        q = self.q_norm(jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...]))
        q = apply_rope(q, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        out = attend(
            q,
            k,
            v,
            segment_ids,
            sliding_window=self.sliding_window,
            kv_lengths=kv_lengths,
            scale=self.scale,
            impl=impl,
        )
        return jnp.einsum("BTNH,NHD->BTD", out, self.o_proj[...])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, layer: int, dtype):
        eps = cfg.rms_norm_eps
        self.input_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.attn = Attention(cfg, layer, dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.pre_ffw_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.mlp = GeGLU(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.post_ffw_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.layer_type = SLIDING if cfg.is_sliding(layer) else GLOBAL

    def __call__(self, x, cos, sin, segment_ids, kv_lengths, impl: str):
        h = self.attn(self.input_norm(x), cos, sin, segment_ids, kv_lengths, impl)
        x = x + self.post_attn_norm(h)
        h = self.mlp(self.pre_ffw_norm(x))
        return x + self.post_ffw_norm(h)


class TextModel(nnx.Module):
    """Embedding, decoder layers, final norm and the tied lm_head."""

    def __init__(self, cfg: TextConfig, dtype):
        self.cfg = cfg
        self.dtype = dtype
        self.embed = param((cfg.vocab_size, cfg.hidden_size), dtype)  # [V, D], also the lm_head
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def embed_tokens(self, input_ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        # sqrt(hidden) is rounded in the weight dtype, as transformers does (55.4256 -> 55.5 in bf16).
        scale = jnp.asarray(np.sqrt(self.cfg.hidden_size), self.dtype)
        return jnp.take(self.embed[...], input_ids, axis=0) * scale

    def rope_tables(self, positions: Int[Array, "B T"]) -> dict[str, tuple[Array, Array]]:
        h = self.cfg.head_dim
        return {
            SLIDING: rope_cos_sin(positions, h, self.cfg.rope_local, self.dtype),
            GLOBAL: rope_cos_sin(positions, h, self.cfg.rope_global, self.dtype),
        }

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        logits = jnp.einsum("BTD,VD->BTV", hidden, self.embed[...])
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(
        self,
        embeddings: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        segment_ids: Int[Array, "B T"],
        kv_lengths: Int[Array, "B"] | None,
        impl: str,
    ) -> Float[Array, "B T D"]:
        """Hidden states after the final norm (call ``logits`` on what you need)."""
        tables = self.rope_tables(positions)
        x = embeddings
        for layer in self.layers:
            cos, sin = tables[layer.layer_type]
            x = layer(x, cos, sin, segment_ids, kv_lengths, impl)
        return self.final_norm(x)
