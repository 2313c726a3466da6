"""The errors clients get: the two shapes, and the one mapping onto them of what a
request can fail with; no engine (and no torch) behind them.

Native routes answer `{"error": message, "detail": [{"loc", "msg", "type"}]}`,
the shape of BentoML's own validation errors; OpenAI routes answer
`{"error": {"message", "type", "param", "code"}}`, so the official client raises
the matching exception class. The FrontDoor uses both before any route runs.
Both carry the request's `request_id` (its X-Request-Id) when one is set.

What a request can fail with (REQUEST_ERRORS: a ParamError, the engine's
EngineOverloaded and EngineUnavailable) and a sequence that ends FAILED become an
`OpenAIError` here, once (`client_error`, `finish_error`): its status, message and
param are what either shape carries.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from starlette.responses import JSONResponse

from textgen.params import ParamError
from textgen.scheduler import FinishEvent, Status

RETRY_AFTER_SECONDS = 1  # sent with 429 and 503: when a retry may succeed
# The X-Request-Id of the request being served; the FrontDoor sets it for each request.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def _with_request_id(body: dict[str, Any]) -> dict[str, Any]:
    request_id = REQUEST_ID.get()
    return body if request_id is None else {**body, "request_id": request_id}


def _retry_after(status: int) -> dict[str, str] | None:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else None


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """The native routes' error body, the same shape as BentoML's validation errors."""
    detail = [{"loc": [param] if param else [], "msg": message, "type": "invalid_value"}]
    return JSONResponse(
        _with_request_id({"error": message, "detail": detail}),
        status_code=status,
        headers=_retry_after(status),
    )


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.type, self.code = status, param, type_, code

    def body(self) -> dict[str, Any]:
        error = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        return _with_request_id({"error": error})

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=_retry_after(self.status))


class EngineOverloaded(Exception):
    """The admission queue is full; the client should retry later. Raised by the engine
    (textgen/engine.py), defined here so that this module needs no torch."""


class EngineUnavailable(Exception):
    """The engine is dead or wedged (the message says which); the service is unavailable.
    Raised by the engine (textgen/engine.py), defined here as EngineOverloaded is."""


# What a request can fail with before its sequences run: `client_error` maps each.
REQUEST_ERRORS = (OpenAIError, ParamError, EngineOverloaded, EngineUnavailable)


def client_error(exc: Exception) -> OpenAIError:
    """The error a client gets for one of REQUEST_ERRORS: 400 for a bad parameter, 429 while
    the engine's queue is full, 503 while the engine is dead or wedged."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ParamError):
        return OpenAIError(400, str(exc), exc.param)
    if isinstance(exc, EngineOverloaded):
        return OpenAIError(
            429,
            f"server is at capacity: {exc}; retry later",
            type_="rate_limit_error",
            code="rate_limit_exceeded",
        )
    if isinstance(exc, EngineUnavailable):
        return OpenAIError(
            503, f"the engine is unavailable: {exc}", type_="service_unavailable_error"
        )
    raise TypeError(f"not an error a request causes: {exc!r}")


def finish_error(event: FinishEvent) -> OpenAIError | None:
    """The error a sequence's end makes of its request, or None unless it FAILED: a 400
    naming the field when what the request sent failed it, else a 500."""
    if event.status is not Status.FAILED:
        return None
    message = event.error or "generation failed"
    if event.param is not None:
        return OpenAIError(400, message, event.param)
    return OpenAIError(500, message, type_="server_error")


def stream_error(exc: Exception) -> OpenAIError:
    """The error that ends a stream already started when reading its events raised."""
    return OpenAIError(500, f"generation failed: {exc}", type_="server_error")
