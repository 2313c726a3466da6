"""Detokenizer and stop matcher, without a model."""

from __future__ import annotations

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
