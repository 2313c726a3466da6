"""A request checked against the served model and the settings: what both API layers check.

The wire schemas (schemas.py, openai_schemas.py) check what the wire alone bounds, and
`SamplingParams` what holds whatever the model; what depends on the model (its vocabulary,
its context) or on the settings (TEXTGEN_MAX_*) is checked here, before a sequence is
made, for the native routes and the OpenAI ones alike. Each check raises ParamError
naming the wire field, the limit and the value. The OpenAI routes' bounds on a request's
size (n, best_of, prompts, sequences, logprob entries) are theirs alone
(textgen/openai_api/).

The engine checks none of this for a client: it holds its own invariants against its
callers (`Engine.new_sequence`), which the checks here imply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textgen.engine import ContextOverflow, Engine
from textgen.params import ParamError, SamplingParams, check_unicode

if TYPE_CHECKING:
    from textgen.scheduler import Sequence
    from textgen.structured import Grammar


def prompt_ids(engine: Engine, prompt: str | list[int], field: str = "prompt") -> list[int]:
    """A prompt's token ids, from its text or as given (checked against the vocabulary)."""
    if isinstance(prompt, list):
        i = engine.unknown_token(prompt)
        if i is not None:
            raise ParamError(field, f"{field}[{i}]: {engine.not_in_vocabulary(prompt[i])}")
        ids = prompt
    else:
        check_unicode(prompt, field)
        limit = engine.settings.max_prompt_chars
        if len(prompt) > limit:
            raise ParamError(field, f"{field} has {len(prompt)} characters; the limit is {limit}")
        ids = engine.tokenize(prompt)
    if not ids:
        raise ParamError(field, f"{field} must not be empty")
    return ids


def encode_prompt(
    engine: Engine,
    prompt: str,
    max_new_tokens: int,
    field: str = "prompt",
    budget_field: str = "max_new_tokens",
) -> list[int]:
    """Tokenizes a prompt, checking the wire limits and that it fits the context.

    `field` and `budget_field` are the wire names of the prompt and of the
    new-token budget, so the message speaks the client's vocabulary.
    """
    ids = prompt_ids(engine, prompt, field)
    check_budget(engine, len(ids), max_new_tokens, field, budget_field)
    return ids


def check_budget(
    engine: Engine, prompt_tokens: int, max_new_tokens: int, field: str, budget_field: str
) -> None:
    """Raises ParamError unless `max_new_tokens` is within the limit and fits the context."""
    budget_limit = engine.settings.max_new_tokens_limit
    if max_new_tokens > budget_limit:
        raise ParamError(
            budget_field, f"{budget_field} must be <= {budget_limit}, got {max_new_tokens}"
        )
    try:
        engine.check_fits(prompt_tokens, max_new_tokens)
    except ContextOverflow as exc:
        raise ParamError(
            field,
            f"{field} has {prompt_tokens} tokens and {budget_field} is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} exceeds the model's context of {exc.limit} tokens",
        ) from None


def rest_of_context(engine: Engine, prompt_tokens: int) -> int:
    """The new-token budget of a request that sets none (OpenAI's `max_tokens: null`)."""
    return max(0, min(engine.settings.max_new_tokens_limit, engine.max_model_len - prompt_tokens))


def new_token_budget(
    engine: Engine, ids: list[int], requested: int | None, field: str, budget_field: str
) -> int:
    """New tokens for a prompt: as requested, or the rest of the context for None."""
    if requested is None:
        room = rest_of_context(engine, len(ids))
        if room == 0:
            raise ParamError(
                field,
                f"{field} has {len(ids)} tokens: no room left to generate in the model's "
                f"context of {engine.max_model_len} tokens",
            )
        return room
    check_budget(engine, len(ids), requested, field, budget_field)
    return requested


def check_logprobs(engine: Engine, logprobs: int | None, field: str) -> None:
    """Raises ParamError when `logprobs` alternatives are more than TEXTGEN_MAX_LOGPROBS,
    or than the vocabulary holds (whatever that setting says)."""
    limit = engine.settings.max_logprobs
    if logprobs is not None and logprobs > limit:
        raise ParamError(
            field, f"{field} must be <= {limit} (TEXTGEN_MAX_LOGPROBS), got {logprobs}"
        )
    if logprobs is not None and logprobs > engine.vocab_size:
        raise ParamError(
            field, f"{field} must be <= {engine.vocab_size} (the vocabulary), got {logprobs}"
        )


def check_params(engine: Engine, params: SamplingParams) -> None:
    """Raises ParamError for what the model and the settings bound in `params`: the
    alternatives asked for, and the token ids of `logit_bias` and `stop_token_ids`."""
    check_logprobs(engine, params.logprobs, "logprobs")
    check_logprobs(engine, params.prompt_logprobs, "prompt_logprobs")
    unknown = engine.unknown_token_in(params)
    if unknown is not None:
        raise ParamError(unknown[0], engine.not_in_vocabulary(unknown[1]))


def checked_sequence(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, grammar: Grammar | None = None
) -> Sequence:
    """The engine's sequence for a checked prompt (`prompt_ids`, `new_token_budget`), once
    `params` pass `check_params`."""
    check_params(engine, params)
    return engine.new_sequence(prompt_ids, params, grammar)
