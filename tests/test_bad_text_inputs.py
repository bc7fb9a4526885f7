"""Bad tokenizer files, chat templates and prompt text: each ends in one ValueError/TypeError naming the file or
value (no traceback of another type, no hang, no silent wrong result). Tiny tokenizers keep it fast."""

import json
import os
import shutil
import time

import numpy as np
import pytest

from gemma3_jax.preprocessing import chat_template as ct
from gemma3_jax.preprocessing.processor import Processor, render_chat
from gemma3_jax.preprocessing.tokenizer import Tokenizer

OFFICIAL_SHAPED = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n" \
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A Gemma BPE tokenizer with Gemma-3's special and image tokens, saved as transformers saves it."""
    from fixtures import hf_checkpoints as hfc

    d = tmp_path_factory.mktemp("tok")
    hfc.small_gemma_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    """A tokenizer.json with <bos>/<eos>/<unk> and letters only: no chat or image tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    d = tmp_path_factory.mktemp("bare")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *"abcdefgh"])}
    Backend(BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(str(d / "tokenizer.json"))
    return d


@pytest.fixture
def ckpt(tok_dir, tmp_path):
    """A fresh copy of the good tokenizer to damage."""
    shutil.copytree(tok_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_checkpoint(tok_dir)


# ---------------------------------------------------------------------------------------------- tokenizer files

@pytest.mark.parametrize("content", [b"", b'{"version": "1.0", "trunc', b"not json at all", b"[1, 2, 3]",
                                     b'{"a": 1}', b'{"version": "1.0", "model": {"type": "BPE"}}', b"\xff\xfe\x00"],
                         ids=["empty", "truncated", "not-json", "list", "other-object", "no-vocab", "not-utf8"])
def test_bad_tokenizer_json(ckpt, content):
    (ckpt / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizer\.json the tokenizers library can load"):
        Tokenizer.from_checkpoint(ckpt)


def test_truncated_real_size_tokenizer_json(ckpt):
    data = (ckpt / "tokenizer.json").read_bytes()
    (ckpt / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{ckpt}.*tokenizer.json"):
        Tokenizer.from_checkpoint(ckpt)


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01\x02", b"\n\x05hello"], ids=["empty", "garbage", "cut"])
def test_bad_tokenizer_model(ckpt, content):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.model").write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a sentencepiece model"):
        Tokenizer.from_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                  "chat_template.json", "config.json"])
@pytest.mark.parametrize("content,message", [(b"{oops", "is not valid JSON"), (b'["a", "b"]', "holds a JSON list"),
                                             (b'"text"', "holds a JSON str"), (b"\xff{}", "is not UTF-8"),
                                             (b"[" * 100_000, "nested too deeply|not valid JSON")],
                         ids=["not-json", "list", "string", "not-utf8", "deep"])
def test_bad_side_json(ckpt, name, content, message):
    (ckpt / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"{name}.*({message})|({message}).*{name}"):
        Tokenizer.from_checkpoint(ckpt)


def test_bad_side_json_values(ckpt):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": 2}))
    with pytest.raises(ValueError, match="tokenizer_config.json.*bos_token must be a str, got 2"):
        Tokenizer.from_checkpoint(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    (ckpt / "added_tokens.json").write_text(json.dumps({"<image_soft_token>": "x"}))
    with pytest.raises(ValueError, match="added_tokens.json.*'<image_soft_token>' must be an int >= 0, got 'x'"):
        Tokenizer.from_checkpoint(ckpt)
    (ckpt / "added_tokens.json").unlink()
    for value, message in ((7, "chat_template is a int"), ([1, 2], "items are not"), ({"a": 1}, "is a dict")):
        (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": value}))
        with pytest.raises(ValueError, match=f"chat_template.json: .*{message}"):
            Tokenizer.from_checkpoint(ckpt)


def test_missing_tokens(bare_dir, ckpt, tmp_path_factory):
    tok = Tokenizer.from_checkpoint(bare_dir)  # a text model without chat template needs <bos> only
    assert (tok.bos_id, tok.eos_id, tok.encode("abc", add_bos=True)[0]) == (2, 1, 2)
    d = tmp_path_factory.mktemp("bare_cases")
    shutil.copy(bare_dir / "tokenizer.json", d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match=f"tokenizer in {d} has no '<s>' token \\(bos_token\\)"):
        Tokenizer.from_checkpoint(d)
    (d / "tokenizer_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3", "vision_config": {}}))
    with pytest.raises(ValueError, match="multimodal checkpoint.*no <start_of_image> token"):
        Tokenizer.from_checkpoint(d)
    (d / "config.json").unlink()
    (d / "chat_template.jinja").write_text(OFFICIAL_SHAPED)
    with pytest.raises(ValueError, match="chat_template.jinja writes <start_of_turn>.*no <start_of_turn> token"):
        Tokenizer.from_checkpoint(d)
    # the image tokens exist but at other ids than config.json names: every image would be misread
    good = Tokenizer.from_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"vision_config": {}, "image_token_index": 5}))
    with pytest.raises(ValueError, match=f"maps <image_soft_token> to id {good.token_id('<image_soft_token>')} but "
                                         "config.json's image_token_index is 5"):
        Tokenizer.from_checkpoint(ckpt)
    ids = {k: good.token_id(p) for k, p in (("boi_token_index", "<start_of_image>"),
                                            ("eoi_token_index", "<end_of_image>"),
                                            ("image_token_index", "<image_soft_token>"))}
    (ckpt / "config.json").write_text(json.dumps({"vision_config": {}, **ids}))
    assert Tokenizer.from_checkpoint(ckpt).bos_id == good.bos_id


def test_chat_template_files(ckpt):
    (ckpt / "chat_template.jinja").write_bytes(b"{{ bos_token }}\xe9t\xe9")
    with pytest.raises(ValueError, match=r"chat_template.jinja is not UTF-8 text \(byte 15"):
        Tokenizer.from_checkpoint(ckpt)
    (ckpt / "chat_template.jinja").write_text("{{ bos_token }}\n{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(ValueError, match=r"chat_template.jinja, line 3: chat template syntax error"):
        Tokenizer.from_checkpoint(ckpt)
    (ckpt / "chat_template.jinja").unlink()
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{% if x %}\n{{ x }}"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json, line 2: chat template syntax error.*endif"):
        Tokenizer.from_checkpoint(ckpt)
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 28, "width": 28}}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json, line 2: chat template syntax error"):
        Processor.from_pretrained(ckpt)


def test_sentencepiece_added_tokens(tmp_path):
    """tokenizer.model + added_tokens.json (a multimodal checkpoint without tokenizer.json): the appended
    <image_soft_token> is one id; ids beyond the vocabulary decode to nothing instead of sentencepiece's IndexError."""
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text("a b c ab abc bca cab\n" * 50)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=12, model_type="bpe", control_symbols=["<start_of_image>"],
                                   bos_piece="<bos>", eos_piece="<eos>", minloglevel=2)
    n = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).get_piece_size()
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<image_soft_token>": n}))
    tok = Tokenizer.from_checkpoint(tmp_path)
    ids = tok.encode("ab<start_of_image><image_soft_token><image_soft_token>c")
    assert ids.count(n) == 2 and tok.token_id("<start_of_image>") in ids and tok.vocab_size == n + 1
    assert tok.decode(ids, skip_special_tokens=False).endswith("<image_soft_token><image_soft_token>c")
    assert tok.decode([*ids, n + 5]) == tok.decode(ids)


