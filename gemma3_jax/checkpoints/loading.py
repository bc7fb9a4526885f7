"""Load a Hugging Face Gemma-3 safetensors checkpoint into ``Gemma3``.

The model is first built abstractly (``nnx.eval_shape``: shapes only, no memory), then every tensor is
read (from a memory map, checked for NaN/Inf on the host), converted to the Flax layout, cast and placed one
at a time, so the host never holds two full copies of the weights. The files are checked first, headers only
(``weight_files``), so a damaged or hostile checkpoint is refused before the model is built.

Both key layouts are understood: transformers v5 (``model.language_model.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*``), the older one (``language_model.model.*``,
``vision_tower.vision_model.*``, ``multi_modal_projector.*``) and text-only ``model.*``. Safetensors only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gemma3_jax.checkpoints import quantized as qfile
from gemma3_jax.model import quant
from gemma3_jax.model.config import CheckpointError, TextConfig, load_config
from gemma3_jax.model.gemma3 import Gemma3
from gemma3_jax.model.kernels import Kernels
from gemma3_jax.model.layers import params_by_path
from gemma3_jax.model.sharding import check_splits, make_mesh, shard_from_host, shard_weight, split_model
from gemma3_jax.checkpoints.weight_files import QUANTIZED_DTYPES, all_finite, iter_tensors, open_weight_files

__all__ = ["CheckpointError", "checkpoint_files", "load_pretrained"]

# Prefix -> part of the model. Order matters: the most specific first.
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision"),
    ("vision_tower.vision_model.", "vision"),
    ("model.vision_tower.", "vision"),
    ("vision_tower.", "vision"),
    ("model.multi_modal_projector.", "projector"),
    ("multi_modal_projector.", "projector"),
    ("model.language_model.", "text"),
    ("language_model.model.", "text"),
    ("language_model.", "text"),
    ("model.", "text"),
    ("", "text"),
)
_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")
# SigLIP's pooling head (Gemma-3 does not use it), and buffers older exports saved that transformers ignores too:
# rotary inverse frequencies (recomputed from the config) and SigLIP's position ids (0..P-1).
_UNUSED = re.compile(r"^vision:head\.|^text:(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$|"
                     r"^vision:embeddings\.position_ids$")


# A conversion: (HF shape from our shape, HF tensor -> our layout).
Conversion = tuple[Callable[[tuple], tuple], Callable]
_COPY: Conversion = (lambda s: s, lambda w, s: w)
_T: Conversion = (lambda s: s[::-1], lambda w, s: w.T)  # nn.Linear [out, in] -> [in, out] (SigLIP)
_OUT_IN_HEADS: Conversion = (lambda s: (s[0] * s[1], s[2]), lambda w, s: w.reshape(s))  # [N*H, D] -> [N, H, D]
_IN_OUT_HEADS: Conversion = (lambda s: (s[0], s[1] * s[2]), lambda w, s: w.reshape(s))  # [D, N*H] -> [D, N, H]


def _pad_axis(x, axis: int, size: int):
    """Zero-pad ``axis`` of x up to ``size`` (SigLIP's head dim 72 -> 80); a larger axis is a shape error."""
    if x.shape[axis] > size:
        raise CheckpointError(f"a head dim of {x.shape[axis]} does not fit the model's padded {size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


# SigLIP q/k/v/out with the head dim zero-padded (s: our shape). _NH in an expected shape stands for the
# tower's heads x head dim (the checkpoint's width), which the padded shape alone does not give.
_NH = -2
_QKV_PAD: Conversion = (  # [N*H, E] -> one piece [E, 1, N, Hp] of qkv_proj
    lambda s: (_NH, s[0]),
    lambda w, s: _pad_axis(w.T.reshape(s[0], 1, s[2], -1), 3, s[3]),
)
_QKV_BIAS_PAD: Conversion = (lambda s: (_NH,), lambda w, s: _pad_axis(w.reshape(1, s[1], -1), 2, s[2]))  # -> [1, N, Hp]
_OUT_PAD: Conversion = (lambda s: (s[2], _NH), lambda w, s: _pad_axis(w.T.reshape(s[0], -1, s[2]), 1, s[1]))  # -> [N, Hp, E]
_CONV: Conversion = (  # Conv2d [E, C, p, p] -> [C*p*p, E]
    lambda s: (s[1], -1, -1, -1),
    lambda w, s: w.reshape(w.shape[0], -1).T,
)

_RULES: list[tuple[re.Pattern, str, Conversion]] = [
    (re.compile(p), target, conv)
    for p, target, conv in [
        # text decoder
        (r"text:embed_tokens\.weight", "text.embed", _COPY),
        (r"text:norm\.weight", "text.final_norm.weight", _COPY),
        (r"text:layers\.(\d+)\.input_layernorm\.weight", "text.layers.{0}.input_norm.weight", _COPY),
        (r"text:layers\.(\d+)\.post_attention_layernorm\.weight", "text.layers.{0}.post_attn_norm.weight", _COPY),
        (r"text:layers\.(\d+)\.pre_feedforward_layernorm\.weight", "text.layers.{0}.pre_ffw_norm.weight", _COPY),
        (r"text:layers\.(\d+)\.post_feedforward_layernorm\.weight", "text.layers.{0}.post_ffw_norm.weight", _COPY),
        (r"text:layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", "text.layers.{0}.attn.qkv_proj[{1}]", _OUT_IN_HEADS),
        (r"text:layers\.(\d+)\.self_attn\.o_proj\.weight", "text.layers.{0}.attn.o_proj", _IN_OUT_HEADS),
        (r"text:layers\.(\d+)\.self_attn\.([qk])_norm\.weight", "text.layers.{0}.attn.{1}_norm.weight", _COPY),
        (r"text:layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", "text.layers.{0}.mlp.gate_up[{1}]", _COPY),
        (r"text:layers\.(\d+)\.mlp\.down_proj\.weight", "text.layers.{0}.mlp.down", _COPY),
        # SigLIP
        (r"vision:embeddings\.patch_embedding\.weight", "vision.patch_embed", _CONV),
        (r"vision:embeddings\.patch_embedding\.bias", "vision.patch_bias", _COPY),
        (r"vision:embeddings\.position_embedding\.weight", "vision.pos_embed", _COPY),
        (r"vision:post_layernorm\.weight", "vision.post_norm.scale", _COPY),
        (r"vision:post_layernorm\.bias", "vision.post_norm.bias", _COPY),
        (r"vision:encoder\.layers\.(\d+)\.layer_norm([12])\.weight", "vision.layers.{0}.norm{1}.scale", _COPY),
        (r"vision:encoder\.layers\.(\d+)\.layer_norm([12])\.bias", "vision.layers.{0}.norm{1}.bias", _COPY),
        (r"vision:encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", "vision.layers.{0}.attn.qkv_proj[{1}]",
         _QKV_PAD),
        (r"vision:encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", "vision.layers.{0}.attn.qkv_bias[{1}]",
         _QKV_BIAS_PAD),
        (r"vision:encoder\.layers\.(\d+)\.self_attn\.out_proj\.weight", "vision.layers.{0}.attn.o_proj", _OUT_PAD),
        (r"vision:encoder\.layers\.(\d+)\.self_attn\.out_proj\.bias", "vision.layers.{0}.attn.o_bias", _COPY),
        (r"vision:encoder\.layers\.(\d+)\.mlp\.(fc[12])\.weight", "vision.layers.{0}.mlp.{1}", _T),
        (r"vision:encoder\.layers\.(\d+)\.mlp\.(fc[12])\.bias", "vision.layers.{0}.mlp.{1}_bias", _COPY),
        # projector
        (r"projector:mm_input_projection_weight", "projector.proj", _COPY),
        (r"projector:mm_soft_emb_norm\.weight", "projector.norm.weight", _COPY),
    ]
]


# Fused weights: several checkpoint tensors stacked along one axis of one parameter (target "name[piece]").
# Per parameter ("part.leaf"): each piece's size along the axis, in order, as a function of the text config.
_PIECES: dict[str, tuple[int, Callable[[TextConfig], list[tuple[str, int]]]]] = {
    "text.qkv_proj": (0, lambda t: [("q", t.num_heads), ("k", t.num_kv_heads), ("v", t.num_kv_heads)]),
    "text.gate_up": (0, lambda t: [("gate", t.intermediate_size), ("up", t.intermediate_size)]),
    "vision.qkv_proj": (1, lambda t: [("q", 1), ("k", 1), ("v", 1)]),  # [E, 3, N, Hp]
    "vision.qkv_bias": (0, lambda t: [("q", 1), ("k", 1), ("v", 1)]),  # [3, N, Hp]
}


def split_piece(target: str) -> tuple[str, str | None]:
    """'text.layers.0.attn.qkv_proj[k]' -> ('text.layers.0.attn.qkv_proj', 'k'); plain names -> (name, None)."""
    if target.endswith("]"):
        name, piece = target[:-1].split("[")
        return name, piece
    return target, None


def pieces_of(name: str, cfg: TextConfig) -> tuple[int, list[tuple[str, int]]] | None:
    """(axis, [(piece, size), ...]) of a fused parameter, None for a plain one."""
    fused = _PIECES.get(f"{name.split('.', 1)[0]}.{name.rsplit('.', 1)[-1]}")
    return (fused[0], fused[1](cfg)) if fused else None


def normalize_key(key: str) -> str:
    """'model.language_model.layers.0.x' -> 'text:layers.0.x' (part:name), whichever layout."""
    for prefix, part in _PREFIXES:
        if key.startswith(prefix):
            return f"{part}:{key[len(prefix):]}"
    raise AssertionError("unreachable: the empty prefix matches everything")


def target_of(key: str) -> tuple[str, Conversion] | None:
    """Our parameter path and conversion for an HF key; None if the key is known to be unused."""
    name = normalize_key(key)
    if _UNUSED.match(name):
        return None
    for pattern, target, conv in _RULES:
        m = pattern.fullmatch(name)
        if m:
            return target.format(*m.groups()), conv
    raise CheckpointError(f"unexpected tensor {key!r} in the checkpoint (read as {name!r})")


def hf_name_of(param_path: str) -> str:
    """Our parameter path (``name[piece]`` for a piece of a fused weight) -> the (normalized) HF tensor name it
    is read from, for error messages."""
    for pattern, target, _ in _RULES:
        t = re.escape(target)
        for i in range(4):
            t = t.replace(re.escape("{%d}" % i), "(.+?)")
        m = re.fullmatch(t, param_path)
        if m:
            groups = iter(m.groups())
            return re.sub(r"\([^)]*\)", lambda _: next(groups), pattern.pattern).replace("\\.", ".")
    return param_path


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, their headers and shard index checked (cheap: no tensor
    data is read), so a damaged checkpoint is refused before the model is built."""
    return [f.path for f in open_weight_files(Path(path), quantized=qfile.stored_mode(Path(path)) is not None)]


def load_pretrained(path: str | Path, dtype=jnp.bfloat16, attention: str | Kernels = "auto",
                    progress: bool = True, tensor_parallel: int | Mesh = 1, quantize: str | None = None) -> Gemma3:
    """Read a checkpoint directory (config.json + safetensors) into a ``Gemma3`` with weights in ``dtype``;
    ``attention`` as for ``Gemma3``. ``tensor_parallel``: split the text decoder over that many devices (or a
    one-axis ``Mesh``; ``model.sharding``), checked against the config before the weights load; each weight goes
    to its shards as it is read, so no device holds more than one whole weight at a time. ``quantize``: the text
    decoder's product weights quantized as they load (``model.quant``: "int8", "fp8" or "int4"), each from its weight
    rounded to ``dtype``. A quantized checkpoint (``checkpoints.quantized``: its config.json says so) loads its
    stored values and scales as they are; ``quantize`` may then be None or its mode."""
    kernels = Kernels.resolve(attention)
    quant.check_mode(quantize)
    if isinstance(tensor_parallel, int) and not isinstance(tensor_parallel, bool):
        mesh = None if tensor_parallel == 1 else make_mesh(tensor_parallel)
    elif isinstance(tensor_parallel, Mesh):
        mesh = tensor_parallel
    else:
        raise TypeError(f"tensor_parallel must be an int or a jax.sharding.Mesh, got {tensor_parallel!r}")
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise NotADirectoryError(f"checkpoint {path} is not a directory (config.json + safetensors files)")
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}") from None
    if dtype == jnp.float16:
        raise ValueError("dtype=float16 is refused: Gemma-3 activations overflow float16; use bfloat16 or float32")
    if dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype}")
    raw, cfg = load_config(path)
    stored = qfile.mode_of(raw, path / "config.json")
    quantize = qfile.effective_mode(path, stored, quantize)
    if mesh is not None:
        check_splits(cfg, mesh.size, quantize)
    files = open_weight_files(path, quantized=stored is not None)
    by_key = {key: f for f in files for key in f.entries}
    # the unsplit layout: names and shapes to check
    model = nnx.eval_shape(lambda: Gemma3(cfg, dtype, kernels, quantize))
    params = params_by_path(model)
    split = None if mesh is None else split_model(cfg, dtype, kernels, mesh, quantize)
    targets = params if split is None else params_by_path(split)
    loaded: set[str] = set()
    pending: dict[str, dict[str, jax.Array]] = {}  # fused weights: pieces read so far
    tied = _is_tied(raw)
    vision_nh = cfg.vision.num_heads * cfg.vision.head_dim if cfg.is_multimodal else 0
    count = sum(len(f.entries) for f in files)
    finite: list[tuple[Path, str, jax.Array]] = []
    for key, hf_shape, file in tqdm(iter_tensors(files), total=count, desc="loading weights", disable=not progress):
        if key in _LM_HEAD:
            if not tied:
                raise CheckpointError(f"{key!r}: untied lm_head is not supported (Gemma-3 ties it to the embedding)")
            continue
        weight = key.removesuffix(qfile.SCALE)
        if stored and weight != key and weight in by_key and quantized_weight(weight):
            continue  # read with its weight
        target = target_of(key)
        if target is None:
            continue
        full, (hf_shape_of, convert) = target
        name, piece = split_piece(full)
        if name not in params:
            raise CheckpointError(f"unexpected tensor {key!r}: the model has no {name!r} (config mismatch?)")
        if name in loaded or piece in pending.get(name, {}):
            raise CheckpointError(f"tensor {key!r} maps to {full!r}, which was already loaded")
        p = params[name]
        want = p.get_value().shape
        if piece is not None:  # this piece's slice of the fused weight
            axis, sizes = pieces_of(name, cfg.text)
            want = tuple(dict(sizes)[piece] if i == axis else w for i, w in enumerate(want))
        expect = tuple(vision_nh if e == _NH else e for e in hf_shape_of(want))
        rule = quant.rule(name) if quantize else None
        given = stored is not None and rule is not None  # quantized in the file: values and scales as stored
        if not given and file.entries[key].dtype in QUANTIZED_DTYPES:  # only those may be (read_header let it in)
            raise CheckpointError(f"{file.path}: tensor {key!r} has dtype {file.entries[key].dtype}; a {stored} "
                                  f"checkpoint stores only the text decoder's product weights quantized")
        shown = qfile.stored_shape(expect, stored) if given else expect
        if len(shown) != len(hf_shape) or any(e not in (-1, h) for e, h in zip(shown, hf_shape)):
            raise CheckpointError(f"tensor {key!r} has shape {list(hf_shape)}, expected {list(shown)} for {name!r}")
        streamed = split is not None and name.startswith("text.")  # host slices straight to each device
        try:
            if given:  # checked here (fp8 values and the scales for NaN / Inf); int4 unpacked, a host copy
                view = qfile.read_quantized(file, key, stored, expect)
                scale_view = qfile.read_scale(by_key, key, stored, expect).reshape(
                    quant.scale_shape(want, stored, rule[1]))
                value = convert(view, want)
                value = (value, scale_view) if streamed else (jnp.asarray(value), jnp.asarray(scale_view))
            elif streamed:
                view = file.read(key, check_finite=False)  # over the file's map: no copy yet
                value = convert(view, want)  # the text conversions are reshapes: still a view
            else:
                view = file.read(key, check_finite=False)
                host = jnp.array(view)  # a copy: never aliases the map
                finite.append(([(file.path, key, view)], [jnp.isfinite(host).all()]))  # on the device, read at the end
                value = convert(host, want).astype(dtype)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as e:  # a reshape that cannot fit: name the tensor, not numpy's message
            raise CheckpointError(f"tensor {key!r} has shape {list(hf_shape)}, which does not fit {full!r} {want}") from e
        if (value[0] if given else value).shape != want:
            raise CheckpointError(f"tensor {key!r} has shape {list(hf_shape)}, which does not fit {full!r} {want}")
        sources = [(file.path, key, view)]
        if piece is not None:
            got = pending.setdefault(name, {})
            got[piece] = (value, sources[0])
            order = [k for k, _ in sizes]
            if set(got) != set(order):
                continue
            parts = [got[k] for k in order]
            del pending[name]
            sources = [src for _, src in parts]
            # streamed text pieces stack along axis 0, which shard_from_host gathers from: no concatenated copy
            join = (lambda vs: vs) if streamed else (lambda vs: jnp.concatenate(vs, axis=axis))
            values = [v for v, _ in parts]
            value = (join([q for q, _ in values]), join([s for _, s in values])) if given else join(values)
        scale = None
        if given:  # stored quantized: placed as they are
            value, scale = value
            if streamed:
                pieces = value if isinstance(value, list) else [value]
                value = shard_from_host(cfg, name, pieces, mesh, pieces[0].dtype)
                scale = shard_from_host(cfg, rule[0], scale if isinstance(scale, list) else [scale], mesh, np.float32)
            elif split is not None:
                value, scale = shard_weight(cfg, name, value, mesh), shard_weight(cfg, rule[0], scale, mesh)
        elif streamed:
            placed = shard_from_host(cfg, name, value if isinstance(value, list) else [value], mesh, dtype,
                                     quantize if rule else None)
            value, scale = placed if rule else (placed, None)
            # each device checks its own slices (a check over the whole array would be a collective across
            # processes, and collectives dispatched while others run can pair up differently on each process)
            finite.append((sources, [jnp.isfinite(s.data).all()
                                     for s in (value if scale is None else scale).addressable_shards]))
        else:
            if rule:
                value, scale = quant.quantize(value, quantize, rule[1])
            if split is not None:
                value = shard_weight(cfg, name, value, mesh)
                scale = None if scale is None else shard_weight(cfg, rule[0], scale, mesh)
        targets[name].set_value(value)
        loaded.add(name)
        if rule:
            targets[rule[0]].set_value(scale)
            loaded.add(rule[0])
    for sources, flags in finite:  # each flag was computed where its weight went; read once everything is queued
        if not all(bool(f) for f in flags):
            file, key = next(((f, k) for f, k, view in sources if not all_finite(view)), sources[0][:2])
            raise CheckpointError(f"{file}: tensor {key!r} holds NaN or Inf values; refusing a damaged weight")
    missing = []
    for n in sorted(set(params) - loaded):
        fused = pieces_of(n, cfg.text)
        have = pending.get(n, {})
        missing += [hf_name_of(f"{n}[{k}]") for k, _ in fused[1] if k not in have] if fused else [hf_name_of(n)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing tensor(s) in {path}: {', '.join(missing[:5])}{more}")
    return model if split is None else split


def quantized_weight(key: str) -> bool:
    """Whether checkpoint tensor ``key`` is one that ``quantize`` quantizes (and a quantized checkpoint stores
    quantized, with a scale): the text decoder's product weights and the embedding, not a tied lm_head."""
    if key in _LM_HEAD:
        return False
    try:
        target = target_of(key)
    except CheckpointError:
        return False
    return target is not None and quant.rule(split_piece(target[0])[0]) is not None


def _is_tied(d: dict) -> bool:
    return bool(d.get("tie_word_embeddings", (d.get("text_config") or {}).get("tie_word_embeddings", True)))
