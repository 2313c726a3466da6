"""Token ids to text, one token at a time, safe to show as it is made.

Two small pieces, both pure (no model):
- `Detokenizer` turns ids into text without ever splitting a UTF-8 character
  (byte-level BPE cuts some characters across tokens; the bytes are held until
  the character is whole).
- `StopMatcher` finds stop sequences in that text and holds back any tail that
  could still become one, so a client never sees the start of a stop sequence.
"""

from __future__ import annotations

import codecs
from typing import Any, Protocol

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
    """Matches stop sequences (non-empty: SamplingParams holds it) on decoded text.

    Invariant: the text shown to the client contains no stop sequence, and no suffix of
    it could begin one: such a suffix is held back in `_pending`, the text pushed and
    not yet shown, shorter than the longest stop sequence. So a match can only start in
    `_pending` or in the piece pushed after it. With `keep`, the matched stop sequence
    itself is shown last (vLLM's include_stop_str_in_output).
    """

    def __init__(self, stop: tuple[str, ...], keep: bool = False) -> None:
        self._stop = stop
        self._keep = keep
        self._pending = ""
        self.matched: str | None = None

    def push(self, piece: str) -> str:
        """Adds decoded text; returns the part that is safe to show now."""
        if self.matched is not None:
            return ""
        if not self._stop:
            return piece
        text = self._pending + piece
        hits = [(i, s) for s in self._stop if (i := text.find(s)) >= 0]
        if hits:
            start, self.matched = min(hits)
            self._pending = ""
            return text[: start + len(self.matched) if self._keep else start]
        shown = len(text) - self._held_back(text)
        self._pending = text[shown:]
        return text[:shown]

    def flush(self) -> str:
        """At the end of generation the held-back tail can no longer match: show it."""
        pending, self._pending = self._pending, ""
        return pending

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop
        sequence. Such a suffix starts with the sequence's first character, within its
        last len(sequence) - 1 characters: only those places are tried."""
        n, longest = len(text), 0
        for s in self._stop:
            i = text.find(s[0], max(n - len(s) + 1, 0))
            while i >= 0 and n - i > longest:
                if s.startswith(text[i:]):
                    longest = n - i
                    break
                i = text.find(s[0], i + 1)
        return longest


class TokenTable:
    """How each token id is written in API responses.

    GPT-2's byte-level BPE has tokens that are fragments of a UTF-8 character.
    Decoded alone they all read U+FFFD, so OpenAI writes such a token as
    `bytes:\\xNN...`; whole-character tokens are their text. Every id gets a
    distinct string, so `top_logprobs` keys never collide.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
        special = set(tokenizer.all_special_tokens)
        self.bytes: list[bytes] = []  # what the token is
        self.strings: list[str] = []  # how responses write it
        self.visible: list[bytes] = []  # what it adds to generated text (special: nothing)
        for token_id, piece in enumerate(pieces):
            if piece in special or any(c not in byte_of for c in piece):
                raw = tokenizer.decode([token_id]).encode("utf-8")  # added and special tokens
            else:
                raw = bytes(byte_of[c] for c in piece)
            self.bytes.append(raw)
            self.strings.append(_display(raw))
            self.visible.append(b"" if piece in special else raw)
        for _ in range(len(pieces), vocab_size):  # ids the model has and the tokenizer lacks
            self.bytes.append(b"")
            self.strings.append("")
            self.visible.append(b"")

    def offsets(self, token_ids: list[int]) -> list[int]:
        """Where each token starts in the decoded text of `token_ids`, in characters."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offsets, chars = [], 0
        for token_id in token_ids:
            offsets.append(chars)
            chars += len(decoder.decode(self.bytes[token_id]))
        return offsets


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character map: the characters its vocab is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _display(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
