"""Docker helpers shared by the container and cluster tests (the fixtures are in conftest)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(*cmd: str, env: dict[str, str] | None = None, timeout: int = 1800) -> str:
    """Runs a command in the checkout; its stdout, or an AssertionError with its output."""
    result = subprocess.run(  # runs: -
        cmd,
        cwd=ROOT,
        env={**os.environ, "DOCKER_BUILDKIT": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


def docker_engine_error() -> str | None:
    """Starts a Docker engine (scripts/docker_standin.sh); None when one is ready, else why not.

    Raises when the script fails for another reason than "no engine can be had here".
    """
    result = subprocess.run(
        ["scripts/docker_standin.sh"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    if result.returncode == 3:
        return result.stderr.strip().splitlines()[-1]
    assert result.returncode == 0, result.stderr
    return None


def build_image(home: Path, model_tag: str, name: str = "textgen-test") -> str:
    """`bentoml build` with TEXTGEN_MODEL=model_tag, then `bentoml containerize`; the image tag."""
    env = {"BENTOML_HOME": str(home), "TEXTGEN_MODEL": model_tag}
    built = sh(sys.executable, "-m", "bentoml", "build", "--output", "tag", env=env)
    bento_tag = re.search(r"__tag__:(\S+)", built).group(1)
    image_tag = f"{name}:{bento_tag.split(':')[1]}"
    started = time.monotonic()
    sh(sys.executable, "-m", "bentoml", "containerize", bento_tag, "-t", image_tag, env=env)
    size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", image_tag))
    print(f"containerize took {time.monotonic() - started:.0f}s; image {size / 1e9:.2f} GB")
    return image_tag


def remove_image(image_tag: str) -> None:
    subprocess.run(["docker", "image", "rm", "-f", image_tag], capture_output=True)
    subprocess.run(["docker", "image", "prune", "-f"], capture_output=True)


def wait_until(predicate: object, timeout_s: float, what: str, every_s: float = 0.5) -> None:
    """Polls `predicate()` until it is true; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
