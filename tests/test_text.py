"""Detokenizer and stop matcher, without a model."""

from __future__ import annotations

import random

import pytest

from textgen.text import Detokenizer, StopMatcher


class ByteDecoder:
    """Each id is one byte; decoding is UTF-8 with replacement, as byte-level BPE does."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_holds_partial_utf8_characters():
    detok = Detokenizer(ByteDecoder())
    pieces = [detok.add(b) for b in "aé€😀b".encode()]
    # 'é' is 2 bytes, '€' 3, '😀' 4: nothing shows until each is whole.
    assert pieces == ["a", "", "é", "", "", "€", "", "", "", "😀", "b"]
    assert detok.flush() == ""


def test_detokenizer_flush_shows_an_unfinished_character_as_replacement():
    detok = Detokenizer(ByteDecoder())
    assert [detok.add(b) for b in "x€".encode()[:3]] == ["x", "", ""]
    assert detok.flush() == "\ufffd"


def test_gpt2_tokens_split_a_character_and_join_back(tokenizer):
    ids = tokenizer("日本語 and emoji 🤖!").input_ids
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert "" in pieces  # some characters really are split across tokens
    assert "".join(pieces) + detok.flush() == "日本語 and emoji 🤖!"
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize(
    ("stop", "pieces", "shown", "matched"),
    [
        ((), ["ab", "c"], ["ab", "c"], None),
        (("END",), ["ab", "cE", "N", "D", "x"], ["ab", "c", "", "", ""], "END"),
        (("END",), ["aE", "Nb"], ["a", "ENb"], None),  # a false start is released
        (("\n\n", "."), ["one", ".", "two"], ["one", "", ""], "."),
        (("xyz", "yz"), ["wxy", "zq"], ["w", ""], "xyz"),  # the earliest match wins
        (("ab",), ["xab"], ["x"], "ab"),
    ],
)
def test_stop_matcher(stop, pieces, shown, matched):
    m = StopMatcher(stop)
    assert [m.push(p) for p in pieces] == shown
    assert m.matched == matched


def test_stop_matcher_flush_releases_a_held_tail_at_the_end():
    m = StopMatcher(("STOP",))
    assert m.push("go ST") == "go "
    assert m.flush() == "ST"
    assert m.matched is None


def shown_of(stop: tuple[str, ...], keep: bool, text: str) -> tuple[str, str | None]:
    """What a client may see of `text` when generation has made it (so far): up to the
    earliest stop sequence (through it, with `keep`), else all but the longest suffix
    that could still begin one."""
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
        start, matched = min(hits)
        return text[: start + len(matched) if keep else start], matched
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - held], None


@pytest.mark.parametrize("keep", [False, True])
def test_stop_matcher_shows_what_the_whole_text_allows_at_every_piece(keep):
    """Random texts over three letters, random stop sequences and random cuts into
    pieces (empty ones too): after each push, all that was shown is what the text so far
    allows, and at the end (flush) the text up to a match, or all of it."""
    rng = random.Random(0)
    for _ in range(3000):
        stop = tuple(
            "".join(rng.choices("ab\n", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        )
        text = "".join(rng.choices("ab\n", k=rng.randint(0, 24)))
        cuts = sorted(rng.choices(range(len(text) + 1), k=rng.randint(0, 8)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        m = StopMatcher(stop, keep=keep)
        shown, made, matched = "", "", None
        for piece in pieces:
            shown += m.push(piece)
            made += piece
            expected, matched = shown_of(stop, keep, made)
            assert (shown, m.matched) == (expected, matched), (stop, pieces)
            if matched is not None:
                break
        if matched is None:
            shown += m.flush()
            assert shown == text, (stop, pieces)
        else:
            assert m.push("a") == "" and m.flush() == "" and shown == expected
