"""uvicorn's keep-alive as this service sets it. `bentoml serve` gives uvicorn 5 s unless
its hidden `--timeout-keep-alive` option says otherwise; `TEXTGEN_KEEP_ALIVE_SECONDS`
(which the image and `make serve` carry like every other setting) wins over both.

Two invariants, for every HTTP/1.1 connection the worker holds:

- An idle connection stays open `TEXTGEN_KEEP_ALIVE_SECONDS` (75 s), longer than the idle
  expiry of the usual client pools (httpx and the openai client 5 s, aiohttp 15 s). Such a
  client closes an idle connection before the server does, so it never sends a request
  on a connection the server is closing.
- The keep-alive timeout never closes a connection on which bytes of a next request have
  arrived. Closing a socket with unread data resets it (RST): the request is lost with no
  response and no log line, the client sees `Connection reset by peer`. The timer can fire
  with the request already in the socket's buffer: a client whose pool keeps connections
  longer than the server (urllib3, or any at the deadline) sends just as the deadline
  passes, and an event loop that ran late (busy, or descheduled on shared cores) runs its
  due timers before it reads. The connection then stays open; the read that follows
  cancels the timer and the request is served.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Callable
from typing import Any


def unread_bytes(transport: Any) -> int:
    """Bytes waiting in the transport's socket to be read (0 when it can't be told)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", answer)[0])


def _protocols() -> list[type]:
    """uvicorn's HTTP/1.1 protocol classes that are importable here (httptools is optional)."""
    found = []
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        found.append(HttpToolsProtocol)
    except ImportError:
        pass
    from uvicorn.protocols.http.h11_impl import H11Protocol

    found.append(H11Protocol)
    return found


def install(seconds: float) -> None:
    """Applies both invariants to uvicorn's protocols in this process (the worker, before it
    serves: `TextgenService.to_asgi`). Installing again only changes the timeout."""
    for protocol in _protocols():
        original_init = getattr(protocol, "_textgen_original_init", protocol.__init__)
        original_handler = getattr(
            protocol, "_textgen_original_handler", protocol.timeout_keep_alive_handler
        )
        protocol._textgen_original_init = original_init
        protocol._textgen_original_handler = original_handler
        protocol.__init__ = _init_with_timeout(original_init, seconds)
        protocol.timeout_keep_alive_handler = _handler_sparing_requests(original_handler)


def _init_with_timeout(original: Callable[..., None], seconds: float) -> Callable[..., None]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.timeout_keep_alive = seconds

    return __init__


def _handler_sparing_requests(original: Callable[[Any], None]) -> Callable[[Any], None]:
    def timeout_keep_alive_handler(self: Any) -> None:
        if self.transport.is_closing() or unread_bytes(self.transport) == 0:
            original(self)
        # else a request has arrived: data_received comes next and cancels this timer

    return timeout_keep_alive_handler
