"""The generation engine: one scheduler, one runner, one background thread.

Request handlers (asyncio, in BentoML's worker) submit sequences and read their
events; the engine thread loops `step()`: retire finished sequences, admit
waiting ones (prefilled together), decode one token for every running
sequence, then hand each step's events to the event loop in one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textgen import metrics
from textgen.config import Settings
from textgen.devices import resolve_device, resolve_dtype
from textgen.params import ParamError, SamplingParams, check_unicode
from textgen.runner import GPT2Runner
from textgen.sampling import choose_tokens
from textgen.scheduler import Event, FinishEvent, QueueFull, Scheduler, Sequence, Status

# A child of BentoML's logger, so `bentoml serve` shows these lines in its own format.
logger = logging.getLogger("bentoml.textgen")


class EngineOverloaded(Exception):
    """The admission queue is full; the client should retry later."""


@dataclass(frozen=True)
class ModelInfo:
    name: str  # model store name, the id clients use
    tag: str  # full store tag, name:version
    source: str  # hub:<id>@<rev> | dir:<path> | random
    random_weights: bool  # True: seeded random weights, the text is meaningless
    n_ctx: int  # context length in tokens


@dataclass
class _Sink:
    """Where a sequence's events go, and the route its request came by."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, Event]]
    route: str


