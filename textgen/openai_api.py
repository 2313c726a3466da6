"""OpenAI-compatible legacy completions (`/v1/completions`, `/v1/models`).

A second wire schema over the same engine: `CompletionRequest.to_sampling_params`
is its one conversion into `SamplingParams`. Errors use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` so the official client raises
the matching exception class.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from textgen.api import encode_prompt, sse, until_disconnected
from textgen.engine import Engine, EngineOverloaded, EngineUnavailable, EventStream
from textgen.errors import OpenAIError
from textgen.params import MAX_LOGPROBS, ParamError, SamplingParams
from textgen.scheduler import FinishEvent, Sequence, Status, TokenEvent

FINISH_REASONS = {
    Status.FINISHED_EOS: "stop",
    Status.FINISHED_STOP: "stop",
    Status.FINISHED_LENGTH: "length",
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions body, with vLLM's extras; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    suffix: str | None = None
    best_of: int | None = None
    # vLLM's extras
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def to_sampling_params(self, choice: int) -> SamplingParams:
        """Params of the `choice`-th sample of a prompt (seeds differ per choice)."""
        sampling = self.temperature > 0
        seed = None if self.seed is None or not sampling else (self.seed + choice) % 2**63
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            min_new_tokens=min(self.min_tokens, self.max_tokens),
            do_sample=sampling,
            temperature=self.temperature if sampling else 1.0,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop_sequences,
            seed=seed,
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


def parse_request(raw: bytes, engine: Engine) -> CompletionRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise OpenAIError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        req = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        value = repr(err.get("input"))[:80]
        raise OpenAIError(400, f"{param}: {err['msg']}, got {value}", param) from None
    _check_limits(req, engine)
    return req


def _check_limits(req: CompletionRequest, engine: Engine) -> None:
    s = engine.settings
    name = engine.info.name
    if req.model is not None and req.model not in (name, engine.info.tag):
        raise OpenAIError(
            404,
            f"The model {req.model!r} does not exist; this server serves {name!r}",
            "model",
            code="model_not_found",
        )
    if req.suffix:
        raise OpenAIError(400, "suffix is not supported: GPT-2 cannot insert text", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise OpenAIError(400, f"best_of must equal n ({req.n}) here, got {req.best_of}", "best_of")
    checks = [
        (len(req.prompts) >= 1, "prompt", "prompt must not be an empty list"),
        (
            len(req.prompts) <= s.max_prompts,
            "prompt",
            f"prompt takes at most {s.max_prompts} strings, got {len(req.prompts)}",
        ),
        (req.n <= s.max_n, "n", f"n must be <= {s.max_n}, got {req.n}"),
    ]
    for ok, param, message in checks:
        if not ok:
            raise OpenAIError(400, message, param)


@dataclass
class _Choice:
    """One choice being assembled: its text, logprobs and finish reason."""

    index: int
    prefix: str  # the prompt when echo, else ''
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: TokenEvent, engine: Engine, with_logprobs: bool) -> dict[str, Any] | None:
        """Records a token; returns its logprobs entry (the streamed shape) when asked."""
        self.text += event.text
        if not with_logprobs:
            return None
        decode = engine.tokenizer.decode
        offset = self.text_offset[-1] + len(self.tokens[-1]) if self.tokens else len(self.prefix)
        token = decode([event.token_id])
        top = {decode([i]): lp for i, lp in event.top_logprobs}
        self.tokens.append(token)
        self.token_logprobs.append(event.logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)
        return {
            "tokens": [token],
            "token_logprobs": [event.logprob],
            "top_logprobs": [top],
            "text_offset": [offset],
        }

    def logprobs(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


class _Completion:
    """Sequences of one request: prompt-major choices, as OpenAI indexes them."""

    def __init__(self, req: CompletionRequest, engine: Engine) -> None:
        self.req, self.engine = req, engine
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seqs: list[Sequence] = []
        self.choices: list[_Choice] = []
        for prompt in req.prompts:
            ids = encode_prompt(engine, prompt, req.max_tokens, budget_field="max_tokens")
            for j in range(req.n):
                self.seqs.append(engine.new_sequence(ids, req.to_sampling_params(j)))
                self.choices.append(_Choice(len(self.choices), prompt if req.echo else ""))

    def usage(self) -> dict[str, int]:
        prompt = sum(len(s.prompt_ids) for s in self.seqs[:: self.req.n])
        completion = sum(len(s.output_ids) for s in self.seqs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.engine.info.name,
            "choices": choices,
            **extra,
        }

    def finish(self, i: int, event: FinishEvent) -> str:
        if event.status not in FINISH_REASONS:
            raise OpenAIError(
                500, event.error or f"generation ended: {event.status.value}", type_="server_error"
            )
        self.choices[i].finish_reason = FINISH_REASONS[event.status]
        return self.choices[i].finish_reason


async def _complete(c: _Completion, events: EventStream) -> dict[str, Any]:
    with_logprobs = c.req.logprobs is not None
    async for i, event in events:
        if isinstance(event, TokenEvent):
            c.choices[i].add(event, c.engine, with_logprobs)
        else:
            c.finish(i, event)
    choices = [
        {
            "index": ch.index,
            "text": ch.prefix + ch.text,
            "logprobs": ch.logprobs() if with_logprobs else None,
            "finish_reason": ch.finish_reason,
        }
        for ch in c.choices
    ]
    return c.chunk(choices, usage=c.usage())


async def _stream(c: _Completion, events: EventStream) -> AsyncGenerator[str, None]:
    with_logprobs = c.req.logprobs is not None
    echoed: set[int] = set()
    try:
        async for i, event in events:
            choice: dict[str, Any] = {
                "index": i,
                "text": "",
                "logprobs": None,
                "finish_reason": None,
            }
            if i not in echoed:
                echoed.add(i)
                choice["text"] = c.choices[i].prefix
            if isinstance(event, TokenEvent):
                choice["logprobs"] = c.choices[i].add(event, c.engine, with_logprobs)
                choice["text"] += event.text
                if not choice["text"] and choice["logprobs"] is None:
                    continue
            else:
                choice["finish_reason"] = c.finish(i, event)
            yield sse(c.chunk([choice]))
        if c.req.stream_options is not None and c.req.stream_options.include_usage:
            yield sse(c.chunk([], usage=c.usage()))
    except OpenAIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # after the stream started: a final error event, then [DONE]
        yield sse(OpenAIError(500, f"generation failed: {exc}", type_="server_error").body())
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


async def completions(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    try:
        req = parse_request(await request.body(), engine)
        c = _Completion(req, engine)
        events = c.engine.stream(c.seqs, "/v1/completions")
        if req.stream:
            return StreamingResponse(_stream(c, events), media_type="text/event-stream")
        try:
            body = await until_disconnected(request, _complete(c, events))
        finally:
            await events.aclose()  # cancels the sequences that did not finish
        return JSONResponse(body) if body is not None else Response(status_code=499)
    except OpenAIError as exc:
        return exc.response()
    except ParamError as exc:
        return OpenAIError(400, str(exc), exc.param).response()
    except EngineOverloaded as exc:
        return OpenAIError(
            429,
            f"server is at capacity: {exc}; retry later",
            type_="rate_limit_error",
            code="rate_limit_exceeded",
        ).response()
    except EngineUnavailable as exc:
        return OpenAIError(
            503, f"the engine is unavailable: {exc}", type_="service_unavailable_error"
        ).response()


async def models(request: Request) -> Response:
    info = request.app.state.engine.info
    card = {
        "id": info.name,
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "textgen",
        "root": info.tag,
        "max_model_len": info.n_ctx,
        "metadata": {"random_weights": info.random_weights, "source": info.source},
    }
    return JSONResponse({"object": "list", "data": [card]})


def build_app(engine: Engine | None = None) -> Starlette:
    """The app mounted at /v1; `app.state.engine` is set when the service starts."""
    app = Starlette(
        routes=[
            Route("/completions", completions, methods=["POST"]),
            Route("/models", models, methods=["GET"]),
        ]
    )
    app.state.engine = engine
    app.state.created = int(time.time())
    return app
