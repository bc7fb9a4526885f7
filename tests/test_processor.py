"""gemma3_jax.preprocessing.processor against transformers' Gemma3Processor (PIL image backend), built offline: a Gemma BPE
tokenizer from a small vocabulary with Gemma-3's special tokens, image size 56 and 4 soft tokens per image."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma3_jax.preprocessing.processor import ImageError, Processor, chat_images, load_image, render_chat

S, MM = 56, 4

OFFICIAL_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


def _rand(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8) if c else \
        np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _frombytes(mode, a):
    return Image.frombytes(mode, (a.shape[1], a.shape[0]), a.tobytes())


class HFTokenizer:
    """The interface gemma3_jax.preprocessing.processor expects, around a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_bos=False):
        return self.tok(text, add_special_tokens=add_bos)["input_ids"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(transformers Gemma3Processor reloaded from disk, its directory)."""
    from fixtures import hf_checkpoints as hfc
    from transformers import Gemma3Processor
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    tok = hfc.small_gemma_tokenizer()
    ip = Gemma3ImageProcessorPil(size={"height": S, "width": S}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 resample=2, rescale_factor=1 / 255)
    path = tmp_path_factory.mktemp("hf_processor")
    Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=MM,
                    chat_template=OFFICIAL_TEMPLATE).save_pretrained(path)
    return Gemma3Processor.from_pretrained(path), path


@pytest.fixture(scope="module")
def ours(hf):
    return Processor.from_pretrained(hf[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rgba = _rand(40, 30, 4, seed=1)
    rgba[:10, :, 3] = 0  # fully transparent rows with random colours underneath
    out = {
        "rgb": Image.fromarray(_rand(37, 53, seed=2)),
        "rgba": _frombytes("RGBA", rgba),
        "la": _frombytes("LA", _rand(20, 25, 2, seed=3)),
        "l": _frombytes("L", _rand(33, 31, 0, seed=4)),
        "cmyk": _frombytes("CMYK", _rand(21, 45, 4, seed=5)),
        "one": Image.fromarray(_rand(30, 30, 0, seed=6) > 128),
        "i16": _frombytes("I;16", np.random.default_rng(7).integers(0, 65535, (25, 35), dtype="<u2")),
        "tiny": Image.fromarray(_rand(1, 1, seed=8)),
        "large": Image.fromarray(_rand(2000, 3000, seed=9)),
        "wide": Image.fromarray(_rand(300, 1200, seed=10)),
        "tall": Image.fromarray(_rand(700, 300, seed=11)),
    }
    p = _frombytes("L", _rand(24, 26, 0, seed=12) % 16).convert("P")
    p.info["transparency"] = 3
    out["p"] = p
    paths = {}
    for name, im in out.items():
        fmt = "jpeg" if name == "cmyk" else "png"
        paths[name] = d / f"{name}.{fmt}"
        im.save(paths[name], **({"transparency": 3} if name == "p" else {}))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees; a path is EXIF-transposed, a PIL image is not
    out["exif"] = Image.fromarray(_rand(20, 44, seed=13))
    paths["exif"] = d / "exif.jpeg"
    out["exif"].save(paths["exif"], exif=exif)
    frames = [Image.fromarray(_rand(18, 22, seed=30 + k)).convert("P") for k in range(3)]
    paths["gif"] = d / "animated.gif"
    frames[0].save(paths["gif"], save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["gif"] = Image.open(paths["gif"])  # as a user opens it: lazily, at its first frame
    out["gif_first_frame"] = np.asarray(frames[0].convert("RGB"))
    out["i32"] = Image.fromarray(np.random.default_rng(31).integers(-300, 600, (19, 23), dtype=np.int32))
    out["f32"] = Image.fromarray(np.random.default_rng(32).uniform(-50, 300, (19, 23)).astype(np.float32))
    for name in ("i32", "f32"):
        paths[name] = d / f"{name}.tiff"
        out[name].save(paths[name])
    (d / "notes.png").write_text("not an image")
    (d / "truncated.png").write_bytes(paths["large"].read_bytes()[:5000])
    return out, paths, d


def check(hf_proc, ours, texts, images, pan=False, add_bos=True):
    """Same ids and pixel_values from both; returns the max |pixel diff|."""
    proc, _ = hf_proc
    kw = {"images": images} if images is not None else {}
    want = proc(text=texts, return_tensors="np", do_pan_and_scan=pan, add_special_tokens=add_bos, **kw)
    if pan:
        ours = dataclasses.replace(ours, do_pan_and_scan=True)
    ids, pv = ours(texts, images, tokenizer=HFTokenizer(proc.tokenizer))
    assert [list(map(int, r)) for r in want["input_ids"]] == ids
    if images is None:
        assert pv is None and "pixel_values" not in want
        return 0.0
    assert pv.dtype == np.float32 and pv.shape == want["pixel_values"].shape
    diff = float(np.abs(pv - want["pixel_values"]).max())
    assert diff == 0.0, diff  # bit-identical (the brief's bar was <= 1e-6)
    return diff


def test_config_from_disk(ours, hf):
    assert (ours.image_size, ours.mm_tokens_per_image, ours.image_mean, ours.image_std) == (S, MM, (0.5,) * 3,
                                                                                           (0.5,) * 3)
    assert not ours.do_pan_and_scan and ours.pan_and_scan_min_crop_size == 256
    assert ours.chat_template == OFFICIAL_TEMPLATE


def test_gemma3_checkpoint_layout(tmp_path, hf):
    """Real Gemma-3 files: flat preprocessor_config.json with nulls, processor_config.json, config.json."""
    pre = {"do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
           "do_resize": True, "image_mean": [0.5] * 3, "image_processor_type": "Gemma3ImageProcessor",
           "image_seq_length": MM, "image_std": [0.5] * 3, "pan_and_scan_max_num_crops": None,
           "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
           "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
           "size": {"height": S, "width": S}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": MM}))
    cfg = {"model_type": "gemma3", "text_config": {"num_hidden_layers": 2}, "mm_tokens_per_image": MM,
           "vision_config": {"image_size": S, "patch_size": 7}, "image_token_index": 262144}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = Processor.from_pretrained(tmp_path)
    assert (p.image_size, p.mm_tokens_per_image, p.image_token_id, p.chat_template) == (S, MM, 262144, None)
    assert p.pan_and_scan_max_num_crops == 4 and p.pan_and_scan_min_ratio_to_activate == 1.2
    from gemma3_jax import Gemma3Config

    assert Processor.from_config(Gemma3Config.from_pretrained(tmp_path)) == p
    cfg["mm_tokens_per_image"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mm_tokens_per_image=4 but config.json implies 16"):
        Processor.from_pretrained(tmp_path)


def test_two_images_one_prompt(hf, ours, files):
    ims = files[0]
    assert check(hf, ours, ["Compare <start_of_image> and <start_of_image>: which is redder?"],
                 [[ims["rgb"], ims["cmyk"]]]) == 0.0


def test_batch_different_image_counts(hf, ours, files):
    ims = files[0]
    texts = ["<start_of_image> is this the one?", "none here", "a <start_of_image><start_of_image> b <start_of_image>"]
    check(hf, ours, texts, [[ims["rgb"]], [], [ims["l"], ims["tiny"], ims["la"]]])


def test_text_only(hf, ours):
    check(hf, ours, ["just text, no images", "is this the end?"], None)


@pytest.mark.parametrize("name", ["rgba", "p", "la", "l", "cmyk", "one", "i16", "tiny", "large", "exif", "gif",
                                  "i32", "f32"])
def test_modes_and_sizes(hf, ours, files, name):
    ims, paths, _ = files
    check(hf, ours, ["<start_of_image>"], [[ims[name]]])  # PIL: alpha blended onto white
    check(hf, ours, ["<start_of_image>"], [[str(paths[name])]])  # path: EXIF transpose + convert("RGB")
    if name == "exif":
        assert load_image(paths[name]).shape == (44, 20, 3) and load_image(ims[name]).shape == (20, 44, 3)
    if name == "gif":  # the first frame, from a path and from an opened image
        assert np.array_equal(load_image(paths[name]), ims["gif_first_frame"])
        assert np.array_equal(load_image(ims[name]), ims["gif_first_frame"])


def test_numpy_inputs(hf, ours):
    rgba = _rand(17, 23, 4, seed=20)
    check(hf, ours, ["<start_of_image> <start_of_image>"], [[_rand(19, 29, seed=21), rgba]])
    a = load_image(rgba)
    assert a.dtype == np.uint8 and a.shape == (17, 23, 3)


def test_pan_and_scan(hf, ours, files):
    ims = files[0]
    texts = ["wide <start_of_image> then tall <start_of_image> then square <start_of_image>", "<start_of_image>"]
    check(hf, ours, texts, [[ims["wide"], ims["tall"], ims["rgb"]], [ims["large"]]], pan=True)
    p = dataclasses.replace(ours, do_pan_and_scan=True)
    pv, crops = p.preprocess([ims["wide"], ims["tall"], ims["rgb"], ims["large"], ims["tiny"]])
    assert crops == [4, 2, 0, 2, 0] and pv.shape == (5 + 8, 3, S, S)


def test_chat_template_and_fallback(hf, ours, files):
    proc, _ = hf
    ims = files[0]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse. "}]},
        {"role": "user", "content": [{"type": "image", "image": ims["rgb"]},
                                     {"type": "text", "text": "  What is this?\n"},
                                     {"type": "image", "image": ims["rgba"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise. "}]},
        {"role": "user", "content": "And this? <start_of_image>"},
    ]
    want = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(messages, OFFICIAL_TEMPLATE) == want
    assert render_chat(messages) == want
    assert ours.apply_chat_template(messages) == want
    assert want.startswith("<bos><start_of_turn>user\nYou are terse. \n\n<start_of_image>What is this?")
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_chat(plain, add_generation_prompt=False) == proc.apply_chat_template(plain, tokenize=False)
    for template in (None, OFFICIAL_TEMPLATE):
        with pytest.raises(ValueError, match="alternate"):
            render_chat([{"role": "assistant", "content": "x"}], template)
    # chat text starts with <bos>: no second BOS, as transformers' apply_chat_template tokenizes it
    images = chat_images(messages) + [ims["l"]]
    check(hf, ours, [want], [images], add_bos=False)
    ids, _ = ours([want], [images], tokenizer=HFTokenizer(proc.tokenizer))
    assert ids[0].count(proc.tokenizer.bos_token_id) == 1


def test_chat_end_to_end(hf, ours, files):
    """transformers' own chat path (images taken from the messages) against ours."""
    proc, _ = hf
    ims, paths, _ = files
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "One:"}, {"type": "image", "image": ims["rgba"]},
                                             {"type": "text", "text": "two:"}, {"type": "image", "image": ims["p"]},
                                             {"type": "text", "text": "is the first redder?"}]}]
    want = proc.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                    return_tensors="np")
    ids, pv = ours([ours.apply_chat_template(messages)], [chat_images(messages)], tokenizer=HFTokenizer(proc.tokenizer))
    assert ids == want["input_ids"].tolist()
    assert np.array_equal(pv, want["pixel_values"])


