"""The GPU lane (`pytest -m gpu`, `make test-gpu`): the runner and engine on CUDA, with
fixed shapes and CUDA graphs as they run there by default.

Skipped where no CUDA device is visible. Float32 greedy is compared with the model's
own `generate` on the same GPU; the scenarios are test_fixed_shapes.py's (a hole in
the slots, batches padded between buckets, a later occupant of a slot, sequences past
300 positions, cancellations), here replayed from captured graphs.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.conftest import collect, hf_greedy, make_engine, run
from tests.test_fixed_shapes import (
    LATER,
    LATER_NEW_TOKENS,
    NEW_TOKENS,
    PROMPTS,
    _greedy_in_one_runner,
    assert_engine_equals_generate,
)
from textgen.models import random_gpt2
from textgen.params import SamplingParams
from textgen.runner import GPT2Runner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device visible (the GPU lane: `make test-gpu` on a GPU machine)",
    ),
]
CUDA = torch.device("cuda")


def cuda_model() -> torch.nn.Module:
    """The tiny random GPT-2 on its own (the runner moves a model in place)."""
    return random_gpt2(tiny=True).to(CUDA)


def test_every_bucket_is_captured_and_decode_only_replays(monkeypatch):
    runner = GPT2Runner(cuda_model(), CUDA, torch.float32, 12)
    assert runner.fixed_shapes  # the default on CUDA
    assert set(runner.graphs) == {
        (rows, length) for rows in runner.batch_buckets for length in runner.length_buckets
    }

    def eager(rows: int, length: int) -> torch.Tensor:
        raise AssertionError(f"decode ran eagerly at ({rows}, {length})")

    monkeypatch.setattr(runner, "forward_fixed", eager)
    runner.prefill([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [0, 2, 5])
    logits = runner.decode([1, 2, 3], [len(PROMPTS[i]) for i in range(3)], [0, 2, 5])
    assert logits.shape == (3, 50257) and bool(logits.isfinite().all())


def test_graph_replay_equals_generate_with_holes_padding_and_a_later_occupant():
    model = cuda_model()
    runner = GPT2Runner(model, CUDA, torch.float32, 12)
    assert runner.graphs
    free = runner.kv_cache[:, :, 10:12]
    free.fill_(0.5)
    outputs, later, sizes = _greedy_in_one_runner(runner)
    assert {9, 7, 5, 3} <= sizes
    for got, prompt, n in zip(outputs, PROMPTS, NEW_TOKENS, strict=True):
        assert got == hf_greedy(model, prompt, n), prompt
    assert later == hf_greedy(model, LATER, LATER_NEW_TOKENS)
    assert bool((runner.kv_cache[:, :, 3] == 0).all())  # the hole
    assert bool((free == 0.5).all())
    assert runner.kv_cache[:, :, runner.scratch_slot].abs().sum() > 0


@pytest.mark.parametrize(
    ("fixed_shapes", "cuda_graphs"), [(True, False), (False, False)], ids=["eager", "ragged"]
)
def test_graphs_eager_fixed_shapes_and_ragged_decode_give_the_same_tokens(
    fixed_shapes, cuda_graphs
):
    graphs = GPT2Runner(cuda_model(), CUDA, torch.float32, 12)
    other = GPT2Runner(
        cuda_model(),
        CUDA,
        torch.float32,
        12,
        fixed_shapes=fixed_shapes,
        cuda_graphs=cuda_graphs,
    )
    assert not other.graphs
    assert _greedy_in_one_runner(graphs)[:2] == _greedy_in_one_runner(other)[:2]


def test_the_engine_on_cuda_equals_generate_with_arrivals_and_cancellations(tokenizer):
    model = random_gpt2(tiny=True)
    eng = make_engine(model, tokenizer, device="cuda", max_batch_size=12)
    try:
        assert eng.runner.fixed_shapes and eng.runner.graphs
        assert_engine_equals_generate(eng, model)
    finally:
        eng.shutdown()


def test_float16_seeded_sampling_is_the_same_alone_and_batched(tokenizer):
    eng = make_engine(random_gpt2(tiny=True), tokenizer, device="cuda", dtype="float16")
    try:
        assert eng.runner.dtype == torch.float16 and eng.runner.graphs
        sampled = SamplingParams(max_new_tokens=40, do_sample=True, seed=7, top_p=0.9)
        alone = run(collect(eng, "The quick brown fox", sampled))[0]

        async def batched():
            return await asyncio.gather(
                collect(eng, "Hello", SamplingParams(max_new_tokens=60)),
                collect(eng, "The quick brown fox", sampled),
                collect(eng, "Once upon", SamplingParams(max_new_tokens=5, do_sample=True)),
            )

        together = run(batched())[1][0]
        assert [t.token_id for t in together] == [t.token_id for t in alone]
    finally:
        eng.shutdown()


def test_turning_graphs_off_keeps_fixed_shapes_and_captures_nothing(tokenizer):
    model = random_gpt2(tiny=True)
    eng = make_engine(model, tokenizer, device="cuda", max_batch_size=4, cuda_graphs=False)
    try:
        assert eng.runner.fixed_shapes and not eng.runner.graphs
        ids = tokenizer("Hello").input_ids
        tokens, final = run(collect(eng, "Hello", SamplingParams(max_new_tokens=20)))
        assert [t.token_id for t in tokens] == hf_greedy(model, ids, 20)
        assert final.status.finish_reason == "length"
    finally:
        eng.shutdown()
