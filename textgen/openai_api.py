"""OpenAI-compatible routes over the same engine, and vLLM's tokenizer routes.

Two Starlette apps: `/v1` (completions, chat completions, models; every other
path under it answers OpenAI's 404) and the server's own routes at the root
(`/health`, `/version`, `/tokenize`, `/detokenize`, `/tokenizer_info`). Errors
on /v1 use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, so
the official client raises the matching exception class.

A request becomes sequences, prompt-major (`best_of` or `n` per prompt), and
each sequence one `_Choice`, assembled from its events. Completions' logprobs
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
from importlib import metadata
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import textgen
from textgen import chat_sandbox, coalesce, jsonbody
from textgen.api import (
    EventStreamResponse,
    check_budget,
    prompt_ids,
    rest_of_context,
    sse,
    until_disconnected,
)
from textgen.chat import ChatTemplate, ChatTemplateError
from textgen.engine import Engine, EngineOverloaded, EngineUnavailable, EventStream
from textgen.errors import OpenAIError
from textgen.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from textgen.params import ParamError, SamplingParams
from textgen.scheduler import Event, FinishEvent, PromptLogprob, Sequence, Status, TokenEvent
from textgen.structured import Grammar
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


def attach(engine: Engine, *apps: Starlette) -> None:
    """Gives the apps built here their engine (the service calls it once it has one)."""
    frontend = Frontend.of(engine)
    for app in apps:
        app.state.frontend = frontend


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


def _check_model(model: str | None, engine: Engine) -> None:
    if model is not None and model not in (engine.info.name, engine.info.tag):
        raise OpenAIError(
            404,
            f"The model {model!r} does not exist; this server serves {engine.info.name!r}",
            "model",
            code="model_not_found",
        )


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
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


def _sampling_params(req: Any, max_new_tokens: int, choice: int, **extra: Any) -> SamplingParams:
    """The params of a request's `choice`-th sequence (seeds differ per choice).
    `extra` may hold `logit_bias` already parsed (`_logit_bias`), else it is parsed here."""
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
        **{"logit_bias": _logit_bias(req.logit_bias), **extra},
    )


def _budget(
    engine: Engine, ids: list[int], requested: int | None, field_: str, budget_field: str
) -> int:
    """New tokens for a prompt: as requested, or the rest of the context for None."""
    if requested is None:
        room = rest_of_context(engine, len(ids))
        if room == 0:
            raise ParamError(
                field_,
                f"{field_} has {len(ids)} tokens: no room left to generate in the model's "
                f"context of {engine.max_model_len} tokens",
            )
        return room
    check_budget(engine, len(ids), requested, field_, budget_field)
    return requested


def _check_n(engine: Engine, n: int) -> None:
    if n > engine.settings.max_n:
        raise OpenAIError(400, f"n must be <= {engine.settings.max_n}, got {n}", "n")


def _check_sequences(engine: Engine, count: int, field_: str, what: str) -> None:
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


class _LogprobEntries:
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
class _Choice:
    """One sequence's answer being assembled: text, logprobs, finish reason."""

    index: int
    prefix: str = ""  # the echoed prompt, else ''
    text: str = ""
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
        self.text += event.text
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


def _finish_reason(event: FinishEvent) -> str:
    if event.status is Status.FAILED and event.param is not None:  # the request's own doing
        raise OpenAIError(400, event.error or "generation failed", event.param)
    if event.status not in FINISH_REASONS:
        raise OpenAIError(
            500, event.error or f"generation ended: {event.status.value}", type_="server_error"
        )
    return FINISH_REASONS[event.status]


class _Request:
    """The sequences of one request and their choices; subclasses shape the wire."""

    object_name = ""
    id_prefix = ""

    def __init__(self, req: Any, frontend: Frontend) -> None:
        self.req, self.frontend, self.engine = req, frontend, frontend.engine
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seqs: list[Sequence] = []
        self.choices: list[_Choice] = []
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
            else:
                self.choices[i].finish_reason = _finish_reason(event)
        return True

    def start(self, i: int, event: Event) -> bool:
        """Called at each event of sequence i; True (once) at its first."""
        ch = self.choices[i]
        if ch.started:
            return False
        ch.started = True
        return True


