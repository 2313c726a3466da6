"""The two error shapes clients get, with no engine (and no torch) behind them.

Native routes answer `{"error": message, "detail": [{"loc", "msg", "type"}]}`,
the shape of BentoML's own validation errors; OpenAI routes answer
`{"error": {"message", "type", "param", "code"}}`, so the official client raises
the matching exception class. The FrontDoor uses both before any route runs.
Both carry the request's `request_id` (its X-Request-Id) when one is set.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from starlette.responses import JSONResponse

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
