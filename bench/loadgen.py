"""The closed loop the HTTP benches drive: `clients` clients, each sending its next request
as soon as its last one is answered, over one connection pool sized for all of them.

bench/bench.py, bench/gpu_bench.py, bench/http_overhead.py, bench/overload.py and
bench/structured.py load their servers with it; each says what one request is.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


def pool(
    clients: int, timeout: float = 900, keepalive: int | None = None, **kw: object
) -> httpx.AsyncClient:
    """An httpx.AsyncClient with a connection for each of `clients` and 4 to spare;
    `keepalive`: how many it keeps open between requests (None: all). `kw` goes to
    httpx.AsyncClient (base_url, ...)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=keepalive)
    return httpx.AsyncClient(timeout=timeout, limits=limits, **kw)


async def closed_loop(
    clients: int,
    one: Callable[[int, int], Awaitable[T]],
    rounds: int | None = None,
    requests: int | None = None,
) -> tuple[list[T], float]:
    """`clients` concurrent loops; loop k awaits `one(k, r)` for its r-th request as soon
    as its last one returned, `rounds` times, or (with `requests` instead) until that
    many have been started among all loops. Returns every result, in the order they
    returned, and the seconds from the first start to the last return."""
    if (rounds is None) == (requests is None):
        raise ValueError("closed_loop takes rounds or requests, one of them")
    results: list[T] = []
    left = requests

    async def loop(k: int) -> None:
        nonlocal left
        for r in itertools.count() if rounds is None else range(rounds):
            if left is not None:
                if left <= 0:
                    return
                left -= 1
            results.append(await one(k, r))

    started = time.perf_counter()
    await asyncio.gather(*(loop(k) for k in range(clients)))
    return results, time.perf_counter() - started
