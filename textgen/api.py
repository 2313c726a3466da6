"""Native routes' logic: wire request -> engine -> wire response or SSE events.

service.py declares the routes; this module holds what they do, so the
service file stays a table of routes. The OpenAI routes share its HTTP
plumbing: `until_disconnected`, `EventStreamResponse` and `sse`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from bentoml import Context
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from textgen import coalesce
from textgen.engine import Engine, EventStream
from textgen.errors import (
    REQUEST_ERRORS,
    client_error,
    error_response,
    finish_error,
    stream_error,
)
from textgen.scheduler import FinishEvent, Sequence, TokenEvent
from textgen.schemas import GenerateRequest, GenerateResponse, Usage
from textgen.validation import checked_sequence, encode_prompt

T = TypeVar("T")


async def new_sequence(engine: Engine, request: GenerateRequest) -> Sequence:
    """The request's sequence, or ParamError naming what is wrong (a constraint that does
    not compile, or not in time, included)."""
    params = request.to_sampling_params()
    prompt_ids = encode_prompt(engine, request.prompt, params.max_new_tokens)
    grammar = await engine.grammar(params.constraint)
    return checked_sequence(engine, prompt_ids, params, grammar)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Awaits `work`, cancelling it if the client goes away first (returns None then).

    The request's body has been read, so its next ASGI message is `http.disconnect`: one
    pending `receive` hears it, as Starlette's StreamingResponse listens, instead of a
    poll per request every so often (each poll a receive through every middleware)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() or gone.exception() is not None:  # (a receive that failed: no news)
            return await task
        return None
    finally:
        task.cancel()
        gone.cancel()
        if gone.done() and not gone.cancelled():
            gone.exception()  # retrieved: a failed receive is no news, not a logged error


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def generate(
    engine: Engine, request: GenerateRequest, ctx: Context, route: str = "/generate"
) -> GenerateResponse | JSONResponse:
    """POST /generate: the whole text at once.

    BentoML gives a route that takes a context the context's status code, so
    errors set it there as well as on the response.
    """

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        ctx.response.status_code = status
        return error_response(status, message, param)

    try:
        seq = await new_sequence(engine, request)
        events = engine.stream([seq], route, final_only=True)
    except REQUEST_ERRORS as exc:
        failure = client_error(exc)
        return error(failure.status, str(failure), failure.param)
    try:
        final = await until_disconnected(ctx.request, _final_event(events))
    finally:
        await events.aclose()  # cancels the sequence unless it finished
    if final is None:
        return error(499, "client closed the request")
    failure = finish_error(final)
    if failure is not None:
        return error(failure.status, str(failure), failure.param)
    generated = request.prompt + final.text if request.return_full_text else final.text
    return GenerateResponse(
        input=request.prompt,
        generated=generated,
        finish_reason=final.status.finish_reason,
        usage=Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens),
        seed=seq.params.sampling_seed,
    )


async def _final_event(events: EventStream) -> FinishEvent:
    async for _, event in events:
        if isinstance(event, FinishEvent):
            return event
    raise RuntimeError("the engine ended a sequence without a finish event")


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose sequences are cancelled however the response ends: also
    when the client leaves before the first chunk, where the content generator never
    starts and so never runs its own `finally`."""

    def __init__(
        self,
        content: AsyncIterator[str],
        events: EventStream,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()  # cancels only what has not finished


# json.dumps with any argument not its default builds a new encoder per call.
_JSON = json.JSONEncoder(ensure_ascii=False)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {_JSON.encode(payload)}\n\n"


async def generate_stream(
    engine: Engine, request: GenerateRequest
) -> EventStreamResponse | JSONResponse:
    """POST /generate_stream: one SSE event per token, then a final event."""
    try:
        seq = await new_sequence(engine, request)
        events = engine.stream([seq], "/generate_stream")
    except REQUEST_ERRORS as exc:
        failure = client_error(exc)
        return error_response(failure.status, str(failure), failure.param)
    return EventStreamResponse(_sse_events(events, request, seq), events)


async def _sse_events(
    events: EventStream, request: GenerateRequest, seq: Sequence
) -> AsyncIterator[str]:
    """Token events then one final event; a failure becomes a final error event.

    Tokens already queued together go out in one event (`coalesce`): `{"token": {...}}`
    for one, `{"tokens": [{...}, ...]}` for several, in order."""
    try:
        async for _, group in coalesce.runs(events):
            event = group[-1]
            if isinstance(event, TokenEvent):
                tokens = [{"id": e.token_id, "text": e.text} for e in group]  # type: ignore[union-attr]
                yield sse({"token": tokens[0]} if len(tokens) == 1 else {"tokens": tokens})
            elif (failure := finish_error(event)) is not None:
                error = {"error": str(failure)}
                yield sse({**error, "param": failure.param} if failure.param else error)
            else:
                yield sse(_final_payload(event, request, seq))
    except Exception as exc:  # an error after the stream started ends it cleanly
        yield sse({"error": str(stream_error(exc))})
    finally:
        await events.aclose()


def _final_payload(event: FinishEvent, request: GenerateRequest, seq: Sequence) -> dict[str, Any]:
    text = request.prompt + event.text if request.return_full_text else event.text
    usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
    final: dict[str, Any] = {
        "finish_reason": event.status.finish_reason,
        "generated_text": text,
        "usage": usage,
    }
    if seq.params.sampling_seed is not None:
        final["seed"] = seq.params.sampling_seed
    return final
