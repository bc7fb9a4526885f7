"""Quantized checkpoints: a Hugging Face checkpoint directory whose text product weights are stored quantized.

``quantize_checkpoint(src, out, "int8")`` writes, tensor by tensor, a copy of ``src`` in which every weight that
``quantize="int8"`` would quantize on load (q|k|v, o, gate|up, down and the tied embedding, ``model.quant``) is
stored as its quantized values plus a float32 ``<key>_scale`` tensor, exactly as ``load_pretrained(src,
quantize=...)`` would have made them from the weights rounded to ``dtype``; every other tensor and file is copied.
Loading it with the same ``dtype`` gives the same model bit for bit (another dtype changes the float tensors only),
from half the bytes (under a third for int4) and without quantizing.

The layout, in Hugging Face's own tensor shapes ([out, in]): int8 as ``I8``, fp8 as ``F8_E4M3`` with one scale per
output row; int4 as ``U8`` [out, in / 2], two values a byte (the even input in the low four bits, each a two's
complement nibble), with one scale per 32 inputs [out, in / 32]. config.json says so, and nothing else is read
as quantized::

    "quantization_config": {"quant_method": "gemma3_jax", "mode": "int8", "dtype": "bfloat16"}

A checkpoint with integer or fp8 tensors and without this marking is refused (``weight_files``).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from gemma3_jax.checkpoints import store
from gemma3_jax.checkpoints import weight_files as wf
from gemma3_jax.model import quant
from gemma3_jax.model.config import OWN_QUANT_METHOD, CheckpointError, load_config

KEY = "quantization_config"
METHOD = OWN_QUANT_METHOD
SCALE = "_scale"  # suffix of a quantized weight's scale tensor
STORED = {"int8": "I8", "fp8": "F8_E4M3", "int4": "U8"}  # safetensors dtype of each mode's values
DTYPES = ("bfloat16", "float32")


def mode_of(raw: dict[str, Any], config_file: Path) -> str | None:
    """The quantization a checkpoint's config.json declares (None: a float checkpoint); a marking this project did
    not write, or a damaged one, is refused naming the file."""
    q = raw.get(KEY)
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != METHOD:
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(f"{config_file}: {KEY} with quant_method {method!r}: gemma3-jax reads only its own "
                              f"({METHOD!r}, written by scripts/quantize.py); load the float checkpoint instead")
    mode = q.get("mode")
    if mode not in quant.MODES:
        raise CheckpointError(f"{config_file}: {KEY}.mode must be one of {', '.join(quant.MODES)}, got {mode!r}")
    if q.get("dtype") not in DTYPES:
        raise CheckpointError(f"{config_file}: {KEY}.dtype must be one of {', '.join(DTYPES)}, got {q.get('dtype')!r}")
    return mode


def effective_mode(path: Path, stored: str | None, quantize: str | None) -> str | None:
    """The mode the weights load in: a quantized checkpoint's own (``quantize`` None or the same), else
    ``quantize``; anything else is refused (other values cannot be made from stored quantized ones)."""
    if stored is None or quantize in (None, stored):
        return stored or quantize
    raise ValueError(f"{path} holds {stored} weights (its config.json's {KEY}); quantize={quantize!r} cannot be made "
                     f"from them: pass no quantize (or {stored!r}), or load the float checkpoint")


def stored_mode(path: Path) -> str | None:
    """The quantization a checkpoint directory's config.json declares (None: float weights)."""
    return mode_of(load_config(path)[0], Path(path) / "config.json")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values [..., K] (even K) -> uint8 [..., K / 2], the even input in the low nibble."""
    v = np.asarray(q).astype(np.int8).view(np.uint8) & 0xF
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(b: np.ndarray) -> np.ndarray:
    """``pack_int4``'s inverse: uint8 [..., K / 2] -> int4 values [..., K]."""
    b = np.asarray(b, np.uint8)
    out = np.empty((*b.shape[:-1], 2 * b.shape[-1]), np.int8)
    out[..., 0::2] = (b << 4).view(np.int8) >> 4  # arithmetic shifts sign-extend each nibble
    out[..., 1::2] = b.view(np.int8) >> 4
    return out.astype(ml_dtypes.int4)


