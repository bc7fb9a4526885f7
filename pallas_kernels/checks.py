"""Argument checks shared by the kernels' public entry points.

Everything here runs in Python before a kernel is traced: shapes, dtypes and static arguments are checked on
every call (they are known at trace time, so the checks cost nothing on the device). Values are checked only
when an argument is concrete (a call outside ``jax.jit``); under a trace they cannot be read, and the contract
stated in the docstrings holds. A wrong argument raises a ``TypeError`` (wrong kind or dtype) or a
``ValueError`` (wrong shape or value) whose message names the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import DTYPES


def is_concrete(x) -> bool:
    """Whether ``x``'s values can be read here (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def int_array(name: str, x, shape: tuple[int, ...] | None = None, what: str = ""):
    """``x`` as a jax array with an integer dtype (TypeError otherwise) and, if given, this shape (ValueError)."""
    if isinstance(x, (bool, float, complex, str, bytes)) or x is None:
        raise TypeError(f"{name} must be an integer array, got {type(x).__name__} {x!r}")
    if not isinstance(x, jax.Array):
        host = np.asarray(x)
        if np.issubdtype(host.dtype, np.integer) and host.size and (host.min() < -2**31 or host.max() >= 2**31):
            raise ValueError(f"{name} must fit in int32, got values up to {host.max()} (they would wrap)")
        x = jnp.asarray(host)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype} (shape {tuple(x.shape)})")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}{' ' + what if what else ''}: got "
                         f"{name}.shape={tuple(x.shape)}")
    return x


def static_int(name: str, value, *, minimum: int = 1, allow_none: bool = True, pow2: bool = False):
    """A static int argument (block size, window): None (if allowed) or a Python/numpy int >= ``minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__} "
                        f"{value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    if value >= 2**31:  # an int32 in the kernels: larger would overflow (a window beyond the keys is None)
        raise ValueError(f"{name} must be < 2^31, got {name}={value}")
    if pow2 and value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {name}={value}")
    return value


def lengths_in_range(name: str, lengths, upper: int) -> None:
    """Concrete lengths must lie in [0, upper] (``upper`` = the number of keys or cache slots)."""
    if lengths is None or not is_concrete(lengths):
        return
    vals = np.asarray(lengths)
    bad = (vals < 0) | (vals > upper)
    if bad.any():
        raise ValueError(f"{name} must lie in [0, {upper}] (the number of keys), got {vals.tolist()} "
                         f"(row {int(np.argmax(bad))})")


def segments_contiguous(segment_ids) -> None:
    """Concrete segment ids: each id >= 0 must name one contiguous run in its row (one image); ValueError naming
    the id and its first two runs otherwise. Under a trace this is the caller's contract."""
    if segment_ids is None or not is_concrete(segment_ids):
        return
    seg = np.asarray(segment_ids)
    for b, row in enumerate(seg):
        starts = np.flatnonzero((row >= 0) & np.r_[True, row[1:] != row[:-1]])
        ids = row[starts]
        if len(np.unique(ids)) == len(ids):
            continue
        ends = np.r_[starts[1:], len(row)]  # a run ends at the next start at the latest
        for i, sid in enumerate(ids):
            later = np.flatnonzero(ids[i + 1 :] == sid)
            if later.size:
                j = i + 1 + int(later[0])
                runs = [(int(starts[r]), int(starts[r] + np.argmax(np.r_[row[starts[r]:ends[r]] != sid, True])))
                        for r in (i, j)]
                raise ValueError(
                    f"segment_ids: id {int(sid)} in row {b} names two separate runs, positions "
                    f"[{runs[0][0]}, {runs[0][1]}) and [{runs[1][0]}, {runs[1][1]}); an id must name one contiguous "
                    "span (one image), as segment_ids_from_image_mask numbers them")


def segment_ids(segment_ids, b: int, sk: int):
    """Integer [B, Sk] segment ids, contiguous when concrete; None stays None."""
    if segment_ids is None:
        return None
    seg = int_array("segment_ids", segment_ids, (b, sk), "[B, Sk] (batch and key length of k)")
    segments_contiguous(seg)
    return seg


def positive_number(name: str, value, *, allow_none: bool = False):
    """A static float argument (scale, eps): a finite Python/numpy number > 0."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {name}={value}")
    return float(value)


def flag(name: str, value) -> bool:
    """A static bool argument (causal, ring, interpret)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def qkv_arrays(q, k, v, *, q_rank: int, names=("q", "k", "v")):
    """q, k, v are float arrays of one bf16/fp16/fp32 dtype; q of rank ``q_rank``, k and v of rank 4 and equal
    shape. Returns them as jax arrays."""
    arrays = []
    for name, x, rank in zip(names, (q, k, v), (q_rank, 4, 4)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.ndim != rank:
            raise ValueError(f"{name} must have rank {rank}: got {name}.shape={tuple(x.shape)}")
        if 0 in (x.shape if x.ndim == 3 else x.shape[:1] + x.shape[2:]):  # an empty sequence is checked later
            raise ValueError(f"{name} has an empty batch, head or head dim: {name}.shape={tuple(x.shape)}")
        arrays.append(x)
    q, k, v = arrays
    for name, x in zip(names, arrays):  # ValueError, as these checks always raised for q, k and v
        if jnp.dtype(x.dtype) not in DTYPES:
            raise ValueError(f"{name} must be bf16/fp16/fp32, got {name}.dtype={x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{', '.join(names)} dtypes must match: {q.dtype=} {k.dtype=} {v.dtype=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape=} {v.shape=}")
    return q, k, v
