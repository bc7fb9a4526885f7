"""Frozen configuration dataclasses, read from a Hugging Face ``config.json`` and checked value by value.

Both checkpoint kinds are accepted: ``Gemma3ForConditionalGeneration`` (text_config + vision_config) and
text-only ``Gemma3ForCausalLM`` (270M / 1B). Both spellings of transformers v4 and v5 are accepted:
``rope_scaling`` + ``rope_theta`` + ``rope_local_base_freq`` (v4) or ``rope_parameters`` per layer type
(v5); ``sliding_window_pattern`` (v4) or ``layer_types`` (v5).

Every value is checked when read (type, sign, finiteness, bounds, consistency), so a bad config.json ends in
one ``ConfigError`` naming the file and the key (``Gemma3Config.from_pretrained``) before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"

_DEFAULT_THETA = {GLOBAL: 1_000_000.0, SLIDING: 10_000.0}
_ROPE_TYPES = ("default", "linear")
_MODEL_TYPES = ("gemma3", "gemma3_text")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
_MAX_CONFIG = 16 << 20  # a real config.json is a few KB: a larger one is not read into memory

# Upper bounds of the sizes, far above the largest Gemma-3 (27B: 62 layers, hidden 5376, intermediate 21504,
# 32 heads of 128, vocab 262208, 131072 positions; SigLIP 896 px): a config beyond them is a typo or hostile,
# and would otherwise build a model for minutes or ask for more memory than any device has.
_BOUNDS = {
    "num_hidden_layers": (1024, "62 in the 27B"),
    "hidden_size": (65536, "5376 in the 27B"),
    "intermediate_size": (524288, "21504 in the 27B"),
    "num_attention_heads": (1024, "32 in the 27B"),
    "num_key_value_heads": (1024, "16 in the 27B"),
    "head_dim": (1024, "256 in the 4B"),
    "vocab_size": (4_194_304, "262208"),
    "max_position_embeddings": (16_777_216, "131072"),
    "sliding_window": (16_777_216, "1024"),
    "sliding_window_pattern": (1024, "6"),
    "image_size": (8192, "896"),
    "patch_size": (8192, "14"),
    "num_channels": (16, "3"),
    "mm_tokens_per_image": (65536, "256"),
}

OWN_QUANT_METHOD = "gemma3_jax"  # quantization_config.quant_method of checkpoints.quantized's checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a bad config.json, a damaged or lying weight file, or tensors that
    do not fit the model (missing, unexpected, mis-shaped, non-float or non-finite)."""


class ConfigError(CheckpointError):
    """A config.json value of the wrong type, out of range or inconsistent with another one."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type: ``inv_freq = 1 / theta**(2i/d) / factor``."""

    theta: float
    rope_type: str = "default"  # "default" or "linear"
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 262_208
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 34
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int = 1024
    layer_types: tuple[str, ...] = ()
    rope_global: RopeConfig = RopeConfig(1_000_000.0)
    rope_local: RopeConfig = RopeConfig(10_000.0)
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)=} does not match {self.num_layers=}")
        bad = sorted(set(self.layer_types) - {SLIDING, GLOBAL})
        if bad:
            raise ValueError(f"unknown layer types {bad}; expected {SLIDING!r} or {GLOBAL!r}")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} is not a multiple of {self.num_kv_heads=}")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope(self, layer: int) -> RopeConfig:
        return self.rope_local if self.is_sliding(layer) else self.rope_global

    @property
    def attn_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"{self.hidden_size=} is not a multiple of {self.num_heads=}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"{self.image_size=} is not a multiple of {self.patch_size=}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """The whole model; ``vision is None`` for a text-only checkpoint."""

    text: TextConfig
    vision: VisionConfig | None = None
    mm_tokens_per_image: int = 256
    image_token_id: int = 262_144
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000

    def __post_init__(self):
        if self.vision is not None:
            per_side = math.isqrt(max(self.mm_tokens_per_image, 0))
            if per_side < 1 or per_side * per_side != self.mm_tokens_per_image:
                raise ValueError(f"mm_tokens_per_image={self.mm_tokens_per_image} is not a positive square")
            if self.vision.patches_per_side % per_side:
                raise ValueError(
                    f"patches per side {self.vision.patches_per_side} (vision_config.image_size / patch_size) is "
                    f"not a multiple of tokens per side {per_side} (mm_tokens_per_image={self.mm_tokens_per_image})"
                )

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Gemma3Config:
        """The config of a parsed config.json; a bad value raises ``ConfigError`` naming its key."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {_kind(d)}")
        try:
            return _from_hf_dict(cls, d)
        except ConfigError:
            raise
        except (ValueError, TypeError, OverflowError) as e:  # a dataclass check: same class for every bad value
            raise ConfigError(str(e)) from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Gemma3Config:
        """The config of a checkpoint directory (or of its config.json), checked from the file alone: cheap
        enough to refuse a bad checkpoint before any weight is read. Errors name the file and the key."""
        return load_config(path)[1]


def config_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory (or that file itself) as a dict (a JSON object)."""
    file = config_file(path)
    if not file.exists():
        raise FileNotFoundError(f"no config.json at {file}")
    if not file.is_file():
        raise ConfigError(f"{file} is not a file")
    if file.stat().st_size > _MAX_CONFIG:
        raise ConfigError(f"{file}: {file.stat().st_size} bytes, too large for a config.json")
    try:
        d = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file}: must hold a JSON object, got {_kind(d)}")
    return d


