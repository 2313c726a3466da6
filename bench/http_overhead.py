"""What HTTP costs: the engine in this process against `bentoml serve`, same settings, one run.

    python bench/http_overhead.py [--quick] [--repeats 2] [--client raw|httpx]
                                  [--only float32 int8 bf16]

For each model and precision the same `TEXTGEN_*` settings build two things: an Engine in
this process, and a `bentoml serve` of the same weights from a temporary model store
(bench/bench.py's helpers). Both stay up while the levels run; each level is a closed loop
of `clients` clients, each sending its next request when its last one is done, every
request making exactly `NEW_TOKENS` tokens (min = max). In-process, a request is
`Engine.stream`: non-streaming reads its events once all are there (`final_only`, as the
server's non-streaming routes), streaming reads every token's text. Over HTTP it is
`/v1/completions` (non-streaming) or `/generate_stream` (server-sent events) from this
process, each client on its own keep-alive connection (bench/loadgen.py's Connection,
which parses only the framing, as wrk would), or with `--client httpx` through one
httpx.AsyncClient pool, whose own CPU per request grows with its connections and then
takes a large share of the 2 cores; the answer's usage must count the tokens asked for.

The two sides alternate per level, `--repeats` times in ABBA order (in-process, HTTP, HTTP,
in-process ...), so that drift of a shared machine falls on both, and each side's figure is
the fastest of its runs: other load on the 2 cores only ever slows a run (its OpenMP threads
sharply), so the fastest is the least disturbed. Prints per level every run's tok/s and the
CPU cores each side kept busy (this process; the server's processes), then a markdown table
of output tokens/s.

Models: the tiny 2-layer GPT-2 in float32 (`max_batch_size` 256) at 1, 32 and 256 clients,
and GPT-2 124M in int8 and bf16 (`max_batch_size` 32) at 32 clients; `--quick` runs the
tiny model only, with fewer requests, once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadgen import Connection, closed_loop, pool  # noqa: E402 (bench/loadgen.py)

from bench import PROMPT, free_port, prepare_model, start, stop  # noqa: E402 (bench/bench.py)
from textgen.config import Settings  # noqa: E402
from textgen.engine import Engine, ModelInfo  # noqa: E402
from textgen.models import gpt2_tokenizer, random_gpt2  # noqa: E402
from textgen.params import SamplingParams  # noqa: E402
from textgen.scheduler import FinishEvent  # noqa: E402

NEW_TOKENS = 64  # every request, exactly


@dataclass(frozen=True)
class Config:
    model: str  # "tiny" | "124M"
    precision: str  # as the table names it
    env: dict[str, str]  # TEXTGEN_* settings, read by the server and by this process alike
    rounds: dict[int, int]  # clients -> requests each client sends, one after another
    client: str = "raw"  # over HTTP: "raw" (loadgen.Connection) or "httpx" (its pool)


@dataclass
class Row:
    config: Config
    clients: int
    streaming: bool
    in_process: list[float] = field(default_factory=list)  # tok/s of each run
    http: list[float] = field(default_factory=list)
    in_process_cores: list[float] = field(default_factory=list)  # CPU s / wall s
    client_cores: list[float] = field(default_factory=list)  # this process, over HTTP
    server_cores: list[float] = field(default_factory=list)  # the server's processes


def configs(quick: bool) -> list[Config]:
    # Every request sends one prompt: prefix caching off, as bench/bench.py's servers.
    common = {"TEXTGEN_PREFIX_CACHING": "false"}
    tiny_rounds = {1: 4, 32: 1, 256: 1} if quick else {1: 16, 32: 4, 256: 2}
    # A batch row for every client, and room to queue all of them.
    tiny = Config(
        "tiny",
        "float32",
        {**common, "TEXTGEN_DTYPE": "float32", "TEXTGEN_MAX_BATCH_SIZE": "256"},
        tiny_rounds,
    )
    if quick:
        return [tiny]
    big = {**common, "TEXTGEN_MAX_BATCH_SIZE": "32"}
    return [
        tiny,
        Config("124M", "int8", {**big, "TEXTGEN_QUANTIZE": "int8"}, {32: 3}),
        Config("124M", "bf16", {**big, "TEXTGEN_DTYPE": "bfloat16"}, {32: 3}),
    ]


def settings_of(env: dict[str, str]) -> Settings:
    """The Settings a server started with `env` reads (Settings.from_env, the one reader)."""
    with mock.patch.dict(os.environ, env):
        return Settings.from_env()


async def tokens_per_s(clients: int, rounds: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Output tokens/s of a closed loop of `clients` clients, client k awaiting `one(k)`
    `rounds` times."""
    _, wall = await closed_loop(clients, lambda k, _r: one(k), rounds=rounds)
    return clients * rounds * NEW_TOKENS / wall


