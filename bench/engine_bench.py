"""In-process engine throughput (no HTTP): N concurrent requests of 64 tokens each.

python bench/engine_bench.py --dtype bfloat16 --quantize none --concurrency 1 32
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textgen.config import Settings
from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2
from textgen.params import SamplingParams

PROMPT = "In a shocking finding, scientists discovered a herd of unicorns living in a remote"


async def run(engine: Engine, concurrency: int, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    async def one() -> None:
        seq = engine.new_sequence(engine.tokenize(PROMPT), params)
        async for _ in engine.stream([seq]):
            pass

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return concurrency * new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    settings = Settings(
        dtype=args.dtype,
        quantize=args.quantize,
        device="cpu",
        max_batch_size=args.max_batch_size,
        prefix_caching=False,  # as bench/bench.py's servers: one prompt for every request
    )
    info = ModelInfo("gpt2", "gpt2:bench", "random", True, 1024)
    engine = Engine(random_gpt2(), gpt2_tokenizer(), info, settings)
    asyncio.run(run(engine, 2, 8))  # warm-up
    for c in args.concurrency:
        if args.profile:
            import torch.profiler as tp

            with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
                tps = asyncio.run(run(engine, c, args.new_tokens))
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        else:
            tps = asyncio.run(run(engine, c, args.new_tokens))
        print(f"dtype={args.dtype} quantize={args.quantize} concurrency={c}: {tps:.1f} tok/s")
    engine.shutdown()


if __name__ == "__main__":
    main()
