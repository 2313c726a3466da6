"""Wire schemas of the native routes (`/generate`, `/generate_stream`, the seed route).

Pydantic at the HTTP edge, converted to `SamplingParams` in one place
(`GenerateRequest.to_sampling_params`). Every validation message names the
field, the rule and the value the client sent. BentoML parses bodies with
`model_validate_json`, which reads them through `jsonbody.loads` as the /v1
routes do, and at most MAX_REPORTED_ERRORS errors are reported: BentoML puts
each one in the 400's body and in its log line.
"""

from __future__ import annotations

from typing import Any, Self

from bentoml import IODescriptor
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from textgen import jsonbody
from textgen.openapi30 import OpenAPI30Schema
from textgen.params import MAX_STOP_SEQUENCES, Constraint, SamplingParams, one_constraint

EXAMPLE_PROMPT = "Artificial Intelligence is a"
MAX_REPORTED_ERRORS = 10  # validation errors listed in a 400; a last entry counts the rest


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detail(message: str, loc: tuple[str | int, ...], value: Any = None) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError("invalid_value", message), loc=loc, input=value
    )


def with_values(exc: ValidationError) -> ValidationError:
    """Re-raises pydantic's errors with messages that also name the field and the value,
    the first MAX_REPORTED_ERRORS of them."""
    details: list[InitErrorDetails] = []
    for err in exc.errors()[:MAX_REPORTED_ERRORS]:
        field = ".".join(str(part) for part in err["loc"]) or "body"
        message = f"{field}: {err['msg']}, got {_shown(err.get('input'))}"
        details.append(_detail(message, err["loc"], err.get("input")))
    if exc.error_count() > MAX_REPORTED_ERRORS:
        details.append(
            _detail(f"body: {exc.error_count()} errors; the first {len(details)} are listed", ())
        )
    return ValidationError.from_exception_data(exc.title, details)


def unknown_fields(model: type[BaseModel], unknown: list[tuple[str, Any]]) -> ValidationError:
    """The first MAX_REPORTED_ERRORS unknown fields, and how many there are: pydantic would
    make (and BentoML send and log) one error for each."""
    details = [
        _detail(f"{name}: Extra inputs are not permitted, got {_shown(value)}", (name,), value)
        for name, value in unknown[:MAX_REPORTED_ERRORS]
    ]
    details.append(
        _detail(
            f"body: {len(unknown)} unknown fields; the first {len(details)} are listed "
            f"(the fields are {', '.join(model.model_fields)})",
            (),
        )
    )
    return ValidationError.from_exception_data(model.__name__, details)


class ValueNamingModel(BaseModel):
    @model_validator(mode="wrap")
    @classmethod
    def _name_the_values(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            known = cls.model_fields
            unknown = [(key, value) for key, value in data.items() if key not in known]
            if len(unknown) > MAX_REPORTED_ERRORS:
                raise unknown_fields(cls, unknown)
        try:
            return handler(data)
        except ValidationError as exc:
            raise with_values(exc) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        """The body read by `jsonbody.loads`, then validated (BentoML's parse of a body)."""
        try:
            data = jsonbody.loads(json_data)
        except jsonbody.BodyError as exc:
            raise ValidationError.from_exception_data(
                cls.__name__, [_detail(str(exc), exc.loc)]
            ) from None
        return cls.model_validate(data, **kwargs)


class GenerateRequest(OpenAPI30Schema, ValueNamingModel, IODescriptor):
    """Body of `POST /generate` and `POST /generate_stream`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, description="Text to continue.", examples=[EXAMPLE_PROMPT])
    max_new_tokens: int = Field(50, ge=1, description="Tokens to generate at most.")
    min_new_tokens: int = Field(0, ge=0, description="EOS is suppressed until this many.")
    do_sample: bool = Field(False, description="false: greedy decoding; true: sampling.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Sample among the k most likely tokens.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    min_p: float = Field(
        0.0, ge=0, le=1, description="Drop tokens below min_p x the best one's probability."
    )
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeats.")
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        description="Stop sequences; matched on the text and not returned.",
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling.")
    return_full_text: bool = Field(False, description="Prepend the prompt to `generated`.")
    # Structured output: at most one of the three.
    json_schema: dict[str, Any] | StrictBool | None = Field(
        None,
        description="The text is JSON matching this schema (finish_reason stop: it is whole); "
        "true: any JSON value.",
        examples=[{"type": "object", "properties": {"answer": {"type": "string"}}}],
    )
    regex: str | None = Field(None, description="The text matches this regular expression.")
    choice: list[str] | None = Field(None, description="The text is one of these strings.")

    def constraint(self) -> Constraint | None:
        """The one output constraint, if any (ParamError for more than one, or a bad one)."""
        return one_constraint(
            {
                "json_schema": None
                if self.json_schema is None
                else Constraint.json_schema(self.json_schema, "json_schema"),
                "regex": None
                if self.regex is None
                else Constraint.text("regex", self.regex, "regex"),
                "choice": None if self.choice is None else Constraint.choice(self.choice, "choice"),
            }
        )

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k or 0,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            stop=tuple(self.stop),
            seed=self.seed,
            constraint=self.constraint(),
        )


class Usage(OpenAPI30Schema, BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(OpenAPI30Schema, BaseModel):
    input: str = Field(description="The prompt, as sent.")
    generated: str = Field(description="The new text (prompt + new text with return_full_text).")
    finish_reason: str = Field(description="length | stop | eos")
    usage: Usage
    seed: int | None = Field(None, description="The seed used, when sampling.")


class SeedRequest(OpenAPI30Schema, ValueNamingModel, IODescriptor):
    """The tutorial's body: `{"text": ...}`."""

    text: str = Field(min_length=1, examples=[EXAMPLE_PROMPT])


class SeedResponse(OpenAPI30Schema, BaseModel):
    input: str
    generated: str
