"""The BentoML service class: the FrontDoor around its app, an accurate OpenAPI spec."""

from __future__ import annotations

from typing import Any

from bentoml import Service
from bentoml._internal.service.openapi.specification import Schema

from textgen.config import Settings
from textgen.frontdoor import FrontDoor

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


class TextgenService(Service):
    """`@bentoml.service(service_class=TextgenService)`."""

    def to_asgi(self, is_main: bool = True) -> Any:
        return FrontDoor(super().to_asgi(is_main), Settings.from_env())

    @property
    def openapi_spec(self) -> Any:
        spec = super().openapi_spec
        spec.components["schemas"]["InvalidArgument"] = INVALID_ARGUMENT
        return spec
