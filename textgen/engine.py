"""The generation engine: one scheduler, one runner, one sampler, one background thread.

Request handlers (asyncio, in BentoML's worker) submit sequences and read their
events; the engine thread loops `step()`: retire finished sequences, admit
waiting ones (prefilled together), decode one token for every running
sequence, then hand the step's events to the event loops.

NOTE (failure): a step either completes for every sequence or fails those it
must. A row whose logits are not finite fails alone; a prefill that fails in a
step that also decoded fails only the new sequences; any other exception fails
every running sequence with a delivered error event, frees every slot, clears
the cache and goes on from that empty batch. After MAX_CONSECUTIVE_FAILURES
with no progress between them, or if the thread itself ends, the engine is
dead: everything it holds fails, new requests are refused (EngineUnavailable)
and `health()` says why. With dynamic int8 (the CPU default) batched rows are not
isolated from non-finite activations: the rows of a batched step share one
activation scale per projection, so fbgemm either raises (the step fails, as any
other exception) or quantizes a NaN row's numbers into its neighbours' scale. (A
lone row decoded by textgen/csrc's kernels gets NaN logits and fails alone.)
Only a model whose weights hold non-finite numbers produces them; serve such a
model in float32 or bfloat16.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textgen import metrics
from textgen.config import GRAMMAR_THREADS_BESIDE_ACCELERATOR, Settings
from textgen.devices import keep_large_blocks, resolve_device, resolve_dtype, resolve_int8
from textgen.errors import EngineOverloaded, EngineUnavailable
from textgen.output import Delta, SequenceOutput, detokenizer_factory, process_step
from textgen.params import Constraint, SamplingParams
from textgen.runner import GPT2Runner
from textgen.sampling import INVALID, Sampler, prompt_logprobs
from textgen.scheduler import (
    Closed,
    Event,
    FinishEvent,
    QueueFull,
    Scheduler,
    Sequence,
    Status,
)
from textgen.structured import (
    CompilerBusy,
    Grammar,
    GrammarCompiler,
    MaskBuilder,
    grammar_failed,
)
from textgen.text import TokenTable

# A child of BentoML's logger, so `bentoml serve` shows these lines in its own format.
logger = logging.getLogger("bentoml.textgen")


MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row after which the engine is dead
# The warm-up's long sequence: past 128 positions, where attention kernels and the
# first release's cache changed shape.
WARM_UP_POSITIONS = 160
NON_FINITE_LOGITS = (
    "generation failed: no token could be chosen (the model's logits for this sequence are "
    "not finite, or only a suppressed EOS is)"
)


class ContextOverflow(ValueError):
    """A sequence would not fit the context: prompt tokens + new tokens > the limit."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, limit: int) -> None:
        super().__init__(
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the context "
            f"of {limit} tokens"
        )
        self.prompt_tokens, self.max_new_tokens, self.limit = prompt_tokens, max_new_tokens, limit


class EngineDead(Exception):
    """Raised on the engine thread to end it after repeated step failures."""


@dataclass(frozen=True)
class ModelInfo:
    name: str  # model store name, the id clients use
    tag: str  # full store tag, name:version
    source: str  # hub:<id>@<rev> | dir:<path> | random
    random_weights: bool  # True: seeded random weights, the text is meaningless
    n_ctx: int  # context length in tokens


