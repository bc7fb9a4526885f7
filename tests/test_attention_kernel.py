"""CPU tests of the Pallas image-span attention kernel (interpret mode) against reference_attention.

Shapes are small and most cases pass block sizes explicitly so interpret mode stays fast; segment ids and
kv_lengths are traced, so a sweep of layouts at one shape compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_norm as rel
from pallas_kernels import image_span_attention, reference_attention, segment_ids_from_image_mask
from pallas_kernels.attention import head_chunks

F32_TOL, LOWP_TOL = 1e-5, 1e-2


def qkv(seed, b, sq, sk, hq, hkv, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s) * 1.5, jnp.float32).astype(dtype)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d)


def random_layout(rng, s: int) -> np.ndarray:
    """Image-token mask of one row: random spans of text and images (spans of 1..70 tokens, some images
    separated by a single text token, sometimes an image at position 0 and/or one that runs to the end)."""
    is_img = np.zeros(s, bool)
    pos = 0 if rng.random() < 0.5 else int(rng.choice([1, 2, 9, 40]))
    while pos < s:
        n = int(rng.choice([1, 3, 16, 17, 31, 33, 47, 70]))
        is_img[pos : pos + n] = True
        pos += n + int(rng.choice([1, 1, 2, 5, 23, 60]))
    if rng.random() < 0.5:
        is_img[s - int(rng.choice([1, 7, 30])) :] = True
    return is_img


FIXED_LAYOUTS = [
    lambda s: np.r_[np.ones(40, bool), np.zeros(s - 40, bool)],  # image at 0
    lambda s: np.r_[np.zeros(s - 50, bool), np.ones(50, bool)],  # image at the end
    lambda s: np.r_[np.zeros(10, bool), np.ones(20, bool), [False], np.ones(20, bool), [False],
                    np.ones(s - 52, bool)],  # adjacent images split by one text token; long last image
    lambda s: (np.arange(s) // 33) % 2 == 1,  # spans crossing 16/32-blocks
    lambda s: np.zeros(s, bool),  # text only
    lambda s: np.ones(s, bool),  # one image over everything
]


def layouts(seed, b, s, n_random):
    rng = np.random.default_rng(seed)
    rows = [f(s) for f in FIXED_LAYOUTS] + [random_layout(rng, s) for _ in range(n_random)]
    while len(rows) % b:
        rows.append(random_layout(rng, s))
    return [segment_ids_from_image_mask(jnp.asarray(np.stack(rows[i : i + b]))) for i in range(0, len(rows), b)]


@pytest.mark.parametrize("window", [None, 24])
def test_layout_sweep_f32(window):
    b, s, hq, hkv, d = 2, 203, 4, 2, 64
    q, k, v = qkv(0, b, s, s, hq, hkv, d)
    rng = np.random.default_rng(1)
    for i, seg in enumerate(layouts(2 + (window or 0), b, s, n_random=6)):
        kvl = jnp.asarray(rng.choice([s, s, s - 1, 150, 31, 0], size=b), jnp.int32)
        kw = dict(sliding_window=window, kv_lengths=kvl)
        out = image_span_attention(q, k, v, seg, interpret=True, block_q=32, block_k=16, **kw)
        err = rel(out, reference_attention(q, k, v, seg, **kw))
        assert err <= F32_TOL, (i, err, np.asarray(kvl))


@pytest.mark.parametrize(
    "hq,hkv,d,window,bq,bk",
    [
        (4, 4, 72, None, 32, 32),  # GQA 1, SigLIP head dim (64 + 16 column chunks inside)
        (2, 1, 112, 20, 32, 32),  # three column chunks: 64 + 32 + 16
        (4, 2, 128, 40, 16, 32),  # GQA 2, block_k > block_q
        (8, 2, 256, None, 32, 16),  # GQA 4, D=256
        (8, 1, 64, 7, 64, 16),  # GQA 8, tiny window
    ],
)
def test_gqa_head_dims(hq, hkv, d, window, bq, bk):
    b, s = 1, 150
    q, k, v = qkv(hq + d, b, s, s, hq, hkv, d)
    seg = layouts(hq * d, b, s, n_random=0)[2]  # adjacent images + long last image
    out = image_span_attention(q, k, v, seg, sliding_window=window, interpret=True, block_q=bq, block_k=bk)
    assert err_ok(out, reference_attention(q, k, v, seg, sliding_window=window), F32_TOL)


def test_head_chunks():
    assert head_chunks(256) == ((0, 256),)
    assert head_chunks(72) == ((0, 64), (64, 16))  # 80 columns computed, not 128
    assert head_chunks(112) == ((0, 64), (64, 32), (96, 16))
    assert head_chunks(1) == ((0, 16),)


def err_ok(out, ref, tol):
    e = rel(out, ref)
    assert e <= tol, e
    return True


@pytest.mark.parametrize("sq,window", [(1, None), (37, 30), (128, None)])
def test_chunked_queries(sq, window):
    b, sk, hq, hkv, d = 2, 230, 2, 1, 64
    q, k, v = qkv(sq, b, sq, sk, hq, hkv, d)
    seg = layouts(7, b, sk, n_random=8)[4]
    kvl = jnp.asarray([sk, sk - 20], jnp.int32)
    kw = dict(sliding_window=window, kv_lengths=kvl)
    out = image_span_attention(q, k, v, seg, interpret=True, block_q=32, block_k=32, **kw)
    assert err_ok(out, reference_attention(q, k, v, seg, **kw), F32_TOL)


def test_bidirectional_siglip():
    b, s, h, d = 2, 100, 2, 72
    q, k, v = qkv(5, b, s, s, h, h, d)
    kvl = jnp.asarray([100, 64], jnp.int32)
    out = image_span_attention(q, k, v, None, causal=False, kv_lengths=kvl, interpret=True, block_q=32, block_k=16)
    assert err_ok(out, reference_attention(q, k, v, None, causal=False, kv_lengths=kvl), F32_TOL)


@pytest.mark.parametrize("d,s,dtype,bq,bk", [(72, 100, jnp.float32, 32, 16), (12, 16, jnp.float32, None, None),
                                             (64, 64, jnp.bfloat16, 32, 32)])
def test_packed_self_attention(d, s, dtype, bq, bk):
    """q|k|v packed [B, S, 3, H, Dp] with the head dim zero-padded (SigLIP's layout) == reference on [..., :d];
    the padded output columns are P @ V of zeros."""
    from pallas_kernels.attention import packed_self_attention

    dp = -(-d // 16) * 16
    q, k, v = qkv(d + s, 2, s, s, 3, 3, d, dtype)
    packed = jnp.stack([jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - d))) for x in (q, k, v)], axis=2)
    out = packed_self_attention(packed, head_dim=d, interpret=True, block_q=bq, block_k=bk)
    assert out.shape == (2, s, 3, dp) and out.dtype == dtype
    ref = reference_attention(q, k, v, causal=False)
    assert rel(out[..., :d], ref) <= (F32_TOL if dtype == jnp.float32 else LOWP_TOL)
    assert np.all(np.asarray(out[..., d:], np.float32) == 0.0)
    with pytest.raises(ValueError, match="padded head dim"):
        packed_self_attention(packed, head_dim=dp + 16, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("logit", [None, 45.0, 200.0])
def test_packed_self_attention_fixed_offset(dtype, logit):
    """The no-mask kernel fixes its softmax offset after key block 0 (no running max). A key in a later block
    with a scaled logit of ``logit`` for query 3 (block 0's maxima are ~5): 45 stays inside the fixed range
    (probabilities up to ~2^26), 200 is far outside it (2^250 would overflow), so those programs must fall back
    to the online softmax. Either way the reference's result, never inf or NaN; the online-softmax kernel
    (fixed_offset=False) too. fp16 (5-bit exponent: block 0's 2^-32 would flush to 0) must keep the online
    softmax."""
    from pallas_kernels.attention import packed_self_attention

    b, s, h, d = 1, 64, 2, 64
    q, k, v = qkv(11, b, s, s, h, h, d)
    if logit is not None:  # key 40 (block 2 of 4) along query 3: q3 . k40 / sqrt(d) = logit
        q3 = q[:, 3]
        k = k.at[:, 40].set(q3 * (logit * d**0.5 / jnp.sum(q3 * q3, axis=-1, keepdims=True)))
    packed = jnp.stack([x.astype(dtype) for x in (q, k, v)], axis=2)
    ref = reference_attention(*(x.astype(dtype) for x in (q, k, v)), causal=False)
    tol = F32_TOL if dtype == jnp.float32 else LOWP_TOL
    for fixed in (True, False):
        out = packed_self_attention(packed, head_dim=d, interpret=True, block_q=16, block_k=16, fixed_offset=fixed)
        assert np.all(np.isfinite(np.asarray(out, np.float32))), f"{fixed=} {logit=}"
        assert rel(out, ref) <= tol, f"{fixed=} {logit=}: {rel(out, ref)}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_self_attention_ones_column(dtype):
    """ones_column: v's padded columns hold ones, and the kernel takes the softmax denominator from P @ V's column
    head_dim instead of summing the probabilities: the reference's result in the real columns, 1 in the padded
    ones. A column of zeros instead (the promise broken) still gives the reference's result (online softmax)."""
    from pallas_kernels.attention import packed_self_attention

    b, s, h, d = 1, 64, 2, 40
    q, k, v = qkv(13, b, s, s, h, h, d)
    ref = reference_attention(*(x.astype(dtype) for x in (q, k, v)), causal=False)
    tol = F32_TOL if dtype == jnp.float32 else LOWP_TOL
    for fill in (1.0, 0.0):
        pads = [jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 8)), constant_values=c) for x, c in ((q, 0), (k, 0), (v, fill))]
        packed = jnp.stack(pads, axis=2).astype(dtype)
        out = packed_self_attention(packed, head_dim=d, interpret=True, block_q=16, block_k=16, ones_column=True)
        assert rel(out[..., :d], ref) <= tol, f"{fill=}"
        assert np.allclose(np.asarray(out[..., d:], np.float32), fill, atol=1e-2), f"{fill=}"
    with pytest.raises(ValueError, match="ones_column"):
        packed_self_attention(jnp.zeros((1, 16, 3, 1, 32), dtype), head_dim=32, interpret=True, ones_column=True)


