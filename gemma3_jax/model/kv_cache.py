"""KV cache: full-length buffers for global layers, ring buffers of ``sliding_window`` slots for sliding layers.

Shapes: B batch, C cache length, W window slots, K key/value heads, H head dim, L prompt (bucket) length.
Position p of a row lives at index p of a global buffer and at slot ``p % W`` of a ring buffer.
Decode steps are plain causal over the cache: the token at position ``pos`` sees every held position <= pos
(within the window on sliding layers).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gemma3_jax.model.config import TextConfig


class KVCache(NamedTuple):
    k: tuple[Array, ...]  # one per layer: [B, C, K, H] (global) or [B, W, K, H] (sliding)
    v: tuple[Array, ...]
    lengths: Int[Array, "B"]  # tokens held per row = position of the next token

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (*self.k, *self.v))


def layer_slots(cfg: TextConfig, layer: int, cache_length: int) -> int:
    return min(cfg.sliding_window, cache_length) if cfg.is_sliding(layer) else cache_length


def cache_nbytes(cfg: TextConfig, batch: int, cache_length: int, dtype) -> int:
    """Bytes of keys and values a cache of this shape holds (without allocating it)."""
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return batch * per_slot * sum(layer_slots(cfg, i, cache_length) for i in range(cfg.num_layers))


def check_fits(prompt_tokens: int, max_new_tokens: int, cache_length: int, what: str = "prompt") -> None:
    """A request's prompt and new tokens must fit the cache: refused before anything runs, not truncated."""
    need = prompt_tokens + max_new_tokens
    if need > cache_length:
        raise ValueError(f"{what} ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
                         f"cache length {cache_length}")


def init_cache(cfg: TextConfig, batch: int, cache_length: int, dtype) -> KVCache:
    shapes = [(batch, layer_slots(cfg, i, cache_length), cfg.num_kv_heads, cfg.head_dim) for i in range(cfg.num_layers)]
    return KVCache(
        k=tuple(jnp.zeros(s, dtype) for s in shapes),
        v=tuple(jnp.zeros(s, dtype) for s in shapes),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def ring_positions(last: Int[Array, "B"], slots: int) -> Int[Array, "B W"]:
    """Position held by each ring slot when ``last`` is the newest position written (-1 or less: empty)."""
    s = jnp.arange(slots, dtype=jnp.int32)[None, :]
    return last[:, None] - jnp.mod(last[:, None] - s, slots)


def fill_layer(buf: Float[Array, "B S K H"], new: Float[Array, "B L K H"], lengths: Int[Array, "B"], ring: bool):
    """Write a prefilled prompt's keys or values (positions 0..L-1, rows valid up to ``lengths``)."""
    slots, length = buf.shape[1], new.shape[1]
    if not ring:
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, 0, 0))
    pos = ring_positions(lengths - 1, slots)  # [B, W]: newest position of each slot
    taken = jnp.take_along_axis(new, jnp.clip(pos, 0, length - 1)[:, :, None, None], axis=1)
    return jnp.where((pos >= 0)[:, :, None, None], taken, buf).astype(buf.dtype)


def write_step(buf: Float[Array, "B S K H"], new: Float[Array, "B K H"], pos: Int[Array, "B"], ring: bool):
    """Write one decode token per row at its own position."""
    idx = jnp.mod(pos, buf.shape[1]) if ring else pos
    return buf.at[jnp.arange(buf.shape[0]), idx].set(new.astype(buf.dtype), mode="drop")


# ---- a prompt chunk into the rows (slots) of a cache ----------------------------------------------
# A serving engine prefills a prompt in chunks, each after the slot already holds the prompt's earlier positions.
# A chunk never ends inside an image, so the earlier keys are plain causal text to it (segment id -1).


class PromptChunk(NamedTuple):
    """One chunk per row: T tokens (padded) at positions ``start .. start + length - 1`` of cache row ``slot``."""

    slot: Int[Array, "B"]  # cache row; >= the cache's rows for a padding row (reads clipped, writes dropped)
    start: Int[Array, "B"]  # positions the slot already holds (the chunk's first position)
    length: Int[Array, "B"]  # valid tokens of the chunk (0 for a padding row)
    segment_ids: Int[Array, "B T"]  # the chunk's own image spans (>= 0), -1 for text and padding

    @property
    def positions(self) -> Int[Array, "B T"]:
        return self.start[:, None] + jnp.arange(self.segment_ids.shape[1], dtype=jnp.int32)[None, :]


