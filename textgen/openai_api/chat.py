"""`POST /v1/chat/completions`: messages through the chat template, n choices; and the
rendering of chat messages that `/tokenize` shares."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from textgen import chat_sandbox, coalesce
from textgen.api import sse, until_disconnected
from textgen.chat import ChatTemplateError
from textgen.engine import EventStream
from textgen.errors import OpenAIError
from textgen.openai_api.serving import (
    Choice,
    Frontend,
    Generation,
    LogprobEntries,
    check_n,
    check_sequences,
    finish_reason_of,
    parse_logit_bias,
    sampling_params,
    serve_generation,
)
from textgen.openai_schemas import ChatCompletionRequest, ChatMessage, TokenizeRequest
from textgen.scheduler import TokenEvent
from textgen.structured import Grammar
from textgen.validation import (
    check_logprobs,
    checked_sequence,
    new_token_budget,
    prompt_ids,
)


class ChatCompletion(Generation):
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
        budget = new_token_budget(engine, ids, req.max_new_tokens, "messages", budget_field)
        self.prompt_tokens = len(ids)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is None:  # logprobs: true alone, the chosen token's
            entries = LogprobEntries(engine, logprobs, "logprobs", "1, logprobs true")
        else:
            entries = LogprobEntries(engine, logprobs, "top_logprobs")
        entries.add(budget, req.n)
        entries.check()
        logit_bias = parse_logit_bias(req.logit_bias)
        for j in range(req.n):
            params = sampling_params(
                req,
                budget,
                j,
                logprobs=logprobs,
                logit_bias=logit_bias,
                constraint=grammar and grammar.constraint,
            )
            self.seqs.append(checked_sequence(engine, ids, params, grammar))
            self.choices.append(Choice(j))
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
                ch.finish_reason = finish_reason_of(event)
                yield chunk({}, i, finish_reason=ch.finish_reason)
        if self.req.usage_at_end:
            yield sse(self.chunk([], usage=self.usage()))


async def render_chat(
    frontend: Frontend,
    messages: list[ChatMessage],
    req: ChatCompletionRequest | TokenizeRequest,
    request: Request,
) -> str:
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


async def build_chat_completion(
    req: ChatCompletionRequest, frontend: Frontend, request: Request
) -> Generation:
    check_n(frontend.engine, req.n)
    check_sequences(frontend.engine, req.n, "n", f"n {req.n}")
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    check_logprobs(frontend.engine, req.top_logprobs, "top_logprobs")
    prompt = await render_chat(frontend, req.messages, req, request)
    grammar = await frontend.engine.grammar(req.constraint())
    return ChatCompletion(req, frontend, prompt, grammar)


async def chat_completions(request: Request) -> Response:
    return await serve_generation(request, ChatCompletionRequest, build_chat_completion)
