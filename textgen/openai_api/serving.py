"""What the OpenAI routes share: the frontend, request parsing, the params of a
sequence, the bounds of a request's size, choices and their logprobs, the
generation a request becomes, and the route runner (JSON or server-sent events).

A request becomes sequences, prompt-major (`best_of` or `n` per prompt), and
each sequence one `Choice`, assembled from its events. Completions' logprobs
are OpenAI's legacy shape (tokens, token_logprobs, top_logprobs, text_offset),
with the echoed prompt's own logprobs first when `echo` is set: what evaluation
harnesses score.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from textgen import jsonbody
from textgen.api import EventStreamResponse, sse, until_disconnected
from textgen.chat import ChatTemplate
from textgen.engine import Engine, EventStream
from textgen.errors import REQUEST_ERRORS, OpenAIError, client_error, finish_error, stream_error
from textgen.openai_schemas import ChatCompletionRequest, CompletionRequest
from textgen.params import SamplingParams
from textgen.scheduler import Event, FinishEvent, PromptLogprob, Sequence, Status, TokenEvent
from textgen.text import TokenTable

logger = logging.getLogger("bentoml.textgen")

T = TypeVar("T", bound=BaseModel)
FINISH_REASONS = {
    Status.FINISHED_EOS: "stop",
    Status.FINISHED_STOP: "stop",
    Status.FINISHED_LENGTH: "length",
}
IGNORED_FIELDS_HEADER = "X-Ignored-Fields"  # unknown request fields, accepted and unused


@dataclass
class Frontend:
    """What the routes share, set once the engine is up (`attach`)."""

    engine: Engine
    tokens: TokenTable
    chat_template: ChatTemplate
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, engine: Engine) -> Frontend:
        return cls(
            engine,
            engine.tokens,
            ChatTemplate.for_server(engine.settings.chat_template, engine.tokenizer),
        )


# -- parsing ---------------------------------------------------------------------


def parse(raw: bytes, schema: type[T]) -> T:
    """The body as `schema`, or a 400 naming the field, the rule and the value."""
    try:
        body = jsonbody.loads(raw)
    except jsonbody.BodyError as exc:
        raise OpenAIError(400, str(exc), exc.param) from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        value = repr(err.get("input"))[:80]
        raise OpenAIError(400, f"{param}: {err['msg']}, got {value}", param) from None


def check_model(model: str | None, engine: Engine) -> None:
    if model is not None and model not in (engine.info.name, engine.info.tag):
        raise OpenAIError(
            404,
            f"The model {model!r} does not exist; this server serves {engine.info.name!r}",
            "model",
            code="model_not_found",
        )


def parse_logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}`: keys are decimal token ids (at most
    MAX_LOGIT_BIAS_TOKENS of them, checked by the schema)."""
    bias = bias or {}
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise OpenAIError(
                400, f"logit_bias keys must be token ids, got {key[:40]!r}", "logit_bias"
            )
        too_long = jsonbody.too_long(len(key), "logit_bias", "a token id")
        if too_long is not None:  # int() would raise
            raise OpenAIError(400, too_long, "logit_bias")
        if int(key) in out:  # "13" and "013": one token, one bias
            raise OpenAIError(400, f"logit_bias names token {int(key)} twice", "logit_bias")
        out[int(key)] = value
    return tuple(out.items())


def sampling_params(
    req: CompletionRequest | ChatCompletionRequest, max_new_tokens: int, choice: int, **extra: Any
) -> SamplingParams:
    """The params of a request's `choice`-th sequence (seeds differ per choice).
    `extra` may hold `logit_bias` already parsed (`parse_logit_bias`), else it is parsed here."""
    sampling = req.temperature > 0
    seed = None if req.seed is None or not sampling else (req.seed + choice) % 2**63
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(req.min_tokens, max_new_tokens),
        do_sample=sampling,
        temperature=req.temperature if sampling else 1.0,
        top_k=max(req.top_k, 0),
        top_p=req.top_p,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=req.stop_sequences,
        include_stop_str_in_output=req.include_stop_str_in_output,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        seed=seed,
        ignore_eos=req.ignore_eos,
        **{"logit_bias": parse_logit_bias(req.logit_bias), **extra},
    )


def check_n(engine: Engine, n: int) -> None:
    if n > engine.settings.max_n:
        raise OpenAIError(400, f"n must be <= {engine.settings.max_n}, got {n}", "n")


def check_sequences(engine: Engine, count: int, field_: str, what: str) -> None:
    """Bounds the sequences one request queues (`what` says how `count` was made): by
    TEXTGEN_MAX_SEQUENCES_PER_REQUEST, and by what the queue can ever hold (waiting plus
    running), past which a retry could never succeed: a 400 either way, never a 429."""
    s = engine.settings
    limit = s.max_sequences_per_request
    if count > limit:
        raise OpenAIError(
            400,
            f"this request makes {count} sequences ({what}); the limit is {limit} "
            f"(TEXTGEN_MAX_SEQUENCES_PER_REQUEST)",
            field_,
        )
    room = s.max_waiting + s.max_batch_size
    if count > room:
        raise OpenAIError(
            400,
            f"this request makes {count} sequences ({what}); the server queues at most "
            f"{room} (TEXTGEN_MAX_WAITING {s.max_waiting} + TEXTGEN_MAX_BATCH_SIZE "
            f"{s.max_batch_size})",
            field_,
        )


