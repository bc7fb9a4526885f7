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
