"""Where the engine core runs: the front end's work per token done on the engine's event
loop (sharing the engine thread's GIL, as the server does) or in a process of its own.

    python bench/gil_share.py [--models tiny int8 bf16] [--work-us 40] [--repeats 2]

The engine runs in this process (built as bench/http_overhead.py builds it, same settings)
under a closed loop of `--clients` clients that stream their responses, reading each token
as it comes. A server's front end does more per token than these clients (an SSE event
through the middleware and a socket write, about 40 µs of CPU more on this machine's
tiny-model profiles), and does it when a step's tokens arrive. Each way adds `--work-us`
of pure Python per token read, at that moment:
- none: nothing added;
- thread: on the event loop itself, holding the GIL the engine thread needs for its next
  step's host work and after every torch op, as the server's front end does today;
- process: in a burner process of its own, told of each token by a byte down a pipe
  (vLLM's EngineCoreProc split: the front end holds none of the engine's GIL, and shares
  only the cores). This is the split's best case: it adds no serialization of requests
  and outputs between the two processes, only the pipe's write per token.
- process-nice: the same at nice 19.

Prints each run's tok/s and the share of one core the added work took, then a table of
every run of each way.
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

WAYS = ("none", "thread", "process", "process-nice")
NICE = 19
# The burner process: `work` seconds of pure Python for every byte read, until EOF.
BURNER = """
import os, sys, time
work = float(sys.argv[1])
if int(sys.argv[2]):
    os.nice(int(sys.argv[2]))
while chunk := os.read(0, 4096):
    until = time.perf_counter() + work * len(chunk)
    while time.perf_counter() < until:
        for i in range(20):
            pass
"""


def burn(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        for _ in range(20):
            pass


def with_work(
    way: str, work: float, run: Callable[[Callable[[], None] | None], float]
) -> tuple[float, float]:
    """(tok/s of `run(on_token)`, the share of one core the added work took)."""
    if way == "none":
        return run(None), 0.0
    if way == "thread":
        spent = 0.0

        def on_token() -> None:
            nonlocal spent
            started = time.thread_time()
            burn(work)
            spent += time.thread_time() - started

        started = time.perf_counter()
        tok_s = run(on_token)
        return tok_s, spent / (time.perf_counter() - started)
    nice = NICE if way == "process-nice" else 0
    proc = subprocess.Popen(
        [sys.executable, "-c", BURNER, str(work), str(nice)], stdin=subprocess.PIPE
    )
    assert proc.stdin is not None
    fd = proc.stdin.fileno()
    burner = psutil.Process(proc.pid)
    time.sleep(0.3)  # started
    before, started = sum(burner.cpu_times()[:2]), time.perf_counter()
    tok_s = run(lambda: os.write(fd, b"t"))
    share = (sum(burner.cpu_times()[:2]) - before) / (time.perf_counter() - started)
    proc.stdin.close()
    proc.wait()
    return tok_s, share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "int8", "bf16"])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=0, help="requests per client; 0: per model")
    parser.add_argument("--work-us", type=float, default=40.0, help="added per token read")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    args = parser.parse_args()
    ways = tuple(args.ways)
    chosen = {c.precision if c.model == "124M" else c.model: c for c in configs(quick=False)}
    rows = []
    for name in args.models:
        config = chosen[name]
        info = ModelInfo("gpt2", f"gpt2:{config.model}", "random", True, 1024)
        model = random_gpt2(tiny=config.model == "tiny")
        engine = Engine(model, gpt2_tokenizer(), info, settings_of(config.env))
        engine.warm_up()
        rounds = args.rounds or (4 if config.model == "tiny" else 2)

        def run(
            on_token: Callable[[], None] | None, engine: Engine = engine, rounds: int = rounds
        ) -> float:
            return asyncio.run(in_process(engine, args.clients, rounds, True, on_token))

        run(None)  # every batch width once, untimed
        results: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        for repeat in range(args.repeats):
            for way in ways if repeat % 2 == 0 else ways[::-1]:
                tok_s, share = with_work(way, args.work_us / 1e6, run)
                results[way].append((tok_s, share))
                print(f"{name} {way}: {tok_s:,.0f} tok/s, added work {share:.2f} core", flush=True)
        engine.shutdown()
        rows.append((name, results))
    print(f"\n{args.clients} streaming clients, {args.work_us:g} µs added per token")
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
