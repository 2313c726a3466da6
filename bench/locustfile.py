"""A soak for a running server: mixed /generate, /generate_stream and /v1/completions.

    locust -f bench/locustfile.py --headless -u 48 -r 8 -t 3m --host http://127.0.0.1:3000

TEXTGEN_API_KEY, when set, is sent as the bearer token. A 429 (the server's
backpressure) is counted apart from failures, under its own name.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

PROMPTS = [
    "Artificial Intelligence is a",
    "The quick brown fox",
    "In a shocking finding, scientists discovered a herd of unicorns",
    "Once upon a time",
]
HEADERS = (
    {"Authorization": f"Bearer {os.environ['TEXTGEN_API_KEY']}"}
    if os.environ.get("TEXTGEN_API_KEY")
    else {}
)


def _check(response, expected: str) -> None:  # noqa: ANN001 (locust's response type)
    if response.status_code == 429:
        response.request_meta["name"] += " [429]"
        response.success()
    elif response.status_code != 200 or expected not in response.text:
        response.failure(f"{response.status_code}: {response.text[:200]}")
    else:
        response.success()


class TextgenUser(HttpUser):
    wait_time = between(0.1, 1.0)

    def _body(self) -> dict[str, object]:
        n = random.choice([16, 32, 64])
        return {"prompt": random.choice(PROMPTS), "max_new_tokens": n, "min_new_tokens": n}

    @task(3)
    def generate(self) -> None:
        with self.client.post(
            "/generate", json=self._body(), headers=HEADERS, catch_response=True
        ) as r:
            _check(r, '"finish_reason"')

    @task(2)
    def generate_stream(self) -> None:
        with self.client.post(
            "/generate_stream",
            json=self._body(),
            headers=HEADERS,
            catch_response=True,
            stream=True,
        ) as r:
            _check(r, '"finish_reason"')

    @task(1)
    def completions(self) -> None:
        body = {
            "model": "gpt2",
            "prompt": random.choice(PROMPTS),
            "max_tokens": 32,
            "temperature": 0.8,
            "top_p": 0.95,
        }
        with self.client.post(
            "/v1/completions", json=body, headers=HEADERS, catch_response=True
        ) as r:
            _check(r, '"text_completion"')
