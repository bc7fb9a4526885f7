"""Damaged, lying or hostile checkpoint files and config.json values: each ends in one CheckpointError (a
ValueError) naming the file and the tensor or key, never another exception type, a silent load or an unbounded
run. Weight files are written here byte by byte from the tiny random checkpoint's tensors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import gemma3_jax
from gemma3_jax import CheckpointError, Gemma3Config
from gemma3_jax.model.config import ConfigError, param_bytes
from gemma3_jax.model.gemma3 import Gemma3

ROOT = Path(__file__).resolve().parents[1]
_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype(np.float64): "F64", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32",
          np.dtype(np.bool_): "BOOL", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
          np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2"}
K_PROJ = "language_model.model.layers.2.self_attn.k_proj.weight"


def raw_safetensors(header, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header (JSON or raw bytes), the data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return (len(h) if length is None else length).to_bytes(8, "little") + h + data


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[key] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    return raw_safetensors(header, b"".join(blobs))


@pytest.fixture(scope="module")
def tiny(tiny_mm):
    """(config.json text, {key: float32 array}) of the tiny multimodal checkpoint."""
    path, _ = tiny_mm
    return (path / "config.json").read_text(), load_file(str(path / "model.safetensors"))


def write(dst: Path, config: str, weights: bytes | dict | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(config)
    if weights is not None:
        data = weights if isinstance(weights, bytes) else safetensors_bytes(weights)
        (dst / "model.safetensors").write_bytes(data)
    return dst


def load(path: Path):
    return gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)


# ------------------------------------------------------------------------------------------ safetensors files

def _one(n: int = 4) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}


@pytest.mark.parametrize("damage,match", [
    ("cut_data", r"data_offsets end \d+ bytes past the end of the file.*truncated"),
    ("cut_header", r"header length field says \d+ bytes but the file has \d+ after it"),
    ("zero_bytes", r"is 0 bytes long, too short for a safetensors file"),
    ("seven_bytes", r"is 7 bytes long"),
    ("huge_length", r"header length field says 1099511627776 bytes"),
    ("not_json", r"header is not valid JSON"),
    ("not_utf8", r"header is not valid JSON"),
    ("json_list", r"header is not a JSON object"),
    ("duplicate_key", r"header has the key 'a' twice"),
    ("entry_not_object", r"tensor 'a': its header entry is not a JSON object"),
    ("past_end", r"tensor 'a''s data_offsets end 8 bytes past the end of the file \(8 bytes of data\)"),
    ("overlap", r"tensors 'a' and 'b' overlap"),
    ("gap", r"4 bytes before tensor 'b' belong to no tensor"),
    ("trailing", r"4 bytes after the last tensor belong to no tensor"),
    ("reversed_offsets", r"tensor 'a' has data_offsets \[16, 0\], not \[begin, end\]"),
    ("shape_bytes", r"tensor 'a' of dtype F32 and shape \[5\] is 20 bytes but its data_offsets \[0, 16\] span 16"),
    ("bad_shape", r"tensor 'a' has the shape \[4, -1\]"),
    ("unknown_dtype", r"tensor 'a' has the unknown or unsupported dtype 'F4'"),
    ("directory", r"model\.safetensors: is not a file"),
])
def test_damaged_safetensors_file(tiny, tmp_path, damage, match):
    config, tensors = tiny
    real = safetensors_bytes(tensors)
    n = int.from_bytes(real[:8], "little")
    data = {
        "cut_data": real[: len(real) - 100],
        "cut_header": real[: 8 + n // 2],
        "zero_bytes": b"",
        "seven_bytes": real[:7],
        "huge_length": raw_safetensors({}, b"", length=1 << 40),
        "not_json": raw_safetensors(b"{not json", b""),
        "not_utf8": raw_safetensors(b'{"\xff\xfe": 1}', b""),
        "json_list": raw_safetensors([1, 2], b""),
        "duplicate_key": raw_safetensors(b'{"a": %s, "a": %s}' % (json.dumps(_one()).encode(), json.dumps(_one()).encode()),
                                         bytes(16)),
        "entry_not_object": raw_safetensors({"a": [0, 16]}, bytes(16)),
        "past_end": raw_safetensors({"a": _one()}, bytes(8)),
        "overlap": raw_safetensors({"a": _one(), "b": {**_one(), "data_offsets": [8, 24]}}, bytes(24)),
        "gap": raw_safetensors({"a": _one(), "b": {**_one(), "data_offsets": [20, 36]}}, bytes(36)),
        "trailing": raw_safetensors({"a": _one()}, bytes(20)),
        "reversed_offsets": raw_safetensors({"a": {**_one(), "data_offsets": [16, 0]}}, bytes(16)),
        "shape_bytes": raw_safetensors({"a": {**_one(), "shape": [5]}}, bytes(16)),
        "bad_shape": raw_safetensors({"a": {**_one(), "shape": [4, -1]}}, bytes(16)),
        "unknown_dtype": raw_safetensors({"a": {**_one(), "dtype": "F4"}}, bytes(16)),
    }.get(damage)
    path = write(tmp_path / "ckpt", config, data)
    if damage == "directory":
        (path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=match) as e:
        load(path)
    assert str(path / "model.safetensors") in str(e.value)
    if damage != "directory":  # the check made before the weights load (Checkpoint.open) sees it too
        with pytest.raises(CheckpointError, match=match):
            gemma3_jax.checkpoints.loading.checkpoint_files(path)


def test_oversized_json_files_are_not_read(tiny, tmp_path):
    config, tensors = tiny
    path = write(tmp_path / "ckpt", config + " " * (16 << 20), tensors)
    with pytest.raises(CheckpointError, match=r"config\.json: \d+ bytes, too large for a config\.json"):
        load(path)
    path = _sharded(tmp_path / "sharded", tiny, index_text='{"weight_map": {}}' + " " * (64 << 20))
    with pytest.raises(CheckpointError, match=r"index\.json: \d+ bytes, too large for a shard index"):
        load(path)


def test_a_file_given_as_the_checkpoint_directory(tiny, tmp_path):
    config, tensors = tiny
    path = write(tmp_path / "ckpt", config, tensors)
    with pytest.raises(NotADirectoryError, match=r"model\.safetensors is not a directory"):
        load(path / "model.safetensors")


def test_listing_order_of_a_header_does_not_matter(tiny, tmp_path):
    """Entries listed out of offset order are valid safetensors: the file loads."""
    config, tensors = tiny
    real = safetensors_bytes(tensors)
    n = int.from_bytes(real[:8], "little")
    header = json.loads(real[8:8 + n])
    reordered = dict(reversed(list(header.items())))
    path = write(tmp_path / "ckpt", config, raw_safetensors(reordered, real[8 + n:]))
    model = load(path)
    np.testing.assert_array_equal(np.asarray(model.text.embed[...]), tensors["language_model.model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("dtype,code", [(np.int8, "I8"), (np.uint8, "U8"), (np.int32, "I32"), (np.bool_, "BOOL"),
                                        (ml_dtypes.float8_e4m3fn, "F8_E4M3"), (ml_dtypes.float8_e5m2, "F8_E5M2")])
def test_non_float_tensors_are_refused(tiny, tmp_path, dtype, code):
    config, tensors = tiny
    bad = dict(tensors, **{K_PROJ: tensors[K_PROJ].astype(dtype)})
    with pytest.raises(CheckpointError, match=rf"tensor '{K_PROJ}' has dtype {code}: only float weights"):
        load(write(tmp_path / "ckpt", config, bad))


@pytest.mark.parametrize("where", ["top", "text_config"])
def test_a_declared_quantization_is_refused(tiny, tmp_path, where):
    config, _ = tiny
    d = json.loads(config)
    q = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (d if where == "top" else d["text_config"])["quantization_config"] = q
    path = write(tmp_path / "ckpt", json.dumps(d))
    prefix = "" if where == "top" else "text_config."
    with pytest.raises(ConfigError, match=rf"config\.json: {prefix}quantization_config: quant_method='bitsandbytes'"):
        load(path)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_float_weights_of_any_width_load_exactly(tiny, tmp_path, dtype):
    """F16, BF16 and F64 files load (only float16 compute is refused): each weight is the file's value."""
    config, tensors = tiny
    stored = {k: v.astype(dtype) for k, v in tensors.items()}
    model = load(write(tmp_path / "ckpt", config, stored))
    key = "language_model.model.embed_tokens.weight"
    np.testing.assert_array_equal(np.asarray(model.text.embed[...]), stored[key].astype(np.float32))
    got = np.asarray(model.text.layers[0].mlp.down[...])
    np.testing.assert_array_equal(got, stored["language_model.model.layers.0.mlp.down_proj.weight"].astype(np.float32))


