"""An error after a stream has started ends it with a final error event, on both APIs."""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.requests import ClientDisconnect

from tests.conftest import run, stream_tokens
from tests.test_engine import failing_engine
from textgen import api
from textgen.api import EventStreamResponse
from textgen.openai_api.completions import Completion
from textgen.openai_api.serving import Frontend, sse_stream
from textgen.openai_schemas import CompletionRequest
from textgen.schemas import GenerateRequest


def test_native_stream_ends_with_an_error_event(tiny_model, tokenizer):
    eng = failing_engine(tiny_model, tokenizer, fail_on_call=3)

    async def body() -> list[str]:
        response = await api.generate_stream(eng, GenerateRequest(prompt="Hello", max_new_tokens=9))
        return [chunk async for chunk in response.body_iterator]

    try:
        chunks = run(body())
    finally:
        eng.shutdown()
    events = [json.loads(c.removeprefix("data: ")) for c in chunks]
    assert len(stream_tokens(events[:-1])) == 3
    assert events[-1] == {"error": "generation failed: boom"}


def test_openai_stream_ends_with_an_error_event_then_done(tiny_model, tokenizer):
    eng = failing_engine(tiny_model, tokenizer, fail_on_call=3)

    async def body() -> list[str]:
        req = CompletionRequest(prompt="Hello", max_tokens=9, temperature=0, logprobs=0)
        c = Completion(req, Frontend.of(eng))
        return [chunk async for chunk in sse_stream(c, eng.stream(c.seqs))]

    try:
        chunks = run(body())
    finally:
        eng.shutdown()
    assert chunks[-1] == "data: [DONE]\n\n"
    error = json.loads(chunks[-2].removeprefix("data: "))
    assert error == {
        "error": {
            "message": "generation failed: boom",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    # Three tokens before the failure, in one chunk each or fewer (queued ones coalesce).
    choices = [json.loads(c.removeprefix("data: "))["choices"][0] for c in chunks[:-2]]
    assert sum(len(c["logprobs"]["tokens"]) for c in choices) == 3


def test_a_stream_whose_client_left_before_its_first_chunk_cancels_its_sequences(
    tiny_model, tokenizer
):
    """The content generator never starts, so only the response can cancel the sequences."""
    eng = failing_engine(tiny_model, tokenizer, fail_on_call=10**9)

    async def gone_at_once() -> list:
        req = CompletionRequest(prompt="Hello", max_tokens=500, temperature=0, stream=True)
        c = Completion(req, Frontend.of(eng))
        events = eng.stream(c.seqs)
        response = EventStreamResponse(sse_stream(c, events), events)

        async def receive() -> dict:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            raise OSError("client gone")

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST"}
        with contextlib.suppress(OSError, ClientDisconnect):
            await response(scope, receive, send)
        for _ in range(100):  # the engine retires them at its next step
            if all(s.status.finished for s in c.seqs):
                break
            await asyncio.sleep(0.05)
        return c.seqs

    try:
        seqs = run(gone_at_once())
    finally:
        eng.shutdown()
    assert [s.status.finish_reason for s in seqs] == ["cancelled"]
    assert len(seqs[0].output_ids) < 500