def load_config(path: str | Path) -> tuple[dict[str, Any], Gemma3Config]:
    """(raw dict, checked config) of a checkpoint directory's config.json; errors are prefixed with its path."""
    raw = read_hf_config(path)
    try:
        cfg = Gemma3Config.from_hf_dict(raw)
        # the stored weights' format, not the architecture: checked on the file (an in-memory transformers
        # config of dequantized weights keeps its quantization_config)
        _check_quantization(_Fields(raw, ""), own_allowed=True)
        if isinstance(raw.get("text_config"), dict):
            _check_quantization(_Fields(raw["text_config"], "text_config."))
        return raw, cfg
    except ConfigError as e:
        raise ConfigError(f"{config_file(path)}: {e}") from None


def param_bytes(cfg: Gemma3Config, dtype) -> int:
    """Bytes of the model's weights in ``dtype``, from the config alone (SigLIP heads padded as the model pads
    them); the lm_head is tied to the embedding and counts nothing."""
    import numpy as np

    from gemma3_jax.model.kernels import padded_head_dim

    t = cfg.text
    d, hd = t.hidden_size, t.head_dim
    attn = (t.num_heads + 2 * t.num_kv_heads) * hd * d + d * t.num_heads * hd  # q|k|v and o
    layer = 4 * d + 2 * hd + attn + 3 * t.intermediate_size * d  # norms, q/k norms, attention, gate|up and down
    n = t.vocab_size * d + d + t.num_layers * layer
    if cfg.vision is not None:
        v = cfg.vision
        e, nh, i = v.hidden_size, v.num_heads, v.intermediate_size
        hp = padded_head_dim(v.head_dim)
        vlayer = 4 * e + 3 * nh * hp * (e + 1) + nh * hp * e + e + 2 * e * i + i + e
        n += v.num_channels * v.patch_size**2 * e + e + v.patches_per_side**2 * e + 2 * e + v.num_layers * vlayer
        n += e + e * d  # projector: norm + projection
    return n * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------------- parsing


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


class _Fields:
    """Checked reads from one JSON object; ``where`` ("text_config." or "") prefixes the keys in messages."""

    def __init__(self, d: Any, where: str):
        if not isinstance(d, dict):
            raise ConfigError(f"{where.rstrip('.')} must be a JSON object, got {_kind(d)}")
        self.d, self.where = d, where

    def name(self, key: str) -> str:
        return self.where + key

    def get(self, *keys: str, default: Any = None) -> tuple[str, Any]:
        """(key, value) of the first key present and not null, else (keys[0], default)."""
        for k in keys:
            if self.d.get(k) is not None:
                return k, self.d[k]
        return keys[0], default

    def int(self, *keys: str, default: int | None, low: int = 1, null_ok: bool = False) -> int:
        key = next((k for k in keys if k in self.d), keys[0])
        v = self.d.get(key, default)
        if v is None and (null_ok or key not in self.d):
            v = default
        want = "a positive integer" if low == 1 else f"an integer >= {low}"
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"{self.name(key)} must be {want}, got {v!r}")
        if key in _BOUNDS and v > _BOUNDS[key][0]:
            bound, real = _BOUNDS[key]
            raise ConfigError(f"{self.name(key)}={v} is beyond the bound of {bound} (real Gemma-3: {real})")
        return v

    def float(self, key: str, default: float | None, positive: bool = True, null_ok: bool = False) -> float | None:
        v = self.d.get(key, default)
        if v is None and null_ok:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            want = "a positive finite number" if positive else "a finite number"
            raise ConfigError(f"{self.name(key)} must be {want}, got {v!r}")
        return float(v)

    def token(self, key: str, default: int, vocab: int) -> int:
        """A token id; a given one must be below the vocabulary (JAX would clamp it silently in a lookup)."""
        v = self.int(key, default=default, low=0, null_ok=True)
        if self.d.get(key) is not None and v >= vocab:
            raise ConfigError(f"{self.name(key)}={v} is not below vocab_size={vocab}")
        return v

    def object(self, key: str) -> _Fields | None:
        v = self.d.get(key)
        return None if v is None else _Fields(v, f"{self.name(key)}.")