@pytest.mark.parametrize("dtype,scale", [(jnp.float32, 0.5), (jnp.bfloat16, 0.5), (jnp.float16, 1.0)])
def test_packed_self_attention_reads_the_ones_column(dtype, scale):
    """Tracer: 2 in v's column head_dim (zeros elsewhere in the padding). The fixed-offset path divides by P @ V of
    that column, so the real columns come out at half the reference; fp16 (online softmax, its own sum) does not."""
    from pallas_kernels.attention import packed_self_attention

    b, s, h, d = 1, 64, 2, 40
    q, k, v = qkv(17, b, s, s, h, h, d)
    pad = lambda x, c: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 8))).at[..., d].set(c)  # noqa: E731
    packed = jnp.stack([pad(q, 0.0), pad(k, 0.0), pad(v, 2.0)], axis=2).astype(dtype)
    ref = reference_attention(*(x.astype(dtype) for x in (q, k, v)), causal=False)
    out = packed_self_attention(packed, head_dim=d, interpret=True, block_q=16, block_k=16, ones_column=True)
    assert rel(out[..., :d], ref * scale) <= (F32_TOL if dtype == jnp.float32 else LOWP_TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_self_attention_large_finite_sum_falls_back(dtype):
    """A row sum above FIXED_L_RANGE's top but finite (no inf anywhere): a key ~95 nats above block 0's maxima for
    query 3 gives probabilities ~2^98 under the fixed offset. That program (rows 0-15) must rerun with the online
    softmax, which sums its own probabilities: exact despite the tracer 2 in v's column head_dim. The other
    programs keep the fixed path and read that column: half the reference (so the test also fails if everything
    fell back)."""
    from pallas_kernels.attention import packed_self_attention

    b, s, h, d = 1, 64, 2, 40
    q, k, v = qkv(19, b, s, s, h, h, d)
    q3 = q[:, 3]
    k = k.at[:, 40].set(q3 * (95.0 * d**0.5 / jnp.sum(q3 * q3, axis=-1, keepdims=True)))
    pad = lambda x, c: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 8))).at[..., d].set(c)  # noqa: E731
    packed = jnp.stack([pad(q, 0.0), pad(k, 0.0), pad(v, 2.0)], axis=2).astype(dtype)
    ref = reference_attention(*(x.astype(dtype) for x in (q, k, v)), causal=False)
    out = packed_self_attention(packed, head_dim=d, interpret=True, block_q=16, block_k=16, ones_column=True)
    tol = F32_TOL if dtype == jnp.float32 else LOWP_TOL
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert rel(out[:, :16, :, :d], ref[:, :16]) <= tol
    assert rel(out[:, 16:, :, :d], ref[:, 16:] * 0.5) <= tol


