"""The engine core through the doors users use: hostile numbers beside a bystander,
a broken engine behind /readyz, a cache that does not fit, clients that leave early."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from tests.conftest import KEY, launch_server, start_server, stop_server, wait_ready
from tests.test_hardening import auth, metric

PROMPT = "In a shocking finding, scientists discovered a herd of unicorns"
BYSTANDER = {"prompt": "The quick brown fox", "max_new_tokens": 40}

HOSTILE = [  # values that pass validation and once failed the whole batch
    ("/v1/completions", {"temperature": 1e-39}),
    ("/generate", {"do_sample": True, "temperature": 1e-300}),
    ("/generate", {"do_sample": True, "repetition_penalty": 1e-300}),
    ("/generate", {"repetition_penalty": 1e-300}),
    # Seeded: near-uniform over 50257 tokens, an unseeded run drew EOS after its 5th token
    # (p ~ 2e-5 a step) and ended "eos", a legitimate finish the assertion below refuses.
    ("/generate", {"do_sample": True, "temperature": 100, "min_new_tokens": 5, "seed": 7}),
    ("/generate", {"do_sample": True, "top_k": 10**9, "min_p": 1.0}),
    (
        "/v1/completions",
        {
            "temperature": 2,
            "top_p": 1e-300,
            "presence_penalty": -2,
            "frequency_penalty": 2,
            "repetition_penalty": 100,
        },
    ),
]


async def _together(url: str, route: str, extra: dict) -> tuple[httpx.Response, httpx.Response]:
    if route == "/generate":
        hostile = {"prompt": PROMPT, "max_new_tokens": 40, **extra}
    else:
        hostile = {"prompt": PROMPT, "max_tokens": 40, **extra}
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            client.post(f"{url}{route}", json=hostile),
            client.post(f"{url}/generate", json=BYSTANDER),
        )


@pytest.mark.parametrize(("route", "extra"), HOSTILE, ids=str)
def test_hostile_numbers_that_pass_validation_harm_nobody(server, route, extra):
    alone = httpx.post(f"{server.url}/generate", json=BYSTANDER, timeout=60).json()["generated"]
    hostile, bystander = asyncio.run(_together(server.url, route, extra))
    assert hostile.status_code == 200, hostile.text
    body = hostile.json()
    reason = body["finish_reason"] if route == "/generate" else body["choices"][0]["finish_reason"]
    assert reason == "length"
    assert bystander.status_code == 200 and bystander.json()["generated"] == alone


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/generate", {"temperature": 1e38}, "temperature must be in (0, 100], got 1e+38"),
        (
            "/generate",
            {"repetition_penalty": 1e3},
            "repetition_penalty must be in (0, 100], got 1000.0",
        ),
        (
            "/v1/completions",
            {"repetition_penalty": 1e3},
            "repetition_penalty must be in (0, 100], got 1000.0",
        ),
        ("/v1/completions", {"min_p": 2}, "min_p: Input should be less than or equal to 1"),
    ],
)
def test_upper_bounds_are_a_400_naming_the_field_the_limit_and_the_value(
    server, route, body, message
):
    r = httpx.post(f"{server.url}{route}", json={"prompt": PROMPT, **body}, timeout=30)
    assert r.status_code == 400
    text = r.json()["error"] if route == "/generate" else r.json()["error"]["message"]
    assert message in text


# -- a broken engine -----------------------------------------------------------------


@pytest.fixture
def faulty(model_store, tmp_path):
    servers = []

    def start(fault: str):
        home, tag = model_store
        srv = start_server(
            home,
            tag,
            tmp_path / f"{fault}.log",
            service="tests.fault_service:TextGeneration",
            failures_expected=True,
            TEXTGEN_TEST_FAULT=fault,
        )
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        stop_server(srv)


def _unavailable_everywhere(url: str, reason: str) -> None:
    """/readyz, /livez and every generation route answer 503 at once, naming `reason`."""
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 503
    assert httpx.get(f"{url}/livez", timeout=5).status_code == 503
    body = {"prompt": PROMPT, "max_new_tokens": 5}
    for route in ("/generate", "/generate_stream"):
        started = time.monotonic()
        r = httpx.post(f"{url}{route}", json=body, timeout=30)
        assert time.monotonic() - started < 2
        assert r.status_code == 503
        assert r.json()["error"] == f"the engine is unavailable: {reason}"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}, timeout=30)
    assert r.status_code == 503
    assert r.json()["error"]["message"] == f"the engine is unavailable: {reason}"
    assert r.json()["error"]["type"] == "service_unavailable_error"


def test_steps_that_always_fail_give_errors_then_503_everywhere(faulty):
    srv = faulty("decode_fails")
    url, fault = srv.url, "injected fault: the device is gone"
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    with httpx.stream("POST", f"{url}/generate_stream", json=BYSTANDER, timeout=30) as r:
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == f'data: {{"error": "generation failed: {fault}"}}'
    r = httpx.post(f"{url}/generate", json=BYSTANDER, timeout=30)
    assert (r.status_code, r.json()["error"]) == (500, f"generation failed: {fault}")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 9}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["message"] == f"generation failed: {fault}"
    _unavailable_everywhere(url, f"3 engine steps failed in a row; the last: {fault}")
    assert metric(url, "textgen_engine_step_failures_total") == 3


def test_a_dead_engine_thread_ends_in_flight_streams_and_turns_the_service_503(faulty):
    srv = faulty("thread_dies_after=3")
    url, reason = srv.url, "the engine thread died: SystemExit('injected fault')"
    with httpx.stream("POST", f"{url}/generate_stream", json=BYSTANDER, timeout=30) as r:
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line]
    # The prefill's token and two decoded ones (queued ones coalesce), then the error.
    tokens = [t for e in events[:-1] for t in e.get("tokens", [e.get("token")])]
    assert len(tokens) == 3 and all("id" in t for t in tokens)
    assert events[-1] == {"error": reason}
    _unavailable_everywhere(url, reason)


def test_a_kv_cache_that_does_not_fit_never_becomes_ready_and_says_why(model_store, tmp_path):
    # The worker refuses to start; outside a container BentoML's process manager
    # starts it again (inside one it does not), and each attempt says why.
    home, tag = model_store
    log = tmp_path / "serve.log"
    srv = launch_server(
        home, tag, log, failures_expected=True, TEXTGEN_MEMORY_UTILIZATION="0.000001"
    )
    try:
        expected = "the KV cache needs 0.03 GiB (32 slots x 1024 positions x 2 layers"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and expected not in log.read_text():
            time.sleep(0.5)
        assert expected in log.read_text()
        assert not wait_ready(srv.url, 5, exited=lambda: srv.proc.poll() is not None)
    finally:
        stop_server(srv)


# -- clients that leave before their first event -----------------------------------


def _send_and_leave(url: str, route: str, body: bytes) -> None:
    """Sends a request on a raw socket and closes it without reading a byte."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate", b'{"prompt": "Hello", "max_new_tokens": 1000, "min_new_tokens": 1000}'),
        (
            "/generate_stream",
            b'{"prompt": "Hello", "max_new_tokens": 1000, "min_new_tokens": 1000}',
        ),
        ("/v1/completions", b'{"prompt": "Hello", "max_tokens": 1000, "min_tokens": 1000}'),
        (
            "/v1/completions",
            b'{"prompt": "Hello", "max_tokens": 1000, "min_tokens": 1000, "stream": true}',
        ),
    ],
    ids=["generate", "generate_stream", "v1", "v1-stream"],
)
def test_a_client_that_leaves_before_its_first_event_frees_its_slot(guarded, route, body):
    url = guarded.url
    cancelled = metric(url, "textgen_requests_total", finish_reason="cancelled")
    finished = metric(url, "textgen_requests_total", finish_reason="length")
    _send_and_leave(url, route, body)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        metric(url, "textgen_requests_total", finish_reason="cancelled") == cancelled
        or metric(url, "textgen_running_batch_size")
    ):
        time.sleep(0.1)
    assert metric(url, "textgen_requests_total", finish_reason="cancelled") == cancelled + 1
    assert metric(url, "textgen_requests_total", finish_reason="length") == finished
    assert metric(url, "textgen_running_batch_size") == 0
    r = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 3}, headers=auth())
    assert r.status_code == 200