def _check_model_type(f: _Fields, allowed: tuple[str, ...]) -> None:
    mt = f.d.get("model_type")
    if mt is not None and mt not in allowed:
        raise ConfigError(f"{f.name('model_type')}={mt!r} is not a Gemma-3 model (expected "
                          f"{' or '.join(repr(a) for a in allowed)})")


def _check_quantization(f: _Fields, own_allowed: bool = False) -> None:
    """Refuse weights quantized by other tools; this project's own format (``checkpoints.quantized``, marked at the
    top level) is checked when its weights load."""
    q = f.d.get("quantization_config")
    if q is None:
        return
    method = q.get("quant_method", q.get("quant_type")) if isinstance(q, dict) else q
    if own_allowed and method == OWN_QUANT_METHOD:
        return
    raise ConfigError(f"{f.name('quantization_config')}: quant_method={method!r} is not supported (gemma3-jax "
                      f"loads float weights, F32, BF16 or F16, and its own {OWN_QUANT_METHOD!r} format)")


def _check_tie(f: _Fields) -> None:
    tie = f.d.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise ConfigError(f"{f.name('tie_word_embeddings')} must be true or false, got {tie!r}")


def _from_hf_dict(cls, d: dict[str, Any]) -> Gemma3Config:
    top = _Fields(d, "")
    _check_model_type(top, _MODEL_TYPES)
    _check_tie(top)
    if "text_config" not in d and d.get("model_type") != "gemma3":
        return cls(text=_text_from_hf(top), vision=None)
    text = _Fields({} if d.get("text_config") is None else d["text_config"], "text_config.")
    _check_model_type(text, ("gemma3_text",))
    text_cfg = _text_from_hf(text)
    vision = top.object("vision_config")
    if vision is None:
        return cls(text=text_cfg, vision=None)
    _check_model_type(vision, ("siglip_vision_model",))
    vocab = text_cfg.vocab_size
    mm = top.int("mm_tokens_per_image", default=256)
    if math.isqrt(mm) ** 2 != mm:
        raise ConfigError(f"mm_tokens_per_image={mm} is not a square (the image tokens are pooled to a square grid)")
    return cls(
        text=text_cfg,
        vision=_vision_from_hf(vision),
        mm_tokens_per_image=mm,
        # the image token is never looked up in the embedding (its positions take the image's features)
        image_token_id=top.int(top.get("image_token_id", "image_token_index")[0], default=262_144, low=0, null_ok=True),
        boi_token_id=top.token(top.get("boi_token_id", "boi_token_index")[0], 255_999, vocab),
        eoi_token_id=top.token(top.get("eoi_token_id", "eoi_token_index")[0], 256_000, vocab),
    )


def _rope_from_hf(f: _Fields | None, theta: float, theta_key: str = "rope_theta") -> RopeConfig:
    if f is None:
        return RopeConfig(theta=theta)
    key, rope_type = f.get("rope_type", "type", default="default")
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"{f.name(key)}={rope_type!r} is not supported; gemma3-jax implements 'default' and 'linear'")
    factor = f.float("factor", default=1.0) if rope_type == "linear" else 1.0
    return RopeConfig(theta=f.float(theta_key, default=theta), rope_type=rope_type, factor=factor)


def _layer_types(f: _Fields, num_layers: int) -> tuple[str, ...]:
    types = f.d.get("layer_types")
    if types is not None and types != []:
        if not isinstance(types, list):
            raise ConfigError(f"{f.name('layer_types')} must be a list, got {_kind(types)}")
        if len(types) != num_layers:
            raise ConfigError(f"{f.name('layer_types')} has {len(types)} entries but "
                              f"{f.name('num_hidden_layers')} is {num_layers}")
        bad = [t for t in types if t not in (SLIDING, GLOBAL)]
        if bad:
            raise ConfigError(f"{f.name('layer_types')} has the unknown type {bad[0]!r}; expected {SLIDING!r} or "
                              f"{GLOBAL!r}")
        return tuple(types)
    key = next((k for k in ("sliding_window_pattern", "_sliding_window_pattern") if f.d.get(k) is not None),
               "sliding_window_pattern")
    pattern = f.int(key, default=6, null_ok=True)
    return tuple(SLIDING if (i + 1) % pattern else GLOBAL for i in range(num_layers))