class _Completion(_Request):
    """`/v1/completions`: `best_of` (>= n) sequences per prompt, the best n returned."""

    object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(
        self, req: CompletionRequest, frontend: Frontend, grammar: Grammar | None = None
    ) -> None:
        """`grammar`: the request's constraint, compiled (`Engine.grammar`)."""
        super().__init__(req, frontend)
        engine = self.engine
        prompts = req.prompts
        if not prompts:
            raise OpenAIError(400, "prompt must not be an empty list", "prompt")
        limit = engine.settings.max_prompts
        if len(prompts) > limit:
            raise OpenAIError(
                400,
                f"prompt takes at most {limit} prompts (TEXTGEN_MAX_PROMPTS), got {len(prompts)}",
                "prompt",
            )
        if req.suffix:
            raise OpenAIError(400, "suffix is not supported: GPT-2 cannot insert text", "suffix")
        _check_n(engine, req.n)
        self.best_of = req.best_of or req.n
        if self.best_of < req.n:
            raise OpenAIError(400, f"best_of must be >= n ({req.n}), got {req.best_of}", "best_of")
        if self.best_of > engine.settings.max_n:
            raise OpenAIError(
                400,
                f"best_of must be <= {engine.settings.max_n} (TEXTGEN_MAX_N), got {self.best_of}",
                "best_of",
            )
        if req.stream and self.best_of > req.n:
            raise OpenAIError(400, "best_of > n cannot be streamed", "best_of")
        if req.max_tokens == 0 and not req.echo:
            raise OpenAIError(
                400, "max_tokens must be >= 1 unless echo is set, got 0", "max_tokens"
            )
        per_prompt = "best_of" if req.best_of else "n"
        what = f"{len(prompts)} prompts x {per_prompt} {self.best_of}"
        field_ = "prompt" if self.best_of == 1 else per_prompt
        _check_sequences(engine, len(prompts) * self.best_of, field_, what)
        self.scoring = req.echo and req.logprobs is not None
        self.prompts: list[list[int]] = []
        logit_bias = _logit_bias(req.logit_bias)
        logprobs = req.logprobs
        if logprobs is None and self.best_of > req.n:
            logprobs = 0  # ranking needs each token's logprob; the client gets none
        # Every one of best_of sequences is scored, and held, before the best n are picked.
        ranked = f": best_of {self.best_of} per prompt, of which n {req.n} return"
        entries = _LogprobEntries(
            engine, req.logprobs, "logprobs", sequences=ranked if self.best_of > req.n else ""
        )
        for p, prompt in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
            ids = prompt_ids(engine, prompt, name)
            budget = _budget(engine, ids, req.max_tokens, name, "max_tokens")
            entries.add((len(ids) if self.scoring else 0) + budget, self.best_of)
            self.prompts.append(ids)
            self.prompt_tokens += len(ids)
            prefix = ""
            if req.echo:
                prefix = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
            for j in range(self.best_of):
                params = _sampling_params(
                    req,
                    budget,
                    j,
                    logprobs=logprobs,
                    prompt_logprobs=req.logprobs if self.scoring else None,
                    logit_bias=logit_bias,
                    constraint=grammar and grammar.constraint,
                )
                self.seqs.append(engine.new_sequence(ids, params, grammar))
                self.choices.append(_Choice(len(self.choices), prefix))
            self.prompt_seqs.append(self.seqs[-self.best_of])
        entries.check()

    def start(self, i: int, event: Event) -> bool:
        """At a sequence's first event, its echoed prompt's entries come first."""
        first = super().start(i, event)
        scored = event.prompt_logprobs
        if first and self.scoring and scored is not None:
            self.choices[i].add_prompt(self.seqs[i].prompt_ids, scored, self.frontend.tokens)
        return first

    def body(self) -> dict[str, Any]:
        n, tokens = self.req.n, self.frontend.tokens
        with_logprobs = self.req.logprobs is not None
        out = []
        for p in range(len(self.prompts)):
            group = list(range(p * self.best_of, (p + 1) * self.best_of))
            if self.best_of > n:  # the n most likely, as OpenAI and vLLM rank them
                group.sort(key=lambda i: -self.choices[i].cumulative_logprob)
            for j, i in enumerate(group[:n]):
                ch = self.choices[i]
                out.append(
                    {
                        "index": p * n + j,
                        "text": ch.prefix + ch.text,
                        "logprobs": (
                            ch.completion_logprobs(tokens, 0, len(ch.prefix) + len(ch.text))
                            if with_logprobs
                            else None
                        ),
                        "finish_reason": ch.finish_reason,
                    }
                )
        return self.chunk(out, usage=self.usage())

    async def stream(self, events: EventStream) -> AsyncGenerator[str, None]:
        with_logprobs = self.req.logprobs is not None
        tokens = self.frontend.tokens
        async for i, group in coalesce.runs(events):  # tokens queued together: one chunk
            ch = self.choices[i]
            out: dict[str, Any] = {"index": i, "text": "", "logprobs": None, "finish_reason": None}
            start = len(ch.token_ids)
            if self.start(i, group[0]):
                out["text"] = ch.prefix
            event = group[-1]
            if isinstance(event, TokenEvent):
                for token in group:
                    ch.add(token, tokens)  # type: ignore[arg-type]
                    out["text"] += token.text  # type: ignore[union-attr]
            else:
                out["finish_reason"] = ch.finish_reason = _finish_reason(event)
            if with_logprobs and len(ch.token_ids) > start:
                out["logprobs"] = ch.completion_logprobs(tokens, start)
            if not out["text"] and out["logprobs"] is None and out["finish_reason"] is None:
                continue
            extra = {"usage": self.usage()} if self.req.usage_in_every_chunk else {}
            yield sse(self.chunk([out], **extra))
        if self.req.usage_at_end:
            yield sse(self.chunk([], usage=self.usage()))


