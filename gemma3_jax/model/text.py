"""The Gemma-3 text decoder.

Shapes: B batch, T tokens, D hidden, N query heads, K key/value heads, H head dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model import quant
from gemma3_jax.model.config import GLOBAL, SLIDING, TextConfig
from gemma3_jax.model.kernels import AttentionBatch, Kernels
from gemma3_jax.model.layers import GeGLU, RMSNorm, apply_rope, rope_cos_sin, value


@functools.partial(jax.tree_util.register_dataclass, data_fields=["table", "scale"], meta_fields=["dtype"])
@dataclasses.dataclass(frozen=True)
class Embedding:
    """The embedding table as a step that needs only it takes it (``TextModel.embedding``): a pytree whose dtype
    (the model's, which a quantized table does not show) is static."""

    table: Array
    scale: Array | None
    dtype: Any


def embed_lookup(embedding: Embedding, input_ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    """Token embeddings from the embedding table alone (a step that needs nothing else takes just the table)."""
    rows = quant.take_rows(embedding.table, embedding.scale, input_ids, embedding.dtype)
    # sqrt(hidden) is rounded in the weight dtype, as transformers does (55.4256 -> 55.5 in bf16).
    return rows * jnp.asarray(np.sqrt(embedding.table.shape[-1]), rows.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with q/k RMSNorm before RoPE and the image-span mask.

    Weights are [out, in] (transformers' layout): every product contracts the contiguous last axis, which is
    what batch-1 decode's matrix-vector products want (XLA streams them faster than [in, out] weights)."""

    def __init__(self, cfg: TextConfig, layer: int, dtype, kernels: Kernels, quantize: str | None = None):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v heads stacked in one weight [N + 2K, H, D]: one product per layer, no run-time concatenation;
        # scales per output channel when quantized (``quant``)
        self.qkv_proj, self.qkv_scale = quant.weight((n + 2 * k, h, d), dtype, quantize, 1)
        self.o_proj, self.o_scale = quant.weight((d, n, h), dtype, quantize, 2)
        self.num_heads, self.num_kv_heads = n, k
        self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.scale = cfg.attn_scale
        self.kernels = kernels
        # q|k|v rows in one group per tensor-parallel device (model.sharding): its query heads, then the key and
        # value heads they read; one group (q, then k, then v) on one device
        self.groups = kernels.shards

    def project(self, x: Float[Array, "B T D"], cos: Array, sin: Array):
        """Queries and keys (normed, rotated) [B, T, N|K, H] and values [B, T, K, H] of ``x``."""
        return self.heads(quant.einsum("BTD,MHD->BTMH", x, self.qkv_proj[...], value(self.qkv_scale)), cos, sin)

    def heads(self, qkv: Float[Array, "B T M H"], cos: Array, sin: Array):
        """``project`` from the raw q|k|v products."""
        g, (b, t, _, h) = self.groups, qkv.shape
        n, k = self.num_heads // g, self.num_kv_heads // g  # per group
        qkv = qkv.reshape(b, t, g, n + 2 * k, h)
        q = apply_rope(self.q_norm(qkv[:, :, :, :n].reshape(b, t, g * n, h)), cos, sin)
        keys = apply_rope(self.k_norm(qkv[:, :, :, n : n + k].reshape(b, t, g * k, h)), cos, sin)
        return q, keys, qkv[:, :, :, n + k :].reshape(b, t, g * k, h)

    def __call__(self, x: Float[Array, "B T D"], cos: Array, sin: Array,
                 batch: AttentionBatch) -> tuple[Float[Array, "B T D"], tuple[Array, Array]]:
        """Output and this layer's (keys, values) [B, T, K, H] for a KV cache."""
        q, k, v = self.project(x, cos, sin)
        out = self.kernels.attention(q, k, v, batch, sliding_window=self.sliding_window, scale=self.scale)
        return self.output(out), (k, v)

    def output(self, out: Float[Array, "... N H"]) -> Float[Array, "... D"]:
        """The output product over the heads (any leading axes)."""
        return quant.einsum("...NH,DNH->...D", out, self.o_proj[...], value(self.o_scale))

    def step(self, x: Float[Array, "B 1 D"], cos, sin, k_buf, v_buf, pos: Int[Array, "B"], gemv_b1: bool = False):
        """One token per row at position ``pos``: writes its key/value into the cache, attends over it.
        ``gemv_b1``: the q|k|v product through the matrix-vector kernel (``Kernels.gemv``)."""
        b, m, h, d = x.shape[0], *self.qkv_proj.shape
        scale = value(self.qkv_scale)
        qkv = self.kernels.qkv_product(x[:, 0], self.qkv_proj[...].reshape(m * h, d), gemv_b1,
                                       None if scale is None else scale.reshape(m * h, *scale.shape[2:])
                                       ).reshape(b, m, h)
        out, k_buf, v_buf = self.step_heads(qkv, cos, sin, k_buf, v_buf, pos)
        return self.output(out)[:, None], k_buf, v_buf

    def step_heads(self, qkv: Float[Array, "B M H"], cos, sin, k_buf, v_buf, pos: Int[Array, "B"]):
        """``step`` from the raw q|k|v products up to the attention output [B, N, H]."""
        ring = self.sliding_window is not None
        kernels = self.kernels
        if kernels.fused_step(qkv.shape[-1]):
            return kernels.decode_step_attention(
                qkv, self.q_norm.weight[...], self.k_norm.weight[...], self.q_norm.eps, cos[:, 0], sin[:, 0],
                k_buf, v_buf, pos, ring=ring, scale=self.scale)
        q, k, v = self.heads(qkv[:, None], cos, sin)
        k_buf = kvc.write_step(k_buf, k[:, 0], pos, ring)
        v_buf = kvc.write_step(v_buf, v[:, 0], pos, ring)
        return kernels.cached_attention(q[:, 0], k_buf, v_buf, pos, scale=self.scale), k_buf, v_buf

    def chunk(self, x: Float[Array, "B T D"], cos, sin, k_buf, v_buf, chunk: kvc.PromptChunk, fresh: bool = False):
        """A prompt chunk of each row after the positions its cache row already holds: attends over those and
        its own keys, and writes its keys and values into the row. ``fresh``: every chunk starts its prompt."""
        out, k_buf, v_buf = self.chunk_heads(*self.project(x, cos, sin), k_buf, v_buf, chunk, fresh)
        return self.output(out), k_buf, v_buf

    def chunk_heads(self, q, k, v, k_buf, v_buf, chunk: kvc.PromptChunk, fresh: bool = False):
        """``chunk`` from its queries, keys and values up to the attention output [B, T, N, H]."""
        ring = self.sliding_window is not None
        keys, q_offset, kv_start, kv_lengths = kvc.chunk_context(k_buf, k, chunk, ring, fresh)
        values = kvc.chunk_context(v_buf, v, chunk, ring, fresh)[0]
        seg = kvc.chunk_segment_ids(chunk, keys.shape[1], ring, fresh)
        batch = AttentionBatch(chunk.positions, seg, kv_lengths, q_offset, kv_start)
        out = self.kernels.attention(q, keys, values, batch, sliding_window=self.sliding_window, scale=self.scale)
        return out, kvc.write_chunk(k_buf, k, chunk, ring, fresh), kvc.write_chunk(v_buf, v, chunk, ring, fresh)

    def mixed(self, x: Float[Array, "R D"], decode_rope, chunk_rope, k_buf, v_buf, pos: Int[Array, "S"],
              chunk: kvc.PromptChunk):
        """A decode token of each of the cache's S rows (the first S of ``x``) and prompt chunks [B, T] (the rest,
        flattened): one q|k|v and one output product for all R = S + B*T tokens, so the weights are read once.
        The decode rows write first; a chunk's row overwrites what its decode row wrote at the chunk's start."""
        s, (b, t) = pos.shape[0], chunk.segment_ids.shape
        qkv = quant.einsum("RD,MHD->RMH", x, self.qkv_proj[...], value(self.qkv_scale))
        out_d, k_buf, v_buf = self.step_heads(qkv[:s], *decode_rope, k_buf, v_buf, pos)
        q, k, v = self.heads(qkv[s:].reshape(b, t, *qkv.shape[1:]), *chunk_rope)
        out_c, k_buf, v_buf = self.chunk_heads(q, k, v, k_buf, v_buf, chunk)
        out = jnp.concatenate([out_d, out_c.reshape(b * t, *out_c.shape[2:])])
        return self.output(out), k_buf, v_buf


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, layer: int, dtype, kernels: Kernels, quantize: str | None = None):
        eps = cfg.rms_norm_eps
        self.input_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.attn = Attention(cfg, layer, dtype, kernels, quantize)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.pre_ffw_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.mlp = GeGLU(cfg.hidden_size, cfg.intermediate_size, dtype, groups=kernels.shards, quantize=quantize)
        self.post_ffw_norm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.layer_type = SLIDING if cfg.is_sliding(layer) else GLOBAL

    def __call__(self, x, cos, sin, batch: AttentionBatch):
        h, kv = self.attn(self.input_norm(x), cos, sin, batch)
        return self.feed_forward(x + self.post_attn_norm(h)), kv

    def chunk(self, x, cos, sin, k_buf, v_buf, chunk: kvc.PromptChunk, fresh: bool = False):
        """``__call__`` for a prompt chunk after the positions its cache row holds (``Attention.chunk``)."""
        h, k_buf, v_buf = self.attn.chunk(self.input_norm(x), cos, sin, k_buf, v_buf, chunk, fresh)
        return self.feed_forward(x + self.post_attn_norm(h)), k_buf, v_buf

    def mixed(self, x: Float[Array, "R D"], decode_rope, chunk_rope, k_buf, v_buf, pos, chunk: kvc.PromptChunk):
        """``__call__`` for decode tokens and prompt chunks together (``Attention.mixed``)."""
        h, k_buf, v_buf = self.attn.mixed(self.input_norm(x), decode_rope, chunk_rope, k_buf, v_buf, pos, chunk)
        return self.feed_forward((x + self.post_attn_norm(h))[None])[0], k_buf, v_buf

    def feed_forward(self, x):
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


class TextModel(nnx.Module):
    """Embedding, decoder layers, final norm and the tied lm_head. ``quantize``: the products' weights held in
    8 bits (``quant.MODES``), or None."""

    def __init__(self, cfg: TextConfig, dtype, kernels: Kernels, quantize: str | None = None):
        self.cfg = cfg
        self.dtype = dtype
        self.kernels = kernels
        self.quantize = quant.check_mode(quantize)
        self.embed, self.embed_scale = quant.weight((cfg.vocab_size, cfg.hidden_size), dtype, quantize, 1)  # [V, D],
        # also the lm_head
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, kernels, quantize) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def embedding(self) -> Embedding:
        return Embedding(self.embed[...], value(self.embed_scale), self.dtype)

    def embed_tokens(self, input_ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        return embed_lookup(self.embedding(), input_ids)

    def rope_tables(self, positions: Int[Array, "B T"]) -> dict[str, tuple[Array, Array]]:
        h = self.cfg.head_dim
        return {
            SLIDING: rope_cos_sin(positions, h, self.cfg.rope_local, self.dtype),
            GLOBAL: rope_cos_sin(positions, h, self.cfg.rope_global, self.dtype),
        }

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        b, t, d = hidden.shape
        logits = self.kernels.logits_product(hidden.reshape(b * t, d), self.embed[...], value(self.embed_scale))
        logits = logits.reshape(b, t, -1)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(
        self, embeddings: Float[Array, "B T D"], batch: AttentionBatch
    ) -> tuple[Float[Array, "B T D"], list[tuple[Array, Array]]]:
        """Hidden states after the final norm (call ``logits`` on what you need) and each layer's (k, v)."""
        tables = self.rope_tables(batch.positions)
        x, kvs = embeddings, []
        for layer in self.layers:
            cos, sin = tables[layer.layer_type]
            x, kv = layer(x, cos, sin, batch)
            kvs.append(kv)
        return self.final_norm(x), kvs

    def prefill_chunk(
        self, embeddings: Float[Array, "B T D"], cache: kvc.KVCache, chunk: kvc.PromptChunk, fresh: bool = False
    ) -> tuple[Float[Array, "B T D"], kvc.KVCache]:
        """Each row's next prompt chunk into its cache row (``chunk.slot``): hidden states after the final norm,
        and the cache holding the chunk's keys with the rows' lengths moved past it. ``fresh`` (static): every
        row's chunk starts its prompt, so it attends over itself alone and is written as one slab a row."""
        tables = self.rope_tables(chunk.positions)
        x, ks, vs = embeddings, [], []
        for layer, k_buf, v_buf in zip(self.layers, cache.k, cache.v):
            cos, sin = tables[layer.layer_type]
            x, k_buf, v_buf = layer.chunk(x, cos, sin, k_buf, v_buf, chunk, fresh)
            ks.append(k_buf)
            vs.append(v_buf)
        lengths = cache.lengths.at[chunk.slot].set(chunk.start + chunk.length, mode="drop")
        return self.final_norm(x), kvc.KVCache(tuple(ks), tuple(vs), lengths)

    def decode_step(
        self, embeddings: Float[Array, "B 1 D"], cache: kvc.KVCache
    ) -> tuple[Float[Array, "B 1 D"], kvc.KVCache]:
        """One token per row at position ``cache.lengths``; returns hidden states and the updated cache."""
        kernels = self.kernels
        pos = cache.lengths
        tables = self.rope_tables(pos[:, None])
        layers = list(self.layers)
        gemv_b1 = kernels.gemv(embeddings.shape[0], self.cfg.hidden_size, self.cfg.intermediate_size)
        # x: the residual stream; xn: its normed copy for the next sub-block. Each residual add and the norm
        # after it are one op (Kernels.residual_norm), the last one with the final norm.
        x, xn, ks, vs = embeddings, layers[0].input_norm(embeddings), [], []
        for i, (layer, k_buf, v_buf) in enumerate(zip(layers, cache.k, cache.v)):
            cos, sin = tables[layer.layer_type]
            h, k_buf, v_buf = layer.attn.step(xn, cos, sin, k_buf, v_buf, pos, gemv_b1)
            x, xn = kernels.residual_norm(x, h, layer.post_attn_norm, layer.pre_ffw_norm)
            following = layers[i + 1].input_norm if i + 1 < len(layers) else self.final_norm
            mlp = kernels.decode_mlp(layer.mlp, xn, gemv_b1)
            x, xn = kernels.residual_norm(x, mlp, layer.post_ffw_norm, following)
            ks.append(k_buf)
            vs.append(v_buf)
        return xn, kvc.KVCache(tuple(ks), tuple(vs), pos + 1)

    def mixed_step(
        self, decode_embeddings: Float[Array, "S 1 D"], chunk_embeddings: Float[Array, "B T D"], cache: kvc.KVCache,
        chunk: kvc.PromptChunk, advance: Bool[Array, "S"],
    ) -> tuple[Float[Array, "S 1 D"], Float[Array, "B T D"], kvc.KVCache]:
        """``decode_step`` for every cache row and ``prefill_chunk`` for the chunks' rows in one pass, each weight
        read once for both (a serving engine's decode step that also carries prompt chunks). A row's length
        moves past its decode token where ``advance`` is set, past its chunk where it has one (a chunk's row must
        not be advancing). Returns hidden states after the final norm, decode rows then chunks."""
        s, (b, t), d = decode_embeddings.shape[0], chunk.segment_ids.shape, decode_embeddings.shape[-1]
        pos = cache.lengths
        dec, chk = self.rope_tables(pos[:, None]), self.rope_tables(chunk.positions)
        x = jnp.concatenate([decode_embeddings[:, 0], chunk_embeddings.reshape(b * t, d)])
        ks, vs = [], []
        for layer, k_buf, v_buf in zip(self.layers, cache.k, cache.v):
            x, k_buf, v_buf = layer.mixed(x, dec[layer.layer_type], chk[layer.layer_type], k_buf, v_buf, pos, chunk)
            ks.append(k_buf)
            vs.append(v_buf)
        x = self.final_norm(x)
        lengths = jnp.where(advance, pos + 1, pos).at[chunk.slot].set(chunk.start + chunk.length, mode="drop")
        return x[:s, None], x[s:].reshape(b, t, d), kvc.KVCache(tuple(ks), tuple(vs), lengths)
