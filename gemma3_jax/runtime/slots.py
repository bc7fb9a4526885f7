"""The device half of continuous batching: a KV cache of ``max_batch`` rows (slots) and the compiled steps over it.

Each slot holds one request. Its decode state lives on the device beside the cache (``SlotState``), so a prefill
chunk that completes a prompt writes the slot's first token and sampling settings there and decode can start
without a trip through the host. Three compiled steps, each compiled once per shape:

- ``prefill``: the next chunk of up to ``rows`` prompts (padded to a bucket), each into its own slot after the
  positions the slot holds (``TextModel.prefill_chunk``); a row whose prompt ends in this chunk samples its
  first token and becomes active;
- ``mixed``: ``prefill`` and one decode step of every slot in one pass over the weights, so prompt chunks ride
  on the decode steps of the slots already decoding (whose weight reads they share) instead of stalling them;
- ``decode``: up to ``steps`` steps of every slot in one ``lax.while_loop`` (the CUDA-graph loop of the static
  engine); inactive slots compute along (fixed shapes) but their lengths do not move and their tokens are
  ignored, so a slot can be reused at once.

Sampling draws a row's token with ``fold_in(request key, position)``: a request's tokens depend on its seed and
its own tokens only, never on which slot or which other requests it was served with.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.gemma3 import embed_with_features
from gemma3_jax.model.text import Embedding
from gemma3_jax.runtime.sampling import MAX_STOP_IDS, sample_rows


class SlotState(NamedTuple):
    """Per-slot decode state, on the device. A slot decodes while ``active``."""

    token: Int[Array, "S"]  # the last sampled token: the next decode step's input
    active: Bool[Array, "S"]
    remaining: Int[Array, "S"]  # new tokens the slot may still produce
    key: Array  # [S] request keys (typed PRNG keys)
    stops: Int[Array, "S M"]  # stop token ids, -1 padded
    temperature: Float[Array, "S"]
    top_k: Int[Array, "S"]
    top_p: Float[Array, "S"]

    @classmethod
    def empty(cls, slots: int) -> SlotState:
        return cls(
            token=jnp.zeros((slots,), jnp.int32), active=jnp.zeros((slots,), bool),
            remaining=jnp.zeros((slots,), jnp.int32), key=jax.random.split(jax.random.key(0), slots),
            stops=jnp.full((slots, MAX_STOP_IDS), -1, jnp.int32), temperature=jnp.zeros((slots,), jnp.float32),
            top_k=jnp.zeros((slots,), jnp.int32), top_p=jnp.ones((slots,), jnp.float32),
        )


class RowSettings(NamedTuple):
    """What a prefill row carries for its slot besides the chunk: the request's settings (used when the prompt
    ends in this chunk, ``last``)."""

    last: Bool[Array, "B"]
    max_new: Int[Array, "B"]
    seed: Int[Array, "B"]  # uint32 request seeds
    stops: Int[Array, "B M"]
    temperature: Float[Array, "B"]
    top_k: Int[Array, "B"]
    top_p: Float[Array, "B"]

# A prefill or mixed call's per-row inputs travel as one int32 array [B, 2T + 9 + MAX_STOP_IDS] (floats and the
# uint32 seed as their bits): every host array given to a call is a separate transfer, ~0.2 ms of host time each
# on a GPU host, which a one-step mixed call cannot hide.
_ROW_INTS = ("slot", "start", "length", "last", "max_new", "seed", "top_k", "temperature", "top_p")


def pack_rows(ids, segment_ids, *, slot, start, length, last, max_new, seed, stops, temperature, top_k, top_p):
    """Host (numpy) arrays of a call's rows -> one int32 array for ``unpack_rows``: ids and segment ids [B, T],
    stops [B, M], the rest [B]."""
    cols = dict(slot=slot, start=start, length=length, last=last, max_new=max_new, top_k=top_k,
                seed=np.asarray(seed, np.uint32).view(np.int32),
                temperature=np.asarray(temperature, np.float32).view(np.int32),
                top_p=np.asarray(top_p, np.float32).view(np.int32))
    return np.concatenate([np.asarray(ids, np.int32), np.asarray(segment_ids, np.int32),
                           np.stack([np.asarray(cols[k]).astype(np.int32) for k in _ROW_INTS], axis=1),
                           np.asarray(stops, np.int32)], axis=1)


def packed_width(t: int) -> int:
    """Columns of ``pack_rows``'s array for chunks padded to ``t`` tokens."""
    return 2 * t + len(_ROW_INTS) + MAX_STOP_IDS