def _text_from_hf(f: _Fields) -> TextConfig:
    d = f.d
    if d.get("attn_logit_softcapping") is not None:
        raise ConfigError(
            f"{f.name('attn_logit_softcapping')}={d['attn_logit_softcapping']!r} is not supported (Gemma-3 has none)"
        )
    if d.get("use_bidirectional_attention"):
        raise ConfigError(f"{f.name('use_bidirectional_attention')}=true (EmbeddingGemma) is not supported")
    key, act = f.get("hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise ConfigError(f"{f.name(key)}={act!r} is not supported; Gemma-3 uses 'gelu_pytorch_tanh'")
    _check_tie(f)
    num_layers = f.int("num_hidden_layers", default=26)
    hidden = f.int("hidden_size", default=2304)
    heads = f.int("num_attention_heads", default=8)
    kv_heads = f.int("num_key_value_heads", default=4)
    if heads % kv_heads:
        raise ConfigError(f"{f.name('num_attention_heads')}={heads} is not a multiple of "
                          f"{f.name('num_key_value_heads')}={kv_heads}")
    head_dim = f.int("head_dim", default=256, null_ok=True)
    if head_dim % 2:
        raise ConfigError(f"{f.name('head_dim')} must be even (rotary embeddings rotate pairs), got {head_dim}")
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and (GLOBAL in rp or SLIDING in rp):  # transformers v5: one dict per layer type
        params = f.object("rope_parameters")
        rope_global = _rope_from_hf(params.object(GLOBAL), _DEFAULT_THETA[GLOBAL])
        rope_local = _rope_from_hf(params.object(SLIDING), _DEFAULT_THETA[SLIDING])
    else:  # transformers v4 (or v5 with one dict for all): rope_scaling applies to global layers only
        if rp is not None and f.object("rope_parameters").d:  # a flat dict: transformers ignores it, we refuse it
            raise ConfigError(f"{f.name('rope_parameters')} has no {GLOBAL!r} / {SLIDING!r} entries; Gemma-3 "
                              "takes RoPE settings per layer type (or rope_scaling + rope_theta)")
        scaling = f.object("rope_scaling")
        theta = f.float("rope_theta", default=_DEFAULT_THETA[GLOBAL])
        rope_global = _rope_from_hf(scaling, theta, theta_key="rope_theta")
        rope_local = RopeConfig(f.float("rope_local_base_freq", default=_DEFAULT_THETA[SLIDING]))
    vocab = f.int("vocab_size", default=262_208)
    eos_key, eos = f.get("eos_token_id", default=1)
    eos_list = eos if isinstance(eos, list) else [eos]
    if not eos_list:
        raise ConfigError(f"{f.name(eos_key)} is an empty list")
    eos_ids = tuple(_Fields({eos_key: e}, f.where).token(eos_key, 1, vocab) for e in eos_list)
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=f.int("intermediate_size", default=9216),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=f.float("rms_norm_eps", default=1e-6),
        query_pre_attn_scalar=f.float("query_pre_attn_scalar", default=256.0),
        sliding_window=f.int("sliding_window", default=4096, null_ok=True),
        layer_types=_layer_types(f, num_layers),
        rope_global=rope_global,
        rope_local=rope_local,
        final_logit_softcapping=f.float("final_logit_softcapping", default=None, null_ok=True),
        max_position_embeddings=f.int("max_position_embeddings", default=131_072),
        pad_token_id=f.token("pad_token_id", 0, vocab),
        bos_token_id=f.token("bos_token_id", 2, vocab),
        eos_token_id=eos_ids,
    )


def _vision_from_hf(f: _Fields) -> VisionConfig:
    key, act = f.get("hidden_act", default="gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise ConfigError(f"{f.name(key)}={act!r} is not supported; expected 'gelu_pytorch_tanh'")
    hidden = f.int("hidden_size", default=1152)
    heads = f.int("num_attention_heads", default=16)
    if hidden % heads:
        raise ConfigError(f"{f.name('hidden_size')}={hidden} is not a multiple of "
                          f"{f.name('num_attention_heads')}={heads}")
    image, patch = f.int("image_size", default=896), f.int("patch_size", default=14)
    if image % patch:
        raise ConfigError(f"{f.name('image_size')}={image} is not a multiple of {f.name('patch_size')}={patch}")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=f.int("intermediate_size", default=4304),
        num_layers=f.int("num_hidden_layers", default=27),
        num_heads=heads,
        image_size=image,
        patch_size=patch,
        num_channels=f.int("num_channels", default=3),
        layer_norm_eps=f.float("layer_norm_eps", default=1e-6),
    )
