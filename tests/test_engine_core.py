"""The engine core on every path: stable KV slots, failure isolation, health.

Float32 on the tiny model, compared with the model's own `generate`; sequences
cross the cache's allocation blocks (128 positions) while neighbours join,
finish and are cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import time
import weakref

import pytest
import torch
from torch import nn

from tests.conftest import collect, hf_greedy, make_engine, run, staggered, token_ids
from textgen.engine import (
    MAX_CONSECUTIVE_FAILURES,
    NON_FINITE_LOGITS,
    ContextOverflow,
    EngineUnavailable,
)
from textgen.models import random_gpt2
from textgen.params import ParamError, SamplingParams
from textgen.runner import CacheDoesNotFit, cgroup_room
from textgen.validation import encode_prompt

LONG = "In a shocking finding, scientists discovered a herd of unicorns living in a remote valley"
OTHER = "The quick brown fox"


def test_a_long_sequence_keeps_its_tokens_when_a_neighbour_is_cancelled_past_a_block(
    tiny_model, tokenizer
):
    eng = make_engine(tiny_model, tokenizer)
    try:

        async def both():
            return await asyncio.gather(
                token_ids(eng, OTHER, SamplingParams(max_new_tokens=400), cancel_after=200),
                token_ids(eng, LONG, SamplingParams(max_new_tokens=300)),
            )

        cancelled, survivor = run(both())
        assert len(cancelled) == 200
        assert survivor == hf_greedy(tiny_model, tokenizer(LONG).input_ids, 300)
        assert eng._sinks == {}
    finally:
        eng.shutdown()


def _assert_idle(eng):
    """No state left behind: no sinks, no running or waiting sequence, every slot free."""
    deadline = time.monotonic() + 5
    while eng.scheduler.has_work and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eng._sinks == {}
    assert not eng.scheduler.has_work
    assert sorted(eng.scheduler._free_slots) == list(range(eng.settings.max_batch_size))


def test_golden_long_outputs_with_arrivals_cancellations_and_more_requests_than_slots(
    tiny_model, tokenizer
):
    # 3 slots, 6 requests: slots are reused while 300+-token sequences run past 128
    # and 256 positions; two are cancelled mid-stream, two finish early.
    eng = make_engine(tiny_model, tokenizer, max_batch_size=3)
    requests = [  # (delay s, prompt, new tokens, cancel after)
        (0.0, LONG, 320, None),
        (0.0, OTHER, 400, 150),
        (0.01, "Hello", 7, None),
        (0.02, "Once upon a time there was", 300, None),
        (0.05, "def fibonacci(n):", 260, 140),
        (0.05, "Zürich, München, 東京 and", 30, None),
    ]

    try:
        together = staggered(eng, requests)
        for (_, prompt, n, cancel_after), got in zip(requests, together, strict=True):
            solo = hf_greedy(tiny_model, tokenizer(prompt).input_ids, n)
            assert got == solo[: cancel_after or n], prompt
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_the_kv_cache_is_allocated_once_for_every_slot_and_the_full_context(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=3)
    try:
        cache = eng.runner.kv_cache
        config = tiny_model.config
        head_dim = config.n_embd // config.n_head
        assert tuple(cache.shape) == (config.n_layer, 2, 3, config.n_head, 1024, head_dim)
        pointer = cache.data_ptr()
        run(token_ids(eng, LONG, SamplingParams(max_new_tokens=300)))
        assert eng.runner.kv_cache.data_ptr() == pointer
    finally:
        eng.shutdown()


def test_a_cache_that_does_not_fit_refuses_to_start_naming_the_bytes(tiny_model, tokenizer):
    with pytest.raises(CacheDoesNotFit) as err:
        make_engine(tiny_model, tokenizer, max_batch_size=64, memory_utilization=1e-6)
    message = str(err.value)
    assert message.startswith(
        "the KV cache needs 0.06 GiB (64 slots x 1024 positions x 2 layers x 64 x 2 "
        "(keys, values) x 4 bytes) but may take only "
    )
    assert "GiB available on cpu" in message and "TEXTGEN_MEMORY_UTILIZATION=1e-06" in message
    assert "lower TEXTGEN_MAX_BATCH_SIZE or TEXTGEN_MAX_MODEL_LEN" in message


def test_max_model_len_bounds_the_context_and_the_cache(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=2, max_model_len=200)
    try:
        assert eng.runner.kv_cache.shape[4] == 200
        with pytest.raises(ParamError, match="exceeds the model's context of 200 tokens"):
            encode_prompt(eng, "Hello", 200)
        with pytest.raises(ContextOverflow):  # the engine refuses it too, in tokens
            eng.new_sequence([15496], SamplingParams(max_new_tokens=200))
        tokens = run(token_ids(eng, "Hello", SamplingParams(max_new_tokens=199)))
        assert tokens == hf_greedy(tiny_model, tokenizer("Hello").input_ids, 199)
    finally:
        eng.shutdown()


# -- failures ------------------------------------------------------------------------


def _patch_decode(eng, fault):
    """Wraps the runner's decode: `fault(call_number, args)` may raise, sleep or edit."""
    decode, calls = eng.runner.decode, [0]

    def patched(*args):
        calls[0] += 1
        out = fault(calls[0], args)
        return out if out is not None else decode(*args)

    eng.runner.decode = patched


