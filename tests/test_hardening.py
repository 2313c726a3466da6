"""Limits, backpressure, API key, metrics, junk input, disconnects and SIGTERM, for real."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import KEY, start_server

PROMPT = "Artificial Intelligence is a"
ROUTES = [
    ("/generate", {"prompt": PROMPT, "max_new_tokens": 4}),
    ("/generate_stream", {"prompt": PROMPT, "max_new_tokens": 4}),
    ("/text-generation/generate", {"text": PROMPT}),
    ("/v1/completions", {"model": "gpt2", "prompt": PROMPT, "max_tokens": 4}),
]


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a metric from /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- API key ---------------------------------------------------------------------


@pytest.mark.parametrize(("route", "body"), ROUTES)
def test_every_generation_route_needs_the_key(guarded, route, body):
    url = f"{guarded.url}{route}"
    for headers in ({}, auth("wrong"), {"Authorization": KEY}):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        message = "missing or wrong API key: send `Authorization: Bearer <key>`"
        if route.startswith("/v1/"):
            assert r.json()["error"]["message"] == message
            assert r.json()["error"]["code"] == "invalid_api_key"
        else:
            assert r.json()["error"] == message
    assert httpx.post(url, json=body, headers=auth(), timeout=60).status_code == 200


def test_models_route_needs_the_key_too(guarded):
    assert httpx.get(f"{guarded.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{guarded.url}/v1/models", headers=auth(), timeout=10).status_code == 200


def test_health_and_metrics_stay_open(guarded):
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{guarded.url}{path}", timeout=10).status_code == 200


def test_openai_client_with_a_wrong_key_raises_authentication_error(guarded):
    wrong = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0)
    with wrong as client, pytest.raises(openai.AuthenticationError):
        client.completions.create(model="gpt2", prompt=PROMPT, max_tokens=2)
    with openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0) as client:
        assert client.completions.create(model="gpt2", prompt=PROMPT, max_tokens=2).choices


def test_the_key_is_never_logged(guarded):
    httpx.post(f"{guarded.url}/generate", json=ROUTES[0][1], headers=auth(), timeout=30)
    assert KEY not in guarded.log.read_text()


# -- limits ------------------------------------------------------------------------


def test_a_body_over_1_mib_gets_413(server):
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    for route in ("/generate", "/v1/completions"):
        r = httpx.post(
            f"{server.url}{route}",
            content=big,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 413
    r = httpx.post(
        f"{server.url}/generate",
        content=big,
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.json()["error"] == "request body exceeds the limit of 1048576 bytes"


@pytest.mark.parametrize("route", [r for r, _ in ROUTES])
def test_a_body_that_is_not_json_gets_415(server, route):
    r = httpx.post(
        f"{server.url}{route}",
        content=b"prompt=a",
        timeout=30,
        headers={"content-type": "multipart/form-data"},
    )
    assert r.status_code == 415
    message = "Content-Type must be application/json, got 'multipart/form-data'"
    body = r.json()
    assert (body["error"]["message"] if route.startswith("/v1/") else body["error"]) == message


def test_a_chunked_body_over_1_mib_gets_413(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(
        f"{server.url}/generate",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "a" * 16385}, "prompt has 16385 characters; the limit is 16384"),
        ({"prompt": "a", "max_new_tokens": 5000}, "max_new_tokens must be <= 1024, got 5000"),
        (
            {"prompt": "a", "stop": ["x" * 300]},
            "a stop sequence has at most 256 characters, got 300",
        ),
    ],
)
def test_limits_are_clear_400s(server, body, message):
    r = httpx.post(
        f"{server.url}/generate",
        content=json.dumps(body),
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"] == message


def test_lone_surrogates_are_400s(server):
    body = b'{"prompt": "\\ud800"}'
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{server.url}/generate", content=body, headers=headers, timeout=30)
    assert r.status_code == 400
    assert r.json()["detail"][0]["msg"] == (
        "prompt: Input should be a valid string, unable to parse raw data as a unicode string, "
        "got '\\ud800'"
    )
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers=headers, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "prompt is not valid Unicode: lone surrogate '\\ud800' at character 0"
    )


JUNK = [
    os.urandom(256),
    b"",
    b"null",
    b"[1, 2, 3]",
    b'"a string"',
    b'{"prompt": {"nested": true}, "max_new_tokens": "many"}',
    b'{"prompt": "a", "max_new_tokens": 99999999999999999999999999999, "max_tokens": 1e30}',
    b'{"prompt": "a", "temperature": 1e309}',
    b'{"prompt": "a", "top_p": NaN}',
    b'{"prompt": "\xff\xfe\xfd"}',
    b'{"prompt": "\\ud800", "text": "\\udfff"}',
    b'{"prompt": ["\\ud800"], "stop": "\\ud800"}',
    b'{"prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}",
    b"[" * 50000 + b"]" * 50000,
    b'{"prompt": "a", "n": -1, "logprobs": 99, "best_of": "x"}',
    b'{"prompt": [1, -2, 3]}',
    b'{"prompt": [[1], "a"]}',
    b'{"prompt": []}',
    b'{"text": 12}',
]


@pytest.mark.parametrize("route", [r for r, _ in ROUTES])
def test_junk_bodies_get_only_4xx(server, route):
    for body in JUNK:
        r = httpx.post(
            f"{server.url}{route}",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text[:200])
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


# -- backpressure --------------------------------------------------------------------


async def _burst(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=auth()) as client:

        async def one(i: int) -> httpx.Response:
            route, body = ROUTES[i % len(ROUTES)]
            return await client.post(f"{url}{route}", json=body)

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_burst_gets_only_200_and_429_and_the_server_stays_up(guarded):
    responses = asyncio.run(_burst(guarded.url, 300))
    statuses = {r.status_code for r in responses}
    assert statuses == {200, 429}
    for r in responses:
        if r.status_code != 429:
            continue
        assert r.headers["retry-after"] == "1"
        if r.request.url.path.startswith("/v1/"):
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["error"].startswith("server is at capacity")
    assert httpx.get(f"{guarded.url}/readyz", timeout=10).status_code == 200
    assert metric(guarded.url, "textgen_rejections_total", cause="overloaded") > 0
    r = httpx.post(f"{guarded.url}/generate", json=ROUTES[0][1], headers=auth(), timeout=60)
    assert r.status_code == 200


def test_abandoned_requests_free_their_rows(guarded):
    url = guarded.url
    long = {"prompt": PROMPT, "max_new_tokens": 1000, "min_new_tokens": 1000}
    cancelled_before = metric(url, "textgen_requests_total", finish_reason="cancelled")
    for _ in range(3):  # more long streams than batch rows, each dropped after a token
        with httpx.stream(
            "POST", f"{url}/generate_stream", json=long, headers=auth(), timeout=60
        ) as r:
            assert r.status_code == 200
            next(r.iter_lines())
    for _ in range(2):  # non-streaming requests whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/generate", json=long, headers=auth(), timeout=0.5)
    # Abandoned sequences leave the batch at the next step (bounded wait, not a timer).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        metric(url, "textgen_running_batch_size") or metric(url, "textgen_queue_depth")
    ):
        time.sleep(0.2)
    assert metric(url, "textgen_running_batch_size") == 0
    assert metric(url, "textgen_queue_depth") == 0
    # The streams surely ran; a request whose client left before it was submitted
    # has nothing to cancel.
    cancelled = metric(url, "textgen_requests_total", finish_reason="cancelled")
    assert cancelled_before + 3 <= cancelled <= cancelled_before + 5
    r = httpx.post(f"{url}/generate", json=ROUTES[0][1], headers=auth(), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# -- metrics -------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latency(server):
    before = metric(server.url, "textgen_requests_total", route="/generate", finish_reason="length")
    tokens_before = metric(server.url, "textgen_generated_tokens_total")
    httpx.post(f"{server.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 7}, timeout=30)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert (
        metric(server.url, "textgen_requests_total", route="/generate", finish_reason="length")
        == before + 1
    )
    assert metric(server.url, "textgen_generated_tokens_total") >= tokens_before + 7
    for name in (
        "textgen_prompt_tokens_total",
        "textgen_time_to_first_token_seconds_bucket",
        "textgen_inter_token_latency_seconds_bucket",
        "textgen_queue_depth",
        "textgen_running_batch_size",
    ):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name


# -- shutdown ------------------------------------------------------------------------


def test_sigterm_lets_a_running_generation_finish_then_exits_0(model_store, tmp_path):
    home, tag = model_store
    srv = start_server(home, tag, tmp_path / "serve.log")
    result: dict[str, object] = {}

    def long_request() -> None:
        body = {"prompt": PROMPT, "max_new_tokens": 1000, "min_new_tokens": 1000}
        r = httpx.post(f"{srv.url}/generate", json=body, timeout=120)
        result.update(status=r.status_code, tokens=r.json()["usage"]["completion_tokens"])

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.3)
    os.killpg(srv.proc.pid, signal.SIGTERM)
    worker.join(timeout=120)
    assert result == {"status": 200, "tokens": 1000}
    assert srv.proc.wait(timeout=60) == 0
