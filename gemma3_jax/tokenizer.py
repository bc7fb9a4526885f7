"""Gemma-3's tokenizer without transformers or PyTorch.

From a GGUF, the ``tokenizers`` BPE model is rebuilt as transformers' GGUF loader builds it (and as
Gemma's own ``tokenizer.json`` is): the vocabulary in file order, whitespace-run tokens respelled with
"\u2581", merges recovered from the vocabulary and ranked by the merged token's position, byte fallback,
control tokens added as special tokens and user-defined ones as plain added tokens, so both are matched
whole in the text. From a checkpoint directory: ``tokenizer.json`` (``tokenizers``) or, lacking it,
``tokenizer.model`` (``sentencepiece``); the chat template from ``chat_template.jinja`` or
``tokenizer_config.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

SPACE = "\u2581"
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types


def gemma_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best first: the earlier the merged token in the vocabulary,
    the higher the merge (transformers' ``generate_merges`` with position scores)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, index in vocab.items():
        local = [(token[:k], token[k:], -index) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def gemma_backend(tokens: list[str], token_types: list[int], bos: str = "<bos>", unk: str = "<unk>") -> _Backend:
    """The ``tokenizers.Tokenizer`` of a Gemma vocabulary as a GGUF lists it (tokens and llama.cpp token types)."""
    if len(token_types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(token_types)} token types")
    spelled = tokens
    tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    for name in (bos, unk):
        if name not in vocab:
            raise ValueError(f"special token {name!r} is not in the vocabulary")
    backend = _Backend(BPE(vocab=vocab, merges=gemma_merges(tokens), fuse_unk=True, unk_token=unk, dropout=None, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, token_types) if k == _CONTROL]
    )
    backend.add_tokens(
        # Whitespace runs are left to the BPE model, spelled with "\u2581" (transformers does the same).
        [AddedToken(t, normalized=False, special=False) for t, k in zip(spelled, token_types) if k == _USER_DEFINED and t in vocab]
    )
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
    return backend


class _SentencePiece:
    """The few ``tokenizers.Tokenizer`` methods used here, over a sentencepiece model (``tokenizer.model``).
    Control pieces written in the text are matched whole, like added tokens (sentencepiece matches the
    user-defined ones itself)."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        n = self.sp.get_piece_size()
        self.special = {i for i in range(n) if self.sp.is_control(i)}
        whole = sorted((self.sp.id_to_piece(i) for i in self.special if self.sp.id_to_piece(i)), key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, whole)) + ")") if whole else None

    def encode(self, text: str, add_special_tokens: bool = False):
        ids: list[int] = []
        for k, part in enumerate(self.split.split(text) if self.split else [text]):
            ids += [self.sp.piece_to_id(part)] if k % 2 else self.sp.encode(part) if part else []
        return SimpleNamespace(ids=ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, run = [], []  # sentencepiece drops control pieces: write them between decoded runs
        for i in [*ids, None]:
            if i is None or i in self.special:
                out.append(self.sp.decode(run))
                run = []
                if i is not None and not skip_special_tokens:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out)

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.sp.get_piece_size()


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    backend: Any = dataclasses.field(repr=False)  # tokenizers.Tokenizer (or a sentencepiece adapter)
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str | None = None
    add_bos: bool = True  # what the checkpoint asks for; ``encode`` adds <bos> only when told to

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<start_of_turn>``, ``<bos>``...) are single ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback pieces ``<0x00>`` ... ``<0xFF>``."""
        return frozenset(i for i in (self.token_id(f"<0x{b:02X}>") for b in range(256)) if i is not None)

    @classmethod
    def from_gguf(cls, path) -> Tokenizer:
        """From a GGUF file's metadata (a path, or a ``gemma3_jax.gguf.GGUFFile`` already read)."""
        from gemma3_jax.gguf import GGUFFile, read_gguf

        md = (path if isinstance(path, GGUFFile) else read_gguf(path)).metadata
        model = md.get("tokenizer.ggml.model")
        if model != "llama" or "tokenizer.ggml.tokens" not in md:
            raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; expected a Gemma sentencepiece vocabulary ('llama')")
        tokens = md["tokenizer.ggml.tokens"]
        types = md.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        ids = {k: int(md.get(f"tokenizer.ggml.{k}_token_id", d)) for k, d in (("bos", 2), ("eos", 1), ("padding", 0), ("unknown", 3))}
        backend = gemma_backend(tokens, types, bos=tokens[ids["bos"]], unk=tokens[ids["unknown"]])
        return cls(backend, ids["bos"], ids["eos"], ids["padding"], md.get("tokenizer.chat_template"),
                   bool(md.get("tokenizer.ggml.add_bos_token", True)))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """From a checkpoint directory: ``tokenizer.json`` or ``tokenizer.model``, plus ``tokenizer_config.json``."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            backend = _Backend.from_file(str(path / "tokenizer.json"))
        elif (path / "tokenizer.model").is_file():
            backend = _SentencePiece(path / "tokenizer.model")
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
        cfg = read_json(path / "tokenizer_config.json")
        model_cfg = read_json(path / "config.json")
        model_cfg = model_cfg.get("text_config") or model_cfg

        def special(name: str, default: str, id_key: str, default_id: int) -> int:
            token = cfg.get(f"{name}_token") or default
            token = token.get("content", default) if isinstance(token, dict) else token
            found = backend.token_to_id(token)
            if found is not None:
                return found
            fallback = model_cfg.get(id_key, default_id)
            return int(fallback[0] if isinstance(fallback, list) else fallback)

        return cls(
            backend,
            bos_id=special("bos", "<bos>", "bos_token_id", 2),
            eos_id=special("eos", "<eos>", "eos_token_id", 1),
            pad_id=special("pad", "<pad>", "pad_token_id", 0),
            chat_template=find_chat_template(path, cfg),
            add_bos=bool(cfg.get("add_bos_token", True)),
        )

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (read back by ``from_checkpoint`` and transformers)."""
        if not isinstance(self.backend, _Backend):
            raise TypeError("only a tokenizers-backed Tokenizer can be saved")
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        piece = self.backend.id_to_token
        cfg = {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "bos_token": piece(self.bos_id),
            "eos_token": piece(self.eos_id),
            "pad_token": piece(self.pad_id),
            "unk_token": self.backend.model.unk_token,
            "padding_side": "left",
        }
        if self.token_id("<mask>") is not None:
            cfg["mask_token"] = "<mask>"
        if self.chat_template is not None:
            (path / "chat_template.jinja").write_text(self.chat_template)
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


