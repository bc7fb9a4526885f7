"""Frozen configuration dataclasses, read from a Hugging Face ``config.json``.

Both checkpoint kinds are accepted: ``Gemma3ForConditionalGeneration`` (text_config + vision_config) and
text-only ``Gemma3ForCausalLM`` (270M / 1B). Both spellings of transformers v4 and v5 are accepted:
``rope_scaling`` + ``rope_theta`` + ``rope_local_base_freq`` (v4) or ``rope_parameters`` per layer type
(v5); ``sliding_window_pattern`` (v4) or ``layer_types`` (v5).
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
        if self.num_heads % self.num_kv_heads:
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
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{self.hidden_size=} is not a multiple of {self.num_heads=}")
        if self.image_size % self.patch_size:
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
            per_side = math.isqrt(self.mm_tokens_per_image)
            if per_side * per_side != self.mm_tokens_per_image:
                raise ValueError(f"{self.mm_tokens_per_image=} is not a square")
            if self.vision.patches_per_side % per_side:
                raise ValueError(
                    f"patches per side {self.vision.patches_per_side} is not a multiple of "
                    f"tokens per side {per_side} (mm_tokens_per_image={self.mm_tokens_per_image})"
                )

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Gemma3Config:
        if "text_config" in d or d.get("model_type") == "gemma3":
            vision = d.get("vision_config")
            return cls(
                text=_text_from_hf(d.get("text_config") or {}),
                vision=None if vision is None else _vision_from_hf(vision),
                mm_tokens_per_image=int(d.get("mm_tokens_per_image", 256)),
                image_token_id=int(_first(d, "image_token_id", "image_token_index", default=262_144)),
                boi_token_id=int(_first(d, "boi_token_id", "boi_token_index", default=255_999)),
                eoi_token_id=int(_first(d, "eoi_token_id", "eoi_token_index", default=256_000)),
            )
        return cls(text=_text_from_hf(d), vision=None)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Gemma3Config:
        return cls.from_hf_dict(read_hf_config(path))


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory (or that file itself) as a dict."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}")
    with open(file) as f:
        return json.load(f)


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def _rope_from_hf(params: dict[str, Any] | None, theta: float) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"unsupported {rope_type=}; gemma3-jax implements 'default' and 'linear'")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return RopeConfig(theta=float(params.get("rope_theta", theta)), rope_type=rope_type, factor=factor)


def _layer_types(d: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    pattern = int(_first(d, "sliding_window_pattern", "_sliding_window_pattern", default=6))
    return tuple(SLIDING if (i + 1) % pattern else GLOBAL for i in range(num_layers))


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
    if d.get("attn_logit_softcapping") is not None:
        raise ValueError(
            f"attn_logit_softcapping={d['attn_logit_softcapping']} is not supported (Gemma-3 has none)"
        )
    if d.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (EmbeddingGemma) is not supported")
    num_layers = int(d.get("num_hidden_layers", 34))
    hidden = int(d.get("hidden_size", 2560))
    heads = int(d.get("num_attention_heads", 8))
    if d.get("rope_parameters") and (GLOBAL in d["rope_parameters"] or SLIDING in d["rope_parameters"]):
        rp = d["rope_parameters"]  # transformers v5: one dict per layer type
        rope_global = _rope_from_hf(rp.get(GLOBAL), _DEFAULT_THETA[GLOBAL])
        rope_local = _rope_from_hf(rp.get(SLIDING), _DEFAULT_THETA[SLIDING])
    else:  # transformers v4: rope_scaling applies to global layers only
        rope_global = _rope_from_hf(
            {**(d.get("rope_scaling") or {}), "rope_theta": d.get("rope_theta", _DEFAULT_THETA[GLOBAL])},
            _DEFAULT_THETA[GLOBAL],
        )
        rope_local = RopeConfig(float(d.get("rope_local_base_freq", _DEFAULT_THETA[SLIDING])))
    eos = d.get("eos_token_id", 1)
    return TextConfig(
        vocab_size=int(d.get("vocab_size", 262_208)),
        hidden_size=hidden,
        intermediate_size=int(d.get("intermediate_size", 10240)),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads", 4)),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
        sliding_window=int(d.get("sliding_window") or 4096),
        layer_types=_layer_types(d, num_layers),
        rope_global=rope_global,
        rope_local=rope_local,
        final_logit_softcapping=d.get("final_logit_softcapping"),
        max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
        pad_token_id=int(_first(d, "pad_token_id", default=0)),
        bos_token_id=int(_first(d, "bos_token_id", default=2)),
        eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
    )


def _vision_from_hf(d: dict[str, Any]) -> VisionConfig:
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"unsupported vision hidden_act={act!r}; expected gelu_pytorch_tanh")
    return VisionConfig(
        hidden_size=int(d.get("hidden_size", 1152)),
        intermediate_size=int(d.get("intermediate_size", 4304)),
        num_layers=int(d.get("num_hidden_layers", 27)),
        num_heads=int(d.get("num_attention_heads", 16)),
        image_size=int(d.get("image_size", 896)),
        patch_size=int(d.get("patch_size", 14)),
        num_channels=int(d.get("num_channels", 3)),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
    )
