"""One client must not starve the others, through a real `bentoml serve` (issue 23, items
1, 2, 3, 7).

The tests send what the issue reported (or its shape, where an earlier bound now refuses
it); past a bound the answer is a 4xx in the route's error shape naming the field, the
limit, the value and the setting.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import KEY, served

JSON = {"content-type": "application/json"}
SLOTS = 4  # the `small` server's batch: 3 slots for one request, 1 for the others
SEQUENCES = 8  # the `small` server's sequences per request
ENTRIES = 100  # the `small` server's logprob entries per request


@pytest.fixture(scope="module")
def small(model_store, tmp_path_factory) -> Iterator:
    """A server with a small batch and small per-request bounds, trusting request
    templates (rendered with the default deadline and memory cap)."""
    yield from served(
        model_store,
        tmp_path_factory,
        "small",
        TEXTGEN_MAX_BATCH_SIZE=str(SLOTS),
        TEXTGEN_MAX_WAITING="16",
        TEXTGEN_MAX_SEQUENCES_PER_REQUEST=str(SEQUENCES),
        TEXTGEN_MAX_LOGPROB_ENTRIES=str(ENTRIES),
        TEXTGEN_TRUST_REQUEST_CHAT_TEMPLATE="true",
    )


def running(url: str) -> float:
    """The engine's running batch size, from /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("textgen_running_batch_size"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def openai_error(r: httpx.Response) -> dict:
    return r.json()["error"]


# -- item 2: one request fills the queue -------------------------------------------------