class StreamDecoder:
    """One sequence's text as its tokens arrive, decoding only recent tokens each time (O(new) per push, not O(all)).

    Each push decodes the window from the last-but-one clean boundary: the tokens of the previous delta give the new
    ones their left context (a piece's leading space), and the new text is what the window's decode adds to the
    decode of that context. A boundary is clean after a token that is not a byte-fallback piece and where the text
    does not end in U+FFFD: a run of byte pieces is decoded as one UTF-8 string (all of it U+FFFD if any part is
    invalid), so text is never committed inside a run that may still grow. Until a clean boundary the new text waits
    in ``pending``; ``text`` + ``pending`` is the decode of every token pushed so far (vLLM's incremental
    detokenizer windows the same way).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # decoded text up to the last clean boundary
        self.pending = ""  # text after it, possibly ending in a split character (U+FFFD)
        self._prefix = self._read = 0  # window start (context), and the end of the text already in ``text``

    def push(self, ids) -> str:
        """Add tokens; return the text they complete (``""`` until a clean boundary)."""
        self.ids.extend(int(i) for i in ids)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        now = self.tokenizer.decode(self.ids[self._prefix :])
        if not now.startswith(before):  # a decoder that rewrote the context: compare whole sequences instead
            before, now = self.text, self.tokenizer.decode(self.ids)
            if not now.startswith(before):  # what was shown is no prefix of the text any more: wait for the end
                self.pending = ""
                return ""
        new = now[len(before) :]
        clean = new and not new.endswith("\ufffd") and self.ids[-1] not in self.tokenizer.byte_token_ids
        if clean:
            self.text, self.pending = self.text + new, ""
            self._prefix, self._read = self._read, len(self.ids)
            return new
        self.pending = new
        return ""


def read_json(file: Path) -> dict:
    """A JSON file's object, {} when the file is absent; a clear error when it is not valid JSON."""
    if not file.is_file():
        return {}
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def find_chat_template(path: Path, *configs: dict) -> str | None:
    """A checkpoint's chat template: chat_template.jinja, chat_template.json, then each config dict given
    (processor_config.json, tokenizer_config.json, ...) in order. None if there is none."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for source in (read_json(path / "chat_template.json"), *configs):
        template = source.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template:
            return template
    return None
