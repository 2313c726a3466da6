"""Admission, retirement, cancellation and finish reasons, with scripted tokens and no model."""

from __future__ import annotations

import pytest

from tests.conftest import make_engine
from textgen.params import SamplingParams
from textgen.scheduler import (
    Closed,
    QueueFull,
    Scheduler,
    Sequence,
    Status,
    length_groups,
    padded_tokens,
)

EOS = 0


def seq(max_new_tokens: int = 4, **params) -> Sequence:
    return Sequence([1, 2], SamplingParams(max_new_tokens=max_new_tokens, **params))


def step(s: Scheduler, scripted: dict[Sequence, int]) -> None:
    """One engine step with scripted tokens instead of a model."""
    for q in s.running:
        q.append_token(scripted[q], EOS)


def test_admit_fills_free_slots_in_order_and_keeps_the_rest_waiting():
    s = Scheduler(max_batch_size=2, max_waiting=10)
    a, b, c = seq(), seq(), seq()
    s.submit([a, b, c])
    admitted, dropped = s.admit()
    assert admitted == [a, b] and dropped == []
    assert [q.slot for q in s.running] == [0, 1]
    assert c.status is Status.WAITING and s.num_waiting == 1


def test_a_finished_sequence_frees_its_slot_and_no_other_slot_moves():
    s = Scheduler(max_batch_size=3, max_waiting=10)
    a, b, c, d = seq(max_new_tokens=1), seq(), seq(), seq()
    s.submit([a, b, c])
    s.admit()
    step(s, {a: 5, b: 5, c: 5})
    assert a.status is Status.FINISHED_LENGTH
    s.submit([d])
    done = s.retire()
    assert done == [a] and a.slot == -1
    assert s.running == [b, c] and (b.slot, c.slot) == (1, 2)  # nobody moved
    admitted, _ = s.admit()
    assert admitted == [d] and d.slot == 0  # the freed slot is reused


def test_slots_are_unique_and_the_lowest_free_one_is_taken_first():
    s = Scheduler(max_batch_size=5, max_waiting=10)
    seqs = [seq() for _ in range(5)]
    s.submit(seqs)
    s.admit()
    for i in (3, 0, 4):
        seqs[i].finish(Status.FINISHED_EOS)
    s.retire()
    assert [q.slot for q in s.running] == [1, 2]
    late = [seq() for _ in range(3)]
    s.submit(late)
    s.admit()
    assert [q.slot for q in late] == [0, 3, 4]
    slots = [q.slot for q in s.running]
    assert sorted(slots) == list(range(5))


def test_a_failed_step_leaves_an_empty_batch_with_every_slot_free():
    s = Scheduler(max_batch_size=3, max_waiting=10)
    a, b, c = seq(), seq(), seq()
    s.submit([a, b, c])
    s.admit()
    s.submit([seq()])
    failed = s.fail_running("generation failed: boom")
    assert failed == [a, b, c] and s.running == []
    assert all(q.status is Status.FAILED and q.slot == -1 for q in failed)
    assert a.error == "generation failed: boom"
    admitted, _ = s.admit()
    assert [q.slot for q in admitted] == [0]  # the waiting one goes on, from slot 0


def test_a_closed_scheduler_fails_what_it_holds_and_refuses_new_work():
    s = Scheduler(max_batch_size=1, max_waiting=10)
    a, b = seq(), seq()
    s.submit([a, b])
    s.admit()
    failed = s.close("the engine has shut down")
    assert failed == [a, b] and not s.has_work
    assert [q.error for q in failed] == ["the engine has shut down"] * 2
    with pytest.raises(Closed, match="the engine has shut down"):
        s.submit([seq()])


def test_cancel_while_running_retires_at_the_next_step():
    s = Scheduler(max_batch_size=2, max_waiting=10)
    a, b = seq(), seq()
    s.submit([a, b])
    s.admit()
    step(s, {a: 1, b: 1})
    s.cancel(a)
    done = s.retire()
    assert done == [a] and a.status is Status.CANCELLED and b.slot == 1
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
        return Sequence([1] * n, SamplingParams())

    a, b, c, d = prompt(30), prompt(20), prompt(40), prompt(500)
    s.submit([a, b, c, d])
    assert s.admit()[0] == [a, b]  # with c: 3 rows x 40 tokens = 120 > 100
    assert s.admit()[0] == [c]  # c alone; d would make 2 x 500
    assert s.admit()[0] == [d]  # one prompt is admitted whatever its length
    assert [q.slot for q in s.running] == [0, 1, 2, 3]