class LogprobEntries:
    """Counts the (token, logprob) pairs a request's response may carry, each position's
    chosen token and its alternatives: (echoed prompt tokens + new tokens) x (logprobs + 1)
    per sequence. `check`: past TEXTGEN_MAX_LOGPROB_ENTRIES, a 400 before anything runs."""

    def __init__(
        self,
        engine: Engine,
        logprobs: int | None,
        field_: str,
        per_position: str | None = None,
        sequences: str = "",
    ) -> None:
        """`per_position` says what (logprobs + 1) counts, by default `field_` and its
        value; `sequences`, after "summed over its sequences", which sequences count."""
        self.limit = engine.settings.max_logprob_entries
        self.logprobs, self.field = logprobs, field_
        self.per_position = per_position or f"{field_} {logprobs} + 1"
        self.sequences = sequences
        self.total = 0

    def add(self, positions: int, sequences: int = 1) -> None:
        if self.logprobs is not None:
            self.total += positions * sequences * (self.logprobs + 1)

    def check(self) -> None:
        if self.total > self.limit:
            raise OpenAIError(
                400,
                f"this request asks for {self.total} logprob entries ((echoed prompt tokens + "
                f"new tokens) x ({self.per_position}), summed over its sequences"
                f"{self.sequences}); the limit is {self.limit} (TEXTGEN_MAX_LOGPROB_ENTRIES)",
                self.field,
            )


# -- choices ----------------------------------------------------------------------


@dataclass
class Choice:
    """One sequence's answer being assembled: text, logprobs, finish reason."""

    index: int
    prefix: str = ""  # the echoed prompt, else ''
    text: str = ""  # the generated text: set by `collect` (non-streaming) at the finish
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top: list[tuple[tuple[int, float], ...] | None] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0  # of the generated tokens: how best_of ranks
    generated: int = 0  # tokens received so far (the engine may be ahead of them)
    finish_reason: str | None = None
    started: bool = False  # whether its sequence's first event was read
    # Characters of the generated tokens decoded so far, whatever the stop matcher holds
    # back: where the next token's text starts (`text_offset`).
    chars: int = 0
    utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def add_prompt(self, ids: list[int], logprobs: list[PromptLogprob], tokens: TokenTable) -> None:
        """Records the echoed prompt's tokens, before any generated one."""
        for token_id, offset, entry in zip(ids, tokens.offsets(ids), logprobs, strict=True):
            self.token_ids.append(token_id)
            self.offsets.append(offset)
            self.token_logprobs.append(None if entry is None else entry[0])
            self.top.append(None if entry is None else entry[1])

    def add(self, event: TokenEvent, tokens: TokenTable) -> None:
        self.token_ids.append(event.token_id)
        self.offsets.append(len(self.prefix) + self.chars)
        self.chars += len(self.utf8.decode(tokens.visible[event.token_id]))
        self.token_logprobs.append(event.logprob)
        self.top.append(event.top_logprobs)
        self.cumulative_logprob += event.logprob or 0.0
        self.generated += 1

    def completion_logprobs(
        self, tokens: TokenTable, start: int = 0, end_of_text: int | None = None
    ) -> dict[str, Any]:
        """OpenAI's legacy shape over entries `start:`; each top dict holds the chosen token.
        Offsets past `end_of_text` (tokens after a stop sequence's start) are clamped to it."""
        strings = tokens.strings
        top_logprobs: list[dict[str, float] | None] = []
        for i in range(start, len(self.token_ids)):
            top, chosen = self.top[i], self.token_logprobs[i]
            if top is None or chosen is None:
                top_logprobs.append(None)
                continue
            entry = {strings[t]: lp for t, lp in top}
            entry.setdefault(strings[self.token_ids[i]], chosen)
            top_logprobs.append(entry)
        return {
            "tokens": [strings[t] for t in self.token_ids[start:]],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": top_logprobs,
            "text_offset": [
                o if end_of_text is None else min(o, end_of_text) for o in self.offsets[start:]
            ],
        }

    def chat_logprobs(self, tokens: TokenTable, start: int = 0) -> dict[str, Any]:
        """OpenAI's chat shape: token, logprob, bytes and the top alternatives."""

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            return {
                "token": tokens.strings[token_id],
                "logprob": logprob,
                "bytes": list(tokens.bytes[token_id]),
            }

        content = []
        for i in range(start, len(self.token_ids)):
            entry = item(self.token_ids[i], self.token_logprobs[i] or 0.0)
            entry["top_logprobs"] = [item(t, lp) for t, lp in self.top[i] or ()]
            content.append(entry)
        return {"content": content}