# ------------------------------------------------------------------------------------------ non-finite values

@pytest.mark.parametrize("dtype,value,key", [
    (np.float32, np.nan, K_PROJ),
    (np.float32, np.inf, "vision_tower.encoder.layers.1.mlp.fc2.bias"),
    (ml_dtypes.bfloat16, -np.inf, "multi_modal_projector.mm_input_projection_weight"),
    (ml_dtypes.bfloat16, np.nan, "language_model.model.norm.weight"),
    (np.float16, np.nan, "language_model.model.embed_tokens.weight"),
])
def test_non_finite_weights_are_refused_by_name(tiny, tmp_path, dtype, value, key):
    config, tensors = tiny
    stored = {k: v.astype(dtype) for k, v in tensors.items()}
    bad = stored[key].copy()
    bad.reshape(-1)[bad.size // 2] = value
    stored[key] = bad
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}' holds NaN or Inf"):
        load(write(tmp_path / "ckpt", config, stored))


def test_the_largest_finite_float32_weight_loads(tiny, tmp_path):
    """Finite extremes are not mistaken for Inf: float32 max loads unchanged."""
    config, tensors = tiny
    key = "language_model.model.layers.0.post_feedforward_layernorm.weight"
    stored = dict(tensors, **{key: np.full_like(tensors[key], np.finfo(np.float32).max)})
    model = load(write(tmp_path / "ckpt", config, stored))
    assert np.all(np.asarray(model.text.layers[0].post_ffw_norm.weight[...]) == np.finfo(np.float32).max)


