"""A request's own chat template, rendered in a child process with a deadline and a memory cap.

Jinja's sandbox bounds what a template can reach, not how long it runs or how much it
allocates: three nested `range(10000)` loops run for hours, `'a'|center(1500000000)`
takes 1.5 GB, and a thread running either cannot be stopped. So a request's template
(TEXTGEN_TRUST_REQUEST_CHAT_TEMPLATE) compiles and renders in a fresh interpreter
(`python -m textgen.chat_sandbox MEMORY_BYTES CPU_SECONDS`) that caps its own address
space (RLIMIT_AS) and CPU time (RLIMIT_CPU, a backstop that ends a busy one even if the
server is gone) before it reads the template; the server kills it at the wall-clock deadline.
At most MAX_RENDERS run at once; at most MAX_WAITING_RENDERS more wait their turn, and
past that a request gets RenderersBusy (a 429). The deadline counts from the request's
arrival, its wait for a turn included; a caller that is cancelled (its client left) kills
its child or leaves the queue. The server's own template
(TEXTGEN_CHAT_TEMPLATE, trusted) renders in-process, as before.

The child reads one JSON object on stdin and writes one on stdout, in ASCII: {"text"} or
{"error", "memory"}. The text is at most `max_chars` characters (`ChatTemplate.render`), an
error at most MAX_ERROR_CHARS; the server reads at most `_answer_limit(max_chars)` bytes
of it, and past that the answer is a 400.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import signal
import sys
import weakref
from pathlib import Path
from typing import Any

from textgen.chat import MAX_TEMPLATE_CHARS, ChatTemplate, ChatTemplateError, TemplateMemoryError

MAX_RENDERS = 2  # child processes rendering at once (each may use a core until its deadline)
MAX_WAITING_RENDERS = 8  # renders waiting for a turn; past it, RenderersBusy
MAX_ERROR_CHARS = 1000  # of an error's text the child sends (a template chooses its message)
_ROOT = Path(__file__).resolve().parent.parent  # the directory holding textgen/


class RenderersBusy(Exception):
    """No turn to render now (the client's 429, worth a retry): MAX_WAITING_RENDERS
    renders wait already, or none came within the deadline."""


class _Turns:
    """MAX_RENDERS turns and the count of renders waiting for one."""

    def __init__(self) -> None:
        self.free = asyncio.Semaphore(MAX_RENDERS)
        self.waiting = 0


# Turns per event loop (a semaphore belongs to one loop).
_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = weakref.WeakKeyDictionary()


async def render(
    source: str,
    special_tokens: dict[str, str],
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    max_chars: int,
    kwargs: dict[str, Any] | None,
    timeout_s: float,
    memory_mb: int,
) -> str:
    """The prompt text of `source` rendered in a child process; raises ChatTemplateError
    (the client's 400) for a bad template, past `timeout_s` of wall time from the call,
    the wait for a turn included (the child is killed), or past `memory_mb` MiB of
    address space; RenderersBusy (a 429) when no turn is to be had."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(
            f"chat_template has {len(source)} characters; the limit is {MAX_TEMPLATE_CHARS}"
        )
    job = json.dumps(
        {
            "source": source,
            "special_tokens": special_tokens,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "max_chars": max_chars,
            "kwargs": kwargs,
        },
        ensure_ascii=True,  # ASCII both ways: a lone surrogate travels as its escape
    ).encode()
    loop = asyncio.get_running_loop()
    turns = _turns.get(loop) or _turns.setdefault(loop, _Turns())
    if turns.free.locked() and turns.waiting >= MAX_WAITING_RENDERS:
        raise RenderersBusy(
            f"{turns.waiting} chat_template renders are waiting for a turn (limit "
            f"{MAX_WAITING_RENDERS}; {MAX_RENDERS} render at once)"
        )
    arrived = loop.time()
    turns.waiting += 1
    try:
        # Not wait_for: on Python 3.11, a caller cancelled (its client gone) just as its
        # turn is granted gets the turn and no CancelledError, and renders for nobody.
        async with asyncio.timeout(timeout_s):
            await turns.free.acquire()
    except TimeoutError:
        raise RenderersBusy(
            f"no turn to render chat_template came within {timeout_s:g} s "
            f"(TEXTGEN_CHAT_TEMPLATE_TIMEOUT_SECONDS counts the wait; {MAX_RENDERS} render "
            "at once)"
        ) from None
    finally:
        turns.waiting -= 1
    try:
        limit = _answer_limit(max_chars)
        out, code = await _run(job, timeout_s, loop.time() - arrived, memory_mb, limit)
    finally:
        turns.free.release()
    try:
        answer = json.loads(out)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):  # it died without answering (a signal, an abort)
        raise ChatTemplateError(f"chat_template rendering ended without an answer ({_exit(code)})")
    if answer.get("memory"):
        raise ChatTemplateError(
            f"chat_template needs more than the {memory_mb} MiB a render may take "
            "(TEXTGEN_CHAT_TEMPLATE_MEMORY_MB)"
        )
    if "error" in answer:
        raise ChatTemplateError(str(answer["error"]))
    return str(answer["text"])