def finish_reason_of(event: FinishEvent) -> str:
    """OpenAI's finish reason of a sequence's end; OpenAIError for an end that is an error."""
    failure = finish_error(event)
    if failure is not None:
        raise failure
    if event.status not in FINISH_REASONS:  # cancelled: OpenAI has no reason that names it
        raise OpenAIError(
            500, event.error or f"generation ended: {event.status.value}", type_="server_error"
        )
    return FINISH_REASONS[event.status]


class Generation:
    """The sequences of one request and their choices; subclasses shape the wire."""

    object_name = ""
    id_prefix = ""

    def __init__(self, req: CompletionRequest | ChatCompletionRequest, frontend: Frontend) -> None:
        self.req, self.frontend, self.engine = req, frontend, frontend.engine
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seqs: list[Sequence] = []
        self.choices: list[Choice] = []
        self.prompt_tokens = 0
        self.prompt_seqs: list[Sequence] = []  # the first sequence of each prompt

    def usage(self) -> dict[str, Any]:
        """Tokens of the events read so far: in a stream, up to the chunk it rides on.
        `cached_tokens`: prompt tokens taken from the prefix cache, counted once per
        prompt as `prompt_tokens` is (its first sequence's, known once it is admitted)."""
        completion = sum(ch.generated for ch in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {
                "cached_tokens": sum(seq.cached_tokens for seq in self.prompt_seqs)
            },
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.engine.info.name,
            "choices": choices,
            **extra,
        }

    async def collect(self, events: EventStream) -> bool:
        """Reads every event into the choices; True once all sequences finished."""
        async for i, event in events:
            self.start(i, event)
            if isinstance(event, TokenEvent):
                self.choices[i].add(event, self.frontend.tokens)
            else:  # its text: the concatenation of its TokenEvents' texts
                self.choices[i].finish_reason = finish_reason_of(event)
                self.choices[i].text = event.text
        return True

    def start(self, i: int, event: Event) -> bool:
        """Called at each event of sequence i; True (once) at its first."""
        ch = self.choices[i]
        if ch.started:
            return False
        ch.started = True
        return True

    def body(self) -> dict[str, Any]:
        """The whole response, once `collect` has read every event."""
        raise NotImplementedError

    def stream(self, events: EventStream) -> AsyncGenerator[str, None]:
        """The response as server-sent events, read from `events` as they come."""
        raise NotImplementedError


# -- routes -----------------------------------------------------------------------


async def answer(handle: Callable[[], Awaitable[Response]]) -> Response:
    """Runs a route, turning every error a request can cause into OpenAI's shape."""
    try:
        return await handle()
    except REQUEST_ERRORS as exc:
        return client_error(exc).response()


async def serve_generation(
    request: Request,
    schema: type[Any],
    build: Callable[[Any, Frontend, Request], Awaitable[Generation]],
) -> Response:
    async def handle() -> Response:
        frontend: Frontend = request.app.state.frontend
        req = parse(await request.body(), schema)
        check_model(req.model, frontend.engine)
        headers = {}
        if req.ignored_fields:
            ignored = header_safe(", ".join(req.ignored_fields))
            logger.warning("%s: ignored unknown fields: %s", request.url.path, ignored)
            headers[IGNORED_FIELDS_HEADER] = ignored
        work = await build(req, frontend, request)
        events = frontend.engine.stream(work.seqs, request.url.path, final_only=not req.stream)
        if req.stream:
            return EventStreamResponse(sse_stream(work, events), events, headers=headers)
        try:
            done = await until_disconnected(request, work.collect(events))
        finally:
            await events.aclose()  # cancels the sequences that did not finish
        if done is None:  # the client went away
            return Response(status_code=499)
        # Off the event loop: a scoring response holds up to TEXTGEN_MAX_LOGPROB_ENTRIES
        # entries, and building and encoding it there would hold up every other request
        # and the health probes meanwhile.
        return await asyncio.to_thread(lambda: ChoicewiseJSONResponse(work.body(), headers=headers))

    return await answer(handle)


class ChoicewiseJSONResponse(JSONResponse):
    """JSONResponse's bytes, its `choices` encoded one at a time: json's C encoder holds
    the GIL for a whole call, so a single call over a large body would stop the event
    loop's thread however it was started; between choices that thread may run."""

    def render(self, content: Any) -> bytes:
        choices = content.get("choices") if isinstance(content, dict) else None
        if not isinstance(choices, list) or not choices:
            return super().render(content)
        head = super().render({**content, "choices": []})  # no client text outside choices
        parts = b",".join(JSONResponse.render(self, c) for c in choices)
        return head.replace(b'"choices":[]', b'"choices":[' + parts + b"]", 1)


def header_safe(text: str, limit: int = 1024) -> str:
    """Printable ASCII (escapes for the rest: no header or log line injection), bounded."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


async def sse_stream(work: Generation, events: EventStream) -> AsyncGenerator[str, None]:
    """The generation's events, then `[DONE]`; an error after the start ends it as an event."""
    try:
        async for message in work.stream(events):
            yield message
    except OpenAIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # after the stream started: a final error event, then [DONE]
        yield sse(stream_error(exc).body())
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