def test_the_issues_288_sequence_request_gets_400_naming_the_setting(server):
    body = {"prompt": [[1]] * 36, "n": 8, "max_tokens": 1000, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400
    error = openai_error(r)
    assert error["param"] == "n"
    assert error["message"] == (
        "this request makes 288 sequences (36 prompts x n 8); the limit is 64 "
        "(TEXTGEN_MAX_SEQUENCES_PER_REQUEST)"
    )


@pytest.mark.parametrize(
    ("body", "param", "count", "what"),
    [
        ({"prompt": [[1]] * 9, "max_tokens": 1}, "prompt", 9, "9 prompts x n 1"),
        ({"prompt": [[1]] * 3, "n": 3, "max_tokens": 1}, "n", 9, "3 prompts x n 3"),
        (
            {"prompt": [[1]] * 5, "best_of": 2, "max_tokens": 1},
            "best_of",
            10,
            "5 prompts x best_of 2",
        ),
    ],
)
def test_sequences_per_request_are_bounded(small, body, param, count, what):
    r = httpx.post(f"{small.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert openai_error(r)["param"] == param
    assert openai_error(r)["message"] == (
        f"this request makes {count} sequences ({what}); the limit is {SEQUENCES} "
        "(TEXTGEN_MAX_SEQUENCES_PER_REQUEST)"
    )


def test_a_2_token_request_beside_a_wide_one_finishes_long_before_it(small):
    wide_body = {"prompt": [[1]] * SEQUENCES, "max_tokens": 500, "ignore_eos": True}
    wide: dict = {}

    def send_wide() -> None:
        started = time.perf_counter()
        wide["r"] = httpx.post(f"{small.url}/v1/completions", json=wide_body, timeout=300)
        wide["s"] = time.perf_counter() - started

    thread = threading.Thread(target=send_wide)
    thread.start()
    while running(small.url) == 0:  # until the wide request holds its slots
        time.sleep(0.02)
    started = time.perf_counter()
    r = httpx.post(
        f"{small.url}/v1/completions", json={"prompt": [1], "max_tokens": 2}, timeout=300
    )
    short_s = time.perf_counter() - started
    assert r.status_code == 200
    assert thread.is_alive(), "the wide request ended first"
    thread.join()
    assert wide["r"].status_code == 200
    assert len(wide["r"].json()["choices"]) == SEQUENCES
    assert short_s < wide["s"] / 4, (short_s, wide["s"])


def test_a_request_the_queue_can_never_hold_gets_400_not_429(guarded):
    # `guarded` queues 2 sequences beside its 2 slots; 5 are within the per-request
    # limit (64) but can never be queued, so a retry would never succeed.
    body = {"prompt": [[1]] * 5, "max_tokens": 1}
    headers = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{guarded.url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert openai_error(r)["param"] == "prompt"
    assert openai_error(r)["message"] == (
        "this request makes 5 sequences (5 prompts x n 1); the server queues at most 4 "
        "(TEXTGEN_MAX_WAITING 2 + TEXTGEN_MAX_BATCH_SIZE 2)"
    )


# -- item 3: scoring amplifies ------------------------------------------------------------


def test_a_scoring_request_past_the_logprob_entries_gets_400_before_it_runs(server):
    # The issue's shape (its 256 prompts are past TEXTGEN_MAX_SEQUENCES_PER_REQUEST now):
    # 64 prompts x 1023 ids echoed with 20 alternatives each: 1.4 million entries.
    body = {"prompt": [[1] * 1023] * 64, "echo": True, "logprobs": 20, "max_tokens": 0}
    started = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert time.perf_counter() - started < 10  # refused before the engine saw it
    error = openai_error(r)
    assert error["param"] == "logprobs"
    assert error["message"] == (
        "this request asks for 1374912 logprob entries ((echoed prompt tokens + new tokens) x "
        "(logprobs 20 + 1), summed over its sequences); the limit is 262144 "
        "(TEXTGEN_MAX_LOGPROB_ENTRIES)"
    )


@pytest.mark.parametrize(("prompts", "status"), [(4, 200), (5, 400)])
def test_logprob_entries_count_echoed_and_new_tokens_and_alternatives(small, prompts, status):
    # Each prompt: (4 echoed + 1 new) x (logprobs 4 + 1) = 25 entries; the limit is 100.
    body = {"prompt": [[1, 2, 3, 4]] * prompts, "echo": True, "logprobs": 4, "max_tokens": 1}
    r = httpx.post(f"{small.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text[:300]
    if status == 400:
        assert openai_error(r)["message"].startswith("this request asks for 125 logprob entries")
    else:
        assert all(len(c["logprobs"]["tokens"]) == 5 for c in r.json()["choices"])


def test_chat_top_logprobs_count_against_the_same_bound(small):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "logprobs": True,
        "top_logprobs": 4,
        "max_tokens": 21,
    }
    r = httpx.post(f"{small.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert openai_error(r)["param"] == "top_logprobs"
    assert openai_error(r)["message"] == (
        "this request asks for 105 logprob entries ((echoed prompt tokens + new tokens) x "
        "(top_logprobs 4 + 1), summed over its sequences); the limit is 100 "
        "(TEXTGEN_MAX_LOGPROB_ENTRIES)"
    )


def test_chat_logprobs_without_top_logprobs_names_only_what_the_client_sent(small):
    body = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "max_tokens": 101}
    r = httpx.post(f"{small.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert openai_error(r)["param"] == "logprobs"
    assert openai_error(r)["message"] == (
        "this request asks for 101 logprob entries ((echoed prompt tokens + new tokens) x "
        "(1, logprobs true), summed over its sequences); the limit is 100 "
        "(TEXTGEN_MAX_LOGPROB_ENTRIES)"
    )


def test_completion_logprob_entries_say_that_best_of_sequences_count(small):
    # 6 new tokens x (logprobs 4 + 1) x best_of 4 = 120; n 1 returns 30 of them.
    body = {"prompt": [1], "best_of": 4, "logprobs": 4, "max_tokens": 6}
    r = httpx.post(f"{small.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert openai_error(r)["param"] == "logprobs"
    assert openai_error(r)["message"] == (
        "this request asks for 120 logprob entries ((echoed prompt tokens + new tokens) x "
        "(logprobs 4 + 1), summed over its sequences: best_of 4 per prompt, of which n 1 "
        "return); the limit is 100 (TEXTGEN_MAX_LOGPROB_ENTRIES)"
    )


# -- item 7: /detokenize amplifies ---------------------------------------------------------


def test_a_megabyte_of_ids_to_detokenize_gets_400(server):
    ids = [50256] * 174_000  # "<|endoftext|>" each: the issue's megabyte of ids
    content = json.dumps({"tokens": ids}, separators=(",", ":"))
    assert len(content) < 1 << 20  # under the body limit: it reaches the route
    r = httpx.post(f"{server.url}/detokenize", content=content, headers=JSON, timeout=60)
    assert r.status_code == 400
    assert openai_error(r)["param"] == "tokens"
    assert openai_error(r)["message"] == (
        "tokens has 174000 ids; the limit is 4096 (TEXTGEN_MAX_DETOKENIZE_TOKENS)"
    )
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids[:4096]}, timeout=60)
    assert r.status_code == 200
    assert r.json()["prompt"] == "<|endoftext|>" * 4096


# -- item 1: a trusted request template runs forever -------------------------------------

NESTED_LOOPS = (
    "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}"
    "{% endfor %}{% endfor %}{% endfor %}"
)


def chat_body(template: str) -> dict:
    return {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "chat_template": template,
    }


def descendants(pid: int) -> set[int]:
    """Pids of `pid`'s children, theirs, and so on, from /proc (BentoML's worker runs in a
    session of its own, so a session id would not find them)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)"
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def renderers(server) -> list[int]:
    """Pids of template-rendering children still alive under the server."""
    pids = []
    for pid in descendants(server.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"textgen.chat_sandbox" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_a_template_that_runs_forever_is_killed_at_its_deadline(small, route):
    hostile: dict = {}

    def send() -> None:
        started = time.perf_counter()
        hostile["r"] = httpx.post(f"{small.url}{route}", json=chat_body(NESTED_LOOPS), timeout=60)
        hostile["s"] = time.perf_counter() - started

    thread = threading.Thread(target=send)
    thread.start()
    time.sleep(0.5)  # the template is rendering
    assert len(renderers(small)) == 1  # `renderers` sees a render while it runs
    r = httpx.post(f"{small.url}/v1/completions", json={"prompt": [1], "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert thread.is_alive(), "the template finished before the neighbour"
    thread.join()
    assert hostile["r"].status_code == 400
    assert openai_error(hostile["r"])["param"] == "chat_template"
    assert openai_error(hostile["r"])["message"] == (
        "chat_template did not render within 2 s (TEXTGEN_CHAT_TEMPLATE_TIMEOUT_SECONDS)"
    )
    assert hostile["s"] < 10
    assert renderers(small) == []  # killed, not left running
    assert httpx.get(f"{small.url}/health", timeout=10).status_code == 200


def test_a_template_that_allocates_gigabytes_gets_400_naming_the_memory_setting(small):
    template = "{{ 'a'|center(1500000000) }}"
    r = httpx.post(f"{small.url}/v1/chat/completions", json=chat_body(template), timeout=60)
    assert r.status_code == 400
    assert openai_error(r)["param"] == "chat_template"
    assert openai_error(r)["message"] == (
        "chat_template needs more than the 256 MiB a render may take "
        "(TEXTGEN_CHAT_TEMPLATE_MEMORY_MB)"
    )


def test_a_trusted_request_template_still_renders(small):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    r = httpx.post(f"{small.url}/tokenize", json=chat_body(template), timeout=60)
    assert r.status_code == 200
    assert r.json()["token_strs"] is None and r.json()["count"] > 0


def post_ascii(url: str, body: dict) -> httpx.Response:
    """`body` as ASCII JSON: a lone surrogate travels as its escape, as a client may send it."""
    return httpx.post(url, content=json.dumps(body), headers=JSON, timeout=60)


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [{"role": "user", "content": "\ud800"}]},
        {"messages": [{"role": "user", "content": "Hi", "name": "\ud800"}]},
        {"chat_template_kwargs": {"x": "\ud800"}},
    ],
    ids=["content", "message-field", "kwargs"],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_a_lone_surrogate_reaches_a_request_template_as_it_does_the_servers(small, route, extra):
    # The request's template prints each message's content, as the server's does: the
    # same answer (a 400 naming messages where the prompt itself holds the surrogate).
    body = {**chat_body("{% for m in messages %}{{ m.content }}{% endfor %}"), **extra}
    r = post_ascii(f"{small.url}{route}", body)
    del body["chat_template"]
    servers = post_ascii(f"{small.url}{route}", body)
    assert r.status_code == servers.status_code, r.text[:300]
    if r.status_code != 200:
        assert openai_error(r) == openai_error(servers)


def test_a_template_printing_a_lone_surrogate_is_not_called_a_memory_overrun(small):
    r = post_ascii(f"{small.url}/tokenize", chat_body("{{ '\\ud800' }}"))
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        assert "MiB" not in openai_error(r)["message"], r.text[:300]


RENDERS, WAITING_RENDERS = 2, 8  # chat_sandbox.MAX_RENDERS, MAX_WAITING_RENDERS


def test_renders_past_the_waiting_bound_get_429_and_the_wait_counts_in_the_deadline(small):
    results: list[tuple[int, float]] = []

    def send() -> None:
        started = time.perf_counter()
        r = httpx.post(f"{small.url}/v1/chat/completions", json=chat_body(NESTED_LOOPS), timeout=60)
        results.append((r.status_code, time.perf_counter() - started))

    threads = [threading.Thread(target=send) for _ in range(RENDERS + WAITING_RENDERS)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # two render, eight wait
    r = httpx.post(f"{small.url}/tokenize", json=chat_body("{{ 'hi' }}"), timeout=60)
    assert r.status_code == 429, r.text[:300]
    assert r.headers["retry-after"] == "1"
    assert openai_error(r)["message"] == (
        f"{WAITING_RENDERS} chat_template renders are waiting for a turn (limit "
        f"{WAITING_RENDERS}; {RENDERS} render at once); retry later"
    )
    for thread in threads:
        thread.join()
    # Each one's deadline (2 s) counts its wait: none is answered seconds later.
    assert all(status in (400, 429) for status, _ in results), results
    assert max(seconds for _, seconds in results) < 4, results
    assert renderers(small) == []


def test_renders_whose_clients_left_are_killed_and_free_their_turns(small):
    def abandon() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{small.url}/tokenize", json=chat_body(NESTED_LOOPS), timeout=0.5)

    threads = [threading.Thread(target=abandon) for _ in range(2 * RENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(1.0)  # the server hears each client leave; the render deadline is 2 s
    assert renderers(small) == []  # killed, not left running
    started = time.perf_counter()
    r = httpx.post(f"{small.url}/tokenize", json=chat_body("{{ 'hi' }}"), timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert time.perf_counter() - started < 1.0  # no abandoned render holds its turn


def test_a_huge_raise_exception_message_is_cut_short(small):
    template = "{{ raise_exception('a'|center(55000000)) }}"
    r = httpx.post(f"{small.url}/v1/chat/completions", json=chat_body(template), timeout=60)
    assert r.status_code == 400
    assert len(r.content) < 4000, len(r.content)
    assert openai_error(r)["param"] == "chat_template"
    assert openai_error(r)["message"].endswith("... (cut at 1000 characters)")
