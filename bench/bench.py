"""Throughput and latency of this service against the seed-style baseline, in one run.

    python bench/bench.py [--concurrency 1 8 32] [--workloads greedy sampled long]

Builds GPT-2 124M with seeded random weights and the real tokenizer into one
model directory, imports it into a temporary model store, and serves it five
ways: this service in bfloat16 and with dynamic int8, llama.cpp's llama-server
on the same weights as GGUF bf16 and Q8_0 (`bench/llama_peer.py` prepares it;
skipped, saying why, where it can't be), and the seed's Flask + pipeline
service (greedy only). Workloads: `greedy` (64 new tokens),
`sampled` (64, temperature 0.8, top_p 0.9, top_k 50) and `long` (512, greedy).
Every request generates exactly its new tokens (min_new_tokens =
max_new_tokens). Prints a markdown table, writes bench/RESULTS.md,
bench/results.json and the plot bench/throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadgen import closed_loop, pool  # noqa: E402 (bench/loadgen.py, beside this file)

PROMPT = "In a shocking finding, scientists discovered a herd of unicorns living in a remote"


@dataclass(frozen=True)
class Workload:
    name: str
    new_tokens: int
    sampling: dict[str, Any]  # extra /generate_stream fields
    requests: int  # per concurrency level, at least one per client


WORKLOADS = {
    "greedy": Workload("greedy", 64, {}, 32),
    "sampled": Workload(
        "sampled", 64, {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 50}, 32
    ),
    "long": Workload("long", 512, {}, 1),
}


@dataclass
class Level:
    system: str
    workload: str
    concurrency: int
    requests: int
    tokens_per_s: float
    ttft_p50_s: float
    latency_p50_s: float
    latency_p99_s: float


@dataclass
class Target:
    name: str
    url: str
    kind: str  # "textgen" | "llama" (llama-server's /completion) | "baseline" (no streaming)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(
    client: httpx.AsyncClient, target: Target, work: Workload
) -> tuple[float, float]:
    """(time to first token, latency) of one request, in seconds."""
    started = time.perf_counter()
    n = work.new_tokens
    if target.kind == "llama":
        return await llama_request(client, target, work, started)
    if target.kind == "baseline":
        body = {"text": PROMPT, "max_new_tokens": n, "min_new_tokens": n}
        r = await client.post(f"{target.url}/text-generation/generate", json=body)
        r.raise_for_status()
        latency = time.perf_counter() - started
        return latency, latency
    body = {"prompt": PROMPT, "max_new_tokens": n, "min_new_tokens": n, **work.sampling}
    async with client.stream("POST", f"{target.url}/generate_stream", json=body) as r:
        r.raise_for_status()
        # One `{"id": ...}` object per token, whether alone ({"token": ...}) or queued
        # tokens coalesced into one event ({"tokens": [...]}); the final event has none.
        first, tokens, _ = await scan_events(r, b'{"id": ', started)
    assert tokens == n, f"expected {n} tokens, got {tokens}"
    return first, time.perf_counter() - started


async def scan_events(r: httpx.Response, marker: bytes, started: float) -> tuple[float, int, bytes]:
    """Reads a server-sent event stream as raw bytes: the time to the first `marker`, how
    many markers came (`marker` must not occur inside a JSON string: quotes are escaped
    there), and the last event. The client shares the CPU with the server it
    measures, so it does no per-line or per-event parsing (it cost ~130 us per token)."""
    first, count, tail = 0.0, 0, b""  # tail: the stream from its last event's start
    keep = len(marker) - 1  # a marker split across two chunks is counted once
    async for chunk in r.aiter_bytes():
        seen = (tail[-keep:] + chunk).count(marker)
        if seen and not count:
            first = time.perf_counter() - started
        count += seen
        tail += chunk
        cut = tail.rfind(b"\n\n", 0, len(tail) - 2)  # the end of the event before the last
        tail = tail[cut + 2 :] if cut >= 0 else tail
    return first, count, tail.rstrip(b"\n")


async def llama_request(
    client: httpx.AsyncClient, target: Target, work: Workload, started: float
) -> tuple[float, float]:
    """llama-server's own streaming route, asked for exactly `new_tokens`: its defaults
    sample (temperature 0.8, min_p 0.05 ...), so greedy sends temperature 0 and sampled
    sends the workload's settings with min_p off."""
    n = work.new_tokens
    sampling = {"temperature": 0}
    if work.sampling.get("do_sample"):
        sampling = {k: work.sampling[k] for k in ("temperature", "top_p", "top_k")}
        sampling["min_p"] = 0.0
    body = {
        "prompt": PROMPT,
        "n_predict": n,
        "ignore_eos": True,
        "cache_prompt": False,
        "stream": True,
        **sampling,
    }
    async with client.stream("POST", f"{target.url}/completion", json=body) as r:
        r.raise_for_status()
        first, _, last = await scan_events(r, b"data: ", started)
    final = json.loads(last.removeprefix(b"data: "))
    predicted = final.get("tokens_predicted") if final.get("stop") else None
    assert predicted == n, f"expected {n} tokens, got {predicted}"
    return first, time.perf_counter() - started


