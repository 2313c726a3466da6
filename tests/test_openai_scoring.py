"""What evaluation harnesses and OpenAI clients need of /v1/completions, through the
official client and httpx against a real server: prompt scoring, token-id prompts,
token strings, logit_bias, stop tokens, best_of, usage in every chunk."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.conftest import KEY, load_stored_model

PROMPT = "Scoring — ünïcödé 日本語 🙂 is"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(model_store):
    return load_stored_model(*model_store)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T - 1, V): the model's log-distribution over each next prompt token, fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits[:-1].log_softmax(dim=-1)


def complete(client, **kw):
    return client.completions.create(model="gpt2", temperature=0, **kw)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_every_prompt_token_as_the_model_does(client, model, tokenizer, max_tokens):
    ids = tokenizer(PROMPT).input_ids
    result = complete(client, prompt=PROMPT, max_tokens=max_tokens, echo=True, logprobs=3)
    lp = result.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference_logprobs(model, ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        top = lp.top_logprobs[t]
        best = ref[t - 1].topk(3)
        expected = {lp.tokens[t]: lp.token_logprobs[t]}  # the chosen token is always there
        assert len(top) in (3, 4) and lp.tokens[t] in top
        for token_id, value in zip(best.indices.tolist(), best.values.tolist(), strict=True):
            key = tokenizer.decode([token_id])
            if "\ufffd" not in key:
                expected[key] = value
        for key, value in expected.items():
            assert top[key] == pytest.approx(value, abs=1e-4)
    assert result.choices[0].text.startswith(PROMPT)
    assert result.usage.prompt_tokens == len(ids)
    assert result.usage.completion_tokens == max_tokens


def test_token_strings_are_distinct_and_offsets_count_characters(client, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    result = complete(client, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    lp = result.choices[0].logprobs
    text = result.choices[0].text
    assert text == PROMPT
    fragments = [t for t in lp.tokens if t.startswith("bytes:")]
    assert fragments  # 日本語 and 🙂 are split across tokens
    for token in fragments:  # bytes:\xNN..., as OpenAI writes them
        raw = bytes.fromhex(token.removeprefix("bytes:").replace("\\x", ""))
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
    assert b"".join(
        bytes.fromhex(t.removeprefix("bytes:").replace("\\x", ""))
        if t.startswith("bytes:")
        else t.encode()
        for t in lp.tokens
    ) == PROMPT.encode("utf-8")
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token
    assert lp.text_offset == sorted(lp.text_offset) and len(lp.tokens) == len(ids)


def test_token_id_prompts_equal_text_prompts(client, tokenizer):
    prompts = ["One prompt", "and a second, longer prompt"]
    ids = [tokenizer(p).input_ids for p in prompts]
    by_text = complete(client, prompt=prompts, max_tokens=6)
    by_ids = complete(client, prompt=ids, max_tokens=6)
    one = complete(client, prompt=ids[1], max_tokens=6)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert one.choices[0].text == by_text.choices[1].text
    echoed = complete(client, prompt=ids[0], max_tokens=1, echo=True)
    assert echoed.choices[0].text.startswith(prompts[0])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (
            [[15496], [15496, 50257]],
            "prompt[1][1]: token id 50257 is not in the vocabulary (0..50256)",
        ),
        ([], "prompt must not be an empty list"),
        ([[15496], []], "prompt[1] must not be empty"),
    ],
)
def test_bad_token_id_prompts_get_400_naming_them(client, prompt, message):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, prompt=prompt, max_tokens=1)
    assert err.value.body["message"] == message
    assert err.value.body["param"].startswith("prompt")


def test_many_prompts_in_one_request_are_served(client):
    prompts = [f"Prompt number {i}" for i in range(40)]  # lm-eval's batches are 32 and more
    result = complete(client, prompt=prompts, max_tokens=2)
    assert [c.index for c in result.choices] == list(range(40))
    assert all(c.finish_reason == "length" for c in result.choices)


def test_logit_bias_forces_and_forbids_tokens(client):
    forced = complete(client, prompt="Hello", max_tokens=5, logit_bias={"13": 100})
    assert forced.choices[0].text == "....."
    free = complete(client, prompt="Hello", max_tokens=1, logprobs=0)
    first = free.choices[0].logprobs.tokens[0]
    banned_id = httpx.post(
        f"{client.base_url}".removesuffix("/v1/") + "/tokenize", json={"prompt": first}
    ).json()["tokens"]
    assert len(banned_id) == 1
    banned = complete(client, prompt="Hello", max_tokens=1, logit_bias={str(banned_id[0]): -100})
    assert banned.choices[0].text != free.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, prompt="Hello", max_tokens=1, logit_bias={"13": 101})
    assert err.value.body["message"] == (
        "logit_bias values must be in [-100, 100], got 101.0 for token 13"
    )
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, prompt="Hello", max_tokens=1, logit_bias={"60000": 1})
    assert err.value.body["message"] == "token id 60000 is not in the vocabulary (0..50256)"


def test_stop_token_ids_and_include_stop_str_in_output(client, server):
    free = complete(client, prompt="Hello", max_tokens=8, logprobs=0).choices[0]
    third = httpx.post(
        f"{server.url}/tokenize", json={"prompt": "".join(free.logprobs.tokens[:3])}
    ).json()["tokens"]
    stopped = complete(
        client, prompt="Hello", max_tokens=8, extra_body={"stop_token_ids": [third[-1]]}
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == "".join(free.logprobs.tokens[:2])
    stop = free.text[len(free.text) // 2 :][:3]
    kept = complete(
        client,
        prompt="Hello",
        max_tokens=8,
        stop=[stop],
        extra_body={"include_stop_str_in_output": True},
    ).choices[0]
    assert kept.finish_reason == "stop" and kept.text.endswith(stop)
    assert kept.text == free.text[: free.text.index(stop) + len(stop)]


def test_best_of_returns_the_most_likely_samples(client):
    kw = {"prompt": "Once", "max_tokens": 6, "temperature": 1.0, "seed": 5}
    each = client.completions.create(model="gpt2", n=4, logprobs=0, **kw).choices
    scores = [sum(c.logprobs.token_logprobs) for c in each]
    best = client.completions.create(model="gpt2", n=2, best_of=4, **kw).choices
    order = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [c.text for c in best] == [each[i].text for i in order]
    assert [c.index for c in best] == [0, 1] and best[0].logprobs is None


def test_max_tokens_null_generates_to_the_end_of_the_context(server):
    prompt = "word " * 1000
    body = {
        "model": "gpt2",
        "prompt": prompt,
        "max_tokens": None,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] == 1024
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_continuous_usage_stats_in_every_chunk(client):
    chunks = list(
        complete(
            client,
            prompt="Hi",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            logprobs=0,  # each chunk's logprobs name the tokens it carries
        )
    )
    assert all(c.usage is not None for c in chunks)
    # Each chunk counts the tokens up to and including its own (the engine runs ahead).
    # A loaded server may coalesce tokens into one chunk: count them, not the chunks.
    carried, running = [], 0
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            running += len(c.choices[0].logprobs.tokens)
        carried.append(running)
    assert [c.usage.completion_tokens for c in chunks] == carried
    assert carried[-1] == 5 and not chunks[-1].choices  # the usage chunk, after the finish
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_unknown_fields_are_accepted_and_named(server):
    body = {"prompt": "Hi", "max_tokens": 1, "frobnicate": 1, "another_one": "x"}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["x-ignored-fields"] == "another_one, frobnicate"
    assert "ignored unknown fields: another_one, frobnicate" in server.log.read_text()
    # Names no header can carry as they are (found by schemathesis: a 500) are escaped.
    body = {"prompt": "Hi", "max_tokens": 1, "\U00031706\n\tx": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["x-ignored-fields"] == "\\U00031706\\n\\tx"


def test_models_card_by_id(client):
    assert client.models.retrieve("gpt2").id == "gpt2"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"


def test_streamed_echo_logprobs_equal_the_whole_response(client):
    kw = {"prompt": PROMPT, "max_tokens": 4, "echo": True, "logprobs": 2}
    whole = complete(client, **kw).choices[0]
    tokens, logprobs, text = [], [], ""
    for chunk in complete(client, stream=True, **kw):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            logprobs += choice.logprobs.token_logprobs
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    # The second request takes the prompt from the prefix cache: the positions after it
    # are computed by the cached-prefix prefill, equal within float32 rounding.
    assert logprobs[0] is None and whole.logprobs.token_logprobs[0] is None
    assert logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_openai_routes_and_404s(server):
    for method, path, status in [
        ("GET", "/v1/chat", 404),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/completions", 405),
    ]:
        r = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert r.status_code == status
        error = r.json()["error"]
        assert path in error["message"] and error["type"] == "invalid_request_error"
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c,
        pytest.raises(openai.NotFoundError) as err,
    ):
        c.embeddings.create(model="gpt2", input="hi")
    assert err.value.body["message"] == "POST /v1/embeddings does not exist on this server"


def test_tokenizer_health_and_version_routes(server, tokenizer):
    text = "Hello 日本"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "return_token_strs": True})
    body = r.json()
    assert body["tokens"] == tokenizer(text).input_ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    assert body["token_strs"][0] == "Hello" and body["token_strs"][-1].startswith("bytes:")
    chat = httpx.post(
        f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}
    ).json()
    assert chat["tokens"] == [*tokenizer("Hi").input_ids, tokenizer.eos_token_id]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": text}
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [1, 50257]})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == (
        "tokens[1]: token id 50257 is not in the vocabulary (0..50256)"
    )
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 1024
    assert "eos_token" in info["chat_template"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    version = httpx.get(f"{server.url}/version").json()
    assert version["version"] and version["model"].startswith("gpt2:")


def test_openapi_document_has_the_openai_routes(server):
    spec = httpx.get(f"{server.url}/docs.json").json()
    for path in (
        "/v1/models/{model}",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/health",
        "/version",
    ):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionRequest"}
    fields = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "echo", "logprobs", "logit_bias", "best_of"} <= set(fields)
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_the_api_key_guards_chat_and_the_tokenizer_routes(guarded):
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        "/tokenize": {"prompt": "Hi"},
        "/detokenize": {"tokens": [1]},
    }
    for route, body in bodies.items():
        r = httpx.post(f"{guarded.url}{route}", json=body, timeout=30)
        assert r.status_code == 401, route
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{guarded.url}{route}", json=body, headers=auth, timeout=30).is_success
    for route in ("/health", "/tokenizer_info", "/version"):  # probes and metadata stay open
        assert httpx.get(f"{guarded.url}{route}", timeout=30).status_code == 200


def test_text_offsets_count_the_generated_text_while_a_stop_holds_text_back(client):
    # "a" could begin the stop "ab", so the stop matcher holds each "a" back a while.
    kw = {"prompt": "x", "max_tokens": 5, "logprobs": 0, "logit_bias": {"64": 100}}
    for stop in (None, ["ab"]):
        choice = complete(client, stop=stop, **kw).choices[0]
        assert choice.text == "aaaaa"
        assert choice.logprobs.text_offset == [0, 1, 2, 3, 4]
        echoed = complete(client, stop=stop, echo=True, **kw).choices[0]
        assert echoed.logprobs.text_offset == [0, 1, 2, 3, 4, 5]
        streamed = [
            o
            for c in complete(client, stop=stop, stream=True, **kw)
            if c.choices and c.choices[0].logprobs
            for o in c.choices[0].logprobs.text_offset
        ]
        assert streamed == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({str(i): 1 for i in range(301)}, "logit_bias takes at most 300 tokens, got 301"),
        ({"+64": 1}, "logit_bias keys must be token ids, got '+64'"),
        ({"6_4": 1}, "logit_bias keys must be token ids, got '6_4'"),
        ({" 64": 1}, "logit_bias keys must be token ids, got ' 64'"),
        ({"13": 100, "013": 100}, "logit_bias names token 13 twice"),
    ],
)
def test_logit_bias_is_bounded_and_keyed_by_token_ids(client, bias, message):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, prompt="Hi", max_tokens=1, logit_bias=bias)
    assert (err.value.body["param"], err.value.body["message"]) == ("logit_bias", message)


def test_a_full_logit_bias_costs_its_neighbours_nothing_they_can_see(client):
    bias = {str(i): -1 for i in range(300)}
    plain = complete(client, prompt="Hello", max_tokens=8).choices[0].text
    both = complete(client, prompt=["Hello", "Hello"], max_tokens=8, n=1, logit_bias=bias)
    assert both.choices[0].text == both.choices[1].text
    assert complete(client, prompt="Hello", max_tokens=8).choices[0].text == plain


def test_n_beyond_the_limit_names_n(client):
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, prompt="Hi", max_tokens=1, n=9)
    assert (err.value.body["param"], err.value.body["message"]) == ("n", "n must be <= 8, got 9")


def test_usage_in_every_chunk_only_with_include_usage(client):
    chunks = list(
        complete(
            client,
            prompt="Hi",
            max_tokens=3,
            stream=True,
            stream_options={"continuous_usage_stats": True},
        )
    )
    assert all(c.usage is None for c in chunks)


def test_every_method_on_an_unknown_v1_route_gets_openais_404(server):
    for method in ("OPTIONS", "PUT", "DELETE", "PATCH"):
        r = httpx.request(method, f"{server.url}/v1/assistants", timeout=10)
        assert r.status_code == 404, method
        assert (
            r.json()["error"]["message"] == f"{method} /v1/assistants does not exist on this server"
        )
