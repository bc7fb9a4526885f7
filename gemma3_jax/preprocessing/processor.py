"""Prompts and pixels for Gemma-3, torch-free (numpy + Pillow; jinja2 only to render a checkpoint's chat template).

Matches transformers' ``Gemma3Processor`` with its PIL image processor (``Gemma3ImageProcessorPil``): the same RGB
conversion per input kind, Pillow resize, ``float32(uint8 * rescale_factor)`` then ``(x - mean) / std`` in float32,
pan-and-scan crops ordered [image, crop_1, ..., crop_n] per image, and each ``<start_of_image>`` expanded to
``"\\n\\n<start_of_image>" + n * "<image_soft_token>" + "<end_of_image>\\n\\n"``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gemma3_jax.model.pixels import PixelLevels, pixel_table
from gemma3_jax.preprocessing.tokenizer import find_chat_template, read_json

if TYPE_CHECKING:
    from gemma3_jax.model.config import Gemma3Config

BOS, BOI, EOI, IMAGE_SOFT_TOKEN = "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"
_NOT_JSON = "<object>"  # what a chat template sees in place of an image object


class ImageError(ValueError):
    """An image that cannot be opened or converted; the message names the path or the object."""


class ImageTypeError(ImageError, TypeError):
    """Something given as an image that is no image type at all (an int, None, bytes...)."""


class TokenizerLike(Protocol):
    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^data:", re.ASCII)


def load_image(image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """Any supported input -> RGB uint8 [H, W, 3], exactly as transformers' PIL image processor converts it.

    - PIL image (any mode): alpha (an ``A`` band or ``transparency`` info: RGBA, LA, PA, P/RGB/L with a transparent
      colour) composited onto white, otherwise ``convert("RGB")``; no EXIF transpose (as transformers). An animated
      image gives its current (for a file just opened: first) frame.
    - path (str / Path): opened, EXIF-orientation applied, ``convert("RGB")``, then as a PIL image. As in
      transformers, an alpha band is thereby dropped (not blended), a palette's transparent colour is blended.
      URLs are refused: nothing is downloaded.
    - numpy [H, W], [H, W, C] or [C, H, W] with C in (1, 3) (or [H, W, 4], RGBA, blended onto white and rounded):
      uint8, or any integer or float dtype holding whole numbers in 0..255 (as transformers). Floats in [0, 1] are
      refused: transformers' Gemma-3 processor does not rescale them and would see a black image.
    """
    if isinstance(image, (str, os.PathLike)):
        what = f"image {os.fspath(image)!r}"
        image = _open(image)
    else:
        what = type(image).__name__
    if isinstance(image, np.ndarray):
        out, what = _numpy_to_rgb(image), f"array of shape {image.shape}"
    elif isinstance(image, Image.Image):
        try:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                out = np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))
            else:
                out = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # a lazily read, broken file
            raise ImageError(f"cannot convert {what} (mode {image.mode!r}, size {image.size}) to RGB: {e}") from e
    else:
        raise ImageTypeError(f"unsupported image type {what}; expected a path, a PIL image or a numpy array")
    if 0 in out.shape[:2]:
        raise ImageError(f"{what} is empty (size {out.shape[1]}x{out.shape[0]})")
    return out


def _open(image: str | os.PathLike) -> Image.Image:
    name = os.fspath(image)
    if isinstance(name, bytes):
        raise ImageTypeError(f"image paths must be str or a str os.PathLike, got bytes {name!r:.80}")
    if _URL.match(name):
        raise ImageError(f"remote images are not fetched: download it first ({name[:80]})")
    if not name:
        raise ImageError("image path is empty")
    path = Path(name)
    if path.is_dir():
        raise ImageError(f"image path is a directory: {path}")
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():  # a FIFO or a device: opening it could block or never end
        raise ImageError(f"image path is not a regular file: {path}")
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"image file is empty (0 bytes): {path}")
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except UnidentifiedImageError as e:
        raise ImageError(f"not an image file (or a format Pillow cannot read): {path}") from e
    except Image.DecompressionBombError as e:  # not an OSError: Pillow's guard against a few bytes unpacking to GBs
        raise ImageError(f"image {path} is too large to decode: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # SyntaxError: some Pillow plugins' "not a valid file"
        raise ImageError(f"cannot read image {path}: {e}") from e


def _numpy_to_rgb(a: np.ndarray) -> np.ndarray:
    what = f"numpy image of shape {a.shape} and dtype {a.dtype}"
    if a.dtype.kind not in "uif":
        raise ImageError(f"{what}: expected a uint8 (or integer or float 0..255) array")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ImageError(f"{what}: expected [H, W] or [H, W, C] (one image per array: a batch goes as a list)")
    if a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3):  # channels first, as transformers infers it
        a = a.transpose(1, 2, 0)
    if a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{what}: expected [H, W, C] or [C, H, W] with C in (1, 3), or [H, W, 4]")
    if 0 in a.shape:
        raise ImageError(f"{what} is empty")
    if a.dtype != np.uint8:
        a = _whole_0_255(a, what)
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:  # as transformers.image_transforms.convert_to_rgb: blend onto white in float64, round
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _whole_0_255(a: np.ndarray, what: str) -> np.ndarray:
    """A non-uint8 array as uint8 where it holds whole numbers in 0..255 (transformers takes those as they are)."""
    lo, hi = a.min(), a.max()
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageError(f"{what} holds NaN or infinite values")
    if lo < 0 or hi > 255:
        raise ImageError(f"{what} holds values in [{lo}, {hi}]; expected 0..255")
    if a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        hint = " (scale [0, 1] floats by 255 and round to uint8)" if hi <= 1 else ""
        raise ImageError(f"{what} holds fractional values; expected whole numbers 0..255{hint}")
    return a.astype(np.uint8)


def pan_and_scan_boxes(height: int, width: int, min_crop_size: int = 256, max_num_crops: int = 4,
                       min_ratio_to_activate: float = 1.2) -> list[tuple[int, int, int, int]]:
    """Pan-and-scan crop boxes (top, left, bottom, right), row-major, as transformers' ``pan_and_scan``."""
    if width >= height:
        if width / height < min_ratio_to_activate:
            return []
        n_w = min(int(math.floor(width / min_crop_size)), int(math.floor(width / height + 0.5)))
        n_w, n_h = min(max_num_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio_to_activate:
            return []
        n_h = min(int(math.floor(height / min_crop_size)), int(math.floor(height / width + 0.5)))
        n_w, n_h = 1, min(max_num_crops, max(2, n_h))
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [(crop_h * i, crop_w * j, min(crop_h * (i + 1), height), min(crop_w * (j + 1), width))
            for i in range(n_h) for j in range(n_w)]


# ---------------------------------------------------------------------------------------------------------- prompts

def _plain(value: Any) -> Any:
    """Messages reduced to JSON types for the template sandbox; images and other objects become a placeholder."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return _NOT_JSON


def render_chat(messages: Sequence[dict], chat_template: str | None = None, add_generation_prompt: bool = True,
                bos_token: str = BOS, **template_kwargs: Any) -> str:
    """Render a conversation as Gemma chat text, images as ``<start_of_image>`` markers (not yet expanded).

    ``messages``: [{"role": "system"|"user"|"assistant"|"model", "content": str | [{"type": "text", "text": ...},
    {"type": "image", ...}]}]. With ``chat_template`` (jinja2 source, e.g. a checkpoint's), it is rendered the way
    transformers renders it (sandboxed, trim_blocks, lstrip_blocks), bounded in time and size
    (``gemma3_jax.preprocessing.chat_template``); without, a built-in equivalent of Gemma-3's official template is used.
    """
    messages = check_messages(messages)
    if chat_template is None:
        return _render_gemma3(messages, add_generation_prompt, bos_token)
    if not isinstance(chat_template, str):
        raise TypeError(f"chat_template must be a str (jinja2 source), got {type(chat_template).__name__}")
    import jinja2.ext  # noqa: F401 (the loop-controls extension; transformers' import of it is not ours to rely on)

    from gemma3_jax.preprocessing import chat_template as ct

    special = dict(bos_token=bos_token, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                   boi_token=BOI, eoi_token=EOI, image_token=IMAGE_SOFT_TOKEN)
    try:
        plain = _plain(messages)
    except RecursionError:
        raise ValueError("messages are nested too deeply") from None
    size = sum(len(t) for m in messages for t in _texts(m["content"]))
    # transformers always passes tools and documents (None when unused): templates test or print them
    variables = dict(messages=plain, add_generation_prompt=add_generation_prompt, tools=None, documents=None)
    return ct.render(chat_template, {**variables, **special, **template_kwargs}, input_length=size)


def check_messages(messages: Any) -> list[dict]:
    """The conversation as a list, or a TypeError/ValueError naming the first message or item of the wrong shape."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                        f"{type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise TypeError(f"message {i}: 'role' must be a str, got {m.get('role')!r}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"message {i}: 'content' must be a str or a list of items, got {type(content).__name__}")
        for j, item in enumerate(content):
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                raise TypeError(f"message {i}, item {j}: expected a dict with a 'type' ('text' or 'image'), got "
                                f"{item!r:.80}")
            if item["type"] == "text" and not isinstance(item.get("text"), str):
                raise TypeError(f"message {i}, item {j}: a text item's 'text' must be a str, got "
                                f"{type(item.get('text')).__name__}")
    return list(messages)


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [item["text"] for item in content if item["type"] == "text"]


def _render_gemma3(messages: list[dict], add_generation_prompt: bool, bos_token: str) -> str:
    """Python twin of Gemma-3's official chat template (system folded into the first turn; texts trimmed)."""
    out, prefix = [bos_token], ""
    if messages and messages[0]["role"] == "system":
        content = messages[0]["content"]
        if not isinstance(content, str) and (not content or content[0]["type"] != "text"):
            raise ValueError("chat template: a system message's content must be a str or start with a text item")
        prefix = (content if isinstance(content, str) else content[0]["text"]) + "\n\n"
        messages = messages[1:]
    for i, message in enumerate(messages):
        if (message["role"] == "user") != (i % 2 == 0):
            raise ValueError("chat template: Conversation roles must alternate user/assistant/user/assistant/...")
        role = "model" if message["role"] == "assistant" else message["role"]
        out.append(f"<start_of_turn>{role}\n" + (prefix if i == 0 else ""))
        content = message["content"]
        if isinstance(content, str):
            out.append(content.strip())
        elif isinstance(content, (list, tuple)):
            for item in content:
                if item["type"] == "image":
                    out.append(BOI)
                elif item["type"] == "text":
                    out.append(item["text"].strip())
        else:
            raise ValueError("chat template: Invalid content type")
        out.append("<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def chat_images(messages: Sequence[dict]) -> list:
    """The images of a conversation, in order: ``{"type": "image"}`` items' "image", "path" or "url" (local) value."""
    found = []
    for message in messages:
        content = message.get("content")
        for item in content if isinstance(content, (list, tuple)) else ():
            if isinstance(item, dict) and item.get("type") == "image":
                value = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
                if value is None:
                    raise ValueError(f"image item without an 'image', 'path' or 'url' value: {item}")
                found.append(value)
    return found


@dataclasses.dataclass(frozen=True)
class Processor:
    """Gemma-3 processor settings (defaults: Gemma-3 4B/12B/27B) and the text + image pipeline."""

    image_size: int = 896
    mm_tokens_per_image: int = 256
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BILINEAR)
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2
    image_token_id: int | None = None  # when known (from a Gemma3Config): counted in the ids as a check
    chat_template: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")
        if not all(math.isfinite(x) for x in (*self.image_mean, *self.image_std)) or 0 in self.image_std:
            raise ValueError(f"image_mean and image_std must be finite, std non-zero: {self.image_mean}, "
                             f"{self.image_std}")
        if self.image_size < 1 or self.mm_tokens_per_image < 1:
            raise ValueError(f"bad {self.image_size=} or {self.mm_tokens_per_image=}")
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise ValueError(f"rescale_factor must be finite and > 0, got {self.rescale_factor}")
        if self.resample not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"resample must be a PIL resampling filter (0-5), got {self.resample}")
        if self.pan_and_scan_min_crop_size < 1 or self.pan_and_scan_max_num_crops < 1 or not \
                self.pan_and_scan_min_ratio_to_activate > 0:
            raise ValueError(f"pan-and-scan settings must be positive: {self.pan_and_scan_min_crop_size=}, "
                             f"{self.pan_and_scan_max_num_crops=}, {self.pan_and_scan_min_ratio_to_activate=}")

    # ---- construction
    @classmethod
    def from_config(cls, cfg: Gemma3Config, **overrides: Any) -> Processor:
        if cfg.vision is None:
            raise ValueError("a text-only Gemma3Config (no vision_config) has no image processor")
        return cls(**{"image_size": cfg.vision.image_size, "mm_tokens_per_image": cfg.mm_tokens_per_image,
                      "image_token_id": cfg.image_token_id, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Processor:
        """From a checkpoint directory: preprocessor_config.json and/or processor_config.json (flat, or transformers
        v5's nested "image_processor"), else config.json; the chat template from chat_template.jinja / .json,
        processor_config.json or tokenizer_config.json."""
        path = Path(path)
        proc, pre = read_json(path / "processor_config.json"), read_json(path / "preprocessor_config.json")
        nested = proc.get("image_processor") or {}
        if not isinstance(nested, dict):
            raise ValueError(f"{path / 'processor_config.json'}: image_processor must be an object, got {nested!r:.60}")
        img = {**pre, **nested}
        cfg = None
        if (path / "config.json").is_file():
            from gemma3_jax.model.config import Gemma3Config

            cfg = Gemma3Config.from_pretrained(path)
            cfg = cfg if cfg.vision is not None else None
        if not img and cfg is None:
            raise FileNotFoundError(f"{path}: no preprocessor_config.json, processor_config.json or multimodal "
                                    "config.json")
        try:
            kw = _image_settings(path, img, proc)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            if isinstance(e, ValueError) and str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: a bad value in preprocessor_config.json / processor_config.json: "
                             f"{type(e).__name__}: {e}") from None
        if cfg is not None:
            for key, ours in (("image_size", cfg.vision.image_size), ("mm_tokens_per_image", cfg.mm_tokens_per_image)):
                if kw.get(key, ours) != ours:
                    raise ValueError(f"{path}: processor {key}={kw[key]} but config.json implies {ours}")
            kw.setdefault("image_size", cfg.vision.image_size)
            kw.setdefault("mm_tokens_per_image", cfg.mm_tokens_per_image)
            kw["image_token_id"] = cfg.image_token_id
        kw["chat_template"] = find_chat_template(path, ("processor_config.json", proc),
                                                 ("tokenizer_config.json", read_json(path / "tokenizer_config.json")))
        try:
            return cls(**{**kw, **overrides})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ---- images
    def preprocess(self, images: Sequence[Any]) -> tuple[np.ndarray, list[int]]:
        """Images -> (pixel_values float32 [N, 3, S, S], crops per image); with pan-and-scan each image is followed
        by its crops, so N = len(images) + sum(crops)."""
        levels, num_crops = self.preprocess_levels(images)
        return levels.to_float(), num_crops

    def preprocess_levels(self, images: Sequence[Any]) -> tuple[PixelLevels, list[int]]:
        """As ``preprocess``, the images as resized uint8 levels with this processor's normalization as a table
        (``PixelLevels``; the same values once looked up): a quarter of the bytes to check, hash and copy."""
        arrays, num_crops = [], []
        for image in images:
            rgb = load_image(image)
            boxes = pan_and_scan_boxes(*rgb.shape[:2], self.pan_and_scan_min_crop_size, self.pan_and_scan_max_num_crops,
                                       self.pan_and_scan_min_ratio_to_activate) if self.do_pan_and_scan else []
            arrays.append(self._levels(rgb))
            arrays.extend(self._levels(rgb[t:b, l:r]) for t, l, b, r in boxes)
            num_crops.append(len(boxes))
        stacked = np.stack(arrays) if arrays else np.zeros((0, 3, self.image_size, self.image_size), np.uint8)
        return PixelLevels(stacked, self.pixel_table), num_crops

    @property
    def pixel_table(self) -> np.ndarray:
        """float32 [3, 256]: each channel's level as the model sees it (rescaled, then normalized)."""
        return pixel_table(self.rescale_factor, self.image_mean, self.image_std)

    def _levels(self, rgb: np.ndarray) -> np.ndarray:
        size = (self.image_size, self.image_size)
        resized = np.asarray(Image.fromarray(rgb).resize(size, resample=self.resample))
        return np.ascontiguousarray(resized.transpose(2, 0, 1))

    # ---- text
    @property
    def full_image_sequence(self) -> str:
        return f"\n\n{BOI}{IMAGE_SOFT_TOKEN * self.mm_tokens_per_image}{EOI}\n\n"

    def image_text(self, num_crops: int = 0) -> str:
        """What one ``<start_of_image>`` marker becomes (with pan-and-scan crops: Gemma3Processor's sentence)."""
        seq = self.full_image_sequence
        if not num_crops:
            return seq
        return (f"Here is the original image {seq} and here are some crops to help you see better "
                + " ".join([seq] * num_crops))

    def expand(self, text: str, num_crops: Sequence[int]) -> str:
        """Replace the i-th ``<start_of_image>`` with ``image_text(num_crops[i])``."""
        parts = text.split(BOI)
        if len(parts) - 1 != len(num_crops):
            raise ValueError(f"{len(parts) - 1} {BOI} markers but {len(num_crops)} images")
        return parts[0] + "".join(self.image_text(n) + p for n, p in zip(num_crops, parts[1:]))

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kw: Any) -> str:
        return render_chat(messages, self.chat_template, add_generation_prompt, **kw)

    # ---- both
    def __call__(self, texts: str | Sequence[str], images: Sequence[Any] | None = None, *, tokenizer: TokenizerLike,
                 add_bos: bool | None = None, levels: bool = False
                 ) -> tuple[list[list[int]], np.ndarray | PixelLevels | None]:
        """Prompts (+ their images) -> (input_ids per prompt, pixel_values [N, 3, S, S] or None).

        ``images``: for one prompt a list of its images; for several, a list per prompt, or one flat list taken in
        marker order. ``add_bos=None`` prepends BOS unless the prompt already starts with ``<bos>`` (chat text).
        ``levels=True``: the pixel values as ``PixelLevels`` (uint8 levels and a table) instead of float32.
        """
        if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (str, Sequence)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"prompt {i} must be a str, got {type(t).__name__}")
        markers = [t.count(BOI) for t in texts]
        per_prompt = self._split_images(images, markers)
        pixel_values, ids = [], []
        for text, imgs in zip(texts, per_prompt):
            pv, crops = self.preprocess_levels(imgs)
            pixel_values.append(pv.levels)
            expanded = self.expand(text, crops)
            bos = not expanded.startswith(BOS) if add_bos is None else add_bos
            ids.append(list(tokenizer.encode(expanded, add_bos=bos)))
            if self.image_token_id is not None:
                want = self.mm_tokens_per_image * (len(crops) + sum(crops))
                got = ids[-1].count(self.image_token_id)
                if got != want:
                    raise ValueError(f"prompt {len(ids) - 1}: {got} image tokens (id {self.image_token_id}) after "
                                     f"tokenizing, expected {want}; does the tokenizer map {IMAGE_SOFT_TOKEN}?")
        if not sum(len(p) for p in pixel_values):
            return ids, None
        px = PixelLevels(np.concatenate(pixel_values), self.pixel_table)
        return ids, (px if levels else px.to_float())

    @staticmethod
    def _split_images(images, markers: list[int]) -> list[list]:
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        if len(images) == len(markers) > 0 and all(isinstance(i, (list, tuple)) for i in images):  # one list per prompt
            if [len(i) for i in images] != markers:
                raise ValueError(f"number of images per prompt {[len(i) for i in images]} != number of {BOI} "
                                 f"markers per prompt {markers}")
            return [list(i) for i in images]
        if len(images) != sum(markers):
            raise ValueError(f"{len(images)} images given but the prompts hold {sum(markers)} {BOI} markers "
                             f"(per prompt: {markers})")
        ends = np.cumsum(markers).tolist()
        return [images[e - m:e] for m, e in zip(markers, ends)]


_IMAGE_KEYS = ("rescale_factor", "resample", "do_pan_and_scan", "pan_and_scan_min_crop_size",
               "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate")


def _image_settings(path: Path, img: dict, proc: dict) -> dict[str, Any]:
    """Processor keyword arguments from the merged image-processor settings (a value of a wrong type raises)."""
    img = {k: v for k, v in img.items() if v is not None}  # nulls in Gemma-3's files: Gemma3Processor defaults
    for key in ("do_rescale", "do_normalize", "do_resize", "do_convert_rgb"):
        if img.get(key) is False:
            raise ValueError(f"{path}: {key}=false is not supported (Gemma-3 always does it)")
    kw: dict[str, Any] = {k: _as(type(getattr(Processor, k)), k, img[k]) for k in _IMAGE_KEYS if k in img}
    kw.update({k: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
               for k, v in img.items() if k in ("image_mean", "image_std")})
    if "size" in img:
        h, w = (img["size"]["height"], img["size"]["width"]) if isinstance(img["size"], dict) else [img["size"]] * 2
        if h != w:
            raise ValueError(f"{path}: image size {h}x{w} is not square")
        kw["image_size"] = _as(int, "size", h)
    if (seq := proc.get("image_seq_length", img.get("image_seq_length"))) is not None:
        kw["mm_tokens_per_image"] = _as(int, "image_seq_length", seq)
    return kw


def _as(kind: type, name: str, value: Any) -> Any:
    """``value`` as ``kind`` (bool, int or float) where it is one: no ``bool("false")``, no ``int(4.5)``."""
    ok = isinstance(value, bool) if kind is bool else not isinstance(value, bool) and (
        isinstance(value, int) or kind is float and isinstance(value, float)
        or kind is int and isinstance(value, float) and value.is_integer())
    if not ok:
        want = "true or false" if kind is bool else "a number" if kind is float else "an int"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return kind(value)