def test_short_prompts_beside_a_long_one_count_their_own_length():
    """The runner prefills rows of very different lengths in separate calls
    (length_groups), so two 5-token prompts cost 10 positions beside a 90-token one,
    not 2 x 90."""
    s = Scheduler(max_batch_size=8, max_waiting=10, max_prefill_tokens=100)
    long, short, other = (Sequence([1] * n, SamplingParams()) for n in (90, 5, 5))
    s.submit([long, short, other])
    assert padded_tokens([90, 5, 5]) == 100 and length_groups([90, 5, 5]) == [[0], [1, 2]]
    assert s.admit()[0] == [long, short, other]
    assert length_groups([40, 30, 20]) == [[0, 1, 2]]  # within twice: one call
    assert length_groups([50, 10]) == [[0], [1]] and length_groups([33, 1]) == [[0], [1]]
    assert length_groups([32, 1]) == [[0, 1]]  # too little padding to split for


def test_scored_prompts_take_at_most_half_the_prefill_budget():
    s = Scheduler(max_batch_size=8, max_waiting=10, max_prefill_tokens=100)

    def prompt(n: int, scored: bool) -> Sequence:
        return Sequence([1] * n, SamplingParams(prompt_logprobs=0 if scored else None))

    a, b, c, d = prompt(20, True), prompt(20, True), prompt(20, True), prompt(20, False)
    e = prompt(80, True)
    s.submit([a, b, c, d, e])
    assert s.admit()[0] == [a, b]  # with c: 60 scored positions > 50
    assert s.admit()[0] == [c, d]  # e would make 100 scored
    assert s.admit()[0] == [e]  # one prompt is admitted whatever it costs


def test_submit_refuses_beyond_the_waiting_limit_all_or_nothing():
    s = Scheduler(max_batch_size=1, max_waiting=2)
    s.submit([seq(), seq(), seq()])  # one row free + two waiting
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        s.submit([seq()])
    assert s.num_waiting == 3


def test_a_finished_sequence_not_yet_retired_does_not_hold_back_a_submission():
    # Its client may ask again before the next step retires it: its slot is free.
    s = Scheduler(max_batch_size=1, max_waiting=0)
    a = seq(max_new_tokens=1)
    s.submit([a])
    s.admit()
    step(s, {a: 5})
    assert a.status is Status.FINISHED_LENGTH and s.running == [a]
    b = seq()
    s.submit([b])  # no QueueFull
    s.retire()
    assert s.admit()[0] == [b] and b.slot == 0


# -- fair share between requests (issue 23, item 2) ---------------------------------------


def test_a_request_holds_at_most_its_share_of_slots_and_a_later_one_starts_at_once():
    s = Scheduler(max_batch_size=4, max_waiting=10, max_slots_per_request=3)
    wide = [seq() for _ in range(6)]
    s.submit(wide)
    assert s.admit()[0] == wide[:3]  # the fourth slot stays free
    assert s.admit()[0] == []
    late = seq()
    s.submit([late])
    assert s.admit()[0] == [late] and late.slot == 3


def test_freed_slots_go_round_robin_to_the_request_holding_fewest():
    s = Scheduler(max_batch_size=4, max_waiting=20)
    wide = [seq() for _ in range(8)]
    s.submit(wide)
    s.admit()
    other = [seq() for _ in range(3)]
    s.submit(other)
    for q in wide[:3]:
        q.finish(Status.FINISHED_EOS)
    s.retire()
    # wide holds 1 slot, other none; then they alternate (arrival order on a tie).
    assert s.admit()[0] == [other[0], wide[4], other[1]]
    wide[3].finish(Status.FINISHED_EOS)
    s.retire()
    assert s.admit()[0] == [wide[5]]  # wide holds 1, other 2


def test_one_request_alone_still_fills_every_slot_by_default():
    s = Scheduler(max_batch_size=4, max_waiting=10)
    seqs = [seq() for _ in range(4)]
    s.submit(seqs)
    assert s.admit()[0] == seqs


def test_sequences_submitted_as_separate_requests_each_get_their_share():
    s = Scheduler(max_batch_size=2, max_waiting=10, max_slots_per_request=1)
    a, b = seq(), seq()
    s.submit([a, b], one_request=False)
    assert s.admit()[0] == [a, b]


@pytest.mark.parametrize(("batch", "slots"), [(1, 1), (3, 3), (4, 3), (8, 6), (32, 24)])
def test_the_default_slot_share_follows_the_batch_size(tiny_model, tokenizer, batch, slots):
    # The engine's scheduler gets the share computed from its own batch, wherever its
    # settings came from (make_engine sets no share).
    eng = make_engine(tiny_model, tokenizer, max_batch_size=batch)
    try:
        assert eng.settings.max_slots_per_request == slots
        assert eng.scheduler.max_slots_per_request == slots
    finally:
        eng.shutdown()
