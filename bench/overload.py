"""Overload through HTTP: is every request answered, and does the server stay ready?

    python bench/overload.py [--model tiny|124m] [--clients 256 1000] [--requests 5000]
                             [--burst 2000 --burst-seconds 2] [--url http://host:port]

Imports GPT-2 with random weights (the tiny 2-layer model by default) into a temporary
model store and serves it with `bentoml serve` (or loads a running server given --url),
then runs, one after another:

- a closed loop per `--clients` level: that many clients, each sending its next request
  as soon as its last one is answered (after `Retry-After` when refused), until
  `--requests` requests have been answered at that level;
- an open-loop burst: `--burst` requests started at even intervals within
  `--burst-seconds`, each on a connection of its own, whatever the answers.

Every request is non-streaming (`/generate`, `--new-tokens` new tokens, exactly). After
each phase `/readyz` must answer 200. Prints per phase the answers by status, the
refusals without `Retry-After`, the requests with no answer by kind (`dropped`: the
connection closed or reset with no response; `timeout`; `connect`), latency p50 / p99 of
answered requests and the answered requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

if __package__:  # imported as bench.overload (tests/test_overload.py)
    from . import loadgen
else:  # run as a script, beside bench/loadgen.py
    import loadgen

PROMPT = "In a shocking finding, scientists discovered a herd of unicorns living in a remote"
REQUEST_TIMEOUT_S = 300.0  # a request with no answer by then counts as a timeout
SERVER_ENV = {
    # The setting: a wide batch, and room for every closed-loop client.
    "TEXTGEN_MAX_BATCH_SIZE": "256",
    "TEXTGEN_MAX_CONCURRENCY": "2048",
    "TEXTGEN_MAX_WAITING": "1024",
    "TEXTGEN_MAX_MODEL_LEN": "128",
    "TEXTGEN_DTYPE": "float32",
    "BENTOML_DO_NOT_TRACK": "True",
}


@dataclass
class Outcome:
    status: int | None  # None: no answer
    error: str | None  # dropped | timeout | connect | other: ... (no answer)
    latency_s: float
    retry_after: bool  # a 429 / 503 carried Retry-After
    detail: str = ""


@dataclass
class Phase:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    ready_after: int | None = None  # /readyz status after the phase (None: no answer)


IDLE_BEFORE_SEND: dict[asyncio.Task[Any] | None, float] = {}  # per client task, its last send


class TrackedStream:
    """A connection that knows how long it was idle (since its last read) when a request
    is written on it: a dropped request's connection age, for finding the cause."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last_read: float | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self.inner.read(max_bytes, timeout)
        self.last_read = time.perf_counter()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        idle = 0.0 if self.last_read is None else time.perf_counter() - self.last_read
        IDLE_BEFORE_SEND[asyncio.current_task()] = idle
        await self.inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def start_tls(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.start_tls(*args, **kwargs)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


class TrackingBackend:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def connect_tcp(self, *args: Any, **kwargs: Any) -> TrackedStream:
        return TrackedStream(await self.inner.connect_tcp(*args, **kwargs))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def tracked_client(clients: int, keepalive: int | None) -> httpx.AsyncClient:
    client = loadgen.pool(clients, timeout=REQUEST_TIMEOUT_S, keepalive=keepalive)
    connections = client._transport._pool  # type: ignore[attr-defined]
    connections._network_backend = TrackingBackend(connections._network_backend)
    return client


def error_kind(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
        return "dropped"  # the connection closed or reset before a response
    return f"other: {type(exc).__name__}"


async def one_request(client: httpx.AsyncClient, url: str, new_tokens: int) -> Outcome:
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    connected = False  # whether this request opened its connection (else: reused one)

    async def trace(event: str, info: dict[str, Any]) -> None:
        nonlocal connected
        connected = connected or event == "connection.connect_tcp.complete"

    started = time.perf_counter()
    try:
        r = await client.post(f"{url}/generate", json=body, extensions={"trace": trace})
    except httpx.HTTPError as exc:
        latency = time.perf_counter() - started
        idle = IDLE_BEFORE_SEND.get(asyncio.current_task(), 0.0)
        how = "a new connection" if connected else f"a connection idle {idle:.3f} s"
        return Outcome(None, error_kind(exc), latency, False, f"{exc!r} on {how}")
    latency = time.perf_counter() - started
    detail = ""
    if r.status_code == 200:
        completion = r.json().get("usage", {}).get("completion_tokens")
        if completion != new_tokens:
            detail = f"expected {new_tokens} tokens, got {completion}"
    elif r.status_code not in (429, 503):
        detail = r.text[:200]
    return Outcome(r.status_code, None, latency, "retry-after" in r.headers, detail)


async def closed_loop(url: str, clients: int, requests: int, new_tokens: int) -> Phase:
    phase = Phase(f"closed loop, {clients} clients")
    async with tracked_client(clients, None) as client:

        async def one(_k: int, _r: int) -> None:
            outcome = await one_request(client, url, new_tokens)
            phase.outcomes.append(outcome)
            if outcome.status in (429, 503):
                await asyncio.sleep(1.0)  # as Retry-After says

        _, phase.wall_s = await loadgen.closed_loop(clients, one, requests=requests)
    return phase


async def burst(url: str, count: int, seconds: float, new_tokens: int) -> Phase:
    phase = Phase(f"burst, {count} requests in {seconds:g} s")
    async with tracked_client(count, 0) as client:
        started = time.perf_counter()

        async def at(offset: float) -> None:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            phase.outcomes.append(await one_request(client, url, new_tokens))

        await asyncio.gather(*(at(i * seconds / count) for i in range(count)))
        phase.wall_s = time.perf_counter() - started
    return phase


def readyz(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=30).status_code
    except httpx.HTTPError:
        return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def report(phase: Phase) -> str:
    statuses = collections.Counter(o.status for o in phase.outcomes if o.status is not None)
    errors = collections.Counter(o.error for o in phase.outcomes if o.error is not None)
    refused = [o for o in phase.outcomes if o.status in (429, 503)]
    bare = sum(not o.retry_after for o in refused)
    answered = [o.latency_s for o in phase.outcomes if o.status == 200]
    lines = [
        f"## {phase.name}: {len(phase.outcomes)} requests in {phase.wall_s:.1f} s",
        "status: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
        f"429/503 without Retry-After: {bare}",
        "no answer: "
        + (", ".join(f"{k}: {n}" for k, n in sorted(errors.items())) if errors else "0"),
        f"200s: latency p50 {percentile(answered, 0.5):.2f} s, "
        f"p99 {percentile(answered, 0.99):.2f} s, {len(answered) / phase.wall_s:.1f} per s",
        f"/readyz afterwards: {phase.ready_after}",
    ]
    odd = [o.detail for o in phase.outcomes if o.detail][:5]
    lines += [f"  e.g. {d}" for d in odd]
    return "\n".join(lines)


@contextlib.contextmanager
def served(model: str, work: Path) -> Iterator[str]:
    """The model (random weights) imported into a store under `work` and served; its URL."""
    from bench import free_port, import_model, start, stop  # bench/bench.py (script only)

    home = work / "bentoml_home"
    flags = ["--random-init", "--name", "overload"] + (["--tiny"] if model == "tiny" else [])
    tag = import_model(home, *flags)
    port = free_port()
    log = work / "serve.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:TextGeneration", "--port"]
    env = {"BENTOML_HOME": str(home), **SERVER_ENV, "TEXTGEN_MODEL": tag}
    proc = start([*cmd, str(port)], env, port, log)
    url = f"http://127.0.0.1:{port}"
    print(f"serving {tag} at {url}, log {log}", flush=True)
    try:
        yield url
    finally:
        stop(proc)


async def run(url: str, args: argparse.Namespace) -> list[Phase]:
    phases = []
    for clients in args.clients:
        phase = await closed_loop(url, clients, args.requests, args.new_tokens)
        phase.ready_after = readyz(url)
        print(report(phase), flush=True)
        phases.append(phase)
    if args.burst:
        phase = await burst(url, args.burst, args.burst_seconds, args.new_tokens)
        phase.ready_after = readyz(url)
        print(report(phase), flush=True)
        phases.append(phase)
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "124m"), default="tiny")
    parser.add_argument("--clients", type=int, nargs="*", default=[256, 1000])
    parser.add_argument("--requests", type=int, default=5000, help="per closed-loop level")
    parser.add_argument("--burst", type=int, default=2000, help="0: no burst")
    parser.add_argument("--burst-seconds", type=float, default=2.0)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--url", help="a running server instead of starting one")
    args = parser.parse_args(argv)
    if args.url:
        phases = asyncio.run(run(args.url, args))
    else:
        with (
            tempfile.TemporaryDirectory(prefix="overload_") as tmp,
            served(args.model, Path(tmp)) as url,
        ):
            phases = asyncio.run(run(url, args))
    failed = any(
        o.status is None or (o.status >= 500 and o.status != 503) or o.detail
        for p in phases
        for o in p.outcomes
    ) or any(p.ready_after != 200 for p in phases)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
