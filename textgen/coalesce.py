"""Streams coalesce under load: the events already waiting go out in one SSE event.

An SSE writer takes the next event from the engine (waiting for it), then every event
already queued behind it (not waiting), and writes them as one event. While the client
and the event loop keep up, at most one token is queued at a time, so every token is its
own event; when the client reads more slowly than tokens arrive (its writes block) or
the loop falls behind, the tokens that piled up meanwhile go out together, and a slow
stream costs one event per write instead of one per token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from textgen.scheduler import Event, FinishEvent, TokenEvent

T = TypeVar("T")
_NOTHING = object()  # nothing ready now
_END = object()  # the stream ended


def ready_now(events: AsyncIterator[T]) -> object:
    """The next event if `events` has it without waiting, else _NOTHING (or _END).

    Relies on the stream's `__anext__` taking an event only when it returns (the engine's
    EventStream: one `Queue.get`): a step that would wait has taken nothing, and closing
    it withdraws its wait (`Queue.get` removes its waiter), so no event is lost.
    """
    step = events.__anext__()
    try:
        step.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return done.value
    except StopAsyncIteration:
        return _END
    step.close()  # type: ignore[attr-defined]
    return _NOTHING


async def ready_batches(events: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """Lists of events: the next one (awaited), then all that were already queued."""
    async for first in events:
        batch = [first]
        while (more := ready_now(events)) is not _NOTHING and more is not _END:
            batch.append(more)  # type: ignore[arg-type]
        yield batch
        if more is _END:
            return


async def runs(events: AsyncIterator[tuple[int, Event]]) -> AsyncIterator[tuple[int, list[Event]]]:
    """(sequence index, events) to write as one SSE event each: a sequence's token events
    queued together, in order, or one finish event (after that sequence's tokens)."""
    async for batch in ready_batches(events):
        tokens: dict[int, list[Event]] = {}  # per sequence, in first-seen order
        for i, event in batch:
            if isinstance(event, TokenEvent):
                tokens.setdefault(i, []).append(event)
                continue
            assert isinstance(event, FinishEvent)
            if i in tokens:
                yield i, tokens.pop(i)
            yield i, [event]
        for i, group in tokens.items():
            yield i, group
