"""The one-row bfloat16 decode kernels (textgen/csrc/row_decode.cpp, textgen/native.py).

A lone stream in bfloat16 on a CPU with AVX-512 BF16 decodes through them; everything
else (prefill, batches of two or more) through oneDNN. These tests hold the kernels to
float32's logits and to oneDNN's path across the whole context, at every slot, through
slot reuse and a change of path mid-sequence (a batch shrinking to one row), on models
whose sizes leave remainders, and with a NaN request.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import make_engine
from textgen import native
from textgen.config import Settings
from textgen.models import random_gpt2
from textgen.params import SamplingParams
from textgen.runner import GPT2Runner, _blocked_weight

pytestmark = pytest.mark.skipif(
    native.why_not_row_decode() is not None,
    reason=f"native kernels can't run here: {native.why_not_row_decode()}",
)
CPU = torch.device("cpu")
# Max |logit difference| from float32 on the tiny model over a whole context; measured
# 0.09 (oneDNN's batched bf16 path: 0.09 too).
BOUND = 0.3


def bf16_runner(model: torch.nn.Module | None = None, native_kernels: bool = True, **kw):
    model = model if model is not None else random_gpt2(tiny=True)  # converted in place
    return GPT2Runner(model, CPU, torch.bfloat16, 4, native_kernels=native_kernels, **kw)


def forced(runner: GPT2Runner, prompt: list[int], tokens: list[int], slot: int) -> torch.Tensor:
    """Prefill `prompt` alone into `slot`, then decode `tokens` one at a time: the logits
    (len(tokens), V) after each."""
    runner.prefill([prompt], [slot])
    steps = [runner.decode([t], [len(prompt) + i], [slot]) for i, t in enumerate(tokens)]
    return torch.cat(steps)


def float32_greedy(prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """float32's greedy tokens after `prompt` and its logits (n, V) before each."""
    runner = GPT2Runner(random_gpt2(tiny=True), CPU, torch.float32, 1)
    logits, _ = runner.prefill([prompt], [0])
    tokens, rows = [], [logits]
    for i in range(n - 1):
        tokens.append(int(rows[-1].argmax()))
        rows.append(runner.decode([tokens[-1]], [len(prompt) + i], [0]))
    tokens.append(int(rows[-1].argmax()))
    return tokens, torch.cat(rows)


def test_the_kernels_build_where_the_cpu_has_them():
    assert native.row_decode() is True
    assert bf16_runner().row_weights is not None


def test_one_stream_follows_float32_to_the_end_of_the_context():
    # Slot 3 of 4, from a 5-token prompt to the context's last position (1023).
    prompt = [464, 2068, 7586, 21831, 18045]
    tokens, expected = float32_greedy(prompt, 1024 - len(prompt))
    runner = bf16_runner()
    assert runner.row_weights is not None
    got = torch.cat([runner.prefill([prompt], [3])[0], forced(runner, prompt, tokens[:-1], 3)])
    assert got.shape == expected.shape == (1019, 50257)
    diff = (got - expected).abs().amax(-1)  # (positions,)
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert diff.max().item() < BOUND, (diff.argmax().item(), diff.max().item())
    assert agree >= 0.95, agree


def test_one_stream_agrees_with_onednns_path():
    prompt = list(range(300, 340))
    tokens, _ = float32_greedy(prompt, 200)
    fast = forced(bf16_runner(), prompt, tokens, 1)
    onednn_runner = bf16_runner(native_kernels=False)
    assert onednn_runner.row_weights is None
    onednn = forced(onednn_runner, prompt, tokens, 1)
    assert (fast - onednn).abs().max().item() < BOUND
    assert (fast.argmax(-1) == onednn.argmax(-1)).float().mean().item() >= 0.95


def test_a_batch_shrinking_to_one_row_and_a_reused_slot():
    # Two sequences decode together (oneDNN writes their keys and values), one leaves,
    # the other goes on alone (the kernels read what oneDNN wrote). Then a new sequence
    # takes the freed slot, full of the old one's keys: its logits are bit for bit those
    # of the same sequence in a fresh runner.
    a, b = [464, 2068, 7586], [15496, 11, 314, 716, 257, 1332, 13]
    runner = bf16_runner()
    logits, _ = runner.prefill([a, b], [0, 1])
    ta, tb = [int(t) for t in logits.argmax(-1)]
    for i in range(40):
        ta, tb = [
            int(t) for t in runner.decode([ta, tb], [len(a) + i, len(b) + i], [0, 1]).argmax(-1)
        ]
    alone = [runner.decode([tb], [len(b) + 40 + i], [1]) for i in range(30)]
    reference = bf16_runner(native_kernels=False)
    reference.prefill([a, b], [0, 1])
    ra, rb = [int(t) for t in logits.argmax(-1)]
    for i in range(40):
        ra, rb = [
            int(t) for t in reference.decode([ra, rb], [len(a) + i, len(b) + i], [0, 1]).argmax(-1)
        ]
    expected = [reference.decode([tb], [len(b) + 40 + i], [1]) for i in range(30)]
    assert (torch.cat(alone) - torch.cat(expected)).abs().max().item() < BOUND

    c = [1212, 318]
    reused = forced(runner, c, list(range(500, 560)), 0)
    fresh = forced(bf16_runner(), c, list(range(500, 560)), 0)
    assert torch.equal(reused, fresh)