async def in_process(
    engine: Engine,
    clients: int,
    rounds: int,
    streaming: bool,
    on_token: Callable[[], None] | None = None,
) -> float:
    """`on_token`: called at each token event a streaming client reads (bench/gil_share.py)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    async def one(_k: int) -> None:
        # Tokenized per request, as the server does.
        seq = engine.new_sequence(engine.tokenize(PROMPT), params)
        events = engine.stream([seq], final_only=not streaming)  # as the server's routes
        texts, final = [], None
        async for _, event in events:
            if isinstance(event, FinishEvent):
                final = event
            elif streaming:
                texts.append(event.text)
                if on_token is not None:
                    on_token()
        assert final is not None and final.completion_tokens == NEW_TOKENS, final

    return await tokens_per_s(clients, rounds, one)


async def over_http(
    url: str, clients: int, rounds: int, streaming: bool, client: str = "raw"
) -> float:
    """`client`: "raw" (a loadgen.Connection per client) or "httpx" (one pool for all).
    Either reads each answer whole; a stream's last server-sent event carries its usage."""
    if streaming:
        path = "/generate_stream"
        body = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    else:
        path = "/v1/completions"
        body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS}
        body["temperature"] = 0
    async with contextlib.AsyncExitStack() as stack:
        if client == "httpx":
            http = await stack.enter_async_context(pool(clients))

            async def post(_k: int) -> tuple[int, bytes]:
                r = await http.post(f"{url}{path}", json=body)
                return r.status_code, r.content

        else:
            connections = [Connection.to(url) for _ in range(clients)]
            for connection in connections:
                stack.push_async_callback(connection.close)

            async def post(k: int) -> tuple[int, bytes]:
                return await connections[k].post(path, body)

        async def one(k: int) -> None:
            status, data = await post(k)
            assert status == 200, (status, data[:200])
            if streaming:
                data = data.rstrip(b"\n").rsplit(b"\n\n", 1)[-1].removeprefix(b"data: ")
            usage = json.loads(data)["usage"]
            assert usage["completion_tokens"] == NEW_TOKENS, usage

        return await tokens_per_s(clients, rounds, one)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def timed(run: Callable[[], float], others: list[psutil.Process]) -> tuple[float, float, float]:
    """(tok/s, cores this process kept busy, cores `others` kept busy) of one run."""
    wall, mine, theirs = time.perf_counter(), time.process_time(), cpu_seconds(others)
    tps = run()
    wall = time.perf_counter() - wall
    return tps, (time.process_time() - mine) / wall, (cpu_seconds(others) - theirs) / wall


def measure(
    config: Config, engine: Engine, url: str, server: psutil.Process, repeats: int
) -> list[Row]:
    procs = [server, *server.children(recursive=True)]
    rows = []
    for clients, rounds in config.rounds.items():
        for streaming in (False, True):
            row = Row(config, clients, streaming)
            for i in range(repeats):  # ABBA
                sides = (True, False) if i % 2 == 0 else (False, True)
                for inside in sides:
                    run_side(row, rounds, inside, engine, url, procs)
            print(
                f"# {config.model} {config.precision} {clients} clients "
                f"{'streaming' if streaming else 'non-streaming'}: in-process "
                f"{_runs(row.in_process)} tok/s, {statistics.mean(row.in_process_cores):.2f} "
                f"cores; HTTP {_runs(row.http)} tok/s, client "
                f"{statistics.mean(row.client_cores):.2f} cores, server "
                f"{statistics.mean(row.server_cores):.2f} cores",
                flush=True,
            )
            rows.append(row)
    return rows


