"""Admission, retirement, cancellation and finish reasons, with scripted tokens and no model."""

from __future__ import annotations

import pytest

from textgen.params import SamplingParams
from textgen.scheduler import FinishEvent, QueueFull, Scheduler, Sequence, Status, TokenEvent

EOS = 0


class Letters:
    """id i decodes to chr(ord('a') + i - 1); id 0 is EOS and decodes to nothing."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


def seq(max_new_tokens: int = 4, **params) -> Sequence:
    return Sequence([1, 2], SamplingParams(max_new_tokens=max_new_tokens, **params), Letters())


def step(s: Scheduler, scripted: dict[Sequence, int]) -> None:
    """One engine step with scripted tokens instead of a model."""
    for q in s.running:
        q.append_token(scripted[q], EOS)


def test_admit_fills_free_rows_in_order_and_keeps_the_rest_waiting():
    s = Scheduler(max_batch_size=2, max_waiting=10)
    a, b, c = seq(), seq(), seq()
    s.submit([a, b, c])
    admitted, dropped = s.admit()
    assert admitted == [a, b] and dropped == []
    assert [q.row for q in s.running] == [0, 1]
    assert c.status is Status.WAITING and s.num_waiting == 1


def test_a_finished_row_is_refilled_at_the_next_step_and_rows_stay_dense():
    s = Scheduler(max_batch_size=3, max_waiting=10)
    a, b, c, d = seq(max_new_tokens=1), seq(), seq(), seq()
    s.submit([a, b, c])
    s.admit()
    step(s, {a: 5, b: 5, c: 5})
    assert a.status is Status.FINISHED_LENGTH
    s.submit([d])
    done, moves = s.retire()
    assert done == [a] and moves == [(2, 0)]  # the last row moves into the freed one
    assert s.running == [c, b] and (c.row, b.row) == (0, 1)
    admitted, _ = s.admit()
    assert admitted == [d] and d.row == 2


def test_retire_moves_are_valid_when_several_rows_finish():
    s = Scheduler(max_batch_size=5, max_waiting=10)
    seqs = [seq() for _ in range(5)]
    s.submit(seqs)
    s.admit()
    for i in (0, 3, 4):
        seqs[i].finish(Status.FINISHED_EOS)
    rows = {q: q.row for q in seqs}  # row -> the sequence whose cache is in it
    cache = {row: q for q, row in rows.items()}
    _, moves = s.retire()
    for src, dst in moves:
        cache[dst] = cache[src]
    assert [cache[i] for i in range(len(s.running))] == s.running
    assert all(q.row == i for i, q in enumerate(s.running))


@pytest.mark.parametrize(
    ("params", "tokens", "status", "text"),
    [
        ({"max_new_tokens": 3}, [1, 2, 3], Status.FINISHED_LENGTH, "abc"),
        ({"max_new_tokens": 5}, [1, 2, EOS], Status.FINISHED_EOS, "ab"),
        ({"max_new_tokens": 5, "stop": ("bc",)}, [1, 2, 3], Status.FINISHED_STOP, "a"),
        ({"max_new_tokens": 2, "stop": ("bc",)}, [1, 2], Status.FINISHED_LENGTH, "ab"),
        ({"max_new_tokens": 3, "ignore_eos": True}, [1, EOS, 2], Status.FINISHED_LENGTH, "ab"),
    ],
)
def test_finish_reasons(params, tokens, status, text):
    q = seq(**params)
    for t in tokens:
        assert not q.status.finished
        q.append_token(t, EOS)
    assert q.status is status
    final = q.events[-1]
    assert isinstance(final, FinishEvent)
    assert (final.status, final.text, final.completion_tokens) == (status, text, len(tokens))
    shown = "".join(e.text for e in q.events if isinstance(e, TokenEvent))
    assert shown == text


def test_cancel_while_running_retires_at_the_next_step():
    s = Scheduler(max_batch_size=2, max_waiting=10)
    a, b = seq(), seq()
    s.submit([a, b])
    s.admit()
    step(s, {a: 1, b: 1})
    s.cancel(a)
    done, moves = s.retire()
    assert done == [a] and a.status is Status.CANCELLED and moves == [(1, 0)]
    assert a.events[-1].status.finish_reason == "cancelled"
    assert s.running == [b]


def test_cancel_while_waiting_drops_without_running():
    s = Scheduler(max_batch_size=1, max_waiting=10)
    a, b, c = seq(), seq(), seq()
    s.submit([a, b, c])
    s.admit()
    s.cancel(b)
    a.finish(Status.FINISHED_EOS)
    s.retire()
    admitted, dropped = s.admit()
    assert admitted == [c] and dropped == [b] and b.status is Status.CANCELLED


def test_a_prefill_takes_at_most_its_token_budget_of_padded_prompts():
    s = Scheduler(max_batch_size=8, max_waiting=10, max_prefill_tokens=100)

    def prompt(n: int) -> Sequence:
        return Sequence([1] * n, SamplingParams(), Letters())

    a, b, c, d = prompt(30), prompt(20), prompt(40), prompt(500)
    s.submit([a, b, c, d])
    assert s.admit()[0] == [a, b]  # with c: 3 rows x 40 tokens = 120 > 100
    assert s.admit()[0] == [c]  # c alone; d would make 2 x 500
    assert s.admit()[0] == [d]  # one prompt is admitted whatever its length
    assert [q.row for q in s.running] == [0, 1, 2, 3]


def test_submit_refuses_beyond_the_waiting_limit_all_or_nothing():
    s = Scheduler(max_batch_size=1, max_waiting=2)
    s.submit([seq(), seq(), seq()])  # one row free + two waiting
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        s.submit([seq()])
    assert s.num_waiting == 3
