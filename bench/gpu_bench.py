"""GPU throughput in one command: the engine in-process, Hugging Face `generate` on the
same weights, and the service over HTTP; prints one markdown table.

    python bench/gpu_bench.py                         # CUDA, float16, 1 16 64 256 streams
    python bench/gpu_bench.py --device cpu --quick    # a smoke run anywhere (tiny model)

GPT-2 124M with seeded random weights (`--quick`: the tiny model), prompts of 4 to 20
tokens, every request generating exactly `--new-tokens` (128) tokens. For each number
of streams: the engine in-process (started and warmed up as the service does it, then
the load run twice: `cold` is its first run, `warm` the same load again); HF `generate`
with all streams as one left-padded batch (twice); the service (`bentoml serve`,
`TEXTGEN_MAX_BATCH_SIZE` = the most streams) with that many concurrent non-streaming
clients on `/generate` and on `/v1/completions` (twice each). Throughput is output
tokens per second of wall time. Meant to finish within 5 minutes on one H100 or H200.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadgen import closed_loop, pool  # noqa: E402 (bench/loadgen.py, beside this file)

from bench import free_port, import_model, start, stop  # noqa: E402 (bench/bench.py)
from textgen.config import Settings  # noqa: E402
from textgen.engine import Engine, ModelInfo  # noqa: E402
from textgen.models import gpt2_tokenizer, random_gpt2  # noqa: E402
from textgen.params import SamplingParams  # noqa: E402

TEXT = (
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote, "
    "previously unexplored valley in the Andes Mountains. Even more surprising to the "
    "researchers was the fact that the unicorns spoke perfect English."
)
MIN_PROMPT, MAX_PROMPT = 4, 20  # prompt tokens


@dataclass
class Row:
    system: str  # what ran: "textgen in-process", "HF generate", "HTTP /generate", ...
    streams: int
    cold: float  # tok/s, the load's first run
    warm: float  # tok/s, the same load again
    errors: int = 0  # failed requests (HTTP only)


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """`n` prompts of MIN_PROMPT..MAX_PROMPT tokens, lengths cycling."""
    ids = tokenizer(TEXT).input_ids
    span = MAX_PROMPT - MIN_PROMPT + 1
    return [ids[: MIN_PROMPT + i % span] for i in range(n)]


def in_process(args: argparse.Namespace, tokenizer: Any) -> list[Row]:
    settings = Settings(
        device=args.device,
        dtype=args.dtype,
        quantize="none",
        max_batch_size=max(args.streams),
        prefix_caching=False,  # every run repeats its prompts: nothing may be cached
    )
    info = ModelInfo("gpt2", "gpt2:bench", "random", True, 1024)
    started = time.perf_counter()
    engine = Engine(random_gpt2(tiny=args.quick), tokenizer, info, settings)
    engine.warm_up()
    graphs = len(engine.runner.graphs)
    print(f"# engine ready in {time.perf_counter() - started:.1f}s ({graphs} CUDA graphs)")
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    async def load(n: int) -> float:
        async def one(prompt: list[int]) -> None:
            async for _ in engine.stream([engine.new_sequence(prompt, params)]):
                pass

        begun = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts(tokenizer, n)))
        return n * args.new_tokens / (time.perf_counter() - begun)

    rows = []
    try:
        for n in args.streams:
            cold, warm = asyncio.run(load(n)), asyncio.run(load(n))
            rows.append(Row("textgen in-process", n, cold, warm))
            print(f"  in-process {n:>4} streams: {cold:9.1f} cold, {warm:9.1f} warm tok/s")
    finally:
        engine.shutdown()
    return rows


@torch.inference_mode()
def hf_generate(args: argparse.Namespace, tokenizer: Any) -> list[Row]:
    """The model's own `generate`, all streams in one left-padded batch, greedy."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = random_gpt2(tiny=args.quick).to(device=device, dtype=dtype)
    eos = model.config.eos_token_id

    def run(ids: torch.Tensor, mask: torch.Tensor) -> float:
        begun = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=eos,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return ids.shape[0] * args.new_tokens / (time.perf_counter() - begun)

    rows = []
    for n in args.streams:
        batch = prompts(tokenizer, n)
        width = max(len(p) for p in batch)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        cold, warm = run(ids, mask), run(ids, mask)
        rows.append(Row("HF generate", n, cold, warm))
        print(f"  HF generate {n:>4} streams: {cold:9.1f} cold, {warm:9.1f} warm tok/s")
    return rows


