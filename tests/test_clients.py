"""Real clients, as users drive them, against a real `bentoml serve` (issue 10).

LangChain's `OpenAI` and `ChatOpenAI`, LiteLLM's `text_completion` and `completion` (the
`openai/` provider with `api_base`) and the `openai` client, each streaming and not, on
/v1/completions and /v1/chat/completions; and guidellm with its default settings (the chat
route after a GET /health) on a short synthetic run. Everything stays on localhost.

At temperature 0 generation is deterministic, so every client's text is compared with the
`openai` client's for the same request, and each streamed concatenation with the whole text.
GPT-2 has no chat template: the default one is each message's content followed by
<|endoftext|>, so a chat reply equals the completion of that prompt.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import store_entries

# LiteLLM fetches a model cost map over the network on import unless told not to.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAI

PROMPT = "The meaning of life is"
MAX_TOKENS = 8
MESSAGES = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": PROMPT},
]
EOT = "<|endoftext|>"
TEMPLATED = "".join(m["content"] + EOT for m in MESSAGES)  # GPT-2's default chat template

# LiteLLM's own models warn about pydantic features as it builds them: not this project's.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning"
    ),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_(computed_)?fields' attribute"),
]


@pytest.fixture(scope="module")
def server(paced):
    """The paced server (conftest): the streaming tests below check that text came in more
    than one chunk, which under load the plain server may merge into one."""
    return paced


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def n_tokens(tokenizer, text: str) -> int:
    """Tokens the server counts for `text` (<|endoftext|> is one special token)."""
    return len(tokenizer(text)["input_ids"])


def expected_usage(prompt_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": MAX_TOKENS,
        "total_tokens": prompt_tokens + MAX_TOKENS,
    }


@pytest.fixture(scope="module")
def reference(client, tokenizer):
    """The `openai` client's greedy completion of PROMPT and chat reply to MESSAGES."""
    completion = client.completions.create(
        model="gpt2", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    chat = client.chat.completions.create(
        model="gpt2", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    return {
        "text": completion.choices[0].text,
        "completion": completion,
        "chat_text": chat.choices[0].message.content,
        "chat": chat,
        "prompt_tokens": n_tokens(tokenizer, PROMPT),
        "chat_prompt_tokens": n_tokens(tokenizer, TEMPLATED),
    }


def usage_of(usage) -> dict[str, int]:
    return {k: getattr(usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


# -- the openai client -------------------------------------------------------------------------


def test_openai_completions(reference):
    result = reference["completion"]
    assert result.object == "text_completion" and result.model == "gpt2"
    assert len(result.choices) == 1 and result.choices[0].finish_reason == "length"
    assert result.choices[0].text  # 8 tokens of a random model: never empty
    assert usage_of(result.usage) == expected_usage(reference["prompt_tokens"])


def test_openai_completions_streamed(client, reference):
    chunks = list(
        client.completions.create(
            model="gpt2",
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert sum(1 for t in texts if t) > 1
    assert "".join(texts) == reference["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == []
    assert usage_of(chunks[-1].usage) == expected_usage(reference["prompt_tokens"])


def test_openai_chat_is_the_completion_of_the_default_template(client, reference):
    chat = reference["chat"]
    assert chat.object == "chat.completion" and chat.model == "gpt2"
    assert chat.id.startswith("chatcmpl-")
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert usage_of(chat.usage) == expected_usage(reference["chat_prompt_tokens"])
    same = client.completions.create(
        model="gpt2", prompt=TEMPLATED, max_tokens=MAX_TOKENS, temperature=0
    )
    assert choice.message.content == same.choices[0].text
    assert same.usage.prompt_tokens == reference["chat_prompt_tokens"]


def test_openai_chat_streamed(client, reference):
    chunks = list(
        client.chat.completions.create(
            model="gpt2",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert all(d.role is None for d in deltas[1:])
    contents = [d.content for d in deltas if d.content]
    assert len(contents) > 1
    assert "".join(contents) == reference["chat_text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == []
    assert usage_of(chunks[-1].usage) == expected_usage(reference["chat_prompt_tokens"])


# -- LangChain -----------------------------------------------------------------------------------


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def langchain_llm(server, **kw) -> OpenAI:
    return OpenAI(**langchain_args(server), **kw)


def langchain_chat(server, **kw) -> ChatOpenAI:
    return ChatOpenAI(**langchain_args(server), **kw)


def langchain_args(server) -> dict:
    return {
        "model": "gpt2",
        "base_url": f"{server.url}/v1",
        "api_key": "unused",
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "max_retries": 0,
    }


LC_MESSAGES = [SystemMessage(MESSAGES[0]["content"]), HumanMessage(MESSAGES[1]["content"])]


def test_langchain_openai(server, reference):
    llm = langchain_llm(server)
    assert llm.invoke(PROMPT) == reference["text"]
    result = llm.generate([PROMPT])
    generation = result.generations[0][0]
    assert generation.text == reference["text"]
    assert generation.generation_info["finish_reason"] == "length"
    assert result.llm_output["token_usage"] == expected_usage(reference["prompt_tokens"])
    assert result.llm_output["model_name"] == "gpt2"


def test_langchain_openai_streamed(server, reference):
    chunks = list(langchain_llm(server).stream(PROMPT))
    assert sum(1 for c in chunks if c) > 1
    assert "".join(chunks) == reference["text"]
    # The streaming mode of `generate`: tokens through callbacks, the finish reason kept.
    recorder = TokenRecorder()
    result = langchain_llm(server, streaming=True).generate([PROMPT], callbacks=[recorder])
    generation = result.generations[0][0]
    assert generation.text == reference["text"] == "".join(recorder.tokens)
    assert sum(1 for t in recorder.tokens if t) > 1
    assert generation.generation_info["finish_reason"] == "length"


def test_langchain_chat_openai(server, reference):
    message = langchain_chat(server).invoke(LC_MESSAGES)
    assert message.content == reference["chat_text"]
    assert message.response_metadata["finish_reason"] == "length"
    assert message.response_metadata["model_name"] == "gpt2"
    prompt_tokens = reference["chat_prompt_tokens"]
    assert message.usage_metadata["input_tokens"] == prompt_tokens
    assert message.usage_metadata["output_tokens"] == MAX_TOKENS
    assert message.usage_metadata["total_tokens"] == prompt_tokens + MAX_TOKENS


def test_langchain_chat_openai_streamed(server, reference):
    chunks = list(langchain_chat(server, stream_usage=True).stream(LC_MESSAGES))
    assert sum(1 for c in chunks if c.content) > 1
    whole = functools.reduce(operator.add, chunks)
    assert whole.content == reference["chat_text"]
    assert whole.response_metadata["finish_reason"] == "length"
    prompt_tokens = reference["chat_prompt_tokens"]
    assert whole.usage_metadata["input_tokens"] == prompt_tokens
    assert whole.usage_metadata["output_tokens"] == MAX_TOKENS
    assert whole.usage_metadata["total_tokens"] == prompt_tokens + MAX_TOKENS


# -- LiteLLM -------------------------------------------------------------------------------------


def litellm_args(server) -> dict:
    return {
        "model": "openai/gpt2",
        "api_base": f"{server.url}/v1",
        "api_key": "unused",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "num_retries": 0,
    }


def test_litellm_text_completion(server, reference):
    result = litellm.text_completion(prompt=PROMPT, **litellm_args(server))
    assert result.object == "text_completion" and result.model == "gpt2"
    assert [c.text for c in result.choices] == [reference["text"]]
    assert result.choices[0].finish_reason == "length"
    assert usage_of(result.usage) == expected_usage(reference["prompt_tokens"])


def test_litellm_text_completion_streamed(server, reference):
    chunks = list(litellm.text_completion(prompt=PROMPT, stream=True, **litellm_args(server)))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) > 1
    assert "".join(texts) == reference["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1


def test_litellm_completion_messages(server, reference):
    result = litellm.completion(messages=MESSAGES, **litellm_args(server))
    assert result.object == "chat.completion" and result.model == "gpt2"
    choice = result.choices[0]
    assert choice.message.content == reference["chat_text"]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert usage_of(result.usage) == expected_usage(reference["chat_prompt_tokens"])


def test_litellm_completion_messages_streamed(server, reference):
    chunks = list(
        litellm.completion(
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            **litellm_args(server),
        )
    )
    contents = [c.choices[0].delta.content for c in chunks if c.choices]
    assert sum(1 for t in contents if t) > 1
    assert "".join(t for t in contents if t) == reference["chat_text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage_of(usage[-1]) == expected_usage(reference["chat_prompt_tokens"])


# -- guidellm ------------------------------------------------------------------------------------

GUIDELLM_REQUESTS = 8
SYNTHETIC = {"prompt_tokens": 64, "output_tokens": 32}


def test_guidellm_default_settings_synthetic_run(server, model_store, tmp_path, tokenizer):
    """`guidellm run` with its defaults: GET /health, /v1/models, streamed chat requests."""
    home, tag = model_store
    tokenizer_dir = f"{store_entries(home)[tag].path}/tokenizer"
    report = tmp_path / "benchmarks.json"
    synthetic = ",".join(f"{k}={v}" for k, v in SYNTHETIC.items())
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GUIDELLM__DEFAULT_RESULTS_DIR": str(tmp_path),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidellm",
            "run",
            f"--backend=kind=openai_http,target={server.url}",
            "--profile=kind=concurrent,streams=2",
            f"--constraint=kind=max_requests,count={GUIDELLM_REQUESTS}",
            f"--data=kind=synthetic_text,{synthetic}",
            f"--tokenizer=kind=huggingface_auto,model={tokenizer_dir}",
            f"--output=kind=json,path={report}",
            "--disable-console-interactive",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    backend = benchmark["config"]["backend"]
    # Its defaults were in force: the chat route, streaming, the health check first.
    assert backend["request_format"] == "/v1/chat/completions"
    assert backend["stream"] is True and backend["validate_backend"] is True
    assert backend["api_routes"]["/health"] == "health"
    assert backend["model"] == "gpt2"  # read from /v1/models
    # guidellm exits 0 even when every request failed: its counts are the verdict.
    totals = benchmark["metrics"]["request_totals"]
    assert totals["errored"] == 0 and totals["incomplete"] == 0
    assert totals["successful"] == GUIDELLM_REQUESTS
    for request in benchmark["requests"]["successful"]:
        assert request["response_id"].startswith("chatcmpl-")
        body = json.loads(request["request_args"])["body"]
        assert body["stream_options"]["continuous_usage_stats"] is True
        assert body["ignore_eos"] is True
        (message,) = body["messages"]
        text = "".join(part["text"] for part in message["content"])
        # The server's usage: the templated prompt (content + <|endoftext|>), and exactly
        # `output_tokens` generated since guidellm sends ignore_eos.
        assert request["prompt_tokens"] == n_tokens(tokenizer, text + EOT)
        assert request["output_tokens"] == SYNTHETIC["output_tokens"]
        assert request["output"]
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200