def unpack_rows(packed: Int[Array, "B N"]) -> tuple[Int[Array, "B T"], kvc.PromptChunk, RowSettings]:
    """``pack_rows``'s array, inside a compiled call -> (ids, chunk, row settings)."""
    t = (packed.shape[1] - len(_ROW_INTS) - MAX_STOP_IDS) // 2
    ids, seg = packed[:, :t], packed[:, t: 2 * t]
    c = {k: packed[:, 2 * t + i] for i, k in enumerate(_ROW_INTS)}
    f32 = lambda x: jax.lax.bitcast_convert_type(x, jnp.float32)
    chunk = kvc.PromptChunk(c["slot"], c["start"], c["length"], seg)
    row = RowSettings(c["last"] != 0, c["max_new"], jax.lax.bitcast_convert_type(c["seed"], jnp.uint32),
                      packed[:, 2 * t + len(_ROW_INTS):], f32(c["temperature"]), c["top_k"], f32(c["top_p"]))
    return ids, chunk, row


def _last_rows(hidden: Float[Array, "B T D"], chunk: kvc.PromptChunk) -> Float[Array, "B D"]:
    """Each chunk row's hidden state at its last valid position."""
    b, t = hidden.shape[:2]
    return hidden[jnp.arange(b), jnp.clip(chunk.length - 1, 0, t - 1)]


def _draw(logits, keys, positions, temperature, top_k, top_p, greedy_only: bool):
    step_keys = jax.vmap(jax.random.fold_in)(keys, positions)
    return sample_rows(logits, step_keys, temperature, top_k, top_p, greedy_only=greedy_only)


