"""Prompt scoring and the new per-request controls in the engine, float32, tiny model:
every prompt token's logprob as the model computes it, while neighbours decode and
slots are reused; zero-token requests; logit_bias and stop tokens alone in their row."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from tests.conftest import hf_greedy, make_engine, run, token_ids
from tests.test_engine_core import LONG, OTHER, _assert_idle, _final
from textgen.engine import NON_FINITE_LOGITS
from textgen.params import ParamError, SamplingParams
from textgen.scheduler import Status
from textgen.validation import checked_sequence

SCORED = "Évaluation: 日本語 and a prompt that crosses no block but has odd bytes 🙂"


def reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(dim=-1)


async def _scored(eng, prompt_ids, params):
    seq = eng.new_sequence(prompt_ids, params)
    events = [e async for _, e in eng.stream([seq])]
    # The client learns them from its first event, and from no other.
    assert events[0].prompt_logprobs is seq.prompt_logprobs
    assert all(e.prompt_logprobs is None for e in events[1:])
    return seq, events


def _check_scores(model, seq, k):
    ids = seq.prompt_ids
    ref = reference(model, ids)
    entries = seq.prompt_logprobs
    assert entries is not None and len(entries) == len(ids) and entries[0] is None
    for t in range(1, len(ids)):
        logprob, top = entries[t]
        assert logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-5)
        best = ref[t - 1].topk(k)
        assert [i for i, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_prompt_scores_are_the_models_while_neighbours_decode_and_slots_are_reused(
    tiny_model, tokenizer
):
    # 2 slots: a long greedy sequence runs past 128 positions while scoring requests
    # (with and without new tokens) are admitted beside it and reuse the other slot.
    eng = make_engine(tiny_model, tokenizer, max_batch_size=2)
    long_ids = tokenizer(LONG).input_ids
    prompts = [tokenizer(SCORED).input_ids, tokenizer(OTHER).input_ids, long_ids * 3]

    async def all_of_them():
        runner = asyncio.ensure_future(token_ids(eng, LONG, SamplingParams(max_new_tokens=200)))
        await asyncio.sleep(0.05)
        scored = []
        for i, ids in enumerate(prompts):
            params = SamplingParams(max_new_tokens=i, prompt_logprobs=3, logprobs=3)
            scored.append(await _scored(eng, ids, params))
        return await runner, scored

    try:
        long_tokens, scored = run(all_of_them())
        assert long_tokens == hf_greedy(tiny_model, long_ids, 200)
        for i, (seq, events) in enumerate(scored):
            _check_scores(tiny_model, seq, 3)
            assert events[-1].status is Status.FINISHED_LENGTH
            assert len(seq.output_ids) == i  # 0 tokens: only the prompt ran
            if i:
                assert seq.output_ids == hf_greedy(tiny_model, seq.prompt_ids, i)
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_zero_token_requests_free_their_slots_more_requests_than_slots(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=2)

    async def many():
        seqs = [
            eng.new_sequence(tokenizer(f"Prompt {i}").input_ids, SamplingParams(max_new_tokens=0))
            for i in range(7)
        ]
        events = [e async for _, e in eng.stream(seqs)]
        return seqs, events

    try:
        seqs, events = run(many())
        assert [s.status for s in seqs] == [Status.FINISHED_LENGTH] * 7
        assert all(s.output_ids == [] and s.prompt_logprobs is None for s in seqs)
        assert len(events) == 7  # one finish event each, no token
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_non_finite_prompt_fails_only_its_own_request(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    prefill = eng.runner.prefill

    def poisoned(*args):
        logits, full = prefill(*args)
        full = [f.clone() for f in full]
        for f in full:
            f[1, 5] = float("nan")
        return logits, full

    eng.runner.prefill = poisoned
    try:

        async def both():
            scored = _scored(eng, tokenizer(SCORED).input_ids, SamplingParams(prompt_logprobs=1))
            plain = _final(eng, OTHER, SamplingParams(max_new_tokens=5))
            return await asyncio.gather(scored, plain)

        (_, events), (tokens, final) = run(both())
        assert [e.status for e in events] == [Status.FAILED]
        assert events[-1].error == NON_FINITE_LOGITS
        assert final.status is Status.FINISHED_LENGTH
        assert tokens == hf_greedy(tiny_model, tokenizer(OTHER).input_ids, 5)
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_logit_bias_and_stop_token_ids_act_on_their_own_row_only(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    ids = tokenizer(OTHER).input_ids
    free = hf_greedy(tiny_model, ids, 12)

    async def together():
        return await asyncio.gather(
            _final(eng, OTHER, SamplingParams(max_new_tokens=12, logit_bias=((13, 100.0),))),
            _final(eng, OTHER, SamplingParams(max_new_tokens=12, stop_token_ids=(free[4],))),
            _final(eng, OTHER, SamplingParams(max_new_tokens=12)),
        )

    try:
        (forced, _), (stopped, stop_final), (plain, _) = run(together())
        assert forced == [13] * 12
        first_stop = free.index(free[4])
        assert stopped == free[: first_stop + 1]  # the stop token is generated, not shown
        assert stop_final.status is Status.FINISHED_STOP
        assert stop_final.text == tokenizer.decode(free[:first_stop])
        assert plain == free
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        (
            {"logprobs": 21},
            "logprobs",
            "logprobs must be <= 20 (TEXTGEN_MAX_LOGPROBS), got 21",
        ),
        (
            {"prompt_logprobs": 21},
            "prompt_logprobs",
            "prompt_logprobs must be <= 20 (TEXTGEN_MAX_LOGPROBS), got 21",
        ),
        (
            {"logit_bias": ((50257, 1.0),)},
            "logit_bias",
            "token id 50257 is not in the vocabulary (0..50256)",
        ),
        (
            {"stop_token_ids": (-1,)},
            "stop_token_ids",
            "token id -1 is not in the vocabulary (0..50256)",
        ),
    ],
)
def test_params_are_checked_against_the_model_and_the_settings(engine, params, param, message):
    with pytest.raises(ParamError) as err:
        checked_sequence(engine, [1, 2], SamplingParams(**params))
    assert (err.value.param, str(err.value)) == (param, message)


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([1, 50257], {}, "prompt_ids: token id 50257 is not in the vocabulary (0..50256)"),
        ([1, 2], {"logit_bias": ((-1, 1.0),)}, "logit_bias: token id -1 is not in the vocabulary"),
        ([1, 2], {"stop_token_ids": (50257,)}, "stop_token_ids: token id 50257 is not in the"),
        ([1, 2], {"logprobs": 50258}, "logprobs 50258 exceeds the vocabulary of 50257 tokens"),
    ],
)
def test_the_engine_holds_its_invariants_against_its_callers(engine, prompt, params, message):
    """What indexes the engine's tensors is checked before anything is queued: a caller's
    bug (ValueError), not a client's error, and never a failed step for its neighbours."""
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        engine.new_sequence(prompt, SamplingParams(**params))
    assert not isinstance(err.value, ParamError)