class _ChatCompletion(_Request):
    """`/v1/chat/completions`: the messages rendered by the chat template, n choices."""

    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def __init__(
        self,
        req: ChatCompletionRequest,
        frontend: Frontend,
        prompt: str,
        grammar: Grammar | None = None,
    ) -> None:
        """`prompt`: the messages through the chat template (`render_chat`); `grammar`: the
        request's constraint, compiled (`Engine.grammar`)."""
        super().__init__(req, frontend)
        engine = self.engine
        ids = prompt_ids(engine, prompt, "messages")
        budget_field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        budget = _budget(engine, ids, req.max_new_tokens, "messages", budget_field)
        self.prompt_tokens = len(ids)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is None:  # logprobs: true alone, the chosen token's
            entries = _LogprobEntries(engine, logprobs, "logprobs", "1, logprobs true")
        else:
            entries = _LogprobEntries(engine, logprobs, "top_logprobs")
        entries.add(budget, req.n)
        entries.check()
        logit_bias = _logit_bias(req.logit_bias)
        for j in range(req.n):
            params = _sampling_params(
                req,
                budget,
                j,
                logprobs=logprobs,
                logit_bias=logit_bias,
                constraint=grammar and grammar.constraint,
            )
            self.seqs.append(engine.new_sequence(ids, params, grammar))
            self.choices.append(_Choice(j))
        self.prompt_seqs.append(self.seqs[0])

    def body(self) -> dict[str, Any]:
        tokens = self.frontend.tokens
        out = [
            {
                "index": ch.index,
                "message": {"role": "assistant", "content": ch.text},
                "logprobs": ch.chat_logprobs(tokens) if self.req.logprobs else None,
                "finish_reason": ch.finish_reason,
            }
            for ch in self.choices
        ]
        return self.chunk(out, usage=self.usage())

    async def stream(self, events: EventStream) -> AsyncGenerator[str, None]:
        self.object_name = "chat.completion.chunk"
        tokens = self.frontend.tokens
        every = self.req.usage_in_every_chunk

        def chunk(delta: dict[str, Any], i: int, **rest: Any) -> str:
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None, **rest}
            return sse(self.chunk([choice], **({"usage": self.usage()} if every else {})))

        for ch in self.choices:  # the role first, as OpenAI sends it
            yield chunk({"role": "assistant", "content": ""}, ch.index)
        async for i, group in coalesce.runs(events):  # tokens queued together: one chunk
            ch = self.choices[i]
            event = group[-1]
            if isinstance(event, TokenEvent):
                start = len(ch.token_ids)
                for token in group:
                    ch.add(token, tokens)  # type: ignore[arg-type]
                text = "".join(token.text for token in group)  # type: ignore[union-attr]
                logprobs = ch.chat_logprobs(tokens, start) if self.req.logprobs else None
                if text or logprobs is not None:
                    yield chunk({"content": text}, i, logprobs=logprobs)
            else:
                ch.finish_reason = _finish_reason(event)
                yield chunk({}, i, finish_reason=ch.finish_reason)
        if self.req.usage_at_end:
            yield sse(self.chunk([], usage=self.usage()))


