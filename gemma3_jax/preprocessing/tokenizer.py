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
import operator
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from gemma3_jax.preprocessing.chat_template import ChatTemplate, check_syntax, origin_of, read_template_file

SPACE = "\u2581"
BOI, EOI, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
GEMMA_SPECIALS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, IMAGE_SOFT_TOKEN)
NORMAL_TOKEN, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types


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
    """The few ``tokenizers.Tokenizer`` methods used here, over a sentencepiece model (``tokenizer.model``) and the
    tokens ``added_tokens.json`` appends to it (``<image_soft_token>`` in the multimodal checkpoints). Control and
    added pieces written in the text are matched whole (sentencepiece matches the user-defined ones itself); ids
    beyond the vocabulary decode to nothing, as with ``tokenizers``."""

    def __init__(self, path: Path, added: dict[str, int] | None = None):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:  # sentencepiece's "could not parse ModelProto", "unk is not defined"
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        self.n = self.sp.get_piece_size()
        self.added = {t: i for t, i in (added or {}).items() if i >= self.n}
        self.added_pieces = {i: t for t, i in self.added.items()}
        self.special = {i for i in range(self.n) if self.sp.is_control(i)} | set(self.added_pieces)
        whole = sorted({*(self.sp.id_to_piece(i) for i in self.special if i < self.n), *self.added} - {""},
                       key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, whole)) + ")") if whole else None

    def encode(self, text: str, add_special_tokens: bool = False):
        ids: list[int] = []
        for k, part in enumerate(self.split.split(text) if self.split else [text]):
            ids += [self.added.get(part, self.sp.piece_to_id(part))] if k % 2 else self.sp.encode(part) if part else []
        return SimpleNamespace(ids=ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, run = [], []  # sentencepiece drops control pieces: write them between decoded runs
        for i in [*ids, None]:
            if i is None or i in self.special:
                out.append(self.sp.decode(run))
                run = []
                if i is not None and not skip_special_tokens:
                    out.append(self.added_pieces.get(i) or self.sp.id_to_piece(i))
            elif i < self.n:
                run.append(i)
        return "".join(out)

    def token_to_id(self, piece: str) -> int | None:
        if piece in self.added:
            return self.added[piece]
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return max([self.n - 1, *self.added_pieces]) + 1 if with_added_tokens else self.n


def _added_tokens(path: Path) -> dict[str, int]:
    """added_tokens.json ({piece: id}), checked."""
    added = read_json(path / "added_tokens.json")
    for piece, i in added.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{path / 'added_tokens.json'}: the id of {piece!r} must be an int >= 0, got {i!r}")
    return added


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    backend: Any = dataclasses.field(repr=False)  # tokenizers.Tokenizer (or a sentencepiece adapter)
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str | None = None
    add_bos: bool = True  # what the checkpoint asks for; ``encode`` adds <bos> only when told to
    # Tokens the checkpoint's configs name as special (boi/eoi/image tokens of a multimodal tokenizer) that the
    # vocabulary itself does not mark so: transformers drops them too when skipping special tokens.
    extra_special_ids: frozenset[int] = frozenset()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<start_of_turn>``, ``<bos>``...) are single ids."""
        check_text(text)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids beyond the vocabulary (a model's padded embedding rows) decode to nothing, as in
        transformers."""
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            bad = next((i for i in ids if not _is_index(i)), ids)
            raise TypeError(f"decode takes integer token ids, got {bad!r:.60}") from None
        if ids and (min(ids) < 0 or max(ids) >= 2**32):
            raise ValueError(f"token id {min(ids) if min(ids) < 0 else max(ids)} is out of range")
        if skip_special_tokens and self.extra_special_ids:
            ids = [i for i in ids if i not in self.extra_special_ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the byte-fallback pieces ``<0x00>`` ... ``<0xFF>``."""
        return frozenset(i for i in (self.token_id(f"<0x{b:02X}>") for b in range(256)) if i is not None)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """From a checkpoint directory: ``tokenizer.json`` or ``tokenizer.model``, plus ``tokenizer_config.json``.

        The vocabulary must hold what the checkpoint uses: ``<bos>``, the image tokens of a multimodal config.json
        (with the ids it names), and the special tokens its chat template writes."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            backend = _load_tokenizer_json(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            backend = _SentencePiece(path / "tokenizer.model", _added_tokens(path))
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
        _added_tokens(path)  # checked either way: transformers reads it beside tokenizer.json too
        cfg = {**read_json(path / "special_tokens_map.json"), **read_json(path / "tokenizer_config.json")}
        top = read_json(path / "config.json")
        model_cfg = top.get("text_config") if isinstance(top.get("text_config"), dict) else top
        where = f"the tokenizer in {path}"

        def special(name: str, default: str, id_key: str, default_id: int, required: bool = False) -> int:
            token = cfg.get(f"{name}_token") or default
            token = token.get("content", default) if isinstance(token, dict) else token
            if not isinstance(token, str):
                raise ValueError(f"{path / 'tokenizer_config.json'} (or special_tokens_map.json): {name}_token must be "
                                 f"a str, got {token!r}")
            found = backend.token_to_id(token)
            if found is not None:
                return found
            if required:
                raise ValueError(f"{where} has no {token!r} token ({name}_token)")
            fallback = model_cfg.get(id_key, default_id)
            fallback = fallback[0] if isinstance(fallback, list) and fallback else fallback
            if isinstance(fallback, bool) or not isinstance(fallback, int):
                raise ValueError(f"{where} has no {token!r} token and config.json's {id_key} is {fallback!r}")
            return fallback

        tok = cls(
            backend,
            bos_id=special("bos", "<bos>", "bos_token_id", 2, required=True),
            eos_id=special("eos", "<eos>", "eos_token_id", 1),
            pad_id=special("pad", "<pad>", "pad_token_id", 0),
            chat_template=find_chat_template(path, ("tokenizer_config.json", cfg)),
            add_bos=bool(cfg.get("add_bos_token", True)),
            extra_special_ids=_named_special_ids(backend, cfg),
        )
        if isinstance(top.get("vision_config"), dict):  # multimodal: the processor's tokens, at config.json's ids
            for piece, keys in ((BOI, ("boi_token_id", "boi_token_index")), (EOI, ("eoi_token_id", "eoi_token_index")),
                                (IMAGE_SOFT_TOKEN, ("image_token_id", "image_token_index"))):
                found = tok.require(piece, f"{where} (a multimodal checkpoint: config.json has a vision_config)")
                want = next((top[k] for k in keys if top.get(k) is not None), found)
                if want != found:
                    raise ValueError(f"{where} maps {piece} to id {found} but config.json's {keys[1]} is {want!r}")
        if tok.chat_template is not None:
            for piece in (p for p in GEMMA_SPECIALS if p in tok.chat_template):
                tok.require(piece, f"{where} (the chat template from {origin_of(tok.chat_template)} writes {piece})")
        return tok

    def require(self, piece: str, where: str = "the tokenizer") -> int:
        """The id of ``piece``, a ValueError saying it is missing from ``where`` otherwise."""
        found = self.token_id(piece)
        if found is None:
            raise ValueError(f"{where}: the vocabulary has no {piece} token")
        return found

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


def _named_special_ids(backend, cfg: dict) -> frozenset[int]:
    """Ids of the tokens tokenizer_config.json / special_tokens_map.json list as ``extra_special_tokens`` (a dict
    in transformers v5, a list before) or ``additional_special_tokens``."""
    names = []
    for key in ("extra_special_tokens", "additional_special_tokens"):
        value = cfg.get(key) or []
        names += list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, list) else []
    names = [n.get("content") if isinstance(n, dict) else n for n in names]
    return frozenset(i for i in (backend.token_to_id(n) for n in names if isinstance(n, str)) if i is not None)


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
    """A JSON file's object, {} when the file is absent; a ValueError naming the file when it is unreadable, not
    JSON, or JSON that is not an object."""
    if not file.is_file():
        return {}
    try:
        with open(file, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{file} is nested too deeply to read") from None
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} holds a JSON {type(value).__name__}, expected an object ({{...}})")
    return value