def test_errors(ours, files, hf):
    _, paths, d = files
    tok = HFTokenizer(hf[0].tokenizer)
    with pytest.raises(ImageError, match="not found: .*missing.png"):
        ours(["<start_of_image>"], [d / "missing.png"], tokenizer=tok)
    with pytest.raises(ImageError, match="not an image file.*notes.png"):
        ours(["<start_of_image>"], [str(d / "notes.png")], tokenizer=tok)
    with pytest.raises(ImageError, match="cannot read image .*truncated.png"):
        ours(["<start_of_image>"], [str(d / "truncated.png")], tokenizer=tok)
    with pytest.raises(ImageError, match="is empty"):
        load_image(Image.new("RGB", (0, 3)))
    assert issubclass(ImageError, ValueError)
    with pytest.raises(ValueError, match=r"1 images given but the prompts hold 2 <start_of_image> markers"):
        ours(["<start_of_image><start_of_image>"], [paths["rgb"]], tokenizer=tok)
    with pytest.raises(ValueError, match=r"images per prompt \[1, 1\] != .* markers per prompt \[1, 0\]"):
        ours(["<start_of_image>", "x"], [[paths["rgb"]], [paths["l"]]], tokenizer=tok)
    with pytest.raises(ValueError, match="0 images given but the prompts hold 1"):
        ours("<start_of_image>", None, tokenizer=tok)
    with pytest.raises(ImageError, match="fractional.*uint8"):  # transformers would see a black image
        load_image(np.full((4, 4, 3), 0.5, np.float32))
    assert np.array_equal(load_image(np.zeros((4, 4, 3), np.float32)), np.zeros((4, 4, 3), np.uint8))


