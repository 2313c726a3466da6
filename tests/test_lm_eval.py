"""lm-evaluation-harness against the served model: the acceptance test of prompt scoring.

lm-eval's `local-completions` (token-id prompts, batched, concurrent) must give the
same per-sample loglikelihoods as its own `hf` backend running the same model
directory in-process, within 1e-3 in float32, and the same greedy generations.
Datasets can't be downloaded here: the tasks are small local JSON files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import hf_greedy, store_entries

pytestmark = pytest.mark.timeout(900)

QUESTIONS = [
    ("The capital of France is", [" Paris", " Rome", " a city in the north of Europe"], 0),
    ("Two plus two equals", [" four", " five"], 1),
    ("Water boils at", [" 100 degrees", " 0 degrees", " room temperature", " ünïcödé 日本"], 2),
    ("The quick brown fox", [" jumps over the lazy dog", " sleeps"], 0),
    ("Émile wrote 🙂 and then", [" left", " stayed home"], 1),
    ("GPT-2 is a language model", [".", " trained on text"], 1),
    ("In 1492,", [" Columbus sailed", " nothing happened at all"], 0),
    ("Numbers: 1, 2, 3,", [" 4", " 5, 6"], 0),
    ("A", [" B", " C"], 1),
]
DOCUMENTS = [
    "The first document is short.",
    "A longer one: " + " ".join(f"word{i}" for i in range(120)),
    "Unicode — ünïcödé, 日本語 and emoji 🙂🙃 in one line.",
    "x" * 300,  # one long run of repeated characters
]

TASKS = {
    "choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    },
    "rolling": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}],
    },
    "greedy": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


def write_tasks(folder: Path, questions_: list | None = None) -> list[str]:
    """Local JSON tasks in an lm-eval include folder; returns their names."""
    questions = [{"question": q, "choices": c, "answer": a} for q, c, a in questions_ or QUESTIONS]
    data = {"choice": questions, "greedy": questions, "rolling": [{"text": d} for d in DOCUMENTS]}
    names = []
    for kind, spec in TASKS.items():
        rows = folder / f"{kind}.jsonl"
        rows.write_text("".join(json.dumps(row) + "\n" for row in data[kind]))
        name = f"textgen_{kind}"
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(rows)}},
            "test_split": "test",
            **spec,
        }
        (folder / f"{name}.yaml").write_text(json.dumps(task))
        names.append(name)
    return names


def evaluate(
    model: str, model_args: str, folder: Path, tasks: list[str], **kwargs: Any
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=8,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kwargs,
    )


def per_sample(results: dict[str, Any], task: str) -> list[tuple[int, Any]]:
    """(doc id, its responses) for every sample, in doc order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [(s["doc_id"], s["resps"]) for s in samples]


def with_greedy_choice(tiny_model: Any, tokenizer: Any) -> list[tuple[str, list[str], int]]:
    """QUESTIONS and one more whose first choice is the model's own greedy continuation,
    so `is_greedy` is True once."""
    question = "The model's favourite words are"
    greedy = tokenizer.decode(hf_greedy(tiny_model, tokenizer(question).input_ids, 3))
    return [*QUESTIONS, (question, [greedy, " none at all"], 0)]


@pytest.fixture(scope="module")
def both(server, model_store, tmp_path_factory, tiny_model, tokenizer):
    home, tag = model_store
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    tasks = write_tasks(folder, with_greedy_choice(tiny_model, tokenizer))
    path = store_entries(home)[tag].path
    served = evaluate(
        "local-completions",
        f"model=gpt2,base_url={server.url}/v1/completions,num_concurrent=4,max_retries=1,"
        "tokenized_requests=True,max_length=1024",
        folder,
        tasks,
    )
    reference = evaluate(
        "hf",
        f"pretrained={path}/model,tokenizer={path}/tokenizer,dtype=float32,device=cpu,"
        "max_length=1024",
        folder,
        tasks,
    )
    return served, reference, tasks


@pytest.mark.parametrize("task", ["textgen_choice", "textgen_rolling"])
def test_loglikelihoods_equal_the_hf_backend(both, task):
    served, reference, _ = both
    ours, theirs = per_sample(served, task), per_sample(reference, task)
    assert [d for d, _ in ours] == [d for d, _ in theirs]
    compared, worst = 0, 0.0
    for (doc, mine), (_, ref) in zip(ours, theirs, strict=True):
        for m, r in zip(mine, ref, strict=True):
            m_ll, r_ll = (m[0][0], r[0][0]) if isinstance(m[0], list | tuple) else (m[0], r[0])
            assert math.isfinite(m_ll) and m_ll < 0, (doc, m)  # not lm-eval's silent zero
            assert abs(m_ll - r_ll) <= 1e-3, (task, doc, m_ll, r_ll)
            worst = max(worst, abs(m_ll - r_ll))
            compared += 1
    print(f"{task}: {compared} loglikelihoods, largest difference from hf {worst:.2e}")
    assert compared == (
        sum(len(c) for _, c, _ in QUESTIONS) + 2 if task == "textgen_choice" else len(DOCUMENTS)
    )


def test_is_greedy_flags_equal_the_hf_backend(both):
    served, reference, _ = both
    flags: list[bool] = []
    for (doc, mine), (_, ref) in zip(
        per_sample(served, "textgen_choice"), per_sample(reference, "textgen_choice"), strict=True
    ):
        assert [m[0][1] for m in mine] == [r[0][1] for r in ref], doc
        flags += [m[0][1] for m in mine]
    assert flags.count(True) == 1  # the model's own continuation, and nothing else


def test_greedy_generations_equal_the_hf_backend(both):
    served, reference, _ = both
    ours, theirs = per_sample(served, "textgen_greedy"), per_sample(reference, "textgen_greedy")
    assert ours == theirs
    assert any(r[0][0] for _, r in ours)  # something was generated


def test_local_chat_completions_generate_what_the_model_does_after_the_template(
    server, model_store, tmp_path, tiny_model, tokenizer
):
    """lm-eval's chat model: each question is one user message; GPT-2's default template
    makes it `question<|endoftext|>`, and the answer is the model's own greedy text."""
    tasks = write_tasks(tmp_path)
    results = evaluate(
        "local-chat-completions",
        f"model=gpt2,base_url={server.url}/v1/chat/completions,max_retries=1",
        tmp_path,
        ["textgen_greedy"],
        apply_chat_template=True,
    )
    assert tasks
    generated = [r[0][0] for _, r in per_sample(results, "textgen_greedy")]
    expected = []
    for question, _, _ in QUESTIONS:
        ids = [*tokenizer(question).input_ids, tokenizer.eos_token_id]
        text = tokenizer.decode(hf_greedy(tiny_model, ids, 12), skip_special_tokens=True)
        expected.append(text.split("\n\n")[0])
    assert generated == expected
