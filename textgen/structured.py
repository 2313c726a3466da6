"""Structured output: JSON schema, regex, choice and Lark/GBNF constraints, with llguidance.

- `GrammarCompiler` turns a request's `Constraint` into a `Grammar` on its own threads,
  never the engine's, within a time limit (past it the request gets a 400 and the
  engine never waited), and caches grammars by constraint in an LRU bounded in entries.
  Its threads have stacks of COMPILE_STACK_BYTES whatever `ulimit -s` says (llguidance's
  compiler recurses), and at most `max_waiting` compiles wait for one (past it:
  CompilerBusy, the client retries).
- Each constrained sequence holds a `GrammarMatcher`: a copy of its grammar's pristine
  matcher, advanced by every token the sequence generates.
- `MaskBuilder` fills the token masks of a step's constrained rows (llguidance's
  batched fill on its thread pool, or one after another on the engine thread) as a
  (C, V) bool tensor of the
  forbidden tokens, which the sampler sets to -inf after penalties and logit_bias,
  greedy and sampled rows alike.

NOTE (invariants): a sequence's matcher has consumed exactly its output tokens; its
mask allows EOS only where the output is a whole match; once the matcher is stopped
(nothing but EOS could follow) the sequence is complete and the engine finishes it
("stop"). A matcher in an error state allows only EOS and rejects every token, so the
engine fails that sequence rather than return text that does not match.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch
from llguidance.gbnf_to_lark import any_to_lark

from textgen.params import Constraint, ParamError

MAX_ERROR_CHARS = 1000  # an engine message quoted in a 400, at most
# JSON without free whitespace: every token of a bounded schema moves the value on, so
# maxLength / maxItems / enum / integer ranges bound its tokens. A schema's own
# "x-guidance" options override these.
JSON_DEFAULTS = {"whitespace_flexible": False}
# llguidance's own bounds on one grammar (fuel for building the lexer, Earley items per
# step): they keep a compile and each mask finite whatever the grammar; the time limit
# is the engine's. verbose_errors off: the message names the problem, not parser state.
LIMITS = llguidance.LLParserLimits(verbose_errors=False)
# Each compile thread's stack. llguidance's compiler recurses (on `$ref` and rule chains)
# and crashes the process when it overflows; params.MAX_CONSTRAINT_CHARS bounds the depth,
# and the deepest constraint within it needs a few MiB. A thread's default stack is
# `ulimit -s` (8 MiB on most Linux, less where an operator sets it), so it is set here,
# with a wide margin. Address space only: pages a compile never touches are never used.
COMPILE_STACK_BYTES = 64 << 20
_stack_size_lock = threading.Lock()  # threading.stack_size is process-wide


class CompilerBusy(Exception):
    """Too many compiles are waiting for a compile thread; the client should retry."""


class GrammarError(ParamError):
    """A constraint that does not compile (or not in time); `param` names its field."""


class _Invalid(Exception):
    """The engine's message for a constraint that does not compile. Cached as it is:
    the request that hits the cache names its own field (`_named`)."""


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled constraint. Its matcher is never advanced: sequences take copies."""

    constraint: Constraint
    pristine: llguidance.LLMatcher

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self.pristine.deep_copy())


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.llmatcher = matcher

    def advance(self, token_id: int) -> bool:
        """Consumes one generated token; False when the grammar rejects it or the matcher
        is in an error state (`error` says why). llguidance's own consume accepts EOS
        from a matcher in an error state: that is a failure here."""
        consumed = bool(self.llmatcher.consume_token(token_id))
        return consumed and not self.llmatcher.is_error()

    @property
    def complete(self) -> bool:
        """The output is a whole match and nothing but EOS may follow."""
        return self.llmatcher.is_stopped() and not self.llmatcher.is_error()

    @property
    def error(self) -> str | None:
        return self.llmatcher.get_error() or None if self.llmatcher.is_error() else None


def grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint (not yet checked: the matcher does that)."""
    matcher = llguidance.LLMatcher
    if constraint.kind == "json":
        return matcher.grammar_from_json_schema(constraint.spec, defaults=JSON_DEFAULTS)
    if constraint.kind == "regex":
        return matcher.grammar_from_regex(constraint.spec)
    if constraint.kind == "choice":  # each string a JSON-quoted Lark literal
        options = json.loads(constraint.spec)
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in options))
    try:
        lark = any_to_lark(constraint.spec)  # GBNF becomes Lark; Lark stays as it is
    except Exception as exc:  # the converter raises bare Exceptions for bad GBNF
        raise ValueError(f"not a valid GBNF grammar: {exc}") from None
    return matcher.grammar_from_lark(lark)


def _named(constraint: Constraint, exc: _Invalid) -> GrammarError:
    text = str(exc).strip()
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return GrammarError(constraint.param, f"{constraint.param}: {text}")


def grammar_failed(param: str, matcher: GrammarMatcher, tokens: int) -> str:
    """The client's message for a grammar that failed mid-output, after `tokens` tokens:
    its field, and llguidance's message."""
    text = (matcher.error or "the grammar rejected a token").replace("<non-verbose/>", "")
    text = text.strip()
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return f"{param}: the output constraint failed after {tokens} generated tokens: {text}"


@contextlib.contextmanager
def thread_stack_size(size: int) -> Iterator[None]:
    """Threads started inside get stacks of `size` bytes; the old size comes back after."""
    with _stack_size_lock:
        old = threading.stack_size(size)
        try:
            yield
        finally:
            threading.stack_size(old)


class CompileThreads:
    """A fixed set of threads, started at once with their own stack size, running jobs in
    submission order."""

    def __init__(self, workers: int, stack_bytes: int, name: str = "textgen-grammar") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0  # jobs submitted and not yet done (running or waiting)
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        with thread_stack_size(stack_bytes):
            for thread in self._threads:
                thread.start()

    @property
    def waiting(self) -> int:
        """Jobs no thread has taken yet (as the number of threads tells)."""
        with self._lock:
            return max(0, self._pending - len(self._threads))

    @property
    def busy(self) -> bool:
        """Every thread has a job: a job submitted now would wait."""
        with self._lock:
            return self._pending >= len(self._threads)

    def submit(self, fn: Callable[[Constraint], Grammar], arg: Constraint) -> _Future:
        future: _Future = concurrent.futures.Future()
        with self._lock:
            self._pending += 1
        self._jobs.put((future, fn, arg))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, arg = job
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(fn(arg))
            except BaseException as exc:  # the waiting request hears it, whatever it is
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._pending -= 1

    def shutdown(self) -> None:
        """Cancels the jobs still waiting; the running ones finish, then the threads end."""
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)


class GrammarCompiler:
    """Compiles constraints off the engine thread, with a time limit and an LRU cache.

    `compile` may be awaited from any event loop; the cache is shared, and a constraint
    being compiled is compiled once for every request waiting on it.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        cache_size: int = 64,
        timeout_s: float = 5.0,
        workers: int = 2,
        max_waiting: int = 16,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size  # grammars kept, least recently used dropped first
        self.timeout_s = timeout_s  # from submission to compiled, queueing included
        self.max_waiting = max_waiting  # compiles queued for a thread before CompilerBusy
        self._pool = CompileThreads(workers, COMPILE_STACK_BYTES)
        self._cache: OrderedDict[Constraint, _Future] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (built once, on first use: about a second)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size
                )
            return self._tokenizer

    def __len__(self) -> int:
        return len(self._cache)

    def submit(self, constraint: Constraint) -> _Future:
        """The constraint's compile, cached (or on its way) or queued now. Raises
        CompilerBusy when it is new and `max_waiting` compiles already wait."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None and not future.cancelled():
                self._cache.move_to_end(constraint)
                return future
            waiting = self._pool.waiting
            if waiting >= self.max_waiting and self._pool.busy:
                raise CompilerBusy(
                    f"new output constraints waiting to compile: {waiting} of "
                    f"{self.max_waiting} allowed (TEXTGEN_MAX_GRAMMAR_COMPILES_WAITING)"
                )
            future = self._pool.submit(self._build, constraint)
            self._cache[constraint] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    async def compile(self, constraint: Constraint) -> Grammar:
        """The compiled grammar, or GrammarError (invalid, or not compiled in time)."""
        future = self.submit(constraint)
        waited = asyncio.wrap_future(future)
        # Read even when nobody awaits it any more (after a timeout): no "never retrieved".
        waited.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:  # shielded: one request's timeout must not cancel another's compile
            return await asyncio.wait_for(asyncio.shield(waited), self.timeout_s)
        except (TimeoutError, concurrent.futures.CancelledError):
            raise self._too_slow(constraint, future) from None
        except _Invalid as exc:
            raise _named(constraint, exc) from None

    def compile_blocking(self, constraint: Constraint) -> Grammar:
        """`compile` for a caller that is not on an event loop."""
        future = self.submit(constraint)
        try:
            return future.result(self.timeout_s)
        except (TimeoutError, concurrent.futures.CancelledError):
            raise self._too_slow(constraint, future) from None
        except _Invalid as exc:
            raise _named(constraint, exc) from None

    def _too_slow(self, constraint: Constraint, future: _Future) -> GrammarError:
        """A compile not done in time. The compile itself is left to finish (and stay
        cached): other requests may be waiting on the same future, and cancelling it would
        cancel theirs; params.MAX_CONSTRAINT_CHARS bounds how long it takes."""
        return GrammarError(
            constraint.param,
            f"{constraint.param}: the grammar did not compile within {self.timeout_s:g} s "
            "(TEXTGEN_GRAMMAR_COMPILE_SECONDS)",
        )

    def _build(self, constraint: Constraint) -> Grammar:
        try:
            text = grammar_text(constraint)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        # Both calls release the GIL: the event loop and the engine run meanwhile.
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0, limits=LIMITS)
        if not matcher.is_error():
            # The first mask builds the lexer's first states: every copy starts with them,
            # and an unsatisfiable grammar shows here, at compile time.
            matcher.compute_bitmask()
        if matcher.is_error():
            raise _Invalid(matcher.get_error())
        return Grammar(constraint, matcher)

    def shutdown(self) -> None:
        self._pool.shutdown()