REAL_TOKENIZER = Path(os.environ.get("GEMMA3_JAX_TEST_CACHE", Path.home() / ".cache" / "gemma3_jax_tests")) \
    / "gemma3-270m-f32"


@pytest.mark.skipif(not (REAL_TOKENIZER / "tokenizer.json").is_file(),
                    reason="no cached Gemma-3 270M tokenizer (the real_270m fixture writes it)")
def test_real_gemma3_tokenizer(hf, files, tmp_path):
    """The real Gemma-3 vocabulary (270M's, plus <image_soft_token> = 262144 as in the multimodal checkpoints)."""
    from transformers import AutoTokenizer, Gemma3Processor

    tok = AutoTokenizer.from_pretrained(REAL_TOKENIZER, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    assert (tok.boi_token_id, tok.eoi_token_id, tok.image_token_id) == (255999, 256000, 262144)
    proc = Gemma3Processor(image_processor=hf[0].image_processor, tokenizer=tok, image_seq_length=MM)
    ours = Processor(image_size=S, mm_tokens_per_image=MM, image_token_id=262144)  # checks the soft-token count
    ims = files[0]
    check((proc, None), ours, ["Describe <start_of_image> vs <start_of_image>.", "<start_of_image>"],
          [[ims["rgb"], ims["rgba"]], [ims["wide"]]], pan=True)
    text = render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}])
    check((proc, None), ours, [text], [[ims["p"]]], add_bos=False)


