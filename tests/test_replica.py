"""What a replica behind a balancer needs: request ids, unbuffered streams, a SIGTERM drain,
and a bento that serves the model it packed."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server, stream_tokens
from textgen.config import packed_model_tag

PROMPT = "Artificial Intelligence is a"


def _log_has(server, text: str, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in server.log.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def test_client_request_id_is_echoed_and_logged(server):
    r = httpx.post(
        f"{server.url}/generate",
        json={"prompt": PROMPT, "max_new_tokens": 2},
        headers={"X-Request-Id": "client-id-42"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "client-id-42"
    assert _log_has(server, "path=/generate,") and _log_has(server, "(request_id=client-id-42)")


@pytest.mark.parametrize("sent", [None, "", "has space", "x" * 129, "bad\u00e9"])
def test_missing_or_unsafe_request_id_is_replaced_by_a_new_one(server, sent):
    headers = {} if sent is None else {"X-Request-Id": sent.encode()}
    r = httpx.get(f"{server.url}/readyz", headers=headers)
    assert r.status_code == 200
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and generated != sent
    assert int(generated, 16) >= 0  # a uuid4 in hex


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_error_bodies_carry_the_request_id(server, route):
    # The prompt and the new tokens overflow the context: the service's own 400.
    body = {"prompt": PROMPT, "max_new_tokens": 1024, "max_tokens": 1024, "model": "gpt2"}
    if route == "/generate":
        body.pop("max_tokens"), body.pop("model")
    r = httpx.post(f"{server.url}{route}", json=body, headers={"X-Request-Id": "err-7"})
    assert r.status_code == 400
    assert r.headers["x-request-id"] == "err-7"
    assert r.json()["request_id"] == "err-7"


@pytest.mark.parametrize("route", ["/generate", "/text-generation/generate"])
def test_bentoml_validation_errors_carry_the_request_id(server, route):
    body = {"prompt": PROMPT, "max_new_tokens": 0} if route == "/generate" else {"text": 3}
    r = httpx.post(f"{server.url}{route}", json=body, headers={"X-Request-Id": "val-9"})
    assert r.status_code == 400
    assert r.json()["request_id"] == "val-9"
    assert r.json()["error"]  # BentoML's own message, kept
    assert int(r.headers["content-length"]) == len(r.content)


def test_frontdoor_rejections_carry_the_request_id(server):
    r = httpx.post(
        f"{server.url}/generate",
        content=b"prompt=x",
        headers={"content-type": "text/plain", "X-Request-Id": "bad-type-1"},
    )
    assert (r.status_code, r.json()["request_id"]) == (415, "bad-type-1")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate_stream", {"prompt": PROMPT, "max_new_tokens": 3}),
        ("/v1/completions", {"model": "gpt2", "prompt": PROMPT, "max_tokens": 3, "stream": True}),
    ],
)
def test_streams_say_no_cache_and_no_buffering(server, route, body):
    with httpx.stream("POST", f"{server.url}{route}", json=body) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    assert len(r.headers["x-request-id"]) == 32
    assert len(events) >= 2  # tokens (queued ones coalesce into one event), then the end


def test_plain_responses_are_not_marked_as_streams(server):
    r = httpx.post(f"{server.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
    assert r.status_code == 200
    assert "x-accel-buffering" not in r.headers


def test_sigterm_drains_readyz_first_then_finishes_in_flight(model_store, tmp_path):
    """SIGTERM to the server (as `docker stop` sends it): /readyz turns 503 at once while
    requests are still served for TEXTGEN_DRAIN_SECONDS; a stream running across the end of
    the drain finishes whole; exit 0."""
    home, tag = model_store
    drain_s = 1.0
    srv = start_server(home, tag, tmp_path / "drain.log", TEXTGEN_DRAIN_SECONDS=str(drain_s))
    result: dict[str, object] = {}
    streaming = threading.Event()

    def long_stream() -> None:
        body = {"prompt": PROMPT, "max_new_tokens": 1000, "min_new_tokens": 1000}
        tokens, final = 0, None
        with httpx.stream("POST", f"{srv.url}/generate_stream", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "finish_reason" in event:
                    final = event
                else:  # one token, or several queued together
                    tokens += len(stream_tokens([event]))
                    streaming.set()
        result["long"] = (r.status_code, tokens, final["finish_reason"], time.monotonic())

    worker = threading.Thread(target=long_stream)
    try:
        worker.start()
        assert streaming.wait(120)  # the long stream is running
        sigterm_at = time.monotonic()
        os.kill(srv.proc.pid, signal.SIGTERM)
        ready = httpx.get(f"{srv.url}/readyz", timeout=5)
        for _ in range(20):
            if ready.status_code == 503:
                break
            time.sleep(0.05)
            ready = httpx.get(f"{srv.url}/readyz", timeout=5)
        assert (ready.status_code, ready.text) == (503, "draining")
        during = httpx.post(
            f"{srv.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 2}, timeout=30
        )
        assert during.status_code == 200  # still serving while the balancer takes it out
        worker.join(timeout=300)
        status, tokens, reason, ended_at = result["long"]
        assert (status, tokens, reason) == (200, 1000, "length")
        assert ended_at - sigterm_at > drain_s  # it ran on past the drain's end, whole
        assert srv.proc.wait(timeout=60) == 0
    finally:
        stop_server(srv)
    log = srv.log.read_text()
    assert "SIGTERM: draining" in log and "drain period over" in log


def test_packed_model_tag_reads_the_bento_manifest(tmp_path):
    assert packed_model_tag(tmp_path) is None  # no bento.yaml: not a bento
    (tmp_path / "bento.yaml").write_text(
        "entry_service: textgen\nservices:\n- name: textgen\n  models:\n  - tag: tiny-gpt2:abc123\n"
    )
    assert packed_model_tag(tmp_path) == "tiny-gpt2:abc123"
    assert packed_model_tag() is None  # this checkout is not a bento