def run_side(
    row: Row, rounds: int, inside: bool, engine: Engine, url: str, procs: list[psutil.Process]
) -> None:
    """One run of the level `row`, in-process or over HTTP; adds its figures to `row`."""
    if inside:
        level = in_process(engine, row.clients, rounds, row.streaming)
        tps, cores, _ = timed(lambda: asyncio.run(level), [])
        row.in_process.append(tps)
        row.in_process_cores.append(cores)
        return
    level = over_http(url, row.clients, rounds, row.streaming, row.config.client)
    tps, client, served = timed(lambda: asyncio.run(level), procs)
    row.http.append(tps)
    row.client_cores.append(client)
    row.server_cores.append(served)


def _runs(values: list[float]) -> str:
    return " / ".join(f"{v:,.0f}" for v in values)


def bench_config(config: Config, work: Path, repeats: int) -> list[Row]:
    folder = work / config.model  # one model store per model, for all its precisions
    if not (folder / "tag").exists():
        _, _, tag = prepare_model(folder, tiny=config.model == "tiny")
        (folder / "tag").write_text(tag)
    home, tag = folder / "bentoml_home", (folder / "tag").read_text()
    env = {"BENTOML_HOME": str(home), "TEXTGEN_MODEL": tag, **config.env}
    info = ModelInfo("gpt2", f"gpt2:{config.model}", "random", True, 1024)
    model = random_gpt2(tiny=config.model == "tiny")  # the weights the store holds
    engine = Engine(model, gpt2_tokenizer(), info, settings_of(env))
    engine.warm_up()  # as the service does before it says ready
    port = free_port()
    log = work / f"{config.model}-{config.precision}.log"
    serve = [sys.executable, "-m", "bentoml", "serve", "service:TextGeneration", "--port"]
    started = time.perf_counter()
    proc = start([*serve, str(port)], {"BENTOML_DO_NOT_TRACK": "True", **env}, port, log)
    print(
        f"# {config.model} {config.precision}: served in {time.perf_counter() - started:.0f}s",
        flush=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        widest = max(config.rounds)  # every batch width once on each side, untimed
        asyncio.run(in_process(engine, widest, 1, True))
        asyncio.run(over_http(url, widest, 1, True, config.client))
        return measure(config, engine, url, psutil.Process(proc.pid), repeats)
    finally:
        stop(proc)
        engine.shutdown()


def table(rows: list[Row]) -> str:
    lines = [
        "| model | precision | clients | streaming | in-process tok/s | HTTP tok/s "
        "| HTTP / in-process |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        inside, outside = max(row.in_process), max(row.http)
        lines.append(
            f"| {row.config.model} | {row.config.precision} | {row.clients} "
            f"| {'yes' if row.streaming else 'no'} | {inside:,.0f} | {outside:,.0f} "
            f"| {outside / inside:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer requests, once")
    parser.add_argument("--repeats", type=int, help="runs per side and level (default 2; 1 quick)")
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="HTTP client: a bare keep-alive connection per client (default), or httpx's pool",
    )
    parser.add_argument(
        "--only", nargs="+", choices=["float32", "int8", "bf16"], help="these precisions only"
    )
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    rows: list[Row] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="textgen-http-overhead-") as tmp:
        chosen = [c for c in configs(args.quick) if not args.only or c.precision in args.only]
        if not chosen:
            parser.error(f"--quick runs float32 only, not {' '.join(args.only)}")
        for config in (replace(c, client=args.client) for c in chosen):
            try:
                rows += bench_config(config, Path(tmp), repeats)
            except Exception as exc:  # the other models' rows still get printed
                print(f"# {config.model} {config.precision} failed: {exc!r}", flush=True)
                failed = True
    print(table(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