@dataclasses.dataclass(frozen=True)
class SlotSteps:
    """The pure step functions over (text model, cache, slot state); the batching engine compiles them."""

    cfg: object  # Gemma3Config
    pad_id: int

    def embed(self, embedding: Embedding, packed: Int[Array, "B N"],
              feats: Float[Array, "I Ti D"] | None) -> Float[Array, "B T D"]:
        """A prefill call's input: the chunks' token embeddings (ids from ``pack_rows``'s array) with their
        images' features in place. A call of its own, so the image count does not multiply the prefill call's
        compiled shapes; it takes the embedding table alone (``TextModel.embedding``), because each array
        argument of a call costs host time."""
        return embed_with_features(self.cfg, embedding, unpack_rows(packed)[0], feats)

    def prefill(self, text, cache: kvc.KVCache, state: SlotState, embeddings: Float[Array, "B T D"],
                chunk: kvc.PromptChunk, row: RowSettings, greedy_only: bool, fresh: bool = False):
        """One chunk per row into its slot. Returns (cache, state, first token [B]: meaningful where ``last``).
        ``fresh``: every chunk starts its prompt (``TextModel.prefill_chunk``)."""
        hidden, cache = text.prefill_chunk(embeddings, cache, chunk, fresh)
        logits = text.logits(_last_rows(hidden, chunk)[None])[0]
        state, token = self._first_tokens(logits, state, chunk, row, greedy_only)
        return cache, state, token

    def mixed(self, text, cache: kvc.KVCache, state: SlotState, embeddings: Float[Array, "B T D"],
              chunk: kvc.PromptChunk, row: RowSettings, greedy_only: bool):
        """One decode step of every active slot and one chunk per row into its slot, in one pass over the weights
        (``TextModel.mixed_step``). Returns (cache, state, decode tokens [S] (pad where a slot produced none),
        whether each slot produced one [S], first tokens [B] as ``prefill``'s)."""
        held = cache.lengths
        decode_in = text.embed_tokens(state.token[:, None])
        hidden_d, hidden_c, cache = text.mixed_step(decode_in, embeddings, cache, chunk, state.active)
        produced = state.active
        s = hidden_d.shape[0]
        # one lm_head product for the decode rows and the chunks' last rows: the table is read once
        logits = text.logits(jnp.concatenate([hidden_d[:, 0], _last_rows(hidden_c, chunk)])[None])[0]
        state, token = self._advance(logits[:s], state, held, greedy_only)
        state, first = self._first_tokens(logits[s:], state, chunk, row, greedy_only)
        return cache, state, token, produced, first

    def _first_tokens(self, logits: Float[Array, "B V"], state: SlotState, chunk: kvc.PromptChunk,
                      row: RowSettings, greedy_only: bool):
        """Sample each row's token after its chunk (``logits`` at its last position); a row whose prompt ends there
        (``last``) starts decoding."""
        end = chunk.start + chunk.length
        keys = jax.vmap(jax.random.key)(row.seed)
        token = _draw(logits, keys, end - 1, row.temperature, row.top_k, row.top_p, greedy_only)
        done = (token[:, None] == row.stops).any(-1) | (row.max_new <= 1)
        slot = jnp.where(row.last, chunk.slot, state.token.shape[0])  # only finished prompts touch the state
        put = lambda a, v: a.at[slot].set(v, mode="drop")  # noqa: E731
        state = SlotState(
            token=put(state.token, token), active=put(state.active, ~done),
            remaining=put(state.remaining, row.max_new - 1), key=put(state.key, keys),
            stops=put(state.stops, row.stops), temperature=put(state.temperature, row.temperature),
            top_k=put(state.top_k, row.top_k), top_p=put(state.top_p, row.top_p),
        )
        return state, token

    def _advance(self, logits: Float[Array, "S V"], st: SlotState, held: Int[Array, "S"], greedy_only: bool):
        """Every active slot's next token (drawn at position ``held``); returns the state and tokens (pad where
        inactive)."""
        nxt = _draw(logits, st.key, held, st.temperature, st.top_k, st.top_p, greedy_only)
        nxt = jnp.where(st.active, nxt, self.pad_id)
        remaining = st.remaining - st.active.astype(jnp.int32)
        active = st.active & ~(nxt[:, None] == st.stops).any(-1) & (remaining > 0)
        return st._replace(token=jnp.where(st.active, nxt, st.token), active=active, remaining=remaining), nxt

    def decode(self, text, cache: kvc.KVCache, state: SlotState, flags: Int[Array, "2+S"], steps: int,
               greedy_only: bool):
        """Up to ``min(steps, flags[1])`` steps of every active slot, fewer once none is active or, with
        ``until_free`` (``flags[0]``), once a slot the host counted as decoding (``flags[2:]``) is not: it finished
        here, or in a call the host has not read yet (then no step runs), so a queued request can take it. Returns
        (cache, state, tokens [S, steps] (pad where a slot produced none), produced [S])."""
        slots = state.token.shape[0]
        until_free, limit, expected = flags[0] != 0, jnp.minimum(flags[1], steps), flags[2:] != 0

        def body(carry):
            cache, st, out, produced, i = carry
            held = cache.lengths
            hidden, cache = text.decode_step(text.embed_tokens(st.token[:, None]), cache)
            cache = cache._replace(lengths=jnp.where(st.active, cache.lengths, held))
            produced = produced + st.active.astype(jnp.int32)
            st, nxt = self._advance(text.logits(hidden)[:, 0], st, held, greedy_only)
            return cache, st, out.at[:, i].set(nxt), produced, i + 1

        def cond(carry):
            active = carry[1].active
            freed = jnp.any(expected & ~active)
            return (carry[-1] < limit) & jnp.any(active) & ~(until_free & freed)

        out = jnp.full((slots, steps), self.pad_id, jnp.int32)
        carry = (cache, state, out, jnp.zeros((slots,), jnp.int32), jnp.int32(0))
        cache, state, out, produced, _ = jax.lax.while_loop(cond, body, carry)
        return cache, state, out, produced
