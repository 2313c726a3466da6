"""The routes that generate nothing: vLLM's tokenizer routes (`/tokenize`, `/detokenize`,
`/tokenizer_info`), `/health`, `/version`, and the model list (`/v1/models`)."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import textgen
from textgen.errors import OpenAIError
from textgen.openai_api.chat import render_chat
from textgen.openai_api.serving import Frontend, answer, check_model, parse
from textgen.openai_schemas import DetokenizeRequest, TokenizeRequest
from textgen.validation import prompt_ids


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
        check_model(request.path_params["model"], frontend.engine)
    except OpenAIError as exc:
        return exc.response()
    return JSONResponse(_card(frontend))


V1_ROUTES = {"/completions": "POST", "/chat/completions": "POST", "/models": "GET"}


async def tokenize(request: Request) -> Response:
    async def handle() -> Response:
        frontend: Frontend = request.app.state.frontend
        req = parse(await request.body(), TokenizeRequest)
        check_model(req.model, frontend.engine)
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

    return await answer(handle)


async def detokenize(request: Request) -> Response:
    async def handle() -> Response:
        frontend: Frontend = request.app.state.frontend
        req = parse(await request.body(), DetokenizeRequest)
        check_model(req.model, frontend.engine)
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

    return await answer(handle)


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
