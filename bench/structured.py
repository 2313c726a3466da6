"""Structured output costs, in-process (no HTTP), with llguidance.

1. compile time per constraint (cold: nothing cached; llguidance's vocabulary built);
2. mask time per step at 1, 8 and 32 constrained rows, replaying real outputs so each
   step's mask is for a new state (fill, then unpack to (C, V) bool, then apply);
3. throughput of N streams of 64 tokens, free vs constrained, at 8 and 32 streams
   (alternated, median of 3 runs each);
4. time to first token of one request, free vs constrained with its grammar cached.

With --compare, only compile times: llguidance's, then xgrammar's and outlines-core's,
when they are installed (they are not requirements: `pip install xgrammar==0.2.8
outlines-core==0.2.14`). Both compute every token mask of the grammar at compile time;
llguidance builds its lexer lazily, so part of its cost is in the per-step mask time.

python bench/structured.py [--model tiny|124m] [--dtype float32] [--quantize none] [--compare]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textgen import sampling
from textgen.config import Settings
from textgen.engine import Engine, ModelInfo
from textgen.models import gpt2_tokenizer, random_gpt2
from textgen.params import Constraint, SamplingParams
from textgen.scheduler import TokenEvent
from textgen.structured import GrammarCompiler, MaskBuilder

PROMPT = "In a shocking finding, scientists discovered a herd of unicorns living in a remote"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
# Never whole within 64 tokens (at least 40 items): a constrained stream runs its 64
# tokens, as a free one with min_new_tokens does.
LONG_LIST = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "label": {"type": "string", "maxLength": 16}},
        "required": ["id", "label"],
        "additionalProperties": False,
    },
}
WIDE = {  # 300 properties, each with a pattern: a large schema
    "type": "object",
    "properties": {
        f"field_{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1},{i % 7 + 30}}}[0-9]{{2}}"}
        for i in range(300)
    },
}
CONSTRAINTS = {
    "json: person (nested, bounded)": Constraint.json_schema(PERSON, "bench"),
    "json: list of 40+ objects": Constraint.json_schema(LONG_LIST, "bench"),
    "json: 300 properties with patterns": Constraint.json_schema(WIDE, "bench"),
    "json_object (any object)": Constraint.json_schema({"type": "object"}, "bench"),
    "regex: email-like": Constraint.text("regex", r"[a-z]{1,20}@[a-z]{1,20}\.(com|org)", "bench"),
    "choice: 3 strings": Constraint.choice(["positive", "negative", "neutral"], "bench"),
}


def compile_times(tokenizer: object, repeats: int = 5) -> None:
    compiler = GrammarCompiler(tokenizer, 50257, timeout_s=60)
    started = time.perf_counter()
    compiler.tokenizer  # noqa: B018
    print(f"llguidance vocabulary from the GPT-2 tokenizer: {time.perf_counter() - started:.2f} s")
    print("| constraint | compile ms (median of 5, cold) |\n|---|---:|")
    for name, constraint in CONSTRAINTS.items():
        times = []
        for _ in range(repeats):
            compiler._cache.clear()  # cold: every compile from scratch
            started = time.perf_counter()
            compiler.compile_blocking(constraint)
            times.append(time.perf_counter() - started)
        print(f"| {name} | {1e3 * statistics.median(times):.1f} |")
    compiler.shutdown()


def compare_compile_times(tokenizer: object) -> None:
    """xgrammar's and outlines-core's compile of the same constraints, in ms (one run
    each for outlines-core, median of 3 for xgrammar), compact JSON for both."""
    try:
        import xgrammar
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError as exc:
        print(f"\n--compare: {exc} (pip install xgrammar==0.2.8 outlines-core==0.2.14)")
        return
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=50257)
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    tokens: dict[str, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id != tokenizer.eos_token_id:
            tokens.setdefault(text, []).append(token_id)
    vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)

    def xgrammar_compile(c: Constraint) -> None:
        if c.kind == "json":
            compiler.compile_json_schema(c.spec, any_whitespace=False)
        elif c.kind == "regex":
            compiler.compile_regex(c.spec)
        else:
            options = " | ".join(json.dumps(o) for o in json.loads(c.spec))
            compiler.compile_grammar(f"root ::= {options}")

    def outlines_compile(c: Constraint) -> None:
        if c.kind == "json":
            pattern = build_regex_from_schema(c.spec, whitespace_pattern="")
        elif c.kind == "regex":
            pattern = c.spec
        else:
            pattern = "(" + "|".join(re.escape(o) for o in json.loads(c.spec)) + ")"
        Index(pattern, vocabulary)

    print("\n| constraint | xgrammar ms | outlines-core ms |\n|---|---:|---:|")
    for name, constraint in CONSTRAINTS.items():
        xg = []
        for _ in range(3):
            started = time.perf_counter()
            xgrammar_compile(constraint)
            xg.append(time.perf_counter() - started)
        started = time.perf_counter()
        outlines_compile(constraint)
        oc = time.perf_counter() - started
        print(f"| {name} | {1e3 * statistics.median(xg):.1f} | {1e3 * oc:.1f} |", flush=True)


async def outputs(engine: Engine, constraint: Constraint, count: int) -> list[list[int]]:
    """Sampled constrained outputs (token ids) to replay."""
    grammar = await engine.grammar(constraint)
    seqs = [
        engine.new_sequence(
            engine.tokenize(f"{PROMPT} {k}"),
            SamplingParams(max_new_tokens=64, do_sample=True, seed=k, constraint=constraint),
            grammar,
        )
        for k in range(count)
    ]
    ids: list[list[int]] = [[] for _ in seqs]
    async for i, event in engine.stream(seqs):
        if isinstance(event, TokenEvent):
            ids[i].append(event.token_id)
    return ids


def mask_times(engine: Engine, constraint: Constraint, rows: int, tokens: list[list[int]]) -> str:
    """Mean per step over a replay of `tokens[:rows]`, in ms: fill on the engine thread
    (threads 0) and on a pool of 2, unpack to (C, V) bool, set the forbidden logits."""
    grammar = engine.grammars.compile_blocking(constraint)
    builders = [MaskBuilder(engine.vocab_size, rows, threads) for threads in (0, 2)]
    matchers = [[grammar.matcher() for _ in range(rows)] for _ in builders]
    logits = torch.randn(rows, engine.vocab_size)
    steps = min(len(t) for t in tokens[:rows])
    totals = [0.0] * 4  # fill serial, fill pool, unpack, set -inf
    for step in range(steps):
        for k, (builder, ms) in enumerate(zip(builders, matchers, strict=True)):
            started = time.perf_counter()
            bits = builder.fill(ms)
            totals[k] += time.perf_counter() - started
        started = time.perf_counter()
        forbidden = builder.unpack(~bits, torch.device("cpu"))
        totals[2] += time.perf_counter() - started
        copy = logits.clone()  # the sampler's processed copy, made anyway
        started = time.perf_counter()
        sampling._mask_out(copy, forbidden)
        totals[3] += time.perf_counter() - started
        for ms in matchers:
            for m, t in zip(ms, tokens, strict=False):
                m.advance(t[step])
    per_step = (f"{1e3 * t / max(steps, 1):.3f}" for t in totals)
    return f"| {rows} | {steps} | " + " | ".join(per_step) + " |"


async def throughput(
    engine: Engine, streams: int, constraint: Constraint | None, new_tokens: int = 64
) -> float:
    grammar = await engine.grammar(constraint)
    min_new = 0 if constraint else new_tokens
    params = SamplingParams(
        max_new_tokens=new_tokens, min_new_tokens=min_new, constraint=constraint
    )
    seqs = [
        engine.new_sequence(engine.tokenize(f"{PROMPT} {k}"), params, grammar)
        for k in range(streams)
    ]
    generated = 0
    started = time.perf_counter()
    async for _, event in engine.stream(seqs):
        generated += isinstance(event, TokenEvent)
    return generated / (time.perf_counter() - started)


async def first_token(engine: Engine, constraint: Constraint | None, repeats: int = 20) -> float:
    """Median seconds from submission to the first token of one request (grammar cached)."""
    grammar = await engine.grammar(constraint)
    times = []
    for k in range(repeats):
        params = SamplingParams(max_new_tokens=2, constraint=constraint)
        seq = engine.new_sequence(engine.tokenize(f"{PROMPT} {k}"), params, grammar)
        started = time.perf_counter()
        first = None
        async for _, event in engine.stream([seq]):
            if first is None and isinstance(event, TokenEvent):
                first = time.perf_counter() - started
        times.append(first)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "124m"], default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--grammar-threads", type=int, default=None)  # None: by device
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    tokenizer = gpt2_tokenizer()
    print(f"torch threads: {torch.get_num_threads()}")
    if not args.skip_compile:
        compile_times(tokenizer)
    if args.compare:  # compile times only
        compare_compile_times(tokenizer)
        return
    settings = Settings(
        dtype=args.dtype,
        quantize=args.quantize,
        device="cpu",
        max_batch_size=32,
        grammar_threads=args.grammar_threads,
    )
    info = ModelInfo("gpt2", "gpt2:bench", "random", True, 1024)
    engine = Engine(random_gpt2(tiny=args.model == "tiny"), tokenizer, info, settings)
    engine.warm_up()
    person = CONSTRAINTS["json: person (nested, bounded)"]
    long_list = CONSTRAINTS["json: list of 40+ objects"]
    replay = asyncio.run(outputs(engine, long_list, 32))
    print("\nmask per step, list of 40+ objects, replayed sampled outputs (ms)")
    print("| rows | steps | fill, engine thread | fill, pool of 2 | unpack | set -inf |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in (1, 8, 32):
        print(mask_times(engine, long_list, rows, replay))
    print(
        f"\nthroughput, {args.model} {args.dtype} quantize={args.quantize} "
        f"grammar_threads={args.grammar_threads}, 64 tokens each"
    )
    print(
        "| streams | free tok/s | constrained tok/s | constrained / free |\n|---:|---:|---:|---:|"
    )
    asyncio.run(throughput(engine, 8, long_list))  # warm
    for streams in (8, 32):  # alternated, 3 runs each, medians: the load here varies
        runs = [
            (
                asyncio.run(throughput(engine, streams, None)),
                asyncio.run(throughput(engine, streams, long_list)),
            )
            for _ in range(3)
        ]
        free = statistics.median(f for f, _ in runs)
        constrained = statistics.median(c for _, c in runs)
        print(f"| {streams} | {free:.0f} | {constrained:.0f} | {constrained / free:.2f} |")
    free_ttft = asyncio.run(first_token(engine, None))
    constrained_ttft = asyncio.run(first_token(engine, person))
    print(
        f"\ntime to first token, one request (median of 20): free {1e3 * free_ttft:.1f} ms, "
        f"constrained (cached) {1e3 * constrained_ttft:.1f} ms, "
        f"added {1e3 * (constrained_ttft - free_ttft):.1f} ms"
    )
    engine.shutdown()


if __name__ == "__main__":
    main()
