"""Batching invariance on GPT-2 124M (random weights), float32, in-process.

    python bench/invariance.py

Each greedy request alone, then all of them together arriving at different
steps with different prompt and output lengths: the tokens must be identical.
Prints one line per request and exits non-zero on any difference.
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

REQUESTS = [  # (arrival delay in seconds, prompt, new tokens)
    (0.0, "The quick brown fox", 64),
    (0.0, "Hello", 17),
    (0.05, "In a shocking finding, scientists discovered a herd of unicorns living in a", 40),
    (0.1, "Once upon a time there was a", 64),
    (0.2, "def fibonacci(n):", 23),
    (0.3, "Artificial Intelligence is a", 50),
    (0.3, "The capital of France is", 8),
    (0.5, "Zürich, München, 東京 and", 32),
]


async def tokens(engine: Engine, delay: float, prompt: str, n: int) -> list[int]:
    await asyncio.sleep(delay)
    seq = engine.new_sequence(engine.encode(prompt, n), SamplingParams(max_new_tokens=n))
    return [e.token_id async for _, e in engine.stream([seq]) if hasattr(e, "token_id")]


async def main() -> int:
    info = ModelInfo("gpt2", "gpt2:invariance", "random", True, 1024)
    engine = Engine(random_gpt2(), gpt2_tokenizer(), info, Settings(dtype="float32", device="cpu"))
    alone = [await tokens(engine, 0, p, n) for _, p, n in REQUESTS]
    together = await asyncio.gather(*(tokens(engine, *r) for r in REQUESTS))
    same = 0
    for (_, prompt, n), a, b in zip(REQUESTS, alone, together, strict=True):
        same += a == b
        print(f"{'same' if a == b else 'DIFFERENT':9} {n:3} tokens  {prompt!r}")
    print(f"{same}/{len(REQUESTS)} requests identical alone and batched (float32, GPT-2 124M)")
    engine.shutdown()
    return 0 if same == len(REQUESTS) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
