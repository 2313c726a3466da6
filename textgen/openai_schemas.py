"""OpenAI's request bodies (and vLLM's extras), as pydantic models.

Unknown fields are accepted and reported back (`ignored_fields`), as vLLM logs
them. Every bound here is the wire's; bounds set by the model or the settings
(vocabulary, context, TEXTGEN_MAX_*) are checked where the engine is known.

Only a request's first validation error is reported (`openai_api.serving.parse`), so lists
stop at their first bad item (`fail_fast`) and an oversized `logit_bias` is refused
before its values are validated: otherwise a 1 MiB body of bad items builds one error
per item (and per union branch), a million Python objects on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from textgen.errors import OpenAIError
from textgen.openapi30 import OpenAPI30Schema
from textgen.params import Constraint, one_constraint

MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's limit on logit_bias entries


def _first_error_only(**constraints: Any) -> Any:
    """A list's constraints, validation stopping at its first bad item."""
    return Field(fail_fast=True, **constraints)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], _first_error_only()]
Texts = Annotated[list[str], _first_error_only()]


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    # "schema" is a BaseModel attribute; the wire name is an alias
    schema_: dict[str, Any] | StrictBool | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint.json_schema({"type": "object"}, "response_format")
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise OpenAIError(
                    400,
                    "response_format.json_schema.schema is required with type json_schema",
                    "response_format",
                )
            return Constraint.json_schema(self.json_schema.schema_, "response_format")
        return None


class _Sampling(OpenAPI30Schema, BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | Texts | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> [-100, 100]
    user: str | None = None
    # vLLM's extras
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None
    include_stop_str_in_output: bool = False
    # Structured output (at most one): OpenAI's, then vLLM's
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictBool | str | None = None  # a schema, or its JSON text
    guided_regex: str | None = None
    guided_choice: Texts | None = None
    guided_grammar: str | None = None  # Lark, or GBNF (llama.cpp's)

    @model_validator(mode="before")
    @classmethod
    def _logit_bias_size(cls, data: Any) -> Any:
        bias = data.get("logit_bias") if isinstance(data, dict) else None
        if isinstance(bias, dict) and len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise OpenAIError(  # not a ValueError: pydantic passes it on as it is
                400,
                f"logit_bias takes at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}",
                "logit_bias",
            )
        return data

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def constraint(self) -> Constraint | None:
        """The one output constraint, if any (ParamError for more than one, or a bad one)."""
        rf = self.response_format
        named = {
            "response_format": None if rf is None else rf.constraint(),
            "guided_json": None
            if self.guided_json is None
            else Constraint.json_schema(self.guided_json, "guided_json"),
            "guided_regex": None
            if self.guided_regex is None
            else Constraint.text("regex", self.guided_regex, "guided_regex"),
            "guided_choice": None
            if self.guided_choice is None
            else Constraint.choice(self.guided_choice, "guided_choice"),
            "guided_grammar": None
            if self.guided_grammar is None
            else Constraint.text("grammar", self.guided_grammar, "guided_grammar"),
        }
        return one_constraint(named)

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def usage_in_every_chunk(self) -> bool:
        """vLLM's continuous_usage_stats, which takes include_usage too."""
        options = self.stream_options
        return options is not None and options.include_usage and options.continuous_usage_stats

    @property
    def usage_at_end(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: str | Texts | TokenIds | Annotated[list[TokenIds], _first_error_only()]
    max_tokens: int | None = Field(16, ge=0)  # None: the rest of the context
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: its text, or its token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | Annotated[list[TextPart], _first_error_only()] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        """The message as a template reads it: content always a string."""
        content = self.content
        if isinstance(content, list):  # text parts, joined as vLLM joins them
            content = "\n".join(part.text for part in content)
        out = {**(self.model_extra or {}), "role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = _first_error_only(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: the rest of the context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    # vLLM's extras
    chat_template: str | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(OpenAPI30Schema, BaseModel):
    """`POST /tokenize` (vLLM's): a prompt, or chat messages through the template."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], _first_error_only()] | None = None
    add_special_tokens: bool = True  # GPT-2 adds none either way
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAPI30Schema, BaseModel):
    """`POST /detokenize` (vLLM's)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: TokenIds