# ---------------------------------------------------------------------------------------------------- templates

def render(template, **kw):
    return render_chat([{"role": "user", "content": "hi"}], ct.ChatTemplate(template, "/ckpt/chat_template.jinja"),
                       **kw)


@pytest.mark.parametrize("template,message", [
    ("{{ raise_exception('no tools here') }}", r"chat template \(/ckpt/chat_template.jinja\): no tools here"),
    ("\n{{ foo['x']['y'] }}", r"line 2: rendering failed: UndefinedError: 'foo' is undefined"),
    ("{{ 1 + 'a' }}", r"line 1: rendering failed: TypeError"),
    ("{{ 1 // 0 }}", r"rendering failed: ZeroDivisionError"),
    ("{{ messages[0]['content'].__class__.__mro__[1].__subclasses__() }}", r"rendering failed: SecurityError"),
    ("{% include 'other.jinja' %}", r"rendering failed: TypeError: no loader"),
    ("{{ range(10**9) | list }}", r"Range too big"),
    ("{{ lipsum(1000000000) }}", r"'lipsum' is undefined"),
    ("{{ messages[5]['content'] | trim }}", r"UndefinedError"),
])
def test_template_runtime_errors(template, message):
    with pytest.raises(ValueError, match=message) as e:
        render(template)
    assert e.type is ValueError and "/ckpt/chat_template.jinja" in str(e.value)


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10000000000 }}",
    "{{ [1, 2] * 10**9 }}",
    "{{ 7 ** (10 ** 10) }}",
    "{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
    "{% set ns = namespace(s='xy') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='xy') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ 'x' | indent(1000000000, true) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '%*d' % (1000000000, 1) }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=1000000000) }}",
    "{{ '%1000000000d' | format(1) }}",
    "{% set s = 'x' * 100000 %}{{ s | replace('', s) }}",
    "{% set s = 'x' * 100000 %}{{ s.replace('', s) }}",
    "{{ range(100000) | batch(1000000000) | list }}",
    "{{ messages | tojson(indent=1000000000) }}",
], ids=lambda t: t[:40])
def test_template_huge_values_refused_at_once(template):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="exceeds|above|more than"):
        render(template)
    assert time.monotonic() - t0 < 2, "refused before building the value, not after"


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% if i == -1 %}{% break %}{% endif %}{% endfor %}"
    "{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i * j }}{% endfor %}{% endfor %}",
], ids=["nested-range", "nested-string", "loop-controls", "wide-macro", "busy-output"])
def test_template_without_bound_times_out(template, monkeypatch):
    monkeypatch.setattr(ct, "RENDER_TIMEOUT_S", 0.3)
    monkeypatch.setattr(ct, "MAX_LENGTH", 1 << 30)  # the deadline, not the output cap, must stop these
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"chat template \(/ckpt/chat_template.jinja\)(, line 1)?: rendering took "
                                         r"longer than 0.3 s"):
        render(template)
    assert time.monotonic() - t0 < 3


