"""A real `bentoml serve` with the tiny model, through the SDK client and raw HTTP."""

from __future__ import annotations

import json

import bentoml
import httpx
import pytest

from tests.conftest import hf_greedy, load_stored_model, stream_tokens

PROMPT = "Artificial Intelligence is a"


@pytest.fixture(scope="module")
def stored_model(model_store):
    """The served weights, loaded directly from the store entry."""
    return load_stored_model(*model_store)


def post(server, route, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60, **kw)


def sse_events(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.text.split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: ") :]) for line in lines]


def test_sdk_client_greedy_generation_is_exactly_the_models(server, stored_model, tokenizer):
    with bentoml.SyncHTTPClient(server.url) as client:
        result = client.generate(prompt=PROMPT, max_new_tokens=20)
    ids = tokenizer(PROMPT).input_ids
    expected = tokenizer.decode(hf_greedy(stored_model, ids, 20))
    assert result == {
        "input": PROMPT,
        "generated": expected,
        "finish_reason": "length",
        "usage": {"prompt_tokens": len(ids), "completion_tokens": 20},
        "seed": None,
    }


def test_return_full_text_prepends_the_prompt(server):
    short = post(server, "/generate", {"prompt": PROMPT, "max_new_tokens": 5}).json()
    full = post(
        server, "/generate", {"prompt": PROMPT, "max_new_tokens": 5, "return_full_text": True}
    ).json()
    assert full["generated"] == PROMPT + short["generated"]


def test_seeded_sampling_repeats_and_reports_the_seed(server):
    body = {"prompt": PROMPT, "max_new_tokens": 12, "do_sample": True, "seed": 7, "top_p": 0.9}
    first, second = (post(server, "/generate", body).json() for _ in range(2))
    assert first == second and first["seed"] == 7
    unseeded = post(server, "/generate", {**body, "seed": None}).json()
    assert isinstance(unseeded["seed"], int)


def test_stream_events_join_to_the_non_streaming_text(server):
    body = {"prompt": PROMPT, "max_new_tokens": 16}
    whole = post(server, "/generate", body).json()
    response = post(server, "/generate_stream", body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    tokens, final = stream_tokens(events[:-1]), events[-1]
    assert all(set(e) in ({"token"}, {"tokens"}) for e in events[:-1])
    assert len(tokens) == 16 and all(set(t) == {"id", "text"} for t in tokens)
    assert "".join(t["text"] for t in tokens) == whole["generated"]
    assert final == {
        "finish_reason": "length",
        "generated_text": whole["generated"],
        "usage": whole["usage"],
    }


def test_stop_sequence_over_http(server):
    full = post(server, "/generate", {"prompt": PROMPT, "max_new_tokens": 20}).json()["generated"]
    stop = full[8:12]
    body = {"prompt": PROMPT, "max_new_tokens": 20, "stop": [stop]}
    stopped = post(server, "/generate", body).json()
    assert stopped["finish_reason"] == "stop"
    assert stopped["generated"] == full[: full.index(stop)]
    events = sse_events(post(server, "/generate_stream", body))
    assert "".join(t["text"] for t in stream_tokens(events[:-1])) == stopped["generated"]
    assert events[-1]["finish_reason"] == "stop"


def test_the_seed_tutorial_route_still_works(server):
    response = post(server, "/text-generation/generate", {"text": PROMPT})
    assert response.status_code == 200
    generated = post(server, "/generate", {"prompt": PROMPT}).json()["generated"]
    assert response.json() == {"input": PROMPT, "generated": generated}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({}, "prompt", "prompt: Field required, got {}"),
        ({"prompt": ""}, "prompt", "prompt: String should have at least 1 character, got ''"),
        ({"prompt": 5}, "prompt", "prompt: Input should be a valid string, got 5"),
        (
            {"prompt": "a", "max_new_tokens": 0},
            "max_new_tokens",
            "max_new_tokens: Input should be greater than or equal to 1, got 0",
        ),
        (
            {"prompt": "a", "temperature": -1},
            "temperature",
            "temperature: Input should be greater than 0, got -1",
        ),
        (
            {"prompt": "a", "top_p": 1.5},
            "top_p",
            "top_p: Input should be less than or equal to 1, got 1.5",
        ),
        (
            {"prompt": "a", "top_k": 0},
            "top_k",
            "top_k: Input should be greater than or equal to 1, got 0",
        ),
        (
            {"prompt": "a", "repetition_penalty": 0},
            "repetition_penalty",
            "repetition_penalty: Input should be greater than 0, got 0",
        ),
        (
            {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]},
            "stop",
            "stop: List should have at most 4 items after validation, not 5, "
            "got ['1', '2', '3', '4', '5']",
        ),
        (
            {"prompt": "a", "seed": -1},
            "seed",
            "seed: Input should be greater than or equal to 0, got -1",
        ),
        ({"prompt": "a", "bogus": 1}, "bogus", "bogus: Extra inputs are not permitted, got 1"),
    ],
)
def test_invalid_fields_get_400_naming_field_and_value(server, body, field, message):
    response = post(server, "/generate", body)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert [d["loc"] for d in detail] == [[field]]
    assert detail[0]["msg"] == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"prompt": "hello" + " hello" * 999, "max_new_tokens": 100},
            "prompt has 1000 tokens and max_new_tokens is 100: "
            "1100 exceeds the model's context of 1024 tokens",
        ),
        (
            {"prompt": "a", "min_new_tokens": 9, "max_new_tokens": 3},
            "min_new_tokens must be between 0 and max_new_tokens (3), got 9",
        ),
        ({"prompt": "a", "stop": [""]}, "stop sequences must be non-empty, got ''"),
    ],
)
def test_engine_rules_get_400_with_the_same_shape(server, body, message):
    for route in ("/generate", "/generate_stream"):
        response = post(server, route, body)
        assert response.status_code == 400
        assert response.json()["error"] == message


def test_malformed_json_is_a_400(server):
    response = httpx.post(
        f"{server.url}/generate",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400


def test_no_tracing_span_per_streamed_token_or_received_message():
    # OpenTelemetry's ASGI middleware opens a span for every `send` (one per streamed
    # token) and every `receive` (the body, and each request's wait for a disconnect).
    from textgen.bento import TextgenService

    @bentoml.service(service_class=TextgenService)
    class Probe:
        @bentoml.api
        def ping(self) -> str:
            return "ok"

    node = Probe.to_asgi().app.build_middleware_stack()
    found = []
    while node is not None:
        if type(node).__name__ == "OpenTelemetryMiddleware":
            found.append((node.exclude_send_span, node.exclude_receive_span))
        node = getattr(node, "app", None)
    assert found == [(True, True)]  # (no send spans, no receive spans)
