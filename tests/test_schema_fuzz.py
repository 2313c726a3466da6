"""schemathesis against the service's own OpenAPI spec: no 5xx, responses conform.

Runs schemathesis' own CLI (its pytest plugin does not load under pytest 9).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_no_server_errors_and_responses_conform(server, tmp_path):
    cli = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
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
            # A chat request without max_tokens generates to the end of the context.
            "--request-timeout",
            "120",
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
