"""Batching invariance on GPT-2 124M (random weights), float32, in-process.

    python bench/invariance.py

Each greedy request alone, then all of them together arriving at different
steps with different prompt and output lengths, some running past 300 tokens
and some cancelled mid-stream (their slots reused by later arrivals): every
request's tokens must equal its solo run (up to the cancellation). Prints one
line per request and exits non-zero on any difference or on leftover engine state.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textgen.config import Settings
from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2
from textgen.params import SamplingParams
from textgen.scheduler import TokenEvent

REQUESTS = [  # (arrival delay in seconds, prompt, new tokens, cancel after this many)
    (0.0, "The quick brown fox", 320, None),
    (0.0, "Hello", 17, None),
    (0.05, "In a shocking finding, scientists discovered a herd of unicorns living in a", 300, 120),
    (0.1, "Once upon a time there was a", 64, None),
    (0.2, "def fibonacci(n):", 260, 200),
    (0.3, "Artificial Intelligence is a", 300, None),
    (4.0, "The capital of France is", 8, None),
    (6.0, "Zürich, München, 東京 and", 150, None),
]


async def tokens(
    engine: Engine, delay: float, prompt: str, n: int, cancel_after: int | None
) -> list[int]:
    await asyncio.sleep(delay)
    seq = engine.new_sequence(engine.tokenize(prompt), SamplingParams(max_new_tokens=n))
    events = engine.stream([seq])
    ids: list[int] = []
    try:
        async for _, event in events:
            if isinstance(event, TokenEvent):
                ids.append(event.token_id)
                if len(ids) == cancel_after:
                    break
    finally:
        await events.aclose()
    return ids


async def main() -> int:
    info = ModelInfo("gpt2", "gpt2:invariance", "random", True, 1024)
    settings = Settings(dtype="float32", device="cpu", max_batch_size=4)
    engine = Engine(random_gpt2(), gpt2_tokenizer(), info, settings)
    alone = [await tokens(engine, 0, p, n, None) for _, p, n, _ in REQUESTS]
    together = await asyncio.gather(*(tokens(engine, *r) for r in REQUESTS))
    same = 0
    for (_, prompt, n, cancel_after), a, b in zip(REQUESTS, alone, together, strict=True):
        ok = a[: cancel_after or n] == b
        same += ok
        cut = f", cancelled after {cancel_after}" if cancel_after else ""
        print(f"{'same' if ok else 'DIFFERENT':9} {n:3} tokens{cut}  {prompt!r}")
    await asyncio.sleep(0.1)  # the last cancellations retire at the next step
    leftover = engine.scheduler.has_work or engine._sinks
    print(
        f"{same}/{len(REQUESTS)} requests identical alone and batched (float32, GPT-2 124M, "
        f"4 slots); engine state left over: {bool(leftover)}"
    )
    engine.shutdown()
    return 0 if same == len(REQUESTS) and not leftover else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
