"""`POST /v1/completions`: prompts in, `best_of` (>= n) sequences each, the best n back."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from textgen import coalesce
from textgen.api import sse
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
from textgen.openai_schemas import CompletionRequest
from textgen.scheduler import Event, TokenEvent
from textgen.structured import Grammar
from textgen.validation import checked_sequence, new_token_budget, prompt_ids


class Completion(Generation):
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
        check_n(engine, req.n)
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
        check_sequences(engine, len(prompts) * self.best_of, field_, what)
        self.scoring = req.echo and req.logprobs is not None
        self.prompts: list[list[int]] = []
        logit_bias = parse_logit_bias(req.logit_bias)
        logprobs = req.logprobs
        if logprobs is None and self.best_of > req.n:
            logprobs = 0  # ranking needs each token's logprob; the client gets none
        # Every one of best_of sequences is scored, and held, before the best n are picked.
        ranked = f": best_of {self.best_of} per prompt, of which n {req.n} return"
        entries = LogprobEntries(
            engine, req.logprobs, "logprobs", sequences=ranked if self.best_of > req.n else ""
        )
        for p, prompt in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
            ids = prompt_ids(engine, prompt, name)
            budget = new_token_budget(engine, ids, req.max_tokens, name, "max_tokens")
            entries.add((len(ids) if self.scoring else 0) + budget, self.best_of)
            self.prompts.append(ids)
            self.prompt_tokens += len(ids)
            prefix = ""
            if req.echo:
                prefix = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
            for j in range(self.best_of):
                params = sampling_params(
                    req,
                    budget,
                    j,
                    logprobs=logprobs,
                    prompt_logprobs=req.logprobs if self.scoring else None,
                    logit_bias=logit_bias,
                    constraint=grammar and grammar.constraint,
                )
                self.seqs.append(checked_sequence(engine, ids, params, grammar))
                self.choices.append(Choice(len(self.choices), prefix))
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
                out["finish_reason"] = ch.finish_reason = finish_reason_of(event)
            if with_logprobs and len(ch.token_ids) > start:
                out["logprobs"] = ch.completion_logprobs(tokens, start)
            if not out["text"] and out["logprobs"] is None and out["finish_reason"] is None:
                continue
            extra = {"usage": self.usage()} if self.req.usage_in_every_chunk else {}
            yield sse(self.chunk([out], **extra))
        if self.req.usage_at_end:
            yield sse(self.chunk([], usage=self.usage()))


async def build_completion(
    req: CompletionRequest, frontend: Frontend, request: Request
) -> Generation:
    grammar = await frontend.engine.grammar(req.constraint())
    return Completion(req, frontend, grammar)


async def completions(request: Request) -> Response:
    return await serve_generation(request, CompletionRequest, build_completion)
