"""Prefix caching on and off, the same server otherwise, in one run.

    python bench/prefix_cache.py [--questions 40] [--turns 10] [--dtype float32]

Serves GPT-2 124M (seeded random weights, the real tokenizer) twice, with
TEXTGEN_PREFIX_CACHING=true and =false, and runs two workloads on each:
- `multiple choice`: lm-eval's `local-completions` (as tests/test_lm_eval.py drives
  it: token-id prompts, batch 8, 4 concurrent) on a task built here: N questions,
  each a ~300-token context and 4 choices of 5-20 tokens. End-to-end seconds, and
  every loglikelihood and `is_greedy` flag compared between the two runs.
- `chat`: conversations of T turns over /v1/chat/completions, streaming, each user
  message ~40 tokens and each reply 40 tokens, so the last prompt is ~800 tokens. The
  time to first token of the last turn, the median over 3 conversations.
Prints a markdown table and writes bench/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import prepare_model, start, stop  # noqa: E402  (bench/bench.py, beside this file)

WORDS = [
    "river",
    "mountain",
    "engine",
    "signal",
    "garden",
    "winter",
    "copper",
    "lantern",
    "harbor",
    "meadow",
    "orbit",
    "violet",
    "anchor",
    "timber",
    "canvas",
    "falcon",
    "marble",
    "thunder",
    "velvet",
    "compass",
]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_task(folder: Path, questions: int, name: str = "prefix_mc", seed: int = 0) -> str:
    """A local multiple-choice task: ~300-token contexts, 4 choices of 5-20 tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(questions):
        context = " ".join(sentence(rng, 12) for _ in range(24)) + " Answer:"
        choices = [" " + sentence(rng, rng.randint(4, 18)) for _ in range(4)]
        rows.append({"question": context, "choices": choices, "answer": rng.randrange(4)})
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(task))
    return name


def multiple_choice(url: str, folder: Path, task: str) -> tuple[float, list[Any]]:
    """lm-eval end to end: seconds, and (doc, [(loglikelihood, is_greedy), ...]) per doc."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=gpt2,base_url={url}/v1/completions,num_concurrent=4,max_retries=1,"
        "tokenized_requests=True,max_length=1024",
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=8,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    seconds = time.perf_counter() - started
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return seconds, [(s["doc_id"], [tuple(r[0]) for r in s["resps"]]) for s in samples]


def chat(url: str, turns: int, seed: int) -> tuple[float, int]:
    """One conversation; (time to first token of the last turn, its prompt tokens)."""
    rng = random.Random(seed)
    messages: list[dict[str, str]] = []
    ttft, prompt_tokens = 0.0, 0
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(turns):
            messages.append({"role": "user", "content": sentence(rng, 30)})
            body = {
                "model": "gpt2",
                "messages": messages,
                "max_tokens": 40,
                "min_tokens": 40,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            started = time.perf_counter()
            first, reply = None, []
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        prompt_tokens = chunk["usage"]["prompt_tokens"]
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content"):
                            first = first or time.perf_counter()
                            reply.append(choice["delta"]["content"])
            ttft = (first or time.perf_counter()) - started
            messages.append({"role": "assistant", "content": "".join(reply)})
    return ttft, prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=40)  # 0: the chat workload only
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--conversations", type=int, default=3)  # the median's
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--port", type=int, default=3911)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="textgen-prefix-bench-"))
    _, home, tag = prepare_model(work)
    folder = work / "tasks"
    folder.mkdir()
    task = write_task(folder, args.questions)
    # lm-eval's first evaluation in a process pays for imports and dataset set-up: one on
    # other contexts first, so that neither timed run pays it.
    warm_up = write_task(folder, 2, "prefix_mc_warm_up", seed=1)
    url = f"http://127.0.0.1:{args.port}"
    runs: dict[str, dict[str, Any]] = {}
    for caching in ("true", "false"):
        env = {
            "BENTOML_HOME": str(home),
            "TEXTGEN_MODEL": tag,
            "TEXTGEN_DTYPE": args.dtype,
            "TEXTGEN_PREFIX_CACHING": caching,
        }
        cmd = [sys.executable, "-m", "bentoml", "serve", "service:TextGeneration"]
        proc = start([*cmd, "--port", str(args.port)], env, args.port, work / f"{caching}.log")
        try:
            seconds, samples = float("nan"), []  # --questions 0: the chat only
            if args.questions:
                if not runs:
                    multiple_choice(url, folder, warm_up)
                seconds, samples = multiple_choice(url, folder, task)
            chats = [chat(url, args.turns, seed) for seed in range(args.conversations)]
            ttft = statistics.median(t for t, _ in chats)
            last_prompt = chats[0][1]
        finally:
            stop(proc)
        runs[caching] = {"mc_s": seconds, "samples": samples, "ttft_s": ttft, "prompt": last_prompt}
        print(f"caching={caching}: mc {seconds:.1f}s, last-turn TTFT {ttft * 1000:.0f} ms")
    on, off = runs["true"], runs["false"]
    worst, flags_equal, compared = 0.0, True, 0
    for (doc_a, a), (doc_b, b) in zip(on["samples"], off["samples"], strict=True):
        assert doc_a == doc_b
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a, b, strict=True):
            worst = max(worst, abs(ll_a - ll_b))
            flags_equal &= greedy_a == greedy_b
            compared += 1
    rows = [
        "| workload | caching on | caching off | speed-up |",
        "|---|---:|---:|---:|",
        f"| lm-eval multiple choice, {args.questions} questions x 4 choices (s) "
        f"| {on['mc_s']:.1f} | {off['mc_s']:.1f} | {off['mc_s'] / on['mc_s']:.2f}x |",
        f"| chat, time to first token of turn {args.turns} ({on['prompt']} prompt tokens, "
        f"median of {args.conversations}, ms) "
        f"| {on['ttft_s'] * 1000:.0f} | {off['ttft_s'] * 1000:.0f} "
        f"| {off['ttft_s'] / on['ttft_s']:.2f}x |",
    ]
    print("\n".join(rows))
    print(
        f"{compared} loglikelihoods: largest difference {worst:.2e}; "
        f"is_greedy flags {'equal' if flags_equal else 'DIFFER'}"
    )
    result = {
        "dtype": args.dtype,
        "questions": args.questions,
        "turns": args.turns,
        "mc_s": {"on": on["mc_s"], "off": off["mc_s"]},
        "chat_ttft_s": {"on": on["ttft_s"], "off": off["ttft_s"]},
        "chat_last_prompt_tokens": on["prompt"],
        "loglikelihoods_compared": compared,
        "largest_loglikelihood_difference": worst,
        "is_greedy_equal": flags_equal,
    }
    (ROOT / "bench" / "prefix_cache.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
