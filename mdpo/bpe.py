"""Byte-level BPE tokenizers (Llama 3, Qwen 2.5 / 3) from a checkpoint's tokenizer.json.

Encoding runs in the `tokenizers` library (the optional extra "bpe": `pip install tokenizers`), the same Rust
code that transformers' fast tokenizers run, so ids equal transformers' by construction for every merge list,
pre-tokenizer split pattern and normalizer a checkpoint ships. Measured on GSM8K text, one call per document
(benchmarks/bench_tokenizer.py, docs/LOG.md session 12): 0.69 M tokens/s against SentencePiece's 1.16 M on the
real Gemma 3 vocabulary, so the library is the slower of the two by 1.7x (mdpo's wrapper costs 7% of it). It is
still the choice: encoding is not on any hot path (the sampler never encodes model text, and a whole GSM8K
train split encodes in under 2 s), and an own implementation would have to be exact on every checkpoint's regex
and merge rules and beat SentencePiece, which this Rust library does not (not attempted).

What mdpo adds on top is what its sampler and data builders need, with the interface of mdpo.tokenizer.Tokenizer:
- `encode(text, special=False)` / `encode_parts`: a special-token string inside data (an interpreter printing
  "<|im_end|>") is spelled as ordinary tokens, never the special id;
- `_token_bytes` and DecodeStream: every token's exact bytes (the byte-level alphabet mapped back), so the
  sampler's fence scan decodes one token at a time without splitting a UTF-8 character;
- the chat format's strings (mdpo/chat.py), stop ids and a chat template that renders the same text;
- `save_pretrained`: tokenizer.json + tokenizer_config.json, which transformers loads as its fast tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mdpo.chat import FORMATS, ChatFormat, chat_template, render
from mdpo.decode_stream import DecodeStream

CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("a tokenizer.json (byte-level BPE: Llama 3, Qwen) needs the 'tokenizers' package: "
                          "pip install 'mdpo[bpe]' (or pip install tokenizers)") from None
    return tokenizers


def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the printable character standing for each of the 256 bytes.
    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) take 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _content(token: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


class BPETokenizer:
    """A byte-level BPE tokenizer with mdpo's tokenizer interface. `BPETokenizer.from_pretrained(folder)`."""

    def __init__(self, tokenizer_json: str, config: Mapping[str, Any] | None = None, *, template: str | None = None,
                 source: str = TOKENIZER_FILE):
        tk = _tokenizers()
        self._json = tokenizer_json
        self._config = dict(config or {})
        try:
            self.tk = tk.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library's own parse errors
            raise ValueError(f"{source}: not a tokenizers tokenizer.json ({e})") from None
        self.tk.no_padding()
        self.tk.no_truncation()
        self.source = source
        self.vocab_size: int = self.tk.get_vocab_size(with_added_tokens=True)
        added = self.tk.get_added_tokens_decoder()  # id -> AddedToken
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        # Bytes of every id: model tokens map their byte-level characters back to bytes, added tokens are their
        # text as written.
        alphabet = byte_alphabet()
        self._bytes: list[bytes] = [b""] * self.vocab_size
        for piece, i in self.tk.get_vocab(with_added_tokens=False).items():
            if i < self.vocab_size:
                self._bytes[i] = bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()
        for i, t in added.items():
            if i < self.vocab_size:
                self._bytes[i] = t.content.encode()

        self._template = template
        chat = self.chat
        c = self._config
        self.bos_id = self._id(_content(c.get("bos_token")))
        self.eos_id = self._id(_content(c.get("eos_token")))
        self.pad_id = self._id(_content(c.get("pad_token")))
        self.unk_id = self._id(_content(c.get("unk_token")))
        if self.eos_id is None:
            raise ValueError(f"{source}: {CONFIG_FILE} names no eos_token that the vocabulary has")
        self.end_of_turn_id = self._id(chat.end_turn) if chat else None
        self.start_of_turn_id = self._id(chat.start_turn) if chat and chat.start_turn else None
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in (self.eos_id, self.end_of_turn_id)
                                                             if i is not None))
        self.fingerprint = hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]

    # ---- construction / saving ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, template: str | None = None) -> "BPETokenizer":
        """Load `path/tokenizer.json` and, if present, `path/tokenizer_config.json` (special tokens)."""
        from mdpo import textfile

        d = Path(path)
        file = d / TOKENIZER_FILE if d.is_dir() else d
        if not file.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {file} (from_pretrained({os.fspath(path)!r}))")
        cfg_file = file.parent / CONFIG_FILE
        config = textfile.read_json(cfg_file, ValueError) if cfg_file.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object")
        return cls(file.read_text(encoding="utf-8"), config, template=template, source=str(file))

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write tokenizer.json and tokenizer_config.json (special tokens, the chat template): a folder
        transformers' AutoTokenizer loads as its fast tokenizer with the same ids and the same chat text."""
        from mdpo.atomic import atomic_open, write_json_atomic

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self._config.items() if k != "chat_template"}
        config.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                      add_bos_token=False, add_eos_token=False)
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            config[key] = self._bytes[i].decode() if i is not None else None
        if self.chat is not None:
            config["chat_template"] = chat_template(self.chat)
        with atomic_open(d / TOKENIZER_FILE, "w") as f:
            f.write(self._json)
        write_json_atomic(d / CONFIG_FILE, config)
        return [str(d / TOKENIZER_FILE), str(d / CONFIG_FILE)]

    # ---- vocabulary ----------------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    @property
    def generation(self) -> str | None:
        """The chat format's name (mdpo.chat.FORMATS): the constructor's, else from the vocabulary's markers."""
        if self._template is not None:
            return self._template
        if self.tk.token_to_id("<|im_start|>") is not None:
            return "chatml"
        if self.tk.token_to_id("<|start_header_id|>") is not None:
            return "llama3"
        return None

    @property
    def chat(self) -> ChatFormat | None:
        return FORMATS.get(self.generation) if self.generation else None

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_piece(self, token_id: int) -> str:
        return self.tk.id_to_token(token_id)

    def piece_to_id(self, piece: str) -> int:
        i = self.tk.token_to_id(piece)
        if i is None:
            raise KeyError(piece)
        return i

    # ---- encode / decode -----------------------------------------------------------------------

    def _plain(self, text: str) -> list[int]:
        """Ids of text with no special token matched in it (added non-special tokens still are, as in
        transformers)."""
        if not text:
            return []
        self.tk.encode_special_tokens = True
        try:
            return self.tk.encode(text, add_special_tokens=False).ids
        finally:
            self.tk.encode_special_tokens = False

    def encode(self, text: str, bos: bool = False, special: bool = True, start: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids (as in transformers) unless
        `special=False`. `bos=True` prepends the BOS token where the tokenizer has one, never twice. `start` is
        the SentencePiece tokenizer's (a dummy prefix at the text's start); byte-level BPE adds no prefix."""
        ids = (self.tk.encode(text, add_special_tokens=False).ids if text else []) if special else self._plain(text)
        if bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_parts(self, parts: Sequence[tuple[str, bool]], bos: bool = False, start: bool = True) -> list[int]:
        """`encode` of the joined texts of (text, special allowed) parts, except that a special-token string
        inside a part with special=False is spelled as ordinary tokens. The library splits text at special
        tokens before anything else, so a run of text between two special tokens is one encode call here
        whatever parts it spans: the ids equal `encode` of the whole text wherever that has no special
        string inside a data part."""
        merged: list[list] = []  # adjacent parts of one kind joined: a special string may span two of them
        for text, allowed in parts:
            if merged and merged[-1][1] == bool(allowed):
                merged[-1][0] += text
            else:
                merged.append([text, bool(allowed)])
        ids: list[int] = []
        run = ""  # text since the last special token, to be encoded as one piece
        for text, allowed in merged:
            if not allowed:
                run += text
                continue
            enc = self.tk.encode(text, add_special_tokens=False) if text else None
            pos = 0
            for tid, (s, e) in zip(enc.ids, enc.offsets) if enc else ():
                if tid in self.special_ids:
                    run += text[pos:s]
                    ids.extend(self._plain(run))
                    ids.append(tid)
                    run, pos = "", e
            run += text[pos:]
        ids.extend(self._plain(run))
        if bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (special tokens as their text unless skip_special_tokens); bytes that are not UTF-8
        become U+FFFD, one per invalid sequence."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return b"".join(self._token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def decode_stream(self, skip_special_tokens: bool = False):
        """A DecodeStream decoding generated tokens one at a time."""
        return DecodeStream(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    template: str | None = None) -> str:
        """The prompt text of `messages` in the chat format (BOS text first where the tokenizer has one); the
        same text as the chat template save_pretrained writes. No default system turn is added."""
        chat = FORMATS.get(template) if template else self.chat
        if chat is None:
            raise ValueError(f"{self.source}: no chat format known for this vocabulary; pass template= one of "
                             f"{sorted(FORMATS)}")
        return render(chat, messages, self._bytes[self.bos_id].decode() if self.bos_id is not None else "",
                      add_generation_prompt)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, generation={self.generation!r})"
