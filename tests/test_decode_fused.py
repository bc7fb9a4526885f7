"""The fused decode-attention kernel (q/k norms, RoPE, cache write, attention) against its jnp composition,
in interpret mode on CPU (compiled on a GPU): ring and global buffers, before and after a ring wraps, GQA,
float32 and bf16; and the model's fused decode step against its unfused reference path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_norm as rel

import gemma3_jax
from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.kernels import Kernels, with_kernels
from pallas_kernels.decode_fused import decode_attention_fused
from pallas_kernels.reference import decode_attention_fused_reference

INTERPRET = jax.default_backend() != "gpu"


def inputs(seed, b, kh, g, h, s, pos, dtype):
    rng = np.random.default_rng(seed)
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    pos = jnp.asarray(pos, jnp.int32)
    angles = pos[:, None].astype(jnp.float32) * jnp.linspace(0.0, 1.0, h)[None]
    return dict(qkv=mk(b, kh * g + 2 * kh, h), q_norm=mk(h) * 0.2, k_norm=mk(h) * 0.2,
                cos=jnp.cos(angles).astype(dtype), sin=jnp.sin(angles).astype(dtype),
                k_cache=mk(b, s, kh, h), v_cache=mk(b, s, kh, h), pos=pos)


@pytest.mark.parametrize(
    "kh,g,h,s,ring,pos,dtype,block_k,splits",
    [
        (2, 2, 32, 40, False, [0, 5, 39], jnp.float32, 16, None),  # first token, S % block_k != 0
        (1, 4, 64, 24, True, [0, 23, 24, 50], jnp.float32, 16, None),  # ring before, at and after wrapping
        (2, 1, 32, 8, True, [3, 8, 9], jnp.float32, None, None),  # ring smaller than a block (padded)
        (4, 2, 64, 70, False, [69, 1, 33, 20], jnp.bfloat16, 16, 3),
        (1, 8, 256, 48, True, [47, 48, 100], jnp.bfloat16, None, 1),  # 4B-like heads, one split
        (2, 2, 128, 64, False, [10, 63], jnp.float16, 32, 64),  # more splits than blocks: clamped
    ],
)
def test_matches_composition(kh, g, h, s, ring, pos, dtype, block_k, splits):
    x = inputs(0, len(pos), kh, g, h, s, pos, dtype)
    kw = dict(ring=ring, scale=h**-0.5, eps=1e-6)
    out, k2, v2 = decode_attention_fused(**x, **kw, interpret=INTERPRET, block_k=block_k, num_splits=splits)
    ref, kr, vr = decode_attention_fused_reference(**x, **kw)
    assert out.shape == (len(pos), kh * g, h) and out.dtype == dtype
    assert rel(out, ref) <= (1e-5 if dtype == jnp.float32 else 1e-2)
    np.testing.assert_array_equal(np.asarray(v2, np.float32), np.asarray(vr, np.float32))
    if dtype == jnp.float32:
        # the new token lands in its slot with the reference's roundings; nothing else in the buffers changes
        np.testing.assert_allclose(np.asarray(k2, np.float32), np.asarray(kr, np.float32), rtol=1e-5, atol=1e-6)
    else:
        assert_both_near_float32(x, kw, ring, (out, k2), (ref, kr))


# Bounds of a 16-bit path against the same step in float32, in units of the dtype's eps (2^-10 fp16, 2^-7 bf16).
# New k: four roundings of eps/2 (norm, x*cos, x*sin, their sum), each of a value at most sqrt(2) * max|k| since
# RoPE rotates pairs, so < 2.9 eps * max|k|; allow 3.
K_EPS = 3.0
# Output, norm-wise: q and k (within 3 eps) move logits of order 1 by about that much, p and the output are
# rounded once more (eps/2 each); these independent per-element errors average to well under 2 eps in the norm.
OUT_EPS = 2.0


def assert_both_near_float32(x, kw, ring, fused, composed):
    """The fused kernel and the jnp composition each within an eps-derived bound of the float32 step, so the test
    holds whether or not the CPU rounds 16-bit arithmetic natively (the two paths may differ by an ulp there)."""
    dtype = x["qkv"].dtype
    eps = float(jnp.finfo(dtype).eps)
    x32 = {k: v.astype(jnp.float32) if k != "pos" else v for k, v in x.items()}
    out32, k32, _ = decode_attention_fused_reference(**x32, **kw)
    s = x["k_cache"].shape[1]
    rows = np.arange(len(x["pos"]))
    slot = np.asarray(x["pos"]) % s if ring else np.asarray(x["pos"])
    written = np.zeros(x["k_cache"].shape[:2], bool)
    written[rows[slot < s], slot[slot < s]] = True
    new32 = np.asarray(k32, np.float64)[written]
    for name, (out, k2) in (("fused", fused), ("composed", composed)):
        err = rel(out, out32)
        assert err <= OUT_EPS * eps, f"{name}: output {err / eps:.2f} eps from float32"
        k2 = np.asarray(k2.astype(jnp.float32), np.float64)
        np.testing.assert_array_equal(k2[~written], np.asarray(x["k_cache"].astype(jnp.float32))[~written])
        k_err = np.abs(k2[written] - new32).max() / np.abs(new32).max()
        assert k_err <= K_EPS * eps, f"{name}: new k {k_err / eps:.2f} eps (of max|k|) from float32"


def test_new_token_alone_is_its_value():
    """At position 0 the only key is the token itself: the output is v, whatever q and k are."""
    x = inputs(1, 2, 2, 2, 32, 16, [0, 0], jnp.float32)
    out, _, _ = decode_attention_fused(**x, ring=False, scale=0.1, eps=1e-6, interpret=INTERPRET)
    v = x["qkv"][:, 6:]  # [B, K, H]: rows after 4 q heads and 2 k heads
    np.testing.assert_allclose(np.asarray(out), np.repeat(np.asarray(v), 2, axis=1), rtol=1e-6)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(qkv=jnp.zeros((2, 7, 32))), "N query heads"),
        (dict(q_norm=jnp.zeros((16,))), "q_norm must have shape"),
        (dict(cos=jnp.zeros((2, 16))), "cos must have shape"),
        (dict(pos=jnp.zeros((3,), jnp.int32)), "pos must have shape"),
    ],
)
def test_bad_inputs_name_the_value(change, match):
    x = inputs(2, 2, 2, 2, 32, 16, [1, 2], jnp.float32)
    x.update(change)
    with pytest.raises(ValueError, match=match):
        decode_attention_fused(**x, ring=False, scale=0.1, eps=1e-6, interpret=True)


def test_head_dim_72_is_not_fused():
    x = inputs(3, 1, 1, 2, 64, 16, [1], jnp.float32)
    x["qkv"] = jnp.zeros((1, 4, 72))
    x["k_cache"] = x["v_cache"] = jnp.zeros((1, 16, 1, 72))
    with pytest.raises(ValueError, match="power-of-two head dims"):
        decode_attention_fused(**x, ring=False, scale=0.1, eps=1e-6, interpret=True)
    pallas = Kernels.resolve("pallas")
    assert not pallas.fused_step(72) and pallas.fused_step(256)


@pytest.mark.parametrize("b,impl", [(2, "pallas"), (1, "pallas")])
def test_model_decode_fused_equals_reference(tiny_mm, b, impl):
    """The model's decode step through the fused kernel equals its unfused jnp path (float32), ring wrapped.
    At batch 1 with "pallas" the MLP runs through the matrix-vector kernels and residual_norm adds down's
    partial sums (the GPU's batch-1 path)."""
    model = gemma3_jax.load_pretrained(tiny_mm[0], dtype=jnp.float32, progress=False)
    cfg = model.cfg.text
    rng = np.random.default_rng(4)
    length = 3 * cfg.sliding_window + 5
    cache = kvc.init_cache(cfg, b, length + 4, model.dtype)
    tokens = jnp.asarray(rng.integers(5, 50, (b, length)), jnp.int32)
    caches = {impl: cache, "reference": cache}
    texts = {name: with_kernels(model.text, name) for name in caches}
    steps = {name: jax.jit(lambda c, t, m=texts[name]: m.decode_step(m.embed_tokens(t[:, None]), c)) for name in caches}
    jaxpr = str(jax.make_jaxpr(steps[impl])(cache, tokens[:, 0]))
    assert ("gemv_geglu" in jaxpr) == (b == 1)  # the path under test is the one that ran
    worst = 0.0
    for i in range(length):
        outs = {}
        for impl in caches:
            outs[impl], caches[impl] = steps[impl](caches[impl], tokens[:, i])
        worst = max(worst, rel(outs[impl], outs["reference"]))
    assert worst <= 1e-5, worst
    with pytest.raises(ValueError, match="attention must be one of auto, pallas, reference, got 'xla'"):
        with_kernels(model.text, "xla")
    for a, r in zip(caches[impl].k + caches[impl].v, caches["reference"].k + caches["reference"].v):
        assert rel(a, r) <= 1e-5


def test_auto_decode_is_xla_off_the_gpu(tiny_mm):
    """ "auto" decode runs no (interpreted) Pallas kernel on a CPU; "pallas" does. The kernels stay covered by the
    "pallas" cases above."""
    model = gemma3_jax.load_pretrained(tiny_mm[0], dtype=jnp.float32, progress=False)
    cache = kvc.init_cache(model.cfg.text, 1, 16, model.dtype)
    tok = jnp.zeros((1,), jnp.int32)

    def jaxpr(attention):
        text = with_kernels(model.text, attention)
        return str(jax.make_jaxpr(lambda c, t: text.decode_step(text.embed_tokens(t[:, None]), c))(cache, tok))

    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU auto is the Pallas path")
    assert "pallas_call" not in jaxpr("auto")
    assert "pallas_call" in jaxpr("pallas")