# ------------------------------------------------------------------------------------------------ shard index

def _sharded(tmp_path: Path, tiny, weight_map_edit=None, index_text: str | None = None) -> Path:
    """Two shards and an index; ``weight_map_edit(wm)`` edits the weight map before it is written."""
    config, tensors = tiny
    path = write(tmp_path / "ckpt", config)
    keys = sorted(tensors)
    wm = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        (path / name).write_bytes(safetensors_bytes({k: tensors[k] for k in part}))
        wm.update({k: name for k in part})
    if weight_map_edit:
        weight_map_edit(wm)
    (path / "model.safetensors.index.json").write_text(
        index_text if index_text is not None else json.dumps({"metadata": {}, "weight_map": wm}))
    return path


def test_sharded_fixture_loads(tiny, tmp_path):
    config, tensors = tiny
    model = load(_sharded(tmp_path, tiny))
    np.testing.assert_array_equal(np.asarray(model.projector.proj[...]),
                                  tensors["multi_modal_projector.mm_input_projection_weight"])


@pytest.mark.parametrize("text,match", [
    ("{", r"index\.json: not valid JSON"),
    ("[1, 2]", r"index\.json: must hold a JSON object"),
    ('{"metadata": {}}', r"index\.json: has no \"weight_map\""),
    ('{"weight_map": ["a.safetensors"]}', r"\"weight_map\" must be an object of tensor name -> shard file name"),
    ('{"weight_map": {"a": 3}}', r"\"weight_map\" must be an object of tensor name -> shard file name"),
    ('{"weight_map": {}}', r"\"weight_map\" lists no tensors"),
])
def test_bad_shard_index(tiny, tmp_path, text, match):
    with pytest.raises(CheckpointError, match=match):
        load(_sharded(tmp_path, tiny, index_text=text))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "single_symlink"])
def test_a_shard_outside_the_checkpoint_is_never_read(tiny, tmp_path, how):
    """The outside file is a complete valid checkpoint, so reading it would load without an error."""
    config, tensors = tiny
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(safetensors_bytes(tensors))
    path = write(tmp_path / "ckpt", config)
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside)}.get(how, "model.safetensors")
    if how in ("symlink", "single_symlink"):
        (path / "model.safetensors").symlink_to(outside)
    if how != "single_symlink":
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in tensors}}))
    with pytest.raises(CheckpointError, match=r"is outside the checkpoint directory .*; refusing to read it"):
        load(path)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        gemma3_jax.checkpoints.loading.checkpoint_files(path)  # the check made before the weights load (Checkpoint.open)


