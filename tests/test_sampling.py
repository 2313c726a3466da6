"""The batched sampler on fixed logits: distributions against transformers' own
processors, hostile numbers confined to their row, seeds exact alone and batched."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tests.conftest import hf_greedy, make_engine, run
from textgen.models import random_gpt2
from textgen.params import ParamError, SamplingParams
from textgen.sampling import INVALID, NUCLEUS_GUESS, NUCLEUS_WIDE, Sampler
from textgen.scheduler import Sequence, TokenEvent

V = 64  # a small vocabulary keeps the expected distributions readable
EOS = V - 1
N = 4000  # rows of one batch, one per uniform draw


class Uniform:
    """A generator stand-in that returns one fixed uniform number."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


def fixed_logits() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(V) * 2.5  # (V,)


def frequencies(
    params: SamplingParams,
    prompt_ids: list[int],
    logits: torch.Tensor | None = None,
    draws: int = N,
) -> torch.Tensor:
    """How often each token is chosen over `draws` evenly spaced uniform draws: the
    sampler's distribution to within 1/draws."""
    logits = fixed_logits() if logits is None else logits
    vocab = logits.shape[-1]
    sampler = Sampler(draws, vocab, torch.device("cpu"), vocab - 1)
    seqs = []
    for slot in range(draws):
        seq = Sequence(prompt_ids, params, Uniform((slot + 0.5) / draws))
        seq.slot = slot
        seqs.append(seq)
    sampler.admit(seqs)
    choices = sampler.choose(logits.repeat(draws, 1), seqs)
    return torch.bincount(torch.tensor(choices[0]), minlength=vocab) / draws


def transformers_probs(
    params: SamplingParams, prompt_ids: list[int], logits: torch.Tensor | None = None
) -> torch.Tensor:
    """The same distribution from transformers' processors, in `generate`'s order."""
    scores = (fixed_logits() if logits is None else logits)[None, :]
    ids = torch.tensor([prompt_ids])
    processors = [RepetitionPenaltyLogitsProcessor(params.repetition_penalty)]
    processors += [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        processors.append(MinPLogitsWarper(params.min_p))
    for processor in processors:
        scores = processor(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.6),
        dict(temperature=1.7, top_k=5),
        dict(top_p=0.8),
        dict(temperature=0.8, top_k=10, top_p=0.7),
        dict(min_p=0.1),
        dict(temperature=1.3, top_k=12, top_p=0.95, min_p=0.05),
        dict(repetition_penalty=1.8, top_k=8),
        dict(repetition_penalty=0.5, temperature=0.9, top_p=0.9),
    ],
    ids=str,
)
def test_sampled_distribution_equals_transformers_processors(params):
    sp = SamplingParams(do_sample=True, max_new_tokens=4, **params)
    prompt = [int(i) for i in fixed_logits().topk(6).indices[::2]]  # some likely tokens seen
    got = frequencies(sp, prompt)
    expected = transformers_probs(sp, prompt)
    assert (got - expected).abs().max().item() <= 1 / N + 1e-6
    assert set(got.nonzero()[:, 0].tolist()) <= set(expected.nonzero()[:, 0].tolist())


def test_top_k_keeps_the_tokens_tied_with_the_kth_as_transformers_does():
    logits = torch.tensor([4.0, 3.5, 3.5, 3.0, 3.0, 3.0, 3.0, 2.0] + [0.0] * (V - 8))
    sp = SamplingParams(do_sample=True, top_k=4)
    got, expected = frequencies(sp, [0], logits), transformers_probs(sp, [0], logits)
    assert (got > 0).sum() == (expected > 0).sum() == 7
    assert (got - expected).abs().max().item() <= 1 / N + 1e-6


def test_top_k_keeps_every_token_tied_with_the_kth_even_past_its_candidates():
    # 40 tokens tie with the 2nd value; on bf16 logits such runs are common.
    logits = torch.tensor([5.0] + [3.0] * 40 + [0.0] * (V - 41))
    sp = SamplingParams(do_sample=True, top_k=2)
    got, expected = frequencies(sp, [0], logits), transformers_probs(sp, [0], logits)
    assert (got > 0).sum() == (expected > 0).sum() == 41
    assert (got - expected).abs().max().item() <= 1 / N + 1e-6


@pytest.fixture
def widths(monkeypatch) -> list[int]:
    """The candidate widths the sampler's groups are drawn over, in order (`_draw_group`)."""
    taken: list[int] = []
    draw_group = Sampler._draw_group

    def recorded(self, x, temperature, u, seqs, width):
        taken.append(width)
        return draw_group(self, x, temperature, u, seqs, width)

    monkeypatch.setattr(Sampler, "_draw_group", recorded)
    return taken


