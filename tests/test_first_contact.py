"""What a new user meets first: the CLI's defaults (chat mode from the checkpoint, dtype, cache length, help),
prompt sources, requests refused before the weights load, bad sampling values and API argument types, the
compilation cache and streaming that starts at the first token."""

import dataclasses
import importlib.util
import io
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("generate_cli_fc", ROOT / "scripts" / "generate.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
            "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] | trim }}"
            "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def base_ckpt(chat_ckpt):
    """A tiny multimodal checkpoint without a chat template (a base model)."""
    return chat_ckpt


@pytest.fixture(scope="module")
def it_ckpt(base_ckpt, tmp_path_factory):
    """The same with a chat template (an instruction-tuned model)."""
    path = tmp_path_factory.mktemp("it_ckpt")
    shutil.copytree(base_ckpt, path, dirs_exist_ok=True)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def text_ckpt(chat_text_ckpt):
    return chat_text_ckpt


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("fc_img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc, out, err) -> str:
    """The CLI's single ``error:`` line (and exit 2, nothing on stdout)."""
    assert rc == 2 and out == "", (rc, out, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: for requests that must be refused before it."""
    import gemma3_jax.runtime.generator as g

    def refuse(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(g, "load_pretrained", refuse)


# ---- defaults ----------------------------------------------------------------------------------------------

def test_chat_mode_follows_the_checkpoint(base_ckpt, it_ckpt):
    from gemma3_jax.checkpoints.checkpoint import Checkpoint

    base, it = Checkpoint.open(base_ckpt), Checkpoint.open(it_ckpt)
    assert not base.use_chat(None) and it.use_chat(None)
    assert base.use_chat(True) and not it.use_chat(False)
    raw = base.build_inputs(["Hello there"])[0][0]
    assert raw == base.tokenizer.encode("Hello there", add_bos=True)
    chat = it.build_inputs(["Hello there"])[0][0]
    assert it.tokenizer.decode(chat, skip_special_tokens=False).startswith("<bos><start_of_turn>user\nHello there")
    with pytest.raises(TypeError, match="chat must be"):
        it.use_chat("yes")


def test_cli_notes_raw_mode_on_a_base_model(base_ckpt, capsys):
    rc, out, err = run(capsys, "--model", base_ckpt, "--prompt", "Hello", "--max-new-tokens", 2)
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "no chat template" in notes[0]
    rc, out, err = run(capsys, "--model", base_ckpt, "--prompt", "Hello", "--max-new-tokens", 2, "--no-chat")
    assert rc == 0 and "note:" not in err  # asked for raw text: nothing to note


def test_system_text_needs_chat_mode(base_ckpt, capsys):
    assert "system text needs chat mode" in one_error(*run(capsys, "--model", base_ckpt, "--prompt", "Hi",
                                                              "--system", "Be brief."))


def test_api_defaults_to_float32_on_a_cpu(base_ckpt):
    import jax.numpy as jnp

    from gemma3_jax.runtime.generator import Generator, default_dtype

    assert default_dtype() == "float32"  # these tests run on a CPU
    gen = Generator.from_pretrained(base_ckpt, progress=False)
    assert gen.model.dtype == jnp.float32
    assert gen.engine.cache_length == 512  # the default 4096 capped at the model's max_position_embeddings


def test_help_shows_every_default_and_what_each_flag_does(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = re.findall(r"^\s+(--[a-z-]+)", text, re.M)
    assert {"--model", "--prompt", "--prompt-file", "--image", "--system", "--chat", "--no-chat", "--max-new-tokens",
            "--temperature", "--top-k", "--top-p", "--seed", "--dtype", "--cache-length", "--stop"} <= set(flags)
    options = text[text.index("options:"):]
    blocks = {b.split()[0]: b for b in re.split(r"\n  (?=--)", options)[1:]}
    for flag, block in blocks.items():
        assert len(block.split()) > 4, block  # it says what the flag does
    for flag in ("--model", "--image", "--chat", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                 "--dtype", "--cache-length", "--stop"):
        assert "default" in blocks[flag], blocks[flag]


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--prompt", "x", "--max-new-tokens", "many"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "many" in err[0]
    with pytest.raises(SystemExit):
        cli.parse_args(["--prompt", "x", "--prompt-file", "y"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not allowed with" in err[0]


# ---- prompt sources ----------------------------------------------------------------------------------------

def test_prompt_file_and_stdin(base_ckpt, tmp_path, capsys, monkeypatch):
    f = tmp_path / "prompt.txt"
    f.write_text("Hello there", encoding="utf-8")
    rc, out_file, err = run(capsys, "--model", base_ckpt, "--prompt-file", f, "--max-new-tokens", 4)
    assert rc == 0, err
    rc, out_arg, _ = run(capsys, "--model", base_ckpt, "--prompt", "Hello there", "--max-new-tokens", 4)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Hello there".encode())))
    rc, out_stdin, _ = run(capsys, "--model", base_ckpt, "--prompt-file", "-", "--max-new-tokens", 4)
    assert rc == 0 and out_file == out_arg == out_stdin


@pytest.mark.parametrize("case,match", [
    ("missing_file", "prompt file not found"),
    ("latin1_file", r"not UTF-8 text \(byte 9: b.\\xe9.\)"),
    ("surrogate_argv", r"--prompt is not valid UTF-8 \(character 3\)"),
    ("surrogate_stop", r"a stop string is not valid Unicode: character 2"),  # accepted before: it never matched
    ("surrogate_system", r"system is not valid Unicode: character 0"),  # named the rendered prompt before
    ("empty_file", "is empty"),
])
def test_bad_prompt_sources(case, match, base_ckpt, tmp_path, capsys, no_weights):
    f = tmp_path / "p.txt"
    if case == "latin1_file":
        f.write_bytes("hello caf\xe9".encode("latin-1"))
    if case == "empty_file":
        f.write_text(" \n")
    argv = {"surrogate_argv": ["--prompt", "abc\udcff"], "surrogate_stop": ["--prompt", "hi", "--stop", "ab\udcff"],
            "surrogate_system": ["--prompt", "hi", "--system", "\udcff"]}.get(
        case, ["--prompt-file", f if case != "missing_file" else tmp_path / "absent.txt"])
    assert re.search(match, one_error(*run(capsys, "--model", base_ckpt, *argv)))


# ---- refused before the weights load ----------------------------------------------------------------------

@pytest.mark.parametrize("case,match", [
    ("image_to_text_model", "text-only model"),
    ("too_long", r"prompt \(\d+ tokens\) \+ max_new_tokens \(500\) = \d+ exceeds the cache length 64"),
    ("beyond_positions", "cache length 100000 is beyond the model's 512 positions"),
    ("beyond_memory", r"cache length 512 needs ~[\d.]+ MiB \(weights [\d.]+ MiB \+ KV cache .* more than the"),
    ("zero_cache", "cache_length must be >= 1"),
    ("seed_too_big", "seed must be in"),
    ("negative_max_new", "max_new_tokens must be >= 1"),
    ("inf_temperature", "temperature must be finite"),
    ("nan_top_p", r"top_p must be in \(0, 1\]"),
    ("negative_top_k", "top_k must be >= 0"),
    ("bad_dtype", "unknown dtype 'int8'"),
])
def test_refused_before_the_weights_load(case, match, base_ckpt, text_ckpt, png, capsys, monkeypatch, no_weights):
    import gemma3_jax.checkpoints.checkpoint as ck

    base = ["--model", base_ckpt, "--prompt", "Hello there"]
    argv = {
        "image_to_text_model": ["--model", text_ckpt, "--prompt", "hi", "--image", png],
        "too_long": base + ["--cache-length", 64, "--max-new-tokens", 500],
        "beyond_positions": base + ["--cache-length", 100000],
        "beyond_memory": base + ["--cache-length", 512],
        "zero_cache": base + ["--cache-length", 0],
        "seed_too_big": base + ["--seed", 2**64],
        "negative_max_new": base + ["--max-new-tokens", -3],
        "inf_temperature": base + ["--temperature", "inf"],
        "nan_top_p": base + ["--temperature", 1, "--top-p", "nan"],
        "negative_top_k": base + ["--temperature", 1, "--top-k", -1],
        "bad_dtype": base + ["--dtype", "int8"],
    }[case]
    if case == "beyond_memory":
        monkeypatch.setattr(ck, "device_memory", lambda free=False: (2**20, "a 1 MiB test device"))
    if case in ("seed_too_big", "negative_max_new", "inf_temperature", "nan_top_p", "negative_top_k"):
        # checked by the Generator after loading: the CLI checks them before (no_weights makes sure)
        pass
    assert re.search(match, one_error(*run(capsys, *argv)))


def test_memory_estimate_counts_the_weights(base_ckpt):
    import jax.numpy as jnp

    import gemma3_jax
    from gemma3_jax.checkpoints.checkpoint import Checkpoint
    from gemma3_jax.model.config import param_bytes

    ck = Checkpoint.open(base_ckpt)
    model = gemma3_jax.load_pretrained(base_ckpt, dtype=jnp.float32, progress=False)
    import jax
    from flax import nnx

    real = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    assert param_bytes(ck.cfg, jnp.float32) == real
    assert param_bytes(ck.cfg, jnp.bfloat16) == real // 2


# ---- the API's argument types and values ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen(base_ckpt):
    from gemma3_jax.runtime.generator import Generator

    return Generator.from_pretrained(base_ckpt, dtype="float32", cache_length=64, progress=False)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(prompts=17), TypeError, "prompts must be a list of str, got int"),
    (dict(prompts=["ok", 3]), TypeError, "prompt 1 must be a str, got int"),
    (dict(prompts=b"bytes"), TypeError, "got bytes"),
    (dict(prompts=["a", "b"], images="a.png"), TypeError, "images must be a list"),
    (dict(images="absent.png"), ValueError, "image file not found: absent.png"),  # one prompt, one image
    (dict(prompts=["a", "b"], images=["a.png", "b.png"]), TypeError, r"images\[0\] must be a list"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(seed=2**64), ValueError, "seed must be in"),
    (dict(seed="1"), TypeError, "seed must be an int"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(temperature=1.0, top_k=1.5), TypeError, "top_k must be an int"),
    (dict(top_p=0.0), ValueError, "top_p must be in"),
    (dict(stop=5), TypeError, "stop must be a str or a list"),
    (dict(stop=["ok", None]), TypeError, "stop strings must be str"),
    (dict(stream="print"), TypeError, "stream must be a callable"),
    (dict(chat="yes"), TypeError, "chat must be True, False or None"),
    (dict(system=3, chat=True), TypeError, "system must be a str"),
])
def test_api_arguments_are_checked(gen, kwargs, exc, match):
    kwargs = {"prompts": "Hello", "max_new_tokens": 2, **kwargs}
    with pytest.raises(exc, match=match):
        gen.generate(kwargs.pop("prompts"), **kwargs)


def test_api_model_and_dtype_types(base_ckpt):
    from gemma3_jax.runtime.generator import Generator

    with pytest.raises(TypeError, match="model must be a path"):
        Generator.from_pretrained(123)
    with pytest.raises(TypeError, match="dtype must be a name"):
        Generator.from_pretrained(base_ckpt, dtype=16)
    with pytest.raises(ValueError, match="chunk must be in"):
        Generator.from_pretrained(base_ckpt, chunk=0)


def test_a_stop_string_is_one_string_not_its_characters(gen):
    out = gen.generate("Hello", max_new_tokens=8)
    text = out.texts[0]
    if len(text) < 3:
        pytest.skip("the random model's text is too short to cut")
    stop = text[1:3]
    cut = gen.generate("Hello", max_new_tokens=8, stop=stop)
    assert cut.texts[0] == text[: text.index(stop)]


@pytest.mark.parametrize("content,match", [
    ({"do_sample": True, "temperature": "hot"}, "generation_config.json: temperature must be a number"),
    ({"do_sample": True, "top_p": 2}, r"generation_config.json: top_p must be in \(0, 1\]"),
    ({"eos_token_id": ["<eos>"]}, "eos_token_id must be token ids"),
    ([1, 2], "holds a JSON list, expected an object"),
    ({"eos_token_id": [1, 2**40]}, r"eos_token_id must be token ids \(ints in \[0, 2\^31\)\)"),
    ({"do_sample": "false", "temperature": 0.7}, "generation_config.json: do_sample must be true or false, got 'false'"),
])
def test_bad_generation_config(content, match, tmp_path):
    import json

    from gemma3_jax.checkpoints.checkpoint import generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        generation_defaults(tmp_path)


# ---- compilation cache and streaming ----------------------------------------------------------------------

def test_compilation_cache_directory(monkeypatch, tmp_path):
    from gemma3_jax.runtime import compile_cache

    monkeypatch.setenv("GEMMA3_JAX_CACHE", str(tmp_path / "root"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.compilation_cache_dir() == tmp_path / "root" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "elsewhere"))
    assert compile_cache.compilation_cache_dir() == tmp_path / "elsewhere"
    for off in ("0", "off", ""):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.compilation_cache_dir() is None


def test_second_cli_run_reads_the_compilation_cache(base_ckpt, tmp_path):
    """Two CLI processes with one cache directory: the first writes its compiled prefill and decode steps, the
    second loads them (JAX's own log of each cache hit and miss, not compile times, which a loaded machine blurs)."""
    import os
    import subprocess

    env = {**os.environ, "GEMMA3_JAX_COMPILATION_CACHE": str(tmp_path / "xla"), "JAX_LOG_COMPILES": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(base_ckpt), "--prompt", "Hello",
           "--max-new-tokens", "3"]
    logs = []
    for _ in range(2):
        run_ = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run_.returncode == 0, run_.stderr[-2000:]
        assert re.search(r"compile ([\d.]+) s", run_.stderr)
        logs.append(run_.stderr)
        if not list((tmp_path / "xla").glob("jit_prefill*")):
            pytest.fail("the first run wrote no compiled prefill into the cache")
    assert list((tmp_path / "xla").glob("jit_decode*"))
    for step in ("jit_prefill", "jit_decode"):
        assert f"Persistent compilation cache hit for '{step}" not in logs[0], step
        assert f"Persistent compilation cache hit for '{step}" in logs[1], step


def test_a_cache_directory_that_cannot_be_made_is_one_note(base_ckpt, tmp_path):
    """The CLI sets the cache up before anything compiles and the Generator it builds does not again: one note (it
    was printed twice), and the run completes without the cache."""
    import os
    import subprocess

    (tmp_path / "a_file").write_text("")
    env = {**os.environ, "GEMMA3_JAX_COMPILATION_CACHE": str(tmp_path / "a_file")}
    run_ = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(base_ckpt),
                           "--prompt", "Hello", "--max-new-tokens", "2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert run_.returncode == 0, run_.stderr[-2000:]
    assert run_.stderr.count("note: compilation cache off") == 1, run_.stderr[-2000:]


def test_streaming_starts_with_single_steps(base_ckpt):
    """With a reader, the first decode chunks are one step each (then grow), and the tokens do not change."""
    import jax.numpy as jnp

    import gemma3_jax
    from gemma3_jax.runtime.engine import Engine

    model = gemma3_jax.load_pretrained(base_ckpt, dtype=jnp.float32, progress=False)
    engine = Engine(model, cache_length=64, chunk=8)
    prompt = [[2, 17, 33, 5]]
    plain = list(engine.generate_ids(prompt, max_new_tokens=30, stop_ids=()))
    streamed = list(engine.generate_ids(prompt, max_new_tokens=30, stop_ids=(), streaming=True))
    sizes = [c.shape[1] for c in streamed]
    assert sizes[:2] == [1, 1] and max(sizes) <= 8 and sum(sizes) == 30, sizes
    assert [c.shape[1] for c in plain][:2] == [1, 8]
    np.testing.assert_array_equal(np.concatenate(plain, axis=1), np.concatenate(streamed, axis=1))


def test_cli_stats_count_the_tokens_emitted(base_ckpt, capsys):
    rc, out, err = run(capsys, "--model", base_ckpt, "--prompt", "Hello", "--max-new-tokens", 12, "--no-chat")
    assert rc == 0, err
    assert "12 tokens out" in err or re.search(r"\b(\d+) tokens out", err)
    text = out.rstrip("\n")
    if len(text) < 4:
        pytest.skip("the random model's text is too short to cut")
    rc, cut_out, err = run(capsys, "--model", base_ckpt, "--prompt", "Hello", "--max-new-tokens", 12, "--no-chat",
                           "--stop", text[2:4])
    assert rc == 0 and cut_out.rstrip("\n") == text[: text.index(text[2:4])]
    emitted = int(re.search(r"(\d+) tokens out", err).group(1))
    assert emitted < 12


@pytest.mark.parametrize("key,value,match", [
    ("do_pan_and_scan", "false", "do_pan_and_scan must be true or false, got 'false'"),  # bool("false") was True
    ("image_mean", [float("nan")] * 3, "image_mean and image_std must be finite"),
    ("image_std", [0, 0, 0], "std non-zero"),
    ("resample", 99, r"resample must be a PIL resampling filter \(0-5\), got 99"),
    ("pan_and_scan_max_num_crops", 0, "pan-and-scan settings must be positive"),
])
def test_bad_processor_settings(key, value, match, base_ckpt, tmp_path):
    import json

    from gemma3_jax.preprocessing.processor import Processor

    shutil.copytree(base_ckpt, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    cfg["image_processor"][key] = value
    (tmp_path / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as e:
        Processor.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---- found by a hostile-input sweep ------------------------------------------------------------------------

def test_a_tiny_temperature_is_greedy(gen):
    """float32 logits / 1e-300 overflow to inf and NaN, and the NaN was 'sampled': below 1e-6 is greedy."""
    import jax
    import jax.numpy as jnp

    from gemma3_jax.runtime.sampling import SamplingParams, sample

    logits = jnp.asarray([[0.0, 1.0, 5.0, -2.0, 3.0]])
    for t in (1e-300, 5e-324, 1e-9):
        assert int(sample(logits, jax.random.key(0), SamplingParams(temperature=t))[0]) == 2
        assert int(sample(logits, jax.random.key(0), SamplingParams(temperature=t, top_p=0.5))[0]) == 2
    greedy = gen.generate("Hello", max_new_tokens=4)
    assert gen.generate("Hello", max_new_tokens=4, temperature=1e-300).token_ids == greedy.token_ids


def test_numpy_scalars_are_sampling_values(gen):
    from gemma3_jax.runtime.sampling import SamplingParams

    p = SamplingParams(np.float32(0.5), np.int64(5), np.float32(0.9))
    assert (type(p.temperature), type(p.top_k), type(p.top_p)) == (float, int, float)
    assert p == SamplingParams(0.5, 5, float(np.float32(0.9)))
    out = gen.generate("Hello", max_new_tokens=2, temperature=np.float32(0.7), top_k=np.int64(5), seed=np.int32(1))
    assert len(out.token_ids[0]) == 2


@pytest.mark.parametrize("eos,match", [
    ([1, 2**40], r"eos_token_id must be token ids \(ints in \[0, 2\^31\)\)"),
    (list(range(1, 11)), "at most 8 stop token ids in all"),
    ([1, 100_000], "eos_token_id 100000 is not below the vocabulary size"),
])
def test_bad_eos_ids_are_refused_when_opening(eos, match, base_ckpt, tmp_path, capsys, no_weights):
    import json

    shutil.copytree(base_ckpt, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    line = one_error(*run(capsys, "--model", tmp_path, "--prompt", "Hi"))
    assert re.search(match, line) and "generation_config.json" in line, line


def test_an_empty_chat_template_is_no_template(it_ckpt, tmp_path, capsys):
    """It rendered every prompt as '<bos>' alone; transformers treats it as no template."""
    from gemma3_jax.checkpoints.checkpoint import Checkpoint

    shutil.copytree(it_ckpt, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text(" \n")
    ck = Checkpoint.open(tmp_path)
    assert ck.chat_template is None and not ck.use_chat(None)
    assert ck.build_inputs(["Hello there"])[0][0] == ck.tokenizer.encode("Hello there", add_bos=True)


def test_templates_see_tools_documents_and_strftime_now(it_ckpt, tmp_path):
    """transformers passes tools=None and documents=None and defines strftime_now; templates use them."""
    import datetime

    from gemma3_jax.checkpoints.checkpoint import Checkpoint

    shutil.copytree(it_ckpt, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{{ tools | tojson }} {{ documents is none }} {{ strftime_now('%Y') }}"
        "{% for m in messages %}{{ m['content'][-1]['text'] }}{% endfor %}")
    ids = Checkpoint.open(tmp_path).build_inputs(["Hello"])[0][0]
    text = Checkpoint.open(tmp_path).tokenizer.decode(ids, skip_special_tokens=False)
    assert text == f"<bos>null True {datetime.date.today().year}Hello"


@pytest.mark.parametrize("case,match", [
    ("stdin_closed", "standard input is closed"),
    ("directory", "is a directory"),
    ("dev_null", r"the prompt \(prompt file /dev/null\) is empty"),
    ("empty_model", "the model path is empty"),
])
def test_more_bad_prompt_and_model_sources(case, match, base_ckpt, tmp_path, capsys, monkeypatch, no_weights):
    argv = {"stdin_closed": ["--model", base_ckpt, "--prompt-file", "-"],
            "directory": ["--model", base_ckpt, "--prompt-file", tmp_path],
            "dev_null": ["--model", base_ckpt, "--prompt-file", "/dev/null"],
            "empty_model": ["--model", "", "--prompt", "Hi"]}[case]
    if case == "stdin_closed":
        monkeypatch.setattr(sys, "stdin", None)
    assert re.search(match, one_error(*run(capsys, *argv)))


def test_a_gguf_suffix_in_capitals_is_a_gguf(monkeypatch, tmp_path):
    import gemma3_jax.checkpoints.gguf as gc
    from gemma3_jax.checkpoints.checkpoint import resolve_checkpoint

    seen = []
    monkeypatch.setattr(gc, "converted_checkpoint", lambda path, progress=True, int4_dtype=None: seen.append(path) or tmp_path)
    assert resolve_checkpoint("Model.GGUF") == tmp_path and seen == ["Model.GGUF"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="flash"), "attention must be one of auto, pallas, reference, got 'flash'"),
    (dict(dtype="fp32"), "dtype must be bfloat16 or float32, got 'fp32'"),
    (dict(dtype="int8"), "dtype must be bfloat16 or float32, got int8"),
])
def test_load_pretrained_names_a_bad_argument(kwargs, match, base_ckpt):
    import gemma3_jax

    with pytest.raises(ValueError, match=match):
        gemma3_jax.load_pretrained(base_ckpt, progress=False, **kwargs)


def test_a_batch_whose_cache_cannot_fit_is_refused(gen, monkeypatch):
    import gemma3_jax.checkpoints.checkpoint as ck

    monkeypatch.setattr(ck, "device_memory", lambda free=False: (2**16, "a 64 KiB test device free"))
    with pytest.raises(ValueError, match=r"cache length 64 needs ~[\d.]+ MiB \(a KV cache of [\d.]+ MiB for batch 3\)"):
        gen.generate(["a", "b", "c"], max_new_tokens=2)


# The text_config of google/gemma-3-4b-it's config.json sets only these keys; the rest are transformers' defaults.
HUB_4B_TEXT = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
               "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
HUB_4B_VISION = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                 "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}


def test_a_hub_config_with_few_keys_reads_as_transformers_reads_it():
    """Missing keys take transformers' defaults (head_dim 256, not hidden / heads = 320): the 4B as shipped is the
    4B preset, and every text field equals transformers' reading of the same dict."""
    import transformers

    from gemma3_jax.model.config import Gemma3Config
    from gemma3_jax.model.presets import preset

    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
           "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
           "eos_token_id": [1, 106], "text_config": HUB_4B_TEXT, "vision_config": HUB_4B_VISION}
    ours = Gemma3Config.from_hf_dict(raw)
    hf = transformers.Gemma3Config(**raw).text_config
    t = ours.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim, t.query_pre_attn_scalar,
            t.vocab_size, t.sliding_window, t.max_position_embeddings) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim,
        hf.query_pre_attn_scalar, hf.vocab_size, hf.sliding_window, hf.max_position_embeddings)
    assert list(t.layer_types) == list(hf.layer_types)
    assert (t.rope_global.rope_type, t.rope_global.factor, t.rope_global.theta) == ("linear", 8.0, 1_000_000.0)
    expect = preset("gemma3_4b")
    assert ours.vision == expect.vision
    assert dataclasses.replace(t, eos_token_id=expect.text.eos_token_id) == expect.text


def test_a_flat_rope_parameters_dict_is_refused():
    from gemma3_jax.model.config import ConfigError, Gemma3Config

    raw = {"model_type": "gemma3_text", "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
           "rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5000.0}}
    with pytest.raises(ConfigError, match="rope_parameters has no 'full_attention' / 'sliding_attention' entries"):
        Gemma3Config.from_hf_dict(raw)


@pytest.mark.parametrize("extra", ["model.language_model.rotary_emb.inv_freq",
                                   "model.language_model.layers.0.self_attn.rotary_emb.inv_freq",
                                   "model.vision_tower.vision_model.embeddings.position_ids"])
def test_buffers_of_older_exports_are_skipped_as_transformers_skips_them(extra, base_ckpt, tmp_path):
    """Older exports saved these buffers; they stopped the load as unexpected tensors, while transformers ignores
    them. Any other unknown tensor still does (tests/test_loading.py)."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file, save_file

    import gemma3_jax

    shutil.copytree(base_ckpt, tmp_path, dirs_exist_ok=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({**tensors, extra: np.arange(8, dtype=np.float32)}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    a = gemma3_jax.load_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    b = gemma3_jax.load_pretrained(base_ckpt, dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(np.asarray(a.text.embed[...]), np.asarray(b.text.embed[...]))
