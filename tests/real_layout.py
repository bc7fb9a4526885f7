"""The file set of a Hugging Face ``google/gemma-3-4b-it`` repository with tiny random weights, written with
numpy and safetensors only (no torch, no transformers), so a torch-free process (the notebook's kernel, the
subprocesses of tests/test_real_layout.py) can build it.

What is real: the file names and formats (config.json in transformers v5 spelling, generation_config.json,
bfloat16 weights in v5 key layout sharded in two files with model.safetensors.index.json, tokenizer.json,
tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json, a chat template,
preprocessor_config.json, processor_config.json), the vocabulary (Gemma-3's 262,144 tokens, from the real
270M's GGUF, plus ``<image_soft_token>`` at 262,144) and the embedding size 262,208. What is tiny: every other
size (text hidden 64, 7 layers with one global, window 8; SigLIP hidden 48, 2 layers, 28 px images in 4 x 4
patches of 7 px pooled to 4 soft tokens).

    write_checkpoint(path)                   # instruction-tuned multimodal (chat_template.jinja)
    write_checkpoint(path, variant="json")   # the same with the older chat_template.json
    write_checkpoint(path, variant="base")   # multimodal, no chat template anywhere, greedy generation config
    write_checkpoint(path, variant="text")   # Gemma3ForCausalLM (gemma3_text, keys model.*), no processor files
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

VARIANTS = ("it", "json", "base", "text")
VOCAB = 262_208  # the embedding's rows in every Gemma-3 >= 4B (the tokenizer has 262,145)
TOKENIZER_SIZE = 262_144  # pieces of the sentencepiece vocabulary
IMAGE_TOKEN, BOI, EOI = 262_144, 255_999, 256_000
EOS_IDS = [1, 106]  # <eos>, <end_of_turn>
MM_TOKENS = 4
IMAGE_SIZE = 28

TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, query_pre_attn_scalar=24, sliding_window=8, max_position_embeddings=131_072,
)  # fmt: skip
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=7)

# Gemma-3's conversation format, written for this fixture: a system text opens the first user turn, images are
# <start_of_image> markers, roles must alternate, and texts are trimmed. It uses loop controls on purpose
# (they need jinja2.ext.loopcontrols, which a renderer must load itself).
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- set state = namespace(prefix='', user_next=true) -%}
{%- for message in messages -%}
    {%- if loop.first and message['role'] == 'system' -%}
        {%- if message['content'] is string -%}
            {%- set state.prefix = message['content'] + '\\n\\n' -%}
        {%- else -%}
            {%- for part in message['content'] if part['type'] == 'text' -%}
                {%- set state.prefix = part['text'] + '\\n\\n' -%}
                {%- break -%}
            {%- endfor -%}
        {%- endif -%}
        {%- continue -%}
    {%- endif -%}
    {%- if (message['role'] == 'user') != state.user_next -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- set state.user_next = not state.user_next -%}
    {{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}
    {{- state.prefix -}}
    {%- set state.prefix = '' -%}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- elif message['content'] is iterable -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}
                {{- '<start_of_image>' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] | trim -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- raise_exception('Invalid content type') -}}
    {%- endif -%}
    {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""


# ---------------------------------------------------------------------------------------------------- configs

def text_config(vocab_size: int = VOCAB) -> dict:
    layers = TEXT["num_hidden_layers"]
    return {
        "model_type": "gemma3_text", **TEXT, "vocab_size": vocab_size,
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "use_bidirectional_attention": False, "use_cache": True, "initializer_range": 0.02,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": True,
    }  # fmt: skip


def model_config(variant: str) -> dict:
    if variant == "text":
        return {"architectures": ["Gemma3ForCausalLM"], **text_config(TOKENIZER_SIZE),
                "eos_token_id": EOS_IDS, "dtype": "bfloat16", "transformers_version": "5.0.0"}
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": BOI, "eoi_token_index": EOI, "image_token_index": IMAGE_TOKEN,
        "mm_tokens_per_image": MM_TOKENS, "eos_token_id": EOS_IDS if variant != "base" else 1,
        "initializer_range": 0.02, "tie_word_embeddings": True, "dtype": "bfloat16",
        "text_config": text_config(),
        "vision_config": {
            "model_type": "siglip_vision_model", **VISION, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "vision_use_head": False,
        },
        "transformers_version": "5.0.0",
    }  # fmt: skip


def generation_config(variant: str) -> dict:
    if variant == "base":  # a pretrained checkpoint: greedy, stops at <eos> only
        return {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "cache_implementation": "hybrid"}
    return {"bos_token_id": 2, "eos_token_id": EOS_IDS, "pad_token_id": 0, "cache_implementation": "hybrid",
            "do_sample": True, "top_k": 64, "top_p": 0.95, "transformers_version": "5.0.0"}


def processor_files() -> dict[str, dict]:
    pre = {
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_pan_and_scan": None, "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,  # nulls, as Google ships them: the processor's defaults
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": MM_TOKENS,
        "resample": 2, "rescale_factor": 1 / 255, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }  # fmt: skip
    return {"preprocessor_config.json": pre,
            "processor_config.json": {"image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"}}


# ---------------------------------------------------------------------------------------------------- weights

def weight_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape, in the v5 layout (lm_head is tied to the embedding and not stored)."""
    t = TEXT
    H, I, D = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * D, t["num_key_value_heads"] * D
    text = "model." if variant == "text" else "model.language_model."
    shapes = {f"{text}embed_tokens.weight": (TOKENIZER_SIZE if variant == "text" else VOCAB, H),
              f"{text}norm.weight": (H,)}
    for i in range(t["num_hidden_layers"]):
        p = f"{text}layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            shapes[f"{p}{norm}.weight"] = (H,)
        shapes.update({f"{p}self_attn.q_proj.weight": (q, H), f"{p}self_attn.k_proj.weight": (kv, H),
                       f"{p}self_attn.v_proj.weight": (kv, H), f"{p}self_attn.o_proj.weight": (H, q),
                       f"{p}self_attn.q_norm.weight": (D,), f"{p}self_attn.k_norm.weight": (D,),
                       f"{p}mlp.gate_proj.weight": (I, H), f"{p}mlp.up_proj.weight": (I, H),
                       f"{p}mlp.down_proj.weight": (H, I)})
    if variant == "text":
        return shapes
    E, Iv, P = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    v = "model.vision_tower.vision_model."
    shapes.update({f"{v}embeddings.patch_embedding.weight": (E, 3, P, P), f"{v}embeddings.patch_embedding.bias": (E,),
                   f"{v}embeddings.position_embedding.weight": ((IMAGE_SIZE // P) ** 2, E),
                   f"{v}post_layernorm.weight": (E,), f"{v}post_layernorm.bias": (E,)})
    for i in range(VISION["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{p}{n}.weight": (E,), f"{p}{n}.bias": (E,)})
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{n}.weight": (E, E), f"{p}self_attn.{n}.bias": (E,)})
        shapes.update({f"{p}mlp.fc1.weight": (Iv, E), f"{p}mlp.fc1.bias": (Iv,),
                       f"{p}mlp.fc2.weight": (E, Iv), f"{p}mlp.fc2.bias": (E,)})
    shapes.update({"model.multi_modal_projector.mm_input_projection_weight": (E, H),
                   "model.multi_modal_projector.mm_soft_emb_norm.weight": (E,)})
    return shapes


def random_weights(variant: str, seed: int = 0, gain: float = 0.5) -> dict[str, np.ndarray]:
    """Every tensor random, in bfloat16 (as tests/hf_checkpoints.randomize_): matrices ~ N(0, gain/sqrt(fan_in)),
    vectors ~ N(0, 0.1), SigLIP's LayerNorm scales + 1, so that each weight changes the logits."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in weight_shapes(variant).items():
        if len(shape) >= 2:
            fan_in = shape[0] if "mm_input_projection" in key else int(np.prod(shape[1:]))
            w = rng.standard_normal(shape, np.float32) * np.float32(gain / fan_in**0.5)
        else:
            w = rng.standard_normal(shape, np.float32) * np.float32(0.1)
            if "vision" in key and key.endswith("weight") and ("layer_norm" in key or "layernorm" in key):
                w += 1
        out[key] = w.astype(ml_dtypes.bfloat16)
    return out


def write_sharded(tensors: dict[str, np.ndarray], path: Path, shards: int = 2) -> None:
    """``model-0000k-of-0000n.safetensors`` (keys dealt round-robin in sorted order) + the index, as
    ``save_pretrained`` writes them."""
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(path / "model.safetensors.index.json", index)


# -------------------------------------------------------------------------------------------------- tokenizer

def tokenizer_cache() -> Path:
    root = Path(os.environ.get("GEMMA3_JAX_TEST_CACHE", Path.home() / ".cache" / "gemma3_jax_tests"))
    return root.expanduser() / "gemma3-tokenizer-v1"


def tokenizer_files() -> Path:
    """A directory with tokenizer.json (multimodal: + <image_soft_token>), tokenizer-text.json (without it) and
    tokenizer.model, built once from the real 270M GGUF's vocabulary; processes that ask at once take turns."""
    out = tokenizer_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "tokenizer.model").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            try:
                _build_tokenizer(tmp)
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken

    from gemma3_jax.checkpoints.gguf import packaged_gguf, read_gguf
    from gemma3_jax.preprocessing.tokenizer import gemma_backend

    md = read_gguf(packaged_gguf()).metadata
    tokens, types, scores = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"], md["tokenizer.ggml.scores"]
    assert len(tokens) == TOKENIZER_SIZE and tokens[BOI] == "<start_of_image>" and tokens[EOI] == "<end_of_image>"
    backend = gemma_backend(tokens, types)
    backend.save(str(out / "tokenizer-text.json"))
    backend.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
    assert backend.token_to_id("<image_soft_token>") == IMAGE_TOKEN
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer.model").write_bytes(sentencepiece_model(tokens, scores, types))


def _varint(n: int) -> bytes:
    if n < 0:  # protobuf spends ten bytes on a negative int32; none is written here
        raise ValueError(f"negative varint {n}")
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes and str length-delimited, float as fixed32, bool and int as varint."""
    if isinstance(value, (bytes, str)):
        data = value.encode() if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(data)) + data
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int]) -> bytes:
    """The bytes of sentencepiece's ``ModelProto`` (``tokenizer.model``) for a Gemma vocabulary, encoded here so
    that no protobuf package is needed: BPE with byte fallback, no dummy prefix, whitespace kept and escaped."""
    pieces = b"".join(
        _field(1, _field(1, "\u2581" * len(t) if " " in t and not t.strip() else t) + _field(2, float(score))
               + _field(3, 2 if t == "<unk>" else kind))  # type 2: UNKNOWN
        for t, score, kind in zip(tokens, scores, types)
    )
    trainer = b"".join(_field(n, v) for n, v in (
        (3, 2), (4, len(tokens)), (26, True), (35, True), (40, 3), (41, 2), (42, 1), (43, 0)))  # BPE, ids
    normalizer = _field(1, "identity") + b"".join(_field(n, False) for n in (3, 4)) + _field(5, True)
    return pieces + _field(2, trainer) + _field(3, normalizer)


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config(multimodal: bool) -> dict:
    cfg = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000_000_019_884_624_838_656, "padding_side": "left",
        "sp_model_kwargs": None, "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
        "use_default_system_prompt": False,
    }  # fmt: skip
    if multimodal:
        extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        cfg.update(extra, extra_special_tokens=extra, processor_class="Gemma3Processor")
    return cfg


def special_tokens_map(multimodal: bool) -> dict:
    out = {k: _special(v) for k, v in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"),
                                       ("unk_token", "<unk>"))}
    if multimodal:
        out.update(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>")
    return out


# ------------------------------------------------------------------------------------------------------ write

def write_checkpoint(path: str | os.PathLike, variant: str = "it", seed: int = 0) -> Path:
    """Write a tiny ``google/gemma-3-4b-it``-shaped repository into ``path`` (created); returns the path."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    multimodal = variant != "text"
    _write_json(path / "config.json", model_config(variant))
    _write_json(path / "generation_config.json", generation_config(variant))
    write_sharded(random_weights(variant, seed), path)
    tok = tokenizer_files()
    shutil.copyfile(tok / ("tokenizer.json" if multimodal else "tokenizer-text.json"), path / "tokenizer.json")
    shutil.copyfile(tok / "tokenizer.model", path / "tokenizer.model")
    _write_json(path / "tokenizer_config.json", tokenizer_config(multimodal))
    _write_json(path / "special_tokens_map.json", special_tokens_map(multimodal))
    if multimodal:
        _write_json(path / "added_tokens.json", {"<image_soft_token>": IMAGE_TOKEN})
        for name, content in processor_files().items():
            _write_json(path / name, content)
    if variant in ("it", "text"):
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    elif variant == "json":
        _write_json(path / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return path


def _write_json(file: Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
