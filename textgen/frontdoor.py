"""The outermost layer of the HTTP app: API key, the body's size, type and deadline, the 429
shape, request ids.

BentoML puts user middlewares inside its own traffic limiter, so this wraps the
whole app instead (`TextgenService.to_asgi`): it sees every request first and
every response last, including BentoML's `traffic.max_concurrency` 429s, to
which it adds `Retry-After` and, on /v1, OpenAI's error shape. Every response
carries `X-Request-Id` (the client's, else a new one), also in the access log
line and error bodies; event streams say not to cache or buffer them; while
the replica drains after SIGTERM, /readyz answers 503.

A body is read here, whole, before BentoML's limiter admits the request, so reading it
has a deadline of its own (TEXTGEN_BODY_TIMEOUT_SECONDS): a client that stops sending
mid-body gets a 408 and its connection closed instead of holding it open. A request with
two Content-Type headers is refused: this check and BentoML's parser would each read a
different one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import PlainTextResponse

from textgen import drain, metrics
from textgen.config import Settings
from textgen.errors import REQUEST_ID, RETRY_AFTER_SECONDS, OpenAIError, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 1 << 20  # 1 MiB
# Routes behind the API key and the body checks (the tokenizer's too: they take bodies).
# Probes and metadata (/readyz, /livez, /health, /version, /tokenizer_info) stay open on
# purpose: balancers and lm-eval's remote tokenizer read them.
GENERATION_ROUTES = frozenset(
    {"/generate", "/generate_stream", "/text-generation/generate", "/tokenize", "/detokenize"}
)
REJECTION_CAUSES = {
    400: "invalid",
    401: "unauthorized",
    408: "body_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "overloaded",
}


# A client's X-Request-Id is kept only when it is this safe to log and echo.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
STREAM_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))


class RequestIdLogFilter(logging.Filter):
    """Appends `(request_id=...)` to BentoML's access log line (logged inside the FrontDoor)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not getattr(record, "request_id", None):
            record.request_id = request_id
            record.msg = f"{record.msg} (request_id=%s)"
            record.args = (*(record.args or ()), request_id)
        return True


logging.getLogger("bentoml.access").addFilter(RequestIdLogFilter())


def is_generation_route(path: str) -> bool:
    return path in GENERATION_ROUTES or path.startswith("/v1/")


def is_openai_shaped(path: str) -> bool:
    """Routes whose errors take OpenAI's shape: /v1 and vLLM's tokenizer routes."""
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


