"""Gemma-3's released sizes by name, as their Hugging Face config.json files describe them.

    cfg = preset("gemma3_4b")          # or gemma3_270m, gemma3_1b, gemma3_12b, gemma3_27b

For benchmarks and plans (memory, sharding) without a checkpoint at hand; a checkpoint's own config.json is
still what ``load_pretrained`` reads.
"""

from __future__ import annotations

from gemma3_jax.model.config import GLOBAL, SLIDING, Gemma3Config, RopeConfig, TextConfig, VisionConfig

# SigLIP-So400m at 896 px, shared by the multimodal sizes.
SIGLIP = VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16, image_size=896,
                      patch_size=14)


def _text(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, *, head_dim: int = 256,
          query_pre_attn_scalar: float = 256, window: int = 1024, vocab: int = 262_208, positions: int = 131_072,
          rope_factor: float | None = 8.0, eos: tuple[int, ...] = (1, 106)) -> TextConfig:
    """Five sliding layers to one global, as every Gemma-3 size; global RoPE linearly scaled on the 128K sizes."""
    rope = RopeConfig(1_000_000.0, "linear", rope_factor) if rope_factor else RopeConfig(1_000_000.0)
    return TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=window,
        layer_types=tuple(SLIDING if (i + 1) % 6 else GLOBAL for i in range(layers)), rope_global=rope,
        rope_local=RopeConfig(10_000.0), max_position_embeddings=positions, eos_token_id=eos,
    )


def _multimodal(text: TextConfig) -> Gemma3Config:
    return Gemma3Config(text, SIGLIP, mm_tokens_per_image=256, image_token_id=262_144, boi_token_id=255_999,
                        eoi_token_id=256_000)


def _small(layers: int, hidden: int, intermediate: int) -> Gemma3Config:
    """The 32K-context text-only sizes: 4 query heads over 1 KV head, window 512, no RoPE scaling."""
    text = _text(layers, hidden, intermediate, 4, 1, window=512, vocab=262_144, positions=32_768, rope_factor=None,
                 eos=(1,))
    return Gemma3Config(text)


PRESETS = {
    "gemma3_270m": lambda: _small(18, 640, 2048),
    "gemma3_1b": lambda: _small(26, 1152, 6912),
    "gemma3_4b": lambda: _multimodal(_text(34, 2560, 10_240, 8, 4)),
    "gemma3_12b": lambda: _multimodal(_text(48, 3840, 15_360, 16, 8)),
    # The 27B's queries are scaled by 1/sqrt(hidden / heads) = 1/sqrt(168), not by its head dim (128).
    "gemma3_27b": lambda: _multimodal(_text(62, 5376, 21_504, 32, 16, head_dim=128, query_pre_attn_scalar=168)),
}


def preset(name: str) -> Gemma3Config:
    """The config of a released Gemma-3 size by name (``PRESETS``' keys)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]()