def test_empty_rows_are_zero():
    b, s, hq, hkv, d = 2, 70, 2, 2, 64
    q, k, v = qkv(9, b, s, s, hq, hkv, d)
    seg = jnp.full((b, s), -1, jnp.int32)
    kvl = jnp.asarray([0, 20], jnp.int32)  # row 0: nothing; row 1: queries >= 20 see 20 keys
    out = image_span_attention(q, k, v, seg, kv_lengths=kvl, interpret=True, block_q=16, block_k=16)
    assert np.all(np.asarray(out[0]) == 0.0)
    assert err_ok(out, reference_attention(q, k, v, seg, kv_lengths=kvl), F32_TOL)
    # window 1 + kv_length 0 and a window past every key: still zeros, never NaN
    out = image_span_attention(q, k, v, seg, kv_lengths=kvl, sliding_window=1, interpret=True,
                               block_q=16, block_k=16)
    assert err_ok(out, reference_attention(q, k, v, seg, kv_lengths=kvl, sliding_window=1), F32_TOL)


@pytest.mark.parametrize("s,window,bq,bk", [(100, 8, None, None), (68, 8, 128, 32), (129, 40, 64, 64)])
def test_rows_whose_first_key_block_is_fully_masked(s, window, bq, bk):
    """Regression: a row's first visited key block held no allowed key (window start past it). With a
    finite mask value, s*scale - m of two huge equal numbers rounded to +1 ulp and exp2 gave inf -> NaN."""
    q, k, v = qkv(s + window, 1, s, s, 2, 1, 32)
    seg = jnp.full((1, s), -1, jnp.int32)
    out = image_span_attention(q, k, v, seg, sliding_window=window, interpret=True, block_q=bq, block_k=bk)
    assert err_ok(out, reference_attention(q, k, v, seg, sliding_window=window), F32_TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    b, s, hq, hkv, d = 2, 160, 4, 2, 128
    q, k, v = qkv(11, b, s, s, hq, hkv, d, dtype)
    seg = layouts(3, b, s, n_random=4)[3]
    kw = dict(sliding_window=50, kv_lengths=jnp.asarray([160, 99], jnp.int32))
    out = image_span_attention(q, k, v, seg, interpret=True, block_q=32, block_k=32, **kw)
    assert out.dtype == dtype
    ref = reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), seg, **kw)
    assert err_ok(out, ref, LOWP_TOL)


