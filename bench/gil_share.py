"""Where the engine core runs: the front end's extra work per streamed token done on the
engine's event loop (sharing the engine thread's GIL, as the server does) or in a process
of its own.

    python bench/gil_share.py [--models tiny int8 bf16] [--work-us 40] [--repeats 4]

The engine runs in this process (built as bench/http_overhead.py builds it, same settings)
under a closed loop of `--clients` clients that stream their responses, reading each token
as it comes. A served process does more per streamed token than these clients (an SSE
event through the middleware and a socket write): its event loop's CPU time per streamed
token, at 32 clients on the tiny model, is several times the in-process loop's. Each way
adds `--work-us` of CPU time in pure Python per token read:
- none: nothing added;
- thread: on the event loop, as the token is read, holding the GIL that the engine thread
  needs for its next step's host work and after every torch op, as a server's front end
  does today;
- process: in a burner process of its own, told of each token by a byte down a pipe.

`process` moves only the added work out: the output side (`process_step`) and the clients
stay on this process's event loop, which (and so every client) waits for the burner only
when the pipe is full (`PIPE_TOKENS` behind), never for the work on a token it has read.
So it is the best case for moving the front end's extra work out of the engine's process
(vLLM's EngineCoreProc split), not a model of that split.

Prints each run's tok/s and the share of one core the added work took (CPU time over the
run's wall time), then every run's tok/s per way and the largest share of its runs.

The int8 model runs on the CPU only (`--models tiny bf16` on a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from http_overhead import configs, in_process, settings_of

from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2

WAYS = ("none", "thread", "process")
# The pipe to the burner holds this many tokens (one byte each; one page, Linux's least):
# a burner that falls that far behind blocks the event loop, and so every client, as a
# front end that falls behind would hold up its clients.
PIPE_TOKENS = 4096
MODELS = ("tiny", "int8", "bf16")
# The burner process: `work` seconds of its CPU time in pure Python for every byte read,
# until EOF. CPU time, not wall time: a burner that is descheduled owes the work still.
BURNER = """
import os, sys, time
work = float(sys.argv[1])
print("ready", flush=True)
while chunk := os.read(0, 4096):
    until = time.process_time() + work * len(chunk)
    while time.process_time() < until:
        for i in range(20):
            pass
"""


def burn(seconds: float) -> None:
    """`seconds` of this thread's CPU time in pure Python (holding the GIL meanwhile)."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        for _ in range(20):
            pass


def with_work(
    way: str, work: float, run: Callable[[Callable[[], None] | None], float]
) -> tuple[float, float, float | None]:
    """(tok/s of `run(on_token)`, the share of one core the added work took, and for the
    process way how long after the run the burner finished its work)."""
    if way == "none":
        return run(None), 0.0, None
    if way == "thread":
        spent = 0.0

        def on_token() -> None:
            nonlocal spent
            started = time.thread_time()
            burn(work)
            spent += time.thread_time() - started

        started = time.perf_counter()
        tok_s = run(on_token)
        return tok_s, spent / (time.perf_counter() - started), None
    burner = subprocess.Popen(
        [sys.executable, "-c", BURNER, str(work)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pipesize=PIPE_TOKENS,
    )
    assert burner.stdin is not None and burner.stdout is not None
    try:
        if burner.stdout.readline() != b"ready\n":
            raise RuntimeError("the burner did not start")
        fd, cpu = burner.stdin.fileno(), psutil.Process(burner.pid).cpu_times
        before, started = sum(cpu()[:2]), time.perf_counter()
        tok_s = run(lambda: os.write(fd, b"t"))
        share = (sum(cpu()[:2]) - before) / (time.perf_counter() - started)
    finally:
        burner.stdin.close()
        ended = time.perf_counter()
        burner.wait()
        burner.stdout.close()
    return tok_s, share, time.perf_counter() - ended


def compare(
    engine: Engine, rounds: int, ways: tuple[str, ...], args: argparse.Namespace
) -> dict[str, list[tuple[float, float]]]:
    """Each way's runs, in ABBA order: (tok/s, share of a core the added work took)."""

    def run(on_token: Callable[[], None] | None) -> float:
        return asyncio.run(in_process(engine, args.clients, rounds, True, on_token))

    run(None)  # untimed: the engine's first closed loop
    results: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    for repeat in range(args.repeats):
        for way in ways if repeat % 2 == 0 else ways[::-1]:
            tok_s, share, lag = with_work(way, args.work_us / 1e6, run)
            results[way].append((tok_s, share))
            late = "" if lag is None else f", the burner done {lag:.2f} s after the run"
            print(f"{way}: {tok_s:,.0f} tok/s, added work {share:.2f} core{late}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=0, help="requests per client; 0: per model")
    parser.add_argument("--work-us", type=float, default=40.0, help="CPU µs added per token read")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    args = parser.parse_args()
    ways = tuple(args.ways)
    chosen = {c.precision if c.model == "124M" else c.model: c for c in configs(quick=False)}
    rows = []
    for name in args.models:
        config = chosen[name]
        print(f"# {name}", flush=True)
        info = ModelInfo("gpt2", f"gpt2:{config.model}", "random", True, 1024)
        model = random_gpt2(tiny=config.model == "tiny")
        engine = Engine(model, gpt2_tokenizer(), info, settings_of(config.env))
        try:
            engine.warm_up()
            rounds = args.rounds or (4 if config.model == "tiny" else 2)
            rows.append((name, compare(engine, rounds, ways, args)))
        finally:
            engine.shutdown()
    print(f"\n{args.clients} streaming clients, {args.work_us:g} µs of CPU added per token")
    print("\n| model | " + " | ".join(f"{way}: tok/s (core)" for way in ways) + " |")
    print("|---|" + "---:|" * len(ways))
    for name, results in rows:
        cells = [
            ", ".join(f"{tok_s:,.0f}" for tok_s, _ in results[way])
            + f" ({max(share for _, share in results[way]):.2f})"
            for way in ways
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