async def run_level(target: Target, concurrency: int, work: Workload, rounds: int) -> Level:
    # llama-server (cpp-httplib) closes a kept-alive connection after 5 requests, racing
    # the client's next one on it: one connection per request there.
    keepalive = 0 if target.kind == "llama" else None
    async with pool(concurrency, keepalive=keepalive) as client:
        results, wall = await closed_loop(
            concurrency, lambda _k, _r: one_request(client, target, work), rounds=rounds
        )
    ttfts, latencies = [r[0] for r in results], [r[1] for r in results]
    return Level(
        system=target.name,
        workload=work.name,
        concurrency=concurrency,
        requests=len(results),
        tokens_per_s=len(results) * work.new_tokens / wall,
        ttft_p50_s=statistics.median(ttfts),
        latency_p50_s=statistics.median(latencies),
        latency_p99_s=percentile(latencies, 0.99),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    url: str, proc: subprocess.Popen, log: Path, probe: str = "/readyz", timeout_s: float = 300
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready:\n{log.read_text()[-3000:]}")


def start(
    cmd: list[str],
    env: dict[str, str],
    port: int,
    log: Path,
    probe: str = "/readyz",
    timeout_s: float = 300,
) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_ready(f"http://127.0.0.1:{port}", proc, log, probe, timeout_s)
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def prepare_model(work: Path, tiny: bool = False) -> tuple[Path, Path, str]:
    """A random GPT-2 directory (124M, or the 2-layer toy with `tiny`), and a model store
    holding it: (directory, BENTOML_HOME, tag). Both sizes can share one store."""
    from textgen.models import gpt2_tokenizer, random_gpt2

    model_dir = work / ("gpt2-random-tiny" if tiny else "gpt2-random")
    random_gpt2(tiny=tiny).save_pretrained(model_dir)
    gpt2_tokenizer().save_pretrained(model_dir)
    home = work / "bentoml_home"
    return model_dir, home, import_model(home, "--from-dir", str(model_dir))


def import_model(home: Path, *flags: str) -> str:
    """Runs `download_model.py flags` into the model store at `home`; returns the tag."""
    out = subprocess.run(
        [sys.executable, "download_model.py", *flags],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def bench_system(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    port: int,
    work: Path,
    args: argparse.Namespace,
    kind: str,
    workloads: list[Workload],
) -> list[Level]:
    log = work / f"{name.replace(' ', '_')}.log"
    started = time.perf_counter()
    proc = start(cmd, env, port, log, "/health" if kind == "llama" else "/readyz")
    print(f"# {name}: ready in {time.perf_counter() - started:.1f}s", flush=True)
    target = Target(name, f"http://127.0.0.1:{port}", kind)
    levels = []
    try:
        asyncio.run(run_level(target, 2, Workload("warm-up", 8, {}, 2), 1))
        for work in workloads:
            for c in args.concurrency:
                rounds = 1 if kind == "baseline" else max(1, work.requests // c)
                level = asyncio.run(run_level(target, c, work, rounds))
                print(
                    f"  {work.name:>7} {c:>3} clients: {level.tokens_per_s:7.1f} tok/s, "
                    f"p50 {level.latency_p50_s:.2f}s",
                    flush=True,
                )
                levels.append(level)
    finally:
        stop(proc)
    return levels


def in_process(names: list[str], args: argparse.Namespace) -> list[Level]:
    """The engine without HTTP (bench/engine_bench.py), 32 greedy streams: what HTTP costs."""
    flags = {"bf16": ["--quantize", "none"], "int8": ["--quantize", "int8"]}
    levels = []
    for name in (n for n in names if n in args.systems):
        run = subprocess.run(
            [sys.executable, "bench/engine_bench.py", "--concurrency", "32", *flags[name]],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:  # the HTTP rows already measured still get written
            print(f"# textgen {name} in-process failed:\n{run.stderr[-2000:]}", flush=True)
            continue
        tps = float(run.stdout.strip().splitlines()[-1].split(": ")[1].split()[0])
        nan = float("nan")
        levels.append(Level(f"textgen {name}, in-process", "greedy", 32, 32, tps, nan, nan, nan))
        print(f"# textgen {name} in-process, 32 streams: {tps:.1f} tok/s", flush=True)
    return levels


def bench_peer(model_dir: Path, work: Path, args: argparse.Namespace) -> list[Level]:
    """llama-server on the same weights, each precision the run asks for."""
    from llama_peer import PeerUnavailable, prepare  # beside this script

    wanted = [s.removeprefix("llama-") for s in args.systems if s.startswith("llama-")]
    if not wanted:
        return []
    try:
        started = time.perf_counter()
        peer = prepare(model_dir)
        print(f"# llama-server prepared in {time.perf_counter() - started:.0f}s", flush=True)
    except PeerUnavailable as exc:
        print(f"# llama-server skipped: {exc}", flush=True)
        return []
    levels = []
    for i, precision in enumerate(wanted):
        port = 3911 + i
        levels += bench_system(
            f"llama-server GGUF {precision}",
            peer.command(precision, port),
            peer.env,
            port,
            work,
            args,
            kind="llama",
            workloads=[WORKLOADS[w] for w in args.workloads],
        )
    return levels


def table(levels: list[Level]) -> str:
    rows = [
        "| system | workload | clients | output tok/s | TTFT p50 (s) | latency p50 (s) "
        "| latency p99 (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {lv.system} | {lv.workload} | {lv.concurrency} | {lv.tokens_per_s:.1f} | "
        f"{_s(lv.ttft_p50_s)} | {_s(lv.latency_p50_s)} | {_s(lv.latency_p99_s)} |"
        for lv in levels
    ]
    return "\n".join(rows)


def _s(seconds: float) -> str:
    return "–" if seconds != seconds else f"{seconds:.2f}"  # NaN: not measured


def plot(levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(lv.workload for lv in levels))
    systems = list(dict.fromkeys(lv.system for lv in levels))
    color = {system: f"C{i % 10}" for i, system in enumerate(systems)}  # one per system
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.5), squeeze=False)
    for ax, work in zip(axes[0], workloads, strict=True):
        for system in systems:
            pts = [lv for lv in levels if lv.system == system and lv.workload == work]
            if pts:
                ax.plot(
                    [p.concurrency for p in pts],
                    [p.tokens_per_s for p in pts],
                    marker="o",
                    color=color[system],
                    label=system,
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("output tokens / s (all clients)")
        ax.set_title(f"{work}: {WORKLOADS[work].new_tokens} new tokens per request")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("GPT-2 124M (random weights), 2 CPU cores, through HTTP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    systems = ["bf16", "int8", "llama-bf16", "llama-Q8_0"]
    parser.add_argument("--systems", nargs="+", choices=systems, default=systems)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    levels: list[Level] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, home, tag = prepare_model(work)
        serve = [sys.executable, "-m", "bentoml", "serve", "service:TextGeneration", "--port"]
        # Every request sends one prompt, and llama-server runs without its prompt cache:
        # prefix caching off here too (bench/prefix_cache.py measures it).
        base_env = {
            "BENTOML_HOME": str(home),
            "TEXTGEN_MODEL": tag,
            "TEXTGEN_MAX_BATCH_SIZE": "32",
            "TEXTGEN_PREFIX_CACHING": "false",
        }
        systems = [
            ("textgen bf16", {"TEXTGEN_DTYPE": "bfloat16"}),
            ("textgen int8", {"TEXTGEN_QUANTIZE": "int8"}),
        ]
        for i, (name, env) in enumerate(systems):
            if name.split()[-1] not in args.systems:
                continue
            port = 3901 + i
            levels += bench_system(
                name,
                [*serve, str(port)],
                {**base_env, **env},
                port,
                work,
                args,
                kind="textgen",
                workloads=[WORKLOADS[w] for w in args.workloads],
            )
        if 32 in args.concurrency and "greedy" in args.workloads:
            levels += in_process([name.split()[-1] for name, _ in systems], args)
        levels += bench_peer(model_dir, work, args)
        if not args.skip_baseline:
            cmd = [sys.executable, "bench/seed_baseline.py", str(model_dir), "3909"]
            levels += bench_system(
                "seed baseline (Flask + pipeline)",
                cmd,
                {},
                3909,
                work,
                args,
                kind="baseline",
                workloads=[WORKLOADS["greedy"]],
            )
    md = table(levels)
    print(md)
    (ROOT / "bench" / "RESULTS.md").write_text(md + "\n")
    rows = [{k: None if v != v else v for k, v in asdict(lv).items()} for lv in levels]
    (ROOT / "bench" / "results.json").write_text(json.dumps(rows, indent=1))  # NaN: null
    plot(levels, ROOT / "bench" / "throughput.png")


if __name__ == "__main__":
    main()