def zipf_logits(vocab: int) -> torch.Tensor:
    """(vocab,) logits whose probabilities fall as 1 / rank, over shuffled ids: of 8,192, a
    top_p of 0.7 keeps about 470 tokens, past NUCLEUS_GUESS; 0.95 about 5,000 and 0.99
    about 7,400, past NUCLEUS_WIDE."""
    ranks = torch.randperm(vocab, generator=torch.Generator().manual_seed(1)) + 1
    return -ranks.double().log().float()


@pytest.mark.parametrize(
    ("top_p", "kept", "path"),
    [
        (0.7, range(NUCLEUS_GUESS + 1, NUCLEUS_WIDE), [NUCLEUS_GUESS, NUCLEUS_WIDE]),
        (0.95, range(NUCLEUS_WIDE, 8192), [NUCLEUS_GUESS, NUCLEUS_WIDE, 8192]),
        (0.99, range(NUCLEUS_WIDE, 8193), [NUCLEUS_GUESS, 8192]),  # its bound skips the middle
    ],
)
def test_a_nucleus_wider_than_the_candidates_is_drawn_from_exactly(widths, top_p, kept, path):
    logits = zipf_logits(8192)
    sp = SamplingParams(do_sample=True, top_p=top_p)
    got, expected = frequencies(sp, [0], logits, draws=2000), transformers_probs(sp, [0], logits)
    assert int((expected > 0).sum()) in kept
    assert widths == path
    assert (got - expected).abs().max().item() <= 1 / 2000 + 1e-6
    assert set(got.nonzero()[:, 0].tolist()) <= set(expected.nonzero()[:, 0].tolist())


def test_ties_past_a_wide_top_k_are_drawn_over_the_wide_candidates(widths):
    """3,000 tokens tie with the 1,000th: past the row's 1,064 candidates, within 4,096."""
    logits = torch.zeros(8192)
    logits[:3000] = 1.0
    sp = SamplingParams(do_sample=True, top_k=1000)
    got, expected = frequencies(sp, [0], logits, draws=2000), transformers_probs(sp, [0], logits)
    assert widths == [1000 + 64, NUCLEUS_WIDE]
    assert (got - expected).abs().max().item() <= 1 / 2000 + 1e-6


@pytest.mark.parametrize(
    ("params", "tied", "path"),
    [
        (dict(top_p=0.9), False, [NUCLEUS_GUESS, 1000]),  # a nearly flat row: past 256
        (dict(top_k=100), True, [164, 1000]),  # ties with the 100th run past its candidates
    ],
    ids=str,
)
def test_a_vocabulary_smaller_than_the_wide_candidates_draws_over_all_of_it(
    widths, params, tied, path
):
    if tied:
        logits = torch.zeros(1000)
        logits[:10] = 1.0
    else:
        logits = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 0.1
    sp = SamplingParams(do_sample=True, **params)
    got, expected = frequencies(sp, [0], logits, draws=2000), transformers_probs(sp, [0], logits)
    assert widths == path  # straight to the whole vocabulary: NUCLEUS_WIDE is wider
    assert (got - expected).abs().max().item() <= 1 / 2000 + 1e-6


def test_rows_that_widen_by_different_paths_keep_their_own_tokens(widths):
    """Rows 0 and 2 are flat (their bound sends them straight to the whole vocabulary);
    row 1 tries NUCLEUS_WIDE first and still falls short, so it joins the whole
    vocabulary's group after them. Each row still draws from its own logits: batched,
    every row's token is the one it draws alone."""
    vocab = 8192
    flat_low = torch.full((vocab,), -10.0)
    flat_low[:4096] = 0.0
    flat_high = torch.full((vocab,), -10.0)
    flat_high[4096:] = 0.0
    headed = torch.zeros(vocab)  # 256 tokens hold half the mass, a flat tail the rest
    headed[:256] = math.log((0.5 / 256) / (0.5 / (vocab - 256)))
    logits = torch.stack([flat_low, headed, flat_high])
    sp = SamplingParams(do_sample=True, top_p=0.9)
    sampler = Sampler(3, vocab, torch.device("cpu"), vocab - 1)
    seqs = []
    for slot in range(3):
        seq = Sequence([0], sp, Uniform(0.3))
        seq.slot = slot
        seqs.append(seq)
    sampler.admit(seqs)
    batched = sampler.choose(logits, seqs)[0]
    assert widths == [NUCLEUS_GUESS, NUCLEUS_WIDE, vocab]  # the path described above
    alone = [sampler.choose(logits[i : i + 1], [seqs[i]])[0][0] for i in range(3)]
    assert batched == alone
    assert batched[0] < 4096 <= batched[2]


