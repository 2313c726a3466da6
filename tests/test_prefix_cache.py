"""Prefix caching (textgen/prefix_cache.py): a prompt's prefix already in a KV slot is
not computed again, and nothing about the output changes.

Float32 on the tiny model: greedy tokens equal the model's own `generate`, prompt
logprobs equal an engine with caching off; shared prefixes of every length, from free
and running slots, with evictions, cancellations, failed steps and poisoned rows.
"""

from __future__ import annotations

import asyncio
import copy

import httpx
import openai
import pytest
import torch

from tests.conftest import generate, hf_greedy, make_engine, run
from tests.test_engine_core import LONG, _assert_idle, _patch_decode
from textgen.engine import NON_FINITE_LOGITS
from textgen.params import SamplingParams
from textgen.prefix_cache import PrefixCache, Record, common_prefix
from textgen.runner import GPT2Runner
from textgen.scheduler import FinishEvent, TokenEvent, length_groups

GREEDY = SamplingParams(max_new_tokens=12)


def _generate(eng, ids, params=GREEDY, cancel_after=None):
    """(token ids, finish event, the sequence) of one request, greedy unless told."""
    return generate(eng, ids, params, cancel_after)


@pytest.fixture(scope="module")
def base(tokenizer) -> list[int]:
    ids = tokenizer(LONG + ". " + LONG).input_ids  # 40 tokens
    assert len(ids) > 32
    return ids


def _other_tail(base: list[int], share: int, length: int = 6) -> list[int]:
    """Tokens to follow base[:share], the first one different from base[share]."""
    avoid = base[share] if share < len(base) else -1
    return [t for t in range(1000, 1000 + length + 1) if t != avoid][:length]


def test_common_prefix_at_every_boundary():
    a = list(range(100))
    for n in (0, 1, 2, 31, 32, 33, 99):
        assert common_prefix(a, a[:n] + [-1] * 5) == n
    assert common_prefix(a, a) == 100
    assert common_prefix(a, a[:40]) == 40
    assert common_prefix([], a) == 0


@pytest.mark.parametrize("share", ["none", "one", "half", "all_but_one", "all"])
def test_greedy_equals_generate_for_every_length_of_shared_prefix(
    share, tiny_model, tokenizer, base
):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4)
    n = {"none": 0, "one": 1, "half": len(base) // 2, "all_but_one": len(base) - 1}.get(
        share, len(base)
    )
    prompt = base if share == "all" else base[:n] + _other_tail(base, n)
    try:
        first, first_final, _ = run(_generate(eng, base))
        assert first == hf_greedy(tiny_model, base, 12) and first_final.cached_tokens == 0
        tokens, final, _ = run(_generate(eng, prompt))
        assert tokens == hf_greedy(tiny_model, prompt, 12)
        # At least the last prompt token is computed: its logits choose the first token.
        assert final.cached_tokens == min(n, len(prompt) - 1)
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_running_sequences_prefix_is_copied_and_survives_its_cancellation(
    tiny_model, tokenizer, base
):
    """B shares A's prompt while A runs: B's slot gets a copy. A is then cancelled
    mid-sequence, and C, which shares it too, still finds it (in B's slot)."""
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4)
    b_prompt, c_prompt = [*base[:30], 1000, 1001], [*base[:25], 1002]
    try:

        async def scenario():
            a = asyncio.ensure_future(_generate(eng, base, SamplingParams(max_new_tokens=300), 60))
            while not eng.scheduler.running or not eng.scheduler.running[0].output_ids:
                await asyncio.sleep(0.01)
            b = await _generate(eng, b_prompt, SamplingParams(max_new_tokens=30))
            a_result = await a
            c = await _generate(eng, c_prompt, SamplingParams(max_new_tokens=30))
            return a_result, b, c

        (a_tokens, _, a_seq), (b_tokens, b_final, b_seq), (c_tokens, c_final, _) = run(scenario())
        assert a_seq.status.finish_reason == "cancelled"
        assert a_tokens == hf_greedy(tiny_model, base, 60)
        assert (b_seq.copy_from is not None, b_final.cached_tokens) == (True, 30)
        assert b_tokens == hf_greedy(tiny_model, b_prompt, 30)
        assert c_final.cached_tokens == 25
        assert c_tokens == hf_greedy(tiny_model, c_prompt, 30)
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_two_requests_with_the_same_new_prefix_in_one_step_compute_it_once(
    tiny_model, tokenizer, base
):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4)
    prompts = [[*base, 1000], [*base, 1001, 1002]]
    try:

        async def together():
            seqs = [eng.new_sequence(p, GREEDY) for p in prompts]
            finals = {}
            tokens = {0: [], 1: []}
            async for i, event in eng.stream(seqs):
                if isinstance(event, TokenEvent):
                    tokens[i].append(event.token_id)
                else:
                    finals[i] = event
            return tokens, finals

        tokens, finals = run(together())
        for i, prompt in enumerate(prompts):
            assert tokens[i] == hf_greedy(tiny_model, prompt, 12)
        # The second waited one step, then copied the prefix the first had computed.
        assert [finals[0].cached_tokens, finals[1].cached_tokens] == [0, len(base)]
        again, final, _ = run(_generate(eng, prompts[1]))
        assert (again, final.cached_tokens) == (tokens[1], len(prompts[1]) - 1)
    finally:
        eng.shutdown()


