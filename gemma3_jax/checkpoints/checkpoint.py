"""A checkpoint opened for generation without its weights: config, tokenizer, processor, chat template and
generation defaults, and the prompts built from them.

Everything a request can be checked against is here, so a request that cannot run (an image for a text-only
model, a prompt longer than the cache, a cache larger than the device) is refused before the weights load,
which takes from seconds to minutes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma3_jax.model.kv_cache import cache_nbytes
from gemma3_jax.model.config import Gemma3Config, param_bytes
from gemma3_jax.model.kernels import platform
from gemma3_jax.model.pixels import PixelLevels
from gemma3_jax.model.quant import check_mode
from gemma3_jax.checkpoints.loading import checkpoint_files
from gemma3_jax.preprocessing.processor import BOI, Processor, check_messages, render_chat
from gemma3_jax.preprocessing.tokenizer import Tokenizer, check_text, read_json
from gemma3_jax.runtime.sampling import MAX_STOP_IDS, SamplingParams

DEFAULT_CACHE_LENGTH = 4096
MAX_SEED = 2**63 - 1  # jax.random.key takes a signed 64-bit seed


def resolve_checkpoint(model: str | os.PathLike | None, progress: bool = True, quantize: str | None = None,
                       dtype="bfloat16") -> Path:
    """A checkpoint directory: as given, converted once from a .gguf file (cached by content), or the default 270M.
    A .gguf asked for ``quantize="int4"`` converts to an int4 checkpoint (its Q4_0 tensors kept as they are, not
    dequantized and quantized again; the others from their values rounded to ``dtype``)."""
    from gemma3_jax.checkpoints.gguf import converted_checkpoint

    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path (str or os.PathLike) or None, got {type(model).__name__}")
    if model is not None and not str(model).strip():
        raise ValueError("the model path is empty")
    check_mode(quantize)  # a bad mode is refused before a conversion
    if model is None or Path(model).suffix.lower() == ".gguf":
        int4 = jnp.dtype(dtype).name if quantize == "int4" else None
        return converted_checkpoint(model, progress=progress, int4_dtype=int4)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} is neither a checkpoint directory nor a .gguf file")
    return path


def generation_defaults(checkpoint: str | Path | None) -> dict:
    """Sampling defaults from a checkpoint's generation_config.json (do_sample, temperature, top_k, top_p), checked
    as the user's own values are: a bad value names the file."""
    if checkpoint is None:
        return {}
    file = Path(checkpoint) / "generation_config.json"
    if not file.is_file():
        return {}
    g = read_json(file)
    out = {}
    if g.get("do_sample") not in (None, True, False):  # "false" is truthy: it would sample
        raise ValueError(f"{file}: do_sample must be true or false, got {g['do_sample']!r}")
    if g.get("do_sample"):  # transformers' defaults where the file is silent: temperature 1, top_k 50, top_p 1
        out = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
        out.update({k: g[k] for k in ("temperature", "top_k", "top_p") if g.get(k) is not None})
        try:
            SamplingParams(out["temperature"], out["top_k"], out["top_p"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from e
    eos = g.get("eos_token_id")
    if eos is not None:
        eos = tuple(eos) if isinstance(eos, list) else (eos,)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in eos):
            raise ValueError(f"{file}: eos_token_id must be token ids (ints in [0, 2^31)), got {g['eos_token_id']!r}")
        out["eos_token_id"] = eos
    return out


def device_memory(free: bool = False) -> tuple[int, str]:
    """(bytes, where): the accelerator's memory limit (``free``: less what is in use now), or on a CPU the host
    memory available now."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if platform() != "cpu" else None
    if stats and stats.get("bytes_limit"):
        used = int(stats.get("bytes_in_use", 0)) if free else 0
        return int(stats["bytes_limit"]) - used, f"{device.device_kind} memory" + (" free" if free else "")
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        return int(info["MemAvailable"]) * 1024, "available host memory"
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def check_memory(cfg: Gemma3Config, dtype, batch: int, cache_length: int, weights_loaded: bool = False) -> None:
    """Refuse a cache whose weights + KV cache cannot fit in the device's memory (an estimate: activations and
    compiled code come on top). ``weights_loaded``: only the cache must fit in what is free now."""
    weights = 0 if weights_loaded else param_bytes(cfg, dtype)
    cache = cache_nbytes(cfg.text, batch, cache_length, dtype)
    have, where = device_memory(free=weights_loaded)
    if weights + cache > have:
        gib = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        need = f"weights {gib(weights)} + KV cache" if weights else "a KV cache of"
        raise ValueError(
            f"cache length {cache_length} needs ~{gib(weights + cache)} ({need} {gib(cache)} for batch {batch}), "
            f"more than the {gib(have)} of {where}; use a smaller cache length or batch"
        )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory's config, tokenizer, processor (multimodal only) and generation defaults."""

    path: Path
    cfg: Gemma3Config
    tokenizer: Tokenizer
    processor: Processor | None
    defaults: dict[str, Any]
    name: str = ""  # what the user named: the directory's or the .gguf file's name, or the default model

    @classmethod
    def open(cls, model: str | os.PathLike | None = None, progress: bool = True, quantize: str | None = None,
             dtype="bfloat16") -> Checkpoint:
        """``quantize`` and ``dtype`` matter for a .gguf only (``resolve_checkpoint``)."""
        path = resolve_checkpoint(model, progress=progress, quantize=quantize, dtype=dtype)
        cfg = Gemma3Config.from_pretrained(path)
        checkpoint_files(path)  # the weight files are all there (read later)
        tokenizer = Tokenizer.from_checkpoint(path)
        processor = Processor.from_pretrained(path) if cfg.is_multimodal else None
        name = "the default model (Gemma-3 270M)" if model is None else Path(model).name
        ckpt = cls(path, cfg, tokenizer, processor, generation_defaults(path), name)
        ckpt.stop_ids  # noqa: B018 (computed and checked now, not after the weights load)
        return ckpt

    @functools.cached_property
    def stop_ids(self) -> list[int]:
        """Token ids that end a row: generation_config.json's eos ids, the tokenizer's eos and <end_of_turn>."""
        turn = self.tokenizer.token_id("<end_of_turn>")
        ids = sorted({*self.defaults.get("eos_token_id", ()), self.tokenizer.eos_id, *([turn] if turn is not None else [])})
        where = self.path / "generation_config.json"
        if len(ids) > MAX_STOP_IDS:
            raise ValueError(f"{where}: at most {MAX_STOP_IDS} stop token ids in all, got {len(ids)}: {ids}")
        if max(ids) >= self.cfg.text.vocab_size:
            raise ValueError(f"{where}: eos_token_id {max(ids)} is not below the vocabulary size "
                             f"{self.cfg.text.vocab_size}")
        return ids

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template or (self.processor.chat_template if self.processor else None)

    def use_chat(self, chat: bool | None) -> bool:
        """``chat=None``: chat mode iff the checkpoint has a chat template (a base model completes raw text)."""
        if chat is not None and not isinstance(chat, bool):
            raise TypeError(f"chat must be True, False or None, got {chat!r}")
        return self.chat_template is not None if chat is None else chat

    def sampling_params(self, temperature=None, top_k=None, top_p=None) -> SamplingParams:
        """The user's values, else generation_config.json's, else greedy; each checked."""
        d = self.defaults
        return SamplingParams(
            temperature=d.get("temperature", 0.0) if temperature is None else temperature,
            top_k=d.get("top_k", 0) if top_k is None else top_k,
            top_p=d.get("top_p", 1.0) if top_p is None else top_p,
        )

    def cache_length(self, cache_length: int | None, dtype, batch: int = 1) -> int:
        """The KV cache length to use, checked against the model's positions and the device's memory; None gives
        ``DEFAULT_CACHE_LENGTH`` or the model's positions if fewer."""
        limit = self.cfg.text.max_position_embeddings
        if cache_length is None:
            cache_length = min(DEFAULT_CACHE_LENGTH, limit)
        cache_length = _check_int("cache_length", cache_length, 1)
        if cache_length > limit:
            raise ValueError(f"cache length {cache_length} is beyond the model's {limit} positions "
                             f"(max_position_embeddings in {self.path / 'config.json'})")
        check_memory(self.cfg, dtype, batch, cache_length)
        return cache_length

    def build_inputs(
        self,
        prompts: Sequence[str],
        images: Sequence[Sequence[Any]] | None = None,
        *,
        chat: bool | None = None,
        system: str | None = None,
        levels: bool = False,
    ) -> tuple[list[list[int]], np.ndarray | PixelLevels | None]:
        """Token ids per prompt and pixel values. Images go where the prompt's ``<start_of_image>`` markers are,
        or, for a prompt without markers, before its text (in chat mode: first in the user turn). ``levels``: the
        pixel values as ``PixelLevels`` (``Processor.__call__``)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a str, got {type(p).__name__}")
        if system is not None:  # checked here so its error names it, not the prompt it is rendered into
            check_text(system, "system")
        images = _image_lists(images, len(prompts))
        for i, p in enumerate(prompts):
            if not p.strip() and not images[i]:
                raise ValueError(f"prompt {i} is empty")
        if any(images) and self.processor is None:
            raise ValueError(f"images given to a text-only model ({self.path / 'config.json'} has no vision_config)")
        chat = self.use_chat(chat)
        if not chat and system:
            raise ValueError("a system text needs chat mode (it has no place in a raw prompt)")
        if chat and self.chat_template is None:  # the built-in template writes these: never spell them out
            for piece in ("<start_of_turn>", "<end_of_turn>"):
                self.tokenizer.require(piece, f"the tokenizer in {self.path} (chat mode, Gemma-3's built-in template)")
        texts = []
        for p, imgs in zip(prompts, images):
            if chat:
                content = [{"type": "image"} for _ in range(len(imgs) if BOI not in p else 0)]
                content.append({"type": "text", "text": p})
                messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
                messages.append({"role": "user", "content": content})
                texts.append(render_chat(messages, self.chat_template, add_generation_prompt=True))
            else:  # images without markers go first, as in chat mode
                texts.append(p if BOI in p else BOI * len(imgs) + p)
        if self.processor is not None:
            return self.processor(texts, images, tokenizer=self.tokenizer, add_bos=None, levels=levels)
        return [self.tokenizer.encode(t, add_bos=not t.startswith("<bos>")) for t in texts], None

    def build_chat(self, messages: Sequence[dict], levels: bool = False
                   ) -> tuple[list[int], np.ndarray | PixelLevels | None]:
        """A conversation's token ids (through the checkpoint's chat template, ending with the model's turn) and
        pixel values (``levels``: as ``PixelLevels``). An image item ``{"type": "image", "image": <path, PIL image
        or array>}`` places its image there. A checkpoint without a chat template is refused: a base model completes
        raw text instead."""
        messages = check_messages(messages)
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat template (chat_template.jinja, chat_template.json or "
                             f"tokenizer_config.json): a base model takes a raw prompt, not messages")
        images = []
        for i, m in enumerate(messages):
            for j, item in enumerate([] if isinstance(m["content"], str) else m["content"]):
                if item["type"] == "image":
                    if item.get("image") is None:
                        raise ValueError(f"message {i}, item {j}: an image item needs 'image' (a path, PIL image or "
                                         f"array)")
                    images.append(item["image"])
        if images and self.processor is None:
            raise ValueError(f"images given to a text-only model ({self.path / 'config.json'} has no vision_config)")
        text = render_chat(messages, self.chat_template, add_generation_prompt=True)
        if self.processor is not None:
            ids, pixels = self.processor([text], [images], tokenizer=self.tokenizer, add_bos=None, levels=levels)
            return ids[0], pixels
        return self.tokenizer.encode(text, add_bos=not text.startswith("<bos>")), None


def check_generation_args(max_new_tokens, seed, stop) -> tuple[int, int, tuple[str, ...]]:
    """A request's max_new_tokens, seed and stop strings, checked (one stop string or several; empty ones are
    dropped: they would match at once)."""
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    if isinstance(stop, str):
        stop = (stop,)
    if isinstance(stop, bytes) or not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop strings must be str, got {s!r}")
        check_text(s, "a stop string")  # a lone surrogate (invalid UTF-8 in argv) could never match
    return max_new_tokens, seed, tuple(s for s in stop if s)


def _image_lists(images, n: int) -> list[list]:
    if images is None:
        return [[] for _ in range(n)]
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list with one list of images per prompt, got {type(images).__name__}")
    if len(images) != n:
        raise ValueError(f"{len(images)} image lists for {n} prompts")
    for i, imgs in enumerate(images):
        if isinstance(imgs, (str, bytes, os.PathLike)) or not isinstance(imgs, Sequence):
            raise TypeError(f"images[{i}] must be a list of images (paths, PIL images or arrays), "
                            f"got {type(imgs).__name__}")
    return [list(i) for i in images]


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An int (not a bool or float) within [low, high]: a TypeError or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)
