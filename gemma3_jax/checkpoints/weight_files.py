"""The safetensors files of a checkpoint directory, checked before any weight is read.

Every header is parsed and validated here rather than by the safetensors package, so that a damaged or lying
file ends in one ``CheckpointError`` naming the file and the tensor: the header length, the JSON, each entry's
dtype, shape and data_offsets (byte count = shape x dtype size, offsets inside the file, no overlap or gap, as
the safetensors format requires), the shard index's weight map against the shards' own tensors, and shard names
that would lead outside the checkpoint directory. Only float tensors (F32, BF16, F16, F64) are accepted, plus the
I8, U8 and F8_E4M3 values of a checkpoint whose config.json marks it as this project's quantized format
(``checkpoints.quantized``); any other integer, boolean or fp8 tensor is refused by name. Tensors are then
read one at a time from a read-only memory map and checked for NaN and Inf on the host before they go anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from gemma3_jax.model.config import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2"),
                "F64": np.dtype("<f8")}
# The stored values of a quantized checkpoint (``checkpoints.quantized``), read only when its config marks it.
QUANTIZED_DTYPES = {"I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
# Byte sizes of the other dtypes of the format: needed to check their entries, which are then refused by name.
_OTHER_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "I32": 4, "U32": 4, "I64": 8, "U64": 8, "C64": 8}
_MAX_HEADER = 100_000_000  # the safetensors package's own limit on the JSON header
_CHUNK = 1 << 22  # elements per NaN/Inf check: bounds the temporary boolean array
_MAX_INDEX = 64 << 20  # a real index (27B) is ~100 KB: a larger one is not read into memory


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclasses.dataclass
class WeightFile:
    """One safetensors file: its validated header; ``read`` maps the file on first use."""

    path: Path
    name: str  # as the shard index names it
    entries: dict[str, Entry]
    _map: mmap.mmap | None = None

    def read(self, key: str, check_finite: bool = True) -> np.ndarray:
        """The tensor as a host array over the map (float32 for an F64 tensor), refused if it holds NaN or Inf
        (``check_finite=False``: the caller checks, e.g. on the device where it is faster)."""
        e = self.entries[key]
        try:
            if self._map is None:
                with open(self.path, "rb") as f:
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            dt = FLOAT_DTYPES.get(e.dtype) or QUANTIZED_DTYPES[e.dtype]
            x = np.frombuffer(self._map, dt, math.prod(e.shape), e.start).reshape(e.shape)
        except (OSError, ValueError) as err:  # the file cannot be mapped (a file that shrinks after it is mapped
            raise CheckpointError(f"{self.path}: tensor {key!r} cannot be read ({err})") from None  # is SIGBUS)
        if check_finite and e.dtype not in ("I8", "U8") and not all_finite(x):
            raise CheckpointError(f"{self.path}: tensor {key!r} holds NaN or Inf values; refusing a damaged weight")
        return x.astype(np.float32) if e.dtype == "F64" else x


def all_finite(x: np.ndarray) -> bool:
    """No NaN or Inf in x, in chunks (bfloat16 by its exponent bits: numpy has no native loop for it)."""
    flat = x.reshape(-1)
    if flat.dtype == ml_dtypes.bfloat16:
        bits = flat.view(np.uint16)
        return all(((bits[i:i + _CHUNK] & 0x7F80) != 0x7F80).all() for i in range(0, bits.size, _CHUNK))
    return all(np.isfinite(flat[i:i + _CHUNK]).all() for i in range(0, flat.size, _CHUNK))


def read_header(file: Path, name: str | None = None, quantized: bool = False) -> WeightFile:
    """Parse and check a safetensors file's header (no tensor data is read); ``quantized``: the checkpoint's config
    marks it as quantized, so QUANTIZED_DTYPES are accepted too."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{file}: {msg}")

    if not file.is_file():
        raise bad("is not a file" if file.exists() else "does not exist")
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            raw = f.read(n) if n is not None and 8 + n <= size and n <= _MAX_HEADER else b""
    except OSError as e:
        raise bad(f"cannot be read ({e.strerror or e})") from None
    if size < 8:
        raise bad(f"is {size} bytes long, too short for a safetensors file (empty or truncated)")
    if n > _MAX_HEADER or 8 + n > size:
        raise bad(f"its header length field says {n} bytes but the file has {size - 8} after it "
                  "(truncated, or not a safetensors file)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"its header is not valid JSON ({e}): not a safetensors file, or a damaged one") from None
    except _Duplicate as e:
        raise bad(f"its header has the key {e.args[0]!r} twice") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object: not a safetensors file")
    data_start, data_len = 8 + n, size - 8 - n
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        entries[key] = _entry(bad, key, info, data_start)
    spans = sorted(entries.values(), key=lambda e: (e.start, e.end))
    pos, prev = data_start, None
    for e in spans:
        if e.end > size:
            raise bad(f"tensor {e.key!r}'s data_offsets end {e.end - data_start - data_len} bytes past the end of "
                      f"the file ({data_len} bytes of data): the file is truncated or its header lies")
        if e.start < pos:
            raise bad(f"tensors {prev!r} and {e.key!r} overlap (data_offsets)")
        if e.start > pos:
            raise bad(f"{e.start - pos} bytes before tensor {e.key!r} belong to no tensor (data_offsets have a gap)")
        pos, prev = e.end, e.key
    if pos != size:
        raise bad(f"{size - pos} bytes after the last tensor belong to no tensor (a damaged file)")
    for e in entries.values():  # after the layout checks: a truncated int8 file is reported as truncated
        if e.dtype not in FLOAT_DTYPES and not (quantized and e.dtype in QUANTIZED_DTYPES):
            raise bad(f"tensor {e.key!r} has dtype {e.dtype}: only float weights (F32, BF16, F16) are supported "
                      "(integer, boolean and fp8 tensors belong to quantized formats; gemma3-jax loads only its own, "
                      "marked by \"quantization_config\" in config.json)")
    return WeightFile(file, name or file.name, entries)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):  # json.loads would keep the last silently
        seen = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def _entry(bad, key: str, info, data_start: int) -> Entry:
    if not isinstance(info, dict):
        raise bad(f"tensor {key!r}: its header entry is not a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    size = FLOAT_DTYPES[dtype].itemsize if dtype in FLOAT_DTYPES else _OTHER_SIZES.get(dtype)
    if size is None:
        raise bad(f"tensor {key!r} has the unknown or unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise bad(f"tensor {key!r} has the shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * size
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"tensor {key!r} of dtype {dtype} and shape {shape} is {nbytes} bytes but its data_offsets "
                  f"{offsets} span {offsets[1] - offsets[0]}")
    return Entry(key, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_index(index: Path) -> dict[str, str]:
    """The weight map (tensor -> shard file name) of a model.safetensors.index.json."""
    try:
        if index.stat().st_size > _MAX_INDEX:
            raise CheckpointError(f"{index}: {index.stat().st_size} bytes, too large for a shard index")
        d = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{index}: cannot be read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{index}: must hold a JSON object with a \"weight_map\"")
    wm = d.get("weight_map")
    if wm is None:
        raise CheckpointError(f"{index}: has no \"weight_map\" (tensor name -> shard file)")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in wm.items()):
        raise CheckpointError(f"{index}: \"weight_map\" must be an object of tensor name -> shard file name strings")
    if not wm:
        raise CheckpointError(f"{index}: \"weight_map\" lists no tensors")
    return wm