BF16_LOGITS = (torch.randn(50257, generator=torch.Generator().manual_seed(0)) * 3 - 100).bfloat16()


@pytest.mark.parametrize(
    ("mine", "other"),
    [
        (dict(top_k=50), dict(top_k=300)),
        (dict(top_p=0.5), dict(top_p=0.999)),
        (dict(top_k=50, top_p=0.8), dict(top_p=0.95, min_p=0.01)),
    ],
    ids=str,
)
def test_a_seed_draws_the_same_token_alone_and_batched_on_tied_bf16_logits(mine, other):
    # bfloat16 logits tie often; how many candidates a row takes, and their order,
    # must not depend on its neighbours.
    logits = BF16_LOGITS.float()

    def pick(seed: int, neighbour: SamplingParams | None) -> int:
        sampler = Sampler(2, 50257, torch.device("cpu"), None)
        seqs = [Sequence([1], SamplingParams(do_sample=True, **mine), Uniform(seed / 41))]
        if neighbour is not None:
            seqs.append(Sequence([1], neighbour, Uniform(0.5)))
        for slot, seq in enumerate(seqs):
            seq.slot = slot
        return sampler.choose(logits.repeat(len(seqs), 1), seqs)[0][0]

    neighbour = SamplingParams(do_sample=True, **other)
    assert [pick(s, None) for s in range(40)] == [pick(s, neighbour) for s in range(40)]


def test_a_seed_gives_the_same_text_alone_and_batched_in_bfloat16(tokenizer):
    # The sampler draws the same token from the same logits alone or batched, ties
    # included. A lone bf16 stream's logits come from the one-row kernels, which round
    # differently from a batch (README: only float32 promises the same tokens alone and
    # batched); with them off, oneDNN gives a row the same logits in any batch.
    eng = make_engine(random_gpt2(tiny=True), tokenizer, dtype="bfloat16", native_kernels=False)
    mine = SamplingParams(max_new_tokens=40, do_sample=True, seed=7, top_k=50)
    try:
        alone = run(_ids(eng, PROMPTS[0], mine))

        async def batched():
            other = SamplingParams(max_new_tokens=60, do_sample=True, seed=1, top_k=300)
            return await asyncio.gather(_ids(eng, PROMPTS[0], mine), _ids(eng, "Hello", other))

        assert run(batched())[0] == alone
    finally:
        eng.shutdown()


def _one(params: SamplingParams, logits: torch.Tensor, output_ids=()) -> list[int]:
    """Chosen tokens of rows sharing one batch: row 0 under `params`, row 1 a greedy
    bystander on the same logits."""
    sampler = Sampler(2, V, torch.device("cpu"), EOS)
    hostile = Sequence([1, 2, 3], params, Uniform(0.37))
    bystander = Sequence([4, 5], SamplingParams(max_new_tokens=9))
    hostile.slot, bystander.slot = 0, 1
    sampler.admit([hostile, bystander])
    for token in output_ids:  # as the engine records them: history first, then the output
        sampler._count([token, EOS], [hostile, bystander])
        hostile.output_ids.append(token)
    return sampler.choose(logits.repeat(2, 1), [hostile, bystander])[0]


@pytest.mark.parametrize(
    "params",
    [
        dict(do_sample=True, temperature=1e-39),
        dict(do_sample=True, temperature=1e-300),
        dict(do_sample=True, repetition_penalty=1e-300),
        dict(repetition_penalty=1e-300),
        dict(do_sample=True, temperature=100, min_new_tokens=5, top_p=1e-300),
        dict(do_sample=True, repetition_penalty=100, presence_penalty=-2, frequency_penalty=-2),
        dict(do_sample=True, min_p=1.0, top_k=10**9),
    ],
    ids=str,
)
def test_hostile_numbers_that_pass_validation_stay_in_their_row(params):
    logits = fixed_logits()
    logits[EOS] = 50.0  # EOS is the best token: min_new_tokens must suppress it
    sp = SamplingParams(max_new_tokens=9, **params)
    hostile, bystander = _one(sp, logits, output_ids=[1, 1, 7])
    assert bystander == EOS  # greedy, untouched
    assert 0 <= hostile < V
    if sp.min_new_tokens:
        assert hostile != EOS


def test_a_penalized_row_left_only_a_suppressed_eos_fails_alone():
    # The model rules out every token but EOS (-inf); EOS is suppressed. Penalties must
    # not bring the ruled-out tokens back.
    logits = torch.full((V,), float("-inf"))
    logits[EOS] = 1.0
    for params in (
        SamplingParams(max_new_tokens=9, min_new_tokens=3),
        SamplingParams(max_new_tokens=9, min_new_tokens=3, repetition_penalty=1.2),
        SamplingParams(max_new_tokens=9, min_new_tokens=3, do_sample=True, frequency_penalty=1),
    ):
        hostile, _ = _one(params, logits)
        assert hostile == INVALID, params


