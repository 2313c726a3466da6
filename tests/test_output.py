"""The output side: token ids to text, stop strings and events, off the engine thread."""

from __future__ import annotations

import asyncio
import codecs
import random

import pytest

from tests.conftest import run
from textgen import metrics
from textgen.engine import HeldEvents
from textgen.output import (
    ByteLevelDetokenizer,
    SequenceOutput,
    detokenizer_factory,
    process_step,
    whole_texts,
)
from textgen.params import SamplingParams
from textgen.scheduler import FinishEvent, Sequence, Status, TokenEvent
from textgen.text import Detokenizer, TokenTable

EOS = 0


class Letters:
    """id i decodes to chr(ord('a') + i - 1); id 0 is EOS and decodes to nothing."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


class Pipe:
    """One sequence through both sides, one token a step, as the engine hands them over."""

    def __init__(self, **params) -> None:
        self.seq = Sequence([1, 2], SamplingParams(**params))
        self.seq.status = Status.RUNNING
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled: list[Sequence] = []
        self.output = SequenceOutput(
            self.seq,
            self.queue,
            Detokenizer(Letters()),
            "test",
            metrics.get(),
            self.cancelled.append,
        )

    def step(self, token_id: int) -> None:
        seq = self.seq
        seq.append_token(token_id, EOS)
        status = seq.status if seq.status.finished else None
        process_step([(self.output, [token_id], None, status, None, 0, None)], 0.0, metrics.get())

    def events(self) -> list:
        out = []
        while not self.queue.empty():
            out.append(self.queue.get_nowait()[1])
        return out


@pytest.mark.parametrize(
    ("params", "tokens", "status", "text"),
    [
        ({"max_new_tokens": 3}, [1, 2, 3], Status.FINISHED_LENGTH, "abc"),
        ({"max_new_tokens": 5}, [1, 2, EOS], Status.FINISHED_EOS, "ab"),
        ({"max_new_tokens": 5, "stop": ("bc",)}, [1, 2, 3], Status.FINISHED_STOP, "a"),
        ({"max_new_tokens": 2, "stop": ("bc",)}, [1, 2], Status.FINISHED_LENGTH, "ab"),
        ({"max_new_tokens": 3, "ignore_eos": True}, [1, EOS, 2], Status.FINISHED_LENGTH, "ab"),
        # A stop string in the tail held back at the last token still ends it with stop.
        ({"max_new_tokens": 2, "stop": ("b",)}, [1, 2], Status.FINISHED_STOP, "a"),
        (
            {"max_new_tokens": 5, "stop": ("bc",), "include_stop_str_in_output": True},
            [1, 2, 3],
            Status.FINISHED_STOP,
            "abc",
        ),
        ({"max_new_tokens": 8, "stop_token_ids": (3,)}, [1, 2, 3], Status.FINISHED_STOP, "ab"),
        (
            {"max_new_tokens": 8, "stop_token_ids": (3,), "include_stop_str_in_output": True},
            [1, 2, 3],
            Status.FINISHED_STOP,
            "abc",
        ),
    ],
)
def test_finish_reasons_and_text(params, tokens, status, text):
    pipe = Pipe(**params)
    for t in tokens:
        assert not pipe.output.finished
        pipe.step(t)
    events = pipe.events()
    final = events[-1]
    assert isinstance(final, FinishEvent)
    assert (final.status, final.text, final.completion_tokens) == (status, text, len(tokens))
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == text
    assert [e.token_id for e in events if isinstance(e, TokenEvent)] == tokens


def test_a_stop_string_cancels_the_engine_sequence_and_drops_what_it_made_after():
    pipe = Pipe(max_new_tokens=9, stop=("bc",))
    for t in (1, 2, 3):
        pipe.step(t)
    assert pipe.cancelled == [pipe.seq]  # the engine had not finished it
    assert pipe.seq.status is Status.RUNNING
    events = pipe.events()
    assert events[-1] == FinishEvent(Status.FINISHED_STOP, "a", 2, 3)
    # The engine's next token, and its cancellation, reach no one.
    pipe.step(4)
    pipe.seq.finish(Status.CANCELLED)
    process_step([(pipe.output, [], None, Status.CANCELLED, None, 0, None)], 0.0, metrics.get())
    assert pipe.events() == []


def test_several_tokens_in_one_step_and_a_failure_after_them():
    pipe = Pipe(max_new_tokens=9)
    process_step([(pipe.output, [1, 2], None, Status.FAILED, "boom", 3, None)], 0.0, metrics.get())
    events = pipe.events()
    assert [e.text for e in events[:2]] == ["a", "b"]
    assert events[2] == FinishEvent(Status.FAILED, "ab", 2, 2, "boom", 3)


def test_a_failing_output_fails_only_its_own_sequence():
    class Broken:
        def add(self, token_id: int) -> str:
            raise RuntimeError("no text")

        def flush(self) -> str:
            return ""

    bad, good = Pipe(max_new_tokens=9), Pipe(max_new_tokens=9)
    bad.output._detokenizer = Broken()
    process_step(
        [
            (bad.output, [1], None, None, None, 0, None),
            (good.output, [1], None, None, None, 0, None),
        ],
        0.0,
        metrics.get(),
    )
    (failed,) = bad.events()
    assert failed.status is Status.FAILED and failed.error == "generation failed: no text"
    assert bad.cancelled == [bad.seq]
    assert [e.text for e in good.events()] == ["a"]


def test_byte_level_detokenizer_equals_the_tokenizers_decode(tokenizer):
    table = TokenTable(tokenizer, 50257)
    make = detokenizer_factory(tokenizer, table.visible)
    assert isinstance(make(), ByteLevelDetokenizer)
    texts = ["日本語 and emoji 🤖!", "plain text, with  spaces\n\nand lines", "ü€😀" * 3]
    cases = [tokenizer(t).input_ids for t in texts]
    rng = random.Random(0)
    # Random ids split characters anywhere, make invalid UTF-8, and include EOS (special).
    cases += [[rng.randrange(50257) for _ in range(40)] + [50256, 220] for _ in range(50)]
    cases += [[rng.choice([0xAB, 0x9E, 0xF0, 50256, 162, 250]) for _ in range(20)]]
    for ids in cases:
        detok = make()
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=True)


class CountedTexts(list):
    """A detokenizer's text table that counts the texts it hands out (not None)."""

    handed = 0

    def __getitem__(self, token_id: int) -> str | None:  # type: ignore[override]
        text = super().__getitem__(token_id)
        self.handed += text is not None
        return text


