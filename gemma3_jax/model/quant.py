"""Weight-only quantization of the text decoder's products: 8-bit weights with one float32 scale per output channel,
or 4-bit weights with one float32 scale per group of 32 inputs.

Decode reads every text weight once per step, so its speed is the weights' bytes over the memory bandwidth:
1-byte weights halve them. A quantized weight ``q`` (int8, or float8 e4m3) and its scale ``s`` (the output
channel's largest |w| over the format's largest value) stand for ``w ~= q * s``; products run on ``q`` converted
to the activation dtype (exact: every int8 and e4m3 value is a bfloat16) with float32 accumulation, and scale the
sum. Quantized: q|k|v, o, gate|up, down, and the tied embedding / lm_head (its rows are both the lookup's rows and
the lm_head's output channels, so one scale per row serves both). Norms and the vision tower keep the model dtype.

``int4`` (symmetric, levels -7..7) keeps one scale per ``GROUP`` consecutive weights along the last input axis, as
GGUF's Q4_0 does: a 4-bit grid per output channel would be too coarse. Its scales vary along the contraction, so its
products dequantize the weight (to the activation dtype) before the product instead of scaling the sum; at batch 1
decode reads the 4-bit words in its own Pallas kernels (``pallas_kernels.gemv_int4``), which scale each group's
sum. Under tensor parallelism a group never straddles two devices (``check_split``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

MODES = ("int8", "fp8", "int4")
STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "int4": jnp.int4}
LIMIT = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}  # the largest magnitude each format holds (e4m3fn: 448)
GROUP = {"int4": 32}  # modes with a scale per group of this many inputs (the others: per output channel)
BITS = {"int8": 8, "fp8": 8, "int4": 4}

# The quantized weights by their path's end: (their scale's path end, how many trailing axes the product
# contracts, i.e. the input axes; the rest are output channels, one scale each).
QUANTIZED = {
    "attn.qkv_proj": ("attn.qkv_scale", 1),  # [N + 2K, H, D]
    "attn.o_proj": ("attn.o_scale", 2),  # [D, N, H]
    "mlp.gate_up": ("mlp.gate_up_scale", 1),  # [2F, D]
    "mlp.down": ("mlp.down_scale", 1),  # [D, F]
    "text.embed": ("text.embed_scale", 1),  # [V, D]
}


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize must be None or one of {', '.join(MODES)}, got {mode!r}")
    return mode


def check_split(mode: str | None, split_inputs: dict[str, int], n: int) -> None:
    """Refuse a ``grouped`` mode whose groups would straddle devices: ``split_inputs`` names each product whose
    last input axis splits over the ``n`` devices (down's MLP width) with that axis' size."""
    if not grouped(mode):
        return
    for what, size in split_inputs.items():
        if size % (n * GROUP[mode]):
            raise ValueError(f"quantize={mode!r} keeps a scale per {GROUP[mode]} inputs: tensor_parallel={n} splits "
                             f"the {what} {size} into {size / n:g} per device, not a multiple of {GROUP[mode]}")


def grouped(mode: str | None) -> bool:
    """Whether ``mode`` keeps a scale per group of inputs (its scale has the weight's rank)."""
    return mode in GROUP


def bytes_per_weight(mode: str) -> float:
    """Storage of one quantized weight, its share of a group's float32 scale included (per-channel scales are
    not counted here)."""
    return BITS[mode] / 8 + (4 / GROUP[mode] if grouped(mode) else 0.0)


def scale_shape(shape: tuple[int, ...], mode: str, contract: int) -> tuple[int, ...]:
    """The scale's shape for a weight of ``shape`` whose last ``contract`` axes are the product's input."""
    if not grouped(mode):
        return tuple(shape[: len(shape) - contract])
    if shape[-1] % GROUP[mode]:
        raise ValueError(f"{mode} groups {GROUP[mode]} inputs: a weight of shape {shape} has {shape[-1]} on its last axis")
    return (*shape[:-1], shape[-1] // GROUP[mode])


def rule(name: str) -> tuple[str, int] | None:
    """(scale path, contracted axes) of a quantized text weight's path (e.g. 'text.layers.0.mlp.down'); None for
    any other parameter."""
    if not name.startswith("text."):
        return None
    for end, (scale_end, contract) in QUANTIZED.items():
        if name == end or name.endswith("." + end):
            return name[: len(name) - len(end)] + scale_end, contract
    return None


def _recip(mode: str) -> np.float32:
    # a product, not a division: XLA turns a division by a constant into this product, numpy does not, and the
    # host twin (quantize_host) must give the same scales bit for bit
    return np.float32(1.0 / LIMIT[mode])


def quantize(w: Array, mode: str, contract: int) -> tuple[Array, Float[Array, "..."]]:
    """(q, scale): ``w`` with its last ``contract`` axes the product's input, symmetric per output channel (per
    group of inputs for a ``grouped`` mode)."""
    wf = w.astype(jnp.float32)
    if grouped(mode):
        shape = scale_shape(w.shape, mode, contract)
        wf = wf.reshape(*shape, GROUP[mode])
        contract = 1
    amax = jnp.max(jnp.abs(wf), axis=tuple(range(wf.ndim - contract, wf.ndim)))
    scale = jnp.where(amax == 0, 1.0, amax * _recip(mode))  # a NaN or Inf weight gives a non-finite scale
    x = wf * (1.0 / scale).reshape(*scale.shape, *(1,) * contract)  # see quantize_host_with
    if mode != "fp8":
        x = jnp.round(x)
    return jnp.clip(x, -LIMIT[mode], LIMIT[mode]).astype(STORAGE[mode]).reshape(w.shape), scale


def quantize_host(w: np.ndarray, mode: str, contract: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize`` in numpy (the same arithmetic), for slices on their way from a file to one device."""
    scale = scales_host(w, mode, contract)
    return quantize_host_with(w, scale, mode, contract), scale


def _host_groups(w: np.ndarray, mode: str, contract: int) -> tuple[np.ndarray, int]:
    """(w as float32, its contracted axes) with a ``grouped`` mode's last axis cut into groups: [..., K / G, G]."""
    wf = np.asarray(w, np.float32)
    if grouped(mode):
        return wf.reshape(*scale_shape(w.shape, mode, contract), GROUP[mode]), 1
    return wf, contract


def scales_host(w: np.ndarray, mode: str, contract: int) -> np.ndarray:
    """``quantize_host``'s scales alone."""
    wf, contract = _host_groups(w, mode, contract)
    amax = np.max(np.abs(wf), axis=tuple(range(wf.ndim - contract, wf.ndim)))
    # a NaN or Inf weight gives a non-finite scale, which the loaders' checks refuse
    return np.where(amax == 0, np.float32(1.0), amax * _recip(mode)).astype(np.float32)


def quantize_host_with(w: np.ndarray, scale: np.ndarray, mode: str, contract: int) -> np.ndarray:
    """``w`` quantized with given scales (its output channels' or groups' scales, e.g. of a slice of a larger
    weight). A product with the reciprocal, not a division: XLA turns ``w / broadcast(scale)`` into that product,
    and quantizing on the host and on a device must round each value (ties at .5 are common) the same way."""
    wf, contract = _host_groups(w, mode, contract)
    x = wf * (np.float32(1.0) / scale).reshape(*scale.shape, *(1,) * contract)
    if mode != "fp8":
        x = np.round(x)
    return np.clip(x, -LIMIT[mode], LIMIT[mode]).astype(np.dtype(STORAGE[mode])).reshape(w.shape)


def dequantize(q: Array, scale: Array, contract: int, dtype=jnp.float32) -> Array:
    """The weight ``q`` and ``scale`` stand for (the reference the quantized paths are tested against); a scale of
    q's rank is per group along q's last axis."""
    if scale.ndim == q.ndim:
        groups = q.astype(jnp.float32).reshape(*scale.shape, q.shape[-1] // scale.shape[-1])
        return (groups * scale[..., None]).reshape(q.shape).astype(dtype)
    return (q.astype(jnp.float32) * scale.reshape(*scale.shape, *(1,) * contract)).astype(dtype)


def weight(shape: tuple[int, ...], dtype, mode: str | None, contract: int) -> tuple[nnx.Param, nnx.Param | None]:
    """A product's weight parameter and its scale (None unquantized), zero-filled like ``layers.param``."""
    if mode is None:
        return nnx.Param(jnp.zeros(shape, dtype)), None
    return nnx.Param(jnp.zeros(shape, STORAGE[mode])), nnx.Param(jnp.ones(scale_shape(shape, mode, contract),
                                                                          jnp.float32))


def einsum(eq: str, x: Array, w: Array, scale: Array | None) -> Array:
    """``jnp.einsum(eq, x, w)`` in x's dtype; with a scale, over the quantized ``w`` (its output channels must be
    the result's trailing axes) with float32 accumulation, scaled before the one rounding to x's dtype. A
    per-group scale (of w's rank) dequantizes ``w`` to x's dtype first."""
    if scale is None:
        return jnp.einsum(eq, x, w)
    if scale.ndim == w.ndim:
        w = dequantize(w, scale, 1, x.dtype)
        return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.einsum(eq, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


def take_rows(table: Array, scale: Array | None, ids: Array, dtype) -> Array:
    """Rows ``ids`` of an embedding table in ``dtype`` (dequantized with their scales)."""
    rows = jnp.take(table, ids, axis=0)
    if scale is None:
        return rows
    return dequantize(rows, jnp.take(scale, ids, axis=0), 1, dtype)


def quantize_model(model: nnx.Module, mode: str) -> nnx.Module:
    """A new model (a ``Gemma3``) with the text decoder's product weights quantized, each weight placed as the
    original's (e.g. a random-weight model for a benchmark); ``model`` is unchanged."""
    from gemma3_jax.model.layers import params_by_path  # layers builds on this module

    check_mode(mode)
    new = nnx.eval_shape(lambda: type(model)(model.cfg, model.dtype, model.kernels, mode))
    targets = params_by_path(new)
    for name, p in params_by_path(model).items():
        r = rule(name)
        if r is None:
            targets[name].set_value(p[...])
        else:
            q, scale = quantize(p[...], mode, r[1])
            targets[name].set_value(q)
            targets[r[0]].set_value(scale)
    return new


def bytes_per_weight(mode: str) -> float:
    """Bytes a product weight takes in ``mode`` with its scales where they come per group (int4: 0.5 + 4 / 32);
    per-channel scales are left out, a row's scale being negligible beside its thousands of weights."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}: {mode!r}")
    return BITS[mode] / 8 + (4 / GROUP[mode] if mode in GROUP else 0)


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every parameter as held (quantized weights at one byte or half of one, their scales included)."""
    bits = lambda dt: 4 if dt == jnp.int4 else 8 * dt.itemsize
    return sum(x.size * bits(x.dtype) // 8 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
