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
from typing import Protocol

from textgen.scheduler import Event, FinishEvent, TokenEvent


class Events(Protocol):
    """The engine's EventStream: awaits the next event, or takes those already queued."""

    def __aiter__(self) -> AsyncIterator[tuple[int, Event]]: ...

    def ready(self) -> list[tuple[int, Event]]: ...


async def runs(events: Events) -> AsyncIterator[tuple[int, list[Event]]]:
    """(sequence index, events) to write as one SSE event each: a sequence's token events
    queued together, in order, or one finish event (after that sequence's tokens)."""
    async for first in events:
        tokens: dict[int, list[Event]] = {}  # per sequence, in first-seen order
        for i, event in [first, *events.ready()]:
            if isinstance(event, TokenEvent):
                tokens.setdefault(i, []).append(event)
                continue
            assert isinstance(event, FinishEvent)
            if i in tokens:
                yield i, tokens.pop(i)
            yield i, [event]
        for i, group in tokens.items():
            yield i, group
