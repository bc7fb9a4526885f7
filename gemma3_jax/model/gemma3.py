"""The Gemma-3 model: vision tower + projector + text decoder, and its forward API.

``model(input_ids, pixel_values=None, attention_mask=None) -> logits [B, L, V]`` checks its inputs on the
host (one clear ValueError naming the value), then runs one jit-compiled function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from gemma3_jax.model.config import Gemma3Config
from gemma3_jax.model.kernels import AttentionBatch, Kernels
from gemma3_jax.model.pixels import PixelLevels, checked_levels
from gemma3_jax.model.text import Embedding, TextModel, embed_lookup
from gemma3_jax.model.vision import Projector, VisionTower


class Gemma3(nnx.Module):
    """``attention``: which kernels run each op, one of ``kernels.CHOICES`` ("auto", "pallas", "reference") or a
    ``Kernels``; resolved once, here (``self.kernels``). ``quantize``: the text decoder's product weights in 8 bits
    (``quant.MODES``: "int8", "fp8"), or None."""

    def __init__(self, cfg: Gemma3Config, dtype=jnp.bfloat16, attention: str | Kernels = "auto",
                 quantize: str | None = None):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.kernels = Kernels.resolve(attention)
        self.quantize = quantize
        self.text = TextModel(cfg.text, self.dtype, self.kernels, quantize)
        if cfg.is_multimodal:
            self.vision = VisionTower(cfg.vision, self.dtype, self.kernels)
            self.projector = Projector(cfg, self.dtype)

    # ---- pure pieces (traceable) -------------------------------------------------------------
    def image_features(self, pixel_values: Float[Array, "I C S S"]) -> Float[Array, "I T D"]:
        """Soft tokens of each image, in the text embedding space."""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: Int[Array, "B L"], pixel_values=None) -> Float[Array, "B L D"]:
        """Token embeddings with image features scattered, in order, into the image-token positions."""
        feats = None if pixel_values is None else self.image_features(pixel_values)
        return embed_with_features(self.cfg, self.text.embedding(), input_ids, feats)

    def forward(
        self,
        input_ids: Int[Array, "B L"],
        pixel_values: Float[Array, "I C S S"] | None = None,
        kv_lengths: Int[Array, "B"] | None = None,
    ) -> tuple[Float[Array, "B L D"], list]:
        """Final hidden states (after the last norm) and each layer's (keys, values)."""
        feats = None if pixel_values is None else self.image_features(pixel_values)
        return decoder_forward(self.cfg, self.text, input_ids, feats, kv_lengths)

    # ---- the user-facing call ------------------------------------------------------------------
    def __call__(self, input_ids, pixel_values=None, attention_mask=None) -> Float[Array, "B L V"]:
        input_ids, pixel_values, kv_lengths = self.check_inputs(input_ids, pixel_values, attention_mask)
        graphdef, state = nnx.split(self)
        return _logits(graphdef, state, input_ids, pixel_values, kv_lengths)

    def check_inputs(self, input_ids, pixel_values=None, attention_mask=None):
        """Validate on the host; returns (input_ids, pixel_values, kv_lengths) as device arrays (pixel values in
        the float dtype they came in: the vision tower casts them)."""
        return check_inputs(self.cfg, input_ids, pixel_values, attention_mask)


def token_id_row(value, what: str) -> np.ndarray:
    """One prompt's token ids (a list, tuple or array) as a 1-D integer numpy array. A float (3.7 would be
    truncated to 3 later), a bool, a string, a nested or ragged list is refused naming ``what``; emptiness and the
    ids' range are the caller's and check_inputs' to judge."""
    arr = None
    if not isinstance(value, (str, bytes, dict, set)):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError, OverflowError):  # ragged rows, say
            arr = None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        shown = f"shape {arr.shape} dtype {arr.dtype}" if arr is not None else type(value).__name__
        raise TypeError(f"{what} must be a list of int token ids, got {shown}: {str(value)[:60]}")
    return arr