def inside(root: Path, name: str, named_by: Path) -> Path:
    """``root / name``, refused if the name or a symlink leads outside the checkpoint directory (except into a
    Hugging Face hub cache's blobs, where downloaded files are symlinks)."""
    rel = Path(name)
    refuse = f"{named_by}: shard file {name!r} is outside the checkpoint directory {root}; refusing to read it"
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(refuse)
    file = root / rel
    real, base = file.resolve(), root.resolve()
    hub_blobs = base.parent.parent / "blobs" if base.parent.name == "snapshots" else None
    # huggingface_hub's --local-dir (before 0.23) symlinks into its cache: <cache>/models--<org>--<name>/blobs/<hash>
    in_hub_cache = real.parent.name == "blobs" and real.parent.parent.name.startswith("models--")
    if not (real.is_relative_to(base) or in_hub_cache or (hub_blobs is not None and real.is_relative_to(hub_blobs))):
        raise CheckpointError(f"{refuse} (it resolves to {real})")
    return file


def shard_names(path: Path) -> tuple[list[str], dict[str, str] | None, Path]:
    """(file names, weight map or None, the file naming them) of a checkpoint directory, names checked."""
    index = path / INDEX
    if index.exists():
        wm = read_index(index)
        names = sorted(set(wm.values()))
        for n in names:
            inside(path, n, index)
        return names, wm, index
    if (path / SINGLE).exists() or (path / SINGLE).is_symlink():
        inside(path, SINGLE, path / SINGLE)
        return [SINGLE], None, path / SINGLE
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path}")


def open_weight_files(path: Path, quantized: bool = False) -> list[WeightFile]:
    """Every weight file of a checkpoint directory with its header checked (``quantized``: as ``read_header``),
    and the shard index (if any) checked against the shards' own tensors. Reads headers only."""
    names, wm, named_by = shard_names(path)
    missing = [str(path / n) for n in names if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(f"checkpoint shard(s) missing: {', '.join(missing)}")
    files = [read_header(path / n, n, quantized) for n in names]
    if wm is not None:
        for f in files:
            for key in f.entries:
                if wm.get(key) != f.name:
                    where = f"maps it to {wm[key]!r}" if key in wm else "does not list it"
                    raise CheckpointError(f"tensor {key!r} is in shard {f.path} but {named_by} {where}")
        by_name = {f.name: f for f in files}
        for key, n in wm.items():
            if key not in by_name[n].entries:
                raise CheckpointError(f"{named_by} lists tensor {key!r} in {by_name[n].path}, which does not hold it")
    return files


def iter_tensors(files: list[WeightFile]) -> Iterator[tuple[str, tuple[int, ...], WeightFile]]:
    """(key, shape, file) of every tensor, file by file in header order; ``file.read(key)`` reads it."""
    for f in files:
        for key, e in f.entries.items():
            yield key, e.shape, f