@pytest.mark.parametrize("n", [8, 13, 50257])
def test_the_head_matches_a_reference_product_with_any_remainder(n):
    # Output rows come in groups of 8 and a tail of n % 8.
    native.row_decode()
    torch.manual_seed(n)
    x = torch.randn(64).bfloat16()
    weight, bias = torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    head = torch.randn(n, 64).bfloat16()
    got = torch.ops.textgen_row.head(x, weight, bias, 1e-5, *_blocked_weight(head))
    normed = F.layer_norm(x.float(), (64,), weight.float(), bias.float(), 1e-5).bfloat16()
    expected = normed.float() @ head.float().T
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def scaled_fc(scale: float) -> torch.nn.Module:
    model = random_gpt2(tiny=True)
    with torch.no_grad():
        for h in model.transformer.h:
            h.mlp.c_fc.weight *= scale
    return model


def test_gelu_holds_far_from_zero():
    # fc outputs x30 reach |x| in the hundreds: the GELU's exp clamps, nothing overflows.
    prompt = list(range(1000, 1012))
    tokens = list(range(2000, 2050))
    fast = forced(bf16_runner(scaled_fc(30.0)), prompt, tokens, 0)
    onednn = forced(bf16_runner(scaled_fc(30.0), native_kernels=False), prompt, tokens, 0)
    assert torch.isfinite(fast).all()
    relative = (fast - onednn).abs().max() / onednn.abs().max()
    assert relative.item() < 0.02, relative.item()


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"activation_function": "relu"}, "the activation is not tanh GELU"),
        ({"n_inner": 72}, "n_inner is not a multiple of 32"),
        ({"n_embd": 48, "n_head": 4}, "n_embd is not a multiple of 32"),
    ],
    ids=["relu", "n_inner 72", "n_embd 48"],
)
def test_models_the_kernels_dont_fit_decode_through_onednn(settings, why):
    torch.manual_seed(0)
    shape = {"n_layer": 2, "n_head": 4, "n_embd": 64, **settings}
    config = GPT2Config(vocab_size=50257, initializer_range=0.2, **shape)
    reference = GPT2LMHeadModel(config).eval()
    prompt = [464, 2068, 7586, 21831]
    with torch.no_grad():
        expected = reference(torch.tensor([[*prompt, 100]])).logits[0, -1]
    torch.manual_seed(0)
    runner = bf16_runner(GPT2LMHeadModel(config).eval())
    assert runner.row_weights is None, why
    runner.prefill([prompt], [0])
    got = runner.decode([100], [len(prompt)], [0])[0]
    assert (got - expected).abs().max().item() < BOUND


def test_the_setting_turns_them_off(monkeypatch, tokenizer):
    monkeypatch.setenv("TEXTGEN_NATIVE_KERNELS", "false")
    assert Settings.from_env().native_kernels is False
    eng = make_engine(random_gpt2(tiny=True), tokenizer, dtype="bfloat16", native_kernels=False)
    try:
        assert eng.runner.dense_kind == "mkldnn" and eng.runner.row_weights is None
    finally:
        eng.shutdown()


def test_a_nan_at_decode_fails_its_request_and_the_engine_goes_on(tokenizer):
    # Position 5's embedding is NaN: a lone sequence reaches it in a one-row decode step.
    model = random_gpt2(tiny=True)
    with torch.no_grad():
        model.transformer.wpe.weight[5] = float("nan")
    eng = make_engine(model, tokenizer, dtype="bfloat16", max_batch_size=2)
    assert eng.runner.row_weights is not None

    async def finals(prompt_ids: list[int], n: int) -> list:
        seq = eng.new_sequence(prompt_ids, SamplingParams(max_new_tokens=n))
        return [e async for _, e in eng.stream([seq])]

    try:
        poisoned = asyncio.run(finals([464, 2068, 7586], 8))  # positions 0-2, then 3, 4, 5
        tokens = [e for e in poisoned if hasattr(e, "token_id")]
        assert poisoned[-1].status.finish_reason == "error" and poisoned[-1].error
        assert len(tokens) == 3, tokens  # the prefill's token and positions 3, 4's
        innocent = asyncio.run(finals(tokenizer("Hello").input_ids, 3))
        assert (innocent[-1].status.finish_reason, innocent[-1].error) == ("length", None)
        assert eng.health() is None
    finally:
        eng.shutdown()
