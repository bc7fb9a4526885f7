"""A checkpoint with the real file layout of ``google/gemma-3-4b-it`` (fixtures/real_layout.py: tiny random weights,
the real tokenizer) through every path a user takes, each in a subprocess where torch and transformers cannot be
imported (tests/torchless), as on a machine where they were never installed; transformers, in this process,
gives the expected answers.

The subprocesses share one JAX compilation cache, so a program compiled by one is loaded by the next."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fixtures import real_layout as rl
from conftest import TOL, rel_err

# One xdist worker runs them all: the fixture, transformers' models and the compiled programs are shared.
pytestmark = pytest.mark.xdist_group("real_layout")

ROOT = Path(__file__).resolve().parent.parent
TORCHLESS = Path(__file__).resolve().parent / "torchless"
GENERATE = ROOT / "scripts" / "generate.py"
SYSTEM, PROMPT = "Answer in one short sentence.", "What differs between these two pictures?"
# How Google prompts the pretrained multimodal model: raw text with image markers (model card of gemma-3-4b-pt).
RAW_PROMPT = "<start_of_image><start_of_image> In these two images, taken on the same afternoon in a small town by the sea, there is"
NEW = 8  # tokens generated per run
CACHE = 256
SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)
# Real text for the tokenizer: several scripts, digits, whitespace runs, emoji, and special tokens written in it.
TEXTS = [
    "<start_of_turn>user\nWhat is 12 + 30?<end_of_turn>\n<start_of_turn>model\n42.<end_of_turn>",
    "Grüße aus Köln — ¿qué tal?  Tab:\there.\n\n\nZürich 東京 🚀 <start_of_image><image_soft_token><end_of_image>",
    "def f(x):\n    return x ** 2  # ok\n<eos><pad>",
]


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def layout(tmp_path_factory):
    """Every variant of the fixture written once, two test images, and a shared JAX compilation cache."""
    from PIL import Image

    root = tmp_path_factory.mktemp("real_layout")
    paths = {v: rl.write_checkpoint(root / f"gemma-3-4b-{v}", v) for v in rl.VARIANTS}
    rng = np.random.default_rng(0)
    a, b = root / "a.png", root / "b.png"
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(a)  # wider than tall: resized
    Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))).save(b)  # grayscale
    return SimpleNamespace(root=root, images=[a, b], jax_cache=root / "jax_cache", **paths)


@pytest.fixture(scope="session")
def hf_it(layout):
    """transformers' model (float32) and processor of the instruction-tuned fixture."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(layout.it, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(layout.it)


@pytest.fixture(scope="session")
def hf_text(layout):
    """transformers' model (float32) and tokenizer of the text-only fixture."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(layout.text, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(layout.text)


def torchless_env(layout) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(TORCHLESS), str(ROOT)]),
        PYTHONIOENCODING="utf-8",
        JAX_PLATFORMS="cpu",
        GEMMA3_JAX_COMPILATION_CACHE=str(layout.jax_cache),
        JAX_COMPILATION_CACHE_DIR=str(layout.jax_cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def run_torchless(layout, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` without torch and transformers; fails on a non-zero status or a traceback."""
    proc = subprocess.run([sys.executable, *args], env=torchless_env(layout), cwd=layout.root, capture_output=True,
                          text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def cli(layout, model, *flags: str) -> str:
    """The CLI's stdout (the completion and a newline)."""
    out = run_torchless(layout, str(GENERATE), "--model", str(model), "--dtype", "float32",
                        "--cache-length", str(CACHE), "--max-new-tokens", str(NEW), *flags).stdout
    assert out.endswith("\n"), out
    return out[:-1]


def chat_messages(images, system=SYSTEM, prompt=PROMPT) -> list[dict]:
    """The conversation the CLI builds for ``--system S --image ... --prompt P``: images first in the user turn."""
    return [{"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": prompt}]}]


def hf_greedy(model, tokenizer, inputs) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def pil(paths):
    from PIL import Image

    return [Image.open(p) for p in paths]