def serve(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str]:
    """Imports the random model into a store under `work` and serves it; waits for ready."""
    home = work / "bentoml_home"
    tag = import_model(home, "--random-init", *(["--tiny"] if args.quick else []))
    port = free_port()
    env = {
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "1",
        "TEXTGEN_MODEL": tag,
        "TEXTGEN_DEVICE": args.device,
        "TEXTGEN_DTYPE": args.dtype,
        "TEXTGEN_QUANTIZE": "none",
        "TEXTGEN_MAX_BATCH_SIZE": str(max(args.streams)),
        "TEXTGEN_PREFIX_CACHING": "false",
    }
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:TextGeneration", "--port"]
    started = time.perf_counter()
    proc = start([*cmd, str(port)], env, port, work / "serve.log", timeout_s=240)
    print(f"# server ready in {time.perf_counter() - started:.1f}s")
    return proc, f"http://127.0.0.1:{port}"


def body(route: str, prompt: str, new_tokens: int) -> dict[str, Any]:
    if route == "/generate":
        return {"prompt": prompt, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    return {
        "model": "gpt2",
        "prompt": prompt,
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "temperature": 0,
    }


async def http_load(url: str, route: str, texts: list[str], new_tokens: int) -> tuple[float, int]:
    """All `texts` at once as concurrent clients; (output tok/s, failed requests)."""
    async with pool(len(texts), timeout=600, keepalive=len(texts), base_url=url) as client:

        async def one(k: int, _r: int) -> bool:
            try:
                r = await client.post(route, json=body(route, texts[k], new_tokens))
                return r.status_code == 200
            except httpx.HTTPError:
                return False

        ok, wall = await closed_loop(len(texts), one, rounds=1)
    return sum(ok) * new_tokens / wall, ok.count(False)


def over_http(args: argparse.Namespace, tokenizer: Any) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        proc, url = serve(args, Path(tmp))
        try:
            for route in ("/generate", "/v1/completions"):
                for n in args.streams:
                    texts = [tokenizer.decode(p) for p in prompts(tokenizer, n)]
                    (cold, e1), (warm, e2) = (
                        asyncio.run(http_load(url, route, texts, args.new_tokens)) for _ in "ab"
                    )
                    rows.append(Row(f"HTTP {route}", n, cold, warm, e1 + e2))
                    print(f"  {route} {n:>4} clients: {cold:9.1f} cold, {warm:9.1f} warm tok/s")
        finally:
            stop(proc)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| system | streams | first run tok/s | second run tok/s | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.system} | {r.streams} | {r.cold:,.0f} | {r.warm:,.0f} | {r.errors} |" for r in rows
    ]
    return "\n".join(lines)


def describe(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", default="float16", help="float16 (default), float32, ...")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip", nargs="*", default=[], choices=["engine", "hf", "http"])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 1 and 4 streams, 8 tokens, float32"
    )
    args = parser.parse_args()
    if args.quick:
        args.streams, args.new_tokens, args.dtype = [1, 4], 8, "float32"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; use --device cpu (with --quick for a smoke run)")
    print(f"# {describe(args.device)}; {args.dtype}; {args.new_tokens} new tokens per request")
    tokenizer = gpt2_tokenizer()
    started = time.perf_counter()
    rows: list[Row] = []
    if "engine" not in args.skip:
        rows += in_process(args, tokenizer)
    if "hf" not in args.skip:
        rows += hf_generate(args, tokenizer)
    if "http" not in args.skip:
        rows += over_http(args, tokenizer)
    print(f"\n{describe(args.device)}, {args.dtype}, {args.new_tokens} new tokens per request")
    print(table(rows))
    print(f"\n# took {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