async def _final(eng, prompt, params):
    """(token ids, finish event) of one request."""
    tokens, final = await collect(eng, prompt, params)
    return [t.token_id for t in tokens], final


def test_non_finite_logits_fail_only_their_own_row(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    decode = eng.runner.decode
    poisoned = []

    def poison(call, args):
        logits = decode(*args).clone()
        slots = args[2]
        if poisoned and poisoned[0].slot in slots:
            logits[slots.index(poisoned[0].slot), 7] = float("nan")
        return logits

    _patch_decode(eng, poison)

    async def both():
        victim = eng.new_sequence(tokenizer(OTHER).input_ids, SamplingParams(max_new_tokens=50))
        poisoned.append(victim)
        events = eng.stream([victim])
        bystander = asyncio.ensure_future(
            _final(eng, LONG, SamplingParams(max_new_tokens=30, do_sample=False))
        )
        victim_events = [e async for _, e in events]
        return victim_events, await bystander

    try:
        victim_events, (tokens, final) = run(both())
        assert victim_events[-1].status.finish_reason == "error"
        assert victim_events[-1].error == NON_FINITE_LOGITS
        assert len(victim_events) == 2  # the prefill's token, then the error
        assert final.status.finish_reason == "length"
        assert tokens == hf_greedy(tiny_model, tokenizer(LONG).input_ids, 30)
        assert eng.health() is None
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_failed_step_fails_the_batch_resets_it_and_the_engine_goes_on(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)

    def fail_third(call, args):
        if call == 3:
            raise RuntimeError("boom")

    _patch_decode(eng, fail_third)
    try:

        async def two():
            return await asyncio.gather(
                _final(eng, OTHER, SamplingParams(max_new_tokens=10)),
                _final(eng, LONG, SamplingParams(max_new_tokens=10)),
            )

        results = run(two())
        for _, final in results:
            assert (final.status.finish_reason, final.error) == ("error", "generation failed: boom")
        _assert_idle(eng)
        tokens, final = run(_final(eng, LONG, SamplingParams(max_new_tokens=140)))
        assert tokens == hf_greedy(tiny_model, tokenizer(LONG).input_ids, 140)
        assert eng.health() is None
    finally:
        eng.shutdown()


def test_steps_failing_every_time_kill_the_engine_and_refuse_new_requests(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)

    def always(call, args):
        raise RuntimeError("the device is gone")

    _patch_decode(eng, always)
    try:
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            _, final = run(_final(eng, OTHER, SamplingParams(max_new_tokens=10)))
            assert final.error == "generation failed: the device is gone"
        eng._thread.join(timeout=5)
        assert eng.health() == (
            f"{MAX_CONSECUTIVE_FAILURES} engine steps failed in a row; the last: the device is gone"
        )
        with pytest.raises(EngineUnavailable, match="3 engine steps failed in a row"):
            run(_final(eng, OTHER, SamplingParams(max_new_tokens=10)))
    finally:
        eng.shutdown()


def test_a_dead_engine_thread_fails_in_flight_requests_and_refuses_new_ones(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)

    def die(call, args):
        if call == 5:
            raise SystemExit("killed")

    _patch_decode(eng, die)
    try:
        tokens, final = run(_final(eng, OTHER, SamplingParams(max_new_tokens=50)))
        assert (len(tokens), final.status.finish_reason) == (5, "error")
        assert final.error == "the engine thread died: SystemExit('killed')"
        eng._thread.join(timeout=5)
        assert eng.health() == "the engine thread died: SystemExit('killed')"
        with pytest.raises(EngineUnavailable, match="the engine thread died"):
            run(_final(eng, OTHER, SamplingParams(max_new_tokens=10)))
        assert eng._sinks == {}
    finally:
        eng.shutdown()


def test_a_wedged_engine_is_unhealthy_while_it_hangs_and_healthy_after(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer, engine_stall_seconds=0.3)
    release = threading.Event()

    def hang(call, args):
        if call == 2:
            release.wait(timeout=30)

    _patch_decode(eng, hang)
    try:

        async def scenario():
            running = asyncio.ensure_future(_final(eng, OTHER, SamplingParams(max_new_tokens=5)))
            await asyncio.sleep(1.0)
            reason = eng.health()
            with pytest.raises(EngineUnavailable, match="no engine step has finished for"):
                eng.stream([eng.new_sequence([1, 2], SamplingParams(max_new_tokens=2))])
            release.set()
            return reason, await running

        reason, (tokens, final) = run(scenario())
        assert reason is not None and reason.startswith("no engine step has finished for")
        assert final.status.finish_reason == "length" and len(tokens) == 5
        assert eng.health() is None
    finally:
        release.set()
        eng.shutdown()


def test_warm_up_raises_when_its_generation_fails(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)

    def fail_once(call, args):
        if call == 1:
            raise RuntimeError("boom")

    _patch_decode(eng, fail_once)
    try:
        with pytest.raises(RuntimeError) as err:
            eng.warm_up()
        assert str(err.value) == "warm-up generation ended error: generation failed: boom"
        eng.warm_up()  # the engine went on; a clean warm-up passes
    finally:
        eng.shutdown()


@pytest.mark.parametrize("slots_per_request", [24, 1])
def test_warm_up_crosses_128_positions_and_reuses_a_slot(tiny_model, tokenizer, slots_per_request):
    eng = make_engine(tiny_model, tokenizer, max_slots_per_request=slots_per_request)
    seen = []

    def record(call, args):
        seen.append((max(args[1]), list(args[2])))

    _patch_decode(eng, record)
    prefill, starts = eng.runner.prefill, []

    def recording_prefill(prompts, slots, every_position=(), starts_=()):
        starts.append(list(starts_))
        return prefill(prompts, slots, every_position, starts_)

    eng.runner.prefill = recording_prefill
    try:
        eng.warm_up()
        assert max(p for p, _ in seen) >= 128
        slots = [tuple(s) for _, s in seen]
        # All three decode (the third constrained), the two short ones leave holes, then
        # the reused slot 0 joins again.
        first_hole = slots.index((1,))
        assert slots[0] == (0, 1, 2) and (0, 1) in slots[first_hole:]
        # The reused slot held the prefix of its prompt: one prefill after a cached prefix.
        assert starts[0] == [0, 0, 0] and starts[-1][0] > 0
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_shutdown_ends_every_held_sequence_with_an_error(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=1)

    async def scenario():
        long = asyncio.ensure_future(_final(eng, OTHER, SamplingParams(max_new_tokens=1000)))
        queued = asyncio.ensure_future(_final(eng, LONG, SamplingParams(max_new_tokens=10)))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(eng.shutdown)
        return await asyncio.wait_for(asyncio.gather(long, queued), timeout=10)

    (_, first), (tokens, second) = run(scenario())
    assert (first.status.finish_reason, first.error) == ("error", "the engine has shut down")
    assert (second.error, tokens) == ("the engine has shut down", [])
    assert eng.health() == "the engine has shut down"


def test_warm_up_runs_with_one_slot_and_no_waiting_room(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=1, max_waiting=0)
    try:
        eng.warm_up()
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_nan_row_leaves_nothing_in_its_slot_for_the_next_occupant(tokenizer):
    # One input token's embedding is NaN: a request made of it fails alone, and the
    # innocent request that next takes its slot, beside a longer neighbour (which
    # makes it attend over the old occupant's masked positions), is untouched.
    model = random_gpt2(tiny=True)
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())  # untie
    bad = 50000
    with torch.no_grad():
        model.transformer.wte.weight[bad] = float("nan")
    eng = make_engine(model, tokenizer, max_batch_size=2)
    try:

        async def scenario():
            long = asyncio.ensure_future(_final(eng, LONG, SamplingParams(max_new_tokens=800)))
            await asyncio.sleep(0.05)
            seq = eng.new_sequence([bad] * 60, SamplingParams(max_new_tokens=5))
            poisoned = [e async for _, e in eng.stream([seq])]
            innocent = await _final(eng, "Hello", SamplingParams(max_new_tokens=20))
            assert not long.done()  # the neighbour ran throughout
            return poisoned, innocent, await long

        poisoned, (tokens, final), (_, long_final) = run(scenario())
        assert poisoned[-1].error == NON_FINITE_LOGITS
        assert (final.status.finish_reason, final.error) == ("length", None)
        assert tokens == hf_greedy(model, tokenizer("Hello").input_ids, 20)
        assert long_final.status.finish_reason == "length"
    finally:
        eng.shutdown()