def test_hugging_face_hub_cache_symlinks_load(tiny, tmp_path):
    """A hub snapshot's files are symlinks into the repository's blobs/ directory: that is not outside."""
    config, tensors = tiny
    repo = tmp_path / "models--google--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd").write_bytes(safetensors_bytes(tensors))
    snap = write(repo / "snapshots" / "fedcba98", config)
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "0123abcd")
    model = load(snap)
    np.testing.assert_array_equal(np.asarray(model.text.embed[...]), tensors["language_model.model.embed_tokens.weight"])


def test_local_dir_download_symlinked_into_the_hub_cache_loads(tiny, tmp_path):
    """huggingface_hub's --local-dir before 0.23 left symlinks from the chosen directory into its cache's blobs/."""
    config, tensors = tiny
    blobs = tmp_path / "hub" / "models--google--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "0123abcd").write_bytes(safetensors_bytes(tensors))
    local = write(tmp_path / "gemma-local", config)
    (local / "model.safetensors").symlink_to(blobs / "0123abcd")
    model = load(local)
    np.testing.assert_array_equal(np.asarray(model.text.embed[...]), tensors["language_model.model.embed_tokens.weight"])
    (local / "model.safetensors").unlink()  # the same file anywhere else is outside: refused
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0123abcd").write_bytes(safetensors_bytes(tensors))
    (local / "model.safetensors").symlink_to(elsewhere / "0123abcd")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load(local)


def test_shard_map_disagrees_with_the_shards(tiny, tmp_path):
    key = "language_model.model.layers.0.mlp.up_proj.weight"

    def move(wm):  # listed in the other shard than the one holding it
        wm[key] = next(v for v in set(wm.values()) if v != wm[key])
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is in shard .*model-0000\d-of-00002\.safetensors but "
                                              r".*index\.json maps it to 'model-0000\d-of-00002\.safetensors'"):
        load(_sharded(tmp_path / "a", tiny, move))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is in shard .* but .*index\.json does not list it"):
        load(_sharded(tmp_path / "b", tiny, lambda wm: wm.pop(key)))
    ghost = "language_model.model.layers.0.mlp.ghost.weight"
    with pytest.raises(CheckpointError, match=rf"index\.json lists tensor '{ghost}' in .*00001-of-00002\.safetensors, "
                                              "which does not hold it"):
        load(_sharded(tmp_path / "c", tiny, lambda wm: wm.update({ghost: "model-00001-of-00002.safetensors"})))


# -------------------------------------------------------------------------------------------- config values

def _mm(**top) -> dict:
    from fixtures import hf_checkpoints as hfc

    return {"model_type": "gemma3", "text_config": hfc.text_config(), "vision_config": hfc.vision_config(),
            "mm_tokens_per_image": 4, "image_token_index": 500, "boi_token_index": 498, "eoi_token_index": 499, **top}


def _text(**kw) -> dict:
    return _mm(text_config={**_mm()["text_config"], **kw})


def _vision(**kw) -> dict:
    return _mm(vision_config={**_mm()["vision_config"], **kw})