# ------------------------------------------------------------------------------- the fixture is what it says

def test_torchless_blocks_torch_and_transformers(layout):
    code = "import importlib.util, sys; assert importlib.util.find_spec('torch') is None; import " + "{}"
    for module in ("torch", "transformers", "transformers.models.gemma3", "torch.nn"):
        blocked = subprocess.run([sys.executable, "-c", code.format(module)], env=torchless_env(layout),
                                 capture_output=True, text=True)
        assert blocked.returncode == 1 and "ModuleNotFoundError" in blocked.stderr, (module, blocked.stderr)
    free = subprocess.run([sys.executable, "-c", "import torch, transformers"], capture_output=True, text=True)
    assert free.returncode == 0, free.stderr


def test_transformers_loads_every_variant(layout):
    import torch
    from transformers import AutoProcessor, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    for variant, cls in (("it", Gemma3ForConditionalGeneration), ("base", Gemma3ForConditionalGeneration),
                         ("text", Gemma3ForCausalLM)):
        _, info = cls.from_pretrained(getattr(layout, variant), dtype=torch.float32, output_loading_info=True)
        assert {k: v for k, v in info.items() if v} == {}, (variant, info)
    index = json.loads((layout.it / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in rl.random_weights("it").values())
    from safetensors import safe_open

    with safe_open(layout.it / "model-00001-of-00002.safetensors", "np") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    # The older layout's template reaches transformers' processor; the base variant has none anywhere.
    assert AutoProcessor.from_pretrained(layout.json).chat_template == rl.CHAT_TEMPLATE
    assert not list(layout.base.glob("chat_template*"))
    assert not any("chat_template" in json.loads(f.read_text()) for f in layout.base.glob("*.json"))


def test_tokenizer_model_is_sentencepiece_proto(layout, hf_text):
    """The hand-encoded tokenizer.model is byte for byte what protobuf writes, and gives transformers' ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from gemma3_jax.preprocessing.tokenizer import Tokenizer

    raw = (layout.it / "tokenizer.model").read_bytes()
    m = pb.ModelProto.FromString(raw)
    assert m.SerializeToString() == raw and len(m.pieces) == rl.TOKENIZER_SIZE
    assert (m.trainer_spec.model_type, m.trainer_spec.byte_fallback, m.normalizer_spec.add_dummy_prefix) == (2, True, False)
    sp_only = layout.root / "sp-only"
    shutil.copytree(layout.text, sp_only, dirs_exist_ok=True)
    (sp_only / "tokenizer.json").unlink()
    ours, hf = Tokenizer.from_checkpoint(sp_only), hf_text[1]
    assert type(ours.backend).__name__ == "_SentencePiece"
    for text in TEXTS[:1] + [t.replace("<image_soft_token>", "") for t in TEXTS[1:]]:
        ids = ours.encode(text, add_bos=True)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text


def test_tokenizer_matches_transformers(layout, hf_it):
    from gemma3_jax.preprocessing.tokenizer import Tokenizer

    hf = hf_it[1].tokenizer
    ours = Tokenizer.from_checkpoint(layout.it)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (2, 1, 0, rl.IMAGE_TOKEN + 1)
    assert ours.token_id("<image_soft_token>") == hf.image_token_id == rl.IMAGE_TOKEN
    assert ours.chat_template == rl.CHAT_TEMPLATE
    for text in TEXTS:
        ids = ours.encode(text, add_bos=True)
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


def test_decode_skips_image_markers(layout, hf_it):
    """transformers counts the extra_special_tokens of tokenizer_config.json (boi, eoi, image token) as special."""
    from gemma3_jax.preprocessing.tokenizer import Tokenizer

    hf = hf_it[1].tokenizer
    ids = hf("Look: <start_of_image><image_soft_token><end_of_image> done.")["input_ids"]
    assert hf.decode(ids, skip_special_tokens=True) == "Look:  done."
    assert Tokenizer.from_checkpoint(layout.it).decode(ids, skip_special_tokens=True) == "Look:  done."


def test_processor_matches_transformers(layout, hf_it):
    """Chat text (both sides render the checkpoint's template), ids and pixels equal Gemma3Processor's."""
    from gemma3_jax.checkpoints.checkpoint import Checkpoint
    from gemma3_jax.preprocessing.processor import Processor

    hf = hf_it[1]
    ckpt = Checkpoint.open(layout.it)
    ours = Processor.from_pretrained(layout.it)
    images = pil(layout.images)
    turns = [chat_messages(images),
             [{"role": "system", "content": SYSTEM},  # a plain-string system turn and a second round
              {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": " Hi "}]},
              {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": images[1]}]}]]
    for messages in turns:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages) == text
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="np")
        ids, pixels = ours([text], [[i for m in messages if isinstance(m["content"], list) for i in
                                     (c["image"] for c in m["content"] if c["type"] == "image")]], tokenizer=ckpt.tokenizer)
        assert ids == want["input_ids"].tolist()
        np.testing.assert_array_equal(pixels, want["pixel_values"])
    # What the CLI and Generator build from --system/--image/--prompt is the same conversation.
    ids, pixels = ckpt.build_inputs([PROMPT], [layout.images], system=SYSTEM)
    want = hf.apply_chat_template(chat_messages(images), add_generation_prompt=True, tokenize=True,
                                  return_dict=True, return_tensors="np")
    assert ids == want["input_ids"].tolist()
    np.testing.assert_array_equal(pixels, want["pixel_values"])
    # Raw text with markers: <bos> added, each marker expanded.
    raw = "A <start_of_image> and a <start_of_image>, compared."
    want = hf(text=raw, images=images, return_tensors="np")
    ids, pixels = ckpt.build_inputs([raw], [images], chat=False)
    assert ids == want["input_ids"].tolist()
    np.testing.assert_array_equal(pixels, want["pixel_values"])
    # A conversation whose roles do not alternate is refused by the template itself, on both sides.
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template(bad, tokenize=False)


# ---------------------------------------------------------------------------------- user paths, torch-free

@pytest.fixture(scope="session")
def expected_chat(layout, hf_it):
    """transformers' greedy completion of the CLI's conversation (system text, two images, prompt)."""
    model, proc = hf_it
    inputs = proc.apply_chat_template(chat_messages(pil(layout.images)), add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt")
    text = hf_greedy(model, proc.tokenizer, inputs)
    assert text.strip(), "transformers generated no text: the comparison would say nothing"
    return text


def chat_flags(layout) -> list[str]:
    return ["--system", SYSTEM, "--prompt", PROMPT, *(f for i in layout.images for f in ("--image", str(i)))]


def test_cli_chat_two_images_matches_transformers(layout, expected_chat):
    assert cli(layout, layout.it, *chat_flags(layout), "--temperature", "0") == expected_chat


def test_cli_chat_template_json(layout, expected_chat):
    """The older layout (chat_template.json, no .jinja) renders the same conversation: same weights, same text."""
    assert not (layout.json / "chat_template.jinja").exists()
    assert cli(layout, layout.json, *chat_flags(layout), "--temperature", "0") == expected_chat


API_SCRIPT = r"""
import json, sys
import numpy as np
import jax.numpy as jnp
import gemma3_jax
from gemma3_jax.checkpoints.checkpoint import Checkpoint
from gemma3_jax.runtime.generator import Generator

path, a, b, system, prompt, sampling, out = sys.argv[1:]
sampling = json.loads(sampling)
# The README's example (its sampling values those of the CLI test: one compiled decode step serves both).
gen = Generator.from_pretrained(path, dtype="float32", cache_length=256)
streamed = []
readme = gen.generate(["Describe this image."], images=[[a]], max_new_tokens=8, **sampling,
                      stream=lambda row, text: streamed.append(text))
greedy = gen.generate(["Describe this image."], images=[[a]], max_new_tokens=8, temperature=0.0)
sampled = gen.generate([prompt], images=[[a, b]], system=system, max_new_tokens=8, **sampling)
# load_pretrained + forward on the CLI's prompt.
ids, pixels = Checkpoint.open(path).build_inputs([prompt], [[a, b]], system=system)
model = gemma3_jax.load_pretrained(path, dtype=jnp.float32)
logits = model(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.ones((1, len(ids[0])), jnp.int32))
np.save(out + ".npy", np.asarray(logits, np.float32))
json.dump({"readme": readme.texts[0], "readme_tokens": readme.token_ids[0], "streamed": "".join(streamed),
           "greedy": greedy.texts[0], "sampled": sampled.texts[0], "sampled_tokens": sampled.token_ids[0],
           "ids": ids, "defaults": {k: list(v) if isinstance(v, tuple) else v for k, v in gen.defaults.items()}}, open(out, "w"))
"""


@pytest.fixture(scope="session")
def api_run(layout):
    """The Generator API of the README and load_pretrained + forward, in one torch-free process."""
    out = layout.root / "api.json"
    a, b = map(str, layout.images)
    run_torchless(layout, "-c", API_SCRIPT, str(layout.it), a, b, SYSTEM, PROMPT, json.dumps(SAMPLING), str(out))
    return json.loads(out.read_text()), np.load(str(out) + ".npy")


def test_generator_api_of_the_readme(layout, hf_it, api_run):
    res, _ = api_run
    assert res["streamed"] == res["readme"] and 1 <= len(res["readme_tokens"]) <= NEW
    assert res["readme"].strip()
    # Without sampling arguments the checkpoint's generation_config.json decides, as in transformers.
    assert res["defaults"] == {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "eos_token_id": rl.EOS_IDS}
    model, proc = hf_it
    messages = [{"role": "user", "content": [{"type": "image", "image": pil(layout.images[:1])[0]},
                                             {"type": "text", "text": "Describe this image."}]}]
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    assert res["greedy"] == hf_greedy(model, proc.tokenizer, inputs)


def test_load_pretrained_forward_matches_transformers(layout, hf_it, api_run):
    import torch

    res, logits = api_run
    model, proc = hf_it
    want = proc.apply_chat_template(chat_messages(pil(layout.images)), add_generation_prompt=True, tokenize=True,
                                    return_dict=True, return_tensors="pt")
    assert res["ids"] == want["input_ids"].tolist()
    with torch.no_grad():
        ref = model(**want).logits.numpy()
    assert logits.shape == ref.shape == (1, len(res["ids"][0]), rl.VOCAB)
    assert rel_err(logits, ref) <= TOL


def test_cli_sampling_and_stop(layout, hf_it, api_run):
    """Sampled with the API's settings, cut before the first occurrence of a string the sampled text holds: the
    first two characters of its third token, so the stop fires in the middle of the stream."""
    sampled, tokens = api_run[0]["sampled"], api_run[0]["sampled_tokens"]
    head = hf_it[1].tokenizer.decode(tokens[:2], skip_special_tokens=True)
    assert len(tokens) == NEW and sampled.startswith(head) and len(sampled) >= len(head) + 2, (sampled, tokens)
    stop = sampled[len(head) : len(head) + 2]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SAMPLING.items()]
    out = cli(layout, layout.it, *chat_flags(layout), *flags, f"--stop={stop}")
    assert out == sampled[: sampled.find(stop)]


def test_cli_no_chat_base_model(layout, hf_it):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(layout.base, dtype=torch.float32).eval()
    proc = hf_it[1]  # the base variant's tokenizer and image processor files are the same files
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (layout.base / name).read_bytes() == (layout.it / name).read_bytes(), name
    want = hf_greedy(model, proc.tokenizer, proc(text=RAW_PROMPT, images=pil(layout.images), return_tensors="pt"))
    assert want.strip()
    images = [f for i in layout.images for f in ("--image", str(i))]
    assert cli(layout, layout.base, "--no-chat", "--prompt", RAW_PROMPT, *images) == want


def test_cli_text_only_model(layout, hf_text):
    model, tok = hf_text
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")
    want = hf_greedy(model, tok, inputs)
    assert want.strip()
    assert cli(layout, layout.text, "--system", SYSTEM, "--prompt", PROMPT, "--temperature", "0") == want


# ------------------------------------------------------------------------------ bad inputs, torch-free

MAIN_SCRIPT = r"""
import contextlib, importlib.util, io, json, sys

spec = importlib.util.spec_from_file_location("generate", sys.argv[1])
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = generate.main(argv)
        except SystemExit as e:
            rc = e.code
    results.append([rc, err.getvalue()])
json.dump(results, open(sys.argv[3], "w"))
"""


def _linked_copy(src: Path, dst: Path) -> Path:
    """The checkpoint's files hard-linked (no 70 MB copy; a symlink would point outside the directory)."""
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
    return dst


def _damaged(layout, tmp: Path) -> dict[str, Path]:
    out = {}
    shard2 = "model-00002-of-00002.safetensors"
    d = out["missing shard"] = _linked_copy(layout.it, tmp / "missing-shard")
    (d / shard2).unlink()
    d = out["cut shard"] = _linked_copy(layout.it, tmp / "cut-shard")
    data = (d / shard2).read_bytes()
    (d / shard2).unlink()
    (d / shard2).write_bytes(data[: len(data) // 2])
    d = out["outside shard"] = _linked_copy(layout.it, tmp / "outside-shard")
    os.replace(d / shard2, tmp / "outside.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "../outside.safetensors" if v == shard2 else v for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    d = out["bad template json"] = _linked_copy(layout.json, tmp / "bad-template-json")
    text = (d / "chat_template.json").read_text()
    (d / "chat_template.json").unlink()
    (d / "chat_template.json").write_text(text[: len(text) // 2])
    d = out["cut tokenizer"] = _linked_copy(layout.it, tmp / "cut-tokenizer")
    text = (d / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").write_bytes(text[:5000])
    (tmp / "fake.png").write_text("not a picture")
    return out


def test_cli_bad_inputs_one_line(layout, tmp_path):
    """Bad inputs on the real layout, torch-free: each ends in one ``error:`` line naming the file or value, status 2."""
    bad = _damaged(layout, tmp_path)
    a, b = map(str, layout.images)
    common = ["--dtype", "float32", "--cache-length", str(CACHE), "--max-new-tokens", "2"]
    cases = {  # argv -> what the one line must name
        "image for text-only": ([*common, "--model", str(layout.text), "--image", a, "--prompt", "Hi"],
                                str(layout.text)),
        "missing shard": ([*common, "--model", str(bad["missing shard"]), "--prompt", "Hi"],
                          "model-00002-of-00002.safetensors"),
        "cut shard": ([*common, "--model", str(bad["cut shard"]), "--prompt", "Hi"], "model-00002-of-00002.safetensors"),
        "outside shard": ([*common, "--model", str(bad["outside shard"]), "--prompt", "Hi"], "outside.safetensors"),
        "bad template json": ([*common, "--model", str(bad["bad template json"]), "--prompt", "Hi"],
                              "chat_template.json"),
        "cut tokenizer": ([*common, "--model", str(bad["cut tokenizer"]), "--prompt", "Hi"], "tokenizer.json"),
        "markers != images": ([*common, "--model", str(layout.it), "--image", a, "--image", b,
                               "--prompt", "Only <start_of_image> here."], "<start_of_image>"),
        "not an image": ([*common, "--model", str(layout.it), "--image", str(tmp_path / "fake.png"), "--prompt", "Hi"],
                         "fake.png"),
    }
    out = tmp_path / "results.json"
    run_torchless(layout, "-c", MAIN_SCRIPT, str(GENERATE), json.dumps([argv for argv, _ in cases.values()]), str(out))
    for (name, (_, names)), (rc, err) in zip(cases.items(), json.loads(out.read_text())):
        lines = [line for line in err.splitlines() if not line.startswith("loading weights")]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], (name, rc, err)
