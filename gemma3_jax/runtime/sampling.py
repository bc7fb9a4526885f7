"""On-device token sampling: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


# Below this a temperature is greedy: float32 logits divided by a smaller one overflow to inf and NaN.
MIN_TEMPERATURE = 1e-6
# Stop ids travel to the compiled decode as a fixed-size array (no recompile per stop set), so their number is bounded.
MAX_STOP_IDS = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 (or below ``MIN_TEMPERATURE``) is greedy. ``top_k == 0`` and ``top_p == 1`` switch those
    filters off. Any real numbers are taken (numpy scalars too) and held as Python float / int."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))  # a static argument of the compiled steps: hashable
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise TypeError(f"top_k must be an int, got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if not 0 <= self.temperature < math.inf:  # inf would sample uniformly, NaN never compares
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def sample(logits: Float[Array, "B V"], key: Array, params: SamplingParams) -> Int[Array, "B"]:
    """Next token per row. ``params`` is static (part of the compiled step)."""
    logits = logits.astype(jnp.float32)
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        vals, idx = jax.lax.top_k(logits, k)  # sorted, descending
    else:
        idx = jnp.argsort(-logits, axis=-1)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    if params.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
        vals = jnp.where(before < params.top_p, vals, -jnp.inf)  # the first candidate always stays
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample_rows(logits: Float[Array, "B V"], keys: Array, temperature: Float[Array, "B"], top_k: Int[Array, "B"],
                top_p: Float[Array, "B"], greedy_only: bool = False) -> Int[Array, "B"]:
    """Next token per row with each row's own parameters as arrays (a batch of requests that each chose theirs),
    and each row's own key, so a row's draw does not depend on the others. ``greedy_only`` (static): every row is
    greedy, and no row pays for the sort."""
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        return best
    greedy = temperature < MIN_TEMPERATURE
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    idx = jnp.argsort(-scaled, axis=-1)
    vals = jnp.take_along_axis(scaled, idx, axis=-1)
    rank = jnp.arange(vals.shape[-1])[None, :]
    vals = jnp.where((top_k[:, None] == 0) | (rank < top_k[:, None]), vals, -jnp.inf)
    probs = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    vals = jnp.where((before < top_p[:, None]) | (rank == 0), vals, -jnp.inf)
    choice = jax.vmap(lambda k, v: jax.random.categorical(k, v))(keys, vals)
    drawn = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(greedy, best, drawn)
