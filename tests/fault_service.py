"""The real service with a fault injected into its runner, for the engine-failure tests.

    bentoml serve tests.fault_service:TextGeneration

Hardware faults can't be made on demand, so this wraps `GPT2Runner.decode`,
armed once the warm-up has passed. TEXTGEN_TEST_FAULT says which fault:
- `decode_fails`: every decode step raises, as on a device gone bad;
- `thread_dies_after=N`: the N-th decode ends the engine thread (SystemExit);
- `slow_decode=SECONDS`: every decode step sleeps this long first (tokens come slowly).
- `grammar_compile_sleeps=S`: each structured-output compile first sleeps S seconds, as a
  costly schema's would take (the compile threads stay busy; the engine does not wait).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from textgen import structured
from textgen.engine import Engine
from textgen.runner import GPT2Runner

FAULT = os.environ.get("TEXTGEN_TEST_FAULT", "")
_armed = threading.Event()
_calls = [0]
_decode = GPT2Runner.decode
_warm_up = Engine.warm_up
_grammar_text = structured.grammar_text


def _faulty_decode(self: GPT2Runner, *args: Any) -> Any:
    if _armed.is_set():
        _calls[0] += 1
        if FAULT == "decode_fails":
            raise RuntimeError("injected fault: the device is gone")
        if FAULT.startswith("thread_dies_after=") and _calls[0] == int(FAULT.split("=")[1]):
            raise SystemExit("injected fault")
        if FAULT.startswith("slow_decode="):
            time.sleep(float(FAULT.split("=")[1]))
    return _decode(self, *args)


def _slow_grammar_text(constraint: Any) -> str:
    if _armed.is_set() and FAULT.startswith("grammar_compile_sleeps="):
        time.sleep(float(FAULT.split("=")[1]))
    return _grammar_text(constraint)


def _warm_up_then_arm(self: Engine) -> None:
    _warm_up(self)
    _armed.set()


GPT2Runner.decode = _faulty_decode  # type: ignore[method-assign]
Engine.warm_up = _warm_up_then_arm  # type: ignore[method-assign]
structured.grammar_text = _slow_grammar_text

from service import TextGeneration  # noqa: E402  (after the patches, which it must see)

__all__ = ["TextGeneration"]
