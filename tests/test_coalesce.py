"""Streams coalesce under load: tokens queued for a slow reader go out in one SSE event.

Through a real server: a client that reads nothing until generation ends (its socket's
buffers fill, the server's writes block) gets fewer events than tokens, with the same
text and one logprobs entry per token; a client that keeps up gets one event per token.
In-process: the engine's queued events become one `/generate_stream` event.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import h11
import httpx

from tests.conftest import Server, run
from textgen import api, coalesce
from textgen.engine import Engine, EventStream
from textgen.params import SamplingParams
from textgen.scheduler import Event, FinishEvent, Scheduler, Sequence, Status, TokenEvent
from textgen.schemas import GenerateRequest

PROMPT = "The quick brown fox"


def slow_read(url: str, path: str, body: dict, pause_s: float) -> list[dict]:
    """POSTs `body`, reads nothing for `pause_s` (a small receive buffer, so the server's
    writes block), then reads the whole event stream; returns its events' payloads."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.settimeout(60)
        sock.connect((host, int(port)))
        request = h11.Request(
            method="POST",
            target=path,
            headers=[
                ("Host", f"{host}:{port}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
                ("Connection", "close"),
            ],
        )
        sock.sendall(conn.send(request) + conn.send(h11.Data(data=payload)))
        sock.sendall(conn.send(h11.EndOfMessage()))
        time.sleep(pause_s)
        body_bytes = b""
        status = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body_bytes += bytes(event.data)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    assert status == 200, body_bytes[:500]
    return parse_sse(body_bytes.decode())


def parse_sse(text: str) -> list[dict]:
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
    assert events[-1] == "[DONE]" or not events[-1].startswith("["), events[-1]
    return [json.loads(e) for e in events if e != "[DONE]"]


def completion_body(**extra: object) -> dict:
    return {"model": "gpt2", "prompt": PROMPT, "temperature": 0, **extra}


def test_slow_reader_gets_tokens_coalesced_with_the_same_text(server: Server) -> None:
    max_tokens = 400
    whole = httpx.post(
        f"{server.url}/v1/completions", json=completion_body(max_tokens=max_tokens), timeout=120
    )
    assert whole.status_code == 200, whole.text
    expected = whole.json()["choices"][0]["text"]
    assert whole.json()["usage"]["completion_tokens"] == max_tokens
    body = completion_body(max_tokens=max_tokens, stream=True, logprobs=20)
    chunks = slow_read(server.url, "/v1/completions", body, pause_s=5)
    choices = [c["choices"][0] for c in chunks]
    with_tokens = [c for c in choices if c["logprobs"]]  # every token's chunk has its entry
    assert len(with_tokens) < max_tokens, "a slow reader got one event per token"
    assert max(len(c["logprobs"]["tokens"]) for c in with_tokens) > 1
    assert "".join(c["text"] for c in choices) == expected
    entries = [t for c in with_tokens for t in c["logprobs"]["tokens"]]
    assert len(entries) == max_tokens
    assert all(
        len(c["logprobs"]["tokens"]) == len(c["logprobs"]["top_logprobs"])
        for c in choices
        if c["logprobs"]
    )
    assert choices[-1]["finish_reason"] == "length"


def test_reader_keeping_up_gets_one_event_per_token(paced: Server) -> None:
    server = paced
    body = completion_body(max_tokens=12, stream=True, logprobs=1)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = parse_sse(r.read().decode())
    choices = [c["choices"][0] for c in chunks]
    assert [len(c["logprobs"]["tokens"]) for c in choices[:-1]] == [1] * 12
    assert choices[-1]["finish_reason"] == "length"
    texts = [c["text"] for c in choices]
    whole = httpx.post(f"{server.url}/v1/completions", json=completion_body(max_tokens=12))
    assert "".join(texts) == whole.json()["choices"][0]["text"]
    stream_body = {"prompt": PROMPT, "max_new_tokens": 12}
    with httpx.stream("POST", f"{server.url}/generate_stream", json=stream_body) as r:
        events = parse_sse(r.read().decode())
    assert [set(e) for e in events[:-1]] == [{"token"}] * 12
    assert "".join(e["token"]["text"] for e in events[:-1]) == events[-1]["generated_text"]


def test_generate_stream_events_queued_together_become_one(engine: Engine) -> None:
    async def go() -> list[dict]:
        request = GenerateRequest(prompt=PROMPT, max_new_tokens=10)
        seq = await api.new_sequence(engine, request)
        events = engine.stream([seq], "/generate_stream")
        await asyncio.sleep(2)  # the engine finishes; every event waits in the queue
        return [
            json.loads(e.removeprefix("data: "))
            async for e in api._sse_events(events, request, seq)
        ]

    first, final = run(go())
    assert list(first) == ["tokens"] and len(first["tokens"]) == 10
    assert "".join(t["text"] for t in first["tokens"]) == final["generated_text"]
    assert final["usage"]["completion_tokens"] == 10


def queued(items: list[tuple[int, Event]], sequences: int = 2) -> EventStream:
    """The engine's EventStream over `items`, already queued, for `sequences` sequences."""
    seqs = [Sequence([1], SamplingParams()) for _ in range(sequences)]
    queue: asyncio.Queue = asyncio.Queue()
    for i, event in items:
        queue.put_nowait((seqs[i].request_id, event))
    return EventStream(Scheduler(1, 1), seqs, queue)


def test_runs_keep_each_sequence_in_order() -> None:
    def token(n: int) -> TokenEvent:
        return TokenEvent(n, str(n))

    finish = FinishEvent(Status.FINISHED_LENGTH, "", 1, 2)
    items = [(0, token(1)), (1, token(2)), (0, token(3)), (0, finish), (1, token(4)), (1, finish)]

    async def go() -> list[tuple[int, list]]:
        runs = coalesce.runs(queued(items))
        return [(i, [getattr(e, "token_id", "end") for e in group]) async for i, group in runs]

    assert run(go()) == [(0, [1, 3]), (0, ["end"]), (1, [2, 4]), (1, ["end"])]


def test_nothing_ready_takes_nothing() -> None:
    """A look that finds the queue empty takes nothing: the next event still arrives."""
    finish = FinishEvent(Status.FINISHED_LENGTH, "x", 1, 1)

    async def go() -> list:
        events = queued([], sequences=1)
        assert events.ready() == []
        events._queue.put_nowait((events._seqs[0].request_id, TokenEvent(7, "x")))
        events._queue.put_nowait((events._seqs[0].request_id, finish))
        return [group async for group in coalesce.runs(events)]

    assert run(go()) == [(0, [TokenEvent(7, "x")]), (0, [finish])]