def test_byte_level_pieces_are_a_plain_utf8_decoders_token_by_token(tokenizer):
    """The looked-up text of whole tokens changes no piece: each token adds what an
    incremental UTF-8 decoder (with replacement) fed every token's bytes returns, also
    right after a character split across tokens, an invalid byte and EOS."""
    table = TokenTable(tokenizer, 50257)
    assert isinstance(detokenizer_factory(tokenizer, table.visible)(), ByteLevelDetokenizer)
    texts = CountedTexts(whole_texts(table.visible))
    rng = random.Random(1)
    split = tokenizer("日本語 🤖 ü").input_ids
    # Ids 171, 240 and 158 are the single bytes EF, 92 and E2: two lead bytes of
    # three-byte characters and a lone continuation byte.
    cases = [
        split,
        [171, 220, 240, 158, 50256, 220, 262],
        *([*split[:k], 262, 50256, 220] for k in range(len(split))),
    ]
    cases += [[rng.randrange(50257) for _ in range(60)] for _ in range(30)]
    for ids in cases:
        detok = ByteLevelDetokenizer(table.visible, texts)
        plain = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            assert detok.add(i) == plain.decode(table.visible[i]), ids
        assert detok.flush() == plain.decode(b"", final=True)
    assert texts.handed > 1000  # the lookup path ran, not only the decoder


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_by_itself(tokenizer):
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert isinstance(detokenizer_factory(tokenizer, [])(), Detokenizer)
    finally:
        tokenizer.clean_up_tokenization_spaces = False


def test_the_engine_frees_a_sequence_a_stop_string_ended(engine):
    prompt = engine.tokenize("Hello there")
    free = engine.new_sequence(prompt, SamplingParams(max_new_tokens=12, min_new_tokens=12))

    async def texts(seq) -> tuple[list[TokenEvent], FinishEvent]:
        events = [e async for _, e in engine.stream([seq])]
        return events[:-1], events[-1]

    tokens, final = run(texts(free))
    stop = tokens[3].text  # the 4th token's text: the first stop match is there or before
    assert stop
    seq = engine.new_sequence(prompt, SamplingParams(max_new_tokens=12, stop=(stop,)))
    stopped, end = run(texts(seq))
    cut = final.text.index(stop)
    assert end.status is Status.FINISHED_STOP and end.text == final.text[:cut]
    assert "".join(e.text for e in stopped) == end.text
    assert end.completion_tokens == len(stopped) <= 4
    for _ in range(200):  # the engine retires it at its next step
        if seq.status.finished and seq.slot == -1:
            break
        run(asyncio.sleep(0.01))
    assert seq.status is Status.CANCELLED and seq.slot == -1