@dataclass
class _Sink:
    """Where a sequence's step deltas go: its output side, on its request's event loop."""

    loop: asyncio.AbstractEventLoop
    output: SequenceOutput


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """text -> token ids, as `tokenizer(text).input_ids`. For a fast tokenizer, through its
    Rust tokenizer's `encode`: Hugging Face's call goes through `encode_batch`, which
    releases the GIL, and the event loop that tokenizes a request's prompt then waits to
    take it back from the engine thread, up to a whole switch interval per prompt.

    Hugging Face's call first resets the Rust tokenizer's truncation, padding and
    special-token splitting to the call's (none, none, `split_special_tokens`); a call
    finds them so (nothing here sets them) or goes through Hugging Face's call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text: tokenizer(text).input_ids

    def encode(text: str) -> list[int]:
        if (
            backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == getattr(tokenizer, "split_special_tokens", False)
        ):
            return backend.encode(text).ids
        return tokenizer(text).input_ids

    return encode


class Engine:
    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, settings: Settings) -> None:
        self.settings = settings
        self.info = info
        self.tokenizer = tokenizer
        self.tokens = TokenTable(tokenizer, model.config.vocab_size)
        self._detokenizer = detokenizer_factory(tokenizer, self.tokens.visible)
        # Lengths are checked against the context by the engine: no tokenizer warning.
        tokenizer.model_max_length = int(1e30)
        self._encode = _encoder(tokenizer)
        self.eos_token_id: int | None = model.config.eos_token_id
        self.vocab_size: int = model.config.vocab_size
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        self.scheduler = Scheduler(
            settings.max_batch_size,
            settings.max_waiting,
            settings.max_prefill_tokens,
            prefix_caching=settings.prefix_caching,
            max_slots_per_request=settings.max_slots_per_request,
        )
        self.metrics = metrics.get()
        # Positions per sequence: the model's context, or less when the settings say.
        self.max_model_len = min(settings.max_model_len or info.n_ctx, info.n_ctx)
        self._sinks: dict[int, _Sink] = {}  # request_id -> where its events go
        # Structured output: constraints compile on the compiler's threads, never this
        # engine's; the engine thread fills the masks (`masks`, built with the runner).
        self.grammars = GrammarCompiler(
            tokenizer,
            self.vocab_size,
            cache_size=settings.grammar_cache_size,
            timeout_s=settings.grammar_compile_seconds,
            max_waiting=settings.max_grammar_compiles_waiting,
        )
        self._stopping = threading.Event()
        self._dead: str | None = None  # why the engine stopped, once it has
        self._heartbeat = time.monotonic()  # the engine loop's latest turn
        # NOTE: the runner is built on the engine thread, the one thread that drives it:
        # on the CPU a runner built on another thread decodes markedly slower
        # (bench/engine_bench.py shows it), in its elementwise ops; the cause
        # (thread-owned allocations or the OpenMP team) is not pinned down.
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(model, device, dtype), name="textgen-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        logger.info(
            "engine ready: model=%s source=%s device=%s dtype=%s quantize=%s max_batch_size=%d "
            "max_model_len=%d kv_cache=%.2fGiB prefix_caching=%s%s",
            info.tag,
            info.source,
            device,
            self.runner.dtype,
            "int8" if self.runner.dense_kind == "int8" else "none",
            settings.max_batch_size,
            self.max_model_len,
            self.runner.kv_cache_bytes / 2**30,
            settings.prefix_caching,
            " RANDOM WEIGHTS: generated text is meaningless" if info.random_weights else "",
        )

    @classmethod
    def from_directory(cls, path: str | Path, info: ModelInfo, settings: Settings) -> Engine:
        """Loads a Hugging Face model directory (`model/` and `tokenizer/` inside it)."""
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        model = AutoModelForCausalLM.from_pretrained(path / "model", dtype=torch.float32)
        return cls(model, tokenizer, info, settings)

    # -- requests ---------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """`tokenizer(text).input_ids`; on the fast path, holding the GIL throughout
        (`_encoder`)."""
        return self._encode(text)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raises ContextOverflow unless the prompt and its new tokens fit one KV slot."""
        if prompt_tokens + max_new_tokens > self.max_model_len:
            raise ContextOverflow(prompt_tokens, max_new_tokens, self.max_model_len)

    async def grammar(self, constraint: Constraint | None) -> Grammar | None:
        """The compiled constraint (None for free text), compiled off the engine thread.
        Raises GrammarError (a ParamError) when it is invalid or not compiled in time, and
        EngineOverloaded when it is new and too many compiles wait already."""
        if constraint is None:
            return None
        try:
            return await self.grammars.compile(constraint)
        except CompilerBusy as exc:
            raise EngineOverloaded(str(exc)) from None

    def new_sequence(
        self, prompt_ids: list[int], params: SamplingParams, grammar: Grammar | None = None
    ) -> Sequence:
        """One request's sequence; sampling without a seed gets a random one (`seq.params.seed`
        reports it back to the client). A constrained request passes its compiled constraint
        (`grammar`).

        NOTE (what callers guarantee; textgen/validation.py checks a request for it, naming
        its wire fields): the prompt is not empty; every token id the engine indexes a
        tensor with (the prompt's, `logit_bias`'s, `stop_token_ids`') is in the vocabulary,
        and no more alternatives (`logprobs`, `prompt_logprobs`) are asked for than it
        holds, since a bad index on the engine thread fails the step of every sequence in
        it; a constrained sequence brings its compiled constraint. A broken guarantee
        raises ValueError, a caller's bug. A sequence that would not fit one KV slot
        raises ContextOverflow."""
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if (grammar.constraint if grammar else None) != params.constraint:
            raise ValueError("a constrained sequence needs its compiled constraint")
        self._check_indexes(prompt_ids, params)
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        rng = None
        if params.do_sample:
            if params.seed is None:
                params = replace(params, seed=random.randrange(2**31))
            rng = random.Random(params.seed)
        seq = Sequence(prompt_ids, params, rng)
        if grammar is not None:
            seq.grammar = grammar.matcher()
        return seq

    def unknown_token(self, ids: list[int]) -> int | None:
        """The index of the first id outside the vocabulary (0..vocab_size - 1), or None."""
        if not ids or (min(ids) >= 0 and max(ids) < self.vocab_size):
            return None
        return next(i for i, token_id in enumerate(ids) if not 0 <= token_id < self.vocab_size)

    def unknown_token_in(
        self, params: SamplingParams, prompt_ids: list[int] | None = None
    ) -> tuple[str, int] | None:
        """(field, token id) of the first id outside the vocabulary among `prompt_ids`
        (when given), `logit_bias` and `stop_token_ids`, or None."""
        named = {
            "prompt_ids": prompt_ids or [],
            "logit_bias": [token_id for token_id, _ in params.logit_bias],
            "stop_token_ids": list(params.stop_token_ids),
        }
        for name, ids in named.items():
            i = self.unknown_token(ids)
            if i is not None:
                return name, ids[i]
        return None

    def not_in_vocabulary(self, token_id: int) -> str:
        return f"token id {token_id} is not in the vocabulary (0..{self.vocab_size - 1})"

    def _check_indexes(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError unless what indexes the engine's tensors fits them (see
        `new_sequence`)."""
        unknown = self.unknown_token_in(params, prompt_ids)
        if unknown is not None:
            raise ValueError(f"{unknown[0]}: {self.not_in_vocabulary(unknown[1])}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.vocab_size:
                raise ValueError(f"{name} {k} exceeds the vocabulary of {self.vocab_size} tokens")

    def stream(
        self, seqs: list[Sequence], label: str = "engine", final_only: bool = False
    ) -> EventStream:
        """Submits sequences together, now.

        Raises EngineOverloaded when the queue is full, EngineUnavailable when the
        engine is dead or wedged. `label` labels the requests metric, counted by
        the engine when each sequence finishes. `final_only` (a response sent whole):
        the events are the same, but its reader wakes once, when every sequence has
        finished or one has failed, not at each token (vLLM's FINAL_ONLY outputs).
        """
        reason = self.health()
        if reason is not None:
            raise EngineUnavailable(reason)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] | HeldEvents
        queue = HeldEvents(len(seqs)) if final_only else asyncio.Queue()
        for seq in seqs:
            output = SequenceOutput(
                seq, queue, self._detokenizer(), label, self.metrics, self.scheduler.cancel
            )
            self._sinks[seq.request_id] = _Sink(loop, output)
        try:
            self.scheduler.submit(seqs)
        except (QueueFull, Closed) as exc:
            for seq in seqs:  # (a dying engine may have dropped them already)
                self._sinks.pop(seq.request_id, None)
            if isinstance(exc, Closed):
                raise EngineUnavailable(str(exc)) from None
            raise EngineOverloaded(str(exc)) from None
        return EventStream(self.scheduler, seqs, queue)

    def warm_up(self) -> None:
        """Generations through every path before the service says ready: two sequences
        decoding together, one past 128 positions and one constrained (structured output),
        a hole in the slots, then a reused slot (after a cached prefix, with prefix caching).
        Raises if any of them did not finish normally.

        Then, after a collection, every object alive leaves the collector's generations
        (`gc.freeze`): in a served process nearly all of them live as long as it does (torch,
        transformers, the server's modules, the model's Python objects), and a full
        collection, which holds the GIL, no longer walks them while requests wait. A frozen
        object that later becomes cyclic garbage is not collected (`gc.unfreeze` returns them
        all to the collector)."""
        started = time.perf_counter()
        # Its own references to its sequences, grammar and outputs die with its frame (the
        # scheduler may hold finished ones until its next step retires them).
        self._warm_up_generations()
        gc.collect()
        gc.freeze()
        logger.info("warm-up took %.2fs", time.perf_counter() - started)

    def _warm_up_generations(self) -> None:
        prompt = self.tokenize("Warm up")
        long_tokens = min(WARM_UP_POSITIONS, self.max_model_len) - len(prompt)
        short = SamplingParams(max_new_tokens=4, min_new_tokens=4)
        long = SamplingParams(max_new_tokens=long_tokens, min_new_tokens=long_tokens)
        # 4 tokens can't make 200 letters: it ends by length, as the others do.
        letters = replace(
            short, min_new_tokens=0, constraint=Constraint.text("regex", "[a-z]{200}", "warm-up")
        )
        self.grammars.tokenizer  # noqa: B018 (builds llguidance's vocabulary, once, before ready)
        grammar = self.grammars.submit(letters.constraint).result()  # no request's limit
        first = [
            self.new_sequence(prompt, short),
            self.new_sequence(prompt, long),
            self.new_sequence(prompt, letters, grammar),
        ]
        # Three requests, admitted together whatever max_slots_per_request is.
        self.scheduler.submit(first, beyond_limit=True, one_request=False)
        self._wait_finished(first[:1])
        # Takes the first one's slot: with prefix caching, as the slot holding all of its
        # prompt's prefix (the first's prompt and output), so that one token is prefilled
        # after a cached prefix.
        reused = [self.new_sequence(prompt + first[0].output_ids, short)]
        self.scheduler.submit(reused, beyond_limit=True)
        self._wait_finished(first + reused)
        for seq in first + reused:
            if seq.status is not Status.FINISHED_LENGTH:
                detail = f": {seq.error}" if seq.error else ""
                raise RuntimeError(f"warm-up generation ended {seq.status.finish_reason}{detail}")

    def _wait_finished(self, seqs: list[Sequence]) -> None:
        while not all(seq.status.finished for seq in seqs):
            if self.health() is not None:
                raise RuntimeError(f"the engine failed during warm-up: {self.health()}")
            time.sleep(0.01)

    def health(self) -> str | None:
        """None when the engine is healthy; otherwise why it is not.

        Unhealthy: stopped (dead after failures, or shut down), its thread gone, or
        no step finished for `engine_stall_seconds` while work waits (wedged).
        """
        if self._dead is not None:
            return self._dead
        if not self._thread.is_alive():
            return "the engine thread is not running"
        stalled = time.monotonic() - self._heartbeat
        if self.scheduler.has_work and stalled > self.settings.engine_stall_seconds:
            return f"no engine step has finished for {stalled:.0f} s while requests wait"
        return None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops the engine: running and waiting sequences end with an error event once
        the current step ends; waits for that at most `timeout` seconds."""
        self._stopping.set()
        self.scheduler.wake()
        self._thread.join(timeout=timeout)
        self.grammars.shutdown()

    # -- the engine thread ------------------------------------------------------

    def _run(self, model: Any, device: torch.device, dtype: torch.dtype) -> None:
        """The engine thread: builds the runner, then steps until shutdown."""
        try:
            if device.type == "cpu" and self.settings.heap_large_blocks:
                keep_large_blocks()
            self.runner = GPT2Runner(
                model,
                device,
                dtype,
                self.settings.max_batch_size,
                quantize_int8=resolve_int8(self.settings.quantize, self.settings.dtype, device),
                n_ctx=self.max_model_len,
                memory_utilization=self.settings.memory_utilization,
                native_kernels=self.settings.native_kernels,
                fixed_shapes=self.settings.fixed_shapes,
                cuda_graphs=self.settings.cuda_graphs,
                reuse_logits=True,  # `_append` reads a step's logits within the step
            )
            self.sampler = Sampler(
                self.settings.max_batch_size,
                self.runner.vocab_size,
                device,
                self.eos_token_id,
                max_tokens=self.max_model_len,
            )
            threads = self.settings.grammar_threads
            if threads is None:
                threads = 0 if device.type == "cpu" else GRAMMAR_THREADS_BESIDE_ACCELERATOR
            self.masks = MaskBuilder(self.runner.vocab_size, self.settings.max_batch_size, threads)
        except BaseException as exc:
            self._startup_error = exc
            return
        finally:
            self._ready.set()
        reason = "the engine has shut down"
        try:
            self._loop()
        except EngineDead as exc:
            reason = str(exc)
        except BaseException as exc:  # the thread itself is ending: nothing may hang
            reason = f"the engine thread died: {exc!r}"
            logger.exception("engine thread died")
        finally:
            self._die(reason)

    def _loop(self) -> None:
        # Failed steps since the last one that made progress (`step`'s answer). A
        # step that only prefills is progress only if a sequence finished in it: a
        # decode that always fails would otherwise never be noticed, each new
        # request resetting the count.
        failures = 0
        while not self._stopping.is_set():
            self._heartbeat = time.monotonic()
            if not self.scheduler.wait_for_work(timeout=0.5):
                continue
            try:
                if self.step():
                    failures = 0
            except Exception as exc:
                failures += 1
                self._recover(exc, failures)
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise EngineDead(
                        f"{failures} engine steps failed in a row; the last: {exc}"
                    ) from exc

    def _recover(self, exc: Exception, failures: int) -> None:
        """After a failed step: every running sequence gets an error event and every slot
        is freed, so the next step starts from a consistent, empty batch."""
        logger.exception(
            "engine step failed (%d in a row); failing its %d running sequences",
            failures,
            len(self.scheduler.running),
        )
        self._deliver(self.scheduler.fail_running(f"generation failed: {exc}"))
        self.metrics.step_failures.inc()
        try:
            self.runner.clear_slots()  # whatever the step left half-written, nobody reads
        except Exception as clear_exc:  # the device itself is broken (a sticky CUDA error)
            raise EngineDead(
                f"clearing the KV cache after a failed step failed: {clear_exc}"
            ) from clear_exc

    def _die(self, reason: str) -> None:
        """The engine stops for good: new requests are refused, held ones fail, and every
        client still waiting gets its events, whatever path lost them."""
        self._dead = reason
        if not self._stopping.is_set():
            logger.error("engine stopped: %s", reason)
        self.scheduler.close(reason)  # fails what it holds; refuses what comes
        # Every client still registered, whatever path lost its events, hears now.
        held = [sink.output.seq for sink in list(self._sinks.values())]
        for seq in held:
            seq.finish(Status.FAILED, error=reason)  # no-op when its finish event is pending
        self._deliver(held)

    def step(self) -> bool:
        """Retire, admit (prefill), decode one token per running sequence, deliver.

        Returns whether it made progress: decoded, or finished a sequence normally.
        """
        done = self.scheduler.retire()
        admitted, dropped = self.scheduler.admit()
        self._deliver(done + dropped)  # now: whatever happens next, these clients hear
        for seq in admitted:  # before any write: a source slot is read as it is now
            if seq.copy_from is not None:
                self.runner.copy_prefix(seq.copy_from, seq.slot, seq.cached_tokens)
        self.metrics.queue_depth.set(self.scheduler.num_waiting)
        self.metrics.running_batch_size.set(len(self.scheduler.running))
        fresh = set(admitted)
        decoding = sorted(
            (s for s in self.scheduler.running if s not in fresh), key=lambda s: s.slot
        )
        if decoding:
            logits = self.runner.decode(
                [s.output_ids[-1] for s in decoding],
                [s.num_tokens - 1 for s in decoding],
                [s.slot for s in decoding],
            )
            self._append(decoding, logits)
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as exc:
                if not decoding:
                    raise  # nothing else ran: the loop counts it as a failed step
                # The decoded sequences are whole; only the new ones fail.
                logger.exception("engine step failed in prefill; failing %d new", len(admitted))
                self.metrics.step_failures.inc()
                for seq in admitted:
                    seq.finish(Status.FAILED, error=f"generation failed: {exc}")
                    seq.prefilled = False  # one that finished in it leaves no prefix
                self.runner.clear_slots([s.slot for s in admitted])
        self._deliver(self.scheduler.running)
        return bool(decoding) or any(
            s.status.finished and s.status is not Status.FAILED for s in admitted
        )

    def _prefill(self, admitted: list[Sequence]) -> None:
        scoring = [i for i, s in enumerate(admitted) if s.params.scores_prompt]
        logits, prompt_logits = self.runner.prefill(
            [s.prompt_ids[s.cached_tokens :] for s in admitted],
            [s.slot for s in admitted],
            scoring,
            [s.cached_tokens for s in admitted],
        )
        for seq in admitted:
            seq.prefilled = True
        prompt_tokens = sum(len(s.prompt_ids) for s in admitted)
        cached = sum(s.cached_tokens for s in admitted)
        self.metrics.prompt_tokens.inc(prompt_tokens - cached)
        if self.scheduler.prefix_cache is not None:
            self.metrics.prefix_cache_queries.inc(prompt_tokens)
            self.metrics.prefix_cache_hits.inc(cached)
        for i, full in zip(scoring, prompt_logits, strict=True):
            seq = admitted[i]
            try:  # entries from `cached_tokens` on: the first (None) is the cache's
                computed = prompt_logprobs(
                    full, seq.prompt_ids[seq.cached_tokens :], seq.params.prompt_logprobs or 0
                )
            except ValueError:
                self._fail_non_finite(seq)
                continue
            seq.prompt_logprobs = (seq.prefix_logprobs or []) + computed[bool(seq.cached_tokens) :]
        self.sampler.admit(admitted)
        # max_new_tokens 0: the prompt is scored, nothing is generated.
        rows = []
        for i, seq in enumerate(admitted):
            if seq.status.finished:
                continue
            if seq.params.max_new_tokens == 0:
                seq.finish(Status.FINISHED_LENGTH)
            else:
                rows.append(i)
        if rows:
            every = len(rows) == len(admitted)
            index = torch.tensor(rows, device=logits.device)
            self._append([admitted[i] for i in rows], logits if every else logits[index])

    def _fail_non_finite(self, seq: Sequence) -> None:
        seq.finish(Status.FAILED, error=NON_FINITE_LOGITS)
        # Its keys and values may be NaN: a later, shorter occupant would attend
        # over them masked, and a masked NaN still makes NaN (0 x NaN).
        self.runner.clear_slots([seq.slot])

    def _append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        forbidden = None
        if constrained:
            matchers = [seqs[i].grammar for i in constrained]
            forbidden = (constrained, self.masks.forbidden(matchers, logits.device))
        token_ids, logprobs = self.sampler.choose(logits, seqs, forbidden)
        eos, generated = self.eos_token_id, 0
        for i, (seq, token_id) in enumerate(zip(seqs, token_ids, strict=True)):
            if token_id == INVALID:
                self._fail_non_finite(seq)
                continue
            grammar = seq.grammar
            if grammar is not None and not grammar.advance(token_id):
                # Only a matcher in an error state rejects the token its own mask allowed:
                # the request's grammar hit one of llguidance's per-step limits (Earley
                # items, lexer fuel) mid-output. The output would not match, so it fails,
                # as the client's error (its field named), not the engine's.
                constraint = seq.params.constraint
                param = constraint.param if constraint is not None else None
                error = grammar_failed(param or "constraint", grammar, len(seq.output_ids))
                seq.finish(Status.FAILED, error=error, param=param)
                continue
            if seq.token_logprobs is not None:
                seq.token_logprobs.append(logprobs[i])
            seq.append_token(token_id, eos, grammar is not None and grammar.complete)
            generated += 1
        self.metrics.generated_tokens.inc(generated)

    def _deliver(self, seqs: list[Sequence]) -> None:
        """Hands these sequences' new tokens and finishes to their event loops' output
        side, one call per loop (textgen/output.py)."""
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list[Delta]] = {}
        sinks = self._sinks
        for seq in seqs:
            if seq.finish_delivered:
                continue
            start, end = seq.delivered, len(seq.output_ids)
            finished = seq.status.finished
            if start == end and not finished:
                continue
            seq.delivered = end
            sink = sinks.get(seq.request_id)
            if finished:
                seq.finish_delivered = True
                sinks.pop(seq.request_id, None)
            if sink is None:  # the engine's own (warm-up)
                continue
            logprobs = seq.token_logprobs
            batches.setdefault(sink.loop, []).append(
                (
                    sink.output,
                    seq.output_ids[start:end],
                    None if logprobs is None else logprobs[start:end],
                    seq.status if finished else None,
                    seq.error,
                    seq.cached_tokens,
                    seq.prompt_logprobs if start == 0 else None,
                )
            )
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its clients are gone
                loop.call_soon_threadsafe(process_step, batch, now, self.metrics)


