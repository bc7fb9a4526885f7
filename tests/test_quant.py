"""8-bit and 4-bit weights (``gemma3_jax.model.quant``): a quantized model computes what a float model holding the
dequantized weights computes, through every path (prefill kernels, the batch-1 GEMV decode kernels, XLA's
products at larger batches, the batching engine), and loading quantizes what the checkpoint holds.

Float32 on the CPU, the tiny multimodal model (kernels in interpret mode)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma3_jax
from fixtures.hf_checkpoints import _row
from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model import quant
from gemma3_jax.model.kernels import Kernels, with_kernels
from gemma3_jax.runtime.batching import BatchEngine, Request
from gemma3_jax.runtime.engine import Engine

ROOT = Path(__file__).parents[1]
TOL = 1e-5  # float32: only the order of the float32 sums differs
MODES = quant.MODES
PER_CHANNEL = [m for m in MODES if not quant.grouped(m)]


def params(model) -> dict[str, nnx.Param]:
    return {".".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Param)}


def dequantized(path, qmodel):
    """A float32 model of the same checkpoint holding the quantized model's weights dequantized (the reference)."""
    ref = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)
    q = params(qmodel)
    for name, p in params(ref).items():
        rule = quant.rule(name)
        p.set_value(quant.dequantize(q[name][...], q[rule[0]][...], rule[1]) if rule else q[name][...])
    return ref


@pytest.fixture(scope="module", params=MODES)
def pair(request, tiny_mm):
    path = tiny_mm[0]
    qmodel = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False, quantize=request.param)
    return request.param, qmodel, dequantized(path, qmodel)


def prompt(seed, pieces=(5, "img", 9, "img", 4)):
    rng = np.random.default_rng(seed)
    ids = [2] + _row(list(pieces), 64, rng)
    n = sum(p == "img" for p in pieces)
    return ids, rng.standard_normal((n, 3, 28, 28)).astype(np.float32)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("mode", PER_CHANNEL)
def test_quantize_round_trip(mode):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 40)).astype(np.float32) * np.logspace(-3, 2, 6)[:, None, None]  # rows of any scale
    w[2] = 0.0  # an all-zero channel gets scale 1, not a division by zero
    for contract in (1, 2):
        q, s = quant.quantize(jnp.asarray(w), mode, contract)
        assert q.dtype == quant.STORAGE[mode] and s.shape == w.shape[: 3 - contract] and s.dtype == jnp.float32
        back = np.asarray(quant.dequantize(q, s, contract))
        amax = np.abs(w).max(axis=tuple(range(3 - contract, 3)), keepdims=True)
        step = amax / quant.LIMIT[mode]  # int8: one step; e4m3: 3 mantissa bits, 1/16 of the value at most
        bound = step / 2 if mode == "int8" else np.maximum(np.abs(w) / 16, step * 2.0 ** -9)
        assert (np.abs(back - w) <= bound * (1 + 1e-6)).all()
        assert np.abs(back).max(axis=tuple(range(3 - contract, 3)), keepdims=True).squeeze() == pytest.approx(
            amax.squeeze(), rel=1e-6)  # the largest value of a channel is exact
        hq, hs = quant.quantize_host(w, mode, contract)  # the numpy twin (sharded loading) gives the same bits
        assert np.array_equal(np.asarray(q).view(np.uint8), hq.view(np.uint8)) and np.array_equal(np.asarray(s), hs)
    # bfloat16 weights put many values exactly half-way between two int8 steps: host and device round them alike
    w = np.asarray(jnp.asarray(rng.standard_normal((2048, 256)), jnp.bfloat16).astype(jnp.float32))
    q, s = quant.quantize(jnp.asarray(w), mode, 1)
    hq, hs = quant.quantize_host(w, mode, 1)
    assert np.array_equal(np.asarray(q).view(np.uint8), hq.view(np.uint8)) and np.array_equal(np.asarray(s), hs)
    with pytest.raises(ValueError, match="quantize must be"):
        quant.check_mode("int2")