_CONFIGS = [
    ("[1, 2]", r"config\.json: must hold a JSON object, got a list"),
    ('"gemma3"', r"config\.json: must hold a JSON object, got a string"),
    ("3", r"config\.json: must hold a JSON object, got a number"),
    ("{", r"config\.json: not valid JSON"),
    (b"{\"a\": \"\xff\"}", r"config\.json: not valid JSON"),
    (_mm(text_config=[1]), r"text_config must be a JSON object, got a list"),
    (_mm(vision_config="siglip"), r"vision_config must be a JSON object, got a string"),
    ({"model_type": "llama", "hidden_size": 64}, r"model_type='llama' is not a Gemma-3 model"),
    (_text(model_type="llama"), r"text_config\.model_type='llama' is not a Gemma-3 model"),
    (_text(num_key_value_heads=0), r"text_config\.num_key_value_heads must be a positive integer, got 0"),
    (_text(num_key_value_heads="2"), r"text_config\.num_key_value_heads must be a positive integer, got '2'"),
    (_text(num_key_value_heads=None), r"text_config\.num_key_value_heads must be a positive integer, got None"),
    (_text(num_key_value_heads=True), r"text_config\.num_key_value_heads must be a positive integer, got True"),
    (_text(num_key_value_heads=2.0), r"text_config\.num_key_value_heads must be a positive integer, got 2\.0"),
    (_text(hidden_size=0), r"text_config\.hidden_size must be a positive integer, got 0"),
    (_text(num_attention_heads=-4), r"text_config\.num_attention_heads must be a positive integer, got -4"),
    (_text(head_dim=0), r"text_config\.head_dim must be a positive integer, got 0"),
    (_text(head_dim=33), r"text_config\.head_dim must be even \(rotary embeddings rotate pairs\), got 33"),
    (_text(vocab_size=0), r"text_config\.vocab_size must be a positive integer, got 0"),
    (_text(intermediate_size=-128), r"text_config\.intermediate_size must be a positive integer, got -128"),
    (_text(num_hidden_layers=0), r"text_config\.num_hidden_layers must be a positive integer, got 0"),
    (_text(sliding_window=0), r"text_config\.sliding_window must be a positive integer, got 0"),
    (_text(max_position_embeddings=0), r"text_config\.max_position_embeddings must be a positive integer, got 0"),
    (_text(num_attention_heads=3), r"text_config\.num_attention_heads=3 is not a multiple of "
                                   r"text_config\.num_key_value_heads=2"),
    (_text(layer_types=["sliding_attention"] * 6), r"text_config\.layer_types has 6 entries but "
                                                   r"text_config\.num_hidden_layers is 7"),
    (_text(layer_types=["sliding_attention"] * 6 + ["chunked_attention"]),
     r"text_config\.layer_types has the unknown type 'chunked_attention'"),
    (_text(layer_types="sliding_attention"), r"text_config\.layer_types must be a list, got a string"),
    (_text(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 8.0}}),
     r"text_config\.rope_parameters\.full_attention\.rope_type='yarn' is not supported"),
    (_text(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": float("nan")}}),
     r"text_config\.rope_parameters\.sliding_attention\.rope_theta must be a positive finite number, got nan"),
    (_text(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": -1.0}}),
     r"full_attention\.rope_theta must be a positive finite number, got -1\.0"),
    (_text(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 0}}),
     r"full_attention\.factor must be a positive finite number, got 0"),
    (_text(rope_parameters={"full_attention": "linear"}), r"rope_parameters\.full_attention must be a JSON object"),
    (_text(rope_parameters=None, rope_theta="1e6"), r"text_config\.rope_theta must be a positive finite number, got '1e6'"),
    (_text(rope_parameters=None, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     r"text_config\.rope_scaling\.rope_type='dynamic' is not supported"),
    (_text(rope_parameters=None, rope_local_base_freq=float("inf")),
     r"text_config\.rope_local_base_freq must be a positive finite number, got inf"),
    (_text(rms_norm_eps=0), r"text_config\.rms_norm_eps must be a positive finite number, got 0"),
    (_text(rms_norm_eps=float("inf")), r"text_config\.rms_norm_eps must be a positive finite number, got inf"),
    (_text(query_pre_attn_scalar=-24), r"text_config\.query_pre_attn_scalar must be a positive finite number"),
    (_text(final_logit_softcapping=float("nan")), r"final_logit_softcapping must be a positive finite number"),
    (_text(num_hidden_layers=10**6), r"text_config\.num_hidden_layers=1000000 is beyond the bound of 1024 "
                                     r"\(real Gemma-3: 62 in the 27B\)"),
    (_text(hidden_size=10**6), r"text_config\.hidden_size=1000000 is beyond the bound of 65536"),
    (_text(vocab_size=10**9), r"text_config\.vocab_size=1000000000 is beyond the bound of 4194304"),
    (_text(intermediate_size=10**7), r"text_config\.intermediate_size=10000000 is beyond the bound of 524288"),
    (_text(max_position_embeddings=2**40), r"max_position_embeddings=1099511627776 is beyond the bound of 16777216"),
    (_text(eos_token_id=[1, 10**6]), r"text_config\.eos_token_id=1000000 is not below vocab_size=512"),
    (_text(bos_token_id=-1), r"text_config\.bos_token_id must be an integer >= 0, got -1"),
    (_text(eos_token_id=[]), r"text_config\.eos_token_id is an empty list"),
    (_text(hidden_activation="relu"), r"text_config\.hidden_activation='relu' is not supported"),
    (_text(tie_word_embeddings="yes"), r"text_config\.tie_word_embeddings must be true or false, got 'yes'"),
    (_text(attn_logit_softcapping=50.0), r"text_config\.attn_logit_softcapping=50\.0 is not supported"),
    (_vision(image_size=0), r"vision_config\.image_size must be a positive integer, got 0"),
    (_vision(patch_size=0), r"vision_config\.patch_size must be a positive integer, got 0"),
    (_vision(patch_size=5), r"vision_config\.image_size=28 is not a multiple of vision_config\.patch_size=5"),
    (_vision(num_attention_heads=5), r"vision_config\.hidden_size=48 is not a multiple of "
                                     r"vision_config\.num_attention_heads=5"),
    (_vision(image_size=10**5, patch_size=14), r"vision_config\.image_size=100000 is beyond the bound of 8192"),
    (_vision(hidden_act="relu"), r"vision_config\.hidden_act='relu' is not supported"),
    (_vision(model_type="clip_vision_model"), r"vision_config\.model_type='clip_vision_model' is not a Gemma-3 model"),
    (_mm(mm_tokens_per_image=0), r"mm_tokens_per_image must be a positive integer, got 0"),
    (_mm(mm_tokens_per_image=5), r"mm_tokens_per_image=5 is not a square"),
    (_mm(mm_tokens_per_image=9), r"patches per side 4 .* is not a multiple of tokens per side 3"),
    (_mm(boi_token_index=512), r"boi_token_index=512 is not below vocab_size=512"),
    (_mm(tie_word_embeddings=0), r"tie_word_embeddings must be true or false, got 0"),
]


