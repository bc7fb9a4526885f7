"""Bad arguments to the kernels' public entry points: one case each, the exception type and the argument it names.

Every check runs before a kernel is traced (pallas_kernels/checks.py), so these cases are fast: no kernel runs.
Values (one id in two runs, lengths out of range) are checked when concrete; traced arguments still get every
shape and dtype check at trace time (the eval_shape cases).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3_jax.model.kernels import Kernels
from pallas_kernels import (
    decode_attention,
    decode_attention_reference,
    image_span_attention,
    key_intervals,
    reference_attention,
    reference_mask,
    run_ends,
    segment_ids_from_image_mask,
)
from pallas_kernels.decode_fused import decode_attention_fused
from pallas_kernels.reference import decode_attention_fused_reference

B, S, HQ, HKV, D = 1, 32, 2, 1, 32
RNG = np.random.default_rng(0)
Q = jnp.asarray(RNG.standard_normal((B, S, HQ, D)), jnp.float32)
K = jnp.asarray(RNG.standard_normal((B, S, HKV, D)), jnp.float32)
V = jnp.asarray(RNG.standard_normal((B, S, HKV, D)), jnp.float32)
TEXT = jnp.full((B, S), -1, jnp.int32)
# image 0 at [4, 10) and again at [14, 20): one id in two separate runs
TWO_RUNS = jnp.asarray(np.r_[[-1] * 4, [0] * 6, [-1] * 4, [0] * 6, [-1] * 12][None], jnp.int32)


def span(**kw):
    args = dict(q=Q, k=K, v=V, segment_ids=TEXT, interpret=True)
    args.update(kw)
    q, k, v, seg = (args.pop(n) for n in ("q", "k", "v", "segment_ids"))
    return image_span_attention(q, k, v, seg, **args)


# (call, exception, a regex the message must contain: the argument's name)
ATTENTION_CASES = {
    "float_segment_ids": (lambda: span(segment_ids=TEXT.astype(jnp.float32)), TypeError, r"segment_ids.*float32"),
    "bool_segment_ids": (lambda: span(segment_ids=TEXT > 0), TypeError, r"segment_ids.*bool"),
    "float_kv_lengths": (lambda: span(kv_lengths=jnp.asarray([3.0])), TypeError, r"kv_lengths.*float32"),
    "python_float_kv_lengths": (lambda: span(kv_lengths=[3.5]), TypeError, r"kv_lengths.*float"),
    "segment_ids_shape": (lambda: span(segment_ids=TEXT[:, :10]), ValueError, r"segment_ids.*\(1, 10\)"),
    "kv_lengths_shape": (lambda: span(kv_lengths=jnp.asarray([3, 4])), ValueError, r"kv_lengths.*\(2,\)"),
    "kv_lengths_above_keys": (lambda: span(kv_lengths=jnp.asarray([S + 1])), ValueError, r"kv_lengths.*\[0, 32\]"),
    "kv_lengths_negative": (lambda: span(kv_lengths=jnp.asarray([-1])), ValueError, r"kv_lengths.*-1"),
    "id_in_two_runs": (lambda: span(segment_ids=TWO_RUNS), ValueError, r"segment_ids: id 0 .*\[4, 10\).*\[14, 20\)"),
    "batch_mismatch": (lambda: span(k=jnp.concatenate([K, K]), v=jnp.concatenate([V, V])), ValueError, r"batch"),
    "heads_not_multiple": (lambda: span(q=Q[:, :, :1].repeat(3, 2), k=K.repeat(2, 2), v=V.repeat(2, 2)),
                           ValueError, r"heads"),
    "head_dims_differ": (lambda: span(k=K[..., :16], v=V[..., :16]), ValueError, r"head dim"),
    "k_v_shapes_differ": (lambda: span(v=V[:, :16]), ValueError, r"k and v shapes"),
    "q_longer_than_k": (lambda: span(q=jnp.concatenate([Q, Q], 1)), ValueError, r"Sq <= Sk.*q\.shape"),
    "q_rank": (lambda: span(q=Q[0]), ValueError, r"q must have rank 4.*q\.shape"),
    "k_not_an_array": (lambda: span(k=np.asarray(K).tolist()), TypeError, r"\bk must be an array"),
    "dtypes_differ": (lambda: span(k=K.astype(jnp.bfloat16)), ValueError, r"dtypes must match.*k\.dtype"),
    "int_q": (lambda: span(q=Q.astype(jnp.int32), k=K.astype(jnp.int32), v=V.astype(jnp.int32)),
              ValueError, r"q must be bf16/fp16/fp32"),
    "sliding_window_zero": (lambda: span(sliding_window=0), ValueError, r"sliding_window.*0"),
    "sliding_window_float": (lambda: span(sliding_window=2.5), TypeError, r"sliding_window.*2\.5"),
    "sliding_window_str": (lambda: span(sliding_window="8"), TypeError, r"sliding_window.*'8'"),
    "block_q_not_pow2": (lambda: span(block_q=24), ValueError, r"block_q.*power of two.*24"),
    "block_k_too_small": (lambda: span(block_k=8), ValueError, r"block_k.*>= 16.*8"),
    "block_q_float": (lambda: span(block_q=32.0), TypeError, r"block_q.*float"),
    "scale_negative": (lambda: span(scale=-1.0), ValueError, r"scale.*-1"),
    "scale_nan": (lambda: span(scale=float("nan")), ValueError, r"scale.*nan"),
    "causal_str": (lambda: span(causal="yes"), TypeError, r"causal.*'yes'"),
    "num_warps_zero": (lambda: span(num_warps=0), ValueError, r"num_warps"),
    "unknown_implementation": (lambda: Kernels.resolve("flash"), ValueError, r"attention must be one of auto, pallas, reference"),
    "unknown_kernels_field": (lambda: Kernels(prefill="flash"), ValueError, r"Kernels.prefill must be one of pallas, reference"),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_args(case):
    call, exc, names = ATTENTION_CASES[case]
    with pytest.raises(exc, match=names):
        call()


def test_reference_attention_takes_an_id_in_two_runs_as_one_image():
    """The oracle compares ids (transformers' rule), so its own semantics for one id in two runs are defined: the
    first run's queries see the second run. The kernels refuse such ids instead of silently disagreeing."""
    mask = np.asarray(reference_mask(TWO_RUNS))[0]
    assert mask[4, 19] and not mask[4, 12]  # run 1 sees run 2 (future), not the text in between
    out = reference_attention(Q, K, V, TWO_RUNS)
    assert out.shape == Q.shape and np.all(np.isfinite(np.asarray(out)))


def test_traced_arguments_get_the_trace_time_checks():
    """Under a trace the values are unknown, so a traced id in two runs is the caller's contract (documented), but
    dtypes and shapes are still checked when the kernel is traced, and valid traced arguments pass."""
    sds = jax.ShapeDtypeStruct
    ok = jax.eval_shape(lambda s, n: span(segment_ids=s, kv_lengths=n), sds((B, S), jnp.int32), sds((B,), jnp.int32))
    assert ok.shape == Q.shape
    with pytest.raises(TypeError, match=r"segment_ids.*float32"):
        jax.eval_shape(lambda s: span(segment_ids=s), sds((B, S), jnp.float32))
    with pytest.raises(TypeError, match=r"kv_lengths.*float32"):
        jax.eval_shape(lambda n: span(kv_lengths=n), sds((B,), jnp.float32))


# decode: q [B, N, H], k/v [B, S, K, H]
DQ = jnp.ones((2, 4, 32), jnp.float32)
DK = jnp.ones((2, 20, 2, 32), jnp.float32)
LENGTHS = jnp.asarray([20, 7], jnp.int32)


def dec(fn=decode_attention, lengths=LENGTHS, **kw):
    kw = {"scale": 0.125, **kw}
    if fn is decode_attention:
        kw.setdefault("interpret", True)
    return fn(DQ, DK, DK, lengths, **kw)


DECODE_CASES = {
    "float_lengths": (lambda: dec(lengths=LENGTHS.astype(jnp.float32)), TypeError, r"lengths.*float32"),
    "float_lengths_reference": (lambda: dec(decode_attention_reference, lengths=LENGTHS.astype(jnp.float32)),
                                TypeError, r"lengths.*float32"),
    "float_pos_boundary": (lambda: Kernels.resolve("pallas").cached_attention(DQ, DK, DK, LENGTHS.astype(jnp.float32),
                                                                              scale=0.1), TypeError, r"lengths"),
    "lengths_above_slots": (lambda: dec(lengths=jnp.asarray([21, 3])), ValueError, r"lengths.*\[0, 20\]"),
    "lengths_negative": (lambda: dec(lengths=jnp.asarray([2, -3])), ValueError, r"lengths.*-3"),
    "lengths_shape": (lambda: dec(lengths=jnp.asarray([2, 3, 4])), ValueError, r"lengths.*\(3,\)"),
    "scale_zero": (lambda: dec(scale=0.0), ValueError, r"scale.*0"),
    "scale_array": (lambda: dec(scale=jnp.asarray(0.1)), TypeError, r"scale"),
    "block_k_small": (lambda: dec(block_k=8), ValueError, r"block_k.*8"),
    "num_splits_zero": (lambda: dec(num_splits=0), ValueError, r"num_splits.*0"),
    "interpret_str": (lambda: dec(interpret="no"), TypeError, r"interpret"),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_args(case):
    call, exc, names = DECODE_CASES[case]
    with pytest.raises(exc, match=names):
        call()


def fused_inputs(**change):
    b, kh, g, h, s = 2, 2, 2, 32, 16
    x = dict(qkv=jnp.ones((b, kh * g + 2 * kh, h)), q_norm=jnp.zeros(h), k_norm=jnp.zeros(h), cos=jnp.ones((b, h)),
             sin=jnp.zeros((b, h)), k_cache=jnp.zeros((b, s, kh, h)), v_cache=jnp.zeros((b, s, kh, h)),
             pos=jnp.asarray([1, 2], jnp.int32))
    x.update(change)
    return x


def fused(fn=decode_attention_fused, ring=False, scale=0.1, eps=1e-6, **change):
    kw = dict(interpret=True) if fn is decode_attention_fused else {}
    return fn(**fused_inputs(**change), ring=ring, scale=scale, eps=eps, **kw)


FUSED_CASES = {
    "float_pos": (lambda: fused(pos=jnp.asarray([1.0, 2.0])), TypeError, r"pos.*float32"),
    "float_pos_reference": (lambda: fused(decode_attention_fused_reference, pos=jnp.asarray([1.0, 2.0])),
                            TypeError, r"pos.*float32"),
    "pos_past_global_cache": (lambda: fused(pos=jnp.asarray([1, 16])), ValueError, r"pos.*\[0, 16\).*16"),
    "pos_negative_ring": (lambda: fused(ring=True, pos=jnp.asarray([-1, 3])), ValueError, r"pos.*-1"),
    "int_q_norm": (lambda: fused(q_norm=jnp.zeros(32, jnp.int32)), TypeError, r"q_norm.*int32"),
    "cos_shape": (lambda: fused(cos=jnp.ones((2, 16))), ValueError, r"cos.*\(2, 16\)"),
    "ring_str": (lambda: fused(ring="yes"), TypeError, r"ring.*'yes'"),
    "eps_zero": (lambda: fused(eps=0.0), ValueError, r"eps.*0"),
    "cache_dtype": (lambda: fused(k_cache=jnp.zeros((2, 16, 2, 32), jnp.bfloat16),
                                  v_cache=jnp.zeros((2, 16, 2, 32), jnp.bfloat16)), ValueError, r"k_cache\.dtype"),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_decode_args(case):
    call, exc, names = FUSED_CASES[case]
    with pytest.raises(exc, match=names):
        call()


SEGMENT_CASES = {
    "key_intervals_float_ids": (lambda: key_intervals(TEXT.astype(jnp.float32)), TypeError, r"segment_ids.*float"),
    "key_intervals_id_in_two_runs": (lambda: key_intervals(TWO_RUNS), ValueError, r"segment_ids: id 0 in row 0"),
    "key_intervals_float_kv_lengths": (lambda: key_intervals(TEXT, kv_lengths=jnp.asarray([2.0])), TypeError,
                                       r"kv_lengths.*float32"),
    "key_intervals_kv_lengths_range": (lambda: key_intervals(TEXT, kv_lengths=jnp.asarray([S + 5])), ValueError,
                                       r"kv_lengths.*\[0, 32\]"),
    "key_intervals_q_len": (lambda: key_intervals(TEXT, q_len=0), ValueError, r"q_len.*0"),
    "key_intervals_window": (lambda: key_intervals(TEXT, sliding_window=-3), ValueError, r"sliding_window.*-3"),
    "key_intervals_rank": (lambda: key_intervals(TEXT[0]), ValueError, r"segment_ids.*\(32,\)"),
    "run_ends_float_ids": (lambda: run_ends(TEXT.astype(jnp.float16)), TypeError, r"segment_ids.*float16"),
    "mask_float": (lambda: segment_ids_from_image_mask(jnp.zeros((1, 8), jnp.float32)), TypeError, r"is_image"),
    "mask_rank": (lambda: segment_ids_from_image_mask(jnp.zeros((8,), bool)), ValueError, r"is_image.*\(8,\)"),
    "reference_mask_float_ids": (lambda: reference_mask(TEXT.astype(jnp.float32)), TypeError, r"segment_ids"),
    "reference_float_kv_lengths": (lambda: reference_attention(Q, K, V, kv_lengths=jnp.asarray([3.0])),
                                   TypeError, r"kv_lengths.*float32"),
    "reference_float_ids": (lambda: reference_attention(Q, K, V, TEXT.astype(jnp.float32)), TypeError,
                            r"segment_ids.*float32"),
}


@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segment_helper_args(case):
    call, exc, names = SEGMENT_CASES[case]
    with pytest.raises(exc, match=names):
        call()


def test_ids_from_the_mask_are_accepted():
    """The ids transformers and segment_ids_from_image_mask build (one run per id) pass the contiguity check, also
    when two images touch (a new run starts a new id)."""
    is_image = jnp.asarray([[0, 1, 1, 0, 1, 1, 1, 0]], bool)
    seg = segment_ids_from_image_mask(is_image)
    assert np.asarray(seg).tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1]]
    ks, ke = key_intervals(seg, kv_lengths=jnp.asarray([8]))
    assert np.asarray(ke).tolist() == [[1, 3, 3, 4, 7, 7, 7, 8]]
    assert np.asarray(key_intervals(jnp.asarray([[0, 0, 1, 1]]))[1]).tolist() == [[2, 2, 4, 4]]  # adjacent images


def test_values_that_would_overflow_or_be_empty():
    """A window of 2^31 overflowed inside jit, empty batches failed inside the interpreter, and int64 ids past
    int32 wrapped into another id: each is one ValueError naming the argument."""
    import numpy as np

    import pallas_kernels as pk

    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="sliding_window must be < 2\\^31"):
        pk.image_span_attention(q, q, q, sliding_window=2**31, interpret=True)
    with pytest.raises(ValueError, match="sliding_window must be < 2\\^31"):
        pk.reference_mask(jnp.zeros((1, 8), jnp.int32), sliding_window=2**40)
    with pytest.raises(ValueError, match="q has an empty batch, head or head dim"):
        pk.image_span_attention(jnp.zeros((0, 8, 2, 16)), q[:0], q[:0], interpret=True)
    with pytest.raises(ValueError, match="q has an empty batch, head or head dim"):
        pk.image_span_attention(jnp.zeros((1, 8, 0, 16)), q, q, interpret=True)
    ids = np.zeros((1, 8), np.int64)
    ids[0, 4:] = 2**32
    with pytest.raises(ValueError, match="segment_ids must fit in int32"):
        pk.image_span_attention(q, q, q, ids, interpret=True)
