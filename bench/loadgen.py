"""The closed loop the HTTP benches drive: `clients` clients, each sending its next request
as soon as its last one is answered, over one connection pool sized for all of them.

bench/bench.py, bench/gpu_bench.py, bench/http_overhead.py, bench/overload.py and
bench/structured.py load their servers with it; each says what one request is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
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


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads each answer whole,
    parsing only its framing (Content-Length or chunked): a load generator as light as
    wrk's, for benches whose client shares the CPU with the server it measures (httpx's
    pool does per-request work that grows with its connections)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @classmethod
    def to(cls, url: str) -> Connection:
        """A connection to `url`'s host and port (http://host:port), opened at first use."""
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        return cls(host, int(port or 80))

    async def post(self, path: str, body: object) -> tuple[int, bytes]:
        """(status, the whole response body) of a POST of `body` as JSON. Never resent:
        a connection that ends without an answer raises ConnectionError (a drop to count,
        not to hide), and any failure closes it, so the next request opens a new one."""
        payload = json.dumps(body).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        try:
            await self._open()
            self._writer.write(request)  # type: ignore[union-attr]
            status_line = await self._reader.readline()  # type: ignore[union-attr]
            if not status_line:
                raise ConnectionError("the server closed the connection without answering")
            return await self._response(int(status_line.split(b" ", 2)[1]))
        except BaseException:
            self._drop()  # what is left of that response is unknown
            raise

    async def _open(self) -> None:
        """Opens the connection unless it is open (and not closed by the server)."""
        if self._writer is not None and self._reader is not None and not self._reader.at_eof():
            return
        await self.close()
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def _response(self, status: int) -> tuple[int, bytes]:
        reader = self._reader
        assert reader is not None
        length, chunked, close = 0, False, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value == b"chunked"
            elif name == b"connection":
                close = value == b"close"
        if chunked:
            parts = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                parts.append(await reader.readexactly(size + 2))  # the chunk and its CRLF
                parts[-1] = parts[-1][:-2]
            await reader.readline()  # the last chunk's CRLF (no trailers)
            data = b"".join(parts)
        else:
            data = await reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