def test_a_failing_prefill_fails_only_the_new_sequences(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    prefill, calls = eng.runner.prefill, [0]

    def second_fails(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("out of memory")
        return prefill(*args)

    eng.runner.prefill = second_fails
    try:

        async def scenario():
            running = asyncio.ensure_future(_final(eng, LONG, SamplingParams(max_new_tokens=60)))
            await asyncio.sleep(0.05)
            new = await _final(eng, OTHER, SamplingParams(max_new_tokens=5))
            return new, await running

        (new_tokens, new_final), (tokens, final) = run(scenario())
        assert (new_tokens, new_final.error) == ([], "generation failed: out of memory")
        assert final.status.finish_reason == "length"
        assert tokens == hf_greedy(tiny_model, tokenizer(LONG).input_ids, 60)
        assert eng.health() is None
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_failure_counting_a_request_does_not_cost_its_client_the_events(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    real, calls = eng.metrics.requests, [0]

    class Flaky:
        def labels(self, *labels):
            calls[0] += 1
            if calls[0] == 1:
                raise OSError("metrics file: no space left on device")
            return real.labels(*labels)

    eng.metrics = dataclasses.replace(eng.metrics, requests=Flaky())
    try:

        async def one():
            return await asyncio.wait_for(_final(eng, OTHER, SamplingParams(max_new_tokens=3)), 5)

        tokens, final = run(one())
        assert (len(tokens), final.status.finish_reason) == (3, "length")
        _assert_idle(eng)
    finally:
        eng.shutdown()


def test_a_failed_step_on_a_broken_device_still_ends_every_request(tiny_model, tokenizer):
    # A sticky device error (CUDA after a device-side assert): the step fails, and so
    # does clearing the cache afterwards. Clients get their error; the engine is dead.
    eng = make_engine(tiny_model, tokenizer)

    def sticky(*args):
        raise RuntimeError("CUDA error: device-side assert triggered")

    eng.runner.decode = eng.runner.clear_slots = sticky
    try:

        async def one():
            return await asyncio.wait_for(_final(eng, OTHER, SamplingParams(max_new_tokens=5)), 5)

        _, final = run(one())
        assert final.error == "generation failed: CUDA error: device-side assert triggered"
        eng._thread.join(timeout=5)
        assert eng.health() == (
            "clearing the KV cache after a failed step failed: "
            "CUDA error: device-side assert triggered"
        )
        assert eng._sinks == {}
    finally:
        eng.shutdown()


def test_available_memory_honours_a_cgroup_limit(tmp_path):
    assert cgroup_room(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_room(tmp_path) is None
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert cgroup_room(tmp_path) == 805306368


def test_an_engine_dying_during_a_submission_answers_unavailable(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    submit = eng.scheduler.submit

    def dying(seqs, **kw):  # the engine dies between registering the sinks and submitting
        eng._die("the engine thread died: RuntimeError('test')")
        return submit(seqs, **kw)

    eng.scheduler.submit = dying
    try:
        with pytest.raises(EngineUnavailable, match="the engine thread died"):
            run(_final(eng, OTHER, SamplingParams(max_new_tokens=3)))
        assert eng._sinks == {}
    finally:
        eng.shutdown()


class Cycle:
    me: Cycle


def test_warm_up_freezes_what_the_process_holds(tiny_model, tokenizer):
    """After warm-up, the objects made so far are out of the collector's generations: a
    full collection no longer walks them (and holds the GIL that long)."""
    eng = make_engine(tiny_model, tokenizer)
    try:
        gc.unfreeze()  # whatever an earlier test's warm-up froze
        assert gc.get_freeze_count() == 0
        gc.disable()  # only warm-up's own collection may collect the cycle below
        try:
            garbage = Cycle()
            garbage.me = garbage
            collected = weakref.ref(garbage)
            del garbage
            eng.warm_up()
        finally:
            gc.enable()
        assert gc.get_freeze_count() > 0
        assert collected() is None  # collected first, not frozen with the rest
    finally:
        eng.shutdown()
