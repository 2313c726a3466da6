"""The real image: bentoml build + containerize, run, called, stopped with SIGTERM.

Needs a Docker engine; scripts/docker_standin.sh provides one on Debian as root
(and a local stand-in for python:3.11-slim, since there is no image registry).
Without one the test skips, except in CI, where it must run.
"""

from __future__ import annotations

import subprocess
import threading
import time

import bentoml
import httpx
import openai
import pytest

from tests.conftest import free_port, hf_greedy, load_stored_model, wait_ready
from tests.dockerized import sh

PROMPT = "Artificial Intelligence is a"
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture
def container(image):
    image_tag, _, _ = image
    port = free_port()
    cid = sh(
        "docker",
        "run",
        "-d",
        "-p",
        f"127.0.0.1:{port}:3000",
        "-e",
        "TEXTGEN_DTYPE=float32",
        image_tag,
    ).strip()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        if not wait_ready(url, 180, exited=lambda: _exited(cid)):
            raise AssertionError(sh("docker", "logs", cid)[-4000:])
        print(f"container ready {time.monotonic() - started:.1f}s after start")
        yield cid, url
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def _exited(cid: str) -> bool:
    return sh("docker", "inspect", "-f", "{{.State.Running}}", cid).strip() != "true"


def test_image_serves_generate_and_openai_as_non_root(image, container, tokenizer):
    _, home, model_tag = image
    cid, url = container
    model = load_stored_model(home, model_tag)
    ids = tokenizer(PROMPT).input_ids
    expected = tokenizer.decode(hf_greedy(model, ids, 16))
    with bentoml.SyncHTTPClient(url) as client:
        result = client.generate(prompt=PROMPT, max_new_tokens=16)
    assert result["generated"] == expected
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        done = client.completions.create(
            model=model_tag.split(":")[0], prompt=PROMPT, max_tokens=16, temperature=0
        )
    assert done.choices[0].text == expected
    uid = sh("docker", "exec", cid, "id", "-u").strip()
    assert uid != "0"
    user = sh("docker", "exec", cid, "id", "-un").strip()
    assert user == "bentoml"


def test_sigterm_lets_the_running_request_finish_and_stops_cleanly(container):
    cid, url = container
    result: dict[str, object] = {}

    def long_request() -> None:
        body = {"prompt": PROMPT, "max_new_tokens": 1000, "min_new_tokens": 1000}
        r = httpx.post(f"{url}/generate", json=body, timeout=300)
        result["status"] = r.status_code
        result["tokens"] = r.json()["usage"]["completion_tokens"]

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.5)  # the request is running
    sh("docker", "kill", "--signal", "TERM", cid)
    worker.join(timeout=300)
    assert result == {"status": 200, "tokens": 1000}
    exit_code = sh("docker", "wait", cid, timeout=120).strip()
    assert exit_code == "0"


def test_image_serves_the_model_it_packed_with_no_environment(image, container):
    """Built with TEXTGEN_MODEL=tiny-gpt2:<version>, not the default gpt2:latest; the
    container is given no TEXTGEN_MODEL and serves the packed model."""
    _, _, model_tag = image
    cid, url = container
    assert not model_tag.startswith("gpt2:")
    assert "TEXTGEN_MODEL" not in sh("docker", "inspect", "-f", "{{json .Config.Env}}", cid)
    logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
    assert f"engine ready: model={model_tag} " in logs.stdout + logs.stderr
    assert httpx.post(f"{url}/generate", json={"prompt": PROMPT}).status_code == 200
