"""/v1/chat/completions: the template, the shapes, the limits. GPT-2 has no chat template;
the default writes each message's content followed by <|endoftext|>."""

from __future__ import annotations

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from tests.conftest import hf_greedy, make_engine
from textgen import openai_api

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


def test_a_requests_own_template_is_used(client, tokenizer, tiny_model):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}Answer:"
    result = chat(client, max_tokens=5, extra_body={"chat_template": template})
    prompt = "[system] You are terse.\n[user] Name a colour.\nAnswer:"
    expected = hf_greedy(tiny_model, tokenizer(prompt).input_ids, 5)
    assert result.choices[0].message.content == tokenizer.decode(expected)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}", "chat_template does not compile: "),
        ("{{ range(10**9) | list }}", "chat_template failed to render: range of 1000000000"),
        ("{{ 'x' * 100000000 }}", "chat_template failed to render: `*` would make 100000000"),
        ("{{ raise_exception('no system role') }}", "chat_template failed to render: no system"),
        ("{{ cycler.__init__.__globals__.os }}", "chat_template failed to render: "),
        ("{# pad #}" * 2000, "chat_template has 18000 characters; the limit is 16384"),
    ],
)
def test_a_bad_or_hostile_template_gets_a_400(client, template, message):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, max_tokens=2, extra_body={"chat_template": template})
    assert err.value.body["param"] == "chat_template"
    assert err.value.body["message"].startswith(message)


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
            "logprobs",
            "logprobs must be <= 20 (TEXTGEN_MAX_LOGPROBS), got 21",
        ),
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
        v1, root = openai_api.build_app(), openai_api.build_server_app()
        openai_api.attach(eng, v1, root)
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
