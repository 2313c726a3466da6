"""Shared fixtures: a tiny random GPT-2, a temporary model store, a real server."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import pytest
import torch

from textgen.config import Settings
from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2
from textgen.params import SamplingParams
from textgen.scheduler import FinishEvent, Sequence, TokenEvent

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    return random_gpt2(tiny=True)


def make_engine(tiny_model: Any, tokenizer: Any, **settings: Any) -> Engine:
    info = ModelInfo("gpt2", "gpt2:test", "random:test", True, 1024)
    defaults = {"dtype": "float32", "device": "cpu", "max_batch_size": 8}
    return Engine(tiny_model, tokenizer, info, Settings(**{**defaults, **settings}))


@pytest.fixture(scope="session")
def engine(tiny_model, tokenizer) -> Iterator[Engine]:
    eng = make_engine(tiny_model, tokenizer)
    yield eng
    eng.shutdown()


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int, **kw: Any) -> list[int]:
    """The model's own `generate`: the reference every greedy test compares with."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.eos_token_id,
        **kw,
    )
    return out[0, len(prompt_ids) :].tolist()


async def collect(engine: Engine, prompt: str, params: SamplingParams) -> tuple[list, Any]:
    """Runs one request on the engine; returns (token events, finish event)."""
    seq = engine.new_sequence(engine.tokenize(prompt), params)
    tokens, final = [], None
    async for _, event in engine.stream([seq]):
        if hasattr(event, "token_id"):
            tokens.append(event)
        else:
            final = event
    return tokens, final


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def generate(
    engine: Engine,
    prompt: str | list[int],
    params: SamplingParams,
    cancel_after: int | None = None,
) -> tuple[list[int], FinishEvent | None, Sequence]:
    """(token ids, finish event, the sequence) of one request (a text prompt is tokenized
    first); closes its stream after `cancel_after` tokens (no finish event then)."""
    ids = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    seq = engine.new_sequence(ids, params)
    events = engine.stream([seq])
    tokens, final = [], None
    try:
        async for _, event in events:
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
                if cancel_after is not None and len(tokens) == cancel_after:
                    break
            elif isinstance(event, FinishEvent):
                final = event
    finally:
        await events.aclose()
    return tokens, final, seq


async def token_ids(
    engine: Engine,
    prompt: str | list[int],
    params: SamplingParams,
    cancel_after: int | None = None,
) -> list[int]:
    """Token ids of one request (`generate`'s)."""
    return (await generate(engine, prompt, params, cancel_after))[0]


