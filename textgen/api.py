"""Native routes' logic: wire request -> engine -> wire response or SSE events.

service.py declares the routes; this module holds what they do, so the
service file stays a table of routes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

from bentoml import Context
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from textgen.engine import Engine, EngineOverloaded
from textgen.params import ParamError, SamplingParams
from textgen.scheduler import FinishEvent, Status, TokenEvent
from textgen.schemas import GenerateRequest, GenerateResponse, Usage

T = TypeVar("T")

RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.5


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """The native routes' error body, the same shape as BentoML's validation errors."""
    detail = [{"loc": [param] if param else [], "msg": message, "type": "invalid_value"}]
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else None
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def prepare(engine: Engine, request: GenerateRequest) -> tuple[list[int], SamplingParams]:
    """Sampling params and prompt ids, or ParamError naming what is wrong."""
    params = engine.with_seed(request.to_sampling_params())
    return engine.encode(request.prompt, params.max_new_tokens), params


async def until_disconnected(request: Request | None, work: Awaitable[T]) -> T | None:
    """Awaits `work`, cancelling it if the client goes away first (returns None then)."""
    task = asyncio.ensure_future(work)
    if request is None:
        return await task
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return None
    finally:
        task.cancel()


async def generate(
    engine: Engine, request: GenerateRequest, ctx: Context, route: str = "/generate"
) -> Any:
    """POST /generate: the whole text at once.

    BentoML gives a route that takes a context the context's status code, so
    errors set it there as well as on the response.
    """

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        ctx.response.status_code = status
        return error_response(status, message, param)

    try:
        prompt_ids, params = prepare(engine, request)
    except ParamError as exc:
        return error(400, str(exc), exc.param)
    seq = engine.new_sequence(prompt_ids, params)
    try:
        final = await until_disconnected(ctx.request, _final_event(engine.stream([seq], route)))
    except EngineOverloaded as exc:
        return error(429, f"server is at capacity: {exc}; retry later")
    if final is None:
        return error(499, "client closed the request")
    if final.status is Status.FAILED:
        return error(500, final.error or "generation failed")
    generated = request.prompt + final.text if request.return_full_text else final.text
    return GenerateResponse(
        input=request.prompt,
        generated=generated,
        finish_reason=final.status.finish_reason,
        usage=Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens),
        seed=params.seed if params.do_sample else None,
    )


async def _final_event(events: AsyncIterator[tuple[int, Any]]) -> FinishEvent:
    async with aclosing(events):
        async for _, event in events:
            if isinstance(event, FinishEvent):
                return event
    raise RuntimeError("the engine ended a sequence without a finish event")


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def generate_stream(engine: Engine, request: GenerateRequest) -> Any:
    """POST /generate_stream: one SSE event per token, then a final event."""
    try:
        prompt_ids, params = prepare(engine, request)
    except ParamError as exc:
        return error_response(400, str(exc), exc.param)
    seq = engine.new_sequence(prompt_ids, params)
    events = engine.stream([seq], "/generate_stream")
    try:
        first = await anext(events)  # surfaces overload as a status code, not an event
    except EngineOverloaded as exc:
        return error_response(429, f"server is at capacity: {exc}; retry later")
    return StreamingResponse(
        _sse_events(first, events, request, params), media_type="text/event-stream"
    )


async def _sse_events(
    first: tuple[int, Any],
    events: AsyncIterator[tuple[int, Any]],
    request: GenerateRequest,
    params: SamplingParams,
) -> AsyncIterator[str]:
    """Token events then one final event; a failure becomes a final error event."""
    pending: tuple[int, Any] | None = first
    try:
        while True:
            _, event = pending if pending is not None else await anext(events)
            pending = None
            if isinstance(event, TokenEvent):
                yield sse({"token": {"id": event.token_id, "text": event.text}})
                continue
            if event.status is Status.FAILED:
                yield sse({"error": event.error or "generation failed"})
                return
            text = request.prompt + event.text if request.return_full_text else event.text
            usage = {
                "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens,
            }
            final: dict[str, Any] = {
                "finish_reason": event.status.finish_reason,
                "generated_text": text,
                "usage": usage,
            }
            if params.do_sample:
                final["seed"] = params.seed
            yield sse(final)
            return
    except Exception as exc:  # an error after the stream started ends it cleanly
        yield sse({"error": f"generation failed: {exc}"})
    finally:
        await events.aclose()
