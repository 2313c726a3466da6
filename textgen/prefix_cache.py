"""Automatic prefix caching over the slot-per-sequence KV cache, with no model in it.

A slot keeps the keys and values its last occupant wrote after that sequence leaves,
until a new occupant overwrites them. A new sequence whose prompt starts with tokens
a slot holds skips computing them: it takes that free slot as it is, or a free slot
into which the prefix is copied first, from a running sequence's slot (which it can't
take) or from a free slot whose record is worth more than the prefix (llama.cpp's
server: `cache_prompt` and slot copies). Slots stay contiguous, so the one-row decode
kernels read them as before.

NOTE (invariants):
- A record says which tokens' keys and values a free slot holds, at positions
  0..len(tokens)-1, all finite and written by one complete prefill or decode step.
  A slot whose occupant failed (a failed step, non-finite logits) has no record: its
  cache may be half-written or NaN.
- A running sequence is a source for its positions below `num_computed` (what is
  written there never changes while it runs), and one admitted in this step for those below its
  `cached_tokens` (copies run in admission order, before any prefill writes).
- At least the last prompt token is always computed: its logits choose the first new
  token. A sequence that scores its prompt reuses only positions whose prompt
  logprobs the source kept, with at least as many alternatives as it asks for.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from textgen.scheduler import PromptLogprob, Sequence


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (slice comparisons in C,
    a binary search over the length)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Record:
    """What a free slot holds: keys and values of `tokens` at positions 0.., and the
    prompt logprobs its occupant computed (entry j for prompt position j, top `k`)."""

    tokens: list[int]
    scored: list[PromptLogprob] | None = None
    k: int = 0
    used: int = 0  # a logical clock: the least recently used record is evicted first


@dataclass
class Match:
    """Where a new sequence's cached prefix is: `length` positions of slot `slot`, a
    free slot's record (`free`) or a running sequence's slot."""

    slot: int
    length: int
    free: bool
    scored: list[PromptLogprob] | None = None  # entries 0..length, when it scores


@dataclass
class PrefixCache:
    """Records of free slots, and the choice of a slot for each new sequence."""

    records: dict[int, Record] = field(default_factory=dict)  # free slot -> what it holds
    _clock: itertools.count = field(default_factory=itertools.count)

    def keep(self, seq: Sequence, failed: bool) -> None:
        """`seq` left its slot: remember what the slot holds (nothing if it failed)."""
        self.records.pop(seq.slot, None)
        if failed or seq.num_computed == 0:
            return
        k = seq.params.prompt_logprobs or 0
        scored = seq.prompt_logprobs if seq.params.scores_prompt else None
        tokens = (seq.prompt_ids + seq.output_ids)[: seq.num_computed]
        self.records[seq.slot] = Record(tokens, scored, k, next(self._clock))

    def forget(self) -> None:
        """Every slot was cleared (a failed step): nothing is held."""
        self.records.clear()

    @staticmethod
    def could_serve(source: Sequence, seq: Sequence) -> bool:
        """Whether `source`'s prefix may be `seq`'s: a scoring sequence needs the source's
        prompt logprobs, with at least as many alternatives."""
        if not seq.params.scores_prompt:
            return True
        return source.params.scores_prompt and (source.params.prompt_logprobs or 0) >= (
            seq.params.prompt_logprobs or 0
        )

    def best(self, seq: Sequence, running: list[Sequence]) -> Match | None:
        """The longest reusable prefix of `seq`'s prompt: in free slots' records, running
        sequences' slots (positions below num_computed), and the slots of sequences
        admitted in this step (positions below their cached_tokens, which are there
        before any prefill writes, copies running in admission order). A free slot wins
        a tie."""
        prompt, params = seq.prompt_ids, seq.params
        k = params.prompt_logprobs or 0
        best: Match | None = None

        def consider(
            slot: int,
            held: list[int],
            source_prompt: list[int],
            free: bool,
            scored: list[PromptLogprob] | None,
            has_k: int,
        ) -> None:
            """`held`: the tokens whose keys and values the slot holds; `scored`: the
            source's prompt logprob entries, for prompt `source_prompt`."""
            nonlocal best
            length = min(common_prefix(prompt, held), len(prompt) - 1)
            if params.scores_prompt:
                # Entries 1..length come from the source; the prefill starts at `length`,
                # whose logits give entry length + 1. The source's entry j needs tokens
                # 0..j equal, so length <= common - 1.
                if scored is None or has_k < k:
                    return
                shared = common_prefix(prompt, source_prompt)
                length = min(length, shared - 1, len(scored) - 1)
            if length > 0 and (best is None or length > best.length):
                kept = None
                if params.scores_prompt:
                    kept = [e if e is None else (e[0], e[1][:k]) for e in scored[: length + 1]]
                best = Match(slot, length, free, kept)

        for slot, record in self.records.items():
            consider(slot, record.tokens, record.tokens, True, record.scored, record.k)
        for other in running:
            if other.status.finished:
                continue
            other_k = other.params.prompt_logprobs or 0
            if other.num_computed:
                held = (other.prompt_ids + other.output_ids)[: other.num_computed]
                scored = other.prompt_logprobs if other.params.scores_prompt else None
                consider(other.slot, held, held, False, scored, other_k)
            elif other.cached_tokens:  # admitted in this step
                held = other.prompt_ids[: other.cached_tokens]
                consider(other.slot, held, other.prompt_ids, False, other.prefix_logprobs, other_k)
        return best

    def place(self, match: Match | None, free: list[int]) -> tuple[int, int | None]:
        """A slot among `free` for a new sequence whose prefix is `match`, and the slot to
        copy that prefix from (None: it is there already, or there is none). A free slot
        holding the prefix is taken as it is when nothing more of its record would be
        lost, or when it is the one to evict anyway; else the prefix is copied out of
        it, and its record stays."""
        victim = self.evictable(free)
        if match is None:
            slot, source = victim, None
        elif not match.free:
            slot, source = victim, match.slot
        else:
            record = self.records[match.slot]
            record.used = next(self._clock)
            whole = match.length >= len(record.tokens)
            slot, source = (
                (match.slot, None) if whole or match.slot == victim else (victim, match.slot)
            )
        self.records.pop(slot, None)  # the new occupant overwrites it from its prefix on
        return slot, source

    def evictable(self, free: list[int]) -> int:
        """The free slot to overwrite: one that holds nothing, the lowest such (running
        sequences stay packed near slot 0); else the least recently used."""
        empty = [s for s in free if s not in self.records]
        if empty:
            return min(empty)
        return min(free, key=lambda s: self.records[s].used)
