"""The BentoML service class: the FrontDoor around its app, an accurate OpenAPI spec.

BentoML documents its own routes only; the mounted apps' routes (/v1 and the
tokenizer, health and version routes) are added here from the same pydantic
models that parse their bodies, so schemathesis fuzzes them too.
"""

from __future__ import annotations

from typing import Any

from bentoml import Service
from bentoml._internal.service.openapi.specification import PathItem, Schema
from bentoml._internal.utils.cattr import bentoml_cattr
from pydantic import BaseModel

from textgen import keepalive
from textgen.config import Settings
from textgen.frontdoor import FrontDoor
from textgen.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from textgen.openapi30 import to_openapi30

# What a 400 really carries: BentoML documents `detail` as a string, but its
# validation errors (and ours, in the same shape) send a list of these.
INVALID_ARGUMENT = Schema(
    type="object",
    title="InvalidArgument",
    description="Bad Request",
    required=["error"],
    properties={
        "error": Schema(type="string", title="Message"),
        "detail": Schema(
            type="array",
            title="Error Detail",
            items=Schema(
                type="object",
                properties={
                    "loc": Schema(type="array", items=Schema()),  # field path
                    "msg": Schema(type="string"),  # names the field, the rule and the value
                    "type": Schema(type="string"),
                },
            ),
        ),
        "request_id": Schema(type="string", title="X-Request-Id of the request"),
    },
)


REF = "#/components/schemas/{model}"
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
OBJECT = {"type": "object"}
# One server-sent event, as schemathesis parses it: `data` holds a JSON chunk or [DONE].
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}
STREAM = {"text/event-stream": {"schema": SSE_EVENT}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    summary: str, ok: dict[str, Any], body: type[BaseModel] | None, errors: tuple[int, ...]
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "tags": [
            "OpenAI-compatible"
            if body in (CompletionRequest, ChatCompletionRequest)
            else "Service APIs"
        ],
        "responses": {"200": {"description": "OK", "content": ok}},
    }
    for status in errors:
        op["responses"][str(status)] = {"description": "Error", "content": _json(OPENAI_ERROR)}
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": _json({"$ref": REF.format(model=body.__name__)}),
        }
    return op


def mounted_paths() -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAPI 3.0 paths and component schemas of the mounted apps' routes."""
    generation = (400, 401, 404, 413, 415, 429, 503)
    paths = {
        "/v1/completions": {
            "post": _operation(
                "Completions (OpenAI)", {**_json(OBJECT), **STREAM}, CompletionRequest, generation
            )
        },
        "/v1/chat/completions": {
            "post": _operation(
                "Chat completions (OpenAI)",
                {**_json(OBJECT), **STREAM},
                ChatCompletionRequest,
                generation,
            )
        },
        "/v1/models": {"get": _operation("The served model (OpenAI)", _json(OBJECT), None, ())},
        "/v1/models/{model}": {
            "get": {
                **_operation("The served model's card (OpenAI)", _json(OBJECT), None, (404,)),
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            }
        },
        "/tokenize": {
            "post": _operation(
                "Text or chat messages to token ids (vLLM)",
                _json(OBJECT),
                TokenizeRequest,
                (400, 401, 404, 413, 415),
            )
        },
        "/detokenize": {
            "post": _operation(
                "Token ids to text (vLLM)",
                _json(OBJECT),
                DetokenizeRequest,
                (400, 401, 404, 413, 415),
            )
        },
        "/tokenizer_info": {
            "get": _operation(
                "The tokenizer's special tokens and chat template", _json(OBJECT), None, ()
            )
        },
        "/health": {
            "get": _operation("200 while the engine is healthy, else 503", _json(OBJECT), None, ())
        },
        "/version": {
            "get": _operation(
                "Versions of the service, BentoML and the model", _json(OBJECT), None, ()
            )
        },
    }
    paths["/health"]["get"]["responses"]["503"] = {
        "description": "Unhealthy",
        "content": _json(OBJECT),
    }
    schemas: dict[str, Any] = {}
    for model in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest):
        schema = to_openapi30(model.model_json_schema(ref_template=REF))
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return paths, schemas


class TextgenService(Service):
    """`@bentoml.service(service_class=TextgenService)`."""

    def to_asgi(self, is_main: bool = True) -> Any:
        app = super().to_asgi(is_main)
        # OpenTelemetry's ASGI middleware opens a span for every `send` (one per streamed
        # token) and every `receive` (the body, and the disconnect each request waits
        # for). The request's own span stays; the per-message ones go.
        for middleware in getattr(app, "user_middleware", ()):
            if getattr(middleware.cls, "__name__", "") == "OpenTelemetryMiddleware":
                middleware.kwargs["exclude_spans"] = ["send", "receive"]
        settings = Settings.from_env()
        keepalive.install(settings.keep_alive_seconds)  # before uvicorn's first connection
        return FrontDoor(app, settings)

    @property
    def openapi_spec(self) -> Any:
        spec = super().openapi_spec
        spec.components["schemas"]["InvalidArgument"] = INVALID_ARGUMENT
        paths, schemas = mounted_paths()
        for name, schema in schemas.items():
            spec.components["schemas"][name] = bentoml_cattr.structure(schema, Schema)
        for path, item in paths.items():
            spec.paths[path] = bentoml_cattr.structure(item, PathItem)
        return spec