def test_observe_many_equals_as_many_observations():
    import prometheus_client as prom

    one, many = (
        prom.Histogram(name, "", buckets=metrics.LATENCY_BUCKETS, registry=prom.CollectorRegistry())
        for name in ("one", "many")
    )
    for amount, count in [(0.003, 5), (0.05, 2), (0.05000001, 1), (100.0, 3)]:
        for _ in range(count):
            one.observe(amount)
        metrics.observe_many(many, amount, count)
    samples = [
        {
            (s.name.split("_", 1)[1], s.labels.get("le")): s.value
            for s in h.collect()[0].samples
            if not s.name.endswith("_created")  # when each was made
        }
        for h in (one, many)
    ]
    assert samples[0].keys() == samples[1].keys()
    for key, value in samples[0].items():  # the sum, added in another order, to rounding
        assert samples[1][key] == pytest.approx(value, rel=1e-12), key


def test_a_response_sent_whole_gets_the_same_events_once_all_finished(engine):
    prompt = engine.tokenize("Hello there")
    short, long = (SamplingParams(max_new_tokens=n, min_new_tokens=n) for n in (2, 9))

    async def read(final_only: bool) -> tuple[list, list[bool]]:
        seqs = [engine.new_sequence(prompt, short), engine.new_sequence(prompt, long)]
        events = engine.stream(seqs, final_only=final_only)
        read, finished_then = [], []
        async for i, event in events:
            finished_then.append(all(seq.status.finished for seq in seqs))
            read.append((i, type(event), getattr(event, "token_id", None)))
        return read, finished_then

    streamed, _ = run(read(False))
    whole, finished_then = run(read(True))
    assert whole == streamed  # the same events in the same order (greedy)
    assert len(whole) == 2 + 1 + 9 + 1
    assert all(finished_then)  # none read before the last sequence finished


def test_a_response_sent_whole_read_with_ready_and_closed_early_frees_its_rows(engine):
    prompt = engine.tokenize("Hello there")
    params = SamplingParams(max_new_tokens=1000, min_new_tokens=1000)  # far past 0.1 s

    async def go() -> list:
        seq = engine.new_sequence(prompt, params)
        events = engine.stream([seq], final_only=True)
        await asyncio.sleep(0.05)
        assert events.ready() == []  # nothing is ready before every sequence finished
        task = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.05)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        await events.aclose()
        for _ in range(200):
            if seq.slot == -1:
                break
            await asyncio.sleep(0.01)
        return [seq.status, seq.slot]

    assert run(go()) == [Status.CANCELLED, -1]


def test_a_response_sent_whole_hears_a_failure_at_once_and_cancels_the_rest(engine):
    prompt = engine.tokenize("Hello there")
    params = SamplingParams(max_new_tokens=600, min_new_tokens=600)

    def boom(token_id: int) -> str:
        raise RuntimeError("boom")

    async def go() -> tuple[int, str, int]:
        seqs = [engine.new_sequence(prompt, params), engine.new_sequence(prompt, params)]
        events = engine.stream(seqs, final_only=True)
        engine._sinks[seqs[0].request_id].output._detokenizer.add = boom  # its first token
        try:
            async for i, event in events:
                if isinstance(event, FinishEvent):
                    return i, event.error, len(seqs[1].output_ids)
        finally:
            await events.aclose()  # as the routes do: the other sequence is cancelled
        raise AssertionError("no finish event")

    i, error, sibling_tokens = run(go())
    assert (i, error) == (0, "generation failed: boom")
    assert sibling_tokens < 100  # read long before the other sequence's 600 tokens


@pytest.mark.parametrize(
    ("first_end", "released_at_first_end"),
    [(Status.FINISHED_LENGTH, False), (Status.FAILED, True), (Status.CANCELLED, True)],
)
def test_held_events_are_released_when_all_finished_or_one_ends_unanswered(
    first_end, released_at_first_end
):
    async def go() -> list:
        held = HeldEvents(2)
        token = TokenEvent(5, "e", None, (), None)
        held.put_nowait((1, token))
        held.put_nowait((2, token))
        assert held.empty()  # nothing readable before a finish
        held.put_nowait((1, FinishEvent(first_end, "e", 2, 1, None)))
        assert held.empty() is not released_at_first_end
        held.put_nowait((2, FinishEvent(Status.FINISHED_LENGTH, "e", 2, 1, None)))
        held.put_nowait((2, token))  # past the release: straight through
        return [await held.get() for _ in range(5)]

    got = run(go())
    assert [rid for rid, _ in got] == [1, 2, 1, 2, 2]  # every event, in the order put
    assert [type(e).__name__ for _, e in got] == [
        "TokenEvent",
        "TokenEvent",
        "FinishEvent",
        "FinishEvent",
        "TokenEvent",
    ]
