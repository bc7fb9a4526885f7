"""Per-component parity with transformers' modules (same checkpoint, float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

import gemma3_jax
from gemma3_jax.model.config import GLOBAL, SLIDING
from gemma3_jax.model.layers import GeGLU, apply_rope, gelu_tanh, rope_cos_sin
from gemma3_jax.model.kernels import AttentionBatch, Kernels, with_kernels
from pallas_kernels import reference_mask, segment_ids_from_image_mask

TIGHT = 1e-5


@pytest.fixture(scope="module")
def pair(tiny_mm):
    path, hf = tiny_mm
    return gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False), hf.model


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _t(a):
    return torch.tensor(np.asarray(a))


def test_rmsnorm(pair):
    ours, hf = pair
    x = _x(2, 5, 64)
    for i in (0, 5):
        got = ours.text.layers[i].pre_ffw_norm(jnp.asarray(x))
        want = hf.language_model.layers[i].pre_feedforward_layernorm(_t(x)).detach()
        assert rel_err(got, want) < TIGHT
    got = ours.text.layers[2].attn.q_norm(jnp.asarray(_x(2, 5, 4, 32)))
    want = hf.language_model.layers[2].self_attn.q_norm(_t(_x(2, 5, 4, 32))).detach()
    assert rel_err(got, want) < TIGHT


@pytest.mark.parametrize("layer_type", [SLIDING, GLOBAL])
def test_rope(pair, layer_type):
    ours, hf = pair
    cfg = ours.cfg.text
    pos = np.array([[0, 1, 2, 7, 100, 400]])
    cos, sin = hf.language_model.rotary_emb(torch.zeros(1), _t(pos), layer_type)
    rope = cfg.rope_local if layer_type == SLIDING else cfg.rope_global
    c, s = rope_cos_sin(jnp.asarray(pos), cfg.head_dim, rope, jnp.float32)
    assert rel_err(c, cos) < TIGHT and rel_err(s, sin) < TIGHT
    q = _x(1, 6, 4, 32)
    want, _ = apply_rotary_pos_emb(_t(q).transpose(1, 2), _t(q).transpose(1, 2), cos, sin)
    got = apply_rope(jnp.asarray(q), c, s)
    assert rel_err(got, want.transpose(1, 2)) < TIGHT


@pytest.mark.parametrize("layer", [0, 5])  # sliding (window 8) and global
def test_attention_layer(pair, layer):
    ours, hf = pair
    cfg = ours.cfg.text
    b, length = 2, 20
    x = _x(b, length, cfg.hidden_size, seed=layer)
    is_image = np.zeros((b, length), bool)
    is_image[0, 3:9] = True
    is_image[1, 12:16] = True
    seg = segment_ids_from_image_mask(jnp.asarray(is_image))
    window = cfg.sliding_window if cfg.is_sliding(layer) else None
    mask = np.asarray(reference_mask(seg, sliding_window=window))  # the test may build [S, S]
    additive = torch.where(_t(mask)[:, None], 0.0, torch.finfo(torch.float32).min)
    pos = np.broadcast_to(np.arange(length), (b, length))
    layer_type = cfg.layer_types[layer]
    cos, sin = hf.language_model.rotary_emb(torch.zeros(1), _t(pos), layer_type)
    hf_attn = hf.language_model.layers[layer].self_attn
    want, _ = hf_attn(_t(x), position_embeddings=(cos, sin), attention_mask=additive)
    c, s = ours.text.rope_tables(jnp.asarray(pos))[layer_type]
    attn = with_kernels(ours.text.layers[layer].attn, "reference")
    got, _ = attn(jnp.asarray(x), c, s, AttentionBatch(jnp.asarray(pos), seg, None))
    assert rel_err(got, want.detach()) < TIGHT


def test_mlp(pair):
    ours, hf = pair
    x = _x(2, 7, 64)
    got = ours.text.layers[3].mlp(jnp.asarray(x))
    want = hf.language_model.layers[3].mlp(_t(x)).detach()
    assert rel_err(got, want) < TIGHT


def test_vision_tower_and_projector(pair):
    ours, hf = pair
    px = _x(3, 3, 28, 28, seed=4)
    want = hf.vision_tower(pixel_values=_t(px)).last_hidden_state.detach()
    got = with_kernels(ours.vision, "reference")(jnp.asarray(px))
    assert got.shape == tuple(want.shape) == (3, 16, 48)
    assert rel_err(got, want) < TIGHT
    feats = _x(3, 16, 48, seed=5)
    want = hf.multi_modal_projector(_t(feats)).detach()
    got = ours.projector(jnp.asarray(feats))
    assert got.shape == tuple(want.shape) == (3, 4, 64)
    assert rel_err(got, want) < TIGHT


def test_embedding_scale_rounds_in_weight_dtype():
    """sqrt(hidden) is rounded in the weight dtype as transformers does: 55.4256 -> 55.5 in bfloat16."""
    cfg = gemma3_jax.TextConfig(hidden_size=3072, layer_types=("full_attention",), num_layers=1,
                                vocab_size=4, intermediate_size=8, num_heads=1, num_kv_heads=1, head_dim=8)
    from gemma3_jax.model.text import TextModel

    model = TextModel(cfg, jnp.bfloat16, Kernels.resolve())
    model.embed.set_value(jnp.ones((4, 3072), jnp.bfloat16))
    assert float(model.embed_tokens(jnp.array([[1]]))[0, 0, 0]) == 55.5


def test_bf16_mlp_rounds_like_transformers(pair):
    """In bf16 the MLP rounds where transformers does: gelu in float32, rounded once (torch's rule for bf16
    inputs), then the product with up. Only accumulation order may differ, so nearly every output is the same
    bf16 number (evaluating gelu op by op in bf16 made about half of them differ)."""
    import copy

    from gemma3_jax.model.gemma3 import NUMERICS_OPTIONS

    ours, hf = pair
    mlp = hf.language_model.layers[3].mlp
    hf_bf16 = copy.deepcopy(mlp).to(torch.bfloat16)
    x = torch.tensor(_x(2, 64, 64, seed=7)).bfloat16()
    want = hf_bf16(x).detach().float().numpy()
    f32_mlp = ours.text.layers[3].mlp
    ours_mlp = GeGLU(f32_mlp.down.shape[0], f32_mlp.hidden, jnp.bfloat16)  # the module itself, in bf16
    for name in ("gate_up", "down"):
        getattr(ours_mlp, name).set_value(getattr(f32_mlp, name)[...].astype(jnp.bfloat16))
    run = jax.jit(lambda x: ours_mlp(x), compiler_options=NUMERICS_OPTIONS)
    got = np.asarray(run(jnp.asarray(x.float().numpy(), jnp.bfloat16)).astype(jnp.float32))
    differ = float(np.mean(got != want))
    assert differ < 0.02, f"{differ=:.3f} of bf16 MLP outputs differ from transformers"
    # gelu alone: the same bf16 number wherever it is not vanishing (in the far negative tail XLA's f32 gelu
    # cancels to 0 where torch's leaves ~1e-7)
    g = torch.tensor(_x(4096, seed=8) * 3).bfloat16()
    want_g = torch.nn.functional.gelu(g, approximate="tanh").float().numpy()
    got_g = np.asarray(jax.jit(gelu_tanh)(jnp.asarray(g.float().numpy(), jnp.bfloat16)).astype(jnp.float32))
    big = np.abs(want_g) > 1e-2
    assert big.mean() > 0.5 and np.mean(got_g[big] != want_g[big]) < 0.005