class Engine:
    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, settings: Settings) -> None:
        self.settings = settings
        self.info = info
        self.tokenizer = tokenizer
        self.eos_token_id: int | None = model.config.eos_token_id
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        self.scheduler = Scheduler(
            settings.max_batch_size, settings.max_waiting, settings.max_prefill_tokens
        )
        self.metrics = metrics.get()
        self._sinks: dict[int, _Sink] = {}  # request_id -> where its events go
        self._stopping = threading.Event()
        # NOTE: the engine thread builds the runner itself. Measured here (2-core
        # CPU, bench/engine_bench.py, 32 streams): a runner built on the main thread
        # and driven from this one decodes at 570 tok/s in bf16 and 860 in int8;
        # built on it, 760 and 1345. Elementwise ops are what slow down; the cause
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
            "engine ready: model=%s source=%s device=%s dtype=%s quantize=%s max_batch_size=%d%s",
            info.tag,
            info.source,
            device,
            self.runner.dtype,
            settings.quantize,
            settings.max_batch_size,
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

    def encode(
        self,
        prompt: str,
        max_new_tokens: int,
        field: str = "prompt",
        budget_field: str = "max_new_tokens",
    ) -> list[int]:
        """Tokenizes a prompt, checking the limits and that it fits the context.

        `field` and `budget_field` are the wire names of the prompt and of the
        new-token budget, so the message speaks the client's vocabulary.
        """
        check_unicode(prompt, field)
        budget_limit = self.settings.max_new_tokens_limit
        if max_new_tokens > budget_limit:
            raise ParamError(
                budget_field, f"{budget_field} must be <= {budget_limit}, got {max_new_tokens}"
            )
        limit = self.settings.max_prompt_chars
        if len(prompt) > limit:
            raise ParamError(field, f"{field} has {len(prompt)} characters; the limit is {limit}")
        ids: list[int] = self.tokenizer(prompt).input_ids
        if not ids:
            raise ParamError(field, f"{field} must not be empty")
        n_ctx = self.info.n_ctx
        if len(ids) + max_new_tokens > n_ctx:
            raise ParamError(
                field,
                f"{field} has {len(ids)} tokens and {budget_field} is {max_new_tokens}: "
                f"{len(ids) + max_new_tokens} exceeds the model's context of {n_ctx} tokens",
            )
        return ids

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """One request's sequence; sampling without a seed gets a random one (`seq.params.seed`
        reports it back to the client)."""
        generator = None
        if params.do_sample:
            if params.seed is None:
                params = replace(params, seed=random.randrange(2**31))
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(params.seed)
        return Sequence(prompt_ids, params, self.tokenizer, generator)

    def stream(self, seqs: list[Sequence], route: str = "engine") -> EventStream:
        """Submits sequences together, now (EngineOverloaded when the queue is full).

        `route` labels the requests metric, counted by the engine when each
        sequence finishes.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        for seq in seqs:
            self._sinks[seq.request_id] = _Sink(loop, queue, route)
        try:
            self.scheduler.submit(seqs)
        except QueueFull as exc:
            for seq in seqs:
                del self._sinks[seq.request_id]
            raise EngineOverloaded(str(exc)) from None
        return EventStream(self.scheduler, seqs, queue)

    def warm_up(self) -> None:
        """One short generation through every code path before the service says ready."""
        started = time.perf_counter()
        params = SamplingParams(max_new_tokens=4, min_new_tokens=4)
        seqs = [self.new_sequence(self.encode("Warm up", 4), params)]
        self.scheduler.submit(seqs)
        while not seqs[0].status.finished:
            time.sleep(0.01)
        logger.info("warm-up took %.2fs", time.perf_counter() - started)

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    # -- the engine thread ------------------------------------------------------

    def _run(self, model: Any, device: torch.device, dtype: torch.dtype) -> None:
        """The engine thread: builds the runner, then steps until shutdown."""
        try:
            int8 = self.settings.quantize == "int8"
            self.runner = GPT2Runner(
                model, device, dtype, self.settings.max_batch_size, quantize_int8=int8
            )
        except BaseException as exc:
            self._startup_error = exc
            return
        finally:
            self._ready.set()
        self._loop()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self.scheduler.wait_for_work(timeout=0.5):
                continue
            try:
                self.step()
            except Exception:  # the loop must outlive any one step
                logger.exception("engine step failed outside the forward pass")

    def step(self) -> None:
        """Retire, admit (prefill), decode one token per running sequence, deliver."""
        done, moves = self.scheduler.retire()
        if moves:
            self.runner.move_rows(moves, used=max(s.num_tokens for s in self.scheduler.running))
        admitted, dropped = self.scheduler.admit()
        self.metrics.queue_depth.set(self.scheduler.num_waiting)
        self.metrics.running_batch_size.set(len(self.scheduler.running))
        decoding = self.scheduler.running[: len(self.scheduler.running) - len(admitted)]
        try:
            self._forward(decoding, admitted)
        except Exception as exc:  # a failed step fails its sequences, never the engine
            logger.exception("generation step failed")
            for seq in self.scheduler.running:
                seq.finish(Status.FAILED, error=f"generation failed: {exc}")
        self._deliver(done + dropped + self.scheduler.running)

    def _forward(self, decoding: list[Sequence], admitted: list[Sequence]) -> None:
        if decoding:
            logits = self.runner.decode(
                [s.output_ids[-1] for s in decoding], [s.num_tokens - 1 for s in decoding]
            )
            self._append(decoding, logits)
        if admitted:
            logits = self.runner.prefill(
                [s.prompt_ids for s in admitted], first_row=admitted[0].row
            )
            self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in admitted))
            self._append(admitted, logits)

    def _append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        choices = choose_tokens(logits, seqs, self.eos_token_id)
        now = time.perf_counter()
        for seq, choice in zip(seqs, choices, strict=True):
            if seq.last_token_time is None:
                self.metrics.time_to_first_token.observe(now - seq.arrival_time)
            else:
                self.metrics.inter_token_latency.observe(now - seq.last_token_time)
            seq.last_token_time = now
            seq.append_token(
                choice.token_id, self.eos_token_id, choice.logprob, choice.top_logprobs
            )
        self.metrics.generated_tokens.inc(len(seqs))

    def _deliver(self, seqs: list[Sequence]) -> None:
        """Hands this step's events to each sequence's event loop, one call per loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, int, Event]]] = {}
        for seq in seqs:
            events, seq.events = seq.events, []
            sink = self._sinks.get(seq.request_id)
            if sink is None or not events:
                continue
            batch = batches.setdefault(sink.loop, [])
            batch.extend((sink.queue, seq.request_id, e) for e in events)
            if seq.status.finished:  # its FinishEvent is in this batch: the last one
                self.metrics.requests.labels(sink.route, seq.status.finish_reason).inc()
                del self._sinks[seq.request_id]
        for loop, batch in batches.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its clients are gone
                loop.call_soon_threadsafe(_put_all, batch)


class EventStream:
    """The events of submitted sequences, as (index in `seqs`, event), until all finish.

    Closing it early (client gone, task cancelled) cancels every sequence still
    running; their rows free at the next step.
    """

    def __init__(
        self, scheduler: Scheduler, seqs: list[Sequence], queue: asyncio.Queue[tuple[int, Event]]
    ) -> None:
        self._scheduler = scheduler
        self._seqs = seqs
        self._queue = queue
        self._index = {seq.request_id: i for i, seq in enumerate(seqs)}
        self._pending = len(seqs)  # sequences whose FinishEvent has not come yet

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if not self._pending:
            raise StopAsyncIteration
        request_id, event = await self._queue.get()
        if isinstance(event, FinishEvent):
            self._pending -= 1
        return self._index[request_id], event

    async def aclose(self) -> None:
        for seq in self._seqs:
            if not seq.status.finished:
                self._scheduler.cancel(seq)


def _put_all(batch: list[tuple[asyncio.Queue, int, Event]]) -> None:
    for queue, request_id, event in batch:
        queue.put_nowait((request_id, event))
