"""Bodies a hostile client sends, through a real `bentoml serve` (issue 23, items 4, 5, 6, 8).

Each answer is a 4xx in the route's own error shape, naming the field, the limit and the
value; none costs the server more than a bounded response and a bounded log line.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import ValidationError

from tests.conftest import start_server, stop_server
from textgen.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

PROMPT = "Artificial Intelligence is a"
JSON = {"content-type": "application/json"}
ROUTES = [
    ("/generate", {"prompt": PROMPT, "max_new_tokens": 2}),
    ("/generate_stream", {"prompt": PROMPT, "max_new_tokens": 2}),
    ("/text-generation/generate", {"text": PROMPT}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": PROMPT}),
    ("/detokenize", {"tokens": [1, 2]}),
]


def post(url: str, route: str, content: str | bytes, headers: dict | list = JSON) -> httpx.Response:
    return httpx.post(f"{url}{route}", content=content, headers=headers, timeout=60)


def openai_shaped(route: str) -> bool:
    """Whether the route answers errors in OpenAI's shape (vLLM's tokenizer routes do)."""
    return route.startswith("/v1/") or route in ("/tokenize", "/detokenize")


def message(route: str, response: httpx.Response) -> str:
    """The error's message: OpenAI's, else the first `detail` entry's (BentoML's own 400s
    hold a count in `error`)."""
    body = response.json()
    return body["error"]["message"] if openai_shaped(route) else body["detail"][0]["msg"]


def param(route: str, response: httpx.Response) -> str | None:
    """The field the error names: OpenAI's `param`, else the first `detail` entry's `loc`."""
    body = response.json()
    if openai_shaped(route):
        return body["error"]["param"]
    return ".".join(str(part) for part in body["detail"][0]["loc"])


# -- item 4: unknown-field floods -------------------------------------------------------

FLOOD_KEYS = 90_000


def flood(body: dict) -> str:
    text = json.dumps({**body, **{f"k{i}": 1 for i in range(FLOOD_KEYS)}}, separators=(",", ":"))
    assert len(text) < 1 << 20  # under the body limit: it reaches the route
    return text


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_an_unknown_field_flood_gets_a_small_400_naming_the_first_ones(server, route):
    logged = server.log.stat().st_size
    r = post(server.url, route, flood({"prompt": PROMPT}))
    assert r.status_code == 400
    assert len(r.content) < 4096
    detail = r.json()["detail"]
    assert [d["loc"] for d in detail] == [[f"k{i}"] for i in range(10)] + [[]]
    assert detail[0]["msg"] == "k0: Extra inputs are not permitted, got 1"
    assert detail[-1]["msg"] == (
        f"body: {FLOOD_KEYS} unknown fields; the first 10 are listed "
        "(the fields are prompt, max_new_tokens, min_new_tokens, do_sample, temperature, "
        "top_k, top_p, min_p, repetition_penalty, stop, seed, return_full_text, json_schema, "
        "regex, choice)"
    )
    assert server.log.stat().st_size - logged < 32_768


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_an_unknown_field_flood_on_routes_that_ignore_them_is_bounded(server, route):
    body = dict(ROUTES)[route]
    logged = server.log.stat().st_size
    r = post(server.url, route, flood(body))
    assert r.status_code == 200
    assert len(r.headers.get("x-ignored-fields", "")) <= 1024
    assert server.log.stat().st_size - logged < 32_768


# Bad items by the hundred thousand: only the first error is reported on these routes, and
# only a few are built (one per union branch), not one per item.
ERROR_FLOODS = [
    (
        "/v1/completions",
        {"prompt": [{}] * 300_000},
        "prompt.str",
        "prompt.str: Input should be a valid string, got [{}, {}, {}",
    ),
    (
        "/v1/completions",
        {"prompt": "a", "stop": ["a", *[1] * 300_000]},
        "stop.str",
        "stop.str: Input should be a valid string, got ['a', 1, 1",
    ),
    (
        "/v1/completions",
        {"prompt": "a", "logit_bias": {str(i): "x" for i in range(80_000)}},
        "logit_bias",
        "logit_bias takes at most 300 tokens, got 80000",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{}] * 300_000},
        "messages.0.role",
        "messages.0.role: Field required, got {}",
    ),
    (
        "/detokenize",
        {"tokens": [-1] * 300_000},
        "tokens.0",
        "tokens.0: Input should be greater than or equal to 0, got -1",
    ),
]


@pytest.mark.parametrize(("route", "body", "field", "text"), ERROR_FLOODS)
def test_a_flood_of_bad_items_gets_its_first_error(server, route, body, field, text):
    content = json.dumps(body, separators=(",", ":"))
    assert len(content) < 1 << 20
    r = post(server.url, route, content)
    assert r.status_code == 400
    assert param(route, r) == field
    assert message(route, r).startswith(text)


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        (CompletionRequest, {"prompt": [{}] * 300_000}),
        (CompletionRequest, {"prompt": [[1]] * 300_000 + [[-1]]}),
        (CompletionRequest, {"prompt": "a", "stop_token_ids": [-1] * 300_000}),
        (ChatCompletionRequest, {"messages": [{}] * 300_000}),
        (ChatCompletionRequest, {"messages": [{"role": "u", "content": [{}] * 300_000}]}),
        (TokenizeRequest, {"messages": [{}] * 300_000}),
        (DetokenizeRequest, {"tokens": [-1] * 300_000}),
    ],
)
def test_bad_items_make_one_error_per_union_branch_not_per_item(schema, body):
    """What the route above does not show: the errors built, all turned into Python
    objects on the event loop though one is reported."""
    with pytest.raises(ValidationError) as caught:
        schema.model_validate(body)
    assert caught.value.error_count() <= 4


# -- item 5: integers past Python's int-to-str digit limit --------------------------------

DIGITS = 5000
HUGE = "@HUGE@"  # replaced in the JSON text by an integer of DIGITS digits
LIMIT = sys.get_int_max_str_digits()  # 4300 by default, as in the server


def with_huge(body: dict) -> str:
    """The body's JSON with HUGE as a bare integer (json.dumps cannot write one)."""
    text = json.dumps(body)
    text = text.replace(f'"{HUGE}":', '"' + "9" * DIGITS + '":')  # as an object key
    return text.replace(f'"{HUGE}"', "9" * DIGITS)


