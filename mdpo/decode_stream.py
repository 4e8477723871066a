"""Incremental, byte-exact decoding of generated tokens, for any mdpo tokenizer (SentencePiece or BPE).

A tokenizer provides `_token_bytes(id)` (the exact bytes a token stands for) and `special_ids`; this class turns
a stream of ids into text without ever splitting a UTF-8 character, which the sampler's fence scan relies on.
"""

from __future__ import annotations

import codecs


class DecodeStream:
    """Incremental decoding for a sampler: `step(token_id)` returns the text this token completes.

    Bytes of a UTF-8 character split over byte-fallback tokens are held back (at most 3 bytes)
    until the character is complete, so no step yields a U+FFFD fragment of a valid character.
    `"".join(steps) + flush()` equals `tokenizer.decode(ids)`; each step is O(1).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Python's incremental UTF-8 decoder keeps only an incomplete character's bytes, and its
        # output concatenates to exactly what a one-shot decode("utf-8", "replace") returns.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        """Feed one token id; return the newly completed text (possibly "")."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        return self._decoder.decode(self.tokenizer._token_bytes(token_id))

    def steps(self, token_ids) -> str:
        """Feed several token ids at once: the same text as their steps joined, in one decoder call."""
        if self.skip_special_tokens:
            token_ids = [t for t in token_ids if int(t) not in self.tokenizer.special_ids]
        return self._decoder.decode(b"".join(self.tokenizer._token_bytes(int(t)) for t in token_ids))

    def flush(self) -> str:
        """End of sequence: return U+FFFD for a trailing incomplete character (else "")."""
        return self._decoder.decode(b"", final=True)