def check_inputs(cfg: Gemma3Config, input_ids, pixel_values=None, attention_mask=None, *, to_device: bool = True):
    """Gemma3.check_inputs without a model instance (the Engine holds only its config and state); with
    ``to_device=False`` the checked inputs stay host (numpy) arrays."""
    try:
        ids = np.asarray(input_ids)
    except (ValueError, TypeError) as e:  # ragged rows, say: name the argument
        raise ValueError(f"input_ids must be a [B, L] integer array: {e}") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a [B, L] integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {ids.shape}")
    is_image = ids == cfg.image_token_id
    bad = (ids < 0) | ((ids >= cfg.text.vocab_size) & ~is_image)
    if bad.any():
        raise ValueError(f"token id {int(ids[bad][0])} out of range for vocab_size={cfg.text.vocab_size}")
    n_image_tokens = int(is_image.sum())
    if pixel_values is not None:
        if not cfg.is_multimodal:
            raise ValueError("pixel_values given to a text-only model (its config has no vision_config)")
        if isinstance(pixel_values, PixelLevels):  # uint8 levels and a finite table: no scan of the image needed
            pixel_values = checked_levels(pixel_values)
        elif not isinstance(pixel_values, jax.Array):
            try:
                pixel_values = np.asarray(pixel_values)
            except (ValueError, TypeError) as e:
                raise ValueError(f"pixel_values must be a float array [num_images, C, H, W]: {e}") from None
            if not np.issubdtype(pixel_values.dtype, np.floating) and pixel_values.dtype != jnp.bfloat16:
                if pixel_values.dtype.kind not in "biu":  # strings and objects do not convert
                    raise TypeError(f"pixel_values must be a float array, got dtype {pixel_values.dtype}")
                pixel_values = pixel_values.astype(np.float32)
            elif not np.isfinite(pixel_values).all():  # the vision tower would turn them into NaN features, silently
                raise ValueError("pixel_values hold NaN or infinite values")
        v = cfg.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != want:
            raise ValueError(f"pixel_values must be [num_images, {', '.join(map(str, want))}], got {pixel_values.shape}")
        expected = pixel_values.shape[0] * cfg.mm_tokens_per_image
        if n_image_tokens != expected:
            raise ValueError(
                f"{pixel_values.shape[0]} images need {expected} image tokens "
                f"(id {cfg.image_token_id}) in input_ids, found {n_image_tokens}"
            )
        # Sent in their own float dtype; the vision tower casts them to the model's dtype on the device, because a
        # host (numpy) cast costs more than the transfer itself. device_put returns while the copy runs (jnp.asarray
        # held the caller until it was done: docs/benchmarks.md), so the caller's array must stay unchanged until the
        # call that uses it has finished.
        if to_device:
            pixel_values = jax.device_put(pixel_values)
    elif n_image_tokens:
        raise ValueError(f"input_ids hold {n_image_tokens} image tokens (id {cfg.image_token_id}) but no pixel_values")
    kv_lengths = None
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        lengths = mask.sum(axis=1).astype(np.int32)
        prefix = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        if (prefix != mask.astype(bool)).any():
            row = int(np.nonzero((prefix != mask.astype(bool)).any(axis=1))[0][0])
            raise ValueError(f"attention_mask row {row} is not right-padded (ones, then zeros)")
        if not (lengths == ids.shape[1]).all():
            kv_lengths = jnp.asarray(lengths) if to_device else lengths
    if not to_device:
        return ids.astype(np.int32), pixel_values, kv_lengths
    return jnp.asarray(ids, jnp.int32), pixel_values, kv_lengths


# XLA may keep bf16 intermediates of a fusion in float32 ("excess precision"); transformers' eager bf16 code
# rounds after every op, so turning it off makes our bf16 outputs agree with transformers' more often.
NUMERICS_OPTIONS = {"xla_allow_excess_precision": False}


def embed_with_features(
    cfg: Gemma3Config, embedding: Embedding, input_ids: Int[Array, "B L"], feats: Float[Array, "I T D"] | None
) -> Float[Array, "B L D"]:
    """Token embeddings (``embedding``: the text model's table, ``TextModel.embedding``) with ``feats``
    (image_features, or None) scattered, in order, into the image tokens."""
    is_image = input_ids == cfg.image_token_id
    ids = input_ids
    if cfg.image_token_id >= cfg.text.vocab_size:  # out-of-vocabulary placeholder, as HF
        ids = jnp.where(is_image, 0, input_ids)
    x = embed_lookup(embedding, ids)
    if feats is None:
        return x
    feats = feats.reshape(-1, feats.shape[-1]).astype(x.dtype)  # [I*T, D] in prompt order
    slot = jnp.cumsum(is_image.reshape(-1)) - 1  # row-major rank of each image token
    gathered = jnp.take(feats, jnp.clip(slot, 0, feats.shape[0] - 1), axis=0).reshape(x.shape)
    return jnp.where(is_image[..., None], gathered, x)


def decoder_forward(
    cfg: Gemma3Config, text: TextModel, input_ids: Int[Array, "B L"], feats: Float[Array, "I T D"] | None,
    kv_lengths: Int[Array, "B"] | None,
) -> tuple[Float[Array, "B L D"], list]:
    """The text decoder over the prompt with the images' features already computed: final hidden states and each
    layer's (keys, values). Needs only the text weights (the Engine runs the vision tower as a call of its own)."""
    x = embed_with_features(cfg, text.embedding(), input_ids, feats)
    return text(x, AttentionBatch.for_prompt(input_ids == cfg.image_token_id, kv_lengths))


@functools.partial(jax.jit, static_argnums=0, compiler_options=NUMERICS_OPTIONS)
def _logits(graphdef, state, input_ids, pixel_values, kv_lengths):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.forward(input_ids, pixel_values, kv_lengths)
    return model.text.logits(hidden)
