"""Quantized checkpoints (``gemma3_jax.checkpoints.quantized``, ``scripts/quantize.py``): written from a Hugging
Face checkpoint, they load into the model that quantizing on load builds, bit for bit, and a damaged or unmarked one
is refused naming what is wrong. Real file layout (sharded safetensors, tokenizer, chat template), CPU."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gemma3_jax
from gemma3_jax.checkpoints.quantized import pack_int4, quantize_checkpoint, quantize_gguf, unpack_int4
from gemma3_jax.model import quant
from gemma3_jax.model.config import CheckpointError, ConfigError

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from fixtures import real_layout as rl

    return rl.write_checkpoint(tmp_path_factory.mktemp("qckpt") / "it", "it")


def params(model) -> dict:
    return {".".join(map(str, p)): n[...] for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Param)}


def size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def test_int4_packing_round_trip():
    q = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (2, 4)
    assert packed[0, 0] == ((-8 & 0xF) | ((-7 & 0xF) << 4))  # the even input in the low nibble
    assert np.array_equal(unpack_int4(packed).astype(np.int8), q)


@pytest.mark.parametrize("mode", quant.MODES)
def test_round_trip_equals_quantizing_on_load(src, tmp_path, mode):
    """Every parameter of the quantized checkpoint's model equals load_pretrained(src, quantize=mode)'s (bf16),
    from fewer bytes; the tokenizer and chat template come along; the logits agree exactly."""
    out = quantize_checkpoint(src, tmp_path / mode, mode, progress=False)
    want = gemma3_jax.load_pretrained(src, progress=False, quantize=mode)
    got = gemma3_jax.load_pretrained(out, progress=False)
    assert got.quantize == mode
    a, b = params(want), params(got)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(np.asarray(a[name]).astype(np.float32), np.asarray(b[name]).astype(np.float32)), name
    assert size(out) < 0.6 * size(src)
    assert (out / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {
        "quant_method": "gemma3_jax", "mode": mode, "dtype": "bfloat16"}
    ids = jnp.asarray([[2, 10, 11, 12, 13]])
    assert np.array_equal(np.asarray(want.text.logits(want.forward(ids)[0])),
                          np.asarray(got.text.logits(got.forward(ids)[0])))
    with pytest.raises(ValueError, match=f"holds {mode} weights"):
        gemma3_jax.load_pretrained(out, progress=False, quantize="fp8" if mode != "fp8" else "int8")


def _header(file: Path) -> tuple[int, dict]:
    n = struct.unpack("<Q", file.read_bytes()[:8])[0]
    return n, json.loads(file.read_bytes()[8: 8 + n])


def _copy(out: Path, tmp: Path) -> Path:
    import shutil

    dst = tmp / "broken"
    shutil.copytree(out, dst)
    return dst


def test_damaged_or_unmarked_checkpoints_are_refused(src, tmp_path):
    from safetensors.numpy import save_file

    # a tensor the model has no place for: refused before anything is written
    odd = _copy(src, tmp_path / "odd")
    save_file({"model.language_model.layers.0.self_attn.rotary.weight": np.zeros(4, np.float32)},
              str(odd / "extra.safetensors"))
    index = odd / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"]["model.language_model.layers.0.self_attn.rotary.weight"] = "extra.safetensors"
        index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="rotary.weight"):
        quantize_checkpoint(odd, tmp_path / "odd_int8", "int8", progress=False)
    assert not (tmp_path / "odd_int8").exists()

    out = quantize_checkpoint(src, tmp_path / "int8", "int8", progress=False)
    suffix = "layers.1.self_attn.q_proj.weight_scale"
    shard = next(f for f in sorted(out.glob("*.safetensors")) if any(k.endswith(suffix) for k in _header(f)[1]))

    # the marking removed: the int8 tensors are refused by name, the marking named
    bad = _copy(out, tmp_path / "a")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has dtype I8.*quantization_config"):
        gemma3_jax.load_pretrained(bad, progress=False)

    # another tool's marking, an unknown mode
    for q, match in (({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported"),
                     ({"quant_method": "gemma3_jax", "mode": "int3", "dtype": "bfloat16"}, "mode must be one of")):
        bad = _copy(out, tmp_path / q.get("mode", "other"))
        (bad / "config.json").write_text(json.dumps(dict(cfg, quantization_config=q)))
        with pytest.raises((CheckpointError, ConfigError), match=match) as e:
            gemma3_jax.load_pretrained(bad, progress=False)
        assert "config.json" in str(e.value)

    # a scale renamed (the header edited in place): the weight is refused for want of it
    bad = _copy(out, tmp_path / "scale")
    f = bad / shard.name
    data = bytearray(f.read_bytes())
    n, header = _header(f)
    key = next(k for k in header if k.endswith(suffix))
    at = data.index(key.encode(), 8, 8 + n)
    data[at + len(key) - 1: at + len(key)] = b"X"
    f.write_bytes(bytes(data))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"][key[:-1] + "X"] = index["weight_map"].pop(key)
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"q_proj.weight' has no '.*q_proj.weight_scale'"):
        gemma3_jax.load_pretrained(bad, progress=False)

    # a NaN in a scale
    bad = _copy(out, tmp_path / "nan")
    f = bad / shard.name
    data = bytearray(f.read_bytes())
    start = 8 + n + header[key]["data_offsets"][0]
    data[start + 4: start + 8] = struct.pack("<f", float("nan"))
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{key}.*NaN or Inf"):
        gemma3_jax.load_pretrained(bad, progress=False)

    # a tensor outside the quantized positions stored as integers (same bytes, the header rewritten)
    bad = _copy(out, tmp_path / "norm")
    for f in bad.glob("*.safetensors"):
        n, header = _header(f)
        key = next((k for k in header if k.endswith("layers.0.input_layernorm.weight")), None)
        if key is None:
            continue
        entry = header[key]
        assert entry["dtype"] == "BF16"
        header[key] = dict(entry, dtype="U8", shape=[entry["shape"][0] * 2])
        blob = json.dumps(header, separators=(",", ":")).encode()
        assert len(blob) <= n
        data = bytearray(f.read_bytes())
        data[8: 8 + n] = blob + b" " * (n - len(blob))
        f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"input_layernorm.weight' has dtype U8; a int8 checkpoint stores only"):
        gemma3_jax.load_pretrained(bad, progress=False)

    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", "int4", progress=False)
    with pytest.raises(FileExistsError):
        quantize_checkpoint(src, out, "int8", progress=False)


def test_cli_quantize_then_generate_torch_free(src, tmp_path):
    """scripts/quantize.py writes the checkpoint; scripts/generate.py on it prints the text --quantize int4 gives
    on the float checkpoint, and the int4 memory plan; a conflicting --quantize is one line and exit 2."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]))

    def run(script, *args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], env=env, capture_output=True,
                              text=True, timeout=600)

    out = tmp_path / "int4"
    r = run("quantize.py", "--model", str(src), "--quantize", "int4", "--out", str(out))
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr[-2000:]
    gen = ("--prompt", "Describe the sea.", "--max-new-tokens", "6", "--temperature", "0")
    a = run("generate.py", "--model", str(src), "--quantize", "int4", *gen)
    b = run("generate.py", "--model", str(out), *gen)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    assert b.stdout.strip() and b.stdout == a.stdout
    assert "(int4 weights;" in b.stderr
    r = run("generate.py", "--model", str(out), "--quantize", "int8", *gen)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "holds int4 weights" in r.stderr, r.stderr[-2000:]
    r = run("quantize.py", "--model", str(src), "--quantize", "int2", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "int2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def write_tiny_gguf(path: Path, f32: tuple[str, ...] = (), seed: int = 0, nan: str | None = None) -> Path:
    """A two-layer Gemma-3 GGUF as llama.cpp lays it out (norms stored as 1 + w), every matrix Q4_0 except the
    tensors named in ``f32`` (``nan``: one of those holds a NaN), written with the gguf package's own writer and Q4_0
    quantizer."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize as to_q4_0

    rng = np.random.default_rng(seed)
    d, h, n, k, f, layers = 64, 32, 2, 1, 128, 2
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] + [f"\u2581w{i}" for i in range(250)]
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, v in (("block_count", layers), ("embedding_length", d), ("feed_forward_length", f),
                   ("context_length", 4096), ("attention.head_count", n), ("attention.head_count_kv", k),
                   ("attention.key_length", h), ("attention.value_length", h), ("attention.sliding_window", 16)):
        w.add_uint32(f"gemma3.{key}", v)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("gemma3.rope.freq_base", 1e6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3] * 6 + [1] * (len(tokens) - 6))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)

    def matrix(name, shape):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if name in f32:
            if name == nan:
                x[1, 3] = np.nan
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, to_q4_0(x, T.Q4_0), raw_dtype=T.Q4_0)

    def norm(name, size):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", (len(tokens), d))
    norm("output_norm.weight", d)
    for i in range(layers):
        for part in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(f"blk.{i}.{part}.weight", d)
        norm(f"blk.{i}.attn_q_norm.weight", h)
        norm(f"blk.{i}.attn_k_norm.weight", h)
        for part, shape in (("attn_q", (n * h, d)), ("attn_k", (k * h, d)), ("attn_v", (k * h, d)),
                            ("attn_output", (d, n * h)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)), ("ffn_down", (d, f))):
            matrix(f"blk.{i}.{part}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_q4_0_kept_exactly(tmp_path):
    """A GGUF's Q4_0 tensors become int4 weights with their own values and scales, not dequantized and rounded
    again: the int4 model computes what the dequantized float model computes, where quantizing the dequantized
    weights on load (round to nearest over each group's largest value) changes them. A tensor of another type is
    quantized from its float values."""
    from gemma3_jax.checkpoints.gguf import convert_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    native = gemma3_jax.load_pretrained(quantize_gguf(path, tmp_path / "int4", "int4", progress=False),
                                        dtype=jnp.float32, progress=False)
    floats = convert_gguf(path, tmp_path / "f32", progress=False)
    ref = gemma3_jax.load_pretrained(floats, dtype=jnp.float32, progress=False)
    got, want = params(native), params(ref)
    for name, w in want.items():
        rule = quant.rule(name)
        if rule:
            assert got[name].dtype == jnp.int4, name
            assert np.array_equal(np.asarray(quant.dequantize(got[name], got[rule[0]], rule[1])), np.asarray(w)), name
    ids = jnp.asarray([[2, 10, 11, 12, 13, 14, 15]])
    a, b = (np.asarray(m.text.logits(m.forward(ids)[0])) for m in (native, ref))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    again = params(gemma3_jax.load_pretrained(floats, dtype=jnp.float32, progress=False, quantize="int4"))
    assert any(not np.array_equal(np.asarray(again[n]).astype(np.int8), np.asarray(got[n]).astype(np.int8))
               for n in got if quant.rule(n))

    mixed = write_tiny_gguf(tmp_path / "mixed.gguf", f32=("blk.1.attn_v.weight", "token_embd.weight"))
    got = params(gemma3_jax.load_pretrained(quantize_gguf(mixed, tmp_path / "mixed", "int4", progress=False),
                                            dtype=jnp.float32, progress=False))
    want = params(gemma3_jax.load_pretrained(convert_gguf(mixed, tmp_path / "mixed_f32", progress=False),
                                             dtype=jnp.bfloat16, progress=False, quantize="int4"))
    for name in ("text.embed", "text.embed_scale"):  # F32 in the file: quantized from its bf16-rounded values
        assert np.array_equal(np.asarray(got[name]).astype(np.float32), np.asarray(want[name]).astype(np.float32))

    damaged = write_tiny_gguf(tmp_path / "nan.gguf", f32=("blk.1.attn_v.weight",), nan="blk.1.attn_v.weight")
    with pytest.raises(CheckpointError, match=r"nan.gguf: tensor 'blk.1.attn_v.weight' holds NaN or Inf"):
        quantize_gguf(damaged, tmp_path / "nan", "int8", progress=False)
    assert not (tmp_path / "nan").exists()


def test_gguf_opened_for_int4_keeps_its_q4_0(tmp_path, monkeypatch):
    """A .gguf opened with quantize="int4" (generate.py / serve.py --quantize int4) converts once into an int4
    checkpoint of its own in the cache, Q4_0 values as stored (what scripts/quantize.py writes); the float
    conversion stays a separate entry."""
    from gemma3_jax.checkpoints.checkpoint import Checkpoint
    from gemma3_jax.checkpoints.quantized import stored_mode

    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    ckpt = Checkpoint.open(path, progress=False, quantize="int4", dtype=jnp.float32)
    assert stored_mode(ckpt.path) == "int4" and ckpt.path.name.endswith("-int4-float32")
    got = params(gemma3_jax.load_pretrained(ckpt.path, dtype=jnp.float32, progress=False))
    want = params(gemma3_jax.load_pretrained(quantize_gguf(path, tmp_path / "int4", "int4", jnp.float32,
                                                           progress=False), dtype=jnp.float32, progress=False))
    assert got.keys() == want.keys()
    assert all(np.array_equal(np.asarray(got[n]).astype(np.float32), np.asarray(want[n]).astype(np.float32)) for n in got)
    stamp = (ckpt.path / "model.safetensors").stat().st_mtime_ns
    assert Checkpoint.open(path, progress=False, quantize="int4", dtype=jnp.float32).path == ckpt.path
    assert (ckpt.path / "model.safetensors").stat().st_mtime_ns == stamp  # converted once
    plain = Checkpoint.open(path, progress=False)
    assert plain.path != ckpt.path and stored_mode(plain.path) is None
