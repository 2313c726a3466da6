"""From token ids to what a client sees: text, stop strings, events. Off the engine thread.

The engine thread does only what must be serial (schedule, run the model, choose
tokens). After each step it hands every changed sequence's new token ids and its
finish, if any, to the event loop of the request that owns it: one call per loop per
step (`Engine._deliver`). There, `process_step` runs each sequence's `SequenceOutput`,
which detokenizes, matches stop strings and puts TokenEvents and one FinishEvent on its
request's queue, as vLLM v1's OutputProcessor does beside its EngineCore.

NOTE (stop strings): the engine never sees text, so a stop string is found here, when
the event loop runs the step's deltas: the step after its last token was chosen, or as
many steps later as the loop lags behind the engine (as vLLM's front end finds them and
aborts the request in its engine core). `SequenceOutput` then finishes the sequence
itself (FinishEvent `stop`, text cut at the match) and cancels it in the scheduler; until
the engine's next step retires it, its slot stays held, and the tokens made after the
match (counted in `textgen_generated_tokens`) and the engine's own finish (`cancelled`)
are dropped. Every other finish (EOS, stop token, length, constraint complete,
cancelled, failed) is the engine's, and applies after the last token handed over with it.
"""

from __future__ import annotations

import codecs
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from textgen.metrics import Metrics, observe_many
from textgen.params import SamplingParams
from textgen.scheduler import (
    Event,
    FinishEvent,
    PromptLogprob,
    Sequence,
    Status,
    TokenEvent,
    TopLogprobs,
)
from textgen.text import Detokenizer, StopMatcher

logger = logging.getLogger("bentoml.textgen")

# What one step hands over for one sequence, built on the engine thread:
# (its output, new token ids, their (logprob, top logprobs) or None, the engine's finish
# status or None, the error of a failed one, its prompt tokens from the prefix cache, its
# prompt logprobs in its first delta when it scores its prompt, else None).
Delta = tuple[
    "SequenceOutput",
    list[int],
    list[tuple[float, TopLogprobs]] | None,
    Status | None,
    str | None,
    int,
    list[PromptLogprob] | None,
]
# The engine's finishes that a token caused; the others (cancelled, failed) come after
# the sequence's last token.
_BY_TOKEN = (Status.FINISHED_EOS, Status.FINISHED_STOP, Status.FINISHED_LENGTH)


class EventQueue(Protocol):
    """Where a request's events go, as (request id, event), in order: an asyncio.Queue,
    or the engine's HeldEvents for a response sent whole."""

    def put_nowait(self, item: tuple[int, Event]) -> None: ...


class ByteLevelDetokenizer:
    """Incremental text of a byte-level BPE (GPT-2): each token is a run of bytes, the
    text is their UTF-8 decoding with replacement, held back while a character is
    partial. `pieces[id]` is the bytes token `id` adds (b"" for special tokens, which
    `skip_special_tokens` drops); `texts[id]` is their text where they are whole UTF-8
    characters, else None (`whole_texts`). Equal to
    `tokenizer.decode(ids, skip_special_tokens=True)` for tokenizers that clean up no
    spaces (tests/test_output.py holds it).

    Invariant: `_partial` is True exactly when the UTF-8 decoder holds bytes of an
    unfinished character. While it holds none, a token whose bytes are whole characters
    adds exactly their text and leaves it holding none, so that text is looked up, not
    decoded (most tokens of most text)."""

    def __init__(self, pieces: list[bytes], texts: list[str | None]) -> None:
        self._pieces = pieces
        self._texts = texts
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = False

    def add(self, token_id: int) -> str:
        if not self._partial:
            text = self._texts[token_id]
            if text is not None:
                return text
        text = self._utf8.decode(self._pieces[token_id])
        self._partial = bool(self._utf8.getstate()[0])
        return text

    def flush(self) -> str:
        self._partial = False
        return self._utf8.decode(b"", final=True)