CHAT = [{"role": "user", "content": "Hi"}]
HUGE_FIELDS = [
    ("/generate", {"prompt": "a", "max_new_tokens": HUGE}, "max_new_tokens"),
    ("/generate", {"prompt": "a", "min_new_tokens": HUGE}, "min_new_tokens"),
    ("/generate", {"prompt": "a", "top_k": HUGE}, "top_k"),
    ("/generate", {"prompt": "a", "seed": HUGE}, "seed"),
    ("/generate", {"prompt": "a", "temperature": HUGE}, "temperature"),
    ("/generate", {"prompt": HUGE}, "prompt"),
    ("/generate_stream", {"prompt": "a", "max_new_tokens": HUGE}, "max_new_tokens"),
    ("/generate_stream", {"prompt": "a", "seed": HUGE}, "seed"),
    ("/text-generation/generate", {"text": "a", "n": HUGE}, "n"),
    ("/v1/completions", {"prompt": "a", "n": HUGE}, "n"),
    ("/v1/completions", {"prompt": "a", "max_tokens": HUGE}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "best_of": HUGE}, "best_of"),
    ("/v1/completions", {"prompt": "a", "logprobs": HUGE}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "seed": HUGE}, "seed"),
    ("/v1/completions", {"prompt": "a", "top_k": HUGE}, "top_k"),
    ("/v1/completions", {"prompt": "a", "min_tokens": HUGE}, "min_tokens"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [1, HUGE]}, "stop_token_ids.1"),
    ("/v1/completions", {"prompt": [1, HUGE]}, "prompt.1"),
    ("/v1/completions", {"prompt": [[1], [2, HUGE]]}, "prompt.1.1"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"1": HUGE}}, "logit_bias.1"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {HUGE: 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "temperature": HUGE}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "n": HUGE}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": HUGE}, "max_tokens"),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "max_completion_tokens": HUGE},
        "max_completion_tokens",
    ),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": HUGE}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "seed": HUGE}, "seed"),
    ("/v1/chat/completions", {"messages": CHAT, "logit_bias": {HUGE: 1}}, "logit_bias"),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "chat_template_kwargs": {"x": HUGE}},
        "chat_template_kwargs.x",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": HUGE}]},
        "messages.0.content",
    ),
    ("/tokenize", {"prompt": "a", "n": HUGE}, "n"),
    ("/tokenize", {"prompt": HUGE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a", "x": HUGE}]}, "messages.0.x"),
    ("/detokenize", {"tokens": [1, HUGE]}, "tokens.1"),
    ("/detokenize", {"tokens": [1], "n": HUGE}, "n"),
]


@pytest.mark.parametrize(
    ("route", "body", "field"), HUGE_FIELDS, ids=[f"{r}:{f}" for r, _, f in HUGE_FIELDS]
)
def test_an_integer_too_long_for_python_is_a_400_naming_the_field(server, route, body, field):
    r = post(server.url, route, with_huge(body))
    assert r.status_code == 400, r.text[:300]
    assert param(route, r) == field
    if field == "logit_bias":  # a key: a token id
        assert message(route, r) == (
            f"logit_bias: a token id of {DIGITS} digits; integers have at most {LIMIT} "
            "digits (PYTHONINTMAXSTRDIGITS)"
        )
    else:
        assert message(route, r).endswith(
            f"{field}: an integer of {DIGITS} digits; integers have at most {LIMIT} "
            "digits (PYTHONINTMAXSTRDIGITS)"
        )


# -- item 6: two Content-Type headers ------------------------------------------------------


@pytest.mark.parametrize(("route", "body"), ROUTES)
def test_two_content_type_headers_are_refused(server, route, body):
    headers = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("content-type", "application/json"),
    ]
    r = post(server.url, route, json.dumps(body), headers)
    assert r.status_code == 400
    assert message(route, r) == (
        "send one Content-Type header, got 2: "
        "'application/x-www-form-urlencoded', 'application/json'"
    )