def test_a_temperature_below_1e_5_is_greedy():
    params = SamplingParams(do_sample=True, temperature=1e-6, seed=3)
    assert not params.do_sample and params.sampling_seed is None


def test_non_finite_model_logits_mark_only_their_row_invalid():
    sampler = Sampler(3, V, torch.device("cpu"), EOS)
    seqs = [
        Sequence([1], SamplingParams(do_sample=True, top_k=3), Uniform(0.5)),
        Sequence([1], SamplingParams()),
        Sequence([1], SamplingParams(logprobs=2)),
    ]
    for slot, seq in enumerate(seqs):
        seq.slot = slot
    logits = fixed_logits().repeat(3, 1)
    logits[0, 4] = float("nan")
    logits[2, 5] = float("inf")
    token_ids, logprobs = sampler.choose(logits, seqs)
    assert token_ids == [INVALID, int(fixed_logits().argmax()), INVALID]
    assert logprobs == {}  # row 2 asked, and failed


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_logit_hidden_by_suppression_still_marks_its_row_invalid(bad):
    # Below min_new_tokens EOS is suppressed in place (no copy when no row wants logprobs):
    # a NaN or +inf at EOS must still fail its row, as the max over the raw row would.
    sampler = Sampler(3, V, torch.device("cpu"), EOS)
    params = [
        SamplingParams(max_new_tokens=9, min_new_tokens=3),
        SamplingParams(max_new_tokens=9, min_new_tokens=3),
        SamplingParams(max_new_tokens=9, min_new_tokens=3, do_sample=True, top_k=3),
    ]
    seqs = [Sequence([1], p, Uniform(0.5)) for p in params]
    for slot, seq in enumerate(seqs):
        seq.slot = slot
    logits = fixed_logits().repeat(3, 1)
    logits[:, EOS] = 50.0  # the best token, suppressed
    logits[0, EOS] = bad
    logits[2, EOS] = bad
    tokens = sampler.choose(logits, seqs)[0]
    assert tokens[0] == INVALID and tokens[2] == INVALID
    assert tokens[1] == int(fixed_logits()[:EOS].argmax())


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", 1e38, "temperature must be in (0, 100], got 1e+38"),
        ("repetition_penalty", 1e3, "repetition_penalty must be in (0, 100], got 1000.0"),
        ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"),
        ("min_p", math.nan, "min_p must be in [0, 1], got nan"),
    ],
)
def test_upper_bounds_name_the_field_the_limit_and_the_value(field, value, message):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{field: value})
    assert (err.value.param, str(err.value)) == (field, message)


# -- seeds on the engine ---------------------------------------------------------------

PROMPTS = ["The quick brown fox", "Hello", "Once upon a time there was"]


async def _ids(engine, prompt, params):
    seq = engine.new_sequence(engine.tokenizer(prompt).input_ids, params)
    return [e.token_id async for _, e in engine.stream([seq]) if isinstance(e, TokenEvent)]


def test_a_seed_gives_the_same_tokens_alone_and_batched_with_every_parameter(engine):
    every = SamplingParams(
        max_new_tokens=40,
        do_sample=True,
        seed=2024,
        temperature=0.9,
        top_k=40,
        top_p=0.92,
        min_p=0.02,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.3,
        min_new_tokens=10,
    )
    alone = run(_ids(engine, PROMPTS[0], every))

    async def batched():
        others = [
            _ids(engine, PROMPTS[1], SamplingParams(max_new_tokens=30)),
            _ids(engine, PROMPTS[2], SamplingParams(max_new_tokens=50, do_sample=True, seed=1)),
            _ids(engine, PROMPTS[1], SamplingParams(max_new_tokens=20, repetition_penalty=2.0)),
        ]
        return await asyncio.gather(_ids(engine, PROMPTS[0], every), *others)

    assert run(batched())[0] == alone
    other = run(_ids(engine, PROMPTS[0], SamplingParams(**{**every.__dict__, "seed": 2025})))
    assert other != alone


def test_penalties_on_the_engine_equal_transformers_greedy(engine, tiny_model, tokenizer):
    params = SamplingParams(max_new_tokens=60, repetition_penalty=1.5)
    got = run(_ids(engine, PROMPTS[1], params))
    ids = tokenizer(PROMPTS[1]).input_ids
    assert got == hf_greedy(tiny_model, ids, 60, repetition_penalty=1.5)