def whole_texts(pieces: list[bytes]) -> list[str | None]:
    """Each piece's text where its bytes are whole UTF-8 characters, else None."""
    texts: list[str | None] = []
    for piece in pieces:
        try:
            texts.append(piece.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    return texts


def detokenizer_factory(tokenizer: Any, visible: list[bytes]) -> Callable[[], Any]:
    """A maker of per-sequence detokenizers: table lookups for a byte-level BPE tokenizer
    that cleans up no spaces (GPT-2's), else the tokenizer's own decode (slower)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = type(decoder).__name__ == "ByteLevel"
    if byte_level and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        texts = whole_texts(visible)
        return lambda: ByteLevelDetokenizer(visible, texts)
    return lambda: Detokenizer(tokenizer)


class SequenceOutput:
    """One sequence's text as it is made, on its request's event loop (never the
    engine thread): its events go to `queue` as (request id, event)."""

    def __init__(
        self,
        seq: Sequence,
        queue: EventQueue,
        detokenizer: Any,
        label: str,
        metrics: Metrics,
        cancel: Callable[[Sequence], None],
    ) -> None:
        self.seq = seq  # its engine side: read here only for what never changes
        self.queue = queue
        self.label = label  # the requests metric's `route` label
        self.params: SamplingParams = seq.params
        self.prompt_tokens = len(seq.prompt_ids)
        self.pieces: list[str] = []  # the text shown so far, a piece per token (joined once)
        self.tokens = 0  # output tokens taken, the one that ended it included
        self.finished = False
        self.last_token_time: float | None = None
        self._metrics = metrics
        self._cancel = cancel
        self._detokenizer = detokenizer
        self._stop = StopMatcher(self.params.stop, keep=self.params.include_stop_str_in_output)

    def take(
        self,
        token_ids: list[int],
        logprobs: list[tuple[float, TopLogprobs]] | None,
        status: Status | None,
        error: str | None,
        cached_tokens: int,
        now: float,
        prompt_logprobs: list[PromptLogprob] | None = None,
        gaps: Counter[float] | None = None,
    ) -> None:
        """One step's new tokens and the engine's finish, if any (see the module's NOTE).
        `prompt_logprobs` (in the first step's only) goes with the first event. The time
        since this sequence's previous token is counted in `gaps` (observed by the caller,
        once per distinct value), else observed here."""
        if self.finished:
            return
        put, request_id = self.queue.put_nowait, self.seq.request_id
        last = len(token_ids) - 1
        for k, token_id in enumerate(token_ids):
            by_token = status if k == last and status in _BY_TOKEN else None
            piece, ended = self._piece(token_id, by_token)
            self.tokens += 1
            self.pieces.append(piece)
            logprob, top = logprobs[k] if logprobs is not None else (None, ())
            put((request_id, TokenEvent(token_id, piece, logprob, top, prompt_logprobs)))
            prompt_logprobs = None
            self._observe(now, gaps)
            if ended is not None:
                if status is None:  # a stop string: the engine goes on until told
                    self._cancel(self.seq)
                self._finish(ended, None, cached_tokens)
                return
        if status is not None:  # the engine's (FAILED: set before this delta was handed over)
            param = self.seq.error_param if status is Status.FAILED else None
            self._finish(status, error, cached_tokens, prompt_logprobs, param)

    def fail(self, error: str, cached_tokens: int) -> None:
        """Ends it as failed from the output side; the engine's sequence is cancelled."""
        if not self.finished:
            self._cancel(self.seq)
            self._finish(Status.FAILED, error, cached_tokens)

    def _piece(self, token_id: int, status: Status | None) -> tuple[str, Status | None]:
        """The text `token_id` makes safe to show, and the finish it makes, given the
        engine's (`status`: EOS, stop token, length, constraint complete, or None)."""
        params = self.params
        if status is Status.FINISHED_EOS:
            return self._drain(), status
        if status is Status.FINISHED_STOP and token_id in params.stop_token_ids:
            # A stop token's text only when asked (vLLM's rule).
            keep = params.include_stop_str_in_output
            piece = self._stop.push(self._detokenizer.add(token_id)) if keep else ""
            return piece + self._drain(), status
        piece = self._stop.push(self._detokenizer.add(token_id))
        if self._stop.matched is not None:
            return piece, Status.FINISHED_STOP
        if status is Status.FINISHED_LENGTH:  # a stop string in the held tail still ends it
            piece += self._drain()
            return piece, Status.FINISHED_STOP if self._stop.matched else status
        if status is Status.FINISHED_STOP:  # the constraint is complete
            return piece + self._drain(), status
        return piece, None

    def _drain(self) -> str:
        """Text still held by the detokenizer and the stop matcher, at the end."""
        piece = self._stop.push(self._detokenizer.flush())
        return piece if self._stop.matched else piece + self._stop.flush()

    def _observe(self, now: float, gaps: Counter[float] | None) -> None:
        if self.last_token_time is None:
            try:  # a metrics failure must not cost a client its events
                self._metrics.time_to_first_token.observe(now - self.seq.arrival_time)
            except Exception:
                logger.exception("observing a time to first token failed")
        elif gaps is not None:
            gaps[now - self.last_token_time] += 1
        else:
            self._metrics.inter_token_latency.observe(now - self.last_token_time)
        self.last_token_time = now

    def _finish(
        self,
        status: Status,
        error: str | None,
        cached_tokens: int,
        prompt_logprobs: list[PromptLogprob] | None = None,
        param: str | None = None,
    ) -> None:
        self.finished = True
        text = "".join(self.pieces)
        event = FinishEvent(status, text, self.prompt_tokens, self.tokens, error)
        event = replace(
            event, cached_tokens=cached_tokens, prompt_logprobs=prompt_logprobs, param=param
        )
        self.queue.put_nowait((self.seq.request_id, event))
        try:  # a metrics failure must not cost a client its events
            self._metrics.requests.labels(self.label, status.finish_reason).inc()
        except Exception:
            logger.exception("counting a finished request failed")


def process_step(deltas: list[Delta], now: float, metrics: Metrics) -> None:
    """On an event loop: one engine step's deltas for the sequences it owns. The sequences
    that made a token in the same earlier step share their inter-token latency: it is
    observed once per distinct value, with its count."""
    gaps: Counter[float] = Counter()
    for output, token_ids, logprobs, status, error, cached_tokens, scored in deltas:
        try:
            output.take(token_ids, logprobs, status, error, cached_tokens, now, scored, gaps)
        except Exception as exc:  # one sequence's text must not cost the others theirs
            logger.exception("processing a sequence's output failed")
            output.fail(f"generation failed: {exc}", cached_tokens)
    try:  # a metrics failure must not cost a client its events (they are queued)
        for gap, count in gaps.items():
            observe_many(metrics.inter_token_latency, gap, count)
    except Exception:
        logger.exception("observing inter-token latencies failed")
