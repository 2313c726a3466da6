"""Host time per sequence per decode step: what the engine spends beside the model.

In-process, the tiny random GPT-2 (float32), B streams of greedy requests that all
decode for `--new-tokens` steps. Each decode step's wall time is split into
- forward: the runner's decode (the model);
- choose: the sampler's `choose` (its tensor work over (B, V) logits);
- host: everything else the engine thread does in the step, over B rows;
and the CPU time (not wall) of that host part on the engine thread, which other load
on the machine inflates far less than wall time, and the CPU time the event loop's
thread (the output side and the clients) spends per sequence per step. Each stream
reads every event as it comes, or with `--whole` once its response is whole (what a
non-streaming request does). `--sampling` picks how tokens are chosen (greedy, or drawn:
`temperature` alone as OpenAI clients send it, `top-p`, or `top-k` with top_p and a
temperature as Hugging Face's examples do); `--heap mapped` runs with glibc's own large
blocks (TEXTGEN_HEAP_LARGE_BLOCKS=false) instead of keeping them in the heap.

python bench/host_overhead.py --streams 256 --new-tokens 64 [--whole] [--sampling top-k]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textgen.config import Settings
from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2
from textgen.params import SamplingParams

PROMPT = "In a shocking finding, scientists discovered a herd of unicorns living in a remote"


class Timer:
    """Wraps a bound method; adds its wall time to `spent` and its thread's CPU time to
    `cpu` (seconds)."""

    def __init__(self, owner: Any, name: str) -> None:
        self.spent = self.cpu = 0.0
        self._inner = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.spent += time.perf_counter() - started
            self.cpu += time.thread_time() - cpu


SAMPLING: dict[str, dict[str, Any]] = {  # extra SamplingParams fields
    "greedy": {},
    "temperature": {"do_sample": True, "temperature": 0.7},
    "top-p": {"do_sample": True, "temperature": 0.7, "top_p": 0.95},
    "top-k": {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 50},
}


async def run(
    engine: Engine, streams: int, new_tokens: int, final_only: bool, sampling: str = "greedy"
) -> float:
    params = SamplingParams(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=0, **SAMPLING[sampling]
    )
    prompt = engine.tokenize(PROMPT)

    async def one() -> None:
        seq = engine.new_sequence(prompt, params)
        async for _ in engine.stream([seq], final_only=final_only):
            pass

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(streams)))
    return streams * new_tokens / (time.perf_counter() - started)


def measure(
    engine: Engine, streams: int, new_tokens: int, final_only: bool, sampling: str
) -> dict[str, float]:
    """Per full-batch decode step (every stream running, none admitted): ms of each part."""
    forward = Timer(engine.runner, "decode")
    choose = Timer(engine.sampler, "choose")
    # (wall, forward, choose, host CPU) of full steps
    steps: list[tuple[float, float, float, float]] = []
    inner_step = engine.step

    def step() -> bool:
        full = len(engine.scheduler.running) == streams and not engine.scheduler.num_waiting
        f0, c0, started = forward.spent, choose.spent, time.perf_counter()
        fc0, cc0, cpu = forward.cpu, choose.cpu, time.thread_time()
        try:
            return inner_step()
        finally:
            if full:
                wall = time.perf_counter() - started
                host_cpu = time.thread_time() - cpu - (forward.cpu - fc0) - (choose.cpu - cc0)
                steps.append((wall, forward.spent - f0, choose.spent - c0, host_cpu))

    engine.step = step  # type: ignore[method-assign]
    loop_cpu = time.thread_time()
    tps = asyncio.run(run(engine, streams, new_tokens, final_only, sampling))
    loop_cpu = time.thread_time() - loop_cpu
    engine.step = inner_step  # type: ignore[method-assign]
    engine.runner.decode, engine.sampler.choose = forward._inner, choose._inner
    steps = steps[1:-1]  # the first and last full steps border admission and retirement
    wall = statistics.median(s[0] for s in steps)
    fwd = statistics.median(s[1] for s in steps)
    cho = statistics.median(s[2] for s in steps)
    host = statistics.median(s[0] - s[1] - s[2] for s in steps)
    host_cpu = statistics.median(s[3] for s in steps)
    return {
        "tok/s": tps,
        "steps": len(steps),
        "step ms": wall * 1e3,
        "forward ms": fwd * 1e3,
        "choose ms": cho * 1e3,
        "host ms": host * 1e3,
        "host us/seq": host * 1e6 / streams,
        "host CPU us/seq": host_cpu * 1e6 / streams,
        "loop CPU us/seq": loop_cpu * 1e6 / (streams * new_tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[256])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="runs per setting; the median")
    parser.add_argument(
        "--whole", action="store_true", help="read each response whole (non-streaming)"
    )
    parser.add_argument("--sampling", choices=list(SAMPLING), default="greedy")
    parser.add_argument(
        "--heap", choices=["kept", "mapped"], default="kept", help="where large blocks live"
    )
    args = parser.parse_args()
    settings = Settings(
        heap_large_blocks=args.heap == "kept",
        dtype="float32",
        device="cpu",
        max_batch_size=max(args.streams),
        max_waiting=max(args.streams),
        prefix_caching=False,  # one prompt for every stream: nothing to measure there
    )
    info = ModelInfo("gpt2", "gpt2:tiny", "random", True, 1024)
    engine = Engine(random_gpt2(tiny=True), gpt2_tokenizer(), info, settings)
    asyncio.run(run(engine, 2, 8, False))  # warm-up
    print(
        "| streams | tok/s | step ms | forward ms | choose ms | host ms | host µs/seq "
        "| host CPU µs/seq | loop CPU µs/seq |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for streams in args.streams:
        runs = [
            measure(engine, streams, args.new_tokens, args.whole, args.sampling)
            for _ in range(args.rounds)
        ]
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {streams} | {row['tok/s']:,.0f} | {row['step ms']:.2f} | {row['forward ms']:.2f} "
            f"| {row['choose ms']:.2f} | {row['host ms']:.2f} | {row['host us/seq']:.1f} "
            f"| {row['host CPU us/seq']:.1f} | {row['loop CPU us/seq']:.1f} |"
        )
    engine.shutdown()


if __name__ == "__main__":
    main()