def stored_shape(shape: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """The shape a weight of HF shape ``shape`` is stored in."""
    return (*shape[:-1], shape[-1] // 2) if mode == "int4" else tuple(shape)


def scale_shape(shape: tuple[int, ...], mode: str) -> tuple[int, ...]:
    """The scale of a weight of HF shape [out..., in]: one per output row, or per group of the last axis' inputs."""
    return quant.scale_shape(tuple(shape), mode, 1)


def read_quantized(file: wf.WeightFile, key: str, mode: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    """A stored quantized weight as its values in the model's storage dtype (int4 unpacked), HF shape."""
    e = file.entries[key]
    want, dtype = stored_shape(hf_shape, mode), STORED[mode]
    if e.dtype != dtype or e.shape != want:
        raise CheckpointError(f"{file.path}: tensor {key!r} is {e.dtype} {list(e.shape)}, but a {mode} checkpoint "
                              f"stores it as {dtype} {list(want)}")
    x = file.read(key, check_finite=mode == "fp8")
    return unpack_int4(x) if mode == "int4" else x


def read_scale(files: dict[str, wf.WeightFile], key: str, mode: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    """The float32 scale tensor of quantized weight ``key``, checked: present, shaped for the weight, finite."""
    name = key + SCALE
    file = files.get(name)
    if file is None:
        raise CheckpointError(f"quantized tensor {key!r} has no {name!r} in the checkpoint")
    e, want = file.entries[name], scale_shape(hf_shape, mode)
    if e.dtype != "F32" or e.shape != want:
        raise CheckpointError(f"{file.path}: tensor {name!r} is {e.dtype} {list(e.shape)}, expected F32 {list(want)}")
    return file.read(name)


def _check(mode: str, dtype) -> np.dtype:
    """The float dtype the weights are rounded to before quantizing; refuses an unknown mode or dtype."""
    quant.check_mode(mode)
    dt = jnp.dtype(dtype)
    if dt.name not in DTYPES:
        raise ValueError(f"dtype must be bfloat16 or float32, got {dt}")
    return dt


def quantize_checkpoint(src: str | Path, out: str | Path, mode: str, dtype=jnp.bfloat16, progress: bool = True) -> Path:
    """Write ``src`` with its text product weights quantized (``mode``), each from the weight rounded to ``dtype``
    as ``load_pretrained(src, dtype, quantize=mode)`` quantizes it; returns ``out``, which must not exist."""
    from gemma3_jax.checkpoints.loading import _LM_HEAD, _is_tied, quantized_weight, target_of

    dt = _check(mode, dtype)
    src, out = Path(src), Path(out)
    raw, cfg = load_config(src)
    if mode_of(raw, src / "config.json"):
        raise ValueError(f"{src} is already quantized ({raw[KEY]['mode']})")
    if out.exists():
        raise FileExistsError(f"{out} exists; quantize_checkpoint writes a new directory")
    files = wf.open_weight_files(src)
    if quant.grouped(mode) and cfg.text.head_dim % quant.GROUP[mode]:
        raise ValueError(f"{mode} groups {quant.GROUP[mode]} inputs within a head: head_dim {cfg.text.head_dim}")
    plans, weight_map = [], {}
    for f in files:
        entries = []
        for key, e in f.entries.items():
            if key in _LM_HEAD:  # tied to the embedding, never read: not copied
                if not _is_tied(raw):
                    raise CheckpointError(f"{key!r}: untied lm_head is not supported (Gemma-3 ties it to the embedding)")
                continue
            target_of(key)  # an unknown tensor is refused here, before anything is written
            quantized = quantized_weight(key)
            entries.append((key, e, quantized))
            weight_map[key] = f.name
            if quantized:
                weight_map[key + SCALE] = f.name
        plans.append((f, entries))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.temp_dir_for(out)  # renamed to ``out`` when complete
    try:
        for item in src.iterdir():  # tokenizer, processor, chat template, generation config ...
            if item.name not in {f.name for f in files} | {wf.INDEX, "config.json"} and item.is_file():
                shutil.copy2(item, tmp / item.name)
        total = sum(len(entries) for _, entries in plans)
        with tqdm(total=total, desc=f"quantizing to {mode}", disable=not progress) as bar:
            for f, entries in plans:
                _write_file(tmp / f.name, f, entries, mode, dt, bar)
        if len(files) > 1 or (src / wf.INDEX).exists():
            (tmp / wf.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                                   indent=2))
        raw = dict(raw, **{KEY: {"quant_method": METHOD, "mode": mode, "dtype": dt.name}})
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_file(path: Path, f: wf.WeightFile, entries, mode: str, dt, bar) -> None:
    """One safetensors file of ``quantize_checkpoint``: the source file's tensors in its order, quantized ones with
    their scales after them, the others' bytes as they are."""
    def quantized(key):
        return lambda: _quantized_bytes(*quant.quantize_host(np.asarray(f.read(key)).astype(dt), mode, 1), mode)

    def copied(e):
        def data():  # in pieces of 64 MiB
            with open(f.path, "rb") as source:
                source.seek(e.start)
                for at in range(e.start, e.end, 1 << 26):
                    yield source.read(min(1 << 26, e.end - at))
        return data

    items = []
    for key, e, is_quantized in entries:
        if is_quantized:
            items.append((_quantized_entries(key, e.shape, mode, f.path), quantized(key)))
        else:
            items.append(([(key, e.dtype, e.shape)], copied(e)))
    _write(path, items, bar)


def _finite(file, t, w: np.ndarray) -> np.ndarray:
    if not wf.all_finite(w):
        raise CheckpointError(f"{file.path}: tensor {t.name!r} holds NaN or Inf values; refusing a damaged weight")
    return w


def _quantized_entries(key: str, shape: tuple[int, ...], mode: str, where) -> list[tuple[str, str, tuple[int, ...]]]:
    try:
        scale = scale_shape(shape, mode)
    except ValueError as e:  # int4: an input width that is not a multiple of its group
        raise ValueError(f"{where}: tensor {key!r}: {e}") from None
    return [(key, STORED[mode], stored_shape(shape, mode)), (key + SCALE, "F32", scale)]


def _quantized_bytes(q: np.ndarray, scale: np.ndarray, mode: str) -> list[bytes]:
    values = pack_int4(q) if mode == "int4" else q
    return [np.ascontiguousarray(values).tobytes(), np.ascontiguousarray(scale, "<f4").tobytes()]


def _write(path: Path, items, bar) -> None:
    """A safetensors file from (header entries [(name, dtype, shape)], a function giving their bytes in order)
    pairs: the header first (every shape is known), then each item's bytes, one item in memory at a time."""
    header, offset = {}, 0
    for entries, _ in items:
        for name, dtype, shape in entries:
            n = math.prod(shape) * (wf.QUANTIZED_DTYPES.get(dtype) or wf.FLOAT_DTYPES[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for entries, data in items:
            written = 0
            for part in data():
                out.write(part)
                written += len(part)
            if written != sum(header[name]["data_offsets"][1] - header[name]["data_offsets"][0] for name, _, _ in entries):
                raise ValueError(f"{path}: the bytes of {entries[0][0]!r} do not match its header entry")
            bar.update()


def quantize_gguf(gguf_path: str | Path, out: str | Path, mode: str, dtype=jnp.bfloat16, progress: bool = True) -> Path:
    """A Gemma-3 GGUF written as a quantized checkpoint (``out`` must not exist). With ``mode="int4"`` every Q4_0
    tensor keeps its stored values and scales exactly (no dequantizing: int4 with a scale per 32 inputs is the same
    format); every other tensor is dequantized, rounded to ``dtype`` and quantized as ``quantize_checkpoint`` does."""
    from gemma3_jax.checkpoints import gguf
    from gemma3_jax.checkpoints.loading import quantized_weight

    dt = _check(mode, dtype)

    def weights(file, path: Path, show: bool) -> dict:
        items = []
        for t in sorted(file.tensors, key=lambda t: gguf.hf_name(t.name)):
            key = gguf.hf_name(t.name)
            if not quantized_weight(key):
                items.append(([(key, "F32", t.shape)],
                              lambda t=t: [np.ascontiguousarray(gguf.hf_tensor(file, t), "<f4").tobytes()]))
            elif mode == "int4" and t.qtype == gguf.GGMLQuantizationType.Q4_0:
                items.append((_quantized_entries(key, t.shape, mode, file.path),
                              lambda t=t: _quantized_bytes(*gguf.q4_0_values(file, t), mode)))
            else:
                items.append((_quantized_entries(key, t.shape, mode, file.path), lambda t=t: _quantized_bytes(
                    *quant.quantize_host(_finite(file, t, gguf.hf_tensor(file, t)).astype(dt), mode, 1), mode)))
        with tqdm(total=len(items), desc=f"writing {mode} weights", disable=not show) as bar:
            _write(path, items, bar)
        return {KEY: {"quant_method": METHOD, "mode": mode, "dtype": dt.name}}

    return gguf.convert_gguf(gguf_path, out, progress, weights=weights)
