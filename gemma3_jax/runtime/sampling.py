"""On-device token sampling: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


# Below this a temperature is greedy: float32 logits divided by a smaller one overflow to inf and NaN.
MIN_TEMPERATURE = 1e-6
# Stop ids travel to the compiled decode as a fixed-size array (no recompile per stop set), so their number is bounded.
MAX_STOP_IDS = 8


def check_stop_ids(stop_ids, vocab_size: int) -> tuple[int, ...]:
    """Stop token ids as a tuple of ints in [0, vocab_size), at most ``MAX_STOP_IDS``; anything else is refused
    naming the argument (they go to the device as an int32 array, where a string or an id past int32 would fail
    inside an engine's loop)."""
    if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__iter__"):
        raise TypeError(f"stop_ids must be a sequence of token ids (ints), got {stop_ids!r}")
    ids = list(stop_ids)
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ids):
        raise TypeError(f"stop_ids must be a sequence of token ids (ints), got {ids!r}")
    ids = [int(t) for t in ids]
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(ids)}: {ids}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_ids must lie in [0, {vocab_size}) (the vocabulary), got {bad}")
    return tuple(ids)


def seed32(seed: int) -> int:
    """A request seed (0 <= seed < 2**63) as the 32 bits the engines' keys hold: itself below 2**32; above, all 64 bits
    mixed (splitmix64's finaliser), since jax.random.key keeps only the low 32 bits (2**32 sampled as 0 did)."""
    if 0 <= seed < 2**32:
        return seed
    x = seed & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return (x ^ (x >> 32)) & 0xFFFFFFFF


FLOAT32_MAX = 3.4028234663852886e38  # the compiled steps divide the logits by temperature in float32


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
        # any k past the vocabulary keeps every token, so a larger one means the same; the engines hold it in int32
        object.__setattr__(self, "top_k", min(int(self.top_k), 2**31 - 1))
        if not 0 <= self.temperature <= FLOAT32_MAX:  # inf (float32's too) would sample uniformly; NaN never compares
            raise ValueError(f"temperature must be finite (in float32) and >= 0, got {self.temperature}")
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
        vals, idx = top_k_by_blocks(logits, k)  # sorted, descending
    else:
        idx = jnp.argsort(-logits, axis=-1)
        vals = jnp.take_along_axis(logits, idx, axis=-1)
    if params.top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
        vals = jnp.where(before < params.top_p, vals, -jnp.inf)  # the first candidate always stays
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# Candidates a sampled row is drawn from without sorting the vocabulary: the first TOP_CAP of ``top_k_by_blocks``. A
# row whose top-k or nucleus fits in them (Gemma's default top_k 64 does) skips the full sort; plain temperature rows
# need none.
TOP_CAP = 128
# ``top_k_by_blocks`` looks for the k largest values only in the k blocks of this many with the largest maxima.
TOP_K_BLOCK = 64


def top_k_by_blocks(x: Float[Array, "B V"], k: int,
                    block: int | None = None) -> tuple[Float[Array, "B k"], Int[Array, "B k"]]:
    """``lax.top_k(x, k)`` (the k largest values per row, descending, ties by lower index first), equal to it value
    for value and index for index, but from the V / ``block`` blocks' maxima and k x ``block`` candidates instead of
    the whole row: on a GPU lax.top_k sorts the row once k is past its small-k kernel (docs/benchmarks.md).

    Exact: a value ranked r < k lies in a block that at most r blocks outrank (each block ranked above it holds its
    own value ranked above that one), so the k best blocks by (maximum, lower index) hold all k best values; taken
    in index order, their candidates keep lax.top_k's tie order. Every comparison is on integer keys in lax.top_k's
    total order of floats (-NaN < -inf < -0.0 < +0.0 < +inf < +NaN), where max and top_k cannot disagree."""
    b, v = x.shape
    block = TOP_K_BLOCK if block is None else block
    blocks = -(-v // block)
    if not 0 < k <= v:
        raise ValueError(f"k must be in 1..{v}, got {k}")
    if blocks <= 2 * k:  # a small row: lax.top_k's own sort is as cheap
        return jax.lax.top_k(x, k)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)  # exact for bf16 / f16 too
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: magnitude bits flipped, so int order = float order
    # pads rank last: the lowest key, and on ties the real entries' lower ids go first
    keys = jnp.pad(keys, ((0, 0), (0, blocks * block - v)), constant_values=jnp.iinfo(jnp.int32).min)
    tiles = keys.reshape(b, blocks, block)
    _, best = jax.lax.top_k(jnp.max(tiles, axis=-1), k)
    best = jnp.sort(best, axis=-1)  # index order, so candidate order is token order
    cand = jnp.take_along_axis(tiles, best[:, :, None], axis=1).reshape(b, k * block)
    ids = (best[:, :, None] * block + jnp.arange(block, dtype=best.dtype)).reshape(b, k * block)
    _, pos = jax.lax.top_k(cand, k)
    ids = jnp.take_along_axis(ids, pos, axis=-1)
    return jnp.take_along_axis(x, ids, axis=-1), ids


