"""Iteration-level (continuous) batching, with no model in it.

The scheduler decides which sequences run at each decode step; the model runner
does the tensor work. Tests drive this module with scripted token ids.

NOTE (the invariant the runner relies on): a running sequence owns one KV
cache slot (`seq.slot`) from admission to retirement, and no two running
sequences share a slot. Slots never move: `admit` takes the lowest free slot
(so the live slots stay packed near 0 and decode attention spans few holes),
`retire` gives a finished sequence's slot back. Nothing is copied when a
neighbour leaves. With prefix caching (textgen/prefix_cache.py) `admit` takes
instead the free slot that already holds the longest prefix of the prompt, or
the lowest empty one, else the least recently used one (so running sequences
may spread over the slots, and decode attends over the gaps), and may name a
slot to copy a prefix from (`copy_from`), which the engine does before anything
else writes.

NOTE (fair share): the sequences one `submit` queues are one request, a group
(`seq.group`). `admit` fills a free slot with the waiting sequence whose group holds
the fewest slots (arrival order among equals), and no group holds more than
`max_slots_per_request` slots: a request queued behind a wide one takes the next
free slot, and while that bound is below `max_batch_size` it finds one free at once
whenever only one other request runs.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from textgen.params import SamplingParams
from textgen.prefix_cache import Match, PrefixCache, common_prefix


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_LENGTH = "length"
    FINISHED_STOP = "stop"
    FINISHED_EOS = "eos"
    CANCELLED = "cancelled"
    FAILED = "error"

    @property
    def finished(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)

    @property
    def finish_reason(self) -> str:
        """The wire name: length | stop | eos | cancelled | error."""
        return self.value


# Not frozen, though nothing changes one once made: one is made per token on the event
# loop, and a frozen dataclass's __init__ (object.__setattr__ per field) costs three to
# four times a plain one's.
@dataclass(slots=True)
class TokenEvent:
    token_id: int
    text: str  # text this token made safe to show; '' while held back
    logprob: float | None = None  # log-probability of token_id under the model
    top_logprobs: TopLogprobs = ()  # (id, logprob) alternatives, best first
    # On a sequence's first event only, when it scores its prompt: one entry per token.
    prompt_logprobs: list[PromptLogprob] | None = None


@dataclass(frozen=True, slots=True)
class FinishEvent:
    status: Status
    text: str  # the whole generated text (equals the concatenated TokenEvent texts)
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # As TokenEvent's: here when the sequence made no token (max_new_tokens 0, a failure).
    prompt_logprobs: list[PromptLogprob] | None = None
    # FAILED by what the request sent (its output constraint hit a grammar-engine limit
    # mid-output): the wire field at fault, and the client gets a 4xx; None: the server's.
    param: str | None = None


Event = TokenEvent | FinishEvent
TopLogprobs = tuple[tuple[int, float], ...]  # (id, logprob) alternatives, best first
# One prompt position: (logprob of the prompt's token there given the tokens before it,
# the most likely tokens there as (id, logprob), best first). The first position has none.
PromptLogprob = tuple[float, TopLogprobs] | None

_ids = itertools.count()
_groups = itertools.count()


@dataclass(eq=False)
class Sequence:
    """The engine's state of one generated sequence: token ids, never text.

    Text, stop strings and events are the output side's (textgen/output.py): after each
    step the engine hands it `output_ids[delivered:]`, and it may end a sequence early (a
    stop string) by cancelling it.
    """

    prompt_ids: list[int]
    params: SamplingParams
    rng: random.Random | None = None  # when sampling: one uniform draw per token, seeded
    request_id: int = field(default_factory=lambda: next(_ids))
    group: int = -1  # the request it belongs to: the sequences of one `submit`
    output_ids: list[int] = field(default_factory=list)
    # With `params.logprobs`: one (logprob, top logprobs) per output token.
    token_logprobs: list[tuple[float, TopLogprobs]] | None = None
    status: Status = Status.WAITING
    slot: int = -1  # KV cache slot while running
    cancel_requested: bool = False  # set from any thread; honoured at the next step
    arrival_time: float = field(default_factory=time.perf_counter)
    error: str | None = None  # why it failed, once it has
    error_param: str | None = None  # FAILED by what the request sent: the field at fault
    # Written by the engine thread only: output tokens handed to the output side, and
    # whether its finish was (once it is, nothing more is handed over).
    delivered: int = 0
    finish_delivered: bool = False
    # One entry per prompt token when `params.prompt_logprobs` is set: written by the
    # engine thread at prefill, before the sequence's first event is delivered.
    prompt_logprobs: list[PromptLogprob] | None = None
    # Set at admission (prefix caching): positions 0..cached_tokens-1 of the slot hold
    # this prompt's keys and values before its prefill (copied from slot `copy_from`
    # first, when that is not None), and, when it scores its prompt, their entries.
    cached_tokens: int = 0
    copy_from: int | None = None
    prefix_logprobs: list[PromptLogprob] | None = None
    prefilled: bool = False  # its prompt's keys and values are in its slot
    # With a constraint (`params.constraint`): its textgen.structured.GrammarMatcher, which
    # has consumed exactly `output_ids`. Advanced by the engine thread only.
    grammar: Any = None

    def __post_init__(self) -> None:
        if self.params.logprobs is not None and self.token_logprobs is None:
            self.token_logprobs = []

    @property
    def num_tokens(self) -> int:
        """Tokens in the KV cache once the last output token is fed back."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_computed(self) -> int:
        """Tokens whose keys and values are in its slot now (the last output token's are
        written when it is fed back, at the next step)."""
        if not self.prefilled:
            return 0
        return self.num_tokens - 1 if self.output_ids else len(self.prompt_ids)

    def append_token(self, token_id: int, eos_token_id: int | None, complete: bool = False) -> None:
        """Records one generated token and decides whether the engine stops here: EOS
        (unless ignored), a stop token id, `max_new_tokens`, or `complete` (the output
        matches the sequence's constraint whole and nothing can follow it). Stop strings
        are the output side's to find."""
        self.output_ids.append(token_id)
        params = self.params
        if token_id == eos_token_id and not params.ignore_eos:
            self.finish(Status.FINISHED_EOS)
        elif token_id in params.stop_token_ids:
            self.finish(Status.FINISHED_STOP)
        elif len(self.output_ids) >= params.max_new_tokens:
            self.finish(Status.FINISHED_LENGTH)
        elif complete:
            self.finish(Status.FINISHED_STOP)

    def finish(self, status: Status, error: str | None = None, param: str | None = None) -> None:
        """Ends the sequence (a no-op once it has ended). `param`: for FAILED, the request
        field at fault when the request, not the server, caused the failure."""
        if self.status.finished:
            return
        self.status, self.error, self.error_param = status, error, param


