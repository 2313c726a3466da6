"""Structured output costs, in-process (no HTTP), with llguidance.

1. compile time per constraint (cold: nothing cached; llguidance's vocabulary built);
2. mask time per step at 1, 8 and 32 constrained rows, replaying real outputs so each
   step's mask is for a new state (fill, then unpack to (C, V) bool, then apply);
3. throughput of N streams of 64 tokens, free vs constrained, at 8 and 32 streams
   (alternated, median of 3 runs each);
4. time to first token of one request, free vs constrained with its grammar cached.

With --http, the same questions through HTTP instead: GPT-2 124M (random weights, real
tokenizer) served by `bentoml serve` with the CPU defaults, 8 and 32 concurrent streaming
clients on /generate_stream, constrained (a bounded schema never whole within the
tokens asked for) against free requests of exactly as many tokens (alternated, median of 3
rounds each); time to first token of one request, free against constrained with its schema
seen before and with a schema never seen (its compile, as a client sees it).

With --compare, only compile times: llguidance's, then xgrammar's and outlines-core's,
when they are installed (they are not requirements: `pip install xgrammar==0.2.8
outlines-core==0.2.14`). Both compute every token mask of the grammar at compile time;
llguidance builds its lexer lazily, so part of its cost is in the per-step mask time.

python bench/structured.py [--model tiny|124m] [--dtype float32] [--quantize none] [--compare]
python bench/structured.py --http [--streams 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadgen import closed_loop, pool  # bench/loadgen.py, beside this file

from bench import prepare_model, scan_events, start, stop  # bench/bench.py, beside this file
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
# LONG_LIST bounded: every value has a bound, and at least 40 items (over 300 tokens) are
# never whole within 64 tokens, so a constrained stream runs as many tokens as a free one.
BOUNDED_LIST = {
    "type": "array",
    "minItems": 40,
    "maxItems": 60,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "label": {"type": "string", "maxLength": 16},
        },
        "required": ["id", "label"],
        "additionalProperties": False,
    },
}
CONSTRAINTS = {
    "json: person (nested, bounded)": Constraint.json_schema(PERSON, "bench"),
    "json: list of 40+ objects": Constraint.json_schema(LONG_LIST, "bench"),
    # Past params.MAX_CONSTRAINT_CHARS (no request may send it): built here directly, to
    # time the compiler on a large schema.
    "json: 300 properties with patterns": Constraint(
        "json", json.dumps(WIDE, separators=(",", ":")), "bench"
    ),
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


HTTP_SAMPLING = {
    "greedy": {},
    "sampled": {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 50},
}


async def http_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[float, int]:
    """(seconds to the first token, tokens) of one /generate_stream request."""
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/generate_stream", json=body) as r:
        r.raise_for_status()
        first, tokens, last = await scan_events(r, b'data: {"token"', started)
    if b'"error"' in last:
        raise RuntimeError(f"the stream ended with an error: {last!r}")
    return first, tokens


async def http_throughput(url: str, clients: int, body: dict[str, Any], rounds: int) -> float:
    """Output tokens/s of `clients` concurrent clients, each sending `rounds` requests."""
    async with pool(clients) as client:

        async def one(k: int, r: int) -> int:
            seeded = {**body, "seed": k * rounds + r} if body.get("do_sample") else body
            return (await http_request(client, url, seeded))[1]

        tokens, wall = await closed_loop(clients, one, rounds=rounds)
        return sum(tokens) / wall


async def http_first_tokens(url: str, bodies: list[dict[str, Any]]) -> list[float]:
    """Seconds to the first token of each body, sent one after another."""
    async with httpx.AsyncClient(timeout=120) as client:
        return [(await http_request(client, url, body))[0] for body in bodies]


def fresh_schema(k: int) -> dict[str, Any]:
    """PERSON with one property named for `k`: a schema the server has not compiled."""
    return {**PERSON, "properties": {**PERSON["properties"], f"note_{k}": {"type": "boolean"}}}


def http_bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, home, tag = prepare_model(work)
        port = 3931
        env = {
            "BENTOML_HOME": str(home),
            "TEXTGEN_MODEL": tag,
            "TEXTGEN_MAX_BATCH_SIZE": "32",
            "TEXTGEN_PREFIX_CACHING": "false",  # each request's prompt computed, as free ones
        }
        serve = [sys.executable, "-m", "bentoml", "serve", "service:TextGeneration"]
        log = work / "serve.log"
        proc = start([*serve, "--port", str(port)], env, port, log)
        url = f"http://127.0.0.1:{port}"
        try:
            http_levels(url, args)
            http_latencies(url)
        finally:
            stop(proc)
        failures = [line for line in log.read_text().splitlines() if "failed" in line]
        if failures:
            print("\nthe server logged failures:\n" + "\n".join(failures[:10]))


def http_levels(url: str, args: argparse.Namespace) -> None:
    n = args.new_tokens
    free = {"prompt": PROMPT, "max_new_tokens": n, "min_new_tokens": n}
    constrained = {"prompt": PROMPT, "max_new_tokens": n, "json_schema": BOUNDED_LIST}
    asyncio.run(http_throughput(url, 4, {**constrained, "max_new_tokens": 8}, 1))  # warm
    print(
        f"\nthroughput through HTTP, GPT-2 124M random, CPU defaults, {n} tokens per request, "
        "median of 3 alternated rounds"
    )
    print("| sampling | clients | free tok/s | constrained tok/s | constrained / free |")
    print("|---|---:|---:|---:|---:|")
    for name in args.sampling:
        extra = HTTP_SAMPLING[name]
        for clients in args.streams:
            rounds = max(1, args.requests // clients)
            runs = [
                (
                    asyncio.run(http_throughput(url, clients, {**free, **extra}, rounds)),
                    asyncio.run(http_throughput(url, clients, {**constrained, **extra}, rounds)),
                )
                for _ in range(3)
            ]
            f = statistics.median(r[0] for r in runs)
            c = statistics.median(r[1] for r in runs)
            print(f"| {name} | {clients} | {f:.1f} | {c:.1f} | {c / f:.2f} |", flush=True)


def http_latencies(url: str, repeats: int = 20) -> None:
    """Time to first token of one request at a time: free, constrained with its schema
    cached, and constrained with a schema never seen (compiled on its arrival)."""
    free = {"prompt": PROMPT, "max_new_tokens": 1, "min_new_tokens": 1}
    cached = {"prompt": PROMPT, "max_new_tokens": 1, "json_schema": PERSON}
    asyncio.run(http_first_tokens(url, [cached, free]))  # compiles PERSON, warms both
    pairs = asyncio.run(http_first_tokens(url, [free, cached] * repeats))
    free_s = statistics.median(pairs[0::2])
    cached_s = statistics.median(pairs[1::2])
    new = [{**cached, "json_schema": fresh_schema(k)} for k in range(repeats // 2)]
    new_s = statistics.median(asyncio.run(http_first_tokens(url, new)))
    print(f"\ntime to first token through HTTP, one request at a time (median of {repeats})")
    print("| request | TTFT ms | added to a free request's, ms |\n|---|---:|---:|")
    print(f"| free | {1e3 * free_s:.1f} | – |")
    print(f"| schema seen before | {1e3 * cached_s:.1f} | {1e3 * (cached_s - free_s):.1f} |")
    print(
        f"| new schema (compiled on arrival; median of {len(new)}) | {1e3 * new_s:.1f} | "
        f"{1e3 * (new_s - free_s):.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "124m"], default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--grammar-threads", type=int, default=None)  # None: by device
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--http", action="store_true", help="through bentoml serve, 124M")
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 32])  # --http
    parser.add_argument("--sampling", nargs="+", choices=list(HTTP_SAMPLING), default=["greedy"])
    parser.add_argument("--requests", type=int, default=64)  # --http: per level, per kind
    parser.add_argument("--new-tokens", type=int, default=64)  # --http
    args = parser.parse_args()
    if args.http:
        http_bench(args)
        return
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