def staggered(engine: Engine, requests: list[tuple[Any, ...]]) -> list[list[int]]:
    """Runs `requests`, (delay s, prompt, new tokens, cancelled after) each, on `engine`
    at once, each starting after its delay; returns their token ids, in order."""

    async def one(delay: float, prompt: Any, n: int, cancel_after: int | None) -> list[int]:
        await asyncio.sleep(delay)
        return await token_ids(engine, prompt, SamplingParams(max_new_tokens=n), cancel_after)

    async def all_of_them() -> list[list[int]]:
        return await asyncio.gather(*(one(*r) for r in requests))

    return run(all_of_them())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_tiny(home: Path, name: str = "gpt2") -> str:
    """Imports the tiny random GPT-2 into the store at `home` as `name`; returns its tag."""
    env = {**os.environ, "BENTOML_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "download_model.py", "--random-init", "--tiny", "--name", name],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("bentoml_home")
    return home, import_tiny(home)


def store_entries(home: Path, name: str = "gpt2") -> dict[str, Any]:
    """Entries of the model store at `home` (BentoML caches BENTOML_HOME, so open it directly)."""
    from bentoml._internal.models import ModelStore

    store = ModelStore(home / "models")
    try:
        return {str(m.tag): m for m in store.list(name)}
    except bentoml.exceptions.NotFound:
        return {}


def load_stored_model(home: Path, tag: str) -> Any:
    from transformers import AutoModelForCausalLM

    path = store_entries(home, tag.split(":")[0])[tag].path
    return AutoModelForCausalLM.from_pretrained(f"{path}/model", dtype=torch.float32)


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log


# A server log line with any of these fails the test that was running: an engine
# that failed a step, or an unhandled exception in the app, is a defect even when
# every response was 200. (BentoML logs a traceback with each 400 it answers, so
# tracebacks alone are not the mark.)
LOG_FAILURES = (
    "engine step failed",
    "engine stopped",
    "engine thread died",
    "Exception in ASGI application",
)
_watched: list[Server] = []  # servers whose logs must stay clean


@pytest.fixture(autouse=True)
def unfrozen_heap() -> Iterator[None]:
    """A test's `Engine.warm_up` freezes the heap (`gc.freeze`); frozen objects that become
    cyclic garbage, a test's engine among them, are collected again after the test."""
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def clean_server_logs() -> Iterator[None]:
    """Fails a test during which a watched server logged a failure."""
    offsets = {id(s): s.log.stat().st_size for s in _watched if s.log.exists()}
    yield
    for server in _watched:
        if not server.log.exists():
            continue
        with server.log.open(errors="replace") as f:
            f.seek(offsets.get(id(server), 0))
            new = f.read()
        bad = [line for line in new.splitlines() if any(m in line for m in LOG_FAILURES)]
        assert not bad, f"{server.log} logged a failure:\n{new[-4000:]}"


def start_server(
    home: Path,
    tag: str,
    log: Path,
    service: str = "service:TextGeneration",
    failures_expected: bool = False,
    **env: str,
) -> Server:
    """`bentoml serve` on a free port, over the model store at `home`, once ready."""
    server = launch_server(home, tag, log, service, failures_expected, **env)
    if not wait_ready(server.url, 120, exited=lambda: server.proc.poll() is not None):
        stop_server(server)
        raise RuntimeError(f"bentoml serve was not ready in 120 s:\n{log.read_text()}")
    return server


def launch_server(
    home: Path,
    tag: str,
    log: Path,
    service: str = "service:TextGeneration",
    failures_expected: bool = False,
    **env: str,
) -> Server:
    """`bentoml serve` on a free port, over the model store at `home`, not waiting.

    Each server gets a BENTOML_HOME of its own (sharing the store's models):
    BentoML keeps its Prometheus files there and clears them at start. Its log
    is watched (`clean_server_logs`) unless failures are what the test is about.
    """
    port = free_port()
    own_home = log.parent / f"bentoml_home_{port}"
    own_home.mkdir()
    (own_home / "models").symlink_to(home / "models")
    full_env = {
        **os.environ,
        "BENTOML_HOME": str(own_home),
        "TEXTGEN_MODEL": tag,
        "TEXTGEN_DTYPE": "float32",
        "BENTOML_DO_NOT_TRACK": "True",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", service, "--port", str(port)],
        cwd=ROOT,
        env=full_env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    if not failures_expected:
        _watched.append(server)
    return server


def wait_ready(url: str, timeout_s: float, exited: Callable[[], bool]) -> bool:
    """Polls `url`/readyz until it answers 200 (True), the server exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not exited():
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def stop_server(server: Server) -> int:
    """SIGTERM to the process group, as an orchestrator would; returns the exit code."""
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, 15)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, 9)
            server.proc.wait()
    return server.proc.returncode


def served(
    model_store: tuple[Path, str], tmp_path_factory: Any, name: str, **env: str
) -> Iterator[Server]:
    """A fixture's server (`yield from` it): `start_server` over `model_store` with `env`,
    logging to `name`.log in a folder of its own, stopped at the fixture's teardown."""
    home, tag = model_store
    srv = start_server(home, tag, tmp_path_factory.mktemp("logs") / f"{name}.log", **env)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory) -> Iterator[Server]:
    yield from served(model_store, tmp_path_factory, "serve")


@pytest.fixture(scope="session")
def paced(model_store, tmp_path_factory) -> Iterator[Server]:
    """A server whose decode steps take 0.1 s each (tests/fault_service.py), so a reader
    (and the event loop) keeps up with its stream and every token is its own chunk. Under
    load the plain server sends tokens already queued together as one chunk
    (textgen/coalesce.py), so a test that counts chunks runs against this one."""
    home, tag = model_store
    log = tmp_path_factory.mktemp("logs") / "paced.log"
    srv = start_server(
        home, tag, log, "tests.fault_service:TextGeneration", TEXTGEN_TEST_FAULT="slow_decode=0.1"
    )
    yield srv
    stop_server(srv)


KEY = "s3cret-key"


@pytest.fixture(scope="session")
def guarded(model_store, tmp_path_factory):
    """A server with an API key and small limits: 2 KV slots, 6 requests at once."""
    yield from served(
        model_store,
        tmp_path_factory,
        "guarded",
        TEXTGEN_API_KEY=KEY,
        TEXTGEN_MAX_BATCH_SIZE="2",
        TEXTGEN_MAX_CONCURRENCY="6",
        TEXTGEN_MAX_WAITING="2",
    )


# The image `bentoml containerize` makes, built once per session for every test that
# runs it (tests/test_container.py, tests/test_cluster.py): a build takes minutes.
PACKED_MODEL_NAME = "tiny-gpt2"  # not the default gpt2: the image must serve what it packed


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine, or a skip saying why there is none (never a skip in CI)."""
    from tests.dockerized import docker_engine_error

    error = docker_engine_error()
    if error is not None and not os.environ.get("CI"):
        pytest.skip(f"no Docker engine here: {error}")
    assert error is None, error


@pytest.fixture(scope="session")
def image(docker_engine, tmp_path_factory) -> Iterator[tuple[str, Path, str]]:
    """The tiny model packed into a bento and containerized; yields (image, home, model tag)."""
    from tests.dockerized import build_image, remove_image

    home = tmp_path_factory.mktemp("bentoml_home_container")
    model_tag = import_tiny(home, PACKED_MODEL_NAME)
    image_tag = build_image(home, model_tag)
    yield image_tag, home, model_tag
    remove_image(image_tag)


def stream_tokens(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The token objects of `/generate_stream` events, in order: one per `{"token": ...}`
    event, several per `{"tokens": [...]}` (tokens queued together coalesce)."""
    return [t for e in events for t in e.get("tokens", [e["token"]] if "token" in e else [])]