class FrontDoor:
    def __init__(
        self, app: ASGIApp, settings: Settings, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app = app
        self.api_key = settings.api_key
        self.max_body_bytes = max_body_bytes
        self.drain_seconds = settings.drain_seconds
        self.body_timeout_seconds = settings.body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            drain.install(self.drain_seconds)  # uvicorn's signal handlers are in place by now
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        try:
            await self._serve(scope, receive, _with_headers(send, request_id))
        finally:
            REQUEST_ID.reset(token)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/readyz" and drain.draining():
            return await PlainTextResponse("draining", status_code=503)(scope, receive, send)
        if not is_generation_route(scope["path"]):
            return await self.app(scope, receive, send)
        send = self._watching(send, scope, receive, is_openai_shaped(scope["path"]))
        if self.api_key is not None and not self._authorized(scope):
            return await self._reject(
                401,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                scope,
                receive,
                send,
            )
        if scope["method"] == "POST":
            content_types = _header_values(scope, b"content-type")
            if len(content_types) > 1:
                shown = ", ".join(repr(value[:80]) for value in content_types[:4])
                message = f"send one Content-Type header, got {len(content_types)}: {shown}"
                return await self._reject(400, message, scope, receive, send)
            media_type = _media_type(content_types)
            if media_type not in ("", "application/json"):
                message = f"Content-Type must be application/json, got {media_type!r}"
                return await self._reject(415, message, scope, receive, send)
            body = _Body(scope)
            try:
                async with asyncio.timeout(self.body_timeout_seconds):
                    whole = await body.read(receive, self.max_body_bytes)
            except TimeoutError:
                message = body.late(self.body_timeout_seconds)
                return await self._reject(408, message, scope, receive, send, close=True)
            if not whole:
                return await self._reject(
                    413,
                    f"request body exceeds the limit of {self.max_body_bytes} bytes",
                    scope,
                    receive,
                    send,
                )
            receive = _replay(b"".join(body.chunks), receive)
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # Constant-time: the comparison takes as long whatever prefix matches.
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            token.strip(), self.api_key.encode()
        )

    async def _reject(
        self,
        status: int,
        message: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        close: bool = False,
    ) -> None:
        """The error in the route's shape; `close`: the connection is not reused (the rest of
        its body was never read)."""
        response = _error(status, message, is_openai_shaped(scope["path"]))
        if close:
            response.headers["Connection"] = "close"
        await response(scope, receive, send)

    def _watching(self, send: Send, scope: Scope, receive: Receive, openai_route: bool) -> Send:
        """Counts rejections; gives a bare 429 (BentoML's limiter) Retry-After and our shape."""
        replaced = False

        async def watched(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the bare 429's own body is dropped
            if message["type"] == "http.response.start":
                status = message["status"]
                if status in REJECTION_CAUSES:
                    metrics.get().rejections.labels(cause=REJECTION_CAUSES[status]).inc()
                headers = dict(message.get("headers", []))
                if status == 429 and b"retry-after" not in headers:
                    replaced = True
                    response = _error(429, "server is at capacity; retry later", openai_route)
                    await response(scope, receive, send)
                    return
            await send(message)

        return watched


def _error(status: int, message: str, openai_route: bool) -> Any:
    if openai_route:
        kind = {
            401: ("invalid_request_error", "invalid_api_key"),
            429: ("rate_limit_error", "rate_limit_exceeded"),
        }.get(status, ("invalid_request_error", None))
        response = OpenAIError(status, message, type_=kind[0], code=kind[1]).response()
    else:
        response = error_response(status, message)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if status == 429:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def _request_id(scope: Scope) -> str:
    """The client's X-Request-Id when it is safe to echo and log, else a new one."""
    sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1").strip()
    return sent if REQUEST_ID_PATTERN.fullmatch(sent) else uuid.uuid4().hex


def _with_headers(send: Send, request_id: str) -> Send:
    """Adds X-Request-Id to every response and `request_id` to JSON error bodies (BentoML's
    own validation errors included), and no-cache/no-buffering to event streams."""
    encoded = request_id.encode()
    held: Message | None = None  # a JSON error's start, held until its body is whole
    chunks: list[bytes] = []

    async def sending(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            content_type = dict(headers).get(b"content-type", b"")
            added = [(b"x-request-id", encoded)]
            if content_type.startswith(b"text/event-stream"):
                added.extend(STREAM_HEADERS)
            replaced = {name for name, _ in added}
            headers = [(k, v) for k, v in headers if k.lower() not in replaced] + added
            message = {**message, "headers": headers}
            if message["status"] >= 400 and content_type.startswith(b"application/json"):
                held = message
                return
        elif message["type"] == "http.response.body" and held is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _with_request_id(b"".join(chunks), request_id)
            headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
            start = {**held, "headers": [*headers, (b"content-length", b"%d" % len(body))]}
            held = None
            await send(start)
            message = {"type": "http.response.body", "body": body, "more_body": False}
        await send(message)

    return sending


def _with_request_id(body: bytes, request_id: str) -> bytes:
    """A JSON object body with `request_id` added when missing; any other body as it was."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict) or "request_id" in parsed:
        return body
    parsed["request_id"] = request_id
    return json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()


class _Body:
    """A request body being read: its chunks so far, and its declared length."""

    def __init__(self, scope: Scope) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        declared = dict(scope["headers"]).get(b"content-length", b"")
        self.declared = int(declared) if declared.isdigit() and len(declared) < 20 else None

    async def read(self, receive: Receive, limit: int) -> bool:
        """Reads until the body ends (True) or passes `limit`, declared or actual (False)."""
        if self.declared is not None and self.declared > limit:
            return False
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return True
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size > limit:
                return False
            self.chunks.append(chunk)
            if not message.get("more_body", False):
                return True

    def late(self, timeout_seconds: float) -> str:
        """The 408's message: the deadline, its setting, and how much arrived."""
        of = "" if self.declared is None else f" of {self.declared}"
        return (
            f"the request body did not arrive within {timeout_seconds:g} s "
            f"(TEXTGEN_BODY_TIMEOUT_SECONDS): {self.size}{of} bytes received"
        )


def _header_values(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key.lower() == name]


def _media_type(content_types: list[str]) -> str:
    header = content_types[0] if content_types else ""
    return header.split(";")[0].strip().lower()


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the client's own messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
