"""scripts/generate.py and the Generator API: a working run, and one clear line for each bad input."""

import importlib.util
import shutil
from pathlib import Path

from fixtures import hf_checkpoints as hfc
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "scripts" / "generate.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def ckpt(chat_ckpt):
    return chat_ckpt


@pytest.fixture(scope="module")
def text_ckpt(chat_text_ckpt):
    return chat_text_ckpt


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = {
        "rgba": Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8)),
        "cmyk": Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)).convert("CMYK"),
        "gray": Image.fromarray(rng.integers(0, 256, (33, 31), dtype=np.uint8)),
        "one": Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)),
        "large": Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)),
    }
    paths = {}
    for name, im in out.items():
        paths[name] = d / (f"{name}.jpg" if name == "cmyk" else f"{name}.png")
        im.save(paths[name])
    (d / "notes.png").write_text("this is not an image")
    paths["text"] = d / "notes.png"
    return paths


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_generates_with_an_image(ckpt, images, capsys):
    rc, out, err = run(capsys, "--model", ckpt, "--prompt", "What is this?", "--image", images["rgba"],
                       "--max-new-tokens", 6, "--dtype", "float32", "--cache-length", 128)
    assert rc == 0, err
    assert out.endswith("\n")
    assert "prefill" in err and "tok/s" in err and "compile" in err


def test_generator_takes_any_image_mode(ckpt, images):
    """RGBA, CMYK, grayscale, 1x1 and a 4000x3000 image all work, in one batch."""
    from gemma3_jax.runtime.generator import Generator

    gen = Generator.from_pretrained(ckpt, dtype="float32", cache_length=128, progress=False)
    names = ["rgba", "cmyk", "gray", "one", "large"]
    out = gen.generate(["Describe."] * len(names), images=[[images[n]] for n in names], max_new_tokens=3)
    assert len(out.token_ids) == len(names) and all(len(t) == 3 for t in out.token_ids)
    again = gen.generate("Describe.", images=[images["cmyk"]], max_new_tokens=3)
    assert again.token_ids[0] == out.token_ids[1]  # same prompt and image alone: same greedy tokens


def test_generator_decodes_text_per_chunk_only_when_asked(ckpt, monkeypatch):
    """Without a stream or stop strings each row's text is decoded once, at the end; with a stream, per chunk (the
    random model's text is not prefix-stable, so what was streamed is not compared with the final text here)."""
    from gemma3_jax.runtime.generator import Generator

    gen = Generator.from_pretrained(ckpt, dtype="float32", cache_length=64, progress=False, chunk=2)
    calls = []
    decode = type(gen.tokenizer).decode  # a frozen dataclass: patch the class
    monkeypatch.setattr(type(gen.tokenizer), "decode",
                        lambda self, ids, **kw: calls.append(len(ids)) or decode(self, ids, **kw))
    out = gen.generate(["Hello", "Hi there"], max_new_tokens=7)
    assert calls == [7, 7] and len(out.texts) == 2
    calls.clear()
    streamed = []
    again = gen.generate(["Hello", "Hi there"], max_new_tokens=7, stream=lambda row, t: streamed.append((row, t)))
    assert again.texts == out.texts and len(calls) > 2
    assert {r for r, _ in streamed} <= {0, 1}


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_image", "image file not found"),
        ("not_an_image", "not an image file"),
        ("image_count", "2 <start_of_image> markers|markers"),
        ("text_only_image", "text-only model"),
        ("too_long", "exceeds the cache length"),
        ("empty_prompt", "empty"),
        ("bad_dtype", "unknown dtype 'int8'"),
        ("float16", "float16"),
        ("missing_files", "model.safetensors"),
        ("misshaped", "shape"),
        ("no_model", "neither a checkpoint directory nor a .gguf"),
    ],
)
def test_cli_bad_input_one_line_and_nonzero_exit(case, match, ckpt, text_ckpt, images, tmp_path, capsys):
    base = ["--model", ckpt, "--prompt", "Hello there", "--dtype", "float32", "--cache-length", 64]
    args = {
        "missing_image": base + ["--image", tmp_path / "nope.png"],
        "not_an_image": base + ["--image", images["text"]],
        "image_count": ["--model", ckpt, "--prompt", "<start_of_image> and <start_of_image>", "--image",
                        images["rgba"], "--dtype", "float32"],
        "text_only_image": ["--model", text_ckpt, "--prompt", "hi", "--image", images["rgba"], "--dtype", "float32"],
        "too_long": base + ["--max-new-tokens", 60],
        "empty_prompt": ["--model", ckpt, "--prompt", "   "],
        "bad_dtype": ["--model", ckpt, "--prompt", "hi", "--dtype", "int8"],
        "float16": ["--model", ckpt, "--prompt", "hi", "--dtype", "float16"],
        "missing_files": ["--model", tmp_path, "--prompt", "hi"],
        "misshaped": ["--model", tmp_path, "--prompt", "hi", "--dtype", "float32"],
        "no_model": ["--model", tmp_path / "absent", "--prompt", "hi"],
    }[case]
    if case == "missing_files":
        shutil.copy(ckpt / "config.json", tmp_path / "config.json")
    if case == "misshaped":
        hfc.rewrite_layout(ckpt, tmp_path, "v5", reshape="model.language_model.layers.2.mlp.up_proj.weight")
        for f in ckpt.iterdir():  # the rest of a complete checkpoint: only the weights are wrong
            if not (tmp_path / f.name).exists():
                shutil.copy(f, tmp_path / f.name)
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert out == ""  # nothing half-written
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and len([ln for ln in lines if ln.startswith("error")]) == 1
    import re

    assert re.search(match, lines[-1]), lines[-1]


def test_generation_config_defaults(tmp_path):
    """Sampling defaults come from generation_config.json; do_sample fills in transformers' own defaults."""
    import json

    from gemma3_jax.checkpoints.checkpoint import generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 64, "top_p": 0.95,
                                                                 "eos_token_id": [1, 106]}))
    assert generation_defaults(tmp_path) == {"temperature": 1.0, "top_k": 64, "top_p": 0.95, "eos_token_id": (1, 106)}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "eos_token_id": 1}))
    assert generation_defaults(tmp_path) == {"eos_token_id": (1,)}  # no do_sample: greedy
    assert generation_defaults(tmp_path / "absent") == {}


def test_generation_imports_no_torch(ckpt, images):
    """The CLI with an image runs in a process where torch and transformers cannot be imported."""
    import subprocess
    import sys

    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        f"sys.argv = ['generate.py', '--model', {str(ckpt)!r}, '--prompt', 'Hi', '--image', {str(images['gray'])!r}, "
        "'--max-new-tokens', '3', '--cache-length', '128']; "
        f"runpy.run_path({str(ROOT / 'scripts' / 'generate.py')!r}, run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tok/s" in run.stderr and "KV cache" in run.stderr