@pytest.mark.parametrize("s,window", [(300, None), (257, 100)])
def test_default_blocks(s, window):
    b, hq, hkv, d = 1, 2, 1, 64
    q, k, v = qkv(s, b, s, s, hq, hkv, d)
    seg = layouts(s, b, s, n_random=3)[6]
    out = image_span_attention(q, k, v, seg, sliding_window=window, interpret=jax.default_backend() != "gpu")
    assert err_ok(out, reference_attention(q, k, v, seg, sliding_window=window), F32_TOL)


def test_shape_errors():
    q, k, v = qkv(0, 1, 32, 32, 4, 2, 64)
    seg = jnp.full((1, 32), -1, jnp.int32)
    bad = [
        dict(q=q[..., :3, :]),  # Hq not a multiple of Hkv
        dict(v=v[:, :16]),  # k/v mismatch
        dict(q=jnp.zeros((1, 64, 4, 64))),  # Sq > Sk
        dict(q=jnp.zeros((1, 32, 4, 300)), k=jnp.zeros((1, 32, 2, 300)), v=jnp.zeros((1, 32, 2, 300))),  # D > 256
        dict(k=k.astype(jnp.bfloat16)),  # dtype mismatch
        dict(q=q.astype(jnp.int32), k=k.astype(jnp.int32), v=v.astype(jnp.int32)),  # int dtype
        dict(q=q[0]),  # rank
        dict(seg=seg[:, :10]),  # segment ids shape
        dict(kv_lengths=jnp.zeros((3,), jnp.int32)),
        dict(block_q=24),  # not a power of two
    ]
    for case in bad:
        args = dict(q=q, k=k, v=v, seg=seg, kv_lengths=None, block_q=16)
        args.update(case)
        with pytest.raises(ValueError, match="="):
            image_span_attention(args["q"], args["k"], args["v"], args["seg"], kv_lengths=args["kv_lengths"],
                                 block_q=args["block_q"], interpret=True)


def _max_intermediate(jaxpr) -> tuple[int, str]:
    """Largest array (elements) anywhere in a jaxpr, recursing into sub-jaxprs (pallas_call, loops, conds)."""
    best = (0, "")

    def sub_jaxprs(params):
        for val in params.values():
            vals = val if isinstance(val, (list, tuple)) else [val]
            for x in vals:
                if hasattr(x, "eqns"):  # Jaxpr
                    yield x
                elif hasattr(getattr(x, "jaxpr", None), "eqns"):  # ClosedJaxpr
                    yield x.jaxpr

    def visit(jx):
        nonlocal best
        for var in list(jx.invars) + list(jx.constvars) + [o for e in jx.eqns for o in e.outvars]:
            shape = getattr(var.aval, "shape", ())
            n = int(np.prod(shape)) if shape else 1
            if n > best[0]:
                best = (n, f"{var.aval}")
        for eqn in jx.eqns:
            for sj in sub_jaxprs(eqn.params):
                visit(sj)

    visit(jaxpr.jaxpr)
    return best