async def render_chat(frontend: Frontend, messages: list[Any], req: Any, request: Request) -> str:
    """The prompt text of chat messages, through the server's template or, when the server
    trusts request templates, the request's. A request's template is the client's program:
    it renders in a child process with a deadline and a memory cap (`chat_sandbox`)."""
    template = frontend.chat_template
    source = getattr(req, "chat_template", None)
    settings = frontend.engine.settings
    inputs = [m.as_template_input() for m in messages]
    try:
        if source is None:
            return template.render(
                inputs,
                add_generation_prompt=req.add_generation_prompt,
                max_chars=settings.max_prompt_chars,
                kwargs=req.chat_template_kwargs,
            )
        if not settings.trust_request_chat_template:
            raise ChatTemplateError(
                "chat_template is not accepted from requests on this server "
                "(TEXTGEN_TRUST_REQUEST_CHAT_TEMPLATE is off)"
            )
        rendering = chat_sandbox.render(
            source,
            template.special_tokens,
            inputs,
            req.add_generation_prompt,
            settings.max_prompt_chars,
            req.chat_template_kwargs,
            timeout_s=settings.chat_template_timeout_seconds,
            memory_mb=settings.chat_template_memory_mb,
        )
        text = await until_disconnected(request, rendering)  # gone: its child is killed
    except ChatTemplateError as exc:
        raise OpenAIError(400, str(exc), "chat_template") from None
    except chat_sandbox.RenderersBusy as exc:
        raise OpenAIError(
            429, f"{exc}; retry later", type_="rate_limit_error", code="rate_limit_exceeded"
        ) from None
    if text is None:
        raise OpenAIError(499, "the client went away")
    return text


# -- routes -----------------------------------------------------------------------


async def _answer(handle: Callable[[], Awaitable[Response]]) -> Response:
    """Runs a route, turning every error a request can cause into OpenAI's shape."""
    try:
        return await handle()
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


async def _completion(req: CompletionRequest, frontend: Frontend, request: Request) -> _Request:
    grammar = await frontend.engine.grammar(req.constraint())
    return _Completion(req, frontend, grammar)


async def _chat_completion(
    req: ChatCompletionRequest, frontend: Frontend, request: Request
) -> _Request:
    _check_n(frontend.engine, req.n)
    _check_sequences(frontend.engine, req.n, "n", f"n {req.n}")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        limit = frontend.engine.settings.max_logprobs
        if req.top_logprobs > limit:
            raise OpenAIError(
                400,
                f"top_logprobs must be <= {limit} (TEXTGEN_MAX_LOGPROBS), got {req.top_logprobs}",
                "top_logprobs",
            )
    prompt = await render_chat(frontend, req.messages, req, request)
    grammar = await frontend.engine.grammar(req.constraint())
    return _ChatCompletion(req, frontend, prompt, grammar)


async def _generate(
    request: Request,
    schema: type[Any],
    build: Callable[[Any, Frontend, Request], Awaitable[_Request]],
) -> Response:
    async def handle() -> Response:
        frontend: Frontend = request.app.state.frontend
        req = parse(await request.body(), schema)
        _check_model(req.model, frontend.engine)
        headers = {}
        if req.ignored_fields:
            ignored = _header_safe(", ".join(req.ignored_fields))
            logger.warning("%s: ignored unknown fields: %s", request.url.path, ignored)
            headers[IGNORED_FIELDS_HEADER] = ignored
        work = await build(req, frontend, request)
        events = frontend.engine.stream(work.seqs, request.url.path, final_only=not req.stream)
        if req.stream:
            return EventStreamResponse(_sse_stream(work, events), events, headers=headers)
        try:
            done = await until_disconnected(request, work.collect(events))
        finally:
            await events.aclose()  # cancels the sequences that did not finish
        if done is None:  # the client went away
            return Response(status_code=499)
        # Off the event loop: a scoring response holds up to TEXTGEN_MAX_LOGPROB_ENTRIES
        # entries, and building and encoding it there would hold up every other request
        # and the health probes meanwhile.
        return await asyncio.to_thread(
            lambda: _ChoicewiseJSONResponse(work.body(), headers=headers)
        )

    return await _answer(handle)


