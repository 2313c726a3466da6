"""The engine on a tiny random GPT-2 in float32: exact tokens, batching invariants."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import collect, hf_greedy, make_engine, run
from textgen.params import ParamError, SamplingParams
from textgen.validation import encode_prompt

PROMPTS = [
    "The quick brown fox",
    "Hello",
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote valley",
    "Once upon a time there was",
]


def test_greedy_tokens_equal_the_models_own_generate(engine, tiny_model, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        tokens, final = run(collect(engine, prompt, SamplingParams(max_new_tokens=20)))
        assert [t.token_id for t in tokens] == hf_greedy(tiny_model, ids, 20)
        assert final.status.finish_reason == "length"
        assert (final.prompt_tokens, final.completion_tokens) == (len(ids), 20)


def test_streamed_text_joins_to_the_decoded_text(engine, tokenizer):
    tokens, final = run(collect(engine, PROMPTS[0], SamplingParams(max_new_tokens=30)))
    assert "".join(t.text for t in tokens) == final.text
    assert final.text == tokenizer.decode([t.token_id for t in tokens])


async def _staggered(engine, requests):
    """Starts requests at different steps; returns each one's token ids."""

    async def one(delay, prompt, params):
        await asyncio.sleep(delay)
        tokens, _ = await collect(engine, prompt, params)
        return [t.token_id for t in tokens]

    return await asyncio.gather(*(one(*r) for r in requests))


def test_greedy_tokens_are_the_same_alone_and_in_a_changing_batch(engine):
    # Different prompt lengths, output lengths and arrival times: requests
    # join and leave the running batch while the others decode.
    requests = [
        (0.0, PROMPTS[0], SamplingParams(max_new_tokens=40)),
        (0.01, PROMPTS[1], SamplingParams(max_new_tokens=5)),
        (0.05, PROMPTS[2], SamplingParams(max_new_tokens=25)),
        (0.02, PROMPTS[3], SamplingParams(max_new_tokens=12)),
        (0.0, PROMPTS[1], SamplingParams(max_new_tokens=33)),
    ]
    alone = [run(_staggered(engine, [(0, p, params)]))[0] for _, p, params in requests]
    together = run(_staggered(engine, requests))
    assert together == alone


def test_a_small_batch_queues_the_rest_and_gives_the_same_tokens(tiny_model, tokenizer):
    small = make_engine(tiny_model, tokenizer, max_batch_size=2)
    try:
        requests = [(0, p, SamplingParams(max_new_tokens=9)) for p in PROMPTS]
        together = run(_staggered(small, requests))
    finally:
        small.shutdown()
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    assert together == [hf_greedy(tiny_model, i, 9) for i in ids]


def test_seeded_sampling_is_the_same_alone_and_batched(engine):
    sampled = SamplingParams(max_new_tokens=16, do_sample=True, seed=1234, top_k=50, top_p=0.9)
    alone = run(_staggered(engine, [(0, PROMPTS[0], sampled)]))[0]
    batch = [
        (0, PROMPTS[2], SamplingParams(max_new_tokens=20)),
        (0.01, PROMPTS[0], sampled),
        (0, PROMPTS[1], SamplingParams(max_new_tokens=16, do_sample=True, seed=99)),
    ]
    assert run(_staggered(engine, batch))[1] == alone
    other_seed = SamplingParams(max_new_tokens=16, do_sample=True, seed=4321, top_k=50, top_p=0.9)
    assert run(_staggered(engine, [(0, PROMPTS[0], other_seed)]))[0] != alone


def test_top_k_1_sampling_is_greedy(engine, tiny_model, tokenizer):
    params = SamplingParams(max_new_tokens=10, do_sample=True, seed=5, top_k=1, temperature=0.7)
    tokens, _ = run(collect(engine, PROMPTS[0], params))
    assert [t.token_id for t in tokens] == hf_greedy(
        tiny_model, tokenizer(PROMPTS[0]).input_ids, 10
    )


def test_repetition_penalty_matches_transformers(engine, tiny_model, tokenizer):
    params = SamplingParams(max_new_tokens=15, repetition_penalty=1.5)
    tokens, _ = run(collect(engine, PROMPTS[1], params))
    expected = hf_greedy(tiny_model, tokenizer(PROMPTS[1]).input_ids, 15, repetition_penalty=1.5)
    assert [t.token_id for t in tokens] == expected


def _first_greedy_token(engine, prompt):
    tokens, _ = run(collect(engine, prompt, SamplingParams(max_new_tokens=1)))
    return tokens[0]


def test_min_new_tokens_suppresses_eos(tiny_model, tokenizer):
    # Make EOS the greedy choice by declaring the first greedy token to be EOS.
    probe = make_engine(tiny_model, tokenizer)
    first = _first_greedy_token(probe, PROMPTS[0])
    probe.eos_token_id = probe.sampler.eos_token_id = first.token_id
    try:
        _, final = run(collect(probe, PROMPTS[0], SamplingParams(max_new_tokens=6)))
        assert (final.status.finish_reason, final.completion_tokens) == ("eos", 1)
        params = SamplingParams(max_new_tokens=6, min_new_tokens=4)
        tokens, final = run(collect(probe, PROMPTS[0], params))
        assert first.token_id not in [t.token_id for t in tokens[:4]]
        assert final.completion_tokens >= 4
    finally:
        probe.shutdown()


def test_stop_sequence_ends_generation_and_is_not_returned(engine):
    _, full = run(collect(engine, PROMPTS[0], SamplingParams(max_new_tokens=20)))
    stop = full.text[10:14]
    tokens, final = run(
        collect(engine, PROMPTS[0], SamplingParams(max_new_tokens=20, stop=(stop,)))
    )
    assert final.status.finish_reason == "stop"
    assert final.text == full.text[: full.text.index(stop)]
    assert "".join(t.text for t in tokens) == final.text