# ------------------------------------------------------------------------------------------------ bad image inputs

@pytest.mark.parametrize("make,message", [
    (lambda d: d / "missing.png", "image file not found: .*missing.png"),
    (lambda d: d, "image path is a directory: "),
    (lambda d: "", "image path is empty"),
    (lambda d: "https://example.com/cat.png", "remote images are not fetched: download it first"),
    (lambda d: "data:image/png;base64,iVBORw0KGgo=", "remote images are not fetched"),
    (lambda d: _write(d / "zero.png", b""), "image file is empty \\(0 bytes\\): .*zero.png"),
    (lambda d: _write(d / "notes.png", b"just some text\n"), "not an image file.*notes.png"),
    (lambda d: _write(d / "cut.png", _png_bytes()[:300]), "cannot read image .*cut.png"),
    (lambda d: _write(d / "cut.jpeg", _jpeg_bytes()[:600]), "cannot read image .*cut.jpeg"),
    (lambda d: _fifo(d / "pipe.png"), "not a regular file: .*pipe.png"),
], ids=["missing", "directory", "empty-path", "url", "data-uri", "zero-bytes", "text", "truncated-png",
        "truncated-jpeg", "fifo"])
def test_bad_image_paths(tmp_path, make, message):
    with pytest.raises(ImageError, match=message):
        load_image(make(tmp_path))


def _write(path, data):
    path.write_bytes(data)
    return path


def _fifo(path):
    os.mkfifo(path)  # opening it would block until a writer came: refused before that
    return path