# -- item 8: a body that stops arriving -----------------------------------------------------

BODY_TIMEOUT_S = 1  # lowered for the test; the default is README's


@pytest.fixture(scope="module")
def impatient(model_store, tmp_path_factory) -> Iterator:
    home, tag = model_store
    log = tmp_path_factory.mktemp("logs") / "impatient.log"
    srv = start_server(home, tag, log, TEXTGEN_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT_S))
    yield srv
    stop_server(srv)


def stalled_request(url: str, route: str, sent: bytes, declared: int) -> bytes:
    """Sends the headers and `sent` of a body of `declared` bytes, then nothing; returns
    what the server answers (b"" when it closes without answering)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        head = (
            f"POST {route} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        )
        conn.sendall(head.encode() + sent)
        chunks = []
        try:
            while chunk := conn.recv(65536):  # the server answers, then closes
                chunks.append(chunk)
        except TimeoutError:
            pass  # still nothing after 30 s: the test fails on what came so far
        return b"".join(chunks)


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/tokenize"])
def test_a_body_that_stalls_gets_408(impatient, route):
    answer = stalled_request(impatient.url, route, b'{"prompt": "Art', 100)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"connection: close" in head.lower()
    expected = (
        f"the request body did not arrive within {BODY_TIMEOUT_S} s "
        "(TEXTGEN_BODY_TIMEOUT_SECONDS): 15 of 100 bytes received"
    )
    parsed = json.loads(body)
    assert (parsed["error"]["message"] if openai_shaped(route) else parsed["error"]) == expected
    # The server still serves.
    r = httpx.post(f"{impatient.url}/generate", json=ROUTES[0][1], timeout=60)
    assert r.status_code == 200