_Future = concurrent.futures.Future  # of a Grammar
_Job = tuple[_Future, Callable[[Constraint], Grammar], Constraint]


class MaskBuilder:
    """The allowed tokens of a step's constrained rows, filled together."""

    def __init__(self, vocab_size: int, max_rows: int, threads: int = 0) -> None:
        self.vocab_size = vocab_size
        # threads 0: each mask filled in turn on the calling (engine) thread; else on a
        # pool of that many threads, which then compete with the model's for the cores.
        self._executor = llguidance.LLExecutor(threads) if threads > 0 else None
        # bits[i, w] bit j: token 32 w + j is allowed for the step's i-th constrained row.
        self._bits = llguidance.torch.allocate_token_bitmask(max_rows, vocab_size)  # (R, W)

    def forbidden(self, matchers: list[GrammarMatcher], device: torch.device) -> torch.Tensor:
        """(C, V) bool on `device`, row i for matchers[i]: True for the tokens its grammar
        does not allow next. A matcher in an error state allows only EOS (its `error` says
        why)."""
        return self.unpack(~self.fill(matchers), device)  # the inverted bits: forbidden

    def fill(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        """(C, W) int32 bitmask, row i for matchers[i]; a view of the reused buffer."""
        bits = self._bits[: len(matchers)]  # (C, W) int32, contiguous
        if self._executor is None:
            for i, m in enumerate(matchers):
                llguidance.torch.fill_next_token_bitmask(m.llmatcher, bits, i)
        else:
            llguidance.torch.fill_next_token_bitmask_par(
                self._executor, [(m.llmatcher, i) for i, m in enumerate(matchers)], bits
            )
        return bits

    def unpack(self, bits: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(C, W) int32 bitmask -> (C, V) bool on `device`."""
        if device.type == "cpu":
            return unpack_bits_numpy(bits, self.vocab_size)
        # Non-blocking from the pinned buffer: the step syncs (its tokens .tolist()) before
        # the next fill overwrites it.
        return unpack_bits_torch(bits.to(device, non_blocking=True), self.vocab_size)


def unpack_bits_numpy(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(C, W) int32 bitmask on the CPU -> (C, V) bool, token 32 w + j from bit j of word w.
    Little-endian words: byte b holds tokens 8 b .. 8 b + 7, lowest bit first."""
    as_bytes = bits.numpy().view(np.uint8)  # (C, 4 W)
    unpacked = np.unpackbits(as_bytes, axis=1, count=vocab_size, bitorder="little")
    return torch.from_numpy(unpacked).view(torch.bool)  # (C, V), 0/1 bytes read as bool


def unpack_bits_torch(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The same on any device: (C, W) int32 -> (C, V) bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    expanded = (bits[:, :, None] >> shifts) & 1  # (C, W, 32)
    return expanded.bool().reshape(bits.shape[0], -1)[:, :vocab_size]
