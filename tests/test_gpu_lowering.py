"""Every Pallas kernel the GPU runs lowers to Triton, checked on the CPU: the model's GPU paths (prefill with
images, the chunked prefill, decode at batch 1 and 8, each quantize mode) traced with the GPU's kernels and
lowered for CUDA without a GPU.

The interpret-mode tests prove the kernels' numbers but never reach the Triton lowering, where an op Pallas cannot
lower (a reshape, a gather, a dtype) fails only on a GPU. Lowering stops short of Triton's own compile to PTX,
so a kernel that lowers can still fail there or run slowly: the GPU benchmarks remain the check for that."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from gemma3_jax.model import kv_cache as kvc
from gemma3_jax.model.gemma3 import Gemma3, decoder_forward
from gemma3_jax.model.kernels import Kernels
from gemma3_jax.model.presets import preset

ROOT = Path(__file__).parents[1]
GPU = Kernels(prefill="pallas", decode="pallas", interpret=False, platform="gpu")


def small_4b() -> object:
    """The 4B's widths and heads with two text layers (one sliding, one global) and one vision layer."""
    cfg = preset("gemma3_4b")
    text = dataclasses.replace(cfg.text, num_layers=2, layer_types=(cfg.text.layer_types[0], "full_attention"))
    return dataclasses.replace(cfg, text=text, vision=dataclasses.replace(cfg.vision, num_layers=1))


def abstract(quantize=None, mesh=None):
    """(graphdef, state of shapes) of the model with the GPU's kernels, split over ``mesh`` if given (tensor
    parallelism): nothing is allocated."""
    if mesh is not None:
        from gemma3_jax.model.sharding import split_model

        return nnx.split(split_model(small_4b(), jnp.bfloat16, GPU, mesh, quantize))
    return nnx.split(nnx.eval_shape(lambda: Gemma3(small_4b(), jnp.bfloat16, GPU, quantize)))


def lower_for_cuda(fn, *args) -> str:
    """The StableHLO of ``fn`` lowered for CUDA; each Pallas kernel is in it as a Triton custom call."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def shape(s, dtype):
    return jax.ShapeDtypeStruct(s, dtype)


def triton_kernels(text: str) -> set[str]:
    """The names of the Triton kernels in a lowered module (a kernel called by several layers is listed once)."""
    return set(re.findall(r'@__gpu\$xla\.gpu\.triton\(.*?name = "(\w+)"', text))


def prefill_kernels(mesh=None) -> set[str]:
    graphdef, state = abstract(mesh=mesh)
    n = 320

    def prefill(state, ids, pixels, lengths):
        model = nnx.merge(graphdef, state)
        hidden, _ = decoder_forward(model.cfg, model.text, ids, model.image_features(pixels), lengths)
        return model.text.logits(hidden[:, -1:])

    side = small_4b().vision.image_size
    return triton_kernels(lower_for_cuda(prefill, state, shape((1, n), jnp.int32),
                                         shape((1, 3, side, side), jnp.float32), shape((1,), jnp.int32)))


def test_prefill_with_an_image_lowers():
    assert {"packed_self_attention", "image_span_attention"} <= prefill_kernels()  # vision, text


def decode_kernels(batch: int, quantize=None, mesh=None) -> set[str]:
    graphdef, state = abstract(quantize, mesh)
    cfg = nnx.merge(graphdef, state).cfg.text  # under a mesh: each device's share of the heads
    cache = jax.eval_shape(lambda: kvc.init_cache(cfg, batch, 2048, jnp.bfloat16))

    def step(state, cache, token):
        text = nnx.merge(graphdef, state).text
        return text.decode_step(text.embed_tokens(token[:, None]), cache)

    return triton_kernels(lower_for_cuda(step, state, cache, shape((batch,), jnp.int32)))


@pytest.mark.parametrize("quantize", [None, "int8", "fp8", "int4"])
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_lowers(quantize, batch):
    # at batch 1 the q|k|v and MLP products too (4-bit weights: their own kernels)
    expected = {"decode_attention_fused", "decode_combine", "residual_norm"}
    if batch == 1:
        expected |= {"gemv4", "gemv4_geglu"} if quantize == "int4" else {"gemv", "gemv_geglu"}
    assert decode_kernels(batch, quantize) == expected


def test_tensor_parallel_steps_lower():
    """Split over two devices (CPU devices, in a subprocess), each device's kernels under shard_map lower too:
    the decode step's, in bf16 and int4, and the prefill's with an image."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    names = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(names["decode bf16"]) == {"decode_attention_fused", "decode_combine", "residual_norm"}
    assert set(names["decode int4"]) == set(names["decode bf16"])  # no batch-1 GEMV under tensor parallelism
    assert {"packed_self_attention", "image_span_attention"} <= set(names["prefill"])


@pytest.mark.parametrize("fresh", [False, True])
def test_serving_steps_lower(fresh):
    """The batching engine's steps: prompt chunks after earlier keys (or starting their prompts), and decode rows
    with chunks in one pass."""
    graphdef, state = abstract()
    cfg = small_4b().text
    slots, rows, t = 4, 2, 256
    cache = jax.eval_shape(lambda: kvc.init_cache(cfg, slots, 2048, jnp.bfloat16))
    ints = lambda *s: shape(s, jnp.int32)  # noqa: E731
    chunk = kvc.PromptChunk(ints(rows), ints(rows), ints(rows), ints(rows, t))

    def prefill(state, cache, ids, chunk):
        text = nnx.merge(graphdef, state).text
        return text.prefill_chunk(text.embed_tokens(ids), cache, chunk, fresh)

    def mixed(state, cache, token, ids, chunk, advance):
        text = nnx.merge(graphdef, state).text
        return text.mixed_step(text.embed_tokens(token[:, None]), text.embed_tokens(ids), cache, chunk, advance)

    assert "image_span_attention" in triton_kernels(lower_for_cuda(prefill, state, cache, ints(rows, t), chunk))
    if not fresh:
        names = triton_kernels(lower_for_cuda(mixed, state, cache, ints(slots), ints(rows, t), chunk,
                                              shape((slots,), jnp.bool_)))
        assert {"decode_attention_fused", "decode_combine", "image_span_attention"} <= names


def test_a_kernel_triton_cannot_lower_fails_here():
    """The check above can fail: an op without a Triton lowering rule is refused on the CPU, as a GPU would."""
    from jax.experimental import pallas as pl

    from pallas_kernels.tuning import compiler_params

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.sort(x_ref[...])

    def fn(x):
        return pl.pallas_call(kernel, out_shape=shape((16,), jnp.float32), compiler_params=compiler_params(4, 1))(x)

    with pytest.raises(NotImplementedError, match="sort"):
        lower_for_cuda(fn, shape((16,), jnp.float32))


if __name__ == "__main__":  # the tensor-parallel check's subprocess: several CPU devices from its XLA_FLAGS
    from gemma3_jax.model.sharding import make_mesh

    tp = make_mesh(2)
    print(json.dumps({"decode bf16": sorted(decode_kernels(1, mesh=tp)),
                      "decode int4": sorted(decode_kernels(1, "int4", tp)), "prefill": sorted(prefill_kernels(tp))}))