def write_chunk(buf: Float[Array, "S C K H"], new: Float[Array, "B T K H"], chunk: PromptChunk, ring: bool,
                fresh: bool = False):
    """Write the chunk's valid keys or values into its rows (ring: slot p % W, only the last W positions).
    ``fresh``: every row's chunk starts its prompt (start 0), so it lands at slots 0 .. T-1 of its row as one slab
    (its padding too: positions a row does not hold yet are never read before they are written)."""
    slots, t = buf.shape[1], new.shape[1]
    if fresh and t <= slots:
        return buf.at[chunk.slot, :t].set(new.astype(buf.dtype), mode="drop")
    offset = jnp.arange(t, dtype=jnp.int32)[None, :]
    valid = offset < chunk.length[:, None]
    if ring:
        valid &= offset >= chunk.length[:, None] - slots  # an earlier position would collide with a later one
        idx = jnp.mod(chunk.positions, slots)
    else:
        idx = chunk.positions
    idx = jnp.where(valid, idx, slots)  # out of range: dropped
    return buf.at[chunk.slot[:, None], idx].set(new.astype(buf.dtype), mode="drop")


def chunk_context(buf: Float[Array, "S C K H"], new: Float[Array, "B T K H"], chunk: PromptChunk, ring: bool,
                  fresh: bool = False):
    """The keys (or values) the chunk's queries attend over, and where its queries sit among them.

    Global layers: the row with the chunk written at its positions (Sk = C; queries at ``start``). Sliding layers:
    the ring unrolled into position order (positions ``start - W .. start - 1``, those before 0 cut by
    ``kv_start``), then the chunk (Sk = W + T; queries at W). ``fresh`` (every chunk starts its prompt): the chunk
    alone (Sk = T; queries at 0). Returns (keys [B, Sk, K, H], q_offset [B], kv_start [B], kv_lengths [B])."""
    if fresh:
        zeros = jnp.zeros_like(chunk.start)
        return new.astype(buf.dtype), zeros, zeros, chunk.length
    rows = jnp.take(buf, chunk.slot, axis=0, mode="clip")
    if not ring:
        local = chunk._replace(slot=jnp.arange(rows.shape[0], dtype=jnp.int32))
        return write_chunk(rows, new, local, ring=False), chunk.start, jnp.zeros_like(chunk.start), \
            chunk.start + chunk.length
    slots = rows.shape[1]
    order = jnp.mod(chunk.start[:, None] + jnp.arange(slots, dtype=jnp.int32)[None, :], slots)
    unrolled = jnp.take_along_axis(rows, order[:, :, None, None], axis=1)
    keys = jnp.concatenate([unrolled, new.astype(rows.dtype)], axis=1)
    q_offset = jnp.full_like(chunk.start, slots)
    return keys, q_offset, jnp.maximum(slots - chunk.start, 0), slots + chunk.length


def chunk_segment_ids(chunk: PromptChunk, context_length: int, ring: bool, fresh: bool = False) -> Int[Array, "B Sk"]:
    """Segment ids over ``chunk_context``'s keys: the chunk's own, -1 (text) for every earlier position."""
    b, t = chunk.segment_ids.shape
    if fresh:
        return chunk.segment_ids
    if ring:
        return jnp.concatenate([jnp.full((b, context_length - t), -1, jnp.int32), chunk.segment_ids], axis=1)
    seg = jnp.full((b, context_length), -1, jnp.int32)
    offset = jnp.arange(t, dtype=jnp.int32)[None, :]
    idx = jnp.where(offset < chunk.length[:, None], chunk.positions, context_length)
    return seg.at[jnp.arange(b)[:, None], idx].set(chunk.segment_ids, mode="drop")


def chunk_end(image_mask, start: int, budget: int) -> int:
    """Where a chunk that starts at ``start`` ends (exclusive) with at most ``budget`` tokens: an end inside an
    image moves to the image's end, so an image is never split (one longer than the budget is one chunk).
    ``image_mask``: one prompt's image-token flags (host array)."""
    n = len(image_mask)
    if not 0 <= start < n or budget < 1:
        raise ValueError(f"need 0 <= start < {n} and budget >= 1, got start={start} budget={budget}")
    end = min(start + budget, n)
    while end < n and image_mask[end] and image_mask[end - 1]:
        end += 1
    return end