def test_the_least_recently_used_prefix_is_evicted_first(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=2)
    p1, p2, p3 = (tokenizer(t).input_ids for t in (LONG, "The quick brown fox", "Hello there"))
    try:
        for prompt in (p1, p2, p3):  # p3 takes p1's slot: the least recently used
            assert run(_generate(eng, prompt))[1].cached_tokens == 0
        # p2 is found; p1 is not, and takes p3's slot (now the least recently used): p2
        # is found again.
        for prompt, cached in ((p2, len(p2) - 1), (p1, 0), (p2, len(p2) - 1)):
            tokens, final, _ = run(_generate(eng, prompt))
            assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, prompt, 12), cached)
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_failed_step_leaves_no_prefix_to_reuse(tiny_model, tokenizer, base):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4)
    run(_generate(eng, base[:10]))  # a record the failure must clear, too

    def fail_third(call, args):
        if call == 3:
            raise RuntimeError("boom")

    _patch_decode(eng, fail_third)
    try:
        _, final, _ = run(_generate(eng, base))
        assert (final.status.finish_reason, final.error) == ("error", "generation failed: boom")
        _assert_idle(eng)
        assert eng.scheduler.prefix_cache.records == {}
        tokens, final, _ = run(_generate(eng, base))
        assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, base, 12), 0)
    finally:
        eng.shutdown()


def test_a_row_that_failed_non_finite_is_never_a_source(tiny_model, tokenizer, base):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4)
    decode = eng.runner.decode
    victims: list = []

    def poison(call, args):
        logits = decode(*args).clone()
        for row, slot in enumerate(args[2]):
            if any(v.slot == slot for v in victims):
                logits[row, 7] = float("nan")
        return logits

    _patch_decode(eng, poison)
    try:

        async def victim():
            seq = eng.new_sequence(base, GREEDY)
            victims.append(seq)
            return [e async for _, e in eng.stream([seq])]

        events = run(victim())
        assert events[-1].error == NON_FINITE_LOGITS
        victims.clear()
        tokens, final, _ = run(_generate(eng, base))
        assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, base, 12), 0)
    finally:
        eng.shutdown()


def test_prompt_logprobs_from_the_cache_equal_computed_ones(tiny_model, tokenizer, base):
    cached = make_engine(tiny_model, tokenizer, max_batch_size=4)
    plain = make_engine(tiny_model, tokenizer, max_batch_size=4, prefix_caching=False)
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=2)
    choices = [[*base, 1000, 1001], [*base, 1002], [*base[:20], 1003, 1004]]
    try:
        expected = [run(_generate(plain, c, score))[2].prompt_logprobs for c in choices]
        assert [run(_generate(plain, c, score))[1].cached_tokens for c in choices] == [0] * 3
        got = [run(_generate(cached, c, score)) for c in choices]
        # Entries 1..n come from the source: the prefill starts one position early.
        assert [final.cached_tokens for _, final, _ in got] == [0, len(base) - 1, 19]
        for (_, _, seq), want in zip(got, expected, strict=True):
            assert len(seq.prompt_logprobs) == len(want) and seq.prompt_logprobs[0] is None
            for have, ref in zip(seq.prompt_logprobs[1:], want[1:], strict=True):
                assert have[0] == pytest.approx(ref[0], abs=1e-5)
                assert [t for t, _ in have[1]] == [t for t, _ in ref[1]]
                assert [v for _, v in have[1]] == pytest.approx([v for _, v in ref[1]], abs=1e-5)
        # A request for more alternatives than the cache kept computes its prompt again.
        more = SamplingParams(max_new_tokens=0, prompt_logprobs=3)
        assert run(_generate(cached, choices[1], more))[1].cached_tokens == 0
        # Generating requests reuse a scored prompt's cache too.
        tokens, final, _ = run(_generate(cached, base))
        assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, base, 12), len(base) - 1)
    finally:
        cached.shutdown()
        plain.shutdown()