# A sequence that ended so has no answer for its request: the request ends at once.
_UNANSWERED = (Status.FAILED, Status.CANCELLED)


class HeldEvents:
    """A queue whose reader wants all of it: the events of `pending` sequences are held
    (in the order `SequenceOutput` puts them) until every sequence has finished, or one
    has failed or been cancelled; from then on they pass straight through (a failure's
    request answers with the error at once and cancels the others). Its reader wakes
    once while all goes well, not at each token."""

    def __init__(self, pending: int) -> None:
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._held: list[tuple[int, Event]] | None = []  # None once released
        self._pending = pending  # sequences whose FinishEvent has not been put

    def put_nowait(self, item: tuple[int, Event]) -> None:
        if self._held is None:
            self._queue.put_nowait(item)
            return
        self._held.append(item)
        event = item[1]
        if isinstance(event, FinishEvent):
            self._pending -= 1
            if not self._pending or event.status in _UNANSWERED:
                held, self._held = self._held, None
                for each in held:
                    self._queue.put_nowait(each)

    async def get(self) -> tuple[int, Event]:
        return await self._queue.get()

    def empty(self) -> bool:
        return self._queue.empty()

    def get_nowait(self) -> tuple[int, Event]:
        return self._queue.get_nowait()


class EventStream:
    """The events of submitted sequences, as (index in `seqs`, event), until all finish.

    Closing it early (client gone, task cancelled) cancels every sequence still
    running; their rows free at the next step.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        seqs: list[Sequence],
        queue: asyncio.Queue[tuple[int, Event]] | HeldEvents,
    ) -> None:
        self._scheduler = scheduler
        self._seqs = seqs
        self._queue = queue
        self._index = {seq.request_id: i for i, seq in enumerate(seqs)}
        self._pending = len(seqs)  # sequences whose FinishEvent has not been read

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if not self._pending:
            raise StopAsyncIteration
        request_id, event = await self._queue.get()
        if isinstance(event, FinishEvent):
            self._pending -= 1
        return self._index[request_id], event

    def ready(self) -> list[tuple[int, Event]]:
        """Every event already queued, taken without waiting, in order (streams coalesce
        them: textgen/coalesce.py). Held events are ready once they are released."""
        taken = []
        queue = self._queue
        while self._pending and not queue.empty():
            request_id, event = queue.get_nowait()
            if isinstance(event, FinishEvent):
                self._pending -= 1
            taken.append((self._index[request_id], event))
        return taken

    async def aclose(self) -> None:
        for seq in self._seqs:
            if not seq.status.finished:
                self._scheduler.cancel(seq)
