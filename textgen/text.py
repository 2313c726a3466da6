"""Token ids to text, one token at a time, safe to show as it is made.

Two small pieces, both pure (no model):
- `Detokenizer` turns ids into text without ever splitting a UTF-8 character
  (byte-level BPE cuts some characters across tokens; the bytes are held until
  the character is whole).
- `StopMatcher` finds stop sequences in that text and holds back any tail that
  could still become one, so a client never sees the start of a stop sequence.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class Detokenizer:
    """Incremental decoding with prefix/read offsets (as TGI and vLLM do)."""

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # ids before this were turned into text already

    def add(self, token_id: int) -> str:
        """Appends one id; returns the text it completes ('' while a character is partial)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text of ids still held (an unfinished character becomes U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=True) if ids else ""


class StopMatcher:
    """Matches stop sequences on decoded text.

    Invariant: `text[:emitted]` was shown to the client and contains no stop
    sequence, and no suffix of it that could begin one was shown (that suffix is
    held back), so a match can only start at or after `emitted`.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self._text = ""
        self._emitted = 0
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        """Adds decoded text; returns the part that is safe to show now."""
        if self.matched is not None:
            return ""
        self._text += piece
        if not self._stop:
            return self._emit(len(self._text))
        hits = [(i, s) for s in self._stop if (i := self._text.find(s, self._emitted)) >= 0]
        if hits:
            start, self.matched = min(hits)
            out = self._emit(start)
            self._text = self._text[:start]
            return out
        return self._emit(len(self._text) - self._held_back())

    def flush(self) -> str:
        """At the end of generation the held-back tail can no longer match: show it."""
        return self._emit(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest unshown suffix that is a proper prefix of a stop sequence."""
        pending = self._text[self._emitted :]
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), longest, -1):
                if pending.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, end: int) -> str:
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out