def test_caching_off_computes_every_prompt(tiny_model, tokenizer, base):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4, prefix_caching=False)
    try:
        for _ in range(2):
            tokens, final, _ = run(_generate(eng, base))
            assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, base, 12), 0)
        assert eng.scheduler.prefix_cache is None
    finally:
        eng.shutdown()


def test_a_free_slot_that_holds_nothing_is_taken_before_a_cached_one():
    cache = PrefixCache()
    assert cache.evictable([3, 1, 2]) == 1
    cache.records = {1: Record([5, 6], used=2), 2: Record([7], used=1)}
    assert cache.evictable([1, 2, 3]) == 3
    cache.records[3] = Record([8], used=3)
    assert cache.evictable([1, 2, 3]) == 2  # the least recently used record


def test_usage_and_metrics_report_cached_tokens(server, tokenizer):
    prompt = "Prefix caching over HTTP: " + LONG
    n = len(tokenizer(prompt).input_ids)
    metric = "textgen_prefix_cache_hits_total"

    def hits() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(metric))

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        before = hits()
        usages = [
            client.completions.create(
                model="gpt2", prompt=prompt, max_tokens=3, temperature=0
            ).usage
            for _ in range(2)
        ]
        chat = [{"role": "user", "content": prompt}]
        chats = [
            client.chat.completions.create(model="gpt2", messages=chat, max_tokens=3).usage
            for _ in range(2)
        ]
    assert [u.prompt_tokens for u in usages] == [n, n]
    assert usages[1].prompt_tokens_details.cached_tokens == n - 1
    assert chats[1].prompt_tokens_details.cached_tokens == chats[1].prompt_tokens - 1
    assert hits() - before >= (n - 1) + chats[1].prompt_tokens - 1


def test_a_prefill_failing_beside_a_decode_leaves_no_prefix_even_of_a_finished_row(
    tiny_model, tokenizer, base
):
    """A scoring request (max_tokens 0) finishes inside a prefill whose other row then
    fails: its slot is cleared with the step's new rows, so it must leave no record."""
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4)
    choose, victims = eng.sampler.choose, []

    def failing_choose(logits, seqs, *masks):
        if any(s in victims for s in seqs):
            raise RuntimeError("boom in the sampler")
        return choose(logits, seqs, *masks)

    eng.sampler.choose = failing_choose
    try:

        async def scenario():
            running = asyncio.ensure_future(
                _generate(eng, [50, 51, 52, 53], SamplingParams(max_new_tokens=300), 100)
            )
            while not eng.scheduler.running or not eng.scheduler.running[0].output_ids:
                await asyncio.sleep(0.01)
            scored = eng.new_sequence(base, SamplingParams(max_new_tokens=0, prompt_logprobs=1))
            failing = eng.new_sequence([9, 8, 7, 6], GREEDY)
            victims.append(failing)
            events = [e async for _, e in eng.stream([scored, failing])]
            victims.clear()
            await running
            return events

        events = run(scenario())
        finals = [e for e in events if isinstance(e, FinishEvent)]
        # The scored row's logprobs were whole before the other row failed: it succeeded.
        assert sorted((f.status.finish_reason, f.error) for f in finals) == [
            ("error", "generation failed: boom in the sampler"),
            ("length", None),
        ]
        records = eng.scheduler.prefix_cache.records.values()
        assert not any(r.tokens[: len(base)] == base for r in records)
        tokens, final, _ = run(_generate(eng, base))
        assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, base, 12), 0)
    finally:
        eng.shutdown()