def test_int4_round_trip():
    """int4: one scale per 32 inputs along the last axis (o's [D, N, H] too: groups within a head), levels -7..7;
    each value within half a step of its group, each group's largest value exact, an all-zero group scale 1."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 64)).astype(np.float32) * np.logspace(-3, 2, 64)[None, None, :]  # groups of any scale
    w[1, 2, 32:] = 0.0
    for contract in (1, 2):
        q, s = quant.quantize(jnp.asarray(w), "int4", contract)
        assert q.dtype == jnp.int4 and q.shape == w.shape and s.shape == (6, 3, 2) and s.dtype == jnp.float32
        assert s[1, 2, 1] == 1.0
        back = np.asarray(quant.dequantize(q, s, contract)).reshape(6, 3, 2, 32)
        groups = w.reshape(6, 3, 2, 32)
        amax = np.abs(groups).max(axis=-1, keepdims=True)
        assert (np.abs(back - groups) <= amax / 7 / 2 * (1 + 1e-6)).all()
        assert np.allclose(np.abs(back).max(axis=-1, keepdims=True), amax, rtol=1e-6)
        assert set(np.unique(np.asarray(q, np.int8))) <= set(range(-7, 8))
        hq, hs = quant.quantize_host(w, "int4", contract)  # the numpy twin (sharded loading) gives the same values
        assert hq.dtype == np.dtype(jnp.int4) and np.array_equal(np.asarray(q, np.int8), hq.astype(np.int8))
        assert np.array_equal(np.asarray(s), hs)
    with pytest.raises(ValueError, match="groups 32 inputs"):
        quant.quantize(jnp.ones((4, 40)), "int4", 1)
    assert quant.bytes_per_weight("int4") == 0.625 and quant.bytes_per_weight("int8") == 1.0


def test_weights_are_held_in_one_byte(pair):
    mode, qmodel, ref = pair
    q = params(qmodel)
    for name in ("text.embed", "text.layers.0.attn.qkv_proj", "text.layers.3.attn.o_proj",
                 "text.layers.6.mlp.gate_up", "text.layers.6.mlp.down"):
        assert q[name][...].dtype == quant.STORAGE[mode], name
        assert q[quant.rule(name)[0]][...].dtype == jnp.float32
    assert q["vision.layers.0.mlp.fc1"][...].dtype == jnp.float32  # the vision tower is not quantized
    text = params(qmodel.text)
    assert quant.weight_bytes(qmodel.text) < 0.3 * quant.weight_bytes(ref.text)  # float32 -> 1 byte + scales
    assert all(p[...].dtype != jnp.int8 for n, p in text.items() if "norm" in n)


def test_prefill_logits_equal_the_dequantized_model(pair):
    """Both kernel implementations, two images, past the window."""
    mode, qmodel, ref = pair
    ids, px = prompt(0, (5, "img", 9, "img", 20))
    for attention in ("reference", "pallas"):
        got = with_kernels(qmodel, attention)(np.array([ids]), px)
        want = with_kernels(ref, attention)(np.array([ids]), px)
        assert rel(got, want) <= TOL, (mode, attention)


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_equals_the_dequantized_model(pair, batch):
    """Greedy decode through the Pallas decode kernels (batch 1: the quantized GEMV kernels, int4's own for its
    grouped scales; batch 2: XLA's products over the quantized weights) gives the dequantized model's tokens."""
    mode, qmodel, ref = pair
    kernels = Kernels(prefill="pallas", decode="pallas", interpret=True, platform="cpu")
    prompts = [prompt(s) for s in range(batch)]
    ids = [p[0] for p in prompts]
    px = np.concatenate([p[1] for p in prompts])

    def run(model):
        eng = Engine(with_kernels(model, kernels), cache_length=96, chunk=8)
        return np.concatenate(list(eng.generate_ids(ids, px, max_new_tokens=12, stop_ids=())), axis=1)

    if batch == 1:  # the kernels under test are the ones the step runs
        text = with_kernels(qmodel, kernels).text
        cache = kvc.init_cache(qmodel.cfg.text, 1, 16, qmodel.dtype)
        step = jax.make_jaxpr(lambda c, t: text.decode_step(text.embed_tokens(t[:, None]), c))
        jaxpr = str(step(cache, jnp.zeros((1,), jnp.int32)))
        assert ("gemv4_geglu" if quant.grouped(mode) else "gemv_geglu") in jaxpr
    assert np.array_equal(run(qmodel), run(ref)), mode


def test_batching_engine_serves_a_quantized_model(pair):
    mode, qmodel, ref = pair
    reqs = [Request(*prompt(s, pieces), max_new_tokens=8, stop_ids=())
            for s, pieces in ((1, (5, "img", 9)), (2, (30,)), (3, (2, "img", 1, "img", 12)))]

    def serve(model):
        eng = BatchEngine(model, max_batch=2, cache_length=96, chunk_tokens=10, step_tokens=6, decode_steps=4)
        streams = [eng.submit(r) for r in reqs]
        eng.run()
        return [s.tokens for s in streams]

    assert serve(qmodel) == serve(ref), mode


def test_loading_quantizes_the_checkpoint_weights(tiny_mm):
    """load_pretrained(quantize=) equals quantizing the float model's weights, bit for bit (float32 and bf16)."""
    for dtype in (jnp.float32, jnp.bfloat16):
        ref = params(gemma3_jax.load_pretrained(tiny_mm[0], dtype=dtype, progress=False))
        got = params(gemma3_jax.load_pretrained(tiny_mm[0], dtype=dtype, progress=False, quantize="int8"))
        for name, p in ref.items():
            rule = quant.rule(name)
            if rule is None:
                assert np.array_equal(np.asarray(got[name][...]), np.asarray(p[...])), name
                continue
            q, s = quant.quantize(p[...], "int8", rule[1])
            assert np.array_equal(np.asarray(got[name][...]), np.asarray(q)), name
            assert np.array_equal(np.asarray(got[rule[0]][...]), np.asarray(s)), name
    with pytest.raises(ValueError, match="quantize must be"):
        gemma3_jax.load_pretrained(tiny_mm[0], progress=False, quantize="int2")


def test_cli_quantize_torch_free(tmp_path):
    """scripts/generate.py --quantize int8 and fp8 on a Hugging Face layout, torch-free: prints the memory plan of
    the mode and completes; an unknown mode is one line and exit 2. (int4 through the CLI: test_tensor_parallel's
    CLI test, at N = 2.)"""
    from fixtures import real_layout as rl

    model = rl.write_checkpoint(tmp_path / "it", "it")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]))

    def cli(*more):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(model),
                               "--prompt", "Describe the sea.", "--max-new-tokens", "6", "--temperature", "0", *more],
                              env=env, capture_output=True, text=True, timeout=600)

    for mode in [m for m in MODES if m != "int4"]:
        r = cli("--quantize", mode)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"({mode} weights; float32 would be" in r.stderr and r.stdout.strip(), r.stderr[-2000:]
    r = cli("--quantize", "int2")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "int2" in r.stderr, r.stderr[-2000:]


def test_memory_plan_counts_the_quantized_bytes(pair):
    """The plan printed before loading (sharding.memory_plan) is what the quantized model holds, and
    quant.quantize_model (used by benchmarks on random weights) builds the model load_pretrained builds."""
    from gemma3_jax.model.sharding import memory_plan

    mode, qmodel, ref = pair
    plan = memory_plan(qmodel.cfg, qmodel.dtype, 1, 1, 128, mode)
    assert plan["weights"] == quant.weight_bytes(qmodel)
    again = params(quant.quantize_model(ref, mode))
    for name, p in params(qmodel).items():
        if quant.rule(name):  # requantizing the dequantized weights gives the same bytes and scales
            assert np.array_equal(np.asarray(again[name][...]).view(np.uint8), np.asarray(p[...]).view(np.uint8)), name


def test_quantize_script_refuses_an_empty_model_path(tmp_path):
    """``--model ""`` quantized the default GGUF into --out (a falsy path read as "not given")."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "quantize.py"), "--model", "", "--quantize", "int8",
                        "--out", str(tmp_path / "q")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: the model path is empty", r.stderr[-2000:]
    assert not (tmp_path / "q").exists()
