"""The official `openai` client against a real server: /v1/completions and /v1/models."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import load_stored_model

PROMPT = "The meaning of life is"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def greedy(client, **kw):
    return client.completions.create(model="gpt2", prompt=PROMPT, temperature=0, **kw)


def test_greedy_completion_equals_the_native_route(client, server):
    result = greedy(client, max_tokens=12)
    native = httpx.post(
        f"{server.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 12}, timeout=60
    ).json()
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert result.model == "gpt2"
    assert [c.text for c in result.choices] == [native["generated"]]
    assert result.choices[0].finish_reason == "length"
    usage, n = result.usage.model_dump(), native["usage"]["prompt_tokens"]
    # What the prefix cache held depends on the tests before; never the last token.
    assert usage.pop("prompt_tokens_details")["cached_tokens"] in range(n)
    assert usage == {
        "prompt_tokens": n,
        "completion_tokens": 12,
        "total_tokens": n + 12,
        "completion_tokens_details": None,
    }


def test_streamed_text_equals_non_streamed_at_temperature_0(client):
    whole = greedy(client, max_tokens=20).choices[0].text
    chunks = list(
        greedy(client, max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes.count("length") == 1 and finishes[-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_list_prompts_and_n_index_prompt_major(client):
    prompts = ["One", "Two words"]
    result = client.completions.create(
        model="gpt2", prompt=prompts, n=2, max_tokens=4, temperature=0.8, seed=11
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    alone = [greedy_text(client, p, seed=11 + j) for p in prompts for j in range(2)]
    assert [c.text for c in result.choices] == alone
    prompt_tokens = sum(len(httpx_tokens(p)) for p in prompts)
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.completion_tokens == 16


def greedy_text(client, prompt, seed):
    """One sampled choice with a given seed (n=1): choice j of n uses seed + j."""
    return (
        client.completions.create(
            model="gpt2", prompt=prompt, max_tokens=4, temperature=0.8, seed=seed
        )
        .choices[0]
        .text
    )


def httpx_tokens(prompt):
    from textgen.models import gpt2_tokenizer

    return gpt2_tokenizer()(prompt).input_ids


def test_seeds_repeat(client):
    kw = {"model": "gpt2", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 3}
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    c = client.completions.create(**{**kw, "seed": 4}).choices[0].text
    assert a == b and a != c


def test_echo_prepends_the_prompt(client):
    plain = greedy(client, max_tokens=5).choices[0].text
    assert greedy(client, max_tokens=5, echo=True).choices[0].text == PROMPT + plain


def test_logprobs_shape_and_values(client, stored_logprobs):
    result = greedy(client, max_tokens=3, logprobs=2)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    # Greedy: the chosen token is the most likely one, with the model's own logprob.
    assert lp.token_logprobs[0] == pytest.approx(stored_logprobs, abs=1e-4)
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()), abs=1e-6)


@pytest.fixture(scope="module")
def stored_logprobs(model_store, tokenizer):
    """log p(first greedy token | PROMPT) computed with the served weights."""
    import torch

    model = load_stored_model(*model_store)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(PROMPT).input_ids])).logits[0, -1]
    return float(logits.log_softmax(-1).max())


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["gpt2"]
    assert models[0].model_extra["metadata"]["random_weights"] is True


def test_unknown_fields_are_ignored(client):
    result = greedy(client, max_tokens=2, extra_body={"some_vendor_field": 1})
    assert len(result.choices) == 1


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        (
            {"prompt": "hello" + " hello" * 999, "max_tokens": 100},
            "prompt",
            "prompt has 1000 tokens and max_tokens is 100: "
            "1100 exceeds the model's context of 1024 tokens",
        ),
        (
            {"max_tokens": 0},
            "max_tokens",
            "max_tokens must be >= 1 unless echo is set, got 0",
        ),
        (
            {"temperature": 3},
            "temperature",
            "temperature: Input should be less than or equal to 2, got 3",
        ),
        ({"logprobs": 21}, "logprobs", "logprobs must be <= 20 (TEXTGEN_MAX_LOGPROBS), got 21"),
        ({"n": 9}, "n", "n must be <= 8, got 9"),
        ({"max_tokens": 5000}, "max_tokens", "max_tokens must be <= 1024, got 5000"),
        ({"stop": ["a", ""]}, "stop", "stop sequences must be non-empty, got ''"),
        ({"suffix": "end"}, "suffix", "suffix is not supported: GPT-2 cannot insert text"),
        ({"best_of": 1, "n": 2}, "best_of", "best_of must be >= n (2), got 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes at most 4 sequences, got 5"),
    ],
)
def test_invalid_requests_raise_bad_request(client, kwargs, param, message):
    body = {"model": "gpt2", "prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**body)
    assert err.value.status_code == 400
    assert err.value.body == {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    assert (
        err.value.body["message"] == "The model 'gpt-4' does not exist; this server serves 'gpt2'"
    )


def test_streaming_error_before_start_is_a_status_code(client):
    with pytest.raises(openai.BadRequestError):
        list(greedy(client, max_tokens=0, stream=True))


def test_streamed_choices_of_several_prompts_join_per_index(client):
    kw = {
        "model": "gpt2",
        "prompt": ["One", "Two words"],
        "n": 2,
        "max_tokens": 6,
        "temperature": 0.9,
        "seed": 5,
    }
    whole = client.completions.create(**kw)
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in client.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {i: ["length"] for i in range(4)}
