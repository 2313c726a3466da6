"""Fixed-shape decode (the CUDA default) on the CPU: bucketed batch sizes and attended
lengths over static inputs, padding rows in a scratch slot.

Float32 on the tiny model, compared with the model's own `generate`: batches whose sizes
fall between buckets (so padding rows run), a hole in the slots, sequences past 300
positions (three length buckets), a slot taken over by a later occupant, and slots
that padding must leave untouched.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import hf_greedy, make_engine, staggered
from textgen.config import ConfigError, Settings
from textgen.models import random_gpt2
from textgen.runner import GPT2Runner, batch_buckets, bucket, length_buckets

CPU = torch.device("cpu")
# Nine prompts of 3 to 19 tokens and the new tokens each generates: live batches of
# 9, 7, 5 and 3 rows (padded to 12, 8, 8 and 4) occur, and the first runs alone to
# position 340, through length buckets 128, 256 and 512.
PROMPTS = [list(range(100 + 7 * i, 100 + 7 * i + 3 + 2 * i)) for i in range(9)]
NEW_TOKENS = [330, 12, 40, 25, 7, 60, 3, 18, 90]
SLOTS = [0, 1, 2, 4, 5, 6, 7, 8, 9]  # slot 3: a hole; 10 and 11: free, never touched
LATER = list(range(2000, 2011))  # takes slot 1 once its first occupant is done
LATER_NEW_TOKENS = 50


def test_buckets_are_the_small_powers_then_steps_of_16_then_the_maximum():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert len(batch_buckets(256)) == 20 and batch_buckets(256)[-1] == 256
    assert length_buckets(1024) == [128, 256, 512, 1024]
    assert length_buckets(200) == [128, 200]
    assert length_buckets(100) == [100]
    assert [bucket([1, 2, 4, 8, 12], n) for n in (1, 3, 5, 8, 9, 12)] == [1, 4, 8, 8, 12, 12]


def test_fixed_shapes_are_off_on_the_cpu_by_default_and_leave_the_cache_as_it_was(tiny_model):
    runner = GPT2Runner(tiny_model, CPU, torch.float32, 4)
    assert not runner.fixed_shapes and not runner.static_inputs and not runner.graphs
    assert runner.kv_cache.shape[2] == 4  # no scratch slot
    forced = GPT2Runner(tiny_model, CPU, torch.float32, 4, fixed_shapes=True)
    assert forced.fixed_shapes and forced.scratch_slot == 4
    assert forced.kv_cache.shape[2] == 5 and not forced.graphs  # graphs are CUDA's only


def _greedy_in_one_runner(runner: GPT2Runner) -> tuple[list[list[int]], list[int], set[int]]:
    """Runs PROMPTS in SLOTS greedily, every live sequence in one decode step, and LATER
    in slot 1 once slot 1's first sequence is done; returns each prompt's new tokens,
    LATER's, and the batch sizes decoded."""
    prompts = dict(zip(SLOTS, PROMPTS, strict=True))
    budget = dict(zip(SLOTS, NEW_TOKENS, strict=True))
    logits, _ = runner.prefill(PROMPTS, SLOTS)
    outputs = {slot: [int(row.argmax())] for slot, row in zip(SLOTS, logits, strict=True)}
    done: dict[int, list[int]] = {}  # a slot's first sequence, once another took the slot
    sizes = set()
    while live := [s for s in SLOTS if len(outputs[s]) < budget[s]]:
        sizes.add(len(live))
        rows = runner.decode(
            [outputs[s][-1] for s in live],
            [len(prompts[s]) + len(outputs[s]) - 1 for s in live],
            live,
        )
        for slot, row in zip(live, rows, strict=True):
            outputs[slot].append(int(row.argmax()))
        if len(outputs[1]) == budget[1] and 1 not in done:
            done[1] = outputs[1]
            prompts[1], budget[1] = LATER, LATER_NEW_TOKENS
            outputs[1] = [int(runner.prefill([LATER], [1])[0][0].argmax())]
    later, outputs[1] = outputs[1], done[1]
    return [outputs[s] for s in SLOTS], later, sizes


def test_greedy_through_fixed_shapes_equals_generate_with_holes_padding_and_a_later_occupant(
    tiny_model,
):
    runner = GPT2Runner(tiny_model, CPU, torch.float32, 12, fixed_shapes=True)
    assert runner.batch_buckets == [1, 2, 4, 8, 12]
    assert runner.length_buckets == [128, 256, 512, 1024]
    scratch = runner.kv_cache[:, :, runner.scratch_slot]
    free = runner.kv_cache[:, :, 10:12]
    free.fill_(0.5)  # what a finished sequence left there, for prefix caching
    outputs, later, sizes = _greedy_in_one_runner(runner)
    assert {9, 7, 5, 3} <= sizes  # batches between buckets: padding rows ran
    for got, prompt, n in zip(outputs, PROMPTS, NEW_TOKENS, strict=True):
        assert got == hf_greedy(tiny_model, prompt, n), prompt
    assert later == hf_greedy(tiny_model, LATER, LATER_NEW_TOKENS)
    # Padding wrote the scratch slot only: the hole and the free slots are as they were.
    assert scratch.abs().sum() > 0
    assert bool((runner.kv_cache[:, :, 3] == 0).all())
    assert bool((free == 0.5).all())


