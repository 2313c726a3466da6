"""The precisions users run: dynamic int8 (the CPU default) and bfloat16, through every
route, and how far their greedy tokens agree with float32's on the same weights.

Floors, on the tiny random model (its large random weights make it touchy;
`bench/fidelity.py` reports the 124M figures): first tokens agree on at least 90%
of the prompts in bf16 and 50% in int8; over 24 tokens the common prefix covers
at least 40% (bf16) and 10% (int8) of the tokens. Free-running prefixes are
chaotic (one flip changes the rest), so the fidelity itself is held by
teacher-forced floors: the share of positions whose greedy choice is float32's,
and the mean absolute difference of float32's token's logprob.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import httpx
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import make_engine, start_server, stop_server, stream_tokens
from textgen.config import Settings
from textgen.devices import resolve_int8
from textgen.models import random_gpt2
from textgen.params import SamplingParams
from textgen.runner import GPT2Runner

PROMPTS = [
    "The quick brown fox",
    "Hello",
    "Once upon a time there was",
    "def fibonacci(n):",
    "Artificial Intelligence is a",
    "The capital of France is",
    "Zürich, München, 東京 and",
    "In a shocking finding, scientists discovered a herd of unicorns",
    "To be or not to be",
    "import numpy as np",
    "My favourite colour is",
    "1, 2, 3, 4,",
    "Dear Sir or Madam,",
    "The weather today",
    "Breaking news:",
    "She opened the door and",
]
FLOORS = {"bfloat16": (0.9, 0.4), "int8": (0.5, 0.1)}  # (first token, common prefix)
# Teacher-forced through prefill and decode, tiny model, 12 prompts x 24 tokens, all
# decoding together and each alone: (agree at least, |dlogprob| at most). Measured: bf16
# 93%, 0.016, alone 97%, 0.014; int8 84%, 0.074, alone 91%, 0.041.
TEACHER_FORCED = {
    "bfloat16": (0.9, 0.03),
    "bfloat16, one stream": (0.9, 0.03),
    "int8": (0.8, 0.15),
    "int8, one stream": (0.8, 0.15),
}
ENV = {"bfloat16": {"TEXTGEN_DTYPE": "bfloat16"}, "int8": {"TEXTGEN_QUANTIZE": "int8"}}


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def precise(request, model_store, tmp_path_factory):
    home, tag = model_store
    log = tmp_path_factory.mktemp("logs") / f"{request.param}.log"
    srv = start_server(home, tag, log, **ENV[request.param])
    yield request.param, srv
    stop_server(srv)


def greedy_tokens(url: str) -> list[list[str]]:
    """24 greedy tokens per prompt (their strings), from one /v1 request."""
    body = {"prompt": PROMPTS, "max_tokens": 24, "temperature": 0, "logprobs": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    return [c["logprobs"]["tokens"] for c in choices]


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_greedy_tokens_agree_with_float32_above_the_floor(precise, server):
    name, srv = precise
    reference, got = greedy_tokens(server.url), greedy_tokens(srv.url)
    pairs = list(zip(reference, got, strict=True))
    first = sum(a[0] == b[0] for a, b in pairs) / len(pairs)
    prefix = sum(common_prefix(a, b) for a, b in pairs) / sum(len(a) for a in reference)
    print(f"{name}: first tokens agree on {first:.0%}, common prefixes cover {prefix:.0%}")
    assert (first >= FLOORS[name][0], prefix >= FLOORS[name][1]) == (True, True), (
        f"{name}: first tokens agree on {first:.0%}, common prefixes cover {prefix:.0%}"
    )


def test_every_route_serves(precise):
    _, srv = precise
    url, prompt = srv.url, PROMPTS[0]
    r = httpx.post(f"{url}/generate", json={"prompt": prompt, "max_new_tokens": 8}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    body = {"prompt": prompt, "max_new_tokens": 8, "do_sample": True, "seed": 3, "top_k": 20}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line]
    assert len(stream_tokens(events[:-1])) == 8
    assert events[-1]["finish_reason"] == "length" and events[-1]["seed"] == 3
    r = httpx.post(f"{url}/text-generation/generate", json={"text": prompt}, timeout=60)
    assert r.status_code == 200 and r.json()["input"] == prompt
    body = {"prompt": [prompt, "Hello"], "max_tokens": 6, "n": 2, "temperature": 0.7, "seed": 1}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 4
    body = {"prompt": prompt, "max_tokens": 6, "stream": True, "repetition_penalty": 1.3}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_teacher_forced_fidelity_above_the_floor():
    path = Path(__file__).resolve().parent.parent / "bench" / "fidelity.py"
    spec = importlib.util.spec_from_file_location("fidelity", path)
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    results = fidelity.measure(24, tiny=True)
    print(fidelity.table(results, 24))
    assert set(results) == set(TEACHER_FORCED)
    for name, (agree, diff) in TEACHER_FORCED.items():
        got = results[name]
        assert got["agree"] >= agree, (name, got)
        assert got["mean_abs_logprob_diff"] <= diff, (name, got)


@pytest.mark.parametrize(
    ("env", "cpu_int8", "cuda_int8"),
    [
        ({}, True, False),
        ({"TEXTGEN_DTYPE": "bfloat16"}, False, False),
        ({"TEXTGEN_DTYPE": "float32"}, False, False),
        ({"TEXTGEN_QUANTIZE": "none"}, False, False),
        ({"TEXTGEN_DTYPE": "float32", "TEXTGEN_QUANTIZE": "int8"}, True, True),
    ],
    ids=str,
)
def test_the_cpu_default_is_int8_unless_a_dtype_is_named(monkeypatch, env, cpu_int8, cuda_int8):
    for name in ("TEXTGEN_DTYPE", "TEXTGEN_QUANTIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert resolve_int8(settings.quantize, settings.dtype, torch.device("cpu")) is cpu_int8
    assert resolve_int8(settings.quantize, settings.dtype, torch.device("cuda")) is cuda_int8


def test_an_engine_with_default_settings_runs_int8_on_the_cpu(tokenizer):
    eng = make_engine(random_gpt2(tiny=True), tokenizer, dtype="auto")  # converted in place
    try:
        assert (eng.runner.dense_kind, eng.runner.dtype) == ("int8", torch.float32)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_new"])
@pytest.mark.parametrize(
    ("dtype", "int8", "bound"), [("bfloat16", False, 0.3), ("int8", True, 0.85)]
)
def test_the_fast_forms_keep_the_models_activation(activation, dtype, int8, bound):
    # bf16 and int8 fuse GPT-2's tanh GELU; a config naming another activation keeps its
    # own. Measured max |logit difference| against the float32 model: bf16 0.07, int8
    # 0.58-0.61; with tanh GELU forced on a relu model, 1.07 and 1.15.
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=50257, n_layer=2, n_head=4, n_embd=64, initializer_range=0.2,
            activation_function=activation,
        )  # fmt: skip
        return GPT2LMHeadModel(config).eval()

    prompts = [[(7919 * i + 13 * j) % 50257 for j in range(n)] for i, n in enumerate((3, 9, 1, 17))]
    with torch.no_grad():
        reference = model()
        expected = torch.stack([reference(torch.tensor([p])).logits[0, -1] for p in prompts])
    runner_dtype = torch.float32 if int8 else getattr(torch, dtype)
    runner = GPT2Runner(model(), torch.device("cpu"), runner_dtype, 4, quantize_int8=int8)
    logits, _ = runner.prefill(prompts, [0, 1, 2, 3])
    assert (logits - expected).abs().max().item() < bound


def test_int8_a_nan_request_fails_with_an_error_and_the_engine_goes_on(tokenizer):
    # int8 (the CPU default) can't isolate a non-finite row (README "Operating it"): a
    # request made of a token whose embedding is NaN must still end in an error, never
    # in tokens, and the next request is served.
    model = random_gpt2(tiny=True)
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    with torch.no_grad():
        model.transformer.wte.weight[50000] = float("nan")
    eng = make_engine(model, tokenizer, dtype="auto", max_batch_size=2)
    assert eng.runner.dense_kind == "int8"

    async def finals(prompt_ids: list[int]) -> list:
        seq = eng.new_sequence(prompt_ids, SamplingParams(max_new_tokens=5))
        return [e async for _, e in eng.stream([seq])]

    try:
        poisoned = asyncio.run(finals([50000] * 10))
        assert poisoned[-1].status.finish_reason == "error"
        assert poisoned[-1].error
        assert not any(hasattr(e, "token_id") for e in poisoned[:-1])
        innocent = asyncio.run(finals(tokenizer("Hello").input_ids))
        assert (innocent[-1].status.finish_reason, innocent[-1].error) == ("length", None)
        assert eng.health() is None
    finally:
        eng.shutdown()