@pytest.mark.parametrize("config,match", _CONFIGS, ids=[str(i) for i in range(len(_CONFIGS))])
def test_bad_config_value_is_named_with_its_file(tmp_path, config, match):
    file = tmp_path / "config.json"
    if isinstance(config, bytes):
        file.write_bytes(config)
    else:
        file.write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ConfigError, match=match) as e:
        Gemma3Config.from_pretrained(tmp_path)
    assert str(e.value).startswith(f"{file}: ") and "\n" not in str(e.value)


def test_bad_config_stops_the_load_before_the_weights(tiny, tmp_path):
    _, tensors = tiny
    path = write(tmp_path / "ckpt", json.dumps(_text(num_key_value_heads=0)), b"not read")
    with pytest.raises(CheckpointError, match=rf"^{path / 'config.json'}: text_config\.num_key_value_heads must be a "
                                              r"positive integer, got 0$"):
        load(path)
    (path / "config.json").unlink()
    (path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is not a file"):
        load(path)


def test_config_error_in_the_cli_is_one_line(tmp_path):
    path = write(tmp_path / "ckpt", json.dumps(_text(num_key_value_heads=0)))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(path), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: {path / 'config.json'}: text_config.num_key_value_heads "
                                                 "must be a positive integer, got 0")
    assert "Traceback" not in r.stderr


def test_valid_spellings_still_parse():
    """Nulls that mean "the default" where transformers writes them, and the bounds themselves, are accepted."""
    cfg = Gemma3Config.from_hf_dict(_text(head_dim=None, sliding_window=None, final_logit_softcapping=None,
                                          rope_scaling=None, pad_token_id=None, layer_types=[]))
    assert cfg.text.head_dim == 256 and cfg.text.sliding_window == 4096  # transformers' defaults and cfg.text.final_logit_softcapping is None
    assert cfg.text.layer_types[5] == "full_attention"
    assert Gemma3Config.from_hf_dict(_text(num_hidden_layers=1024, sliding_window_pattern=1024,
                                           layer_types=None)).text.num_layers == 1024


@pytest.mark.parametrize("which", ["tiny_mm", "tiny_text", "4b"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_param_bytes_match_the_model(which, dtype):
    from fixtures import hf_checkpoints as hfc

    d = {"tiny_mm": _mm(), "tiny_text": hfc.text_config(),
         "4b": {"model_type": "gemma3", "text_config": {}, "vision_config": {}}}[which]
    cfg = Gemma3Config.from_hf_dict(d)
    abstract = nnx.eval_shape(lambda: Gemma3(cfg, dtype))
    want = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(abstract)))
    assert param_bytes(cfg, dtype) == want