def _exit(code: int | None) -> str:
    """How the child ended, in words."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _answer_limit(max_chars: int) -> int:
    """Bytes of the child's answer the server reads: ASCII JSON spells a character in at
    most 6 bytes (a \\uXXXX escape), plus room for the keys and a cut error text."""
    return 6 * (max_chars + MAX_ERROR_CHARS) + 4096


class _TooLong(Exception):
    pass


async def _read(proc: asyncio.subprocess.Process, job: bytes, limit: int) -> bytes:
    """Sends `job` to the child and reads its stdout to the end, at most `limit` bytes
    (_TooLong past it). The child reads all its input before it writes."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(job)
        await proc.stdin.drain()
        proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # it ended before reading everything: it answers or not, as it ended
    chunks, size = [], 0
    while chunk := await proc.stdout.read(1 << 16):
        size += len(chunk)
        if size > limit:
            raise _TooLong
        chunks.append(chunk)
    await proc.wait()
    return b"".join(chunks)


async def _run(
    job: bytes, timeout_s: float, waited_s: float, memory_mb: int, limit: int
) -> tuple[bytes, int | None]:
    """Runs one child on `job`; returns (its stdout, its exit status). Kills it at the
    deadline, `timeout_s` less the `waited_s` already spent waiting for a turn
    (ChatTemplateError), past `limit` bytes of output (ChatTemplateError), and whenever
    the caller is cancelled."""
    spawning = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            sys.executable,
            "-X",
            "utf8",
            "-m",
            "textgen.chat_sandbox",
            str(memory_mb << 20),
            str(math.ceil(timeout_s) + 1),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=_ROOT,
            env={},  # nothing of the server's environment (its API key) reaches a template
        )
    )
    # A caller cancelled while the child is being spawned must not leave it running: the
    # spawn goes on shielded, and the child is killed as soon as it exists.
    try:
        proc = await asyncio.shield(spawning)
    except asyncio.CancelledError:
        spawning.add_done_callback(_kill_spawned)
        raise
    try:
        out = await asyncio.wait_for(_read(proc, job, limit), max(0.0, timeout_s - waited_s))
    except _TooLong:
        raise ChatTemplateError(
            f"chat_template rendering answered more than {limit} bytes, the most that a "
            "prompt of TEXTGEN_MAX_PROMPT_CHARS characters or a cut error message takes"
        ) from None
    except TimeoutError:
        wait = f", {waited_s:.1f} s of them waiting for a turn" if waited_s >= 0.05 else ""
        raise ChatTemplateError(
            f"chat_template did not render within {timeout_s:g} s "
            f"(TEXTGEN_CHAT_TEMPLATE_TIMEOUT_SECONDS){wait}"
        ) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out, proc.returncode


def _kill_spawned(spawning: asyncio.Future[asyncio.subprocess.Process]) -> None:
    """Kills the child a cancelled `_run` had started to spawn (asyncio reaps it)."""
    if not spawning.cancelled() and spawning.exception() is None:
        proc = spawning.result()
        if proc.returncode is None:
            proc.kill()


def _cut(text: str) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return f"{text[:MAX_ERROR_CHARS]}... (cut at {MAX_ERROR_CHARS} characters)"


def main(memory_bytes: int, cpu_seconds: int) -> None:
    """The child: caps itself, renders the job on stdin, answers on stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    try:
        job = json.loads(sys.stdin.buffer.read())
        tokens = job["special_tokens"]
        template = ChatTemplate(job["source"], tokens["eos_token"], tokens["bos_token"])
        text = template.render(
            job["messages"],
            add_generation_prompt=job["add_generation_prompt"],
            max_chars=job["max_chars"],
            kwargs=job["kwargs"],
        )
        answer: dict[str, Any] = {"text": text}
    except TemplateMemoryError as exc:
        answer = {"error": str(exc), "memory": True}
    except ChatTemplateError as exc:
        answer = {"error": _cut(str(exc))}
    except MemoryError:  # outside the template's own run (reading the job, say)
        answer = {"error": "chat_template rendering ran out of memory", "memory": True}
    except Exception as exc:  # the child's own failure, reported as what it is
        answer = {"error": _cut(f"chat_template rendering failed: {type(exc).__name__}: {exc}")}
    sys.stdout.buffer.write(json.dumps(answer, ensure_ascii=True).encode())


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