def test_choices_of_one_question_compute_its_context_once(tiny_model, tokenizer, base):
    """lm-eval's multiple choice: a question's choices arrive together; the first is
    prefilled, the rest wait one step and take the context from it, while the other
    questions' first choices go on being admitted."""
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
    contexts = [[4000 + q, *base[:30]] for q in range(3)]
    prompts = [[*ctx, 5000 + c, 5001 + c] for ctx in contexts for c in range(4)]
    results = {}
    for caching in (True, False):
        eng = make_engine(tiny_model, tokenizer, max_batch_size=16, prefix_caching=caching)
        rows, prefill = [], eng.runner.prefill

        def counting(prompts_, *args, rows=rows, prefill=prefill):
            rows.append(len(prompts_))
            return prefill(prompts_, *args)

        eng.runner.prefill = counting
        try:

            async def together():
                seqs = [eng.new_sequence(p, score) for p in prompts]  # noqa: B023
                [e async for e in eng.stream(seqs)]  # noqa: B023
                return seqs

            results[caching] = (rows, run(together()))
        finally:
            eng.shutdown()
    rows, seqs = results[True]
    assert rows == [3, 9]
    assert [s.cached_tokens for s in seqs] == [0, 30, 30, 30] * 3
    for cached, plain in zip(seqs, results[False][1], strict=True):
        for have, want in zip(cached.prompt_logprobs[1:], plain.prompt_logprobs[1:], strict=True):
            assert have[0] == pytest.approx(want[0], abs=1e-5)
            assert [t for t, _ in have[1]] == [t for t, _ in want[1]]


def test_a_short_match_does_not_destroy_a_longer_cached_prefix(tiny_model, tokenizer, base):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=2)
    try:
        run(_generate(eng, base))
        other = [base[0], 1000, 1001, 1002]  # shares one token with base's record
        tokens, final, seq = run(_generate(eng, other))
        assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, other, 12), 1)
        assert seq.copy_from is not None  # copied out: the empty slot was taken
        tokens, final, _ = run(_generate(eng, base))
        assert (tokens, final.cached_tokens) == (hf_greedy(tiny_model, base, 12), len(base) - 1)
    finally:
        eng.shutdown()


def test_two_conversations_sharing_a_system_prompt_keep_their_histories(
    tiny_model, tokenizer, base
):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=4)
    system = base[:20]
    histories = {"a": [*system, 1000, 1001], "b": [*system, 2000, 2001, 2002]}
    expected = {"a": 0, "b": 0}  # the second conversation finds the first's system prompt
    try:
        for turn in range(3):
            for user, history in histories.items():
                tokens, final, _ = run(_generate(eng, history))
                assert tokens == hf_greedy(tiny_model, history, 12)
                if turn:
                    assert final.cached_tokens == expected[user]
                # Next turn: this prompt and reply, then the user's words. The slot holds
                # all but the reply's last token (never fed back).
                histories[user] = [*history, *tokens, 3000 + turn]
                expected[user] = len(history) + len(tokens) - 1
    finally:
        eng.shutdown()


def test_rows_of_very_different_lengths_prefill_in_separate_calls(tiny_model):
    """A cached prefix's short rest beside whole prompts: each length group runs alone,
    and the logits come back in the rows' order, equal to each row prefilled alone."""
    runner = GPT2Runner(copy.deepcopy(tiny_model), torch.device("cpu"), torch.float32, 8)
    prompts = [list(range(100, 160)), [7, 8], list(range(200, 250)), [9, 10, 11]]
    assert length_groups([len(p) for p in prompts]) == [[0, 2], [1, 3]]
    runner.prefill([prompts[0][:20]], [5])  # row 3's cached prefix, in slot 5
    calls = []
    rows_alone = runner._prefill_rows

    def counting(*args):
        calls.append(len(args[0]))
        return rows_alone(*args)

    runner._prefill_rows = counting
    logits, scored = runner.prefill(prompts, [0, 1, 2, 5], [3, 0], [0, 0, 0, 20])
    assert calls == [2, 2]
    runner._prefill_rows = rows_alone
    for i, (prompt, slot, start) in enumerate(
        zip(prompts, [0, 1, 2, 5], [0, 0, 0, 20], strict=True)
    ):
        alone, full = runner.prefill([prompt], [slot], [0], [start])
        assert torch.allclose(logits[i], alone[0], atol=1e-5), i
        if i in (3, 0):
            assert torch.allclose(scored[[3, 0].index(i)], full[0], atol=1e-5), i
