"""Text chunks from token ids, as they are generated.

Decoding one token at a time breaks characters that span several byte-level tokens and loses the
spaces that SentencePiece-style decoders strip from a leading piece. So each step decodes a short
window of recent ids twice (with and without the new ones) and emits only the difference, holding it
back while it ends in an incomplete character (the same scheme as vLLM and TGI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one by one; get back the new text each one completes (often '')."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # ids before this were already emitted as text
        self._emitted: list[str] = []

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end (e.g. a character cut off by max_tokens)."""
        full = self._decode(self._ids)
        emitted = "".join(self._emitted)
        delta = full[len(emitted) :] if full.startswith(emitted) else ""
        if delta:
            self._emitted.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far: by construction the concatenation of all returned chunks."""
        return "".join(self._emitted)