def sample_rows(logits: Float[Array, "B V"], keys: Array, temperature: Float[Array, "B"], top_k: Int[Array, "B"],
                top_p: Float[Array, "B"], greedy_only: bool = False) -> Int[Array, "B"]:
    """Next token per row with each row's own parameters as arrays (a batch of requests that each chose theirs),
    and each row's own key, so a row's draw does not depend on the others. ``greedy_only`` (static): every row is
    greedy, and no row pays for the sort.

    Gumbel-max draws: noise from the row's key over the vocabulary, by token id for plain temperature rows (no
    top-k, no top-p: no sort at all), by rank among the candidates sorted by logit otherwise. The rank order is
    ``top_k_by_blocks``'s first ``TOP_CAP`` candidates when the row's candidates fit in them, and a full sort only
    when some row's do not (a ``lax.cond``); either way a row's draw is the same whatever the other rows are."""
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        return best
    v = logits.shape[-1]
    greedy = temperature < MIN_TEMPERATURE
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)  # [B, V]
    plain = (top_k == 0) & (top_p >= 1.0)
    plain_draw = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)

    def ranked_draw(vals, idx, everything):
        """The draw among candidates ``vals`` sorted descending (token ids ``idx``), and each row's kept mass;
        ``everything``: the logsumexp over the vocabulary (a top_k == 0 row's probabilities are over it)."""
        rank = jnp.arange(vals.shape[-1])[None, :]
        vals = jnp.where((top_k[:, None] == 0) | (rank < top_k[:, None]), vals, -jnp.inf)
        z = jnp.where(top_k > 0, jax.nn.logsumexp(vals, axis=-1), everything)
        probs = jnp.exp(vals - z[:, None])
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each candidate
        vals = jnp.where((before < top_p[:, None]) | (rank == 0), vals, -jnp.inf)
        choice = jnp.argmax(vals + noise[:, : vals.shape[-1]], axis=-1)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32), probs.sum(-1)

    cap = min(TOP_CAP, v)

    def ranked():
        """Draws of the top-k / top-p rows: among the first ``cap`` candidates where they fit, else after a sort."""
        everything = jax.nn.logsumexp(scaled, axis=-1)
        vals, idx = top_k_by_blocks(scaled, cap)  # sorted descending; ties: the lower id first, as a stable sort
        capped_draw, mass = ranked_draw(vals, idx, everything)
        # the candidates fit: top-k within the cap, or (top_k 0) the cap's mass already reaches top_p
        fits = ((top_k > 0) & (top_k <= cap)) | ((top_k == 0) & (mass >= top_p))

        def full():
            order = jnp.argsort(-scaled, axis=-1)
            return ranked_draw(jnp.take_along_axis(scaled, order, axis=-1), order, everything)[0]

        full_draw = jax.lax.cond(jnp.any(~greedy & ~plain & ~fits), full, lambda: jnp.zeros_like(best))
        return jnp.where(fits, capped_draw, full_draw)

    # greedy and plain temperature rows alone need no candidates (a server's requests often are)
    ranked_draws = jax.lax.cond(jnp.any(~greedy & ~plain), ranked, lambda: jnp.zeros_like(best))
    return jnp.where(greedy, best, jnp.where(plain, plain_draw, ranked_draws))