def _png_bytes(fmt="png"):
    import io

    buf = io.BytesIO()
    Image.fromarray(_rand(64, 64, seed=40)).save(buf, format=fmt)
    return buf.getvalue()


def _jpeg_bytes():
    return _png_bytes("jpeg")


def test_lazily_opened_truncated_image(tmp_path):
    """A PIL image opened by the caller reads its pixels only when converted: the error comes then, still ours."""
    path = _write(tmp_path / "cut.png", _png_bytes()[:300])
    with pytest.raises(ImageError, match="cannot convert PngImageFile .* to RGB: .*truncated"):
        load_image(Image.open(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_image(tmp_path):
    path = _write(tmp_path / "secret.png", _png_bytes())
    path.chmod(0)
    with pytest.raises(ImageError, match="cannot read image .*secret.png: .*Permission denied"):
        load_image(path)


def test_decompression_bomb(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError is no OSError: it must still end as an ImageError naming the file and size."""
    path = _write(tmp_path / "bomb.png", _png_bytes())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: Pillow refuses to decode
    with pytest.raises(ImageError, match="image .*bomb.png is too large to decode: Image size \\(4096 pixels\\)"):
        load_image(path)


@pytest.mark.parametrize("value,kind", [(5, "int"), (None, "NoneType"), (b"cat.png", "bytes"), ([[1, 2]], "list"),
                                        (3.5, "float")])
def test_image_of_no_image_type(value, kind, ours, hf):
    with pytest.raises(TypeError, match=f"unsupported image type {kind}"):
        load_image(value)
    with pytest.raises(ImageError):  # and an ImageError (a ValueError) for callers catching those
        ours(["<start_of_image>"], [[value]], tokenizer=HFTokenizer(hf[0].tokenizer))


@pytest.mark.parametrize("array,message", [
    (np.full((5, 7, 3), 0.5, np.float32), "fractional values.*scale \\[0, 1\\] floats by 255"),
    (_rand(5, 7).astype(np.float32) + 0.25, "fractional values; expected whole numbers 0..255$"),
    (_rand(5, 7).astype(np.float64) - 300, "values in \\[-300.0, .*\\]; expected 0..255"),
    (_rand(5, 7).astype(np.uint16) * 257, "values in .*expected 0..255"),
    (np.full((5, 7, 3), np.nan, np.float32), "NaN or infinite"),
    (_rand(5, 7) > 128, "dtype bool: expected a uint8"),
    (_rand(5, 7).astype(np.complex64), "dtype complex64"),
    (np.empty((5, 7, 3), object), "dtype object"),
    (_rand(5, 7, 2), "shape \\(5, 7, 2\\).*C in \\(1, 3\\)"),
    (_rand(5, 7, 5), "shape \\(5, 7, 5\\)"),
    (_rand(5, 7)[None], "shape \\(1, 5, 7, 3\\).*one image per array"),
    (np.zeros((0, 0, 3), np.uint8), "is empty"),
    (np.zeros((0, 4), np.uint8), "is empty"),
    (np.zeros(7, np.uint8), "shape \\(7,\\).*expected \\[H, W\\]"),
], ids=["float01", "fractional", "negative", "uint16-wide", "nan", "bool", "complex", "object", "hw2", "hw5", "4d",
        "0x0", "0xW", "1d"])
def test_bad_numpy_images(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


@pytest.mark.parametrize("name", ["float-0-255", "int64", "uint16-in-range", "chw", "chw-gray"])
def test_numpy_dtypes_and_layouts_as_transformers(hf, ours, name):
    """Arrays transformers takes as they are: whole numbers 0..255 in any int/float dtype, channels first."""
    a = _rand(9, 11, seed=50)
    array = {"float-0-255": a.astype(np.float32), "int64": a.astype(np.int64), "uint16-in-range": a.astype(np.uint16),
             "chw": a.transpose(2, 0, 1).copy(), "chw-gray": a[None, :, :, 0].copy()}[name]
    check(hf, ours, ["<start_of_image>"], [[array]])