def test_logprobs_are_the_models_log_softmax(engine, tiny_model, tokenizer):
    import torch

    tokens, _ = run(collect(engine, PROMPTS[1], SamplingParams(max_new_tokens=1, logprobs=3)))
    ids = torch.tensor([tokenizer(PROMPTS[1]).input_ids])
    with torch.no_grad():
        expected = tiny_model(ids).logits[0, -1].log_softmax(-1)
    t = tokens[0]
    assert t.logprob == pytest.approx(float(expected[t.token_id]), abs=1e-4)
    assert [i for i, _ in t.top_logprobs] == expected.topk(3).indices.tolist()


def test_context_overflow_names_the_prompt_tokens_the_request_and_the_limit(engine):
    with pytest.raises(ParamError) as err:
        encode_prompt(engine, "hello" + " hello" * 999, 100)
    assert str(err.value) == (
        "prompt has 1000 tokens and max_new_tokens is 100: "
        "1100 exceeds the model's context of 1024 tokens"
    )


def test_param_errors_name_the_field_and_the_value():
    with pytest.raises(ParamError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ParamError, match=r"temperature must be in \(0, 100\], got 0"):
        SamplingParams(temperature=0)


def failing_engine(tiny_model, tokenizer, fail_on_call: int):
    """An engine whose runner raises on the n-th decode call."""
    eng = make_engine(tiny_model, tokenizer)
    decode, calls = eng.runner.decode, [0]

    def flaky(*args):
        calls[0] += 1
        if calls[0] == fail_on_call:
            raise RuntimeError("boom")
        return decode(*args)

    eng.runner.decode = flaky
    return eng


def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(tiny_model, tokenizer):
    eng = failing_engine(tiny_model, tokenizer, fail_on_call=2)
    try:
        tokens, final = run(collect(eng, PROMPTS[0], SamplingParams(max_new_tokens=10)))
        # Token 1 comes from the prefill, token 2 from decode call 1; call 2 fails.
        assert (len(tokens), final.status.finish_reason) == (2, "error")
        assert final.error == "generation failed: boom"
        tokens, final = run(collect(eng, PROMPTS[1], SamplingParams(max_new_tokens=10)))
        assert (len(tokens), final.status.finish_reason) == (10, "length")
    finally:
        eng.shutdown()


def test_frequency_and_presence_penalties_break_repetition(engine):
    # The toy model repeats one token after "Hello" (greedy); penalties stop that.
    plain, _ = run(collect(engine, PROMPTS[1], SamplingParams(max_new_tokens=12)))
    ids = [t.token_id for t in plain]
    assert max(ids.count(i) for i in ids) >= 5
    for params in (
        SamplingParams(max_new_tokens=12, frequency_penalty=2.0),
        SamplingParams(max_new_tokens=12, presence_penalty=2.0),
    ):
        penalized, _ = run(collect(engine, PROMPTS[1], params))
        ids = [t.token_id for t in penalized]
        assert max(ids.count(i) for i in ids) < 5


TRICKY_TEXTS = [
    "In a shocking finding, scientists discovered a herd of unicorns",
    "",
    " ",
    "  leading, trailing  \n\n\t",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|>",
    "日本語 émoji 🤖 naïve — “quotes”",
    "x" * 5000,
]


@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=range(len(TRICKY_TEXTS)))
def test_tokenize_equals_the_tokenizers_own_call(engine, tokenizer, text):
    assert engine.tokenize(text) == tokenizer(text).input_ids


def threads_run_beside(calls: list[Callable[[], object]]) -> list[int]:
    """For each call: how many steps a thread beside it made while it ran. With forced
    switches off (a 100 s interval), the other thread runs during a call only if the call
    releases the GIL; it lets this thread back in between calls (`sleep(0)`)."""
    count = 0
    stop = threading.Event()

    def spin() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1
            if count % 100 == 0:
                time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    beside = threading.Thread(target=spin)
    beside.start()
    try:
        time.sleep(0.01)
        ran = []
        for call in calls:
            before = count
            call()
            ran.append(count - before)
    finally:
        stop.set()
        beside.join()
        sys.setswitchinterval(interval)
    return ran


def test_tokenize_keeps_the_gil(engine, tokenizer):
    """The event loop tokenizes every prompt: a call that let go of the GIL would wait to
    take it back from the engine thread."""
    # The harness sees a call that releases it: the Rust tokenizer's encode_batch, given
    # long enough (tens of milliseconds) for the other thread to wake.
    longer = TRICKY_TEXTS[-1] * 10
    released = [lambda: tokenizer.backend_tokenizer.encode_batch([longer])] * 5
    assert sum(threads_run_beside(released)) > 0
    calls = [lambda text=text: engine.tokenize(text) for text in TRICKY_TEXTS]
    assert threads_run_beside(calls) == [0] * len(TRICKY_TEXTS)


def test_tokenize_equals_the_call_whatever_the_call_left_behind(engine, tokenizer):
    """Hugging Face's call leaves its truncation set on the Rust tokenizer, and reads
    `split_special_tokens` afresh each time: `tokenize` still equals a plain call."""
    text = "one two three four five six <|endoftext|> seven"
    try:
        tokenizer(text, truncation=True, max_length=3)  # truncation left on the Rust side
        assert engine.tokenize(text) == tokenizer(text).input_ids
        tokenizer.split_special_tokens = True
        split = engine.tokenize(text)
        assert split == tokenizer(text).input_ids
        assert 50256 not in split
    finally:
        tokenizer.split_special_tokens = False
        tokenizer("reset")  # a plain call: no truncation, no padding, special tokens whole
    assert 50256 in engine.tokenize(text)
