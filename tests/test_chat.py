"""/v1/chat/completions: the template, the shapes, the limits. GPT-2 has no chat template;
the default writes each message's content followed by <|endoftext|>."""

from __future__ import annotations

import asyncio
import sys

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from tests.conftest import hf_greedy, make_engine
from textgen import chat_sandbox
from textgen.openai_api.app import attach, build_app, build_server_app

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def chat(client, **kw):
    return client.chat.completions.create(model="gpt2", messages=MESSAGES, temperature=0, **kw)


def templated_ids(tokenizer, messages) -> list[int]:
    eos = tokenizer.eos_token_id
    return [t for m in messages for t in [*tokenizer(m["content"]).input_ids, eos]]


def test_chat_answers_what_the_model_generates_after_the_default_template(
    client, tokenizer, tiny_model
):
    ids = templated_ids(tokenizer, MESSAGES)
    result = chat(client, max_completion_tokens=7, max_tokens=3)  # the newer name wins
    expected = hf_greedy(tiny_model, ids, 7)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(ids) and result.usage.completion_tokens == 7


def test_chat_logprobs_have_openais_shape(client):
    result = chat(client, max_tokens=4, logprobs=True, top_logprobs=3, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].message.content == result.choices[1].message.content  # greedy
    content = result.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert bytes(item.bytes).decode("utf-8", "replace") in (item.token, "\ufffd") or (
            item.token.startswith("bytes:")
        )
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob  # greedy: the chosen is the best
        assert item.top_logprobs[0].token == item.token


def test_request_templates_are_refused_unless_the_server_trusts_them(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, max_tokens=2, extra_body={"chat_template": "{{ messages }}"})
    assert err.value.body["param"] == "chat_template"
    assert err.value.body["message"] == (
        "chat_template is not accepted from requests on this server "
        "(TEXTGEN_TRUST_REQUEST_CHAT_TEMPLATE is off)"
    )


@pytest.fixture(scope="module")
def trusting(tiny_model, tokenizer):
    """The OpenAI app in-process, on an engine that trusts request templates."""
    eng = make_engine(tiny_model, tokenizer, trust_request_chat_template=True)
    v1, root = build_app(), build_server_app()
    attach(eng, v1, root)
    with TestClient(Starlette(routes=[Mount("/v1", v1), Mount("/", root)])) as c:
        yield c
    eng.shutdown()


def test_a_requests_own_template_is_used_when_trusted(trusting, tokenizer, tiny_model):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ tail }}"
    body = {
        "messages": MESSAGES,
        "max_tokens": 5,
        "temperature": 0,
        "chat_template": template,
        "chat_template_kwargs": {"tail": "Answer:"},
    }
    result = trusting.post("/v1/chat/completions", json=body).json()
    prompt = "[system] You are terse.\n[user] Name a colour.\nAnswer:"
    expected = hf_greedy(tiny_model, tokenizer(prompt).input_ids, 5)
    assert result["choices"][0]["message"]["content"] == tokenizer.decode(expected)
    tokens = trusting.post("/tokenize", json={**body, "max_tokens": None}).json()["tokens"]
    assert tokens == tokenizer(prompt).input_ids


@pytest.mark.parametrize(
    ("template", "kwargs", "message"),
    [
        ("{% for m in messages %}", None, "chat_template does not compile: "),
        ("{{ range(10**9) | list }}", None, "chat_template failed to render: range of 1000000000"),
        ("{{ 'x' * 100000000 }}", None, "chat_template failed to render: `*` would make 100000000"),
        (
            "{{ raise_exception('no system role') }}",
            None,
            "chat_template failed to render: no system",
        ),
        ("{{ cycler.__init__.__globals__.os }}", None, "chat_template failed to render: "),
        ("{{ 'x'|truncate(-5) }}", None, "chat_template failed to render: AssertionError"),
        ("{{ '{0}'.format() }}", None, "chat_template failed to render: IndexError"),
        (
            "{% for i in range(9000) %}{{ 'xx' }}{% endfor %}",
            None,
            "the chat template's output passes the limit of 16384 characters",
        ),
        ("{# pad #}" * 2000, None, "chat_template has 18000 characters; the limit is 16384"),
        (
            "{{ x }}",
            {"messages": 1, "eos_token": 2},
            "chat_template_kwargs may not set eos_token, messages",
        ),
    ],
)
def test_a_bad_or_hostile_template_gets_a_400(trusting, template, kwargs, message):
    body = {"messages": MESSAGES, "max_tokens": 2, "chat_template": template}
    if kwargs is not None:
        body["chat_template_kwargs"] = kwargs
    for route in ("/v1/chat/completions", "/tokenize"):
        r = trusting.post(route, json=body)
        assert r.status_code == 400, (route, r.text)
        assert r.json()["error"]["param"] == "chat_template"
        assert r.json()["error"]["message"].startswith(message)


def test_chat_template_kwargs_must_be_an_object(server):
    for route in ("/v1/chat/completions", "/tokenize"):
        body = {"messages": MESSAGES, "chat_template_kwargs": "ab"}
        r = httpx.post(f"{server.url}{route}", json=body, timeout=30)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "chat_template_kwargs"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": []}, "messages", "messages: List should have at least 1 item"),
        ({"messages": [{"content": "x"}]}, "messages.0.role", "messages.0.role: Field required"),
        (
            {"messages": MESSAGES, "top_logprobs": 2},
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ),
        (
            {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "top_logprobs must be <= 20 (TEXTGEN_MAX_LOGPROBS), got 21",
        ),
        ({"messages": MESSAGES, "n": 9}, "n", "n must be <= 8, got 9"),
        (
            {"messages": MESSAGES, "max_tokens": 2000},
            "max_tokens",
            "max_tokens must be <= 1024, got 2000",
        ),
    ],
)
def test_invalid_chat_requests_get_400_naming_the_field(server, body, param, message):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(message)


def test_the_server_template_comes_from_textgen_chat_template(tmp_path, tokenizer, tiny_model):
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}bot:")
    eng = make_engine(tiny_model, tokenizer, chat_template=str(path))
    try:
        v1, root = build_app(), build_server_app()
        attach(eng, v1, root)
        app = Starlette(routes=[Mount("/v1", v1), Mount("/", root)])
        with TestClient(app) as c:
            body = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
            result = c.post("/v1/chat/completions", json=body).json()
            info = c.get("/tokenizer_info").json()
            tokens = c.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        prompt = "system: You are terse.\nuser: Name a colour.\nbot:"
        assert tokens == tokenizer(prompt).input_ids
        expected = hf_greedy(tiny_model, tokens, 4)
        assert result["choices"][0]["message"]["content"] == tokenizer.decode(expected)
        assert info["chat_template"] == path.read_text()
    finally:
        eng.shutdown()


def test_the_sandbox_reads_at_most_its_limit_of_a_childs_answer():
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; sys.stdin.read(); sys.stdout.write('a' * 200000)",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            with pytest.raises(chat_sandbox._TooLong):
                await chat_sandbox._read(proc, b"{}", 1000)
        finally:
            proc.kill()
            await proc.wait()

    asyncio.run(main())