def check_text(text: str, what: str = "prompt") -> None:
    """A TypeError for a non-str, a ValueError naming the position of a character UTF-8 cannot encode (a lone
    surrogate, e.g. from invalid bytes decoded with ``surrogateescape`` as ``sys.argv`` does)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: character {e.start} is {text[e.start]!r} (a lone surrogate: "
                         f"invalid UTF-8 in the input?)") from None


def _is_index(value: Any) -> bool:
    try:
        operator.index(value)
        return True
    except TypeError:
        return False


def _load_tokenizer_json(file: Path) -> _Backend:
    try:
        return _Backend.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception ("EOF while parsing", "expected struct")
        raise ValueError(f"{file} is not a tokenizer.json the tokenizers library can load: {e}") from None


def find_chat_template(path: Path, *configs: dict | tuple[str, dict]) -> ChatTemplate | None:
    """A checkpoint's chat template: chat_template.jinja, chat_template.json, then each config given
    (processor_config.json, tokenizer_config.json, ...: a dict, or (its file name, the dict)) in order. None if there
    is none. Its syntax is checked here, so a broken template is reported when the checkpoint is opened, with its
    file and line."""
    if (path / "chat_template.jinja").is_file():
        template = read_template_file(path / "chat_template.jinja")
        if template.strip():  # an empty file is no template (transformers: none); a template would drop the prompt
            check_syntax(template)
            return template
    sources = [(path / "chat_template.json", read_json(path / "chat_template.json"))]
    sources += [(path / c[0], c[1]) if isinstance(c, tuple) else (path, c) for c in configs]
    for where, source in sources:
        template = source.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            if not all(isinstance(t, dict) for t in template):
                raise ValueError(f"{where}: chat_template is a list whose items are not {{'name', 'template'}} objects")
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if template is None or (isinstance(template, str) and not template.strip()):
            continue
        if not isinstance(template, str):
            raise ValueError(f"{where}: chat_template is a {type(template).__name__}, not a template's text")
        template = ChatTemplate(template, str(where))
        check_syntax(template)
        return template
    return None
