"""Pydantic writes JSON Schema 2020-12; BentoML publishes OpenAPI 3.0. This bridges the two.

Only the constructs our models use: `anyOf [X, null]` becomes X with
`nullable: true`, and numeric `exclusiveMinimum`/`exclusiveMaximum` become
3.0's boolean form beside `minimum`/`maximum`.
"""

from __future__ import annotations

from typing import Any


def to_openapi30(schema: Any) -> Any:
    """A copy of `schema` (and everything nested in it) in OpenAPI 3.0 form."""
    if isinstance(schema, list):
        return [to_openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: to_openapi30(value) for key, value in schema.items()}
    variants = out.get("anyOf")
    if isinstance(variants, list) and {"type": "null"} in variants:
        rest = [v for v in variants if v != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1:
            out = {**rest[0], **out}
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        value = out.get(exclusive)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[bound] = value
            out[exclusive] = True
    return out


class OpenAPI30Schema:
    """Mixin for pydantic models that BentoML documents: their schema in 3.0 form."""

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return to_openapi30(super().model_json_schema(*args, **kwargs))  # type: ignore[misc]