def test_template_deep_recursion_and_output_cap(monkeypatch):
    with pytest.raises(ValueError, match="line 1: rendering failed with RecursionError"):
        render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    monkeypatch.setattr(ct, "MAX_LENGTH", 100_000)
    with pytest.raises(ValueError, match="rendering produced more than 100008 characters"):  # + 4 * len("hi")
        render("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}")
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="messages are nested too deeply"):
        render_chat([{"role": "user", "content": [{"type": "text", "text": "x", "extra": deep}]}], "{{ 1 }}")


FEATURES = """{{ bos_token }}{% set ns = namespace(n=0) %}
{%- for m in messages if m['role'] != 'system' -%}
  {% set ns.n = ns.n + 1 %}[{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}] {{ m['role'] ~ ':' ~ m['content'] }}
  {%- if loop.first %} first{% endif %}
{%- else %}none
{%- endfor %}
{% for k, v in {'a': 1, 'b': 2}.items() | sort %}{{ k }}={{ v }}{{ ',' if not loop.last }}{% endfor %}
{% for item in [{'c': [{'c': []}]}, {'c': []}] recursive %}({{ loop.depth }}{{ loop(item['c']) }}){% endfor %}
{{ messages | map(attribute='role') | join('|') }} {{ '%-4s|' % 'ab' }}{{ '{:>4}'.format(7) }} {{ ns.n * 3 }}
{{ 'x' | center(9) }}{{ 'abc' | replace('b', 'BB') }} {{ (messages | tojson)[:20] }} {{ [1, 2] * 2 }} {{ 2 ** 10 }}
{% for i in range(3) %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}
"""


