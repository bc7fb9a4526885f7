"""Images as levels: the processor's resized uint8 pixels and its normalization as a table, applied on the device.

An 896x896 image is 2.4 MB as uint8 against 9.6 MB as float32, so a request's checks, its content hash and its copy
to the device read a quarter of the bytes, and a level needs no finiteness check. The table holds each channel's 256
levels exactly as the processor computes them (``float32(level * rescale_factor)``, then ``(x - mean) / std`` in
float32), so the vision tower sees the same values as from the processor's float32 pixel values.

    px = processor.preprocess_levels(images)[0]   # PixelLevels(levels uint8 [I, C, S, S], table float32 [C, 256])
    engine.submit(Request(ids, px))               # or any call taking pixel_values
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = 256  # values of a uint8 level


@dataclasses.dataclass(frozen=True)
class PixelLevels:
    """Images [I, C, S, S] as uint8 levels; ``table[c, v]`` is level v of channel c in the model's float range.
    A pytree (both arrays are leaves), so it passes through ``jax.jit`` and ``jax.device_put`` as it is."""

    levels: Any  # uint8 [I, C, S, S] (numpy, or a jax.Array once on the device)
    table: Any  # float32 [C, 256]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.levels.shape)

    @property
    def ndim(self) -> int:
        return len(self.levels.shape)

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    def to_float(self) -> np.ndarray:
        """The float32 pixel values [I, C, S, S] on the host (what the processor's ``preprocess`` returns)."""
        levels, table = np.asarray(self.levels), np.asarray(self.table, np.float32)
        offsets = (np.arange(table.shape[0]) * LEVELS)[:, None, None]
        return table.reshape(-1)[levels.astype(np.intp) + offsets]


jax.tree_util.register_dataclass(PixelLevels, data_fields=["levels", "table"], meta_fields=[])


def pixel_table(rescale_factor: float, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [C, 256]: each channel's levels in the processor's arithmetic (float64 product, float32 rounding,
    then the float32 normalization), so a lookup gives the processor's values bit for bit."""
    x = (np.arange(LEVELS, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean, std = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
    return np.ascontiguousarray((x[None] - mean) / std)


def checked_levels(px: PixelLevels, what: str = "pixel_values") -> PixelLevels:
    """``px`` with its levels a uint8 [I, C, S, S] array and its table a finite float32 [C, 256] one (numpy unless
    they are device arrays already); anything else is refused naming ``what``. The image size is the model's to
    judge."""
    if not isinstance(px, PixelLevels):
        raise TypeError(f"{what} must be a PixelLevels, got {type(px).__name__}")
    levels, table = px.levels, px.table
    if not isinstance(levels, jax.Array):
        try:
            levels = np.asarray(levels)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{what}.levels must be a uint8 array [num_images, C, H, W]: {e}") from None
    if levels.dtype != np.uint8 or levels.ndim != 4:
        raise ValueError(f"{what}.levels must be a uint8 array [num_images, C, H, W], got shape "
                         f"{tuple(levels.shape)} dtype {levels.dtype}")
    if not isinstance(table, jax.Array):
        try:
            table = np.asarray(table)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{what}.table must be a float array [C, {LEVELS}]: {e}") from None
        if table.dtype.kind not in "fiu":
            raise TypeError(f"{what}.table must be a float array [C, {LEVELS}], got dtype {table.dtype}")
        table = table.astype(np.float32)
        if not np.isfinite(table).all():
            raise ValueError(f"{what}.table holds NaN or infinite values")
    if tuple(table.shape) != (levels.shape[1], LEVELS):
        raise ValueError(f"{what}.table must be [C, {LEVELS}] = [{levels.shape[1]}, {LEVELS}] for levels of "
                         f"shape {tuple(levels.shape)}, got {tuple(table.shape)}")
    if table.dtype != np.float32:
        raise ValueError(f"{what}.table must be float32, got {table.dtype}")
    return PixelLevels(levels, table)


def as_pixels(px):
    """Inside a traced call: float pixel values from ``PixelLevels`` (one gather from the table), others as they
    are."""
    if not isinstance(px, PixelLevels):
        return px
    table = jnp.asarray(px.table, jnp.float32)
    offsets = (jnp.arange(table.shape[0], dtype=jnp.int32) * LEVELS)[:, None, None]
    return jnp.take(table.reshape(-1), px.levels.astype(jnp.int32) + offsets, mode="clip")