class _ChoicewiseJSONResponse(JSONResponse):
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


def _header_safe(text: str, limit: int = 1024) -> str:
    """Printable ASCII (escapes for the rest: no header or log line injection), bounded."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


async def _sse_stream(work: Any, events: EventStream) -> AsyncGenerator[str, None]:
    try:
        async for message in work.stream(events):
            yield message
    except OpenAIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # after the stream started: a final error event, then [DONE]
        yield sse(OpenAIError(500, f"generation failed: {exc}", type_="server_error").body())
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


async def completions(request: Request) -> Response:
    return await _generate(request, CompletionRequest, _completion)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, ChatCompletionRequest, _chat_completion)


def _card(frontend: Frontend) -> dict[str, Any]:
    """The served model as OpenAI's model object, with vLLM's `root` and `max_model_len`."""
    info = frontend.engine.info
    return {
        "id": info.name,
        "object": "model",
        "created": frontend.created,
        "owned_by": "textgen",
        "root": info.tag,
        "max_model_len": frontend.engine.max_model_len,
        "metadata": {"random_weights": info.random_weights, "source": info.source},
    }


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_card(request.app.state.frontend)]})


async def model_card(request: Request) -> Response:
    """`GET /v1/models/{id}`: the card, or OpenAI's 404 for another id."""
    frontend: Frontend = request.app.state.frontend
    try:
        _check_model(request.path_params["model"], frontend.engine)
    except OpenAIError as exc:
        return exc.response()
    return JSONResponse(_card(frontend))


V1_ROUTES = {"/completions": "POST", "/chat/completions": "POST", "/models": "GET"}


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


async def tokenize(request: Request) -> Response:
    async def handle() -> Response:
        frontend: Frontend = request.app.state.frontend
        req = parse(await request.body(), TokenizeRequest)
        _check_model(req.model, frontend.engine)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError(400, "send exactly one of prompt and messages", "prompt")
        text = req.prompt
        if req.messages is not None:
            text = await render_chat(frontend, req.messages, req, request)
        ids = prompt_ids(frontend.engine, text, "prompt") if text else []
        body: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": frontend.engine.max_model_len,
            "tokens": ids,
            "token_strs": [frontend.tokens.strings[t] for t in ids]
            if req.return_token_strs
            else None,
        }
        return JSONResponse(body)

    return await _answer(handle)


async def detokenize(request: Request) -> Response:
    async def handle() -> Response:
        frontend: Frontend = request.app.state.frontend
        req = parse(await request.body(), DetokenizeRequest)
        _check_model(req.model, frontend.engine)
        limit = frontend.engine.settings.max_detokenize_tokens
        if len(req.tokens) > limit:  # each id decodes to dozens of characters at most
            raise OpenAIError(
                400,
                f"tokens has {len(req.tokens)} ids; the limit is {limit} "
                "(TEXTGEN_MAX_DETOKENIZE_TOKENS)",
                "tokens",
            )
        if req.tokens:
            prompt_ids(frontend.engine, req.tokens, "tokens")  # checks the ids
        return JSONResponse({"prompt": frontend.engine.tokenizer.decode(req.tokens)})

    return await _answer(handle)


async def tokenizer_info(request: Request) -> Response:
    """What a remote tokenizer needs (lm-eval reads it): special tokens, template, sizes."""
    frontend: Frontend = request.app.state.frontend
    tok = frontend.engine.tokenizer
    return JSONResponse(
        {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "eos_token_id": tok.eos_token_id,
            "vocab_size": frontend.engine.vocab_size,
            "model_max_length": frontend.engine.max_model_len,
            "chat_template": frontend.chat_template.source,
            "add_bos_token": False,
        }
    )


async def health(request: Request) -> Response:
    """200 while the engine is healthy; 503 naming why not (vLLM's /health)."""
    reason = request.app.state.frontend.engine.health()
    if reason is None:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable", "error": reason}, status_code=503)


async def version(request: Request) -> Response:
    frontend: Frontend = request.app.state.frontend
    return JSONResponse(
        {
            "version": textgen.__version__,
            "bentoml": _version("bentoml"),
            "model": frontend.engine.info.tag,
        }
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


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
