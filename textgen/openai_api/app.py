"""The two Starlette apps the service mounts, and their routes.

`/v1` (completions, chat completions, models; every other path under it answers
OpenAI's 404) and the server's own routes at the root (`/health`, `/version`,
`/tokenize`, `/detokenize`, `/tokenizer_info`). Errors on /v1 use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, so the official client raises
the matching exception class.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from textgen.engine import Engine
from textgen.errors import OpenAIError
from textgen.openai_api.chat import chat_completions
from textgen.openai_api.completions import completions
from textgen.openai_api.server import (
    detokenize,
    health,
    model_card,
    models,
    tokenize,
    tokenizer_info,
    version,
)
from textgen.openai_api.serving import Frontend

V1_ROUTES = {"/completions": "POST", "/chat/completions": "POST", "/models": "GET"}


def attach(engine: Engine, *apps: Starlette) -> None:
    """Gives the apps built here their engine (the service calls it once it has one)."""
    frontend = Frontend.of(engine)
    for app in apps:
        app.state.frontend = frontend


async def not_found(request: Request) -> Response:
    """Every other path under /v1: OpenAI's 404 (or 405), naming the route."""
    path = request.url.path
    route = path.removeprefix("/v1")
    if route in V1_ROUTES:
        return OpenAIError(
            405, f"{request.method} {path} is not allowed; use {V1_ROUTES[route]}"
        ).response()
    return OpenAIError(
        404, f"{request.method} {path} does not exist on this server", code="not_found"
    ).response()


def build_app() -> Starlette:
    """The app mounted at /v1; `attach` gives it its engine when the service starts."""
    return Starlette(
        routes=[
            Route("/completions", completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/models", models, methods=["GET"]),
            Route("/models/{model:path}", model_card, methods=["GET"]),
            Route(
                "/{path:path}",
                not_found,
                methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            ),
        ]
    )


def build_server_app() -> Starlette:
    """The app mounted at the root (it answers only its own paths)."""
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
        ]
    )