def test_include_stop_str_in_output_keeps_the_matched_stop(engine, tokenizer, tiny_model):
    free = tokenizer.decode(hf_greedy(tiny_model, tokenizer(OTHER).input_ids, 12))
    stop = free[len(free) // 2 :][:4]
    _, kept = run(
        _final(
            engine,
            OTHER,
            SamplingParams(max_new_tokens=12, stop=(stop,), include_stop_str_in_output=True),
        )
    )
    _, cut = run(_final(engine, OTHER, SamplingParams(max_new_tokens=12, stop=(stop,))))
    assert kept.text == free[: free.index(stop) + len(stop)]
    assert cut.text == free[: free.index(stop)]
    assert kept.status is cut.status is Status.FINISHED_STOP


def test_stop_token_ids_wait_for_min_new_tokens(engine, tokenizer, tiny_model):
    free = hf_greedy(tiny_model, tokenizer(OTHER).input_ids, 12)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=8, stop_token_ids=(free[4],))
    tokens, final = run(_final(engine, OTHER, params))
    assert tokens[:4] == free[:4]
    assert free[4] not in tokens[:8]  # suppressed, as EOS is, below min_new_tokens
    assert len(tokens) >= 8
    assert final.status is (Status.FINISHED_STOP if free[4] in tokens else Status.FINISHED_LENGTH)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_past_the_vocabulary_are_a_400_whatever_the_setting(tiny_model, tokenizer, field):
    eng = make_engine(tiny_model, tokenizer, max_logprobs=100_000)
    try:
        with pytest.raises(ParamError) as err:
            checked_sequence(eng, [1, 2], SamplingParams(**{field: 50258}))
        assert (err.value.param, str(err.value)) == (
            field,
            f"{field} must be <= 50257 (the vocabulary), got 50258",
        )
        checked_sequence(eng, [1, 2], SamplingParams(**{field: 50257}))  # the whole of it
    finally:
        eng.shutdown()
