"""How far bfloat16 and int8 stay from float32 on GPT-2 124M (seeded random weights).

    python bench/fidelity.py [--new-tokens 64] [--tiny]

float32 generates greedily from each prompt (the benchmark's, and the precision
tests'); then each precision reads the same sequences through the serving path,
its prompt's prefill and then float32's tokens one decode step at a time (teacher
forcing, so one early disagreement does not decide the rest), with all prompts
decoding together and with each alone (one stream: on a CPU with AVX-512 BF16
and VNNI, textgen/csrc's one-row kernels), and reports, over every generated
position:
  - agree: the share of positions where its greedy choice is float32's;
  - |dlogprob|: the mean absolute difference of the logprob it gives float32's token.
Also the share of prompts whose free-running greedy continuation is float32's,
token for token. Prints a markdown table (the README's fidelity table comes from it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textgen.models import gpt2_tokenizer, random_gpt2  # noqa: E402
from textgen.runner import GPT2Runner  # noqa: E402

PROMPTS = [
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote",
    "The quick brown fox",
    "Once upon a time there was",
    "def fibonacci(n):",
    "Artificial Intelligence is a",
    "The capital of France is",
    "Zürich, München, 東京 and",
    "To be or not to be",
    "import numpy as np",
    "Dear Sir or Madam,",
    "1, 2, 3, 4,",
    "Breaking news:",
]
PRECISIONS = {"bfloat16": (torch.bfloat16, False), "int8": (torch.float32, True)}
MODES = {"": False, ", one stream": True}  # row name suffix: each prompt decoding alone?


def runner(precision: str, tiny: bool) -> GPT2Runner:
    dtype, int8 = PRECISIONS.get(precision, (torch.float32, False))
    model = random_gpt2(tiny=tiny)  # a fresh one: the runner converts it in place
    return GPT2Runner(model, torch.device("cpu"), dtype, len(PROMPTS), quantize_int8=int8)


def greedy(r: GPT2Runner, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens per prompt, all decoding together."""
    slots = list(range(len(prompts)))
    logits, _ = r.prefill(prompts, slots)
    out = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(n - 1):
        positions = [len(p) + len(o) - 1 for p, o in zip(prompts, out, strict=True)]
        logits = r.decode([o[-1] for o in out], positions, slots)
        for o, t in zip(out, logits.argmax(-1).tolist(), strict=True):
            o.append(t)
    return out


def forced(
    r: GPT2Runner, prompts: list[list[int]], outputs: list[list[int]], alone: bool
) -> list[torch.Tensor]:
    """Teacher forcing through prefill and decode: per prompt, the logits (n, V) before
    each of its n tokens in `outputs`. `alone`: each prompt decodes on its own."""
    every = list(range(len(prompts)))
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for rows in [[i] for i in every] if alone else [every]:
        slots = list(range(len(rows)))
        first, _ = r.prefill([prompts[i] for i in rows], slots)
        for i, row in zip(rows, first, strict=True):
            logits[i].append(row)
        for step in range(len(outputs[0]) - 1):
            tokens = [outputs[i][step] for i in rows]
            positions = [len(prompts[i]) + step for i in rows]
            for i, row in zip(rows, r.decode(tokens, positions, slots), strict=True):
                logits[i].append(row)
    return [torch.stack(rows) for rows in logits]


def measure(new_tokens: int, tiny: bool) -> dict[str, dict[str, float]]:
    tokenizer = gpt2_tokenizer()
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    reference = runner("float32", tiny)
    outputs = greedy(reference, prompts, new_tokens)
    full = [p + o[:-1] for p, o in zip(prompts, outputs, strict=True)]  # o[-1] is never read
    rows = list(range(len(full)))
    _, ref_logits = reference.prefill(full, rows, rows)
    results = {}
    for precision in PRECISIONS:
        r = runner(precision, tiny)
        for suffix, alone in MODES.items():
            logits = forced(r, prompts, outputs, alone)
            agree, diffs = [], []
            for p, o, ref, got in zip(prompts, outputs, ref_logits, logits, strict=True):
                ref = ref[len(p) - 1 :]  # (new_tokens, V): before each generated token
                chosen = torch.tensor(o)[:, None]
                agree.append(got.argmax(-1) == torch.tensor(o))
                lp_ref = ref.log_softmax(-1).gather(1, chosen)
                lp_got = got.log_softmax(-1).gather(1, chosen)
                diffs.append((lp_ref - lp_got).abs()[:, 0])
            free = (
                [greedy(r, [p], new_tokens)[0] for p in prompts]
                if alone
                else greedy(r, prompts, new_tokens)
            )
            results[precision + suffix] = {
                "agree": torch.cat(agree).float().mean().item(),
                "mean_abs_logprob_diff": torch.cat(diffs).mean().item(),
                "same_continuation": sum(a == b for a, b in zip(free, outputs, strict=True))
                / len(outputs),
            }
    return results


def table(results: dict[str, dict[str, float]], new_tokens: int) -> str:
    lines = [
        f"| precision | greedy tokens agreeing with float32 ({len(PROMPTS)} prompts x "
        f"{new_tokens}) | mean abs logprob diff | identical continuations |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['agree']:.1%} | {r['mean_abs_logprob_diff']:.4f} | "
            f"{r['same_continuation']:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="the unit tests' toy model")
    args = parser.parse_args()
    print(table(measure(args.new_tokens, args.tiny), args.new_tokens))


if __name__ == "__main__":
    main()