class _StandInGraph:
    """A CUDA graph's contract on the CPU: `replay` reruns the captured step over the
    tensors it closed over, reading what the static buffers hold at replay."""

    replays = 0

    def __init__(self, step) -> None:
        self.step = step

    def replay(self):
        _StandInGraph.replays += 1
        self.step()


@pytest.mark.parametrize("reuse_logits", [False, True])
def test_decode_through_captured_steps_equals_generate(reuse_logits, monkeypatch):
    # What only a GPU can run is torch.cuda's capture; everything around it (a step per
    # bucket over the static buffers, padding, the logits buffer) runs here with a
    # stand-in graph that reruns the step at each replay. With `reuse_logits` (the
    # engine's) each step's logits are the static buffer itself, not a copy.
    tiny_model = random_gpt2(tiny=True)  # a runner takes its model over
    runner = GPT2Runner(
        tiny_model, CPU, torch.float32, 12, fixed_shapes=True, reuse_logits=reuse_logits
    )
    monkeypatch.setattr(
        GPT2Runner, "_capture", staticmethod(lambda step, pool: _StandInGraph(step))
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 0))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    runner._capture_graphs()
    assert set(runner.graphs) == {(r, n) for r in [1, 2, 4, 8, 12] for n in [128, 256, 512, 1024]}
    runner.clear_slots()  # capture wrote the scratch slot only; start clean anyway
    decode, steps = runner.decode, []

    def counted(*rows):
        logits = decode(*rows)
        steps.append(logits.data_ptr() == runner.static_logits.data_ptr())
        return logits

    monkeypatch.setattr(runner, "decode", counted)
    _StandInGraph.replays = 0
    outputs, later, _ = _greedy_in_one_runner(runner)
    assert _StandInGraph.replays == len(steps) > 300  # every step a replay
    assert set(steps) == {reuse_logits}  # the static logits themselves, or a copy
    for got, prompt, n in zip(outputs, PROMPTS, NEW_TOKENS, strict=True):
        assert got == hf_greedy(tiny_model, prompt, n), prompt
    assert later == hf_greedy(tiny_model, LATER, LATER_NEW_TOKENS)


# (delay, prompt, new tokens, cancelled after): 9 then fewer rows, one past 300
# positions, two cancelled mid-stream, one arriving into a cancelled one's slot.
REQUESTS = [
    (0.0, PROMPTS[0], 320, None),
    (0.0, PROMPTS[1], 60, 20),
    (0.0, PROMPTS[2], 40, None),
    (0.0, PROMPTS[3], 25, None),
    (0.0, PROMPTS[4], 80, 10),
    (0.0, PROMPTS[5], 9, None),
    (0.0, PROMPTS[6], 30, None),
    (0.0, PROMPTS[7], 18, None),
    (0.0, PROMPTS[8], 50, None),
    (0.3, LATER, 40, None),
]


def assert_engine_equals_generate(eng, model) -> None:
    """Runs REQUESTS on `eng` at once; each must equal `model.generate`'s tokens (up to
    its cancellation)."""

    together = staggered(eng, REQUESTS)
    for (_, prompt, n, cancel_after), got in zip(REQUESTS, together, strict=True):
        assert got == hf_greedy(model, prompt, n)[: cancel_after or n], prompt


def test_the_engine_with_fixed_shapes_equals_generate_with_arrivals_and_cancellations(
    tiny_model, tokenizer
):
    eng = make_engine(tiny_model, tokenizer, max_batch_size=12, fixed_shapes=True)
    try:
        assert eng.runner.fixed_shapes
        assert_engine_equals_generate(eng, tiny_model)
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    ("env", "fixed", "graphs"),
    [
        ({}, None, True),
        ({"TEXTGEN_FIXED_SHAPES": "auto"}, None, True),
        ({"TEXTGEN_FIXED_SHAPES": "true"}, True, True),
        ({"TEXTGEN_FIXED_SHAPES": "false", "TEXTGEN_CUDA_GRAPHS": "false"}, False, False),
    ],
)
def test_the_settings_read_fixed_shapes_and_cuda_graphs(monkeypatch, env, fixed, graphs):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert (settings.fixed_shapes, settings.cuda_graphs) == (fixed, graphs)


def test_a_bad_fixed_shapes_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv("TEXTGEN_FIXED_SHAPES", "sometimes")
    with pytest.raises(ConfigError, match="TEXTGEN_FIXED_SHAPES must be one of auto, true, false"):
        Settings.from_env()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_logits_equal_fresh_ones_and_share_one_buffer(dtype):
    # Two copies of the same weights: a runner takes its model over.
    fresh = GPT2Runner(random_gpt2(tiny=True), CPU, dtype, 4)
    reused = GPT2Runner(random_gpt2(tiny=True), CPU, dtype, 4, reuse_logits=True)
    prompts, slots = [PROMPTS[0], PROMPTS[1], PROMPTS[2]], [0, 1, 3]  # slot 2: a hole
    for runner in (fresh, reused):
        runner.prefill(prompts, slots)
    outputs = []
    for step in range(3):
        args = ([7 + step, 8 + step, 9 + step], [len(p) + step for p in prompts], slots)
        want, got = fresh.decode(*args), reused.decode(*args)
        assert got.dtype == torch.float32 and got.shape == want.shape == (3, fresh.vocab_size)
        assert torch.equal(got, want)
        outputs.append(got)
    # Every step wrote the same rows of one (max_batch_size, V) buffer.
    assert len({t.data_ptr() for t in outputs}) == 1
    assert outputs[0].untyped_storage().nbytes() == 4 * fresh.vocab_size * 4