def test_bounds_leave_templates_unchanged():
    """Every construct the bounds touch (loops, ~, +, *, %, **, filters, methods) renders as plain jinja2's sandbox."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    for template in (FEATURES, OFFICIAL_SHAPED):
        want = env.from_string(template).render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
        got = render_chat(messages, template)
        assert got == want and len(got) > 40


# --------------------------------------------------------------------------------------------------- prompt text

def test_invalid_unicode_prompt(tok, tok_dir):
    argv_text = os.fsdecode(b"caf\xe9 au lait")  # what sys.argv holds for invalid UTF-8 bytes
    with pytest.raises(ValueError, match=r"prompt is not valid Unicode: character 3 is '\\udce9'"):
        tok.encode(argv_text)
    with pytest.raises(ValueError, match="character 3"):
        Processor()([argv_text], tokenizer=tok)
    text = render_chat([{"role": "user", "content": argv_text}])
    with pytest.raises(ValueError, match=f"character {text.index(argv_text) + 3}"):
        tok.encode(text)


@pytest.mark.parametrize("prompt", [5, b"bytes", None, ["a"]], ids=["int", "bytes", "none", "list"])
def test_prompt_not_a_str(tok, prompt):
    with pytest.raises(TypeError, match=f"prompt must be a str, got {type(prompt).__name__}"):
        tok.encode(prompt)
    if not isinstance(prompt, list):
        with pytest.raises(TypeError, match="texts must be a str or a list of str|prompt 0 must be a str"):
            Processor()(prompt, tokenizer=tok)
    with pytest.raises(TypeError, match=f"prompt 1 must be a str, got {type(prompt).__name__}"):
        Processor()(["fine", prompt], tokenizer=tok)


@pytest.mark.parametrize("messages,message", [
    ("hi", "messages must be a list"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    (["hi"], "message 0 must be a dict"),
    ([{"content": "hi"}], "message 0: 'role' must be a str, got None"),
    ([{"role": "user", "content": 5}], "message 0: 'content' must be a str or a list of items, got int"),
    ([{"role": "user", "content": None}], "got NoneType"),
    ([{"role": "user", "content": b"hi"}], "got bytes"),
    ([{"role": "user", "content": [{"text": "hi"}]}], "message 0, item 0: expected a dict with a 'type'"),
    ([{"role": "user", "content": ["hi"]}], "message 0, item 0: expected a dict"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "item 0: a text item's 'text' must be a str, got int"),
    ([{"role": "user", "content": [{"type": "text"}]}], "got NoneType"),
], ids=lambda v: str(v)[:30] if isinstance(v, str) else None)
def test_bad_messages(messages, message):
    for template in (None, OFFICIAL_SHAPED):
        with pytest.raises(TypeError, match=message):
            render_chat(messages, template)


def test_decode_bad_ids(tok):
    ids = tok.encode("abc")
    assert tok.decode(np.asarray(ids, np.int64)) == tok.decode(ids) == "abc"
    assert tok.decode([*ids, tok.vocab_size + 10]) == "abc"  # past the vocabulary: nothing, as in transformers
    with pytest.raises(TypeError, match="integer token ids, got 'a'"):
        tok.decode(["a"])
    with pytest.raises(TypeError, match="got 1.5"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([2**70])


def test_template_compiled_once_and_still_bounded(monkeypatch):
    """A checkpoint's template keeps its compiled code across renders (every chat request renders it), and a
    render from that code still has its own deadline and output cap."""
    source = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% for i in range(n) %}{% for j in range(n) %}" \
             "{% endfor %}{% endfor %}"
    t = ct.ChatTemplate(source, "/ckpt/chat_template.jinja")
    assert ct.render(t, {"messages": [{"content": "a"}], "n": 1}) == "a"
    code = t.code
    assert code is not None
    parses = []
    monkeypatch.setattr(ct, "_bound", lambda ast: parses.append(ast) or ast)
    assert ct.render(t, {"messages": [{"content": "b"}], "n": 1}) == "b"
    assert t.code is code and not parses, "the second render compiled the template again"
    monkeypatch.setattr(ct, "RENDER_TIMEOUT_S", 0.3)
    with pytest.raises(ValueError, match=r"\(/ckpt/chat_template.jinja\).*longer than 0.3 s"):
        ct.render(t, {"messages": [], "n": 100_000})
    assert not parses
