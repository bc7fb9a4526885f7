"""Checkpoint layouts, sharding, config spellings, and loud failures on bad checkpoints."""

import json

from fixtures import hf_checkpoints as hfc
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.hf_checkpoints import multimodal_batch

import gemma3_jax
from gemma3_jax import CheckpointError, Gemma3Config
from gemma3_jax.model.config import GLOBAL, SLIDING


@pytest.fixture(scope="module")
def base(tiny_mm):
    path, _ = tiny_mm
    ids, px, mask = multimodal_batch()
    ref = np.asarray(gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)(ids, px, mask))
    return path, (ids, px, mask), ref


@pytest.mark.parametrize("layout,shards", [("v5", 1), ("legacy", 1), ("v5", 3)])
def test_layouts_and_shards_load_the_same_weights(base, tmp_path, layout, shards):
    path, inputs, ref = base
    hfc.rewrite_layout(path, tmp_path, layout, shards=shards)
    if shards > 1:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    got = np.asarray(gemma3_jax.load_pretrained(tmp_path, dtype=jnp.float32, progress=False)(*inputs))
    np.testing.assert_array_equal(got, ref)


def test_bfloat16_weights(base):
    path, inputs, ref = base
    model = gemma3_jax.load_pretrained(path, dtype=jnp.bfloat16, progress=False)
    assert model.text.embed[...].dtype == jnp.bfloat16
    got = np.asarray(model(*inputs), np.float32)
    valid = inputs[2].astype(bool)
    assert np.isfinite(got).all()
    assert np.abs(got - ref)[valid].max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize(
    "damage,match",
    [
        (dict(drop="model.language_model.layers.3.self_attn.k_proj.weight"), r"missing.*layers\.3\.self_attn\.k_proj"),
        # pieces of the fused q|k|v and gate|up weights are named one by one
        (dict(drop="model.language_model.layers.1.mlp.up_proj.weight"), r"missing[^,]*layers\.1\.mlp\.up_proj\.weight$"),
        (dict(reshape="model.language_model.layers.0.self_attn.v_proj.weight"), r"layers\.0\.self_attn\.v_proj\.weight.*shape"),
        (dict(reshape="model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"), r"encoder\.layers\.1\.mlp\.fc1\.weight.*shape"),
        # SigLIP's fused, head-padded q|k|v (weights and biases) and its padded output projection
        (dict(drop="model.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.bias"),
         r"missing[^,]*encoder\.layers\.0\.self_attn\.k_proj\.bias$"),
        (dict(reshape="model.vision_tower.vision_model.encoder.layers.1.self_attn.v_proj.weight"),
         r"encoder\.layers\.1\.self_attn\.v_proj\.weight.*shape"),
        (dict(reshape="model.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.bias"),
         r"encoder\.layers\.1\.self_attn\.q_proj\.bias.*shape \[47\], expected \[48\]"),
        (dict(reshape="model.vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight"),
         r"encoder\.layers\.0\.self_attn\.out_proj\.weight.*shape \[48, 47\], expected \[48, 48\]"),
        (dict(extra="model.language_model.layers.0.self_attn.rotary.weight"), r"unexpected tensor.*rotary"),
        (dict(extra="model.language_model.layers.9.input_layernorm.weight"), r"unexpected tensor.*layers\.9"),
    ],
)
def test_bad_checkpoint_fails_with_one_clear_error(base, tmp_path, damage, match):
    path, _, _ = base
    hfc.rewrite_layout(path, tmp_path, "v5", **damage)
    with pytest.raises(CheckpointError, match=match):
        gemma3_jax.load_pretrained(tmp_path, dtype=jnp.float32, progress=False)


def test_missing_files(base, tmp_path):
    path, _, _ = base
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gemma3_jax.load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gemma3_jax.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        gemma3_jax.load_pretrained(tmp_path)
    hfc.rewrite_layout(path, tmp_path, "v5", shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        gemma3_jax.load_pretrained(tmp_path)


def test_float16_is_refused(base):
    with pytest.raises(ValueError, match="float16"):
        gemma3_jax.load_pretrained(base[0], dtype=jnp.float16)


def test_config_v4_and_v5_spellings_agree():
    v5 = hfc.text_config()
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
              rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window_pattern=6)
    v5 = dict(v5, layer_types=[SLIDING] * 5 + [GLOBAL, SLIDING])
    a = Gemma3Config.from_hf_dict({"model_type": "gemma3", "text_config": v5, "vision_config": hfc.vision_config(), "mm_tokens_per_image": 4})
    b = Gemma3Config.from_hf_dict({"model_type": "gemma3", "text_config": v4, "vision_config": hfc.vision_config(), "mm_tokens_per_image": 4,
                                   "image_token_index": 262144})
    assert a.text == b.text
    assert a.text.rope_global.factor == 4.0 and a.text.rope_local.theta == 10_000.0
    assert a.text.layer_types[5] == GLOBAL and a.text.is_sliding(6)
    text_only = Gemma3Config.from_hf_dict(json.loads(json.dumps(v4)))
    assert text_only.vision is None and text_only.text == a.text


def test_bad_inputs_fail_loudly(base):
    path, (ids, px, mask), _ = base
    model = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, px[:-1], mask)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, None, mask)
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, px, mask[:, ::-1])
    with pytest.raises(ValueError, match="out of range"):
        model(ids + 1000, px, mask)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(ids, px[:, :, :14], mask)
