"""schemathesis against the service's own OpenAPI spec: no 5xx, responses conform.

Runs schemathesis' own CLI (its pytest plugin does not load under pytest 9).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def short_context(model_store, tmp_path_factory) -> Iterator[Server]:
    """A server whose context is 128 positions: requests without a token budget (chat,
    `max_tokens: null`) generate to its end, so a short one keeps the fuzzing quick."""
    home, tag = model_store
    log = tmp_path_factory.mktemp("logs") / "fuzz.log"
    srv = start_server(home, tag, log, TEXTGEN_MAX_MODEL_LEN="128")
    yield srv
    stop_server(srv)


def test_no_server_errors_and_responses_conform(short_context, tmp_path):
    server = short_context
    cli = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(  # runs: schemathesis
        [
            str(cli),
            "run",
            f"{server.url}/docs.json",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            "30",
            "--phases",
            "examples,coverage,fuzzing",
            "--request-timeout",
            "60",
            "--suppress-health-check",
            "all",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "passed" in result.stdout
