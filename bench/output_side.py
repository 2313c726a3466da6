"""The output side's CPU time per token: `process_step` on the event loop, no model.

    python bench/output_side.py [--rows 32] [--tokens 64] [--repeats 7]

Each case hands `rows` sequences one token a step for `tokens` steps, as the engine does
(`Engine._deliver`), with GPT-2's real tokenizer and random ids, and measures the CPU time
of `process_step` (detokenize, match stop strings, build and queue events, observe the
latencies) per token, the median of `--repeats` runs:
- streamed: events go to an asyncio.Queue, as a streaming response reads them;
- whole: events are held until the sequence finishes (`HeldEvents`, non-streaming);
- a stop string: streamed, each sequence with `stop=["\\n\\nHuman:"]`;
- long: 8 sequences of 1,000 tokens each, streamed (the text grows long).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textgen import metrics
from textgen.engine import HeldEvents
from textgen.models import gpt2_tokenizer
from textgen.output import SequenceOutput, detokenizer_factory, process_step
from textgen.params import SamplingParams
from textgen.scheduler import Sequence, Status
from textgen.text import TokenTable

VOCAB = 50257


def per_token(
    make: Callable[[], Any], rows: int, tokens: int, whole: bool, stop: tuple[str, ...], seed: int
) -> float:
    """CPU µs of `process_step` per token over one run (needs a running event loop);
    `make` makes a sequence's detokenizer."""
    rng = random.Random(seed)
    ids = [[rng.randrange(VOCAB - 1) for _ in range(tokens)] for _ in range(rows)]
    registry = metrics.get()
    outputs = []
    for _ in range(rows):
        seq = Sequence([1, 2], SamplingParams(max_new_tokens=tokens, stop=stop))
        seq.status = Status.RUNNING
        queue = HeldEvents(1) if whole else asyncio.Queue()
        outputs.append(SequenceOutput(seq, queue, make(), "bench", registry, lambda _s: None))
    started = time.process_time()
    for t in range(tokens):
        status = Status.FINISHED_LENGTH if t == tokens - 1 else None
        deltas = [(out, [ids[b][t]], None, status, None, 0, None) for b, out in enumerate(outputs)]
        process_step(deltas, time.perf_counter(), registry)  # type: ignore[arg-type]
    return (time.process_time() - started) / (rows * tokens) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tokenizer = gpt2_tokenizer()
    make = detokenizer_factory(tokenizer, TokenTable(tokenizer, VOCAB).visible)
    cases = {
        "streamed": (args.rows, args.tokens, False, ()),
        "whole": (args.rows, args.tokens, True, ()),
        "a stop string": (args.rows, args.tokens, False, ("\n\nHuman:",)),
        "long": (8, 1000, False, ()),
    }
    print("| case | rows x tokens | µs per token (median) | fastest |")
    print("|---|---|---:|---:|")
    for name, (rows, tokens, whole, stop) in cases.items():
        runs = [per_token(make, rows, tokens, whole, stop, seed) for seed in range(args.repeats)]
        print(
            f"| {name} | {rows} x {tokens} | {statistics.median(runs):.2f} | {min(runs):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