# A prompt sharing this many tokens more with one admitted in the same step than the
# prefix cache holds waits one step, to take them from the cache instead of computing them.
DEFER_SHARED_TOKENS = 16


# A row at most half as long as its call's longest, and this many tokens shorter, goes
# to another call: its padding would cost more than the call's fixed cost.
MIN_PADDING_SPLIT = 32


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Row indices in groups to prefill together: by decreasing length, a new group
    whenever a row would be padded to over twice its length (and by MIN_PADDING_SPLIT
    tokens or more). Rows keep their order within a group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        if not groups or (2 * lengths[i] < longest and longest - lengths[i] >= MIN_PADDING_SPLIT):
            groups.append([])
            longest = lengths[i]
        groups[-1].append(i)
    return [sorted(g) for g in groups]


def padded_tokens(lengths: list[int]) -> int:
    """Positions a prefill of rows of these lengths computes, padding included."""
    return sum(len(g) * max(lengths[i] for i in g) for g in length_groups(lengths))


class QueueFull(Exception):
    """More requests wait for admission than the scheduler accepts."""


class Closed(Exception):
    """The scheduler takes no more sequences: its engine has stopped."""


class Scheduler:
    """Admits waiting sequences into the running batch and retires finished ones.

    `submit` and `cancel` may be called from any thread; everything else runs on
    the engine's thread.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_waiting: int,
        max_prefill_tokens: int = 2048,
        prefix_caching: bool = False,
        max_slots_per_request: int | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size  # KV slots, so sequences in the running batch
        # Slots one request's sequences may hold at once; None: all of them.
        self.max_slots_per_request = max_slots_per_request or max_batch_size
        self.max_waiting = max_waiting  # queued sequences beyond which submit refuses
        # Positions one prefill step may compute, padding included (`padded_tokens`);
        # a larger prefill would stall every running stream for that long.
        self.max_prefill_tokens = max_prefill_tokens
        self.running: list[Sequence] = []  # in admission order; each holds its own slot
        self._free_slots = list(range(max_batch_size))  # a min-heap
        self.prefix_cache = PrefixCache() if prefix_caching else None
        self._waiting: deque[Sequence] = deque()
        self._closed: str | None = None  # why submissions are refused, once they are
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self, seqs: list[Sequence], beyond_limit: bool = False, one_request: bool = True
    ) -> None:
        """Queues sequences for admission, all or none, as one request (a group) unless
        `one_request` is False (each its own). `beyond_limit` (the engine's own warm-up)
        ignores the waiting limit."""
        with self._lock:
            if self._closed is not None:
                raise Closed(self._closed)
            # A finished sequence leaves `running` at the next retire; its slot is free.
            busy = sum(not seq.status.finished for seq in self.running)
            room = self.max_waiting + self.max_batch_size - busy
            if not beyond_limit and len(self._waiting) + len(seqs) > room:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting (limit {self.max_waiting})"
                )
            group = next(_groups)
            for seq in seqs:
                seq.group = group if one_request else next(_groups)
            self._waiting.extend(seqs)
            self._work.notify()

    def cancel(self, seq: Sequence) -> None:
        with self._lock:
            seq.cancel_requested = True
            self._work.notify()

    def wake(self) -> None:
        """Ends a `wait_for_work` early (the engine is stopping)."""
        with self._lock:
            self._work.notify()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Blocks the engine thread until something is running or waiting."""
        with self._lock:
            if not self.has_work:
                self._work.wait(timeout)
            return self.has_work

    @property
    def has_work(self) -> bool:
        return bool(self.running or self._waiting)

    def admit(self) -> tuple[list[Sequence], list[Sequence]]:
        """Moves waiting sequences into free slots, a fair share per request (`_next`).

        Admits while slots are free and the prefill stays within
        `max_prefill_tokens` positions to compute, padding included (`padded_tokens`:
        the runner prefills rows of very different lengths apart; always at least one
        sequence,
        however long its prompt), of which prompts that are scored (their every
        position's logits, each (V,) wide: the lm_head and a log-softmax per position)
        may take half. With prefix caching, a prompt that shares at least
        DEFER_SHARED_TOKENS more with a prompt admitted in this step (one whose prefix
        it could use) than the cache holds waits for the next step, ahead of the
        queue, and then takes that prefix from the cache (lm-eval sends a question's
        choices together); the sequences behind it go on being admitted.
        Returns the admitted ones (they need a prefill) and the ones cancelled
        while they waited (finished without running).
        """
        admitted: list[Sequence] = []
        with self._lock:
            dropped = [seq for seq in self._waiting if seq.cancel_requested]
            if dropped:
                self._waiting = deque(s for s in self._waiting if not s.cancel_requested)
            held = Counter(seq.group for seq in self.running)
            lengths: list[int] = []  # tokens each admitted sequence computes
            scored = 0
            deferred: list[Sequence] = []
            while self._free_slots:
                index = self._next(held)
                if index is None:
                    break
                seq = self._waiting[index]
                cache = self.prefix_cache
                match = None if cache is None else cache.best(seq, self.running)
                cached = match.length if match is not None else 0
                # Past max_batch_size deferred in one step, the rest are admitted as they
                # come: the scan stays short and admission goes on.
                if admitted and cache is not None and len(deferred) < self.max_batch_size:
                    sources = [a for a in admitted if cache.could_serve(a, seq)]
                    shared = max(
                        (common_prefix(seq.prompt_ids, a.prompt_ids) for a in sources), default=0
                    )
                    if shared - cached >= DEFER_SHARED_TOKENS:
                        del self._waiting[index]
                        deferred.append(seq)
                        continue
                new_tokens = len(seq.prompt_ids) - cached
                lengths.append(new_tokens)
                if seq.params.scores_prompt:
                    scored += new_tokens
                over = padded_tokens(lengths) > self.max_prefill_tokens
                if admitted and (over or 2 * scored > self.max_prefill_tokens):
                    break
                del self._waiting[index]
                held[seq.group] += 1
                seq.status = Status.RUNNING
                self._place(seq, match)
                self.running.append(seq)
                admitted.append(seq)
            self._waiting.extendleft(reversed(deferred))  # first next step, in their order
        for seq in dropped:
            seq.finish(Status.CANCELLED)
        return admitted, dropped

    def _place(self, seq: Sequence, match: Match | None) -> None:
        """Gives `seq` a free slot: the lowest, or with prefix caching the one
        `PrefixCache.place` chooses for `match` (its prompt's longest cached prefix)."""
        if self.prefix_cache is None:
            seq.slot = heapq.heappop(self._free_slots)
            return
        seq.slot, seq.copy_from = self.prefix_cache.place(match, self._free_slots)
        self._free_slots.remove(seq.slot)
        heapq.heapify(self._free_slots)
        if match is not None:
            seq.cached_tokens, seq.prefix_logprobs = match.length, match.scored

    def _next(self, held: Counter[int]) -> int | None:
        """Index in the waiting queue of the sequence to admit next: the first one of the
        group holding the fewest slots, among groups under `max_slots_per_request`."""
        best: int | None = None
        best_held = self.max_slots_per_request
        seen: set[int] = set()
        for index, seq in enumerate(self._waiting):
            if seq.group in seen:
                continue
            seen.add(seq.group)
            if held[seq.group] < best_held:
                best, best_held = index, held[seq.group]
                if best_held == 0:
                    break
        return best

    def retire(self) -> list[Sequence]:
        """Removes finished (and cancelled) sequences from the batch, freeing their slots."""
        for seq in self.running:
            if seq.cancel_requested and not seq.status.finished:
                seq.finish(Status.CANCELLED)
        done = [seq for seq in self.running if seq.status.finished]
        if done:
            self.running = [seq for seq in self.running if not seq.status.finished]
            for seq in done:
                if self.prefix_cache is not None:
                    self.prefix_cache.keep(seq, failed=seq.status is Status.FAILED)
                heapq.heappush(self._free_slots, seq.slot)
                seq.slot = -1
        return done

    def fail_running(self, error: str) -> list[Sequence]:
        """Fails every running sequence and frees every slot: the empty, consistent state
        a failed step returns to. Returns the failed sequences."""
        failed = self.running
        for seq in failed:
            seq.finish(Status.FAILED, error=error)
            seq.slot = -1
        self.running = []
        self._free_slots = list(range(self.max_batch_size))
        if self.prefix_cache is not None:
            self.prefix_cache.forget()  # the engine clears every slot
        return failed

    def close(self, error: str) -> list[Sequence]:
        """Refuses all further submissions and fails every running and waiting sequence
        (the engine is going away). Returns the failed sequences."""
        with self._lock:
            self._closed = error
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            seq.finish(Status.FAILED, error=error)
        return self.fail_running(error) + waiting
