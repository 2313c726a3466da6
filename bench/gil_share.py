"""Where the engine core runs: what a busy front end costs it from a thread of its own
process (sharing the GIL, as the server's event loop does) or from a process of its own.

    python bench/gil_share.py [--models tiny int8 bf16] [--busy 0.25] [--burst-ms 1]

The engine runs in this process (built as bench/http_overhead.py builds it, with the same
settings), under a closed loop of `--clients` clients that read their responses whole, so
that the event loop itself does little. Beside it a burner stands in for the server's front
end (HTTP, the output side): runs of pure Python `--burst-ms` long, then sleep, keeping
`--busy` of one core busy. Three ways, alternated `--repeats` times:
- none: no burner;
- thread: the burner on a thread of this process: while it runs it holds the GIL, which the
  engine thread must take back after every torch op, as the server's event loop does today;
- process: the burner in a process of its own (vLLM's EngineCoreProc split: the front end
  keeps none of the engine's GIL, but shares the 2 cores all the same).

Prints each run's tok/s and the share of a core the burner really kept busy; then a table
of the fastest run of each way. If `process` is well above `thread` at the same busy share,
moving the engine core to its own process pays; if both are near each other, the cores,
not the GIL, are what the front end takes from the model.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from http_overhead import configs, in_process, settings_of

from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2

# Pure Python for `burst` seconds, then sleep, until stdin closes (the process way) or
# `stop` is set (the thread way); the same code runs both ways.
BURNER = """
import os, sys, threading, time
def burn(busy, burst, stopped, nice=0):
    if nice:  # this thread only (Linux: a thread's own niceness)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    period = burst / busy
    while not stopped():
        started = time.perf_counter()
        x = 0
        while time.perf_counter() - started < burst:
            for i in range(100):
                x += i
        time.sleep(max(0.0, period - (time.perf_counter() - started)))
"""
PROCESS_MAIN = """
import threading
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
burn(float(sys.argv[1]), float(sys.argv[2]), done.is_set, int(sys.argv[3]))
"""
WAYS = ("none", "thread", "process", "thread-nice", "process-nice")
NICE = 19  # the -nice ways: the burner at the lowest priority


def with_burner(
    way: str, busy: float, burst: float, run: Callable[[], float]
) -> tuple[float, float]:
    """(tok/s of `run`, the share of one core the burner kept busy meanwhile)."""
    if way == "none":
        return run(), 0.0
    nice = NICE if way.endswith("-nice") else 0
    if way.startswith("process"):
        code = BURNER + PROCESS_MAIN
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(busy), str(burst), str(nice)], stdin=subprocess.PIPE
        )
        burner = psutil.Process(proc.pid)
        time.sleep(0.5)  # started and burning
        before, started = sum(burner.cpu_times()[:2]), time.perf_counter()
        tok_s = run()
        busy_share = (sum(burner.cpu_times()[:2]) - before) / (time.perf_counter() - started)
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()
        return tok_s, busy_share
    scope: dict = {}
    exec(BURNER, scope)  # the burner's code, above
    stop = threading.Event()
    cpu: list[float] = []

    def thread() -> None:
        started = time.thread_time()
        scope["burn"](busy, burst, stop.is_set, nice)
        cpu.append(time.thread_time() - started)

    worker = threading.Thread(target=thread, name="burner")
    worker.start()
    started = time.perf_counter()
    tok_s = run()
    wall = time.perf_counter() - started
    stop.set()
    worker.join()
    return tok_s, cpu[0] / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "int8", "bf16"])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=0, help="requests per client; 0: per model")
    parser.add_argument("--busy", type=float, default=0.25, help="share of one core burned")
    parser.add_argument("--burst-ms", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    args = parser.parse_args()
    ways = tuple(args.ways)
    chosen = {c.precision if c.model == "124M" else c.model: c for c in configs(quick=False)}
    rows = []
    for name in args.models:
        config = chosen[name]
        info = ModelInfo("gpt2", f"gpt2:{config.model}", "random", True, 1024)
        engine = Engine(
            random_gpt2(tiny=config.model == "tiny"),
            gpt2_tokenizer(),
            info,
            settings_of(config.env),
        )
        engine.warm_up()
        rounds = args.rounds or (4 if config.model == "tiny" else 2)

        def run(engine: Engine = engine, rounds: int = rounds) -> float:
            return asyncio.run(in_process(engine, args.clients, rounds, streaming=False))

        run()  # every batch width once, untimed
        results: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        for repeat in range(args.repeats):
            order = ways if repeat % 2 == 0 else ways[::-1]
            for way in order:
                tok_s, share = with_burner(way, args.busy, args.burst_ms / 1000, run)
                results[way].append((tok_s, share))
                print(f"{name} {way}: {tok_s:,.0f} tok/s, burner {share:.2f} core", flush=True)
        engine.shutdown()
        rows.append((name, results))
    print(f"\n{args.clients} clients, burner asked {args.busy:.2f} core in {args.burst_ms} ms runs")
    print("\n| model | " + " | ".join(f"{way} tok/s (core)" for way in ways) + " |")
    print("|---|" + "---:|" * len(ways))
    for name, results in rows:
        best = {way: max(results[way]) for way in ways}
        cells = [f"{best[w][0]:,.0f} ({best[w][1]:.2f})" for w in ways]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