@pytest.mark.parametrize("sq,sk,window", [(512, 512, None), (512, 512, 64), (128, 512, None)])
def test_no_quadratic_intermediates(sq, sk, window):
    """The production path (compiled kernel wrapper) never builds an [Sq, Sk]-sized array."""
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in [(1, sq, 2, 64), (1, sk, 1, 64), (1, sk, 1, 64)])
    seg = jax.ShapeDtypeStruct((1, sk), jnp.int32)
    kvl = jax.ShapeDtypeStruct((1,), jnp.int32)
    fn = lambda q, k, v, s, n: image_span_attention(q, k, v, s, kv_lengths=n, sliding_window=window)  # noqa: E731
    n, what = _max_intermediate(jax.make_jaxpr(fn)(q, k, v, seg, kvl))
    assert n < sq * sk, f"intermediate {what} has {n} >= Sq*Sk = {sq * sk} elements"
    # the checker itself sees a dense mask when there is one
    n_ref, _ = _max_intermediate(jax.make_jaxpr(lambda q, k, v, s: reference_attention(q, k, v, s))(q, k, v, seg))
    assert n_ref >= sq * sk


# ---- queries placed by q_offset, keys cut by kv_start: how a prompt chunk attends after its earlier chunks ----

def chunk_edges(seg_row: np.ndarray, budget: int) -> list[int]:
    """Chunk starts for one row: at most ``budget`` tokens per chunk, an end inside an image moved to its end."""
    edges, s = [0], len(seg_row)
    while edges[-1] < s:
        end = min(edges[-1] + budget, s)
        while 0 < end < s and seg_row[end] >= 0 and seg_row[end] == seg_row[end - 1]:
            end += 1
        edges.append(end)
    return edges


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("budget", [1, 7, 16, 33])
def test_chunks_with_offsets_equal_the_whole_prompt(window, budget):
    """Each chunk's queries at q_offset over the keys so far (global: the buffer by position; sliding: the last W
    positions then the chunk, kv_start masking positions before 0) give the whole prompt's rows exactly."""
    s, hq, hkv, d = 96, 2, 1, 32
    seg = layouts(5, 1, s, n_random=2)[2]  # two images one text token apart, then a long one to the end
    q, k, v = qkv(11, 1, s, s, hq, hkv, d)
    whole = reference_attention(q, k, v, seg, sliding_window=window)
    seg_row = np.asarray(seg[0])
    edges = chunk_edges(seg_row, budget)
    for p0, p1 in zip(edges[:-1], edges[1:]):
        n = p1 - p0
        if window is None:
            kk, vv, sg = k, v, seg
            kw = dict(q_offset=jnp.asarray([p0]), kv_lengths=jnp.asarray([p1]))
        else:
            lo = p0 - window  # the ring's positions p0 - W .. p0 - 1, then the chunk's own
            idx = np.clip(np.arange(lo, p1), 0, s - 1)
            kk, vv = k[:, idx], v[:, idx]
            sg = jnp.asarray(np.r_[np.full(window, -1), seg_row[p0:p1]][None], jnp.int32)
            kw = dict(q_offset=jnp.asarray([window]), kv_start=jnp.asarray([max(0, -lo)]))
        qq = q[:, p0:p1]
        got = image_span_attention(qq, kk, vv, sg, sliding_window=window, interpret=True, block_q=16, block_k=16,
                                   **kw)
        ref = reference_attention(qq, kk, vv, sg, sliding_window=window, **kw)
        assert err_ok(got, whole[:, p0:p1], F32_TOL), (p0, p1)
        assert err_ok(ref, whole[:, p0:p1], F32_TOL), (p0, p1)
        assert n >= 1


def test_offsets_against_the_reference():
    """Random q_offset / kv_start / kv_lengths per row (queries need not be the last Sq): kernel == oracle."""
    b, sq, sk, hq, hkv, d = 3, 24, 80, 2, 1, 32
    q, k, v = qkv(12, b, sq, sk, hq, hkv, d)
    seg = layouts(7, b, sk, n_random=1)[1]
    kw = dict(q_offset=jnp.asarray([0, 30, 56]), kv_start=jnp.asarray([0, 10, 50]),
              kv_lengths=jnp.asarray([24, 70, 80]))
    for window in (None, 9):
        got = image_span_attention(q, k, v, seg, sliding_window=window, interpret=True, block_q=16, block_k=16,
                                   **kw)
        assert err_ok(got, reference_attention(q, k, v, seg, sliding_window=window, **kw), F32_TOL)
