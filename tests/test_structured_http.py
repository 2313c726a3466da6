"""Structured output through the HTTP door: a real `bentoml serve`, the tiny random model.

Every output that ends with finish_reason stop must parse and validate against its schema
(`jsonschema`), greedy and sampled; the bounded schemas below must all end within 200
tokens. The `openai` client's `parse` and LangChain's `with_structured_output` return
parsed objects. Bad constraints and two constraints are 400s naming the field.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.conftest import start_server, stop_server, stream_tokens

MAX_TOKENS = 200
SAMPLED_SEEDS = range(4)
# Schemas whose every value is bounded: strings by maxLength, arrays by maxItems,
# numbers by range (and multipleOf for a number's decimals), objects by
# additionalProperties false. They end within MAX_TOKENS whatever the model does.
BOUNDED = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "role": {"enum": ["admin", "user", "guest"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "list": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                        "ok": {"type": "boolean"},
                        "note": {"type": ["string", "null"], "maxLength": 8},
                    },
                    "required": ["id", "ok"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.25},
            "n": {"type": "integer", "minimum": -5, "maximum": 5},
            "c": {"const": "fixed"},
        },
        "required": ["x", "n", "c"],
        "additionalProperties": False,
    },
    "escapes": {  # values that must be escaped: quotes, backslashes, controls, non-ASCII
        "type": "object",
        "properties": {
            "quoted": {"enum": ['say "hi"', "back\\slash", "new\nline\ttab", "\u00e9t\u00e9"]},
            "fixed": {"const": 'a "b" \\ c\n'},
            "words": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        },
        "required": ["quoted", "fixed", "words"],
        "additionalProperties": False,
    },
    "any_of": {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 9},
            {"enum": ["yes", "no"]},
            {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        ]
    },
}


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


REF_CHAIN = {
    "$ref": "#/$defs/d0",
    "$defs": {
        f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}}
        for i in range(1000)
    }
    | {"d1000": {"type": "string"}},
}
GBNF_CHAIN = "root ::= r0\n" + "".join(f'r{i} ::= "x{i}" | "y" r{i + 1}\n' for i in range(700))


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=120)


def samplings() -> list[dict]:
    """Greedy, then sampled with several seeds."""
    return [{"temperature": 0}] + [{"temperature": 1.0, "seed": s} for s in SAMPLED_SEEDS]


@pytest.mark.parametrize("name", BOUNDED)
def test_bounded_schemas_end_and_validate_on_both_routes(server, name):
    schema = BOUNDED[name]
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": True},
    }
    for sampling in samplings():
        chat = post(
            server,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": f"Give me some {name}."}],
                "max_tokens": MAX_TOKENS,
                "response_format": response_format,
                **sampling,
            },
        )
        assert chat.status_code == 200, chat.text
        assert "x-ignored-fields" not in chat.headers
        choice = chat.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        completion = post(
            server,
            "/v1/completions",
            {
                "prompt": f"JSON {name}:",
                "max_tokens": MAX_TOKENS,
                "guided_json": schema,
                **sampling,
            },
        )
        assert completion.status_code == 200, completion.text
        choice = completion.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), schema)


def test_json_object_is_an_object_when_it_stops(server):
    for sampling in samplings():
        r = post(
            server,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "JSON please"}],
                "max_tokens": 64,
                "response_format": {"type": "json_object"},
                **sampling,
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        text = choice["message"]["content"]
        assert text.startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)


def test_a_max_tokens_cut_ends_by_length(server):
    r = post(
        server,
        "/v1/completions",
        {"prompt": "x", "max_tokens": 3, "temperature": 0, "guided_json": BOUNDED["person"]},
    )
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"].startswith('{"name":"')


@pytest.mark.parametrize(
    ("field", "value", "matches"),
    [
        ("guided_regex", r"[A-Z][a-z]{2,6}-[0-9]{2}", r"[A-Z][a-z]{2,6}-[0-9]{2}"),
        ("guided_choice", ["red", "green", 'say "blue"'], r"red|green|say \"blue\""),
        ("guided_grammar", 'start: "yes" | "no" | "n" DIGIT\nDIGIT: /[0-9]/', r"yes|no|n[0-9]"),
        ("guided_grammar", 'root ::= "yes" | "no" | "n" [0-9]', r"yes|no|n[0-9]"),  # GBNF
    ],
)
def test_regex_choice_and_grammar_outputs_match(server, field, value, matches):
    for sampling in samplings():
        r = post(
            server,
            "/v1/completions",
            {"prompt": "Answer:", "max_tokens": 50, field: value, **sampling},
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        assert re.fullmatch(matches, choice["text"]), choice["text"]


def test_native_routes_take_json_schema_regex_and_choice(server):
    schema = BOUNDED["person"]
    for sampling in ({}, {"do_sample": True, "seed": 5}):
        r = post(
            server,
            "/generate",
            {"prompt": "Person:", "max_new_tokens": MAX_TOKENS, "json_schema": schema, **sampling},
        )
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r.json()["generated"]), schema)
    r = post(server, "/generate", {"prompt": "Code:", "regex": "[0-9]{3}-[a-z]{2}"})
    assert r.json()["finish_reason"] == "stop"
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", r.json()["generated"])
    r = post(server, "/generate", {"prompt": "Pick:", "choice": ["left", "right"]})
    assert r.json()["generated"] in ("left", "right")
    stream = post(
        server,
        "/generate_stream",
        {"prompt": "Person:", "max_new_tokens": MAX_TOKENS, "json_schema": schema},
    )
    events = [json.loads(e[len("data: ") :]) for e in stream.text.split("\n\n") if e.strip()]
    text = "".join(t["text"] for t in stream_tokens(events))
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["generated_text"] == text
    jsonschema.validate(json.loads(text), schema)


def test_openapi_document_types_the_native_constraints(server):
    spec = httpx.get(f"{server.url}/docs.json").json()
    bodies = [
        schema["properties"]
        for schema in spec["components"]["schemas"].values()
        if "max_new_tokens" in schema.get("properties", {})
    ]
    assert bodies
    for fields in bodies:
        assert [v["type"] for v in fields["json_schema"]["anyOf"]] == ["object", "boolean"]
        assert fields["regex"]["type"] == "string"
        assert fields["choice"]["type"] == "array"


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


def test_openai_parse_returns_the_pydantic_object(client):
    for temperature in (0, 1):
        completion = client.chat.completions.parse(
            model="gpt2",
            messages=[{"role": "user", "content": "Describe a pet."}],
            response_format=Pet,
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            seed=7,
        )
        pet = completion.choices[0].message.parsed
        assert isinstance(pet, Pet)
        assert completion.choices[0].finish_reason == "stop"


def test_langchain_with_structured_output_returns_the_model(server):
    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        model="gpt2",
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
    )
    pet = llm.with_structured_output(Pet).invoke("Describe a pet.")
    assert isinstance(pet, Pet)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"guided_regex": "a(b"}, "guided_regex", "guided_regex: at 1(8): invalid regex"),
        (
            {"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}},
            "guided_json",
            "guided_json: Unsatisfiable schema: minimum (5) is greater than maximum (1)",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "response_format.json_schema.schema is required with type json_schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "response_format",
            "response_format: Invalid type: foo",
        ),
        ({"guided_grammar": "start: x"}, "guided_grammar", 'unknown name: "x"'),
        ({"guided_json": "{nope"}, "guided_json", "guided_json is not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "guided_choice needs at least one string"),
        (
            {"guided_regex": "a", "guided_choice": ["a"]},
            "guided_choice",
            "set at most one output constraint, got 2: guided_regex, guided_choice",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
            "guided_json",
            "set at most one output constraint, got 2: response_format, guided_json",
        ),
        # Hostile but valid: refused before the compiler, which crashed the worker on a
        # long $ref chain, ran for minutes on a long GBNF chain, took ~170 MB per cached
        # regex of nested counts, and failed mid-output past 2000 choices (500s).
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "chain", "schema": REF_CHAIN},
                }
            },
            "response_format",
            "may be at most 16384 characters",
        ),
        ({"guided_grammar": GBNF_CHAIN}, "guided_grammar", "may be at most 16384 characters"),
        ({"guided_regex": "(?:a{300}){300}"}, "guided_regex", "allow 90000 repeats, more than"),
        (
            {"guided_choice": [f"option {i}" for i in range(2500)]},
            "guided_choice",
            "at most 1000 strings, got 2500",
        ),
        ({"guided_json": "[" * 5000}, "guided_json", "guided_json is not valid JSON"),
        ({"guided_json": "[" * 100_000}, "guided_json", "may be at most 16384 characters"),
        ({"guided_regex": "x{0}", "min_tokens": 1}, "min_new_tokens", "can't be combined"),
        ({"guided_choice": ["a"], "ignore_eos": True}, "ignore_eos", "can't be combined"),
    ],
)
def test_bad_or_several_constraints_are_400s_naming_the_field(server, body, param, message):
    for route, base in (
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        r = post(server, route, {**base, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param
        assert message in error["message"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"regex": "a(b"}, "regex", "regex: at 1(8): invalid regex"),
        ({"json_schema": {"type": "foo"}}, "json_schema", "json_schema: Invalid type: foo"),
        (
            {"regex": "a", "choice": ["a", "b"]},
            "choice",
            "set at most one output constraint, got 2: regex, choice",
        ),
    ],
)
def test_native_bad_or_several_constraints_are_400s(server, body, field, message):
    for route in ("/generate", "/generate_stream"):
        r = post(server, route, {"prompt": "x", **body})
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]
        assert r.json()["detail"][0]["loc"] == [field]


def test_free_requests_beside_constrained_ones_keep_their_greedy_text(server):
    def free(prompt: str) -> str:
        r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})
        return r.json()["choices"][0]["text"]

    def constrained(k: int) -> str:
        body = {
            "prompt": f"Person {k}:",
            "max_tokens": MAX_TOKENS,
            "temperature": 1,
            "seed": k,
            "guided_json": BOUNDED["list"],
        }
        return post(server, "/v1/completions", body).json()["choices"][0]["finish_reason"]

    prompts = ["The river", "Once upon a time", "In 1999"]
    alone = [free(p) for p in prompts]
    with ThreadPoolExecutor(9) as pool:
        busy = [pool.submit(constrained, k) for k in range(6)]
        together = [pool.submit(free, p) for p in prompts]
        assert [f.result() for f in together] == alone
        assert all(f.result() == "stop" for f in busy)


# -- the boolean schemas -------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/completions", {"guided_json": True}),
        ("/v1/completions", {"guided_json": "true"}),
        (
            "/v1/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "t", "schema": True},
                }
            },
        ),
        ("/generate", {"json_schema": True}),
    ],
)
def test_the_schema_true_allows_any_json_value(server, route, body):
    """JSON Schema's `true` is `{}`: any JSON value. With random weights it may not end
    within the tokens given; where it ends by itself, its text parses."""
    budget = "max_new_tokens" if route == "/generate" else "max_tokens"
    for seed in range(3):
        r = post(server, route, {"prompt": "x", budget: 40, "temperature": 1, "seed": seed, **body})
        assert r.status_code == 200, r.text
        if route == "/generate":
            text, reason = r.json()["generated"], r.json()["finish_reason"]
        else:
            text, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        if reason in ("stop", "eos"):
            json.loads(text)


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"guided_json": False}, "guided_json"),
        ("/v1/completions", {"guided_json": "false"}, "guided_json"),
        (
            "/v1/chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "f", "schema": False},
                }
            },
            "response_format",
        ),
        ("/generate", {"json_schema": False}, "json_schema"),
        ("/generate_stream", {"json_schema": False}, "json_schema"),
    ],
)
def test_the_schema_false_is_a_400_naming_the_field(server, route, body, param):
    base = {"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"}
    r = post(server, route, {**base, **body})
    assert r.status_code == 400, r.text
    message = f"{param}: the schema false allows no value"
    if route.startswith("/v1"):
        assert r.json()["error"]["message"] == message
        assert r.json()["error"]["param"] == param
    else:
        assert r.json()["error"] == message
        assert r.json()["detail"][0]["loc"] == [param]


# -- a grammar that fails mid-output ---------------------------------------------------

# Fifty ambiguous rules side by side: the Earley row grows with every "a", and a few
# tokens in it passes llguidance's 2000 items per row. It compiles (the first rows are
# small), and fails mid-output.
AMBIGUOUS = (
    "start: "
    + " | ".join(f"x{i}" for i in range(50))
    + "\n"
    + "".join(f'x{i}: x{i} x{i} | "a"\n' for i in range(50))
)
NO_EOS = {"logit_bias": {"50256": -100}}  # the model would rather go on than end


def _log_tail(server, start: int) -> str:
    with server.log.open(errors="replace") as f:
        f.seek(start)
        return f.read()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_grammar_past_a_per_step_limit_is_a_400_naming_the_field(server, route):
    base = {"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"}
    start = server.log.stat().st_size
    body = {**base, "max_tokens": 64, "temperature": 0, "guided_grammar": AMBIGUOUS, **NO_EOS}
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "guided_grammar"
    assert error["type"] == "invalid_request_error"
    assert re.fullmatch(
        r"guided_grammar: the output constraint failed after \d+ generated tokens: "
        r"Parser Error: Current row has \d+ items; max is 2000; .*",
        error["message"],
    ), error["message"]
    log = _log_tail(server, start)
    assert "failed" not in log.replace("status=400", ""), log  # no step failed, no traceback
    assert "Traceback" not in log


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_grammar_past_a_per_step_limit_ends_a_stream_with_an_error_event(server, route):
    base = {"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"}
    body = {**base, "max_tokens": 64, "temperature": 0, "stream": True, "guided_grammar": AMBIGUOUS}
    r = post(server, route, {**body, **NO_EOS})
    assert r.status_code == 200
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["param"] == "guided_grammar"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("guided_grammar: the output constraint failed after ")
    assert "max is 2000" in error["message"]
    text = "".join(
        (c.get("text") or c.get("delta", {}).get("content") or "")
        for e in events[:-2]
        for c in json.loads(e)["choices"]
    )
    assert text and set(text) == {"a"}  # what came before the failure, as generated


# -- a bounded compile queue ---------------------------------------------------------


@pytest.fixture(scope="module")
def slow_compiles(model_store, tmp_path_factory):
    """Compiles that take 6 s each (tests/fault_service.py), 2 compile threads, and at
    most 1 new constraint waiting for one."""
    home, tag = model_store
    srv = start_server(
        home,
        tag,
        tmp_path_factory.mktemp("logs") / "slow_compiles.log",
        service="tests.fault_service:TextGeneration",
        TEXTGEN_TEST_FAULT="grammar_compile_sleeps=6",
        TEXTGEN_MAX_GRAMMAR_COMPILES_WAITING="1",
        TEXTGEN_GRAMMAR_COMPILE_SECONDS="60",
    )
    yield srv
    stop_server(srv)


def test_past_the_compile_queue_a_new_constraint_is_a_429_with_retry_after(slow_compiles):
    """Two compiles run, one waits; a fourth new constraint is refused at once, on both
    route families. The same constraint as a waiting one joins it; the rest finish."""
    url = slow_compiles.url

    def native(regex: str) -> httpx.Response:
        body = {"prompt": "x", "max_new_tokens": 3, "regex": regex}
        return httpx.post(f"{url}/generate", json=body, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        queued = [pool.submit(native, f"[0-9]{{{k}}}") for k in (1, 2, 3)]
        time.sleep(3)  # the three are in: two compiling, one waiting
        started = time.monotonic()
        refused = native("[0-9]{4}")
        openai_refused = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "x", "max_tokens": 3, "guided_regex": "[a-z]{4}"},
            timeout=120,
        )
        assert time.monotonic() - started < 2  # no wait for a turn
        joined = pool.submit(native, "[0-9]{3}")  # the waiting one's own constraint
        assert [f.result().status_code for f in queued] == [200, 200, 200]
        assert joined.result().status_code == 200
    message = (
        "server is at capacity: new output constraints waiting to compile: 1 of 1 allowed "
        "(TEXTGEN_MAX_GRAMMAR_COMPILES_WAITING); retry later"
    )
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == message
    assert openai_refused.status_code == 429
    assert openai_refused.headers["retry-after"] == "1"
    assert openai_refused.json()["error"]["message"] == message
    assert openai_refused.json()["error"]["type"] == "rate_limit_error"
    assert native("[0-9]{4}").status_code == 200  # the queue drained: compiled now
