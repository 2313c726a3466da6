"""GPT-2 text generation as a BentoML service: a table of routes over one engine."""

from __future__ import annotations

from typing import Any

import bentoml

from textgen import api
from textgen.bento import TextgenService
from textgen.config import Settings
from textgen.engine import Engine
from textgen.openai_api.app import attach, build_app, build_server_app
from textgen.schemas import GenerateRequest, GenerateResponse, SeedRequest, SeedResponse
from textgen.store import model_info

SETTINGS = Settings.from_env()
openai_app = build_app()
server_app = build_server_app()  # /health, /version, /tokenize, ...


@bentoml.asgi_app(server_app, path="/")  # matches its own routes only
@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.service(
    name="textgen",
    resources={"gpu": 1, "cpu": "2"},  # a GPU when the host has one; runs on CPU otherwise
    workers=1,  # one engine per process: continuous batching needs every request in it
    # A 1024-token generation on a busy CPU fits the timeout; beyond
    # max_concurrency requests BentoML answers 429 (the FrontDoor adds Retry-After).
    traffic={"timeout": 900, "max_concurrency": SETTINGS.max_concurrency},
    service_class=TextgenService,
)
class TextGeneration:
    model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        info = model_info(self.model)
        self.engine = Engine.from_directory(self.model.path, info, SETTINGS)
        attach(self.engine, openai_app, server_app)
        self.engine.warm_up()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        """After the server has drained: sequences still held end with an error event."""
        self.engine.shutdown()

    async def __is_ready__(self) -> bool:
        """/readyz: 503 while the engine is dead or wedged (`Engine.health` says why)."""
        return self.engine.health() is None

    async def __is_alive__(self) -> bool:
        """/livez: the same, so an orchestrator restarts a process whose engine is gone."""
        return self.engine.health() is None

    @bentoml.api(route="/generate", input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **body: Any) -> GenerateResponse:
        """Continue the prompt; the new text comes back in one response."""
        return await api.generate(self.engine, GenerateRequest(**body), ctx)

    @bentoml.api(route="/generate_stream", input_spec=GenerateRequest)
    async def generate_stream(self, **body: Any) -> Any:
        """Server-sent events: one per generated token, then a final one."""
        return await api.generate_stream(self.engine, GenerateRequest(**body))

    @bentoml.api(route="/text-generation/generate", input_spec=SeedRequest)
    async def text_generation(self, ctx: bentoml.Context, text: str) -> SeedResponse:
        """The tutorial's route: `{"text"}` in, `{"input", "generated"}` out."""
        result = await api.generate(
            self.engine, GenerateRequest(prompt=text), ctx, route="/text-generation/generate"
        )
        if not isinstance(result, GenerateResponse):
            return result  # an error response, passed through
        return SeedResponse(input=text, generated=result.generated)
