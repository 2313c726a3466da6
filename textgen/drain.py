"""SIGTERM drains the replica: /readyz turns 503 first, the server stops accepting later.

BentoML's process manager holds the listening socket until the whole server
exits, so once uvicorn stops accepting, new connections wait in the kernel's
queue unanswered until they are reset. A balancer must stop sending before
that happens. So on SIGTERM the worker keeps serving for `drain_seconds` with
/readyz answering 503 (health checks take the replica out of rotation), and
only then hands the signal to uvicorn, which finishes the requests in flight
and exits. Invariant: once `draining()` is true it stays true until exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger("bentoml.textgen")  # BentoML configures its loggers only
_draining = threading.Event()
_installed = False


def draining() -> bool:
    return _draining.is_set()


def install(drain_seconds: float) -> None:
    """Puts the drain in front of the SIGTERM handler uvicorn installed (main thread only)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):
        return  # no server handler to defer to: the default action stands

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if _draining.is_set():
            return  # already draining: the deferred handler will run once
        _draining.set()
        logger.info("SIGTERM: draining, /readyz answers 503; stop accepting in %gs", drain_seconds)
        if drain_seconds <= 0:
            server_handler(signum, frame)
            return
        later = threading.Timer(drain_seconds, _call, (server_handler, signum))
        later.daemon = True
        later.start()

    signal.signal(signal.SIGTERM, on_sigterm)
    _installed = True


def _call(handler: Any, signum: int) -> None:
    logger.info("drain period over: the server stops accepting, requests in flight finish")
    handler(signum, None)  # uvicorn's handler only sets flags its main loop polls
