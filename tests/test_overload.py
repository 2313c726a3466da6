"""Overload at the HTTP edge: every request is answered, none is dropped.

Through real `bentoml serve` processes: a request on a kept-alive connection that
races the server's keep-alive timeout, an idle connection kept longer than client pools
keep theirs, and a scaled-down `bench/overload.py` (a closed loop past the limits and an
open-loop burst) in which every request gets a 200 or a 429 with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import collections
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import Server, served

SHORT_KEEP_ALIVE_S = 2


@pytest.fixture(scope="module")
def tight(model_store, tmp_path_factory) -> Iterator[Server]:
    """A server with a short keep-alive and small limits, so overload comes quickly."""
    yield from served(
        model_store,
        tmp_path_factory,
        "tight",
        TEXTGEN_KEEP_ALIVE_SECONDS=str(SHORT_KEEP_ALIVE_S),
        TEXTGEN_MAX_BATCH_SIZE="4",
        TEXTGEN_MAX_WAITING="8",
        TEXTGEN_MAX_CONCURRENCY="24",
        TEXTGEN_MAX_MODEL_LEN="64",
    )


def worker_process(server: Server) -> psutil.Process:
    """The uvicorn worker under `bentoml serve`: it holds the connections."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    workers = [p for p in children if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in children]
    return workers[0]


GENERATE = {"prompt": "Hello there", "max_new_tokens": 2}


def test_request_racing_the_keep_alive_timeout_is_answered(tight: Server) -> None:
    """The request arrives as the keep-alive timer fires: it is served, not reset.

    The worker is stopped across its keep-alive deadline while the client, whose pool keeps
    idle connections longer (as urllib3's and aiohttp's do), sends its next request on
    the pooled connection; when the worker resumes, its timer is due with the request
    already in the socket's buffer, the moment a busy event loop meets under load.
    """
    worker = worker_process(tight)
    limits = httpx.Limits(max_connections=1, keepalive_expiry=600)
    with httpx.Client(base_url=tight.url, timeout=60, limits=limits) as client:
        first = client.post("/generate", json=GENERATE)
        assert first.status_code == 200, first.text
        answered = time.monotonic()
        time.sleep(SHORT_KEEP_ALIVE_S / 2)
        outcome: dict[str, object] = {}

        def second() -> None:
            try:
                outcome["response"] = client.post("/generate", json=GENERATE)
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        worker.send_signal(signal.SIGSTOP)
        try:
            # Past the deadline (and past uvicorn's own 5 s default): the timer is due.
            time.sleep(max(0.0, answered + 6 - time.monotonic()))
            sender = threading.Thread(target=second)
            sender.start()
            time.sleep(0.5)  # the request is in the stopped worker's socket buffer
        finally:
            worker.send_signal(signal.SIGCONT)
        sender.join(60)
    assert "error" not in outcome, f"the request was dropped: {outcome['error']!r}"
    response = outcome["response"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2}


def test_idle_connection_outlives_client_pool_expiry(server: Server) -> None:
    """An idle connection stays open past httpx's 5 s pool expiry (the openai client's too):
    such clients drop an idle connection before the server closes it, never racing it."""
    host, port = server.url.removeprefix("http://").split(":")
    request = (f"GET /livez HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        assert _response(sock).startswith(b"HTTP/1.1 200 ")
        readable, _, _ = select.select([sock], [], [], 7.0)  # a FIN would make it readable
        assert readable == [], "the server closed an idle connection within 7 s"
        sock.sendall(request)
        assert _response(sock).startswith(b"HTTP/1.1 200 ")


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length (its head and body may come in
    separate segments: a part left unread would make the socket readable)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def test_overload_is_answered_never_dropped(tight: Server) -> None:
    """bench/overload.py scaled down: a closed loop of clients past every limit, then an
    open-loop burst; each request gets a 200 or a 429 with Retry-After, none is dropped,
    and the server is ready afterwards."""
    from bench.overload import burst, closed_loop

    async def go() -> list:
        loop = await closed_loop(tight.url, clients=48, requests=150, new_tokens=4)
        spike = await burst(tight.url, count=200, seconds=0.5, new_tokens=4)
        return [loop, spike]

    for phase in asyncio.run(go()):
        answers = collections.Counter(o.status for o in phase.outcomes)
        assert set(answers) <= {200, 429}, (phase.name, answers, phase.outcomes[:3])
        assert answers[429] > 0, (phase.name, answers)  # the limits were passed
        assert all(o.retry_after for o in phase.outcomes if o.status == 429)
        assert not [o for o in phase.outcomes if o.detail], phase.name
    assert httpx.get(f"{tight.url}/readyz", timeout=30).status_code == 200
    refused = httpx.post(f"{tight.url}/generate", json=GENERATE)  # answered again, too
    assert refused.status_code == 200, refused.text
